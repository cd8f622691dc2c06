"""The results record that `image-gen eval` writes: its format tag, its headline metrics and their directions."""

from __future__ import annotations

RESULTS_FORMAT = "image-gen-eval/1"

HIGHER_IS_BETTER = {
    "clip_score": True,
    "r_precision": True,
    "compositional": True,
    "diversity": True,
    "frechet_distance": False,
    "seconds_per_image": False,
    "peak_memory_mb": False,
}
"""Headline metrics and their direction; `compositional.<sub-score>` (e.g. compositional.position) are higher-better."""


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER[metric.split(".", 1)[0]]


def headline(result: dict) -> dict[str, float]:
    """Every headline metric of a results record: its mean (Frechet distance: of the whole sets)."""
    summary = result["summary"]
    values = {name: float(summary[name]["mean"]) for name in ("clip_score", "r_precision", "compositional",
                                                              "diversity", "frechet_distance") if name in summary}
    values.update({f"compositional.{name}": float(score["mean"])
                   for name, score in summary.get("compositional_scores", {}).items()})
    values["seconds_per_image"] = float(summary["seconds_per_image"])
    values["peak_memory_mb"] = float(summary["peak_memory_mb"])
    return values
