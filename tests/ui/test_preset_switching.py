"""The studio's preset radio with presets that switch models (the bundled student's Quality runs its teacher): its
hint says where each preset goes, a preset's values come from the model it runs, and a model the designer picks
shows the preset that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from image_gen.service import GenerationService
from pipelines.registry import ModelRegistry
from storage.objects import LocalObjectStore
from storage.queue import JobQueue
from ui.studio import own_preset, preset_info, preset_values


@pytest.fixture
def service(preset_pair: Path, tmp_path: Path) -> GenerationService:
    store = LocalObjectStore(tmp_path / "store")
    registry = ModelRegistry([preset_pair], device="cpu", hash_cache=tmp_path / "hashes.json")
    return GenerationService(registry, store, JobQueue(store))


def test_the_studio_shows_where_a_preset_goes_and_the_preset_of_a_picked_model(service: GenerationService) -> None:
    student, teacher = service.model("student"), service.model("teacher")
    text = preset_info(service, student)
    assert text.startswith("Speed: 3 steps") and "Quality: teacher, 7 steps" in text
    assert "Speed: student, 3 steps" in preset_info(service, teacher)
    assert (own_preset(service, student), own_preset(service, teacher)) == ("Speed", "Quality")
    info, shown = preset_values(service, "student", "Quality")
    assert info.name == "teacher"
    assert shown == {"steps": 7, "guidance_scale": 4.0, "scheduler": "ddim", "negative_prompt": "blurry",
                     "size": f"{teacher.native_size}x{teacher.native_size}"}


@pytest.mark.browser
def test_the_quality_preset_switches_the_studio_to_the_teacher_and_picking_a_model_shows_its_preset(
    start_api, preset_pair: Path, tmp_path: Path, studio_page
) -> None:
    studio = studio_page(
        start_api(with_studio=True, store=str(tmp_path / "store"), models_dir=preset_pair, default_model=None)
    ).open()
    page = studio.page
    expect(page.locator("#model input")).to_have_value("student")  # the default: the highest priority
    expect(page.locator("#preset input[value=Speed]")).to_be_checked()
    expect(page.locator("#steps input[type=number]")).to_have_value("3")

    page.locator("#preset label", has_text="Quality").click()
    expect(page.locator("#model input")).to_have_value("teacher")
    expect(page.locator("#steps input[type=number]")).to_have_value("7")
    expect(page.locator("#guidance input[type=number]")).to_have_value("4")
    expect(page.locator("#negative textarea")).to_have_value("blurry")
    expect(page.locator("#preset input[value=Quality]")).to_be_checked()

    page.locator("#model input").click()  # the designer picks the student again: its own preset is Speed
    page.get_by_role("option", name="student").click()
    expect(page.locator("#preset input[value=Speed]")).to_be_checked()
    expect(page.locator("#steps input[type=number]")).to_have_value("3")
