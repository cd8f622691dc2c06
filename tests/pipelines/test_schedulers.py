"""Schedulers by name: built on a model's config, labelled as other studios label them."""

import pytest

from pipelines.errors import InvalidParamsError
from pipelines.schedulers import SCHEDULER_NAMES, make_scheduler, scheduler_from_label, scheduler_label

MODEL_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "skip_prk_steps": True,
}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_keeps_the_model_noise_schedule(name: str) -> None:
    scheduler = make_scheduler(name, MODEL_CONFIG)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_karras_is_an_option_of_dpmpp_2m_not_inherited() -> None:
    karras_config = {**MODEL_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert make_scheduler("dpmpp_2m", karras_config).config.use_karras_sigmas is False
    assert make_scheduler("dpmpp_2m_karras", MODEL_CONFIG).config.use_karras_sigmas is True
    assert make_scheduler("euler", karras_config).config.use_karras_sigmas is False


def test_each_scheduler_is_made_fresh() -> None:
    assert make_scheduler("euler", MODEL_CONFIG) is not make_scheduler("euler", MODEL_CONFIG)


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("euler_a", "Euler a"),
        ("ddim", "DDIM"),
        ("lcm", "LCM"),
        ("pndm", "PLMS"),
    ],
)
def test_labels_are_the_ones_a1111_writes_and_read_back(name: str, label: str) -> None:
    assert scheduler_label(name) == label
    assert scheduler_from_label(label) == name
    assert scheduler_from_label(label.upper()) == name
    assert scheduler_from_label(name) == name


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(InvalidParamsError, match="use one of ddim, euler, euler_a"):
        make_scheduler("k_dpm_2", MODEL_CONFIG)
    with pytest.raises(InvalidParamsError, match="use one of DDIM, Euler, Euler a"):
        scheduler_from_label("DPM adaptive")
