"""What every generated image carries: the A1111-style `parameters` text and our JSON record of the request."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL.Image import Image

from image_gen import __version__
from pipelines.params import GenerationParams, ModelInfo
from pipelines.schedulers import scheduler_label
from storage.pnginfo import format_parameters, write_png


def image_metadata(image: Image, request: GenerationParams, model: ModelInfo,
                   run: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The `parameters` text and the JSON record of one image; `request` is its own (its seed, one image) and
    `run` what else decided the pixels (device, dtype, attention, ...)."""
    import diffusers
    import torch

    assert request.scheduler and request.steps and request.width and request.height
    assert request.guidance_scale is not None and request.seed is not None
    text = format_parameters(
        request.prompt, request.negative_prompt, steps=request.steps, sampler=scheduler_label(request.scheduler),
        cfg_scale=request.guidance_scale, seed=request.seed, width=request.width, height=request.height,
        model_hash=model.content_hash, model=model.name, extra={"Version": f"image-gen {__version__}"},
    )
    record = {
        "request": request.model_dump(mode="json"),
        **run,
        "content_sha256": model.content_sha256,
        "pixels_sha256": hashlib.sha256(image.convert("RGB").tobytes()).hexdigest(),
        # pipelines/ ships inside image-gen; torch and diffusers versions also decide the pixels.
        "pipeline_version": __version__,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }
    return text, record


def png_bytes(image: Image, request: GenerationParams, model: ModelInfo, run: dict[str, Any]) -> bytes:
    text, record = image_metadata(image, request, model, run)
    buffer = io.BytesIO()
    write_png(image, buffer, text, record)
    return buffer.getvalue()
