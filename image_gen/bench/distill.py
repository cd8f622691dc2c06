"""The distilled student at few steps against its teacher at many: seconds per image side by side, and the
quality of each on the evaluation suite (compositional accuracy with bootstrap intervals, eval.compositional).

Speed does not depend on the weights, so `--no-quality` on the random-weight stand-ins (inhouse-arch-random,
inhouse-arch-random-lcm) already measures the speed ratio of the shipped architectures; quality needs the trained
models (`inhouse-shapes`, `inhouse-shapes-lcm`). Runs alternate teacher, student; one warm-up each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from image_gen.bench.measure import Stopwatch
from image_gen.bench.pipeline import PROMPTS, build_registry, resolve_model, variant_options
from image_gen.bench.report import machine, machine_markdown, summary, write_report
from pipelines.params import ModelInfo
from pipelines.text2image import Text2ImagePipeline


def settings_of(info: ModelInfo, steps: int | None, preset: str) -> dict:
    """Scheduler, steps and guidance: the model's preset (else its defaults), steps overridden if given."""
    values = {"scheduler": info.default_scheduler, "steps": info.default_steps, "guidance_scale": info.default_guidance}
    values |= info.presets.get(preset, {})
    if steps is not None:
        values["steps"] = steps
    return values


def quality(pipe: Text2ImagePipeline, settings: dict, prompts: int, batch: int) -> dict:
    from eval.compositional import pipeline_generator, score_suite
    from eval.suites import load_suite

    generate = pipeline_generator(pipe, steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                                  scheduler=settings["scheduler"])
    scored = score_suite(generate, load_suite()[:prompts], batch_size=batch)
    return scored["summary"]["all"]


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench distill", description=__doc__)
    parser.add_argument("--teacher", default="inhouse-shapes", help="registry name or stand-in (default: inhouse-shapes)")
    parser.add_argument("--student", default="inhouse-shapes-lcm",
                        help="registry name or stand-in (default: inhouse-shapes-lcm)")
    parser.add_argument("--teacher-steps", type=int, default=25)
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-prompts", type=int, default=64, help="suite prompts scored per model (default: 64)")
    parser.add_argument("--no-quality", action="store_true", help="speed only (random-weight stand-ins)")
    parser.add_argument("--variant", default="default", help="our settings for both, as `bench pipeline` names them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's own)")
    parser.add_argument("--name", default="distill", help="report file stem")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    registry = build_registry(args.device, dtype, "sdpa")
    sides = {}
    for role, name, steps, preset in (("teacher", args.teacher, args.teacher_steps, "quality"),
                                      ("student", args.student, args.student_steps, "speed")):
        info = resolve_model(name, registry)
        pipe = Text2ImagePipeline.from_pretrained(info.path, device=args.device, dtype=dtype, info=info,
                                                  **variant_options(args.variant))
        sides[role] = {"info": info, "pipe": pipe, "settings": settings_of(info, steps, preset), "wall": [], "cpu": []}
    clock = Stopwatch(args.device)
    load_before = machine()["load_average"]
    for repeat in range(args.repeats + 1):
        prompts = [f"{PROMPTS[(repeat + i) % len(PROMPTS)]}, take {repeat}" for i in range(args.batch)]
        for side in sides.values():
            s, size = side["settings"], side["info"].native_size
            started = clock.start()
            side["pipe"](prompts, [""] * args.batch, list(range(args.batch)), size, size, s["steps"],
                         s["guidance_scale"], s["scheduler"])
            elapsed = clock.stop(started)
            if repeat:
                side["wall"].append(elapsed.wall / args.batch)
                side["cpu"].append(elapsed.cpu / args.batch)
    teacher, student = sides["teacher"], sides["student"]
    data = {
        "command": "image-gen bench distill " + " ".join(argv),
        "batch": args.batch,
        "repeats": args.repeats,
        "variant": args.variant,
        "speedup_cpu": summary([t / s for t, s in zip(teacher["cpu"], student["cpu"], strict=True)]),
        "speedup_wall": summary([t / s for t, s in zip(teacher["wall"], student["wall"], strict=True)]),
        "machine": {**machine(), "load_average_before": load_before},
    }
    for role, side in sides.items():
        data[role] = {
            "model": side["info"].name,
            "label": side["info"].label,
            **side["settings"],
            "seconds_per_image_cpu": summary(side["cpu"]),
            "seconds_per_image_wall": summary(side["wall"]),
            "quality": None if args.no_quality else quality(side["pipe"], side["settings"], args.eval_prompts,
                                                            args.batch),
        }
    for path in write_report(out, args.name, markdown(data), data):
        print(path)
    return 0


def markdown(data: dict) -> str:
    lines = [
        f"# Distillation: {data['student']['model']} against {data['teacher']['model']}",
        "",
        f"`{data['command']}`",
        "",
        f"Batch {data['batch']}, our settings: {data['variant']}, {data['repeats']} alternating repeats after a "
        "warm-up, each model at its native size. "
        "Seconds per image: median (min-max); CPU seconds of one torch thread are the primary figure on a shared "
        "machine. Quality: the evaluation suite's compositional sub-scores (mean and bootstrap 95% interval).",
        "",
        "| model | scheduler | steps | guidance | s/image (CPU) | s/image (wall) | quality |",
        "|---|---|---|---|---|---|---|",
    ]
    for role in ("teacher", "student"):
        r = data[role]
        cpu, wall = r["seconds_per_image_cpu"], r["seconds_per_image_wall"]
        score = "not measured (--no-quality)" if r["quality"] is None else "; ".join(
            f"{name} {v['mean']:.2f} [{v['low']:.2f}, {v['high']:.2f}]" for name, v in r["quality"].items())
        lines.append(
            f"| {r['model']} ({role}, {r['label']}) | {r['scheduler']} | {r['steps']} | {r['guidance_scale']:g} | "
            f"{cpu['median']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f}) | {wall['median']:.3f} | {score} |"
        )
    cpu, wall = data["speedup_cpu"], data["speedup_wall"]
    lines += [
        "",
        f"**Student speed-up: {cpu['median']:.1f}x** in CPU seconds ({cpu['min']:.1f}-{cpu['max']:.1f}); "
        f"{wall['median']:.1f}x on the wall clock (target: at least 5x).",
        "",
        "Machine:",
        "",
        machine_markdown(data["machine"]),
    ]
    return "\n".join(lines)
