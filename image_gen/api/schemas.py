"""Request and response bodies of the REST API (separate from the queue's records). Unknown fields are refused."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
)

from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from pipelines.errors import PipelineError
from pipelines.params import MAX_STEPS, SEED_MAX, GenerationParams, ModelInfo
from storage.queue import Job

MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 10
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
ALLOWED_CONTROLS = {"\n", "\r", "\t"}
# OpenAI's `quality` -> one of the model's presets (None: the model's defaults).
QUALITY_PRESETS = {
    "low": "speed",
    "medium": None,
    "auto": None,
    "standard": None,
    "high": "quality",
    "hd": "quality",
}


def _printable(text: str) -> str:
    """Text a PNG chunk and a tokenizer can take: no control characters but newline and tab, no lone surrogates."""
    for char in text:
        if char not in ALLOWED_CONTROLS and unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"control character U+{ord(char):04X} is not allowed")
    return text


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_printable)]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_printable)]


class GenerationRequest(BaseModel):
    """What every generation endpoint takes: OpenAI's fields that make sense here, and our extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    model: str | None = Field(
        None, max_length=200, description="a model id from GET /v1/models (default: server's)"
    )
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images, with seeds seed, seed+1, ...")
    size: str | None = Field(
        None,
        max_length=11,
        description='"WIDTHxHEIGHT", multiples of 8 within the model\'s range; "auto" or omitted: the model\'s native',
    )
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None,
        description="low: the model's speed preset; high or hd: its quality preset; others: its defaults",
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = Field(None, max_length=200, description="accepted for compatibility; not used")
    negative_prompt: NegativePrompt = ""
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="default: random")
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="default: the model's (or the quality preset's)"
    )
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    scheduler: str | None = Field(
        None, max_length=50, description="e.g. ddim, euler, dpmpp_2m (GET /sdapi/v1/samplers)"
    )
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_IMAGES,
        description="generate this many candidates (seeds seed, seed+1, ...) and return the n that the CLIP "
        "scorer ranks best against the prompt, best first; at least n (as in OpenAI's completions API)",
    )

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value < n:
            raise ValueError(
                f"best_of ({value}) must be at least n ({n}): it is the number of candidates the n images are "
                "chosen from"
            )
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or SIZE_PATTERN.match(value):
            return value
        raise ValueError('size must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto"')

    def generation_params(self, service: GenerationService) -> GenerationParams:
        """The engine's parameters: explicit fields, else the quality preset's values (a preset may run another
        model: GenerationService.preset), else the model's defaults."""
        preset_name = QUALITY_PRESETS.get(self.quality or "auto")
        model, preset = service.preset(self.model, preset_name)
        width, height = (preset["width"], preset["height"]) if preset_name else (None, None)
        if self.size and self.size != "auto":
            width, height = (int(part) for part in self.size.split("x"))
            try:  # before GenerationParams, whose own floor (8) would fail with no word of the allowed sizes
                model.check_size(width, height)
            except PipelineError as error:
                raise ImageGenError.from_exception(error) from error
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or preset.get("negative_prompt", ""),
            model=model.name,
            width=width,
            height=height,
            steps=self.steps if self.steps is not None else preset["steps"],
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else preset["guidance_scale"],
            scheduler=self.scheduler or preset["scheduler"],
            seed=self.seed,
            num_images=self.n,
        )


class ImageRequest(GenerationRequest):
    """OpenAI's `POST /v1/images/generations` body plus our extensions (negative_prompt, seed, steps, ...)."""

    response_format: Literal["url", "b64_json"] = Field(
        "b64_json", description="url: a signed link that expires (image_url_expires_s); b64_json: the bytes"
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg and webp: 0 best to 100 smallest"
    )
    background: Literal["auto", "opaque"] | None = Field(None, description="images are always opaque")
    moderation: Literal["auto", "low"] | None = Field(
        None, description="accepted for compatibility; not used"
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="accepted for compatibility; not used"
    )
    stream: Literal[False] | None = Field(
        None, description="streaming is not offered: use POST /v1/jobs and its events"
    )
    partial_images: int | None = Field(None, ge=0, le=0, description="0 only (see stream)")
    safety_identifier: str | None = Field(
        None, max_length=200, description="accepted for compatibility; not used"
    )


class JobRequest(GenerationRequest):
    webhook_url: str | None = Field(
        None, max_length=2000, description="POSTed a signed event when the job succeeds, fails or is canceled"
    )
    priority: int = Field(0, ge=-9, le=9, description="higher runs first among the caller's own jobs")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    clip_score: float | None = Field(None, description="best_of requests: CLIPScore against the prompt (0-100)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    quality: str


class JobImage(BaseModel):
    id: str
    seed: int
    width: int
    height: int
    url: str = Field(description="GET it with the job's key")
    clip_score: float | None = Field(None, description="best_of jobs: CLIPScore against the prompt (0-100)")


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    created_at: float
    updated_at: float
    params: dict[str, Any]
    queue_position: int | None = Field(None, description="jobs that run before this one (queued jobs only)")
    progress: dict[str, Any] | None = Field(None, description="step and total while running")
    images: list[JobImage] = []
    best_of: int | None = Field(
        None, description="candidates generated; images are the best n of them by CLIPScore, best first"
    )
    error: str | None = None
    attempts: int

    @classmethod
    def of(
        cls,
        job: Job,
        position: int | None = None,
        *,
        with_preview: bool = False,
        images: list[dict] | None = None,
    ) -> JobView:
        """`images`: the records the job presents (`GenerationService.images_of`); default: all of its images."""
        progress = dict(job.progress) if job.progress else None
        if progress and not with_preview:
            progress.pop("preview", None)
        records = images if images is not None else (job.result or {}).get("images", [])
        images_view = [
            JobImage(
                id=r["id"], seed=r["seed"], width=r["width"], height=r["height"], url=f"/v1/images/{r['id']}",
                clip_score=r.get("clip_score"),
            )
            for r in records
        ]
        best_of = GenerationService.best_of(job)
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            created_at=job.created_at,
            updated_at=job.updated_at,
            params=job.payload.get("params", {}),
            queue_position=position,
            progress=progress,
            images=images_view,
            best_of=best_of,
            error=job.error,
            attempts=job.attempts,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null: no more")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    architecture: str
    label: str
    description: str
    native_size: int
    allowed_sizes: list[str]
    min_size: int
    max_size: int
    default_scheduler: str
    default_steps: int
    default_guidance: float
    presets: dict[str, dict[str, Any]]
    content_hash: str

    @classmethod
    def of(cls, info: ModelInfo) -> ModelCard:
        return cls(
            id=info.name,
            created=0,
            owned_by="image-gen",
            **info.model_dump(
                include={
                    "architecture", "label", "description", "native_size", "allowed_sizes", "min_size",
                    "max_size", "default_scheduler", "default_steps", "default_guidance", "presets",
                    "content_hash",
                }
            ),
        )  # fmt: skip


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class WebhookAttempt(BaseModel):
    at: float
    event: str
    status_code: int | None
    error: str | None
    duration_ms: float
    ok: bool


class WebhookRecord(BaseModel):
    object: Literal["webhook"] = "webhook"
    job_id: str
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: list[WebhookAttempt]
    next_attempt_at: float
    created_at: float


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str
    header: str = "X-ImageGen-Signature"
    scheme: str = "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>' keyed with the secret>"


# --- Stable Diffusion web UI (AUTOMATIC1111) API ------------------------------------------------------------------

# Fields that web UI clients send and that change nothing here: accepted and ignored (any value).
SDAPI_IGNORED = (
    "styles", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "do_not_save_samples",
    "do_not_save_grid", "eta", "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise",
    "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks",
    "firstpass_image", "comments", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
    "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler",
    "hr_prompt", "hr_negative_prompt", "force_task_id", "script_args", "save_images", "infotext", "clip_skip",
)  # fmt: skip
# Features that are not offered: refused when asked for (a truthy value), accepted when off.
SDAPI_UNSUPPORTED = ("enable_hr", "restore_faces", "tiling", "script_name", "alwayson_scripts")


class _Txt2ImgFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: NegativePrompt = ""
    negative_prompt: NegativePrompt = ""
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="-1: random")
    sampler_name: str | None = Field(None, max_length=50, description='e.g. "Euler a", "DPM++ 2M", "DDIM"')
    sampler_index: str | None = Field(None, max_length=50, description="older name of sampler_name")
    scheduler: str | None = Field(None, max_length=50, description='"Automatic" or "Karras" (with DPM++ 2M)')
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES, description="batches; batch_size * n_iter is at most 10")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    width: int | None = Field(None, ge=8, le=16384)
    height: int | None = Field(None, ge=8, le=16384)
    override_settings: dict[str, Any] = Field(
        default_factory=dict, description="sd_model_checkpoint picks the model"
    )
    send_images: bool = True


Txt2ImgRequest = create_model(
    "Txt2ImgRequest",
    __base__=_Txt2ImgFields,
    __doc__="The web UI's txt2img body. Omitted steps, cfg_scale, width and height take the model's defaults; "
    "the web UI's other fields are accepted and ignored, and its features not offered here are refused when on.",
    **{name: (Any, None) for name in SDAPI_IGNORED + SDAPI_UNSUPPORTED},
)


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs carrying their `parameters` text")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seeds, sampler, model hash, infotexts, ...")


class SdModel(BaseModel):
    title: str
    model_name: str
    hash: str
    sha256: str
    filename: str
    config: str | None = None


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str] = {}


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class Progress(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SdOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str
    samples_format: str = "png"
