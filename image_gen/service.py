"""The generation service: what the API and the studio call to submit, follow, cancel and fetch image jobs.

It validates requests against the registry before they reach the queue, and enforces ownership: a job or image
of another owner is reported as not found.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

from image_gen.errors import ImageGenError
from image_gen.jobs import batch_key, job_payload
from pipelines.errors import PipelineError
from pipelines.params import GenerationParams, ModelInfo
from pipelines.registry import ModelRegistry
from storage.objects import NotFound, ObjectStore
from storage.queue import Job, JobPage, JobQueue

SEED_RANGE = 2**32


class JobNotFound(ImageGenError):
    """No such job or image for this owner."""


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str


class GenerationService:
    """Submit/inspect/cancel jobs and read their images, on behalf of an owner."""

    def __init__(self, registry: ModelRegistry, store: ObjectStore, queue: JobQueue,
                 default_model: str | None = None) -> None:
        self.registry = registry
        self.store = store
        self.queue = queue
        self.default_model = default_model

    def models(self) -> list[ModelInfo]:
        return self.registry.list()

    def model(self, name: str | None = None) -> ModelInfo:
        """The named model, else the configured default, else the registry's."""
        name = name or self.default_model
        try:
            return self.registry.get(name) if name else self.registry.default()
        except PipelineError as error:
            raise ImageGenError.from_exception(error) from error

    def resolve(self, params: GenerationParams) -> GenerationParams:
        """Every default filled in from the model and a random seed drawn; raises ImageGenError on bad input."""
        info = self.model(params.model)
        try:
            if params.seed is None:
                params = params.model_copy(update={"seed": secrets.randbelow(SEED_RANGE)})
            return info.resolve(params.model_copy(update={"model": info.name}))
        except PipelineError as error:
            raise ImageGenError.from_exception(error) from error

    def submit(
        self,
        owner: str,
        params: GenerationParams,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        **extras: object,
    ) -> Job:
        resolved = self.resolve(params)
        return self.queue.submit(
            owner,
            job_payload(resolved, **extras),
            priority=priority,
            idempotency_key=idempotency_key,
            batch_key=batch_key(resolved),
        )

    def job(self, owner: str, job_id: str) -> Job:
        try:
            job = self.queue.get(job_id)
        except NotFound:
            job = None
        if job is None or job.owner != owner:
            raise JobNotFound(f"no job {job_id!r}", param="id", code="not_found")
        return job

    def jobs(
        self, owner: str, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> JobPage:
        try:
            return self.queue.list(owner, status=status, limit=limit, cursor=cursor)
        except ValueError as error:  # a cursor from another owner or made up, an unknown status
            raise ImageGenError(str(error), param="cursor" if cursor else "status") from error

    def owner_of(self, job_id: str) -> str:
        """The owner of a job, for requests that prove their right to it otherwise (a signed image link)."""
        try:
            return self.queue.get(job_id).owner
        except NotFound:
            raise JobNotFound(f"no job {job_id!r}", param="id", code="not_found") from None

    def position(self, job: Job) -> int | None:
        return self.queue.position(job.id) if job.status == "queued" else None

    def cancel(self, owner: str, job_id: str) -> Job:
        self.job(owner, job_id)
        return self.queue.cancel(job_id, owner)

    def follow(
        self, owner: str, job_id: str, *, poll_s: float = 0.2, timeout_s: float | None = None
    ) -> Iterator[Job]:
        """The job each time it changes, until it finishes or `timeout_s` passes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        version = -1
        while True:
            job = self.job(owner, job_id)
            if job.version != version:
                version = job.version
                yield job
            if job.finished or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(poll_s)

    def wait(self, owner: str, job_id: str, timeout_s: float) -> Job:
        *_, last = self.follow(owner, job_id, timeout_s=timeout_s)
        return last

    def _image_record(self, owner: str, image_id: str) -> dict:
        job_id, _, index = image_id.rpartition("_")
        job = self.job(owner, job_id) if job_id and index.isdigit() else None
        records = (job.result or {}).get("images", []) if job is not None else []
        record = next((r for r in records if r["id"] == image_id), None)
        if record is None:
            raise JobNotFound(f"no image {image_id!r}", param="id", code="not_found")
        return record

    def image(self, owner: str, image_id: str, *, thumbnail: bool = False) -> StoredImage:
        """An image of the owner's finished job, by its id `<job id>_<index>`."""
        key = self._image_record(owner, image_id)["key"]
        if thumbnail:
            return StoredImage(self.store.get(key.removesuffix(".png") + ".thumb.webp").data, "image/webp")
        return StoredImage(self.store.get(key).data, "image/png")

    def image_url(self, owner: str, image_id: str, expires_s: int = 3600) -> str:
        """A URL for the image: presigned and expiring on S3, a file URL on a local store."""
        return self.store.url(self._image_record(owner, image_id)["key"], expires_s)
