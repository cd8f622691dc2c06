"""`image-gen serve`: the whole product in one process (API, studio, in-process workers) under uvicorn.

Without API keys the server is single-user: it listens on loopback only unless told `--insecure`."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from image_gen.errors import ImageGenError
from image_gen.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("image_gen.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse a non-loopback address while no API key exists, unless `insecure` is set."""
    from image_gen.auth import KeyStore
    from storage.objects import open_store

    if is_loopback(settings.host):
        return
    try:
        has_keys = KeyStore(open_store(settings.store)).any()
    except ValueError as error:
        raise ImageGenError(str(error), param="store") from error
    if has_keys:
        return
    if not settings.insecure:
        raise ImageGenError(
            f"refusing to listen on {settings.host}: the store has no API keys, so anyone who reaches the server "
            "would use it as the single local user; create one with `image-gen keys create --name NAME`, listen "
            "on 127.0.0.1, or pass --insecure",
            param="host",
        )
    log.warning(
        "listening on %s without API keys (--insecure): anyone who reaches it can use it", settings.host
    )


def serve(settings: Settings, app_factory: Callable[[Settings], FastAPI] | None = None) -> int:
    """Serve the app that `app_factory` builds (default: the API alone) under uvicorn."""
    import uvicorn

    from image_gen.api.app import create_app

    check_exposure(settings)
    app = (app_factory or create_app)(settings)
    print(
        f"image-gen: studio and API on http://{settings.host}:{settings.port}/ (store {settings.store})",
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
