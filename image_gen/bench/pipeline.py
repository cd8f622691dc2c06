"""Our Text2Image pipeline, in one or more settings (variants), against stock diffusers on the same weights,
measured side by side in one process.

Runs alternate (stock, then each variant of ours; the order rotates every repeat) so that noise from a shared
machine hits all alike; every repeat uses new prompts, so our prompt-embedding cache helps only with the empty
negative prompt. Each run is timed on the wall clock and in process CPU seconds (see image_gen.bench.measure), its
peak RSS above the resident models is read, and the warm-up round gives the output parity against stock (max and
mean absolute pixel difference, of 255).

A variant is "default" or settings joined by "+": channels_last, fuse_qkv, compile, bf16 (autocast bfloat16),
fp16 (autocast float16, CUDA), math or sliced (that attention backend instead of --attention). Variants that leave the modules untouched (default, bf16, fp16) share the stock
pipeline's UNet and text encoder, so that a large model is in memory once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from image_gen.bench.measure import PeakMemory, Stopwatch, mib
from image_gen.bench.models import BUILDERS, bench_models_dir, ensure_bench_model
from image_gen.bench.report import machine, machine_markdown, summary, write_report
from image_gen.runtime import model_folders
from image_gen.settings import load_settings
from pipelines.attention import Optimizations, check_autocast, set_vae_slicing
from pipelines.params import ModelInfo, read_json
from pipelines.registry import ModelRegistry
from pipelines.schedulers import make_scheduler
from pipelines.text2image import Text2ImagePipeline, load_component, resolve_device

PROMPTS = [
    "a red circle to the left of a blue square",
    "three yellow stars",
    "a green triangle above a white cross",
    "a purple square",
    "a pink star below an orange circle",
    "two blue crosses on a striped background",
    "a white circle and a red triangle",
    "an orange square to the right of a green star",
]
VARIANT_OPTIONS = {
    "channels_last": {"channels_last": True},
    "fuse_qkv": {"fuse_qkv": True},
    "compile": {"compile": True},
    "bf16": {"autocast": "bfloat16"},
    "fp16": {"autocast": "float16"},
    "math": {"attention": "math"},
    "sliced": {"attention": "sliced"},
}
SHARING_OPTIONS = {"autocast"}
"""Options that do not change the modules: such variants can run on the stock pipeline's UNet and text encoder."""


def variant_options(name: str) -> dict[str, Any]:
    """The from_pretrained settings of a variant name ("default", or names of VARIANT_OPTIONS joined by "+")."""
    if name == "default":
        return {}
    options: dict[str, Any] = {}
    for part in name.split("+"):
        if part not in VARIANT_OPTIONS:
            raise ValueError(f"unknown variant part {part!r}: use default or {', '.join(VARIANT_OPTIONS)} joined by +")
        options |= VARIANT_OPTIONS[part]
    return options


@dataclass
class Contender:
    """One side of the comparison: a name and a callable that draws one batch of images."""

    name: str
    draw: Any
    options: dict[str, Any]


def resolve_model(name: str | None, registry: ModelRegistry) -> ModelInfo:
    """A registry model by name, else a benchmark stand-in (built on first use), else the registry's default."""
    if name in BUILDERS:
        return ModelInfo.from_folder(ensure_bench_model(name))
    return registry.get(name) if name else registry.default()


def build_registry(device: str, dtype: str, attention: str, **options: Any) -> ModelRegistry:
    """The bundled, the user's and the stand-in models; `options`: the registry's speed settings (autocast...)."""
    folders = [*model_folders(load_settings()), bench_models_dir()]
    return ModelRegistry(folders, device=device, dtype=dtype, attention=attention, **options)


def load_stock(info: ModelInfo, dtype: torch.dtype, device: torch.device):
    cls = StableDiffusionXLPipeline if info.architecture == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(info.path, local_files_only=True, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_ours(info: ModelInfo, device: str, dtype: str, attention: str, options: dict[str, Any],
              stock) -> Text2ImagePipeline:
    """Our pipeline in these settings; one that leaves the modules untouched is built on the stock pipeline's UNet
    and text encoder (diffusers' default attention is sdpa too), so that a large model is loaded once."""
    options = dict(options)
    attention = options.pop("attention", attention)
    if not (set(options) <= SHARING_OPTIONS and attention == "sdpa" and info.architecture != "sdxl"):
        return Text2ImagePipeline.from_pretrained(
            info.path, device=device, dtype=dtype, attention=attention, info=info, **options
        )
    torch_device = resolve_device(device)
    torch_dtype = getattr(torch, dtype)
    vae = load_component(info.path, read_json(info.path / "model_index.json"), "vae", torch_dtype).to(torch_device)
    autocast = check_autocast(options.get("autocast", "off"), torch_device, torch_dtype)
    return Text2ImagePipeline(
        info=info,
        unet=stock.unet,
        vae=vae,
        tokenizer=stock.tokenizer,
        text_encoder=stock.text_encoder,
        scheduler_config=read_json(info.path / "scheduler" / "scheduler_config.json"),
        device=torch_device,
        dtype=torch_dtype,
        optimizations=Optimizations(vae_slicing=set_vae_slicing(vae, True), autocast=autocast),
    )


def max_and_mean_diff(a: list, b: list) -> tuple[float, float]:
    x = np.stack([np.asarray(image, dtype=np.int16) for image in a])
    y = np.stack([np.asarray(image, dtype=np.int16) for image in b])
    diff = np.abs(x - y)
    return float(diff.max()), float(diff.mean())


def run(
    contenders: list[Contender],
    device: torch.device,
    *,
    size: int,
    steps: int,
    guidance: float,
    scheduler: str,
    batch: int,
    repeats: int,
) -> dict:
    """Alternate the contenders for `repeats` rounds after one warm-up round; contenders[0] is stock."""
    clock = Stopwatch(device)
    wall: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu: dict[str, list[float]] = {c.name: [] for c in contenders}
    memory: dict[str, dict[str, int]] = {}
    parity: dict[str, dict[str, float]] = {}
    for repeat in range(repeats + 1):  # round 0 warms up every contender and gives the parity
        prompts = [f"{PROMPTS[(repeat + i) % len(PROMPTS)]}, take {repeat}" for i in range(batch)]
        seeds = [1000 * repeat + i for i in range(batch)]
        shift = repeat % len(contenders)
        images: dict[str, list] = {}
        for contender in contenders[shift:] + contenders[:shift]:
            with PeakMemory(device) as peak:
                started = clock.start()
                images[contender.name] = contender.draw(prompts, seeds, size, steps, guidance, scheduler)
                elapsed = clock.stop(started)
            if repeat == 0:
                continue
            wall[contender.name].append(elapsed.wall)
            cpu[contender.name].append(elapsed.cpu)
            memory[contender.name] = {
                key: max(value, memory.get(contender.name, {}).get(key, 0)) for key, value in peak.result().items()
            }
        if repeat == 0:
            stock_images = images[contenders[0].name]
            parity = {c.name: dict(zip(("max", "mean"), max_and_mean_diff(images[c.name], stock_images),
                                       strict=True)) for c in contenders[1:]}
    stock = contenders[0].name
    rows = []
    for c in contenders:
        rows.append({
            "name": c.name,
            "options": c.options,
            "wall_s": summary(wall[c.name]),
            "cpu_s": summary(cpu[c.name]),
            "images_per_s_wall": batch / summary(wall[c.name])["median"],
            "images_per_cpu_s": batch / summary(cpu[c.name])["median"],
            "speedup_wall": summary([s / o for s, o in zip(wall[stock], wall[c.name], strict=True)]),
            "speedup_cpu": summary([s / o for s, o in zip(cpu[stock], cpu[c.name], strict=True)]),
            "memory": memory[c.name],
            "parity_255": parity.get(c.name),
        })
    return {"size": size, "steps": steps, "guidance": guidance, "scheduler": scheduler, "batch": batch,
            "repeats": repeats, "contenders": rows}


def stock_drawer(stock, config: dict):
    def draw(prompts, seeds, size, steps, guidance, scheduler):
        stock.scheduler = make_scheduler(scheduler, config)
        return stock(
            prompt=prompts,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images

    return draw


def ours_drawer(ours: Text2ImagePipeline):
    def draw(prompts, seeds, size, steps, guidance, scheduler):
        return ours(prompts, [""] * len(prompts), seeds, size, size, steps, guidance, scheduler)

    return draw


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench pipeline", description=__doc__)
    parser.add_argument("--model", default=None,
                        help=f"registry name, or a stand-in built on first use: {', '.join(BUILDERS)} "
                        "(default: the registry's default model)")
    parser.add_argument("--sizes", default=None, help="comma-separated square sizes (default: the model's native)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="default",
                        help="comma-separated variants of ours, e.g. default,bf16,channels_last+bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: float32 on cpu, "
                        "float16 on cuda)")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1, so that CPU seconds measure the work; 0: torch's own)")
    parser.add_argument("--name", default="pipeline", help="report file stem")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        variants = [(name, variant_options(name)) for name in args.variants.split(",")]
    except ValueError as error:
        parser.error(str(error))
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")

    registry = build_registry(args.device, dtype, args.attention)
    info = resolve_model(args.model, registry)
    stock = load_stock(info, getattr(torch, dtype), device)
    contenders = [Contender("stock diffusers", stock_drawer(stock, stock.scheduler.config), {})]
    for name, options in variants:
        ours = load_ours(info, args.device, dtype, args.attention, options, stock)
        contenders.append(Contender(f"ours {name}", ours_drawer(ours), ours.optimizations.to_dict()))
    steps = args.steps or info.default_steps
    guidance = info.default_guidance if args.guidance is None else args.guidance
    scheduler = args.scheduler or info.default_scheduler
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [info.native_size]
    load_before = machine()["load_average"]
    rows = [
        run(contenders, device, size=size, steps=steps, guidance=guidance, scheduler=scheduler,
            batch=args.batch, repeats=args.repeats)
        for size in sizes
    ]
    data = {
        "model": info.name,
        "label": info.label,
        "architecture": info.architecture,
        "device": str(device),
        "dtype": dtype,
        "command": "image-gen bench pipeline " + " ".join(argv),
        "machine": {**machine(), "load_average_before": load_before},
        "results": rows,
    }
    for path in write_report(out, args.name, markdown(data), data):
        print(path)
    return 0


def markdown(data: dict) -> str:
    lines = [
        f"# Pipeline: ours against stock diffusers ({data['model']})",
        "",
        f"`{data['command']}`",
        "",
        f"Model: {data['model']} ({data['label'] or data['architecture']}), {data['device']}, {data['dtype']} "
        "weights. Stock `StableDiffusionPipeline` and each variant of ours in one process on the same weights, runs "
        "alternating (order rotated every repeat), new prompts every repeat, one warm-up round (which gives the "
        "parity: pixel difference to stock's images of the same prompts and seeds, of 255). Speed-up = stock "
        "seconds / our seconds within each repeat: median (min-max). CPU seconds are the process's own (one torch "
        "thread), robust to other tenants; wall seconds include waiting for them (see the load average). Peak RSS "
        "added: the run's peak resident memory above what was resident before it (the models).",
        "",
    ]
    for r in data["results"]:
        lines += [
            f"## {r['size']}x{r['size']} px, batch {r['batch']}, {r['steps']} steps {r['scheduler']}, "
            f"guidance {r['guidance']:g}, {r['repeats']} repeats",
            "",
            "| pipeline | img/CPU-s | speed-up (CPU s) | img/s (wall) | speed-up (wall) | s/image (wall, median) "
            "| peak RSS added MiB | parity max / mean |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in r["contenders"]:
            cpu, wall = c["speedup_cpu"], c["speedup_wall"]
            parity = c["parity_255"]
            lines.append(
                f"| {c['name']} | {c['images_per_cpu_s']:.3f} | {cpu['median']:.2f} ({cpu['min']:.2f}-{cpu['max']:.2f}) "
                f"| {c['images_per_s_wall']:.3f} | {wall['median']:.2f} ({wall['min']:.2f}-{wall['max']:.2f}) | "
                f"{c['wall_s']['median'] / r['batch']:.2f} | {mib(c['memory']['rss_added']):.0f} | "
                + (f"{parity['max']:.0f} / {parity['mean']:.2f} |" if parity else "reference |")
            )
        lines.append("")
    lines += ["Machine:", "", machine_markdown(data["machine"])]
    return "\n".join(lines)

