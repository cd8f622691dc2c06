"""Metrics are pure functions with known answers: CLIPScore as torchmetrics computes it, Frechet distance as FID
defines it, R-precision, diversity, and bootstrap intervals that contain their estimate."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.metrics import (
    clip_scores,
    diversity,
    frechet_distance,
    frechet_distance_with_interval,
    retrieval_hits,
)
from tests.conftest import _tiny_clip_tokenizer

CAPTIONS = ["a red circle", "two blue stars", "a green square above a white cross", "three pink triangles",
            "a yellow star", "an orange disc left of a purple box"]


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight transformers CLIPModel and its processor, saved to disk as a user would."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 37, "projection_dim": 24,
            "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 40, "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 37, "projection_dim": 24, "num_attention_heads": 4,
              "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=_tiny_clip_tokenizer(),
    )
    processor.tokenizer.model_max_length = 40
    processor.save_pretrained(folder)
    return folder


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _torchmetrics_clip_score(folder: Path):
    """torchmetrics' CLIPScore on the same folder. Its documented callable form is how a local folder is given;
    the adapter unwraps transformers 5's model outputs into the feature tensors torchmetrics expects (transformers
    4 returns them directly)."""
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Features(torch.nn.Module):
        def __init__(self, model: CLIPModel):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            output = self.model.get_image_features(*args, **kwargs)
            return output if isinstance(output, torch.Tensor) else output.pooler_output

        def get_text_features(self, *args, **kwargs):
            output = self.model.get_text_features(*args, **kwargs)
            return output if isinstance(output, torch.Tensor) else output.pooler_output

    return CLIPScore(model_name_or_path=lambda: (Features(CLIPModel.from_pretrained(folder).eval()),
                                                 CLIPProcessor.from_pretrained(folder)))


def test_clip_score_of_a_transformers_clip_folder_equals_torchmetrics(tiny_clip_folder: Path):
    import torch

    from eval.clip import TransformersClipScorer, load_scorer

    scorer = load_scorer(tiny_clip_folder)
    assert isinstance(scorer, TransformersClipScorer)
    images = _images(len(CAPTIONS))
    ours = scorer.score(images, CAPTIONS)

    metric = _torchmetrics_clip_score(tiny_clip_folder)
    as_tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
    theirs = []
    for tensor, caption in zip(as_tensors, CAPTIONS, strict=True):
        metric.reset()
        metric.update([tensor], [caption])
        theirs.append(float(metric.compute()))
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert len(set(np.round(ours, 3))) == len(CAPTIONS)  # real scores, not a constant both sides agree on

    # Over a batch torchmetrics clamps the mean (not each pair): equal to ours wherever no cosine is negative.
    positive = [i for i, score in enumerate(ours) if score > 0]
    metric.reset()
    metric.update([as_tensors[i] for i in positive], [CAPTIONS[i] for i in positive])
    assert float(metric.compute()) == pytest.approx(float(np.mean(ours[positive])), abs=1e-3)


def test_clip_scores_are_100_times_the_cosine_clamped_at_zero():
    images = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(clip_scores(images, texts), [100.0, 100.0, 0.0])
    np.testing.assert_allclose(clip_scores([[3.0, 4.0]], [[1.0, 0.0]]), [60.0])


def _gaussian_set(n: int = 400, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + rng.normal(size=dim)


def test_frechet_distance_of_identical_sets_is_zero():
    features = _gaussian_set()
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features[::-1].copy()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_monotonically_with_added_noise():
    reference = _gaussian_set(seed=1)
    noise = np.random.default_rng(2).normal(size=reference.shape)
    distances = [frechet_distance(reference + sigma * noise, reference) for sigma in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)]
    assert distances[0] == pytest.approx(0.0, abs=1e-6)
    assert all(later > earlier for earlier, later in itertools.pairwise(distances)), distances


def test_frechet_distance_matches_the_fid_formula_with_scipy_sqrtm():
    from scipy import linalg

    a, b = _gaussian_set(seed=3), _gaussian_set(seed=4)[:300] * 1.3 + 0.2
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real  # pytorch-fid's computation
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_interval_brackets_its_estimate():
    a, b = _gaussian_set(seed=5), _gaussian_set(seed=6) + 0.5
    result = frechet_distance_with_interval(a, b, rounds=50)
    assert result["low"] <= result["mean"] <= result["high"]
    assert result["n"] == len(a) and result["reference_n"] == len(b)


def test_frechet_interval_contains_the_distance_when_resampling_inflates_it():
    # 80 images against 160 references in 64 dimensions, as a short evaluation has them: every resample's distance
    # is above the full sets' one, so a plain percentile interval would miss it entirely.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(80, 64)), rng.normal(size=(160, 64)) + 0.05
    result = frechet_distance_with_interval(a, b, rounds=100)
    assert result["bootstrap_bias"] > 0
    assert result["low"] <= result["mean"] <= result["high"]
    assert result["low"] < result["high"]


def test_r_precision_counts_a_hit_only_when_the_true_caption_beats_every_distractor():
    true_scores = np.array([0.9, 0.5, 0.5])
    distractors = np.array([[0.1, 0.8], [0.6, 0.1], [0.5, 0.2]])  # a tie is a miss
    assert retrieval_hits(true_scores, distractors).tolist() == [True, False, False]


def test_diversity_is_zero_for_identical_images_and_one_for_orthogonal_ones():
    assert diversity(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])) == pytest.approx(0.0)
    assert diversity(np.eye(3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(np.eye(3)[:1])
