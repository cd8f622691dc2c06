"""Our Text2Image pipeline against stock diffusers on the same weights, measured side by side in one process.

Runs alternate (ours, stock, ours, stock, ...) so that noise from a shared machine hits both alike; every repeat
uses a new prompt, so our prompt-embedding cache gives us no advantage. Also reports our overhead over the bare
UNet forward passes of the same shape, and the output parity (max absolute pixel difference).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from image_gen.bench.report import machine, machine_markdown, summary, write_report
from image_gen.settings import load_settings
from pipelines.registry import BUNDLED_MODELS_DIR, ModelRegistry
from pipelines.schedulers import make_scheduler
from pipelines.text2image import Text2ImagePipeline

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


def _stock(path: Path, architecture: str) -> StableDiffusionPipeline:
    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_diff(a: list, b: list) -> float:
    return max(
        float(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max())
        for x, y in zip(a, b, strict=True)
    )


def run(
    ours: Text2ImagePipeline,
    stock,
    *,
    size: int,
    steps: int,
    guidance: float,
    scheduler: str,
    batch: int,
    repeats: int,
) -> dict:
    stock.scheduler = make_scheduler(scheduler, ours.scheduler_config)
    times: dict[str, list[float]] = {"ours": [], "stock": [], "ours_denoise": [], "bare_unet": []}
    parity = None
    for repeat in range(repeats + 1):  # repeat 0 is the warm-up of both
        prompts = [f"{PROMPTS[(repeat + i) % len(PROMPTS)]}, take {repeat}" for i in range(batch)]
        seeds = [1000 * repeat + i for i in range(batch)]
        started = ours._clock()
        images, _, timings = ours._generate(
            prompts, [""] * batch, seeds, size, size, steps, guidance, scheduler, None
        )
        ours_s = ours._clock() - started
        started = ours._clock()
        stock_images = stock(
            prompt=prompts,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images
        stock_s = ours._clock() - started
        bare = ours.bare_unet_loop(size, size, steps, guidance, batch_size=batch)
        if repeat == 0:
            parity = _max_diff(images, stock_images)
            continue
        times["ours"].append(ours_s)
        times["stock"].append(stock_s)
        times["ours_denoise"].append(timings["denoise"])
        times["bare_unet"].append(bare)
    stats = {name: summary(values) for name, values in times.items()}
    ratios = [s / o for o, s in zip(times["ours"], times["stock"], strict=True)]
    overheads = [d / b - 1 for d, b in zip(times["ours_denoise"], times["bare_unet"], strict=True)]
    return {
        "size": size,
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "batch": batch,
        "ours_images_per_s": batch / stats["ours"]["median"],
        "stock_images_per_s": batch / stats["stock"]["median"],
        "speed_ratio": summary(ratios),
        "denoise_overhead_over_bare_unet": summary(overheads),
        "parity_max_abs_diff_255": parity,
        "seconds": stats,
    }


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench pipeline", description=__doc__)
    parser.add_argument("--model", default=None, help="registry name (default: the default model)")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated square sizes (default: the model's native)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="pipeline", help="report file stem")
    args = parser.parse_args(argv)

    settings = load_settings()
    registry = ModelRegistry(
        [BUNDLED_MODELS_DIR, settings.models_dir],
        device=settings.device,
        dtype="float32",
        attention=settings.attention,
    )
    info = registry.get(args.model) if args.model else registry.default()
    ours = registry.load(info.name)
    stock = _stock(info.path, info.architecture)
    steps = args.steps or info.default_steps
    guidance = info.default_guidance if args.guidance is None else args.guidance
    scheduler = args.scheduler or info.default_scheduler
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [info.native_size]
    rows = [
        run(
            ours,
            stock,
            size=size,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            batch=args.batch,
            repeats=args.repeats,
        )
        for size in sizes
    ]
    data = {
        "model": info.name,
        "content_hash": info.content_hash,
        "architecture": info.architecture,
        "machine": machine(),
        "attention": ours.optimizations.attention,
        "results": rows,
    }
    lines = [
        f"# Pipeline: ours against stock diffusers ({info.name})",
        "",
        f"`image-gen bench pipeline --model {info.name} --batch {args.batch} --repeats {args.repeats}`: "
        "both pipelines in one process on the same weights (float32), runs alternating, a new prompt every repeat "
        "(so our prompt cache does not help), one warm-up each. Ratio = stock seconds / our seconds per repeat.",
        "",
        "| size | steps | scheduler | batch | ours img/s | stock img/s | ratio (median, min-max) | "
        "denoise overhead over bare UNet | parity max diff (/255) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio, over = r["speed_ratio"], r["denoise_overhead_over_bare_unet"]
        lines.append(
            f"| {r['size']} | {r['steps']} | {r['scheduler']} | {r['batch']} | {r['ours_images_per_s']:.3f} | "
            f"{r['stock_images_per_s']:.3f} | {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) | "
            f"{100 * over['median']:+.1f}% | {r['parity_max_abs_diff_255']:.0f} |"
        )
    lines += ["", "Machine:", "", machine_markdown(data["machine"])]
    for path in write_report(out, args.name, "\n".join(lines), data):
        print(path)
    return 0
