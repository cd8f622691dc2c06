"""A user's generated images, newest first, read back from the job store: searchable by prompt, paginated.

Nothing is kept in memory between calls, so history survives restarts and is the same on every API process.
"""

from __future__ import annotations

from dataclasses import dataclass

from image_gen.errors import ImageGenError
from image_gen.jobs import params_of
from image_gen.service import GenerationService
from pipelines.params import GenerationParams
from storage.queue import Job

PAGE_SIZE = 24
SCAN_BATCH = 50  # jobs read per store listing while filling a page


@dataclass(frozen=True)
class HistoryImage:
    """One stored image and the request that made it (`params.seed` is this image's seed, `num_images` 1)."""

    id: str
    job_id: str
    params: GenerationParams
    model_hash: str
    created_at: float

    @property
    def seed(self) -> int:
        assert self.params.seed is not None
        return self.params.seed


@dataclass(frozen=True)
class HistoryPage:
    """Images of whole jobs, newest first; pass `next_cursor` back for the next page (None: no more)."""

    images: list[HistoryImage]
    next_cursor: str | None


def images_of(job: Job) -> list[HistoryImage]:
    """The images of a succeeded job, in seed order; [] for any other job."""
    if job.status != "succeeded" or not job.result:
        return []
    try:
        params = params_of(job.payload)
    except ValueError:
        return []  # a job of another kind, or of a future payload version: not an image of this studio
    return [
        HistoryImage(
            id=record["id"],
            job_id=job.id,
            params=params.model_copy(
                update={
                    "seed": record["seed"],
                    "width": record["width"],
                    "height": record["height"],
                    "num_images": 1,
                }
            ),
            model_hash=job.result.get("content_hash", ""),
            created_at=job.created_at,
        )
        for record in job.result.get("images", [])
    ]


def matches(params: GenerationParams, query: str) -> bool:
    """Whether every word of `query` occurs in the prompt, ignoring case ("" matches everything)."""
    prompt = params.prompt.lower()
    return all(word in prompt for word in query.lower().split())


class History:
    """Pages of an owner's finished images. A page holds whole jobs: at most `limit` images, unless one job alone
    has more. Cursors are opaque strings: the store's listing cursor and how many jobs after it were consumed."""

    def __init__(self, service: GenerationService, *, scan_batch: int = SCAN_BATCH) -> None:
        self.service = service
        self.scan_batch = scan_batch

    def page(
        self, owner: str, query: str = "", *, limit: int = PAGE_SIZE, cursor: str | None = None
    ) -> HistoryPage:
        if limit < 1:
            raise ImageGenError(f"limit must be at least 1, got {limit}", param="limit")
        skip, listing = _parse_cursor(cursor)
        images: list[HistoryImage] = []
        while True:
            try:
                batch = self.service.jobs(owner, status="succeeded", limit=self.scan_batch, cursor=listing)
            except ValueError as error:  # a cursor of another owner, or mangled
                raise ImageGenError(str(error), param="cursor") from error
            for consumed, job in enumerate(batch.jobs[skip:], start=skip):
                found = images_of(job)
                if not found or not matches(found[0].params, query):
                    continue
                if images and len(images) + len(found) > limit:
                    return HistoryPage(images, _cursor(consumed, listing))
                images += found
            skip = 0
            if batch.next_cursor is None:
                return HistoryPage(images, None)
            listing = batch.next_cursor
            if len(images) >= limit:
                return HistoryPage(images, _cursor(0, listing))


def _cursor(skip: int, listing: str | None) -> str:
    return f"{skip}:{listing or ''}"


def _parse_cursor(cursor: str | None) -> tuple[int, str | None]:
    if not cursor:
        return 0, None
    skip, sep, listing = cursor.partition(":")
    if not sep or not skip.isdigit():
        raise ImageGenError(f"invalid history cursor {cursor!r}: pass back a next_cursor", param="cursor")
    return int(skip), listing or None
