"""The regression gate: a candidate's results against a baseline's, metric by metric, within a relative tolerance."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eval.results import headline, higher_is_better

QUALITY_METRICS = ("clip_score", "r_precision", "compositional", "compositional.*", "frechet_distance", "diversity")
"""Gated unless told otherwise. Speed and memory are left out: wall-clock time varies from run to run on a shared
machine, and a gate that fails on a rerun of the baseline gates nothing."""

_MUST_MATCH = ("suite_sha256", "scorer", "images_per_prompt", "distractors")


@dataclass(frozen=True)
class Regression:
    """A metric worse than the baseline by more than the tolerance allows (or missing from the candidate)."""

    metric: str
    baseline: float
    candidate: float | None
    allowed: float

    def __str__(self) -> str:
        if self.candidate is None:
            return f"{self.metric}: missing from the candidate (baseline {self.baseline:.4g})"
        word = "below" if higher_is_better(self.metric) else "above"
        return (f"{self.metric}: {self.candidate:.4g} vs baseline {self.baseline:.4g} "
                f"({word} the allowed {self.allowed:.4g})")


def why_not_comparable(baseline: dict, candidate: dict) -> str | None:
    """Why two results cannot be compared (other prompts, scorer or sampling), or None."""
    for key in _MUST_MATCH:
        if baseline["config"].get(key) != candidate["config"].get(key):
            return (f"the baseline and the candidate differ in {key} ({baseline['config'].get(key)!r} vs "
                    f"{candidate['config'].get(key)!r}): their scores are not comparable")
    return None


def select_metrics(available: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The metrics that `patterns` name ("name" or "prefix.*"), in a stable order."""
    available = sorted(available)
    chosen: list[str] = []
    for pattern in patterns:
        if pattern.endswith(".*"):
            chosen += [name for name in available if name.startswith(pattern[:-1])]
        elif pattern in available:
            chosen.append(pattern)
    return list(dict.fromkeys(chosen))


def find_regressions(baseline: dict, candidate: dict, tolerance: float,
                     metrics: Iterable[str] = QUALITY_METRICS) -> list[Regression]:
    """Metrics of the baseline that the candidate misses or makes worse by more than `tolerance` times the
    baseline's value (0.05: five percent)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    base, new = headline(baseline), headline(candidate)
    found = []
    for metric in select_metrics(base, metrics):
        margin = tolerance * abs(base[metric]) + 1e-9
        allowed = base[metric] - margin if higher_is_better(metric) else base[metric] + margin
        value = new.get(metric)
        if value is None:
            found.append(Regression(metric, base[metric], None, allowed))
        elif (value < allowed) if higher_is_better(metric) else (value > allowed):
            found.append(Regression(metric, base[metric], value, allowed))
    return found
