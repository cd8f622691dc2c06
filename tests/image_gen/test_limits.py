"""Per-key limits without a server: the token bucket's arithmetic and the concurrent-job quota shared through the
store by several API processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_gen.limits import RESERVATION_S, ConcurrencyQuota, RateLimited, RateLimiter
from storage.objects import open_store
from storage.queue import JobQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_ten_seconds_of_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    for _ in range(10):  # 60/min: a burst of 10
        limiter.take("k", 60, "requests")
    with pytest.raises(RateLimited) as limited:
        limiter.take("k", 60, "requests")
    assert limited.value.retry_after == pytest.approx(1.0)
    assert "60 requests per minute" in limited.value.message
    clock.now += 1.0
    limiter.take("k", 60, "requests")
    limiter.take("other", 60, "requests")  # buckets are per name
    limiter.take("k", None, "requests")  # None: unlimited


def test_slow_rate_still_allows_one_request_and_says_when_the_next() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limiter.take("k", 2, "generations")
    with pytest.raises(RateLimited) as limited:
        limiter.take("k", 2, "generations")
    assert limited.value.retry_after == pytest.approx(30.0)
    clock.now += 30
    limiter.take("k", 2, "generations")


def test_quota_counts_unfinished_jobs_across_processes(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    queue = JobQueue(store)
    first, second = ConcurrencyQuota(store, queue), ConcurrencyQuota(open_store(tmp_path), JobQueue(store))
    with first.slot("alice", 2) as bind:
        job_a = queue.submit("alice", {"n": 1})
        bind(job_a.id)
    with second.slot("alice", 2) as bind:
        bind(queue.submit("alice", {"n": 2}).id)
    with pytest.raises(RateLimited) as limited, first.slot("alice", 2):
        pass
    assert limited.value.code == "concurrency_limit_exceeded"
    with second.slot("bob", 2) as bind:  # per owner
        bind(queue.submit("bob", {"n": 3}).id)
    queue.cancel(job_a.id, "alice")  # finished: its place is free again
    with first.slot("alice", 2) as bind:
        bind(queue.submit("alice", {"n": 4}).id)
    assert first.active("alice") == 2


def test_quota_gives_the_place_back_when_submission_fails_or_its_submitter_dies(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    clock = FakeClock()
    quota = ConcurrencyQuota(store, JobQueue(store), clock)
    with pytest.raises(ValueError), quota.slot("alice", 1):
        raise ValueError("the submit failed")
    assert quota.active("alice") == 0
    slot = quota.slot("alice", 1)
    slot.__enter__()  # a process that reserved and died
    with pytest.raises(RateLimited), quota.slot("alice", 1):
        pass
    clock.now += RESERVATION_S + 1
    with quota.slot("alice", 1) as bind:
        bind("alice.0100000000000aaaaaaaa")
