"""Metrics as pure functions over arrays, each with a bootstrap 95% interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_interval(values: Sequence[float], rounds: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (rounds, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def mean_with_interval(values: Sequence[float], rounds: int = 1000, seed: int = 0) -> dict:
    low, high = bootstrap_interval(values, rounds, seed)
    return {"mean": float(np.mean(values)) if len(values) else float("nan"), "low": low, "high": high,
            "n": len(values)}
