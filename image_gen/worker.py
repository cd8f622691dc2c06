"""The worker: claims jobs from the queue, batches compatible ones, generates, publishes images, completes.

Execution is at least once (leases expire and are reclaimed) and completion at most once (the queue's conditional
writes). Images are written under the claim's fencing token before the completion that publishes them, and deleted
again if it is refused; a store outage makes the worker back off and retry, never exit.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
import weakref
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
# What a store outage raises (the local store turns its OSErrors into StorageErrors too).
STORE_ERRORS = (StorageError,)

# A pipeline is not thread-safe (its prompt cache, VAE tiling switch and offload hooks are shared state): worker
# threads that share a registry take turns on each pipeline, while they may run different models at once.
_pipeline_locks: weakref.WeakKeyDictionary[Text2ImagePipeline, threading.Lock] = weakref.WeakKeyDictionary()
_pipeline_locks_guard = threading.Lock()


def pipeline_lock(pipe: Text2ImagePipeline) -> threading.Lock:
    """The lock a worker holds while it runs `pipe`."""
    with _pipeline_locks_guard:
        return _pipeline_locks.setdefault(pipe, threading.Lock())


@dataclass
class _Running:
    """One claimed job of a batch: its lease, which only the lease keeper updates while it runs, and its params."""

    lease: Lease
    params: GenerationParams
    canceled: bool = False
    lost: bool = False
    last_beat: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.lease.job.id

    @property
    def live(self) -> bool:
        return not (self.canceled or self.lost)


_Step = tuple[StepEvent, dict[str, int]]  # a denoising step and the first row of each job in the generation


@dataclass
class _Published:
    """Images written for a job, and the result that its completion publishes."""

    keys: list[str]
    result: dict[str, Any]


@dataclass
class _Failed:
    """Why a job failed, whether another attempt may succeed, and the images it had written (to delete)."""

    error: str
    retryable: bool
    keys: list[str] = field(default_factory=list)


class _LeaseKeeper:
    """Holds a batch's leases from a background thread while the worker loads the model, generates and uploads.

    Every `heartbeat_s` it heartbeats each job (with its latest progress), so that no lease lapses during a slow
    model load, decode or upload; after every denoising step but the last it checks each job for cancellation
    (one read, during the next step), and the next step waits for that check, so that a canceled job stops within
    one step. Store errors are logged and otherwise ignored here: the completion decides. Only this thread writes
    the leases until `close()`.
    """

    def __init__(self, queue: JobQueue, jobs: list[_Running], heartbeat_s: float) -> None:
        self.queue = queue
        self.jobs = jobs
        self.heartbeat_s = heartbeat_s
        self._changed = threading.Condition()
        self._step: _Step | None = None  # a step awaiting its cancellation check
        self._latest: _Step | None = None  # the latest step, whose progress the heartbeats publish
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def callback(self, jobs: list[_Running]) -> Callable[[StepEvent], None]:
        """The step callback of one generation of `jobs` (some of the batch, in the order of their rows)."""
        rows, row = {}, 0
        for job in jobs:
            rows[job.id] = row
            row += job.params.num_images

        def on_step(event: StepEvent) -> None:
            with self._changed:
                self._changed.wait_for(lambda: self._step is None or self._closed)
                if not any(job.live for job in jobs):
                    raise GenerationCanceled("every job of the batch was canceled or taken over")
                self._latest = (event, rows)
                if event.step < event.total:  # after the last step, the completion notices a cancel
                    self._step = self._latest
                    self._changed.notify_all()

        return on_step

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._step is not None, self._until_beat())
                if self._closed:
                    return
                step, latest = self._step, self._latest
            try:
                self._check(step, latest)
            except Exception:
                log.exception("lease keeper error")
            finally:
                with self._changed:
                    if self._step is step:
                        self._step = None
                    self._changed.notify_all()

    def _until_beat(self) -> float | None:
        beats = [job.last_beat + self.heartbeat_s for job in self.jobs if job.live]
        return max(0.0, min(beats) - time.monotonic()) if beats else None

    def _check(self, step: _Step | None, latest: _Step | None) -> None:
        """Heartbeat the jobs that are due, with the latest progress; check the others of `step` for a cancel."""
        event, rows = latest if latest is not None else (None, {})
        now = time.monotonic()
        for job in self.jobs:
            due = now - job.last_beat >= self.heartbeat_s
            if not job.live or not (due or (step is not None and job.id in step[1])):
                continue
            try:
                if due:
                    row = rows.get(job.id)
                    progress = None if event is None or row is None else {
                        "step": event.step, "total": event.total, "preview": _preview(event, row)
                    }
                    job.lease, job.last_beat = self.queue.heartbeat(job.lease, progress), now
                else:
                    self._check_canceled(job)
            except JobCanceled:
                job.canceled = True
            except LeaseLost:
                job.lost = True
            except STORE_ERRORS as error:
                job.last_beat = now  # try again in heartbeat_s, not in a tight loop
                log.warning("could not reach the store for job %s: %s", job.id, error)

    def _check_canceled(self, job: _Running) -> None:
        """One read of the record; a requested cancel is recorded by a heartbeat, which raises JobCanceled."""
        current = self.queue.get(job.id)
        if current.status != "running" or current.token != job.lease.token:
            raise LeaseLost(f"job {job.id} is {current.status} with token {current.token}")
        if current.cancel_requested:
            job.lease = self.queue.heartbeat(job.lease)


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
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
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
        """Claim and run batches until `stop()`. Errors (a store outage) back off exponentially, with jitter so that
        workers that lost the store together do not come back together, up to `max_backoff_s`."""
        backoff = self.idle_poll_s
        while not self.stopping.is_set():
            try:
                done = self.run_once()
            except STORE_ERRORS as error:
                log.warning("store unavailable (%s); retrying in about %.1f s", error, backoff)
            except Exception:
                log.exception("worker error; retrying in about %.1f s", backoff)
            else:
                backoff = self.idle_poll_s
                if not done:
                    self.stopping.wait(self.idle_poll_s)
                continue
            self.stopping.wait(backoff * random.uniform(0.5, 1.0))
            backoff = min(self.max_backoff_s, backoff * 2)

    def stop(self) -> None:
        """Stop claiming; the batch in progress finishes first."""
        self.stopping.set()

    def run_once(self) -> int:
        """Claim one batch (up to `max_batch` compatible jobs), run it, publish it. Returns the number of jobs."""
        leases = self.queue.claim(self.worker_id, limit=1)
        if not leases:
            return 0
        key = leases[0].job.batch_key
        if self.max_batch > 1 and key is not None and not self.stopping.is_set():
            try:
                leases += self.queue.claim(self.worker_id, limit=self.max_batch - 1, match=key)
            except STORE_ERRORS as error:
                log.warning("could not claim more jobs for the batch: %s", error)
        self.run_batch(leases)
        return len(leases)

    def run_batch(self, leases: list[Lease]) -> None:
        """Run claimed jobs as one batch and publish each job's images. A batch of several jobs that fails is run
        again one job at a time, so that a poison job fails alone."""
        jobs: list[_Running] = []
        for lease in leases:
            try:
                jobs.append(_Running(lease, params_of(lease.job.payload)))
            except ValueError as error:
                self._fail(lease, f"invalid job payload: {error}", retryable=False)
        if not jobs:
            return
        keeper = _LeaseKeeper(self.queue, jobs, self.heartbeat_s)
        try:
            outcomes = self._run(jobs, keeper)
        finally:
            keeper.close()
        for job in jobs:
            self._finish(job, outcomes.get(job.id))

    def _run(self, jobs: list[_Running], keeper: _LeaseKeeper) -> dict[str, _Published | _Failed]:
        try:
            pipe = self.registry.load(jobs[0].params.model)
        except PipelineError as error:
            # Retried: another worker may have the model, or the next load may succeed; then dead-lettered.
            return {job.id: _Failed(str(error), retryable=True) for job in jobs}
        try:
            images, seconds = self._generate(pipe, jobs, keeper)
        except GenerationCanceled:
            return {}
        except Exception as error:
            live = [job for job in jobs if job.live]
            if len(live) > 1:
                log.warning("a batch of %d jobs failed (%s): running them one at a time", len(live), error)
                return {job_id: outcome for job in live for job_id, outcome in self._run([job], keeper).items()}
            if isinstance(error, PipelineError):  # the request itself is invalid: retrying cannot help
                return {job.id: _Failed(str(error), retryable=False) for job in live}
            log.exception("job %s failed", jobs[0].id)
            return {job.id: _Failed(f"{type(error).__name__}: {error}", retryable=True) for job in live}
        outcomes: dict[str, _Published | _Failed] = {}
        row = 0
        for job in jobs:
            own = images[row : row + job.params.num_images]
            row += job.params.num_images
            if job.live:
                outcomes[job.id] = self._upload(job, pipe, own, {"seconds": seconds, "batch_images": len(images)})
        return outcomes

    def _generate(
        self, pipe: Text2ImagePipeline, jobs: list[_Running], keeper: _LeaseKeeper
    ) -> tuple[list[Image.Image], float]:
        first = jobs[0].params
        prompts, negatives, seeds = [], [], []
        for job in jobs:
            assert job.params.seed is not None
            prompts += [job.params.prompt] * job.params.num_images
            negatives += [job.params.negative_prompt] * job.params.num_images
            seeds += [job.params.seed + i for i in range(job.params.num_images)]
        with pipeline_lock(pipe):
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
                callback=keeper.callback(jobs),
            )
            return images, time.perf_counter() - started

    def _upload(
        self, job: _Running, pipe: Text2ImagePipeline, images: list[Image.Image], timings: dict[str, Any]
    ) -> _Published | _Failed:
        owner, job_id, token, params = job.lease.job.owner, job.id, job.lease.token, job.params
        assert params.seed is not None
        run = {"device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
               **pipe.optimizations.to_dict(), "job_id": job_id}
        written: list[str] = []
        records = []
        try:
            for index, image in enumerate(images):
                seed = params.seed + index
                one = params.model_copy(update={"seed": seed, "num_images": 1})
                key = image_key(owner, job_id, token, index)
                self.store.put(key, png_bytes(image, one, pipe.info, run), "image/png")
                written.append(key)
                thumb = io.BytesIO()
                preview = image.copy()
                preview.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                preview.save(thumb, format="WEBP", quality=80)
                thumb_key = thumbnail_key(owner, job_id, token, index)
                self.store.put(thumb_key, thumb.getvalue(), "image/webp")
                written.append(thumb_key)
                records.append(
                    {"id": f"{job_id}_{index}", "key": key, "seed": seed, "width": image.width,
                     "height": image.height}
                )
        except STORE_ERRORS as error:
            return _Failed(f"could not store the images: {error}", retryable=True, keys=written)
        result = {
            "images": records,
            "model": pipe.info.name,
            "content_hash": pipe.info.content_hash,
            "attention": pipe.optimizations.attention,
            **timings,
        }
        return _Published(written, result)

    def _finish(self, job: _Running, outcome: _Published | _Failed | None) -> None:
        """Complete or fail the job (the keeper has stopped, so its lease is ours to write)."""
        keys = outcome.keys if outcome is not None else []
        if not job.live or outcome is None:
            self._discard(keys)
        elif isinstance(outcome, _Failed):
            self._discard(keys)
            self._fail(job.lease, outcome.error, outcome.retryable)
        else:
            try:
                self.queue.complete(job.lease, outcome.result)
            except (JobCanceled, LeaseLost):
                self._discard(keys)
            except STORE_ERRORS as error:
                # The completion may have landed; if not, the lease expires and the job runs again.
                log.warning("could not complete job %s: %s", job.id, error)

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except STORE_ERRORS:
                log.warning("could not delete unpublished image %s", key)

    def _fail(self, lease: Lease, error: str, retryable: bool) -> None:
        try:
            self.queue.fail(lease, error, retryable=retryable)
        except (JobCanceled, LeaseLost):
            pass
        except STORE_ERRORS as store_error:
            log.warning("could not record the failure of job %s (%s): %s", lease.job.id, error, store_error)


def _preview(event: StepEvent, row: int) -> str:
    """A small JPEG of the current latents (no VAE), as a data URL for progress events."""
    image = event.preview(row)
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_worker(settings: Any, on_finished: Callable[[str, dict[str, Any] | None], None] | None = None) -> int:
    """`image-gen worker`: run one worker in the foreground. SIGTERM or SIGINT: stop claiming, finish the batch in
    progress, exit 0; a second signal exits at once. `on_finished(status, result)` hears of every job it finishes
    (the worker processes of `image-gen serve` report them to the server's metrics)."""
    from image_gen.metrics import ReportingJobQueue
    from image_gen.runtime import build_registry, open_queue

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker: Worker | None = None
    stop_requested = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current batch, then exiting", signum)
        signal.signal(signum, signal.SIG_DFL)
        stop_requested.set()
        if worker is not None:
            worker.stop()

    # Before the slow part (imports, model bootstrap), so that a signal during it also exits 0.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    store, queue = open_queue(settings)
    if on_finished is not None:
        queue = ReportingJobQueue(store, on_finished, lease_s=settings.lease_s)
    worker = Worker(queue, store, build_registry(settings, bootstrap=True), max_batch=settings.max_batch)
    if stop_requested.is_set():
        return 0
    log.info("worker %s on %s", worker.worker_id, settings.store)
    worker.run()
    log.info("worker %s stopped", worker.worker_id)
    return 0


__all__ = ["Worker", "batch_key", "run_worker"]
