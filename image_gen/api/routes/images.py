"""OpenAI-compatible `POST /v1/images/generations` (submit and wait) and `GET /v1/images/{id}` (the owner, or
anyone holding a signed link that has not expired)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import time
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request, Response
from PIL import Image

from image_gen.api.deps import AppSettings, CurrentCaller, OptionalCaller, Service, Submit
from image_gen.api.errors import ERROR_RESPONSES, ErrorResponse
from image_gen.api.schemas import ImageData, ImageRequest, ImagesResponse
from image_gen.auth import ServerSecret
from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from storage.objects import S3ObjectStore

router = APIRouter(prefix="/v1/images", tags=["images"], responses=ERROR_RESPONSES)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ImageFormat = Annotated[str, Query(pattern="^(png|jpeg|webp)$", description="png (as stored), jpeg or webp")]


def convert(png: bytes, output_format: str, compression: int | None) -> bytes:
    """PNG as stored (parameters and all), or re-encoded; `compression` 0-100 as in OpenAI's API."""
    if output_format == "png":
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    quality = 100 - compression if compression is not None else 90
    image.save(buffer, format=output_format.upper(), quality=max(1, quality))
    return buffer.getvalue()


def _link_signature(secret: ServerSecret, image_id: str, output_format: str, expires: int) -> str:
    message = f"{image_id}|{output_format}|{expires}".encode()
    return hmac.new(secret.derive("image-link"), message, hashlib.sha256).hexdigest()


def image_link(
    request: Request,
    service: GenerationService,
    owner: str,
    image_id: str,
    output_format: str,
    expires_s: int,
) -> str:
    """A link that fetches the image without a key until it expires: presigned on S3 for PNGs, else our own
    signed `/v1/images/{id}` URL."""
    if output_format == "png" and isinstance(service.store, S3ObjectStore):
        return service.image_url(owner, image_id, expires_s)
    expires = int(time.time()) + expires_s
    settings = request.app.state.settings
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    query = urlencode(
        {
            "format": output_format,
            "expires": expires,
            "signature": _link_signature(request.app.state.secret, image_id, output_format, expires),
        }
    )
    return f"{base}/v1/images/{image_id}?{query}"


@router.post(
    "/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={504: {"model": ErrorResponse, "description": "the job outlasted request_timeout_s"}},
)
async def generate_images(
    body: ImageRequest,
    request: Request,
    caller: CurrentCaller,
    service: Service,
    submit: Submit,
    settings: AppSettings,
) -> ImagesResponse:
    """Generate and wait (up to the server's request_timeout_s): OpenAI's images API."""
    params = await asyncio.to_thread(body.generation_params, service)
    job = await submit.generate(caller, params, body.output_format, body.best_of)
    data = []
    for record in await asyncio.to_thread(service.images_of, caller.owner, job):
        if body.response_format == "url":
            url = await asyncio.to_thread(
                image_link,
                request,
                service,
                caller.owner,
                record["id"],
                body.output_format,
                settings.image_url_expires_s,
            )
            data.append(ImageData(url=url, clip_score=record.get("clip_score")))
        else:
            stored = await asyncio.to_thread(service.image, caller.owner, record["id"])
            encoded = await asyncio.to_thread(
                convert, stored.data, body.output_format, body.output_compression
            )
            data.append(
                ImageData(b64_json=base64.b64encode(encoded).decode(), clip_score=record.get("clip_score"))
            )
    params = job.payload["params"]
    return ImagesResponse(
        created=int(job.created_at),
        data=data,
        output_format=body.output_format,
        size=f"{params['width']}x{params['height']}",
        quality=body.quality or "auto",
    )


@router.get(
    "/{image_id}",
    name="get_image",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "the image"}
    },
)
def get_image(
    image_id: Annotated[str, Path(max_length=300)],
    service: Service,
    caller: OptionalCaller,
    request: Request,
    format: ImageFormat = "png",
    thumbnail: Annotated[bool, Query(description="a small WebP preview instead")] = False,
    expires: Annotated[int | None, Query(ge=0, description="of a signed link")] = None,
    signature: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description="of a signed link")] = None,
) -> Response:
    """The image as PNG (with its generation parameters), JPEG or WebP: for the key that made it, or through a
    signed link from `response_format=url`."""
    if signature is not None or expires is not None:
        expected = _link_signature(request.app.state.secret, image_id, format, expires or 0)
        if signature is None or not hmac.compare_digest(expected, signature) or (expires or 0) < time.time():
            raise ImageGenError(
                "the image link is invalid or has expired", param="signature", code="not_found"
            )
        owner = service.owner_of(image_id.rpartition("_")[0])
    elif caller is None:
        raise ImageGenError(
            "missing API key: send the header `Authorization: Bearer <key>`", code="missing_api_key"
        )
    else:
        owner = caller.owner
    stored = service.image(owner, image_id, thumbnail=thumbnail)
    if thumbnail:
        return Response(stored.data, media_type=stored.content_type)
    return Response(
        convert(stored.data, format, None),
        media_type=CONTENT_TYPES[format],
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
