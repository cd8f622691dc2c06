"""The shipped in-house pair (pipelines/models): complete standard diffusers folders that stock diffusers loads and
runs, small enough to commit, with the student as the registry's default (Speed) and its teacher as Quality."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from PIL import Image

from eval.detector import check
from pipelines.registry import BUNDLED_MODELS_DIR, ModelRegistry, complete_bundled_models

TEACHER, STUDENT = BUNDLED_MODELS_DIR / "inhouse-shapes", BUNDLED_MODELS_DIR / "inhouse-shapes-lcm"
# The README's example prompt and what the evaluation suite's detector must find in its image.
EXAMPLE = "a red circle to the left of a blue square"
EXAMPLE_EXPECTATION = {
    "category": "position",
    "objects": [
        {"shape": "circle", "color": "red", "count": 1},
        {"shape": "square", "color": "blue", "count": 1},
    ],
    "relation": {
        "a": {"shape": "circle", "color": "red"},
        "relation": "left of",
        "b": {"shape": "square", "color": "blue"},
    },
}


@pytest.fixture(scope="module", params=[TEACHER, STUDENT], ids=lambda path: path.name)
def bundled(request: pytest.FixtureRequest) -> Path:
    folder = request.param
    if not (folder / "model_index.json").is_file():
        pytest.fail(f"{folder} is not bundled: `image-gen train export` writes it (docs/model-card.md)")
    if not (folder / "text_encoder" / "config.json").is_file():
        pytest.fail(f"{folder}/text_encoder is missing: `image-gen setup` puts the MiniLM encoder there")
    return folder


def test_stock_diffusers_loads_and_runs_each_bundled_folder(bundled: Path):
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(
        bundled, safety_checker=None, requires_safety_checker=False
    )
    distilled = bundled == STUDENT
    assert isinstance(pipe.scheduler, LCMScheduler) == distilled
    generator = torch.Generator().manual_seed(3)
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0} if distilled else {"num_inference_steps": 10}
    image = pipe(EXAMPLE, height=128, width=128, generator=generator, **kwargs).images[0]
    pixels = np.asarray(image, dtype=np.float32)
    assert image.size == (128, 128)
    # A scene, not noise or a blank: the background is smooth and something stands out from it.
    assert pixels.std() > 10, "the image is flat"
    assert np.abs(np.diff(pixels, axis=1)).mean() < 12, "the image is noise"


def test_the_bundled_weights_fit_the_60_mb_budget():
    """Everything that is committed (not the MiniLM encoder and tokenizer, which setup copies in), with identical
    files counted once, as git stores them."""
    blobs: dict[str, int] = {}
    for folder in (TEACHER, STUDENT):
        for path in folder.rglob("*"):
            if path.is_file() and path.relative_to(folder).parts[0] not in ("text_encoder", "tokenizer"):
                blobs[hashlib.sha256(path.read_bytes()).hexdigest()] = path.stat().st_size
    assert sum(blobs.values()) <= 60 * 2**20


def test_the_student_is_the_default_at_speed_and_its_quality_preset_runs_the_teacher():
    registry = ModelRegistry([BUNDLED_MODELS_DIR], device="cpu")
    default = registry.default()
    assert default.name == STUDENT.name
    presets = json.loads((STUDENT / "image-gen.json").read_text())["presets"]
    assert presets["speed"]["steps"] == 4 and presets["speed"]["scheduler"] == "lcm"
    assert presets["quality"]["model"] == TEACHER.name
    assert registry.get(TEACHER.name).name == TEACHER.name


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 5 is open: the shipped pair draws the example right for 1 of 16 seeds (student, seed 15) and 1 of 16 "
    "(teacher, Euler ancestral, seed 1), docs/model-card.md; strict, so this fails once a retrained model gets it right",
)
def test_the_readme_example_writes_a_correct_image(tmp_path: Path):
    """`image-gen generate "a red circle to the left of a blue square"` on a fresh install (the bundled default,
    no settings), checked by the evaluation suite's detector: colours, shapes and the relation, for most of 4 seeds."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGE_GEN_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # a fresh install: no settings, ./models does not exist
    command = [
        sys.executable,
        "-m",
        "image_gen.cli",
        "generate",
        EXAMPLE,
        "--seed",
        "0",
        "-n",
        "4",
        "-o",
        "out",
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 4
    verdicts = [
        check(Image.open(path).convert("RGB"), EXAMPLE_EXPECTATION).details["scores"] for path in images
    ]
    assert sum(all(scores.values()) for scores in verdicts) >= 3, verdicts


def test_setup_with_the_bundled_models_builds_nothing_and_lists_them(tmp_path: Path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGE_GEN_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # a fresh install: no settings, ./models does not exist
    command = [sys.executable, "-m", "image_gen.cli", "setup"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"models ready: {TEACHER.name}, {STUDENT.name}"
    assert not list(tmp_path.glob("models/*/model_index.json")), (
        "setup built a model although the bundled ones are there"
    )


def test_the_text_encoder_is_put_into_a_fresh_clone_s_folders_once(tmp_path: Path):
    """A fresh clone has the committed weights only: the MiniLM encoder and tokenizer come from the installed
    package, before anything loads the folder."""
    clone = tmp_path / "models"
    shutil.copytree(STUDENT, clone / STUDENT.name, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    assert complete_bundled_models(clone) == [clone / STUDENT.name]
    tokenizer = json.loads((clone / STUDENT.name / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 32
    installed = clone / STUDENT.name / "text_encoder" / "model.safetensors"
    assert installed.read_bytes() == (STUDENT / "text_encoder" / "model.safetensors").read_bytes()
    assert complete_bundled_models(clone) == []
    assert [
        p.name for p in (clone / STUDENT.name).iterdir() if p.name.startswith(".")
    ] == []  # no staging left
