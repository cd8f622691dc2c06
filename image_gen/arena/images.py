"""Arena images: generated through the job queue, once per (model weights, settings, prompt, seed).

The pipeline is deterministic, so an image is addressed by the SHA-256 of everything that decides its pixels: the
resolved request and the model's content hash. `arena/images/<digest>.json` names the job that makes it; any
battle that needs the same image reuses that job, whichever process started it. Images are served to voters with
their metadata stripped, since the PNG text names the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import OrderedDict
from typing import Any

from PIL import Image

from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from image_gen.settings import ArenaContender
from pipelines.params import GenerationParams, ModelInfo
from storage.objects import NotFound, PreconditionFailed
from storage.queue import Job

OWNER = "arena"  # the queue owner of arena jobs: fair share keeps voters from starving the studio and the API
IMAGES = "arena/images/"
MODEL_INFO_S = 30.0  # how long a model's description and content hash are trusted before asking the registry
_PNG_CACHE = 256
_JOB_CACHE = 20_000
_CAS_TRIES = 8


class _Recent(OrderedDict[str, Any]):
    """A dict that forgets its least recently used entries beyond `size`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class BattleImages:
    """Find or start the job that makes a contender's image; read it back without metadata."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._models: dict[str, tuple[float, ModelInfo]] = {}
        self._succeeded: _Recent = _Recent(_JOB_CACHE)  # job id -> Job: a finished job never changes again
        self._known: _Recent = _Recent(_JOB_CACHE)  # digest -> the id of a job that made the image
        self._pngs: _Recent = _Recent(_PNG_CACHE)  # job id -> PNG without metadata

    def model(self, name: str) -> ModelInfo:
        now = time.monotonic()
        with self._lock:
            hit = self._models.get(name)
        if hit is not None and now - hit[0] < MODEL_INFO_S:
            return hit[1]
        info = self.service.model(name)
        with self._lock:
            self._models[name] = (now, info)
        return info

    def request(self, contender: ArenaContender, prompt: str, seed: int) -> GenerationParams:
        """The contender's fully resolved request for one image; raises ImageGenError if the model refuses it."""
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=contender.negative_prompt,
            model=contender.model,
            width=contender.width,
            height=contender.height,
            steps=contender.steps,
            guidance_scale=contender.guidance_scale,
            scheduler=contender.scheduler,
            seed=seed,
        )
        try:
            return self.model(contender.model).resolve(params)
        except Exception as error:
            raise ImageGenError.from_exception(error) from error

    def job_for(self, contender: ArenaContender, prompt: str, seed: int) -> str:
        """The id of a job that made, or is making, this image: an earlier one unless it failed or was canceled."""
        request = self.request(contender, prompt, seed)
        identity = {
            "request": request.model_dump(mode="json"),
            "model": self.model(contender.model).content_hash,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        with self._lock:
            known = self._known.get(digest)
        if known is not None:
            return known
        key = f"{IMAGES}{digest}.json"
        store = self.service.store
        for _ in range(_CAS_TRIES):
            try:
                stored = store.get(key)
            except NotFound:
                stored = None
            if stored is not None:
                job = self._job_or_none(json.loads(stored.data)["job"])
                if job is not None and job.status == "succeeded":
                    with self._lock:
                        self._known[digest] = job.id
                if job is not None and job.status not in ("failed", "canceled"):
                    return job.id
            fresh = self.service.submit(OWNER, request)
            record = json.dumps({"job": fresh.id, "contender": contender.name}).encode()
            try:
                if stored is None:
                    store.put_if_absent(key, record, "application/json")
                else:
                    store.put_if_match(key, record, stored.etag, "application/json")
                return fresh.id
            except (PreconditionFailed, NotFound):
                self.service.cancel(
                    OWNER, fresh.id
                )  # another battle started the same image first: use theirs
        raise ImageGenError("too many concurrent requests for one arena image", code="conflict")

    def _job_or_none(self, job_id: str) -> Job | None:
        try:
            return self.job(job_id)
        except ImageGenError:
            return None

    def job(self, job_id: str) -> Job:
        with self._lock:
            done = self._succeeded.get(job_id)
        if done is not None:
            return done
        job = self.service.job(OWNER, job_id)
        if job.status == "succeeded":
            with self._lock:
                self._succeeded[job_id] = job
        return job

    def png(self, job_id: str) -> bytes:
        """The job's image as a PNG without text chunks (which name the model and its settings)."""
        with self._lock:
            cached = self._pngs.get(job_id)
        if cached is not None:
            return cached
        stored = self.service.image(OWNER, f"{job_id}_0")
        with Image.open(io.BytesIO(stored.data)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
        data = buffer.getvalue()
        with self._lock:
            self._pngs[job_id] = data
        return data
