"""The worker: claims jobs from the queue, batches compatible ones, generates, publishes images, completes.

Execution is at least once (leases expire and are reclaimed) and completion at most once (the queue's conditional
writes); images are written before the completion that publishes them and deleted again if it is refused.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from image_gen.jobs import batch_key, image_key, params_of, thumbnail_key
from image_gen.records import png_bytes
from pipelines.errors import GenerationCanceled, PipelineError
from pipelines.params import GenerationParams
from pipelines.registry import ModelRegistry
from pipelines.text2image import StepEvent, Text2ImagePipeline
from storage.objects import ObjectStore, StorageError
from storage.queue import JobCanceled, JobQueue, Lease, LeaseLost

log = logging.getLogger("image_gen.worker")

THUMBNAIL_SIZE = 256
PREVIEW_SIZE = 96


@dataclass
class _Running:
    """One claimed job inside a batch: its lease, resolved parameters and the rows of the batch it owns."""

    lease: Lease
    params: GenerationParams
    rows: range
    canceled: bool = False
    lost: bool = False
    last_beat: float = field(default_factory=time.monotonic)

    @property
    def live(self) -> bool:
        return not (self.canceled or self.lost)


class Worker:
    """Claims and runs jobs until stopped. One Worker per device; any number of them on any number of machines."""

    def __init__(
        self,
        queue: JobQueue,
        store: ObjectStore,
        registry: ModelRegistry,
        *,
        worker_id: str | None = None,
        max_batch: int = 4,
        heartbeat_s: float = 1.0,
        idle_poll_s: float = 0.25,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.queue = queue
        self.store = store
        self.registry = registry
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.max_batch = max_batch
        self.heartbeat_s = heartbeat_s
        self.idle_poll_s = idle_poll_s
        self.max_backoff_s = max_backoff_s
        self.stopping = threading.Event()

    def run(self) -> None:
        """Claim and run batches until `stop()`; a store outage backs off exponentially instead of crashing."""
        backoff = self.idle_poll_s
        while not self.stopping.is_set():
            try:
                done = self.run_once()
                backoff = self.idle_poll_s
            except StorageError as error:
                log.warning("store unavailable (%s); retrying in %.1f s", error, backoff)
                done = 0
                backoff = min(self.max_backoff_s, backoff * 2)
            except Exception as error:
                log.exception("worker loop error: %s", error)
                done = 0
                backoff = min(self.max_backoff_s, backoff * 2)
            if not done:
                self.stopping.wait(backoff)

    def stop(self) -> None:
        """Stop claiming; the batch in progress finishes first."""
        self.stopping.set()

    def run_once(self) -> int:
        """Claim one batch (up to `max_batch` compatible jobs), run it, publish it. Returns the number of jobs."""
        first = self.queue.claim(self.worker_id, limit=1)
        if not first:
            return 0
        leases = first
        key = first[0].job.batch_key
        if self.max_batch > 1 and key is not None:
            leases += self.queue.claim(self.worker_id, limit=self.max_batch - 1, match=key)
        self.run_batch(leases)
        return len(leases)

    def run_batch(self, leases: list[Lease]) -> None:
        batch: list[_Running] = []
        for lease in leases:
            try:
                params = params_of(lease.job.payload)
            except ValueError as error:
                self._fail(lease, f"invalid job payload: {error}", retryable=False)
                continue
            start = sum(len(job.rows) for job in batch)
            batch.append(_Running(lease, params, range(start, start + params.num_images)))
        if not batch:
            return
        try:
            pipe = self.registry.load(batch[0].params.model)
        except PipelineError as error:
            for job in batch:
                self._fail(job.lease, str(error), retryable=False)
            return
        try:
            images, timings = self._generate(pipe, batch)
        except GenerationCanceled:
            return  # every job of the batch was canceled or lost; the queue already records that
        except PipelineError as error:
            for job in batch:
                if job.live:
                    self._fail(job.lease, str(error), retryable=False)
            return
        except Exception as error:
            log.exception("generation failed")
            for job in batch:
                if job.live:
                    self._fail(job.lease, f"{type(error).__name__}: {error}", retryable=True)
            return
        for job in batch:
            if job.live:
                self._publish(job, pipe, images[job.rows.start : job.rows.stop], timings)

    def _generate(self, pipe: Text2ImagePipeline, batch: list[_Running]) -> tuple[list[Image.Image], dict]:
        first = batch[0].params
        prompts, negatives, seeds = [], [], []
        for job in batch:
            prompts += [job.params.prompt] * job.params.num_images
            negatives += [job.params.negative_prompt] * job.params.num_images
            seeds += [job.params.seed + i for i in range(job.params.num_images)]
        started = time.perf_counter()
        images = pipe(
            prompts,
            negatives,
            seeds,
            first.width,
            first.height,
            first.steps,
            first.guidance_scale,
            first.scheduler,
            callback=self._on_step(batch),
        )
        return images, {"seconds": time.perf_counter() - started, "batch_images": len(images)}

    def _on_step(self, batch: list[_Running]) -> Callable[[StepEvent], None]:
        def on_step(event: StepEvent) -> None:
            now = time.monotonic()
            final = event.step == event.total
            for job in batch:
                if not job.live or (not final and event.step > 1 and now - job.last_beat < self.heartbeat_s):
                    continue
                progress = {
                    "step": event.step,
                    "total": event.total,
                    "preview": _preview(event, job.rows.start),
                }
                try:
                    job.lease = self.queue.heartbeat(job.lease, progress)
                    job.last_beat = now
                except JobCanceled:
                    job.canceled = True
                except LeaseLost:
                    job.lost = True
            if not any(job.live for job in batch):
                raise GenerationCanceled("every job in the batch was canceled")

        return on_step

    def _publish(
        self, job: _Running, pipe: Text2ImagePipeline, images: list[Image.Image], timings: dict
    ) -> None:
        owner, job_id, params = job.lease.job.owner, job.lease.job.id, job.params
        written: list[str] = []
        records = []
        run = {"device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
               **pipe.optimizations.to_dict(), "job_id": job_id}
        try:
            for index, image in enumerate(images):
                seed = params.seed + index
                one = params.model_copy(update={"seed": seed, "num_images": 1})
                key = image_key(owner, job_id, index)
                self.store.put(key, png_bytes(image, one, pipe.info, run), "image/png")
                written.append(key)
                thumb = io.BytesIO()
                preview = image.copy()
                preview.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                preview.save(thumb, format="WEBP", quality=80)
                self.store.put(thumbnail_key(owner, job_id, index), thumb.getvalue(), "image/webp")
                written.append(thumbnail_key(owner, job_id, index))
                records.append(
                    {
                        "id": f"{job_id}_{index}",
                        "key": key,
                        "seed": seed,
                        "width": image.width,
                        "height": image.height,
                    }
                )
            self.queue.complete(
                job.lease,
                {
                    "images": records,
                    "model": pipe.info.name,
                    "content_hash": pipe.info.content_hash,
                    "attention": pipe.optimizations.attention,
                    **timings,
                },
            )
        except (JobCanceled, LeaseLost):
            self._discard(written)
        except StorageError as error:
            self._discard(written)
            self._fail(job.lease, f"could not store the images: {error}", retryable=True)

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except StorageError:
                log.warning("could not delete unpublished image %s", key)

    def _fail(self, lease: Lease, error: str, retryable: bool) -> None:
        with contextlib.suppress(JobCanceled, LeaseLost):
            self.queue.fail(lease, error, retryable=retryable)


def _preview(event: StepEvent, row: int) -> str:
    """A small JPEG of the current latents (no VAE), as a data URL for progress events."""
    image = event.preview(row)
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_worker(settings: Any) -> int:
    """`image-gen worker`: run one worker in the foreground; SIGTERM/SIGINT stop claiming, finish, exit 0."""
    from image_gen.runtime import build_registry, open_queue

    store, queue = open_queue(settings)
    worker = Worker(queue, store, build_registry(settings, bootstrap=True), max_batch=settings.max_batch)

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current batch, then exiting", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("worker %s on %s", worker.worker_id, settings.store)
    worker.run()
    return 0


__all__ = ["Worker", "batch_key", "run_worker"]
