"""Schedulers by name: a table from our names to diffusers scheduler classes, options and A1111-style labels."""

from collections.abc import Mapping
from typing import Any, NamedTuple

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipelines.errors import InvalidParamsError


class SchedulerSpec(NamedTuple):
    """One row of the table: the diffusers class, the options that make it this sampler, the label studios write."""

    cls: type[SchedulerMixin]
    options: Mapping[str, Any]
    label: str


# Labels are the sampler names AUTOMATIC1111 and compatible studios write into the PNG `parameters` chunk.
SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec(DDIMScheduler, {}, "DDIM"),
    "euler": SchedulerSpec(EulerDiscreteScheduler, {"use_karras_sigmas": False}, "Euler"),
    "euler_a": SchedulerSpec(EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "heun": SchedulerSpec(HeunDiscreteScheduler, {"use_karras_sigmas": False}, "Heun"),
    "dpmpp_2m": SchedulerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": SchedulerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": SchedulerSpec(UniPCMultistepScheduler, {"use_karras_sigmas": False}, "UniPC"),
    "lcm": SchedulerSpec(LCMScheduler, {}, "LCM"),
    "pndm": SchedulerSpec(PNDMScheduler, {"skip_prk_steps": True}, "PLMS"),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def check_scheduler(name: str) -> None:
    """Raise InvalidParamsError naming the known schedulers unless `name` is one of them."""
    if name not in SCHEDULERS:
        raise InvalidParamsError(
            f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULER_NAMES)}", param="scheduler"
        )


def make_scheduler(name: str, model_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler `name` built on a model's scheduler config (betas, prediction type, spacing are kept)."""
    check_scheduler(name)
    spec = SCHEDULERS[name]
    return spec.cls.from_config(dict(model_config), **spec.options)


def scheduler_label(name: str) -> str:
    """The A1111-style label of one of our scheduler names, e.g. "dpmpp_2m_karras" -> "DPM++ 2M Karras"."""
    check_scheduler(name)
    return SCHEDULERS[name].label


def scheduler_from_label(label: str) -> str:
    """Our scheduler name for an A1111-style label or one of our names, case-insensitive."""
    wanted = label.strip().lower()
    for name, spec in SCHEDULERS.items():
        if wanted in (name, spec.label.lower()):
            return name
    labels = ", ".join(spec.label for spec in SCHEDULERS.values())
    raise InvalidParamsError(f"unknown sampler {label!r}: use one of {labels}", param="scheduler")
