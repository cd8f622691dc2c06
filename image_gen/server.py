"""`image-gen serve`: the whole product in one process (API, studio, in-process workers) under uvicorn."""

from __future__ import annotations

import ipaddress

import uvicorn

from image_gen.api.app import create_app
from image_gen.errors import ImageGenError
from image_gen.settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> int:
    if not is_loopback(settings.host):
        raise ImageGenError(
            f"refusing to listen on {settings.host}: without API keys the server is single-user and binds to "
            "loopback only (127.0.0.1 or ::1)",
            param="host",
        )
    app = create_app(settings)
    print(
        f"image-gen: studio and API on http://{settings.host}:{settings.port}/ (store {settings.store})",
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
