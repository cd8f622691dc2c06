"""The generation service: what the API and the studio call to submit, follow, cancel and fetch image jobs.

It validates requests against the registry before they reach the queue, and enforces ownership: a job or image
of another owner is reported as not found. A request with `best_of` generates that many candidates and presents
the best `num_images` of them, ranked by a CLIP scorer against the prompt.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from image_gen.errors import ImageGenError
from image_gen.jobs import batch_key, image_prefix, job_payload
from pipelines.errors import PipelineError
from pipelines.params import MAX_IMAGES, GenerationParams, ModelInfo
from pipelines.registry import ModelRegistry
from storage.objects import NotFound, ObjectStore, PreconditionFailed
from storage.queue import Job, JobPage, JobQueue

if TYPE_CHECKING:
    from eval.clip import ClipScorer

SEED_RANGE = 2**32
BEST_OF = "best_of"
"""Payload field of a best-of job: {"keep": n}, the images presented out of params.num_images candidates."""


class JobNotFound(ImageGenError):
    """No such job or image for this owner."""


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str


class GenerationService:
    """Submit/inspect/cancel jobs and read their images, on behalf of an owner."""

    def __init__(self, registry: ModelRegistry, store: ObjectStore, queue: JobQueue,
                 default_model: str | None = None, scorer: Callable[[], ClipScorer] | None = None) -> None:
        """`scorer` returns the CLIP scorer that ranks best-of candidates (default: the bundled in-house CLIP,
        loaded on the first best-of request)."""
        self.registry = registry
        self.store = store
        self.queue = queue
        self.default_model = default_model
        self._scorer_factory = scorer or _bundled_scorer
        self._scorer: ClipScorer | None = None
        self._scorer_lock = threading.Lock()

    def models(self) -> list[ModelInfo]:
        return self.registry.list()

    def model(self, name: str | None = None) -> ModelInfo:
        """The named model, else the configured default, else the registry's."""
        name = name or self.default_model
        try:
            return self.registry.get(name) if name else self.registry.default()
        except PipelineError as error:
            raise ImageGenError.from_exception(error) from error

    def preset(self, name: str | None, preset: str | None) -> tuple[ModelInfo, dict[str, Any]]:
        """The model that `preset` of model `name` (None: the default model) runs, and the preset's values on top
        of that model's defaults (scheduler, steps, guidance_scale, width, height; negative_prompt where the preset
        sets one). A preset may name another model: the bundled student's Quality preset runs its teacher, the
        teacher's Speed preset the student. An unknown preset (or None) is the model's defaults."""
        info = self.model(name)
        chosen = dict(info.presets.get(preset, {})) if preset else {}
        target = chosen.pop("model", None)
        if target and target != info.name:
            info = self.model(target)
        values: dict[str, Any] = {
            "scheduler": info.default_scheduler,
            "steps": info.default_steps,
            "guidance_scale": info.default_guidance,
            "width": info.native_size,
            "height": info.native_size,
        }
        values.update(chosen)
        return info, values

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
        best_of: int | None = None,
        **extras: object,
    ) -> Job:
        """Queue a request; with `best_of`, that many candidates (seeds S, S+1, ...) of which the best
        `params.num_images` are presented (see `images_of`)."""
        if best_of is not None:
            self.check_best_of(best_of, params.num_images)
            self.scorer()  # a server that cannot rank refuses the request instead of failing it later
            extras[BEST_OF] = {"keep": params.num_images}
            params = params.model_copy(update={"num_images": best_of})
        resolved = self.resolve(params)
        return self.queue.submit(
            owner,
            job_payload(resolved, **extras),
            priority=priority,
            idempotency_key=idempotency_key,
            batch_key=batch_key(resolved),
        )

    @staticmethod
    def check_best_of(best_of: int, num_images: int) -> None:
        """best_of is the number of candidates, from num_images (every candidate kept) up to MAX_IMAGES."""
        if type(best_of) is not int or not num_images <= best_of <= MAX_IMAGES:
            raise ImageGenError(
                f"best_of {best_of!r} is not allowed: it is the number of candidates the {num_images} image(s) "
                f"are chosen from, a whole number from {num_images} to {MAX_IMAGES}",
                param="best_of",
            )

    def scorer(self) -> ClipScorer:
        """The CLIP scorer that ranks best-of candidates, loaded once."""
        with self._scorer_lock:
            if self._scorer is None:
                try:
                    self._scorer = self._scorer_factory()
                except (OSError, ValueError) as error:  # a missing or broken scorer folder
                    raise ImageGenError(
                        f"best_of is not available on this server: {error}", param="best_of",
                        code="model_load_failed",
                    ) from error
            return self._scorer

    @staticmethod
    def best_of(job: Job) -> int | None:
        """The number of candidates of a best-of job, else None."""
        return job.payload.get("params", {}).get("num_images") if BEST_OF in job.payload else None

    def images_of(self, owner: str, job: Job) -> list[dict]:
        """The image records a job presents: all of them, or for a succeeded best-of job its `keep` best by
        CLIPScore against the prompt, best first, each with its `clip_score`. The ranking is computed once and
        stored next to the images, so every later read presents the same images, even after the scorer changes."""
        records = (job.result or {}).get("images", [])
        selection = job.payload.get(BEST_OF)
        if selection is None or job.status != "succeeded" or not records:
            return records
        scores = self._candidate_scores(owner, job, records)
        ranked = sorted(zip(records, scores, strict=True), key=lambda pair: -pair[1])  # stable: ties keep order
        return [{**record, "clip_score": score} for record, score in ranked[: selection["keep"]]]

    def _candidate_scores(self, owner: str, job: Job, records: list[dict]) -> list[float]:
        key = image_prefix(owner, job.id) + "best-of.json"
        try:
            return json.loads(self.store.get(key).data)["scores"]
        except NotFound:
            pass
        from PIL import Image

        scorer = self.scorer()
        images = [Image.open(io.BytesIO(self.store.get(record["key"]).data)) for record in records]
        prompt = job.payload["params"]["prompt"]
        scores = [round(float(score), 4) for score in scorer.score(images, [prompt] * len(images))]
        ranking = {"scorer": scorer.identity(), "images": [r["id"] for r in records], "scores": scores}
        try:
            self.store.put_if_absent(key, json.dumps(ranking).encode(), "application/json")
        except PreconditionFailed:  # another process ranked it first: present its ranking
            return json.loads(self.store.get(key).data)["scores"]
        return scores

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


def _bundled_scorer() -> ClipScorer:
    from eval.clip import load_scorer

    return load_scorer()
