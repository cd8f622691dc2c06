"""Attention backends against resolution: peak memory and time of one UNet forward per (size, backend) cell, each
cell in a fresh subprocess so that its peak resident memory is its own.

A cell loads the model's UNet in float32 (float16 on CUDA), switches its attention (pipelines.attention), and runs
one forward shaped like one image of a guided generation (two rows: unconditional and conditional) at the size.
On the CPU the subprocess's address space is capped (RLIMIT_AS) at what it had after loading plus --memory-cap,
so that a backend that needs more fails with an allocation error, reported as "out of memory", instead of pushing
the machine (and whatever else runs on it) into swap or the OOM killer. On CUDA the allocator's peak is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from image_gen.bench.measure import PeakMemory, Stopwatch, mib
from image_gen.bench.models import BUILDERS, SD15_ARCH
from image_gen.bench.report import machine, machine_markdown, write_report

CELL_FLAG = "--cell"
# How an allocation refused under the cap shows up: torch's allocators, and oneDNN failing to get its workspace.
ALLOCATION_FAILED = ("memory", "alloc", "could not create a primitive")


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_cell(path: Path, size: int, backend: str, device_name: str, cap_bytes: int, rows: int) -> dict:
    """One forward in this process (the subprocess side); returns what to print as JSON."""
    from diffusers import UNet2DConditionModel

    from pipelines.attention import set_attention
    from pipelines.params import read_json

    device = torch.device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype).eval().to(device)
    applied = set_attention(unet, backend, device)
    tokens = read_json(path / "tokenizer" / "tokenizer_config.json").get("model_max_length", 77)
    latent = size // 2 ** (len(read_json(path / "vae" / "config.json")["block_out_channels"]) - 1)
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    states = torch.randn(rows, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)
    if device.type == "cpu" and cap_bytes:
        limit = _vm_size() + cap_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    clock = Stopwatch(device)
    result: dict = {"size": size, "backend": backend, "applied": applied, "rows": rows, "tokens": tokens}
    try:
        with torch.inference_mode(), PeakMemory(device) as peak:
            started = clock.start()
            unet(sample, 500, encoder_hidden_states=states, return_dict=False)
            elapsed = clock.stop(started)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, MemoryError) and not any(sign in str(error).lower() for sign in ALLOCATION_FAILED):
            raise
        result["error"] = "out of memory"
        return result
    result |= {"wall_s": elapsed.wall, "cpu_s": elapsed.cpu, **peak.result()}
    return result


def measure(path: Path, size: int, backend: str, device: str, cap_bytes: int, rows: int, threads: int) -> dict:
    """Run one cell in a fresh interpreter and read its JSON line."""
    command = [sys.executable, "-m", "image_gen.bench.attention", CELL_FLAG, str(path), str(size), backend, device,
               str(cap_bytes), str(rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads) if threads > 0 else os.environ.get("OMP_NUM_THREADS", "")}
    done = subprocess.run(command, capture_output=True, text=True, env={k: v for k, v in env.items() if v})
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
    killed = done.returncode < 0 or "memory" in tail[0].lower()
    return {"size": size, "backend": backend, "error": "out of memory" if killed else tail[0][:200]}


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench attention", description=__doc__)
    parser.add_argument("--model", default=SD15_ARCH, help=f"registry name or a stand-in: {', '.join(BUILDERS)} "
                        f"(default: {SD15_ARCH})")
    parser.add_argument("--sizes", default="256,512,768,1024", help="comma-separated square sizes")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: sdpa,sliced,math; with xformers on CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=2, help="UNet batch rows (default 2: one guided image)")
    parser.add_argument("--memory-cap", type=float, default=None,
                        help="GiB a cell may add on the CPU (default: half of MemAvailable)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell (default 1)")
    parser.add_argument("--name", default="attention", help="report file stem")
    args = parser.parse_args(argv)

    from image_gen.bench.pipeline import build_registry, resolve_model
    from pipelines.text2image import resolve_device

    resolve_device(args.device)  # a device this machine lacks fails here, not in every cell of the report
    registry = build_registry("cpu", "float32", "sdpa")
    info = resolve_model(args.model, registry)
    cuda = args.device.startswith("cuda")
    backends = args.backends.split(",") if args.backends else ["sdpa", "sliced", "math"] + (["xformers"] if cuda else [])
    cap = int(args.memory_cap * 2**30) if args.memory_cap else max(2**30, available_memory() // 2)
    load_before = machine()["load_average"]
    cells = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for backend in backends:
            cell = measure(info.path, size, backend, args.device, 0 if cuda else cap, args.rows, args.threads)
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    data = {
        "model": info.name,
        "label": info.label,
        "device": args.device,
        "rows": args.rows,
        "memory_cap_gib": None if cuda else cap / 2**30,
        "command": "image-gen bench attention " + " ".join(argv),
        "machine": {**machine(), "load_average_before": load_before, "threads_per_cell": args.threads},
        "cells": cells,
    }
    for path in write_report(out, args.name, markdown(data, backends), data):
        print(path)
    return 0


def markdown(data: dict, backends: list[str]) -> str:
    cuda = data["device"].startswith("cuda")
    memory_key = "cuda_added" if cuda else "rss_added"
    lines = [
        f"# Attention backends against resolution ({data['model']}, {data['device']})",
        "",
        f"`{data['command']}`",
        "",
        f"{data['model']} ({data['label']}): one UNet forward of {data['rows']} rows (one guided image) per cell, "
        "each in a fresh subprocess. Peak memory is what the forward added above the loaded UNet: "
        + ("the CUDA allocator's peak." if cuda else
           f"peak RSS (VmHWM, reset after loading). Each cell may add at most {data['memory_cap_gib']:.1f} GiB "
           "(address-space cap): 'out of memory' means the backend needs more than that at this size.")
        + " Time: CPU seconds of the forward (one torch thread), wall seconds in brackets.",
        "",
        "| size | " + " | ".join(f"{b} peak MiB | {b} s" for b in backends) + " |",
        "|---" * (1 + 2 * len(backends)) + "|",
    ]
    by_size: dict[int, dict[str, dict]] = {}
    for cell in data["cells"]:
        by_size.setdefault(cell["size"], {})[cell["backend"]] = cell
    for size, row in by_size.items():
        parts = []
        for backend in backends:
            cell = row.get(backend, {"error": "not run"})
            if "error" in cell:
                parts += [cell["error"], "-"]
            else:
                name = "" if cell["applied"] == backend else f" (ran {cell['applied']})"
                parts += [f"{mib(cell[memory_key]):.0f}{name}", f"{cell['cpu_s']:.1f} ({cell['wall_s']:.1f})"]
        lines.append(f"| {size} | " + " | ".join(parts) + " |")
    lines += ["", "Machine:", "", machine_markdown(data["machine"])]
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == CELL_FLAG:
    _, _, model_path, cell_size, cell_backend, cell_device, cell_cap, cell_rows = sys.argv
    print(json.dumps(run_cell(Path(model_path), int(cell_size), cell_backend, cell_device, int(cell_cap),
                              int(cell_rows))), flush=True)
