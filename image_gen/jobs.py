"""What a generation job looks like in the queue: its payload, its batch key and where its images are stored."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from pipelines.params import GenerationParams


def job_payload(params: GenerationParams, **extras: Any) -> dict[str, Any]:
    """The queue payload of a request already resolved against its model (every field set)."""
    return {"params": params.model_dump(mode="json"), **extras}


def params_of(payload: dict[str, Any]) -> GenerationParams:
    try:
        return GenerationParams.model_validate(payload["params"])
    except (KeyError, ValidationError) as error:
        raise ValueError(str(error).splitlines()[0]) from error


def batch_key(params: GenerationParams) -> str:
    """Jobs with equal keys share one UNet batch: same model, size, steps, scheduler and guidance."""
    return (
        f"{params.model}|{params.width}x{params.height}|{params.steps}|{params.scheduler}|"
        f"{params.guidance_scale:g}"
    )


def image_prefix(owner: str, job_id: str) -> str:
    """Where every attempt at a job writes its images."""
    return f"images/{owner}/{job_id}/"


def image_key(owner: str, job_id: str, token: int, index: int) -> str:
    """Under the claim's fencing token, so that a worker whose lease was taken over and who deletes its own
    unpublished images never deletes the images its successor published."""
    return f"{image_prefix(owner, job_id)}{token}/{index}.png"


def thumbnail_key(owner: str, job_id: str, token: int, index: int) -> str:
    return f"{image_prefix(owner, job_id)}{token}/{index}.thumb.webp"
