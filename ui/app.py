"""The whole product in one app: the REST API with the arena at `/arena` and the studio at `/` (what `image-gen serve`
runs)."""

from __future__ import annotations

from fastapi import FastAPI

from image_gen.api.app import create_app
from image_gen.server import serve as serve_app
from image_gen.settings import Settings
from ui.arena import mount_arena
from ui.studio import mount_studio


def create_product_app(settings: Settings) -> FastAPI:
    def mount(app: FastAPI) -> FastAPI:
        app = mount_arena(app, app.state.arena, app.state.keys)  # first: the studio at `/` takes every path
        return mount_studio(app, app.state.service, app.state.submission, app.state.keys)

    return create_app(settings, mount_ui=mount)


def serve(settings: Settings) -> int:
    """`image-gen serve`: API, studio and in-process workers on one port."""
    return serve_app(settings, create_product_app)
