"""Compositional accuracy of a model on a prompt suite: generate each prompt, check it with the detector."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from PIL import Image

from eval.detector import check
from eval.metrics import mean_with_interval
from eval.suites import SuitePrompt

Generate = Callable[[list[str], list[int]], list[Image.Image]]
"""prompts, seeds -> images: a model at fixed settings."""


def score_suite(generate: Generate, prompts: list[SuitePrompt], batch_size: int = 8,
                seed_offset: int = 0) -> dict:
    """Per-prompt sub-scores and, per category and tag group, the mean with a bootstrap 95% interval."""
    scored = [p for p in prompts if p.expectation is not None]
    rows = []
    started = time.perf_counter()
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        images = generate([p.prompt for p in chunk], [(p.seed or 0) + seed_offset for p in chunk])
        for prompt, image in zip(chunk, images, strict=True):
            result = check(image, prompt.expectation)
            rows.append({"id": prompt.id, "prompt": prompt.prompt, "category": prompt.category,
                         "tags": list(prompt.tags), "scores": result.details["scores"]})
    seconds = time.perf_counter() - started
    return {"rows": rows, "summary": summarize(rows), "seconds_per_image": seconds / max(1, len(rows))}


def summarize(rows: list[dict]) -> dict:
    """{group: {sub-score: mean and interval}} for all prompts, and for each tag (e.g. in_template, heldout)."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for name, passed in row["scores"].items():
            for group in ("all", *row["tags"]):
                groups[group][name].append(float(passed))
    return {group: {name: mean_with_interval(values) for name, values in sorted(scores.items())}
            for group, scores in groups.items()}


def pipeline_generator(pipe, *, steps: int, guidance_scale: float, scheduler: str,
                       size: int | None = None, negative_prompt: str = "") -> Generate:
    """A `Generate` from a loaded `pipelines.Text2ImagePipeline` at fixed settings."""
    side = size or pipe.info.native_size

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return pipe(prompts, [negative_prompt] * len(prompts), seeds, side, side, steps, guidance_scale, scheduler)

    return generate
