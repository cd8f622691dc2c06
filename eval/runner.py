"""Score one model configuration on a prompt suite: generate every prompt a few times, then check, embed and
summarise into a results record (configuration, per-prompt scores, summary with bootstrap 95% intervals)."""

from __future__ import annotations

import datetime
import hashlib
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval.clip import ClipScorer
from eval.compositional import Generate, summarize
from eval.detector import check
from eval.metrics import (
    clip_scores,
    diversity,
    frechet_distance_with_interval,
    mean_with_interval,
    retrieval_hits,
)
from eval.results import RESULTS_FORMAT
from eval.samples import write_samples
from eval.suites import SuitePrompt, format_suite, load_suite
from pipelines.training.clip import scene_key
from pipelines.training.scenes import make_scene

SEED_STRIDE = 1_000_003
"""Copy k of a prompt uses its seed + k * SEED_STRIDE: far from the neighbouring prompts' seeds."""

Progress = Callable[[int, int], None]
"""images done, images in all"""


@dataclass(frozen=True)
class EvalConfig:
    """One configuration of one model: what a leaderboard row compares."""

    model: str
    scheduler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    images_per_prompt: int = 2
    distractors: int = 10
    batch_size: int = 8

    @property
    def label(self) -> str:
        """A file-name-safe name: model, scheduler, steps, guidance and size."""
        return (f"{self.model}-{self.scheduler}-{self.steps}steps-g{self.guidance_scale:g}-"
                f"{self.width}x{self.height}")


def prompt_seed(prompt: SuitePrompt, index: int, copy: int) -> int:
    return (prompt.seed if prompt.seed is not None else index) + copy * SEED_STRIDE


def _content(prompt: SuitePrompt) -> str:
    """Prompts with equal content describe the same picture, so one is never the other's distractor."""
    if prompt.expectation is not None:
        return scene_key(prompt.expectation)
    return " ".join(prompt.prompt.lower().split())


def choose_distractors(prompts: list[SuitePrompt], k: int, seed: int = 0) -> list[np.ndarray]:
    """For each prompt, up to `k` other prompts (indices) that show something else, drawn at random once."""
    contents = np.array([_content(p) for p in prompts])
    rng = np.random.default_rng(seed)
    chosen = []
    for content in contents:
        others = np.flatnonzero(contents != content)
        chosen.append(rng.choice(others, min(k, len(others)), replace=False) if len(others) else others)
    return chosen


def reference_renders() -> list[Image.Image]:
    """Ground-truth renders of the built-in suite's scenes (each once): the reference set of Frechet distance."""
    seen, images = set(), []
    for prompt in load_suite():
        if (prompt.category, prompt.seed) not in seen:
            seen.add((prompt.category, prompt.seed))
            images.append(make_scene(prompt.seed, kind=prompt.category)[0])
    return images


_REFERENCE_EMBEDDINGS: dict[str, np.ndarray] = {}


def reference_embeddings(scorer: ClipScorer) -> np.ndarray:
    key = f"{scorer.name}:{scorer.content_hash}"
    if key not in _REFERENCE_EMBEDDINGS:
        _REFERENCE_EMBEDDINGS[key] = scorer.embed_images(reference_renders())
    return _REFERENCE_EMBEDDINGS[key]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; elsewhere the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def generate_all(generate: Generate, prompts: list[SuitePrompt], config: EvalConfig, device: torch.device,
                 progress: Progress | None = None) -> tuple[list[list[Image.Image]], float, float]:
    """Every prompt `images_per_prompt` times; seconds per image (after one warm-up image) and peak memory."""
    jobs = [(i, copy) for copy in range(config.images_per_prompt) for i in range(len(prompts))]
    generate([prompts[0].prompt], [prompt_seed(prompts[0], 0, 0)])  # warm-up: first-call costs are not speed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    images: list[list[Image.Image]] = [[] for _ in prompts]
    started = time.perf_counter()
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        made = generate([prompts[i].prompt for i, _ in batch], [prompt_seed(prompts[i], i, c) for i, c in batch])
        for (i, _), image in zip(batch, made, strict=True):
            images[i].append(image)
        if progress is not None:
            progress(start + len(batch), len(jobs))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / len(jobs)
    return images, seconds, peak_memory_mb(device)


def score_images(images: list[list[Image.Image]], prompts: list[SuitePrompt], scorer: ClipScorer,
                 distractors: int) -> tuple[list[dict], dict]:
    """Per-prompt rows (CLIPScore, R-precision hits, detector sub-scores, diversity) and the image embeddings'
    Frechet distance to the reference renders."""
    text_embeddings = scorer.embed_texts([p.prompt for p in prompts])
    image_embeddings = scorer.embed_images([image for own in images for image in own])
    chosen = choose_distractors(prompts, distractors)
    rows, start = [], 0
    for i, (prompt, own) in enumerate(zip(prompts, images, strict=True)):
        embeddings, start = image_embeddings[start:start + len(own)], start + len(own)
        truth = np.repeat(text_embeddings[i][None], len(own), axis=0)
        scores = clip_scores(embeddings, truth)
        hits = None
        if len(chosen[i]):
            hits = retrieval_hits(embeddings @ text_embeddings[i], embeddings @ text_embeddings[chosen[i]].T)
        checks = [check(image, prompt.expectation) for image in own] if prompt.expectation is not None else None
        rows.append({
            "id": prompt.id, "prompt": prompt.prompt, "category": prompt.category, "tags": list(prompt.tags),
            "seeds": [prompt_seed(prompt, i, copy) for copy in range(len(own))],
            "clip_score": [round(float(s), 4) for s in scores],
            "r_precision": None if hits is None else [bool(h) for h in hits],
            "distractors": [prompts[j].id for j in chosen[i]],
            "passed": None if checks is None else [bool(c.passed) for c in checks],
            "compositional": None if checks is None else [c.details["scores"] for c in checks],
            "diversity": round(diversity(embeddings), 6) if len(own) >= 2 else None,
        })
    fd = frechet_distance_with_interval(image_embeddings, reference_embeddings(scorer))
    return rows, fd


def summarize_rows(rows: list[dict], fd: dict, seconds_per_image: float, peak_mb: float) -> dict:
    """Headline metrics (mean and bootstrap 95% interval over images or prompts) and the same per tag."""
    def collect(group: list[dict]) -> dict:
        values: dict[str, list[float]] = defaultdict(list)
        for row in group:
            values["clip_score"] += row["clip_score"]
            values["r_precision"] += [float(h) for h in row["r_precision"] or []]
            values["compositional"] += [float(p) for p in row["passed"] or []]
            if row["diversity"] is not None:
                values["diversity"].append(row["diversity"])
        return {name: mean_with_interval(v) for name, v in values.items() if v}

    detector_rows = [{"tags": row["tags"], "scores": scores} for row in rows for scores in row["compositional"] or []]
    tags = sorted({tag for row in rows for tag in row["tags"]})
    return {
        **collect(rows),
        "frechet_distance": fd,
        "seconds_per_image": seconds_per_image,
        "peak_memory_mb": peak_mb,
        "compositional_scores": summarize(detector_rows).get("all", {}),
        "by_tag": {tag: collect([row for row in rows if tag in row["tags"]]) for tag in tags},
        "images": sum(len(row["clip_score"]) for row in rows),
    }


def evaluate(generate: Generate, prompts: list[SuitePrompt], scorer: ClipScorer, config: EvalConfig, *,
             model_info: dict, suite: Path | None, device: torch.device | str = "cpu",
             progress: Progress | None = None, name: str | None = None, samples: Path | None = None,
             samples_per_category: int = 6) -> dict:
    """The results record of one configuration (see docs/evaluation.md for the format), named `name` (default: the
    configuration's label); with `samples`, also its sample sheets there (eval.samples)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    device = torch.device(device)
    images, seconds, peak_mb = generate_all(generate, prompts, config, device, progress)
    rows, fd = score_images(images, prompts, scorer, config.distractors)
    if samples is not None:
        write_samples(images, prompts, rows, samples, samples_per_category, title=name or config.label)
    return {
        "format": RESULTS_FORMAT,
        "name": name or config.label,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {
            **asdict(config),
            **model_info,
            "suite": str(suite) if suite is not None else "builtin",
            "suite_sha256": hashlib.sha256(format_suite(prompts).encode()).hexdigest(),
            "prompts": len(prompts),
            "scorer": scorer.identity(),
            "device": str(device),
        },
        "prompts": rows,
        "summary": summarize_rows(rows, fd, seconds, peak_mb),
    }
