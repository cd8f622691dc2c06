"""GenerationParams and ModelInfo.resolve: blanks filled from the model, everything checked against it."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.errors import InvalidParamsError
from pipelines.params import RANDOM_SEED_BOUND, SEED_MAX, GenerationParams, ModelInfo, suggested_sizes


@pytest.fixture(scope="module")
def info(tiny_sd_model: Path) -> ModelInfo:
    return ModelInfo.from_folder(tiny_sd_model)


def test_resolve_fills_every_blank_from_the_model(info: ModelInfo) -> None:
    resolved = info.resolve(GenerationParams(prompt="a cat"))
    assert resolved.model == "tiny-sd"
    assert (resolved.width, resolved.height) == (info.native_size, info.native_size)
    assert (resolved.steps, resolved.guidance_scale) == (info.default_steps, info.default_guidance)
    assert resolved.scheduler == info.default_scheduler
    assert resolved.seed is not None and 0 <= resolved.seed < RANDOM_SEED_BOUND


def test_resolve_keeps_what_was_asked(info: ModelInfo) -> None:
    asked = GenerationParams(
        prompt="a cat",
        width=48,
        height=24,
        steps=3,
        guidance_scale=0.0,
        scheduler="euler",
        seed=0,
        num_images=2,
    )
    assert info.resolve(asked) == asked.model_copy(update={"model": "tiny-sd"})


@pytest.mark.parametrize(
    ("changes", "param", "hint"),
    [
        ({"width": 40, "height": 20}, "height", "multiple of 8 from 16 to 64 \\(suggested: 32x32"),
        ({"width": 128}, "width", "from 16 to 64"),
        ({"scheduler": "k_lms"}, "scheduler", "use one of ddim, euler"),
        ({"model": "other"}, "model", "not 'tiny-sd'"),
        ({"seed": SEED_MAX, "num_images": 2}, "seed", "use a smaller seed"),
    ],
)
def test_resolve_rejects_what_the_model_does_not_accept(
    info: ModelInfo, changes: dict, param: str, hint: str
) -> None:
    with pytest.raises(InvalidParamsError, match=hint) as error:
        info.resolve(GenerationParams(prompt="x", **changes))
    assert error.value.param == param


@pytest.mark.parametrize(
    "changes",
    [{"steps": 0}, {"steps": 151}, {"guidance_scale": -0.5}, {"num_images": 0}, {"seed": -1}, {"colour": 1}],
)
def test_params_reject_model_independent_mistakes_at_the_edge(changes: dict) -> None:
    with pytest.raises(ValidationError):
        GenerationParams(prompt="x", **changes)


def test_params_round_trip_through_json() -> None:
    params = GenerationParams(prompt="a cat", negative_prompt="blur", seed=5, width=512, height=768)
    assert GenerationParams.model_validate_json(params.model_dump_json()) == params


def test_suggested_sizes_are_common_aspect_ratios_at_the_native_area() -> None:
    assert suggested_sizes(1024, 512, 2048) == [
        "1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344",
    ]  # fmt: skip
    assert suggested_sizes(512, 256, 1024)[0] == "512x512"
