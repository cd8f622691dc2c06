"""Job queue: exclusive claims, fencing, retries, cancellation and fair share, on the local store and on S3."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import pytest

from storage.objects import ObjectStore, S3ObjectStore, StorageError
from storage.queue import Job, JobCanceled, JobQueue, Lease, LeaseLost

if TYPE_CHECKING:
    from tests.storage.conftest import FakeClock


def on_threads(n: int, work) -> list:
    """Run `work(i)` on n threads released together; their results in thread order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def claim_one(queue: JobQueue, worker: str = "w1", **kwargs) -> Lease:
    leases = queue.claim(worker, **kwargs)
    assert len(leases) == 1
    return leases[0]


@pytest.fixture
def queue(store: ObjectStore, clock: FakeClock) -> JobQueue:
    return JobQueue(store, lease_s=30, max_attempts=3, retry_backoff_s=2, clock=clock)


def test_submitted_job_is_claimed_with_its_payload_and_a_first_token(
    queue: JobQueue, clock: FakeClock
) -> None:
    job = queue.submit("alice", {"prompt": "a red fox"})
    assert queue.get(job.id) == job
    assert job.status == "queued"
    lease = claim_one(queue)
    assert lease.job.id == job.id
    assert lease.job.payload == {"prompt": "a red fox"}
    assert (lease.token, lease.job.attempts, lease.job.status) == (1, 1, "running")
    assert lease.expires_at == clock() + 30
    assert queue.get(job.id).status == "running"
    assert queue.claim("w2") == []


def test_claim_is_exclusive_between_eight_workers(store: ObjectStore, clock: FakeClock) -> None:
    job = JobQueue(store, clock=clock).submit("alice", {"n": 1})
    queues = [JobQueue(store, clock=clock) for _ in range(8)]  # eight processes sharing one store
    claimed = on_threads(8, lambda i: queues[i].claim(f"worker-{i}"))
    winners = [leases for leases in claimed if leases]
    assert len(winners) == 1
    assert winners[0][0].job.id == job.id
    assert queues[0].get(job.id).worker_id == winners[0][0].job.worker_id


def test_same_idempotency_key_submitted_concurrently_makes_one_job(
    store: ObjectStore, clock: FakeClock
) -> None:
    queues = [JobQueue(store, clock=clock) for _ in range(8)]
    jobs = on_threads(8, lambda i: queues[i].submit("alice", {"try": i}, idempotency_key="req-42"))
    assert len({job.id for job in jobs}) == 1
    assert len(list(store.list("q/alice/"))) == 1
    again = queues[0].submit("alice", {"try": "later"}, idempotency_key="req-42")
    assert again == queues[0].get(jobs[0].id)
    assert (
        queues[0].submit("bob", {"try": 0}, idempotency_key="req-42").id != jobs[0].id
    )  # keys are per owner


def test_idempotent_submit_recovers_from_a_submitter_that_stopped_halfway(
    store: ObjectStore, clock: FakeClock
) -> None:
    crashing = JobQueue(store, clock=clock)
    original_put = store.put_if_absent

    def put_if_absent(key: str, data: bytes, content_type: str | None = None) -> str:
        if key.startswith("q/"):
            raise StorageError("process killed")
        return original_put(key, data, content_type)

    store.put_if_absent = put_if_absent  # type: ignore[method-assign]  # dies after the idempotency record
    with pytest.raises(StorageError):
        crashing.submit("alice", {"n": 1}, idempotency_key="k")
    del store.put_if_absent
    job = JobQueue(store, clock=clock).submit("alice", {"n": 1}, idempotency_key="k")
    assert claim_one(JobQueue(store, clock=clock)).job.id == job.id


def test_complete_happens_at_most_once(queue: JobQueue) -> None:
    job = queue.submit("alice", {})
    lease = claim_one(queue)
    done = queue.complete(lease, {"image": "images/1.png"})
    assert done.status == "succeeded"
    with pytest.raises(LeaseLost):
        queue.complete(lease, {"image": "images/other.png"})
    assert queue.get(job.id).result == {"image": "images/1.png"}


def test_heartbeat_extends_the_lease_and_publishes_progress(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.submit("alice", {})
    lease = claim_one(queue)
    clock.advance(25)
    lease = queue.heartbeat(lease, {"step": 3, "total": 4})
    assert lease.expires_at == clock() + 30
    assert queue.get(job.id).progress == {"step": 3, "total": 4}
    clock.advance(25)  # past the first expiry, within the extended one
    assert queue.reclaim_expired() == []
    assert queue.complete(lease, {"ok": True}).status == "succeeded"


def test_expired_lease_is_reclaimed_with_a_higher_token_and_the_old_holder_is_refused(
    store: ObjectStore, clock: FakeClock
) -> None:
    first, second = JobQueue(store, clock=clock), JobQueue(store, clock=clock)
    job = first.submit("alice", {"prompt": "slow"})
    stale = claim_one(first, "gpu-1")
    clock.advance(31)  # gpu-1 stopped heartbeating
    reclaimed = second.reclaim_expired()
    assert [j.id for j in reclaimed] == [job.id]
    assert reclaimed[0].status == "queued"
    fresh = claim_one(second, "gpu-2")
    assert fresh.job.id == job.id
    assert fresh.token == stale.token + 1
    with pytest.raises(LeaseLost):
        first.heartbeat(stale)
    with pytest.raises(LeaseLost):
        first.complete(stale, {"from": "gpu-1"})
    assert second.complete(fresh, {"from": "gpu-2"}).result == {"from": "gpu-2"}


def test_claim_reclaims_expired_leases_by_itself(store: ObjectStore, clock: FakeClock) -> None:
    job = JobQueue(store, clock=clock).submit("alice", {})
    claim_one(JobQueue(store, clock=clock), "gpu-1")
    clock.advance(31)
    lease = claim_one(JobQueue(store, clock=clock), "gpu-2")  # a new process: its first claim reclaims
    assert (lease.job.id, lease.token, lease.job.attempts) == (job.id, 2, 2)


def test_failures_retry_with_exponential_backoff_then_dead_letter(queue: JobQueue, clock: FakeClock) -> None:
    flaky = queue.submit("alice", {"name": "flaky"})
    steady = queue.submit("bob", {"name": "steady"})
    lease = claim_one(queue, match=lambda payload: payload["name"] == "flaky")
    assert queue.fail(lease, "CUDA error").status == "queued"
    assert queue.get(flaky.id).not_before == clock() + 2
    other = claim_one(queue)  # the retry waits; other jobs do not
    assert other.job.id == steady.id
    assert queue.complete(other, {"ok": True}).status == "succeeded"
    assert queue.claim("w1") == []
    clock.advance(2)
    lease = claim_one(queue)
    assert (lease.job.id, lease.job.attempts, lease.token) == (flaky.id, 2, 2)
    queue.fail(lease, "CUDA error again")
    clock.advance(3.5)  # the second backoff is 4 s
    assert queue.claim("w1") == []
    clock.advance(0.5)
    lease = claim_one(queue)
    assert lease.job.attempts == 3
    dead = queue.fail(lease, "out of memory at 1024x1024")
    assert (dead.status, dead.error, dead.attempts) == ("failed", "out of memory at 1024x1024", 3)
    clock.advance(3600)
    assert queue.claim("w1") == []
    assert queue.get(steady.id).status == "succeeded"


def test_a_job_whose_worker_keeps_dying_is_dead_lettered(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.submit("alice", {"prompt": "crashes the GPU"}, max_attempts=2)
    for attempt in (1, 2):
        assert claim_one(queue, f"gpu-{attempt}").job.attempts == attempt
        clock.advance(31)
        assert [j.status for j in queue.reclaim_expired()] == ["queued" if attempt == 1 else "failed"]
    dead = queue.get(job.id)
    assert (dead.status, dead.error) == ("failed", "lease of worker gpu-2 expired on attempt 2 of 2")
    assert queue.claim("gpu-3") == []


def test_cancel_of_a_job_waiting_for_its_retry(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.submit("alice", {})
    queue.fail(claim_one(queue), "timeout")
    assert queue.position(job.id) == 0
    assert queue.cancel(job.id, "alice").status == "canceled"
    clock.advance(60)
    assert queue.claim("w1") == []
    assert list(queue.store.list("q/")) == []


def test_non_retryable_failure_dead_letters_at_once(queue: JobQueue) -> None:
    job = queue.submit("alice", {})
    failed = queue.fail(claim_one(queue), "unknown model 'sd9'", retryable=False)
    assert (failed.status, failed.error, failed.attempts) == ("failed", "unknown model 'sd9'", 1)
    assert queue.get(job.id).status == "failed"


def test_cancel_of_a_queued_job_is_immediate(queue: JobQueue) -> None:
    job = queue.submit("alice", {})
    canceled = queue.cancel(job.id, "alice")
    assert canceled.status == "canceled"
    assert queue.get(job.id).status == "canceled"
    assert queue.claim("w1") == []
    assert queue.position(job.id) is None
    assert queue.cancel(job.id, "alice").status == "canceled"


def test_cancel_of_a_running_job_stops_it_at_its_next_heartbeat(queue: JobQueue) -> None:
    job = queue.submit("alice", {})
    lease = claim_one(queue)
    requested = queue.cancel(job.id, "alice")
    assert (requested.status, requested.cancel_requested) == ("running", True)
    with pytest.raises(JobCanceled):
        queue.heartbeat(lease, {"step": 2})
    stored = queue.get(job.id)
    assert (stored.status, stored.result) == ("canceled", None)


def test_a_canceled_job_publishes_no_result(queue: JobQueue) -> None:
    job = queue.submit("alice", {})
    lease = claim_one(queue)
    queue.cancel(job.id, "alice")
    with pytest.raises(JobCanceled):
        queue.complete(lease, {"image": "images/late.png"})
    assert queue.get(job.id).result is None
    assert queue.get(job.id).status == "canceled"


def test_cancel_by_another_owner_is_not_found(queue: JobQueue) -> None:
    job = queue.submit("alice", {})
    with pytest.raises(StorageError, match="no job"):
        queue.cancel(job.id, "mallory")
    assert queue.get(job.id).status == "queued"


def test_one_owners_backlog_does_not_starve_another_owners_job(store: ObjectStore, clock: FakeClock) -> None:
    queue = JobQueue(store, page_size=16, clock=clock)  # a small page: the backlog spans many list pages
    for i in range(200):
        queue.submit("alice", {"i": i})
    clock.advance(1)
    bob = queue.submit("bob", {"i": 0})
    first_two = [claim_one(queue).job for _ in range(2)]
    assert bob.id in [job.id for job in first_two]
    assert [job.payload["i"] for job in first_two if job.owner == "alice"] == [0]  # alice's oldest first


def test_owners_are_served_round_robin(queue: JobQueue) -> None:
    for owner in ("carol", "alice", "bob"):
        for i in range(3):
            queue.submit(owner, {"i": i})
    claimed = [claim_one(queue).job for _ in range(7)]
    assert [job.owner for job in claimed] == ["alice", "bob", "carol"] * 2 + ["alice"]
    assert [job.payload["i"] for job in claimed] == [0, 0, 0, 1, 1, 1, 2]


def test_priority_orders_an_owners_jobs(queue: JobQueue, clock: FakeClock) -> None:
    for name, priority in [("normal", 0), ("urgent", 5), ("background", -3), ("urgent-too", 5)]:
        queue.submit("alice", {"name": name}, priority=priority)
        clock.advance(0.01)
    order = [claim_one(queue).job.payload["name"] for _ in range(4)]
    assert order == ["urgent", "urgent-too", "normal", "background"]
    with pytest.raises(ValueError, match="priority"):
        queue.submit("alice", {}, priority=10)


def test_claim_can_select_jobs_compatible_with_a_batch(queue: JobQueue) -> None:
    small = [queue.submit("alice", {"size": 512}, batch_key="sd15-512") for _ in range(3)]
    queue.submit("alice", {"size": 1024}, batch_key="sdxl-1024")
    leases = queue.claim("w1", limit=4, match="sd15-512")
    assert sorted(lease.job.id for lease in leases) == sorted(job.id for job in small)
    big = queue.claim("w1", limit=4, match=lambda payload: payload["size"] == 1024)
    assert [lease.job.batch_key for lease in big] == ["sdxl-1024"]


def test_list_pages_through_an_owners_jobs_by_status(queue: JobQueue, clock: FakeClock) -> None:
    jobs = []
    for i in range(5):
        jobs.append(queue.submit("alice", {"i": i}))
        clock.advance(1)
    for _ in range(2):
        queue.complete(claim_one(queue), {"ok": True})
    queue.submit("bob", {"i": 0})
    seen: list[Job] = []
    page = queue.list("alice", limit=2)
    while True:
        assert len(page.jobs) <= 2
        seen += page.jobs
        if page.next_cursor is None:
            break
        page = queue.list("alice", limit=2, cursor=page.next_cursor)
    assert sorted(job.id for job in seen) == sorted(job.id for job in jobs)
    assert [job.status for job in seen] == ["queued"] * 3 + ["succeeded"] * 2  # queued in run order first
    assert [job.payload["i"] for job in seen] == [2, 3, 4, 1, 0]  # then newest first
    succeeded = queue.list("alice", status="succeeded").jobs
    assert [job.payload["i"] for job in succeeded] == [1, 0]
    assert [job.owner for job in queue.list("bob").jobs] == ["bob"]
    with pytest.raises(ValueError, match="cursor"):
        queue.list("bob", cursor=page.next_cursor or "jobs/alice/x")


def test_position_counts_the_jobs_fair_share_runs_first(queue: JobQueue, clock: FakeClock) -> None:
    alice = [queue.submit("alice", {"i": i}) for i in range(3)]
    bob = queue.submit("bob", {})
    assert [queue.position(job.id) for job in alice] == [
        1,
        2,
        3,
    ]  # each of alice's rounds may serve bob first
    assert queue.position(bob.id) == 1
    claim_one(queue)
    assert queue.position(alice[1].id) == 1
    assert queue.position(alice[0].id) is None


def test_counts_report_queued_and_running_jobs(queue: JobQueue) -> None:
    for i in range(3):
        queue.submit("alice", {"i": i})
    queue.submit("bob", {})
    claim_one(queue)
    assert queue.counts() == {"queued": 3, "running": 1}


def test_a_claimer_that_died_before_removing_the_entry_leaves_nothing_stuck(
    store: ObjectStore, clock: FakeClock
) -> None:
    crashing = JobQueue(store, clock=clock)
    job = crashing.submit("alice", {})
    original_delete = store.delete

    def delete(key: str) -> None:
        if key.startswith("q/"):
            raise StorageError("process killed")
        original_delete(key)

    store.delete = delete  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        crashing.claim("gpu-1")
    del store.delete
    other = JobQueue(store, clock=clock)
    assert other.claim("gpu-2") == []  # the job is gpu-1's until its lease expires
    assert list(store.list("q/")) == []
    clock.advance(31)
    assert [job.id for job in other.reclaim_expired()] == [job.id]
    lease = claim_one(other, "gpu-2")
    assert (lease.job.id, lease.token) == (job.id, 2)


def test_reclaim_keeps_a_ledger_its_worker_rewrote_while_reclaim_looked_at_it(
    store: ObjectStore, clock: FakeClock
) -> None:
    """A worker idle for over a lease has a silent ledger that reclaim may drop; if the worker rewrites it to claim
    a job while reclaim is reading it, the rewritten one must survive, or the job would be stuck if that worker
    died."""
    worker, reclaimer = JobQueue(store, clock=clock), JobQueue(store, clock=clock)
    first = worker.submit("alice", {"i": 0})
    worker.complete(claim_one(worker, "gpu-1"), {})
    clock.advance(31)  # gpu-1's ledger is now silent, and every job in it settled
    second = worker.submit("alice", {"i": 1})
    original_get = store.get

    def get(key: str):
        found = original_get(key)
        if key == "workers/gpu-1.json":  # gpu-1 claims between reclaim's read and its delete
            store.get = original_get  # type: ignore[method-assign]
            claim_one(worker, "gpu-1")
        return found

    store.get = get  # type: ignore[method-assign]
    reclaimer.reclaim_expired()
    del store.get
    ledger = json.loads(store.get("workers/gpu-1.json").data)
    assert second.id in ledger["held"] + ledger["candidates"] and first.id not in ledger["held"]
    clock.advance(31)  # gpu-1 dies holding the job: reclaim finds it through the ledger
    assert [job.id for job in reclaimer.reclaim_expired()] == [second.id]


def test_s3_requests_per_job_in_steady_state(s3_bucket: str, clock: FakeClock) -> None:
    """submit 1 PUT; claim 1 GET + 1 PUT + 1 DELETE + its share of a LIST per claim call and of a ledger PUT per
    32 candidates; complete 1 PUT."""
    store = S3ObjectStore(s3_bucket)
    queue = JobQueue(store, clock=clock)
    queue.claim("gpu-1")  # start-up: the first claim also reads the (empty) worker ledgers
    jobs = 16
    for limit in (1, 4):
        store.requests.clear()
        for i in range(jobs):
            queue.submit(("alice", "bob")[i % 2], {"i": i})
        for _ in range(jobs // limit):
            for lease in queue.claim("gpu-1", limit=limit):
                queue.complete(lease, {"ok": True})
        assert store.requests["ListObjectsV2"] == jobs // limit
        assert store.requests["PutObject"] == 3 * jobs + 1
        assert store.requests["GetObject"] == store.requests["DeleteObject"] == jobs
        assert sum(store.requests.values()) / jobs == 5 + 1 / limit + 1 / jobs
