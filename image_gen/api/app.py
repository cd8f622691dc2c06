"""The FastAPI application: REST API, the studio at `/`, and the workers (supervised child processes, or threads)
and webhook dispatcher of `image-gen serve`."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from image_gen import __version__
from image_gen.api import errors
from image_gen.api.routes import arena, health, images, jobs, models, sdapi, webhooks
from image_gen.api.schemas import JobView
from image_gen.api.submission import Submission
from image_gen.arena import Arena
from image_gen.auth import KeyStore, ServerSecret
from image_gen.errors import ImageGenError
from image_gen.limits import ConcurrencyQuota, RateLimiter
from image_gen.metrics import HttpMetrics, MeteredJobQueue, Metrics
from image_gen.runtime import build_registry
from image_gen.service import GenerationService
from image_gen.settings import Settings
from image_gen.supervisor import WorkerSupervisor
from image_gen.webhooks import WebhookDispatcher
from image_gen.worker import Worker
from storage.objects import open_store

log = logging.getLogger("image_gen.api")

DESCRIPTION = """Self-hostable text-to-image: OpenAI-compatible images API, async jobs with live progress and
webhooks, and the Stable Diffusion web UI API. With API keys configured every route but /healthz, /readyz and
/metrics needs `Authorization: Bearer <key>`. Errors are OpenAI-shaped: `{"error": {"message", "type", "param",
"code"}}`. Guide: docs/api.md."""


def create_app(settings: Settings, *, mount_ui: Callable[[FastAPI], FastAPI] | None = None) -> FastAPI:
    """The API app; while it serves, `settings.workers_in_process` workers run as child processes (or threads, with
    `worker_isolation="thread"`) and a webhook dispatcher in a thread. `mount_ui` adds the user interfaces on top
    (the `ui` package does: this layer does not import it)."""
    try:
        store = open_store(settings.store)
    except ValueError as error:
        raise ImageGenError(str(error), param="store") from error
    metrics = Metrics(queue_counts=lambda: queue.counts())
    queue = MeteredJobQueue(store, metrics, lease_s=settings.lease_s)
    registry = build_registry(settings, bootstrap=True)
    service = GenerationService(registry, store, queue, settings.default_model)
    secret = ServerSecret(store, settings.secret_key.get_secret_value() if settings.secret_key else None)
    dispatcher = WebhookDispatcher(
        store,
        queue,
        secret,
        lambda job: JobView.of(job, images=service.images_of(job.owner, job)).model_dump(mode="json"),
        allowed_networks=settings.webhook_allowed_networks,
        max_attempts=settings.webhook_max_attempts,
        backoff_s=settings.webhook_backoff_s,
        timeout_s=settings.webhook_timeout_s,
        poll_s=settings.webhook_poll_s,
        metrics=metrics,
    )
    limiter = RateLimiter()
    in_threads = settings.worker_isolation == "thread"
    workers = [
        Worker(queue, store, registry, max_batch=settings.max_batch)
        for _ in range(settings.workers_in_process if in_threads else 0)
    ]
    supervisor = None
    if not in_threads and settings.workers_in_process:
        supervisor = WorkerSupervisor(
            settings, settings.workers_in_process, nice=settings.worker_nice, on_finished=metrics.job_finished
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threads = [
            threading.Thread(target=w.run, name=f"worker-{i}", daemon=True) for i, w in enumerate(workers)
        ]
        for thread in threads:
            thread.start()
        if supervisor is not None:
            supervisor.start()
        dispatcher.start()
        log.info(
            "serving with %d worker %s on store %s",
            settings.workers_in_process,
            "thread(s)" if in_threads else f"process(es) at nice +{settings.worker_nice}",
            settings.store,
        )
        try:
            yield
        finally:
            dispatcher.stop()
            if supervisor is not None:
                supervisor.stop()
            for worker in workers:
                worker.stop()
            for thread in threads:
                thread.join(timeout=60)

    app = FastAPI(title="image-gen", version=__version__, lifespan=lifespan, description=DESCRIPTION)
    app.state.settings = settings
    app.state.service = service
    app.state.workers = workers
    app.state.supervisor = supervisor
    app.state.keys = KeyStore(store, cache_s=settings.auth_cache_s)
    app.state.secret = secret
    app.state.limiter = limiter
    app.state.metrics = metrics
    app.state.webhooks = dispatcher
    app.state.submission = Submission(service, settings, limiter, ConcurrencyQuota(store, queue), dispatcher)
    app.state.arena = Arena(service, settings, secret, limiter)
    errors.install(app)
    for module in (health, models, jobs, images, sdapi, webhooks, arena):
        app.include_router(module.router)
    errors.install_fallback(app)
    app.add_middleware(errors.BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetrics, metrics=metrics)
    return mount_ui(app) if mount_ui is not None else app
