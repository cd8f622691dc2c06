"""How far the UNet loop is from what the machine can do: achieved FLOP/s of the bare UNet loop (shaped like a
guided generation) against the matmul peak measured by the same script, and where the rest of the time goes.

FLOPs of one UNet forward are counted by torch's FlopCounterMode with plain math attention (the same arithmetic as
any kernel); the peak is the best of square matmuls of a few sizes in the loop's precision. Both are measured
alternately in the same process, in CPU seconds of one torch thread (wall seconds too), so that other tenants of a
shared machine slow both alike or neither. The profile groups the operators' own CPU time by kind.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from image_gen.bench.measure import Stopwatch
from image_gen.bench.models import BUILDERS
from image_gen.bench.pipeline import build_registry, resolve_model, variant_options
from image_gen.bench.report import machine, machine_markdown, summary, write_report
from pipelines.attention import autocast_context
from pipelines.text2image import Text2ImagePipeline, resolve_device

MATMUL_SIDES = (256, 512, 1024)
# Operator name fragments -> the kind of work, first match wins (aten names, as the profiler reports them).
KINDS = (
    ("attention", ("scaled_dot_product", "flash_attention", "softmax", "baddbmm", "bmm")),
    ("convolution", ("convolution", "conv2d", "mkldnn_convolution", "_convolution")),
    ("matmul (linear)", ("addmm", "::mm", "linear", "matmul")),
    ("normalization", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("activation", ("silu", "gelu", "sigmoid")),
    ("elementwise and copies", ("add", "mul", "div", "sub", "copy_", "to", "cat", "contiguous", "clone", "empty",
                                "upsample", "pad", "view", "reshape", "permute", "transpose", "chunk", "split",
                                "cos", "sin", "exp", "arange", "expand")),
)


def kind_of(name: str) -> str:
    for kind, fragments in KINDS:
        if any(fragment in name for fragment in fragments):
            return kind
    return "other"


def matmul_peak(side: int, dtype: torch.dtype, device: torch.device, clock: Stopwatch, repeats: int = 3) -> dict:
    """FLOP/s of a side x side matmul: the best of `repeats` timed runs of enough products to last ~0.2 s CPU."""
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    a @ b
    started = clock.start()
    a @ b
    once = max(clock.stop(started).cpu, 1e-4)
    count = max(1, int(0.2 / once))
    rates_cpu, rates_wall = [], []
    for _ in range(repeats):
        started = clock.start()
        for _ in range(count):
            a @ b
        elapsed = clock.stop(started)
        flops = 2 * side**3 * count
        rates_cpu.append(flops / max(elapsed.cpu, 1e-9))
        rates_wall.append(flops / elapsed.wall)
    return {"side": side, "cpu": max(rates_cpu), "wall": max(rates_wall)}


def unet_flops(pipe: Text2ImagePipeline, size: int, guidance: float, batch: int) -> tuple[float, dict[str, float]]:
    """FLOPs of one UNet forward shaped like that generation, counted with math attention, and by operator."""
    processors = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(AttnProcessor())
    try:
        with FlopCounterMode(display=False) as counter:
            pipe.bare_unet_loop(size, size, 1, guidance, batch_size=batch)
    finally:
        pipe.unet.set_attn_processor(processors)
    by_op = {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return float(counter.get_total_flops()), by_op


def profile_kinds(pipe: Text2ImagePipeline, size: int, guidance: float, batch: int) -> dict[str, float]:
    """Share of the operators' own CPU time by kind of work, over one UNet forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        pipe.bare_unet_loop(size, size, 1, guidance, batch_size=batch)
    times: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            times[kind_of(event.key)] += event.self_cpu_time_total
    total = sum(times.values()) or 1.0
    return {kind: value / total for kind, value in sorted(times.items(), key=lambda item: -item[1])}


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench limit", description=__doc__)
    parser.add_argument("--model", default=None, help=f"registry name or a stand-in: {', '.join(BUILDERS)}")
    parser.add_argument("--size", type=int, default=None, help="square image size (default: the model's native)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation (default: 8)")
    parser.add_argument("--guidance", type=float, default=None, help="> 1 doubles the UNet rows (default: model's)")
    parser.add_argument("--steps", type=int, default=5, help="UNet passes per timed loop (default: 5)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="default,bf16", help="settings of ours, as for `bench pipeline`")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's own)")
    parser.add_argument("--name", default="limit", help="report file stem")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = "float16" if device.type == "cuda" else "float32"
    registry = build_registry(args.device, dtype, "sdpa")
    info = resolve_model(args.model, registry)
    size = args.size or info.native_size
    guidance = info.default_guidance if args.guidance is None else args.guidance
    clock = Stopwatch(device)

    pipes = {}
    for name in args.variants.split(","):
        pipes[name] = Text2ImagePipeline.from_pretrained(info.path, device=args.device, dtype=dtype, info=info,
                                                         **variant_options(name))
    first = next(iter(pipes.values()))
    flops, flops_by_op = unet_flops(first, size, guidance, args.batch)
    rows_per_forward = args.batch * (2 if guidance > 1 and first.unet.config.time_cond_proj_dim is None else 1)
    load_before = machine()["load_average"]

    results = []
    for name, pipe in pipes.items():
        compute_dtype = getattr(torch, pipe.optimizations.autocast) if pipe.optimizations.autocast != "off" \
            else pipe.dtype
        pipe.bare_unet_loop(size, size, 1, guidance, batch_size=args.batch)  # warm-up
        loop_cpu, loop_wall, peak_cpu, peak_wall = [], [], [], []
        for _ in range(args.repeats):
            started = clock.start()
            pipe.bare_unet_loop(size, size, args.steps, guidance, batch_size=args.batch)
            elapsed = clock.stop(started)
            loop_cpu.append(flops * args.steps / elapsed.cpu)
            loop_wall.append(flops * args.steps / elapsed.wall)
            with autocast_context("off", device):
                peaks = [matmul_peak(side, compute_dtype, device, clock) for side in MATMUL_SIDES]
            best = max(peaks, key=lambda p: p["cpu"])
            peak_cpu.append(best["cpu"])
            peak_wall.append(max(p["wall"] for p in peaks))
        fractions = [loop / peak for loop, peak in zip(loop_cpu, peak_cpu, strict=True)]
        results.append({
            "variant": name,
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "unet_gflop_per_s_cpu": summary([v / 1e9 for v in loop_cpu]),
            "unet_gflop_per_s_wall": summary([v / 1e9 for v in loop_wall]),
            "matmul_peak_gflop_per_s_cpu": summary([v / 1e9 for v in peak_cpu]),
            "matmul_peak_gflop_per_s_wall": summary([v / 1e9 for v in peak_wall]),
            "fraction_of_peak": summary(fractions),
            "time_by_kind": profile_kinds(pipe, size, guidance, args.batch),
        })
    data = {
        "model": info.name,
        "label": info.label,
        "size": size,
        "batch": args.batch,
        "unet_rows": rows_per_forward,
        "steps_per_loop": args.steps,
        "gflop_per_forward": flops / 1e9,
        "gflop_by_op": {op: n / 1e9 for op, n in flops_by_op.items()},
        "command": "image-gen bench limit " + " ".join(argv),
        "machine": {**machine(), "load_average_before": load_before},
        "results": results,
    }
    for path in write_report(out, args.name, markdown(data), data):
        print(path)
    return 0


def markdown(data: dict) -> str:
    by_op = ", ".join(f"{op.removeprefix('aten.')} {n:.2f}" for op, n in data["gflop_by_op"].items())
    lines = [
        f"# The limit: UNet loop FLOP/s against the matmul peak ({data['model']})",
        "",
        f"`{data['command']}`",
        "",
        f"{data['model']} ({data['label']}), {data['size']}x{data['size']} px, batch {data['batch']} "
        f"({data['unet_rows']} UNet rows with guidance): {data['gflop_per_forward']:.2f} GFLOP per UNet forward "
        f"({by_op}). Achieved = FLOPs of {data['steps_per_loop']} bare UNet forwards / their time; peak = the best "
        f"square matmul ({', '.join(map(str, MATMUL_SIDES))}) in the same precision, measured after each loop. "
        "Medians (min-max) over the repeats; CPU-second rates are the primary figures (one torch thread), wall "
        "rates include waiting for other tenants.",
        "",
        "| variant | computes in | UNet GFLOP/s (CPU s) | matmul peak GFLOP/s (CPU s) | **fraction of peak** | "
        "UNet GFLOP/s (wall) | peak (wall) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(stats: dict, digits: int = 1) -> str:
        return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    for r in data["results"]:
        lines.append(
            f"| {r['variant']} | {r['compute_dtype']} | {cell(r['unet_gflop_per_s_cpu'])} | "
            f"{cell(r['matmul_peak_gflop_per_s_cpu'])} | **{cell(r['fraction_of_peak'], 2)}** | "
            f"{cell(r['unet_gflop_per_s_wall'])} | {cell(r['matmul_peak_gflop_per_s_wall'])} |"
        )
    lines += ["", "Where the time goes (operators' own CPU time over one UNet forward, by kind):", ""]
    kinds = sorted({kind for r in data["results"] for kind in r["time_by_kind"]})
    lines += ["| variant | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for r in data["results"]:
        lines.append(f"| {r['variant']} | " + " | ".join(
            f"{100 * r['time_by_kind'].get(kind, 0):.0f}%" for kind in kinds) + " |")
    lines += ["", "Machine:", "", machine_markdown(data["machine"])]
    return "\n".join(lines)
