"""`image-gen eval` and `image-gen leaderboard`: their arguments and what they do (image_gen.cli registers them).

Bad input raises EvalUsageError, which the CLI prints as one line with exit code 2; a regression found by the gate
prints its report and returns 1. This module imports nothing heavy: torch loads once the arguments are checked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from eval.results import RESULTS_FORMAT

if TYPE_CHECKING:
    from pipelines.registry import ModelRegistry

DEFAULT_RESULTS_DIR = Path("eval-results")
_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,63}")


class EvalUsageError(ValueError):
    """An argument that cannot work; the message names the flag and what it accepts."""


def _user_errors() -> tuple[type[Exception], ...]:
    """The lower modules' errors about their input (a suite, a CLIP folder, results), reported as usage errors."""
    from eval.clip import ClipLoadError
    from eval.leaderboard import LeaderboardError
    from eval.suites import SuiteFormatError

    return SuiteFormatError, ClipLoadError, LeaderboardError


def _gate_arguments(parser: argparse.ArgumentParser) -> None:
    gate = parser.add_argument_group("regression gate (exit code 1 on a regression)")
    gate.add_argument("--baseline", type=Path, metavar="FILE", help="a results JSON to compare against")
    gate.add_argument("--tolerance", type=float, metavar="X",
                      help="allowed relative worsening of each metric, e.g. 0.05 for 5%% (default: 0.05)")
    gate.add_argument("--gate-metrics", metavar="LIST",
                      help="comma-separated metrics to gate, `compositional.*` for every sub-score (default: "
                           "clip_score,r_precision,compositional,compositional.*,frechet_distance,diversity)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (default: the registry's default model)")
    parser.add_argument("--scheduler", help="sampler (default: the model's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--size", metavar="WxH", help="image size, e.g. 128x128 or 128 (default: the model's)")
    parser.add_argument("--suite", type=Path, metavar="FILE", help="JSONL prompt suite (default: the built-in one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, metavar="DIR",
                        help=f"folder of results files (default: ./{DEFAULT_RESULTS_DIR})")
    parser.add_argument("--name", help="name of the configuration, its results file and leaderboard row; name it as "
                        "its arena contender to join the ratings (default: model-scheduler-steps-guidance-size)")
    parser.add_argument("--images-per-prompt", type=int, default=2, metavar="K",
                        help="images per prompt, seeds S, S+1000003, ... (>= 2 measures diversity; default: 2)")
    parser.add_argument("--distractors", type=int, default=10, metavar="K",
                        help="distractor prompts for R-precision (default: 10)")
    parser.add_argument("--limit", type=int, metavar="N", help="an evenly spread subset of N prompts")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per batch (default: 8)")
    parser.add_argument("--samples", type=Path, metavar="DIR",
                        help="also write sample sheets there: a PNG strip per category and samples.md")
    parser.add_argument("--samples-per-category", type=int, default=6, metavar="K",
                        help="images per category in the sample sheets (default: 6)")
    parser.add_argument("--scorer", type=Path, metavar="DIR",
                        help="CLIP folder: the in-house layout or a transformers CLIPModel (default: bundled)")
    _gate_arguments(parser)


def add_leaderboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS_DIR, metavar="DIR",
                        help=f"folder of results files (default: ./{DEFAULT_RESULTS_DIR})")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write the leaderboard (default: --results)")
    parser.add_argument("--ratings", type=Path, metavar="FILE",
                        help="arena ratings JSON (default: ratings.json in --results, if there is one)")
    parser.add_argument("--quality", default="clip_score", metavar="METRIC",
                        help="the metric rows are sorted by and the Pareto plot shows (default: clip_score)")
    parser.add_argument("--candidate", type=Path, metavar="FILE",
                        help="the result the gate checks (default: the newest in --results)")
    _gate_arguments(parser)


# --- checks that run before anything heavy ----------------------------------------------------------------------


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise EvalUsageError(f"{flag} must be at least 1, got {value}")


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", text)
    if not match:
        raise EvalUsageError(f"--size must be WIDTHxHEIGHT or one side, e.g. 128x128 or 128; got {text!r}")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def read_result(path: Path, flag: str) -> dict:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalUsageError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise EvalUsageError(f"{flag} {path}: not a readable JSON file ({error})") from None
    if not isinstance(record, dict) or record.get("format") != RESULTS_FORMAT:
        raise EvalUsageError(f"{flag} {path}: not a results file of `image-gen eval` (format {RESULTS_FORMAT})")
    return record


def _gate_options(args: argparse.Namespace) -> tuple[dict | None, float, list[str]]:
    from eval.gate import QUALITY_METRICS

    if args.baseline is None:
        if args.tolerance is not None or args.gate_metrics is not None:
            raise EvalUsageError("--tolerance and --gate-metrics need --baseline FILE")
        return None, 0.0, []
    tolerance = 0.05 if args.tolerance is None else args.tolerance
    if not 0 <= tolerance < 1:
        raise EvalUsageError(f"--tolerance must be from 0 to below 1 (a share of each metric), got {tolerance}")
    metrics = list(QUALITY_METRICS) if args.gate_metrics is None else [
        name.strip() for name in args.gate_metrics.split(",") if name.strip()]
    known = ("clip_score", "r_precision", "compositional", "frechet_distance", "diversity", "seconds_per_image",
             "peak_memory_mb")
    unknown = [m for m in metrics if m.split(".", 1)[0] not in known]
    if unknown or not metrics:
        raise EvalUsageError(f"--gate-metrics: unknown metric {unknown[0] if unknown else '(none)'!r}; use "
                             f"{', '.join(known)} or compositional.<sub-score>")
    return read_result(args.baseline, "--baseline"), tolerance, metrics


def gate(baseline: dict, candidate: dict, tolerance: float, metrics: list[str], baseline_path: Path) -> int:
    """Print the verdict; 1 on a regression, 0 otherwise."""
    from eval.gate import find_regressions, why_not_comparable

    reason = why_not_comparable(baseline, candidate)
    if reason is not None:
        raise EvalUsageError(reason)
    regressions = find_regressions(baseline, candidate, tolerance, metrics)
    if regressions:
        print(f"image-gen: regression: {candidate['name']} is worse than the baseline {baseline_path} in "
              f"{len(regressions)} metric(s) beyond the tolerance of {tolerance:.1%}:", file=sys.stderr)
        for regression in regressions:
            print(f"  {regression}", file=sys.stderr)
        return 1
    print(f"gate passed: {candidate['name']} is within {tolerance:.1%} of the baseline {baseline_path}")
    return 0


# --- the commands -----------------------------------------------------------------------------------------------


def _subset(prompts: list, limit: int | None) -> list:
    if limit is None or limit >= len(prompts):
        return prompts
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


def run_eval(args: argparse.Namespace, registry: ModelRegistry) -> int:
    """`image-gen eval`: score one configuration, write its results file, and gate it if asked."""
    try:
        return _run_eval(args, registry)
    except _user_errors() as error:
        raise EvalUsageError(str(error)) from error


def run_leaderboard(args: argparse.Namespace) -> int:
    """`image-gen leaderboard`: render every result (and ratings) and gate the candidate if asked."""
    try:
        return _run_leaderboard(args)
    except _user_errors() as error:
        raise EvalUsageError(str(error)) from error


def _run_eval(args: argparse.Namespace, registry: ModelRegistry) -> int:
    for flag, value in (("--images-per-prompt", args.images_per_prompt), ("--distractors", args.distractors),
                        ("--limit", args.limit), ("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--samples-per-category", args.samples_per_category)):
        _positive(value, flag)
    width, height = parse_size(args.size)
    if args.guidance is not None and not args.guidance >= 0:
        raise EvalUsageError(f"--guidance must be a number >= 0, got {args.guidance}")
    if args.name is not None and not _NAME.fullmatch(args.name):
        raise EvalUsageError(f"--name must be 1 to 64 letters, digits and . _ @ - not starting with a dot (it names "
                             f"a file), got {args.name!r}")
    for flag, folder in (("--out", args.out), ("--samples", args.samples)):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise EvalUsageError(f"{flag} {folder} is a file: give a folder")
    baseline, tolerance, metrics = _gate_options(args)

    from eval.suites import load_suite

    prompts = _subset(load_suite(args.suite), args.limit)

    from tqdm import tqdm

    from eval.clip import load_scorer
    from eval.runner import EvalConfig, evaluate
    from pipelines.params import GenerationParams

    info = registry.get(args.model) if args.model else registry.default()
    try:
        request = GenerationParams(prompt="evaluation", model=info.name, width=width, height=height,
                                   steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler, seed=0)
    except ValueError as error:  # pydantic's ValidationError
        raise EvalUsageError(f"invalid settings: {str(error).splitlines()[-1].strip()}") from None
    request = info.resolve(request)
    scorer = load_scorer(args.scorer)
    config = EvalConfig(model=info.name, scheduler=request.scheduler, steps=request.steps,
                        guidance_scale=request.guidance_scale, width=request.width, height=request.height,
                        images_per_prompt=args.images_per_prompt, distractors=args.distractors,
                        batch_size=args.batch_size)
    pipe = registry.load(info.name)

    def generate(texts: list[str], seeds: list[int]) -> list:
        return pipe(texts, [""] * len(texts), seeds, config.width, config.height, config.steps,
                    config.guidance_scale, config.scheduler)

    model_info = {"content_hash": info.content_hash, "content_sha256": info.content_sha256,
                  "architecture": info.architecture, "dtype": str(pipe.dtype).removeprefix("torch."),
                  "optimizations": pipe.optimizations.to_dict()}  # autocast, compile...: they change the pixels
    with tqdm(total=len(prompts) * config.images_per_prompt, desc=config.label, unit="image", leave=False,
              disable=None) as bar:
        result = evaluate(generate, prompts, scorer, config, model_info=model_info, suite=args.suite,
                          device=pipe.device, progress=lambda done, _: bar.update(done - bar.n), name=args.name,
                          samples=args.samples, samples_per_category=args.samples_per_category)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    summary = result["summary"]
    print(path)
    if args.samples is not None:
        print(args.samples / "samples.md")
    print(f"{result['name']}: CLIPScore {summary['clip_score']['mean']:.2f}, "
          + (f"R-precision {summary['r_precision']['mean']:.1%}, " if "r_precision" in summary else "")
          + (f"compositional {summary['compositional']['mean']:.1%}, " if "compositional" in summary else "")
          + f"Frechet distance {summary['frechet_distance']['mean']:.4f}, "
          + f"{summary['seconds_per_image']:.3f} s/image")
    if baseline is None:
        return 0
    return gate(baseline, result, tolerance, metrics, args.baseline)


def _run_leaderboard(args: argparse.Namespace) -> int:
    from eval.leaderboard import load_results, write_leaderboard

    baseline, tolerance, metrics = _gate_options(args)
    if args.candidate is not None and baseline is None:
        raise EvalUsageError("--candidate needs --baseline FILE")
    ratings = args.ratings
    if ratings is None and (args.results / "ratings.json").is_file():
        ratings = args.results / "ratings.json"
    elif ratings is not None and not ratings.is_file():
        raise EvalUsageError(f"--ratings {ratings}: no such file")
    out = args.out or args.results
    for path in write_leaderboard(args.results, out, ratings, args.quality):
        print(path)
    if baseline is None:
        return 0
    if args.candidate is not None:
        candidate, candidate_path = read_result(args.candidate, "--candidate"), args.candidate
    else:
        newest = max(load_results(args.results), key=lambda r: (r["created"], r["file"]))
        candidate, candidate_path = newest, args.results / newest["file"]
    print(f"gating {candidate_path}")
    return gate(baseline, candidate, tolerance, metrics, args.baseline)
