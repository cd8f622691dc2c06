"""The bundled in-house CLIP reads held-out renders well enough to judge (R@1 >= 90% among 10 distractors, matching
above mismatched >= 95%), stays small, and never trained on the suite's scenes; the folder format round-trips,
the loader tells the layouts apart, and training resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eval.clip import BUNDLED_SCORER, ClipLoadError, InhouseClipScorer, load_scorer, scorer_kind
from eval.clip_accuracy import (
    HARD_DISTRACTORS,
    hard_distractor_accuracy,
    model_card_section,
    random_distractor_accuracy,
    write_model_card_section,
)
from eval.suites import load_suite
from pipelines.training.clip import (
    FIRST_TRAINING_SEED,
    ClipConfig,
    ClipTrainConfig,
    ContrastiveClip,
    image_pixels,
    train_clip,
)
from pipelines.training.common import RunConfig
from pipelines.training.scenes import make_scene

TINY = ClipConfig(channels=(8, 16), hidden_dim=32, embed_dim=16, text_width=16, text_queries=1, text_heads=2)


@pytest.fixture(scope="module")
def inhouse() -> InhouseClipScorer:
    if not (BUNDLED_SCORER / "model.safetensors").is_file():
        pytest.fail(f"the bundled in-house CLIP is missing: run `make clip-model` to train it into {BUNDLED_SCORER}")
    scorer = load_scorer()
    assert isinstance(scorer, InhouseClipScorer)
    return scorer


def test_inhouse_clip_ranks_the_true_caption_first_among_10_distractors_on_held_out_renders(inhouse):
    report = random_distractor_accuracy(inhouse)
    assert report["distractors"] == 10 and report["r_at_1"]["n"] == len(load_suite()) == 320
    assert report["r_at_1"]["mean"] >= 0.90, report
    assert report["pair_accuracy"]["mean"] >= 0.95, report


def test_hard_distractors_are_reported_for_every_kind(inhouse):
    report = hard_distractor_accuracy(inhouse, load_suite()[::8])
    assert set(report) == set(HARD_DISTRACTORS)
    for kind, score in report.items():
        assert score["n"] > 0 and 0.0 <= score["mean"] <= 1.0, kind
        true, false = score["example"].split(" vs ")
        assert true != false


def test_the_bundled_model_is_small_and_trained_on_other_scenes_than_the_suite():
    size = sum(file.stat().st_size for file in BUNDLED_SCORER.iterdir())
    assert size <= 20 * 2**20, f"{BUNDLED_SCORER} is {size / 2**20:.1f} MB"
    training = json.loads((BUNDLED_SCORER / "training.json").read_text())
    assert training["first_seed"] >= FIRST_TRAINING_SEED
    assert max(prompt.seed for prompt in load_suite()) < training["first_seed"]


def test_the_model_card_section_is_appended_once_and_replaced_in_place(tmp_path: Path):
    card = tmp_path / "model-card.md"
    card.write_text("# Model card\n\n## Data\n\nscenes\n")
    score = {"mean": 0.95, "low": 0.9, "high": 0.97, "n": 320}
    report = {"scorer": {"name": "inhouse-clip", "content_hash": "abc"},
              "random": {"r_at_1": score, "pair_accuracy": score, "distractors": 10, "in_template":
                         {"r_at_1": score, "pair_accuracy": score}, "heldout": {"r_at_1": score, "pair_accuracy": score}},
              "hard": {"swapped colours": {**score, "example": "'a' vs 'b'"}}}
    config = TINY.to_json()
    write_model_card_section(card, model_card_section(report, config, None))
    write_model_card_section(card, model_card_section(report, config, None).replace("95.0%", "96.0%"))
    text = card.read_text()
    assert text.startswith("# Model card\n\n## Data\n\nscenes\n\n## In-house CLIP\n")
    assert text.count("## In-house CLIP") == 1 and "96.0%" in text and "95.0%" not in text


def test_a_saved_model_embeds_exactly_as_before(tmp_path: Path):
    torch.manual_seed(0)
    model = ContrastiveClip(TINY).eval()
    pixels = image_pixels([make_scene(seed)[0] for seed in range(3)], TINY.image_size)
    model.save_pretrained(tmp_path / "clip")
    loaded = ContrastiveClip.from_pretrained(tmp_path / "clip")
    assert torch.equal(model.encode_images(pixels), loaded.encode_images(pixels))
    assert loaded.config == TINY


def test_the_loader_tells_the_layouts_apart_and_names_what_a_folder_needs(tmp_path: Path):
    ContrastiveClip(TINY).save_pretrained(tmp_path / "mine")
    assert scorer_kind(tmp_path / "mine") == "inhouse"
    scorer = load_scorer(tmp_path / "mine")
    embeddings = scorer.embed_texts(["a red circle", "two blue stars"])
    assert embeddings.shape == (2, TINY.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    with pytest.raises(ClipLoadError, match="does not exist"):
        load_scorer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipLoadError, match=r"no config\.json"):
        load_scorer(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ClipLoadError, match="neither the in-house CLIP"):
        load_scorer(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(TINY.to_json()))
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(ClipLoadError, match="cannot load the CLIP weights"):
        load_scorer(tmp_path / "other")


def test_clip_training_resumes_from_its_checkpoint_and_saves_the_model(tmp_path: Path):
    def run(steps: int) -> None:
        config = RunConfig(run_dir=tmp_path, steps=steps, batch_size=16, lr=1e-3, dataset_size=48,
                           checkpoint_every=2, log_every=1)
        train_clip(config, TINY, ClipTrainConfig(validation_scenes=24, warmup_steps=1), out=tmp_path / "out")

    run(2)
    first = json.loads((tmp_path / "out" / "training.json").read_text())
    run(3)
    log = [json.loads(line) for line in (tmp_path / "clip" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if "loss" in record] == [0, 1, 2]  # step 2 continues, not restarts
    assert first["steps"] == 2 and json.loads((tmp_path / "out" / "training.json").read_text())["steps"] == 3
    assert scorer_kind(tmp_path / "out") == "inhouse"
