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


# --- CLIP-space metrics: rows of embeddings are L2-normalised ------------------------------------------------


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """CLIPScore of each (image, text) row pair: 100 * max(cos, 0), as torchmetrics' CLIPScore defines it.

    torchmetrics clamps the mean of a batch at 0 rather than each pair; the two agree whenever no pair has a
    negative cosine, and per pair (a batch of one) always."""
    images, texts = _unit_rows(image_embeddings), _unit_rows(text_embeddings)
    if images.shape != texts.shape:
        raise ValueError(f"pairs need equal shapes, got {images.shape} and {texts.shape}")
    return np.maximum(100.0 * np.einsum("nd,nd->n", images, texts), 0.0)


def retrieval_hits(true_scores: np.ndarray, distractor_scores: np.ndarray) -> np.ndarray:
    """CLIP R-precision (R = 1) per query: whether its true caption scores strictly above each of its k
    distractors (rows of `distractor_scores`, shape (n, k)); a tie is a miss."""
    true_scores, distractor_scores = np.asarray(true_scores), np.asarray(distractor_scores)
    if distractor_scores.ndim != 2 or len(distractor_scores) != len(true_scores):
        raise ValueError(f"need (n,) true scores and (n, k) distractor scores, got {true_scores.shape} and "
                         f"{distractor_scores.shape}")
    return (true_scores[:, None] > distractor_scores).all(axis=1)


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of embeddings (rows), as FID computes it:
    |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2).

    The trace of the matrix square root is taken as the sum of square roots of the eigenvalues of the symmetric
    S2^1/2 S1 S2^1/2 (the same eigenvalues as S1 S2), so it is real and exact for identical sets."""
    a, b = np.asarray(features, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two sets of at least 2 rows of equal width, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_b)
    root_b = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = np.linalg.eigvalsh(root_b @ cov_a @ root_b)
    trace_root = np.sqrt(np.clip(product, 0.0, None)).sum()
    distance = np.square(mean_a - mean_b).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(max(distance, 0.0))


def frechet_distance_with_interval(features: np.ndarray, reference: np.ndarray, rounds: int = 200,
                                   seed: int = 0, level: float = 0.95) -> dict:
    """Frechet distance of the whole sets, and a bias-corrected bootstrap interval from resampling both sets.

    A resample repeats rows, which shrinks the sets' spread along some directions and so raises the distance: with
    a few hundred embeddings of a few hundred dimensions every resampled distance can lie above the full sets' one,
    and the plain percentile interval would not contain it. The interval is therefore the percentile interval moved
    down by the bootstrap's bias (mean of the resamples minus the full sets' distance), floored at 0."""
    a, b = np.asarray(features, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    samples = np.array([frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
                        for _ in range(rounds)])
    distance = frechet_distance(a, b)
    bias = float(samples.mean()) - distance
    tail = (1 - level) / 2 * 100
    return {"mean": distance, "low": max(0.0, float(np.percentile(samples, tail)) - bias),
            "high": max(0.0, float(np.percentile(samples, 100 - tail)) - bias), "bootstrap_bias": bias,
            "n": len(a), "reference_n": len(b)}


def diversity(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance (1 - cos) between the images of one prompt; 0 when they are all alike."""
    unit = _unit_rows(embeddings)
    n = len(unit)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images of a prompt, got {n}")
    cosines = unit @ unit.T
    return float((1.0 - cosines[np.triu_indices(n, k=1)]).mean())


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    rows = np.asarray(embeddings, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"need a 2-d array of embeddings (rows), got shape {rows.shape}")
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
