"""History: an owner's finished images read back from the job store, newest first, by prompt, page by page."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_gen.errors import ImageGenError
from image_gen.history import History
from image_gen.jobs import job_payload
from image_gen.service import GenerationService
from pipelines.params import GenerationParams
from storage.objects import LocalObjectStore
from storage.queue import JobQueue

# History reads jobs through the service only; no model is needed.
NO_REGISTRY = None


def _history(root: Path, **options: int) -> tuple[History, JobQueue]:
    store = LocalObjectStore(root)
    queue = JobQueue(store)
    return History(GenerationService(NO_REGISTRY, store, queue), **options), queue  # type: ignore[arg-type]


def _finish(
    queue: JobQueue, owner: str, prompt: str, *, images: int = 1, seed: int = 100, status: str = "succeeded"
) -> str:
    """Queue a job and take it to `status` as a worker would (without generating anything)."""
    params = GenerationParams(
        prompt=prompt,
        model="tiny-sd",
        width=32,
        height=32,
        steps=2,
        guidance_scale=7.0,
        scheduler="ddim",
        seed=seed,
        num_images=images,
    )
    job = queue.submit(owner, job_payload(params))
    if status == "canceled":
        queue.cancel(job.id, owner)
        return job.id
    if status == "queued":
        return job.id
    [lease] = queue.claim("worker-1")
    assert lease.job.id == job.id
    if status == "failed":
        queue.fail(lease, "model failed to load", retryable=False)
        return job.id
    records = [
        {
            "id": f"{job.id}_{i}",
            "key": f"images/{owner}/{job.id}/1/{i}.png",
            "seed": seed + i,
            "width": 32,
            "height": 32,
        }
        for i in range(images)
    ]
    queue.complete(lease, {"images": records, "model": "tiny-sd", "content_hash": "4b02784f5b"})
    return job.id


def test_history_lists_the_owners_images_newest_first_and_no_one_elses(tmp_path: Path) -> None:
    history, queue = _history(tmp_path)
    first = _finish(queue, "alice", "a red circle", images=2, seed=7)
    _finish(queue, "bob", "bob's blue square")
    second = _finish(queue, "alice", "a green triangle", seed=40)

    page = history.page("alice")

    assert [image.id for image in page.images] == [f"{second}_0", f"{first}_0", f"{first}_1"]
    assert [image.seed for image in page.images] == [40, 7, 8]
    assert all(image.params.num_images == 1 for image in page.images)
    assert page.images[1].params.prompt == "a red circle"
    assert page.images[1].model_hash == "4b02784f5b"
    assert page.next_cursor is None
    assert [image.params.prompt for image in history.page("bob").images] == ["bob's blue square"]
    assert history.page("carol").images == []


def test_only_succeeded_jobs_are_history(tmp_path: Path) -> None:
    history, queue = _history(tmp_path)
    kept = _finish(queue, "alice", "kept")
    for status in ("failed", "canceled", "queued"):
        _finish(queue, "alice", status, status=status)

    assert [image.job_id for image in history.page("alice").images] == [kept]


def test_search_matches_every_word_of_the_prompt_ignoring_case(tmp_path: Path) -> None:
    history, queue = _history(tmp_path)
    for prompt in ("A red circle left of a blue square", "a red square", "a blue circle"):
        _finish(queue, "alice", prompt)

    def prompts(query: str) -> list[str]:
        return [image.params.prompt for image in history.page("alice", query).images]

    assert prompts("red") == ["a red square", "A red circle left of a blue square"]
    assert prompts("CIRCLE blue") == ["a blue circle", "A red circle left of a blue square"]
    assert prompts("  ") == ["a blue circle", "a red square", "A red circle left of a blue square"]
    assert prompts("green") == []


def test_pages_hold_whole_jobs_and_each_cursor_continues_where_its_page_ended(tmp_path: Path) -> None:
    # Listing batches of 3 jobs make pages end inside a batch, across batches and at the very end.
    history, queue = _history(tmp_path, scan_batch=3)
    jobs = [_finish(queue, "alice", f"sketch {n}", images=2, seed=10 * n) for n in range(7)]
    _finish(queue, "alice", "the odd one out")  # the newest; filtered out by the query below

    seen, cursor, sizes = [], None, []
    while True:
        page = history.page("alice", "sketch", limit=5, cursor=cursor)
        sizes.append(len(page.images))
        seen += [image.job_id for image in page.images]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert sizes == [4, 4, 4, 2]  # a third job would pass 5 images: it starts the next page
    assert list(dict.fromkeys(seen)) == jobs[::-1]
    assert len(seen) == 14


def test_one_job_larger_than_a_page_is_shown_whole(tmp_path: Path) -> None:
    history, queue = _history(tmp_path)
    _finish(queue, "alice", "older")
    _finish(queue, "alice", "big batch", images=6)

    page = history.page("alice", limit=4)

    assert len(page.images) == 6
    assert [image.params.prompt for image in history.page("alice", cursor=page.next_cursor).images] == [
        "older"
    ]


def test_history_is_read_from_the_store_so_it_survives_a_restart(tmp_path: Path) -> None:
    _, queue = _history(tmp_path)
    job = _finish(queue, "alice", "made before the restart")

    restarted, _ = _history(tmp_path)

    assert [image.job_id for image in restarted.page("alice").images] == [job]


def test_a_cursor_that_is_not_one_of_ours_is_a_readable_error(tmp_path: Path) -> None:
    history, queue = _history(tmp_path)
    _finish(queue, "alice", "x")
    with pytest.raises(ImageGenError, match="cursor"):
        history.page("alice", cursor="not a cursor")
    with pytest.raises(ImageGenError, match="cursor"):
        history.page("alice", cursor="0:jobs/bob/0")
