"""The FastAPI application: REST API, the studio at `/`, and the in-process workers of `image-gen serve`."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from image_gen import __version__
from image_gen.api import errors
from image_gen.api.routes import health, images, jobs, models
from image_gen.runtime import build_registry, open_queue
from image_gen.service import GenerationService
from image_gen.settings import Settings
from image_gen.worker import Worker

log = logging.getLogger("image_gen.api")


def create_app(settings: Settings, *, with_studio: bool = True) -> FastAPI:
    """One app for API and studio; `settings.workers_in_process` workers run in threads while it serves."""
    store, queue = open_queue(settings)
    registry = build_registry(settings, bootstrap=True)
    service = GenerationService(registry, store, queue, settings.default_model)
    workers = [
        Worker(queue, store, registry, max_batch=settings.max_batch)
        for _ in range(settings.workers_in_process)
    ]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threads = [
            threading.Thread(target=w.run, name=f"worker-{i}", daemon=True) for i, w in enumerate(workers)
        ]
        for thread in threads:
            thread.start()
        log.info("serving with %d in-process worker(s) on store %s", len(workers), settings.store)
        try:
            yield
        finally:
            for worker in workers:
                worker.stop()
            for thread in threads:
                thread.join(timeout=60)

    app = FastAPI(
        title="image-gen",
        version=__version__,
        lifespan=lifespan,
        description="Self-hostable text-to-image: OpenAI-compatible images API and async jobs.",
    )
    app.state.settings = settings
    app.state.service = service
    app.state.workers = workers
    errors.install(app)
    for module in (health, models, jobs, images):
        app.include_router(module.router)
    if with_studio:
        import gradio as gr

        from ui.studio import build_studio

        app = gr.mount_gradio_app(app, build_studio(service), path="/")
    return app
