"""The Stable Diffusion web UI (AUTOMATIC1111) API that chat front ends and editor plugins speak: txt2img with
base64 images and the `info` JSON they read, the model and sampler lists, and the caller's progress."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from fastapi import APIRouter

from image_gen import __version__
from image_gen.api.deps import CurrentCaller, Service, Submit
from image_gen.api.errors import ERROR_RESPONSES, ErrorResponse
from image_gen.api.schemas import (
    MAX_IMAGES,
    SDAPI_UNSUPPORTED,
    Progress,
    ProgressState,
    Sampler,
    SdModel,
    SdOptions,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from pipelines.errors import PipelineError
from pipelines.params import GenerationParams, ModelInfo
from pipelines.schedulers import SCHEDULERS, scheduler_from_label
from storage.pnginfo import read_png_info

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"], responses=ERROR_RESPONSES)
AUTOMATIC = ("", "automatic")


def _title(info: ModelInfo) -> str:
    return f"{info.name} [{info.content_hash}]" if info.content_hash else info.name


def _scheduler(sampler: str | None, schedule: str | None) -> str | None:
    """Our scheduler for a web UI sampler name and schedule type ("Automatic", or "Karras")."""
    schedule = (schedule or "").strip().lower()
    if schedule not in (*AUTOMATIC, "karras"):
        raise ImageGenError(
            f"scheduler {schedule!r} is not offered: use Automatic or Karras", param="scheduler"
        )
    if not sampler:
        return None
    label = sampler.strip()
    if schedule == "karras" and not label.lower().endswith("karras"):
        label += " Karras"
    try:
        return scheduler_from_label(label)
    except PipelineError as error:
        raise ImageGenError.from_exception(error) from error


def _checkpoint(override_settings: dict[str, Any]) -> str | None:
    """The model named by `sd_model_checkpoint` (a title "name [hash]" or a name)."""
    value = override_settings.get("sd_model_checkpoint")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ImageGenError("sd_model_checkpoint must be a model title or name", param="override_settings")
    return value.split(" [", 1)[0].strip()


def _params(body: Txt2ImgRequest, service: GenerationService) -> GenerationParams:
    for name in SDAPI_UNSUPPORTED:
        if getattr(body, name):
            raise ImageGenError(f"{name} is not offered by this server: leave it off", param=name)
    count = body.batch_size * body.n_iter
    if count > MAX_IMAGES:
        raise ImageGenError(
            f"batch_size * n_iter is {count}: at most {MAX_IMAGES} images", param="batch_size"
        )
    model = service.model(_checkpoint(body.override_settings))
    return GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=model.name,
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        scheduler=_scheduler(body.sampler_name or body.sampler_index, body.scheduler),
        seed=None if body.seed == -1 else body.seed,
        num_images=count,
    )


@router.post(
    "/txt2img",
    response_model=Txt2ImgResponse,
    responses={504: {"model": ErrorResponse, "description": "the job outlasted request_timeout_s"}},
)
async def txt2img(
    body: Txt2ImgRequest, caller: CurrentCaller, service: Service, submit: Submit
) -> Txt2ImgResponse:
    """Generate and wait, as the web UI does."""
    params = await asyncio.to_thread(_params, body, service)
    job = await submit.generate(caller, params)
    resolved = job.payload["params"]
    model = await asyncio.to_thread(service.model, resolved["model"])
    images, infotexts = [], []
    for record in job.result["images"]:
        stored = await asyncio.to_thread(service.image, caller.owner, record["id"])
        infotexts.append(read_png_info(stored.data).raw_text or "")
        if body.send_images:
            images.append(base64.b64encode(stored.data).decode())
    seeds = [record["seed"] for record in job.result["images"]]
    sampler = SCHEDULERS[resolved["scheduler"]].label
    count = len(seeds)
    info = {
        "prompt": resolved["prompt"],
        "all_prompts": [resolved["prompt"]] * count,
        "negative_prompt": resolved["negative_prompt"],
        "all_negative_prompts": [resolved["negative_prompt"]] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": seeds[0],
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": resolved["width"],
        "height": resolved["height"],
        "sampler_name": sampler,
        "cfg_scale": resolved["guidance_scale"],
        "steps": resolved["steps"],
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.name,
        "sd_model_hash": model.content_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"image-gen {__version__}",
        "job_id": job.id,
    }
    parameters = body.model_dump(mode="json", exclude_none=True)
    return Txt2ImgResponse(images=images, parameters=parameters, info=json.dumps(info))


@router.get("/sd-models", response_model=list[SdModel])
def sd_models(caller: CurrentCaller, service: Service) -> list[SdModel]:
    return [
        SdModel(
            title=_title(info),
            model_name=info.name,
            hash=info.content_hash,
            sha256=info.content_sha256,
            filename=info.name,
        )
        for info in service.models()
    ]


@router.get("/samplers", response_model=list[Sampler])
def samplers(caller: CurrentCaller) -> list[Sampler]:
    return [Sampler(name=spec.label, aliases=[name]) for name, spec in SCHEDULERS.items()]


@router.get("/options", response_model=SdOptions)
def options(caller: CurrentCaller, service: Service) -> SdOptions:
    """The settings web UI clients read: the default model's title."""
    return SdOptions(sd_model_checkpoint=_title(service.model()))


@router.get("/progress", response_model=Progress)
def progress(caller: CurrentCaller, service: Service, skip_current_image: bool = False) -> Progress:
    """The caller's running job (else the next queued one): progress 0..1, an ETA and the latest preview."""
    jobs = service.jobs(caller.owner, limit=10).jobs
    active = [job for job in jobs if not job.finished]
    job = next((j for j in active if j.status == "running"), active[0] if active else None)
    if job is None:
        return Progress(progress=0.0, eta_relative=0.0, state=ProgressState())
    step = int((job.progress or {}).get("step", 0))
    total = int((job.progress or {}).get("total", 0) or job.payload.get("params", {}).get("steps", 0))
    fraction = step / total if total else 0.0
    elapsed = time.time() - job.created_at  # no start time is recorded: the ETA counts the wait too
    preview = (job.progress or {}).get("preview")
    return Progress(
        progress=fraction,
        eta_relative=elapsed / fraction - elapsed if fraction else 0.0,
        state=ProgressState(
            job=job.id,
            job_count=len(active),
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
            sampling_step=step,
            sampling_steps=total,
        ),
        current_image=None if skip_current_image or not preview else preview.split(",", 1)[-1],
    )
