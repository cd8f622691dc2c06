"""Request and response bodies of the REST API (separate from the queue's records)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.params import MAX_STEPS, SEED_MAX, GenerationParams
from storage.queue import Job

MAX_PROMPT_CHARS = 2000
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageRequest(BaseModel):
    """OpenAI's images/generations body plus our extensions (negative_prompt, seed, steps, guidance_scale, ...)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=200)
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT", e.g. "512x512"; "auto" or omitted: the model\'s native'
    )
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    response_format: Literal["url", "b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = Field(None, max_length=200)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    scheduler: str | None = Field(None, max_length=50)

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or SIZE_PATTERN.match(value):
            return value
        raise ValueError('size must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto"')

    def generation_params(self) -> GenerationParams:
        width = height = None
        if self.size and self.size != "auto":
            width, height = (int(part) for part in self.size.split("x"))
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            model=self.model,
            width=width,
            height=height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            seed=self.seed,
            num_images=self.n,
        )


class JobRequest(ImageRequest):
    webhook_url: str | None = Field(None, max_length=2000)
    priority: int = Field(0, ge=-9, le=9)


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    created_at: float
    updated_at: float
    params: dict[str, Any]
    queue_position: int | None = None
    progress: dict[str, Any] | None = None
    images: list[dict[str, Any]] = []
    error: str | None = None
    attempts: int

    @classmethod
    def of(cls, job: Job, position: int | None = None, *, with_preview: bool = False) -> JobView:
        progress = dict(job.progress) if job.progress else None
        if progress and not with_preview:
            progress.pop("preview", None)
        images = [
            {
                "id": r["id"],
                "seed": r["seed"],
                "width": r["width"],
                "height": r["height"],
                "url": f"/v1/images/{r['id']}",
            }
            for r in (job.result or {}).get("images", [])
        ]
        return cls(
            id=job.id,
            status=job.status,
            created_at=job.created_at,
            updated_at=job.updated_at,
            params=job.payload.get("params", {}),
            queue_position=position,
            progress=progress,
            images=images,
            error=job.error,
            attempts=job.attempts,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    next_cursor: str | None = None
