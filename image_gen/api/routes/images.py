"""OpenAI-compatible `POST /v1/images/generations` (submit and wait) and the owner-only image download."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from PIL import Image

from image_gen.api.deps import AppSettings, Owner, Service
from image_gen.api.schemas import ImageRequest
from image_gen.errors import ImageGenError

router = APIRouter(prefix="/v1/images", tags=["images"])

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def convert(png: bytes, output_format: str, compression: int | None) -> bytes:
    """PNG as stored (parameters and all), or re-encoded; `compression` 0-100 as in OpenAI's API."""
    if output_format == "png":
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    quality = 100 - compression if compression is not None else 90
    image.save(buffer, format=output_format.upper(), quality=max(1, quality))
    return buffer.getvalue()


@router.post("/generations")
async def generate_images(
    body: ImageRequest, request: Request, service: Service, owner: Owner, settings: AppSettings
) -> dict:
    job = await asyncio.to_thread(
        service.submit, owner, body.generation_params(), output_format=body.output_format
    )
    job = await asyncio.to_thread(service.wait, owner, job.id, settings.request_timeout_s)
    if job.status == "succeeded":
        data = []
        for record in job.result["images"]:
            if body.response_format == "url":
                data.append(
                    {
                        "url": str(request.url_for("get_image", image_id=record["id"]))
                        + f"?format={body.output_format}"
                    }
                )
            else:
                stored = await asyncio.to_thread(service.image, owner, record["id"])
                encoded = convert(stored.data, body.output_format, body.output_compression)
                data.append({"b64_json": base64.b64encode(encoded).decode()})
        return {"created": int(job.created_at), "data": data, "output_format": body.output_format}
    if job.status in ("failed", "canceled"):
        raise ImageGenError(
            f"job {job.id} {job.status}: {job.error or 'no error text'}", code="generation_failed"
        )
    raise ImageGenError(
        f"job {job.id} is still {job.status} after {settings.request_timeout_s:g} s: poll "
        f"GET /v1/jobs/{job.id}",
        code="timeout",
    )


@router.get(
    "/{image_id}",
    name="get_image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
def get_image(
    image_id: str,
    service: Service,
    owner: Owner,
    format: Annotated[str, Query(pattern="^(png|jpeg|webp)$")] = "png",
    thumbnail: bool = False,
) -> Response:
    stored = service.image(owner, image_id, thumbnail=thumbnail)
    if thumbnail:
        return Response(stored.data, media_type=stored.content_type)
    return Response(
        convert(stored.data, format, None),
        media_type=CONTENT_TYPES[format],
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
