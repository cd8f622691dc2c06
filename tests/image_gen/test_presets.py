"""Presets that switch models, as the bundled pair has them: the student is the default and runs Speed, its Quality
preset runs the teacher, and the teacher's Speed preset runs the student. The REST API's `quality` follows them
(the studio's preset radio: tests/ui/test_preset_switching.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from image_gen.service import GenerationService
from pipelines.registry import ModelRegistry
from storage.objects import LocalObjectStore
from storage.queue import JobQueue
from tests.conftest import PRESET_QUALITY, PRESET_SPEED


@pytest.fixture
def service(preset_pair: Path, tmp_path: Path) -> GenerationService:
    store = LocalObjectStore(tmp_path / "store")
    registry = ModelRegistry([preset_pair], device="cpu", hash_cache=tmp_path / "hashes.json")
    return GenerationService(registry, store, JobQueue(store))


def test_the_default_model_is_the_student_and_presets_cross_over(service: GenerationService) -> None:
    assert service.model().name == "student"
    info, values = service.preset(None, "quality")
    assert info.name == "teacher"
    assert {key: values[key] for key in PRESET_QUALITY} == PRESET_QUALITY
    assert (values["width"], values["height"]) == (info.native_size, info.native_size)
    info, values = service.preset("teacher", "speed")
    assert info.name == "student" and values["steps"] == PRESET_SPEED["steps"] and "negative_prompt" not in values
    info, values = service.preset("student", None)  # no preset: the model's own defaults
    assert info.name == "student" and values["steps"] == info.default_steps


@pytest.mark.slow
def test_the_api_quality_runs_the_model_its_preset_names(start_api, preset_pair: Path) -> None:
    base = start_api(models_dir=preset_pair, default_model=None)
    with httpx.Client(base_url=base, timeout=60) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["student", "teacher"]
        high = client.post("/v1/jobs", json={"prompt": "a red circle", "quality": "high"}).json()
        assert (high["params"]["model"], high["params"]["steps"]) == ("teacher", 7)
        assert (high["params"]["negative_prompt"], high["params"]["scheduler"]) == ("blurry", "ddim")
        plain = client.post("/v1/jobs", json={"prompt": "a red circle"}).json()
        assert plain["params"]["model"] == "student"
        low = client.post("/v1/jobs", json={"prompt": "a red circle", "model": "teacher", "quality": "low"}).json()
        assert (low["params"]["model"], low["params"]["steps"]) == ("student", 3)
        explicit = client.post("/v1/jobs", json={"prompt": "x", "quality": "high", "steps": 2}).json()
        assert (explicit["params"]["model"], explicit["params"]["steps"]) == ("teacher", 2)
