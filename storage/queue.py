"""Job queue over an ObjectStore: leases with fencing tokens, retries, cancellation and fair share.

Every state change is a conditional write; docs/queue.md has the key layout and the cost of each operation."""

from __future__ import annotations

import builtins
import hashlib
import itertools
import json
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from storage.objects import NotFound, ObjectStore, PreconditionFailed, StorageError

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = frozenset({"succeeded", "failed", "canceled"})
MIN_PRIORITY, MAX_PRIORITY = -9, 9

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}")
_ID_TAIL = re.compile(r"(\d\d)([0-9a-f]{11})([0-9a-f]{8})((?:[0-9a-f]{8})?)")
_ENTRY_NAME = re.compile(r"(\d\d)([0-9a-f]{11})([0-9a-f]{11})([0-9a-f]{8})((?:[0-9a-f]{8})?)")
_MAX_MS = 16**11 - 1  # 11 hex digits of milliseconds: until the year 2527
_CAS_TRIES = 16
# candidates a worker records in its ledger at once, so that it rewrites the ledger about once per 32 claims
_LEDGER_SPAN = 32
_SPREAD = 8  # after losing a race, a claimer picks at random among this many next candidates
_LIST_SCAN = 10  # list() reads at most this many records per job it returns when filtering by status

Match = str | Callable[[dict[str, Any]], bool] | None


class LeaseLost(StorageError):
    """The lease no longer holds the job (it expired and was reclaimed, or the job finished): drop the work."""


class JobCanceled(StorageError):
    """The job was canceled and is now recorded so: the worker stops and publishes no result."""


@dataclass(frozen=True)
class Job:
    """A job record. `token` is the fencing token of its latest claim; `version` grows with every write."""

    id: str
    owner: str
    payload: dict[str, Any]
    status: str = "queued"
    priority: int = 0
    batch_key: str | None = None
    idempotency_key: str | None = None
    attempts: int = 0
    max_attempts: int = 3
    not_before: float = 0.0
    token: int = 0
    worker_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    ready_key: str | None = None  # the job's entry in the ready index while it is queued
    version: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Lease:
    """A worker's hold on a running job; heartbeat, complete and fail take it and check its token."""

    job: Job
    etag: str

    @property
    def token(self) -> int:
        return self.job.token

    @property
    def expires_at(self) -> float:
        assert self.job.lease_expires_at is not None
        return self.job.lease_expires_at


@dataclass(frozen=True)
class JobPage:
    """One page of JobQueue.list; pass `next_cursor` back for the next page (None: no more)."""

    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class _Ref:
    """Where a job lives, all derived from its id `<owner>.<band><submit ms><nonce>[<batch hash>]`."""

    owner: str
    band: str  # "00" is priority 9, so that higher priorities sort first
    ms: int
    nonce: str
    batch: str  # "" or the first 8 hex digits of sha256(batch_key)

    @property
    def job_id(self) -> str:
        return f"{self.owner}.{self.band}{self.ms:011x}{self.nonce}{self.batch}"

    @property
    def record_key(self) -> str:
        return f"jobs/{self.owner}/{_MAX_MS - self.ms:011x}{self.nonce}{self.band}{self.batch}.json"

    def entry_key(self, eligible_ms: int) -> str:
        return f"q/{self.owner}/{self.band}{eligible_ms:011x}{self.ms:011x}{self.nonce}{self.batch}"

    @property
    def fresh_entry_key(self) -> str:
        return self.entry_key(self.ms)


@dataclass
class _Worker:
    """What this process knows about one of its workers: round-robin position, held jobs, ledger contents."""

    claiming: threading.Lock = field(default_factory=threading.Lock)
    cursor: str | None = None
    held: set[str] = field(default_factory=set)
    ledgered: frozenset[str] = frozenset()
    ledger_at: float = float("-inf")


def _parse_id(job_id: str) -> _Ref | None:
    owner, _, tail = job_id.rpartition(".")
    m = _ID_TAIL.fullmatch(tail)
    if not m or not _NAME.fullmatch(owner):
        return None
    return _Ref(owner, m[1], int(m[2], 16), m[3], m[4])


def _parse_entry(key: str) -> tuple[_Ref, int] | None:
    """An entry key's job and the time (ms) from which it may be claimed."""
    parts = key.split("/")
    m = _ENTRY_NAME.fullmatch(parts[-1])
    if len(parts) != 3 or not m:
        return None
    return _Ref(parts[1], m[1], int(m[3], 16), m[4], m[5]), int(m[2], 16)


def _owner_of(entry_key: str) -> str:
    return entry_key.split("/", 2)[1]


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: 1 to 100 characters from A-Z a-z 0-9 _ . @ -, starting with a letter or digit"
        )
    return value


_SUBMITS = itertools.count()


def _nonce() -> str:
    """8 hex digits: a per-process sequence (keeps one process's submits in order within a millisecond), then
    random bits (keeps processes apart)."""
    return f"{next(_SUBMITS) % 0x10000:04x}{secrets.randbits(16):04x}"


def _ms(t: float) -> int:
    return max(0, int(t * 1000))


def _batch_hash(batch_key: str | None) -> str:
    return "" if batch_key is None else hashlib.sha256(batch_key.encode()).hexdigest()[:8]


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


_JOB_FIELDS = frozenset(f.name for f in fields(Job))


def _job(record: dict[str, Any]) -> Job:
    return Job(**{k: v for k, v in record.items() if k in _JOB_FIELDS})


def _bump(job: Job, now: float) -> Job:
    return replace(job, updated_at=now, version=job.version + 1)


def _matches(job: Job, match: Match) -> bool:
    if match is None:
        return True
    if isinstance(match, str):
        return job.batch_key == match
    return bool(match(job.payload))


class JobQueue:
    """Submit, claim, heartbeat, complete, fail, cancel and list jobs kept in `store` (semantics: docs/queue.md).
    `clock` is injectable for tests; each worker id belongs to one process."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        retry_backoff_s: float = 2.0,
        max_backoff_s: float = 600.0,
        page_size: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_s <= 0 or max_attempts < 1 or page_size < 1:
            raise ValueError("lease_s must be > 0, max_attempts >= 1 and page_size >= 1")
        self.store = store
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.page_size = page_size
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._next_reclaim = float("-inf")

    # --- API side ---------------------------------------------------------------------------------------------

    def submit(
        self,
        owner: str,
        payload: dict[str, Any],
        *,
        priority: int = 0,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        batch_key: str | None = None,
    ) -> Job:
        """Queue a job. The same owner and idempotency key return the first job, even when submits race."""
        _check_name(owner, "owner")
        if not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(
                f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, got {priority!r}"
            )
        attempts = self.max_attempts if max_attempts is None else max_attempts
        if attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {attempts}")
        now = self._clock()
        ref = _Ref(owner, f"{MAX_PRIORITY - priority:02d}", _ms(now), _nonce(), _batch_hash(batch_key))
        job = Job(
            id=ref.job_id,
            owner=owner,
            payload=payload,
            priority=priority,
            batch_key=batch_key,
            idempotency_key=idempotency_key,
            max_attempts=attempts,
            not_before=now,
            created_at=now,
            updated_at=now,
            ready_key=ref.fresh_entry_key,
        )
        try:
            entry = _json({"record": asdict(job)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"payload must be JSON-serialisable: {e}") from e
        if idempotency_key is None:
            self.store.put_if_absent(ref.fresh_entry_key, entry, "application/json")
            return job
        idem_key = f"idem/{owner}/{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
        try:
            self.store.put_if_absent(idem_key, entry, "application/json")
        except PreconditionFailed:
            return self._idempotent_original(idem_key)
        with suppress(PreconditionFailed):  # a racing submit may have (re)created our entry already
            self.store.put_if_absent(ref.fresh_entry_key, entry, "application/json")
        return job

    def _idempotent_original(self, idem_key: str) -> Job:
        """The job an idempotency key names, re-queuing it if its submitter stopped before queuing it."""
        stored = self.store.get(idem_key).data
        first = _job(json.loads(stored)["record"])
        try:
            return self.get(first.id)
        except NotFound:
            assert first.ready_key is not None
            with suppress(PreconditionFailed):
                self.store.put_if_absent(first.ready_key, stored, "application/json")
            return self.get(first.id)

    def get(self, job_id: str) -> Job:
        """The job's current record; raises NotFound."""
        return self._locate(job_id)[0]

    def _locate(self, job_id: str) -> tuple[Job, str | None]:
        """The job and its record's etag; etag None means it was never claimed and lives in its ready entry."""
        ref = _parse_id(job_id)
        if ref is not None:
            for _ in range(2):  # a claim moves the job from entry to record between our reads: look twice
                with suppress(NotFound):
                    stored = self.store.get(ref.record_key)
                    return _job(json.loads(stored.data)), stored.etag
                with suppress(NotFound):
                    entry = json.loads(self.store.get(ref.fresh_entry_key).data)
                    if "record" in entry:
                        return _job(entry["record"]), None
        raise NotFound(f"no job {job_id!r}")

    def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel: a queued job at once; a running one is marked and finishes canceled at its next heartbeat."""
        for _ in range(_CAS_TRIES):
            job, etag = self._locate(job_id)
            if job.owner != owner:
                raise NotFound(f"no job {job_id!r}")
            if job.finished or job.cancel_requested:
                return job
            ref = _parse_id(job.id)
            assert ref is not None
            now = self._clock()
            try:
                if job.status == "queued":
                    canceled = _bump(replace(job, status="canceled", ready_key=None), now)
                    if etag is None:  # creating the record first beats any claimer of the entry
                        self.store.put_if_absent(ref.record_key, _json(asdict(canceled)), "application/json")
                    else:
                        self.store.put_if_match(
                            ref.record_key, _json(asdict(canceled)), etag, "application/json"
                        )
                    if job.ready_key is not None:
                        self.store.delete(job.ready_key)
                    return canceled
                assert etag is not None
                requested = _bump(replace(job, cancel_requested=True), now)
                self.store.put_if_match(ref.record_key, _json(asdict(requested)), etag, "application/json")
                return requested
            except PreconditionFailed:
                continue
        raise StorageError(f"job {job_id!r}: too many concurrent updates to cancel it")

    def list(
        self, owner: str, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """The owner's never-claimed jobs in the order they will run, then the rest newest first. With a status
        filter, a page may hold fewer than `limit` jobs and still have a next cursor."""
        _check_name(owner, "owner")
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}: expected one of {', '.join(STATUSES)}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        queue_prefix, record_prefix = f"q/{owner}/", f"jobs/{owner}/"
        if cursor is not None and not cursor.startswith((queue_prefix, record_prefix)):
            raise ValueError(f"invalid cursor {cursor!r} for owner {owner!r}")
        jobs: builtins.list[Job] = []
        seen: set[str] = set()
        for scanned, (key, job) in enumerate(self._owner_jobs(owner, status, cursor), start=1):
            if job is not None and job.id not in seen and status in (None, job.status):
                seen.add(job.id)
                jobs.append(job)
            if len(jobs) == limit or scanned >= _LIST_SCAN * limit:
                return JobPage(jobs, key)
        return JobPage(jobs, None)

    def _owner_jobs(
        self, owner: str, status: str | None, cursor: str | None
    ) -> Iterator[tuple[str, Job | None]]:
        queue_prefix, record_prefix = f"q/{owner}/", f"jobs/{owner}/"
        if status in (None, "queued") and (cursor is None or cursor.startswith(queue_prefix)):
            for key in self.store.list(queue_prefix, start_after=cursor):
                parsed = _parse_entry(key)
                if parsed is None or parsed[1] != parsed[0].ms:
                    continue  # a retry's entry: the job is listed through its record
                try:
                    entry = json.loads(self.store.get(key).data)
                except NotFound:
                    continue
                yield key, _job(entry["record"]) if "record" in entry else None
        after = cursor if cursor is not None and cursor.startswith(record_prefix) else None
        for key in self.store.list(record_prefix, start_after=after):
            try:
                yield key, _job(json.loads(self.store.get(key).data))
            except NotFound:
                continue

    def position(self, job_id: str) -> int | None:
        """An upper bound on the jobs fair share runs before this one (0: next): its owner's ahead of it, plus as
        many of each other owner's as are served in those rounds. None unless queued."""
        job = self.get(job_id)
        if job.status != "queued" or job.ready_key is None:
            return None
        ahead = 0
        for key in self.store.list(f"q/{job.owner}/"):
            if key >= job.ready_key:
                break
            ahead += 1
        others = self._queued_per_owner(cap=ahead + 1)
        return ahead + sum(min(n, ahead + 1) for owner, n in others.items() if owner != job.owner)

    def counts(self) -> dict[str, int]:
        """Gauges for metrics: entries in the ready index, and running jobs (found through the workers' ledgers)."""
        running: set[str] = set()
        for key in self.store.list("workers/"):
            try:
                ledger = json.loads(self.store.get(key).data)
            except NotFound:
                continue
            for ref in filter(None, map(_parse_id, set(ledger["held"]) | set(ledger["candidates"]))):
                with suppress(NotFound):
                    job = _job(json.loads(self.store.get(ref.record_key).data))
                    if job.status == "running" and job.worker_id == ledger["worker_id"]:
                        running.add(job.id)
        return {"queued": sum(self._queued_per_owner(cap=None).values()), "running": len(running)}

    def _queued_per_owner(self, cap: int | None) -> dict[str, int]:
        """Entries per owner in the ready index; past `cap` an owner's count may stop growing (skip-scan)."""
        counts: dict[str, int] = {}
        after = None
        while True:
            page = builtins.list(self.store.list("q/", start_after=after, limit=self.page_size))
            for key in page:
                counts[_owner_of(key)] = counts.get(_owner_of(key), 0) + 1
            if len(page) < self.page_size:
                return counts
            last = _owner_of(page[-1])
            after = f"q/{last}0" if cap is not None and counts[last] >= cap else page[-1]

    # --- worker side ------------------------------------------------------------------------------------------

    def claim(self, worker_id: str, *, limit: int = 1, match: Match = None) -> builtins.list[Lease]:
        """Claim up to `limit` jobs, round-robin over owners. `match` selects jobs that can join a batch: a batch
        key (compared with the job's `batch_key`) or a predicate on the payload."""
        _check_name(worker_id, "worker_id")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        now = self._clock()
        with self._lock:
            reclaim_due = now >= self._next_reclaim
            if reclaim_due:
                self._next_reclaim = now + self.lease_s
        if reclaim_due:
            self.reclaim_expired()
        worker = self._worker(worker_id)
        leases: builtins.list[Lease] = []
        with worker.claiming:
            candidates = self._candidates(worker, limit, match)
            remaining = builtins.list(candidates)
            contended = False
            while remaining and len(leases) < limit:
                # in fair-share order; after a miss, other workers are likely taking the same heads: spread out
                key = remaining.pop(random.randrange(min(len(remaining), _SPREAD)) if contended else 0)
                parsed = _parse_entry(key)
                assert parsed is not None
                if (
                    parsed[0].job_id not in worker.ledgered
                    or self._clock() - worker.ledger_at > self.lease_s / 2
                ):
                    self._write_ledger(worker_id, worker, candidates)
                lease = self._claim_entry(worker_id, key, match)
                if lease is None:
                    contended = True
                    continue
                leases.append(lease)
                with self._lock:
                    worker.cursor = lease.job.owner
                    worker.held.add(lease.job.id)
        return leases

    def _worker(self, worker_id: str) -> _Worker:
        with self._lock:
            return self._workers.setdefault(worker_id, _Worker())

    def _candidates(self, worker: _Worker, limit: int, match: Match) -> builtins.list[str]:
        """Claimable entry keys in fair-share order: round-robin over owners from the one after the cursor."""
        now_ms = _ms(self._clock())
        batch = _batch_hash(match) if isinstance(match, str) else None
        page = builtins.list(self.store.list("q/", limit=self.page_size))
        cursor = worker.cursor
        if len(page) == self.page_size and cursor is not None and cursor >= _owner_of(page[-1]):
            # owners after the cursor are past this page: skip the rest of the cursor owner's entries
            page += self.store.list("q/", start_after=f"q/{cursor}0", limit=self.page_size)
        heads: dict[str, builtins.list[str]] = {}
        for key in page:
            parsed = _parse_entry(key)
            if parsed is None or parsed[1] > now_ms or (batch is not None and parsed[0].batch != batch):
                continue
            heads.setdefault(parsed[0].owner, []).append(key)
        owners = sorted(heads)
        if cursor is not None:
            owners = [o for o in owners if o > cursor] + [o for o in owners if o <= cursor]
        span = max(4 * limit, _LEDGER_SPAN)
        rounds = (heads[o][rank] for rank in range(span) for o in owners if rank < len(heads[o]))
        return [key for _, key in zip(range(span), rounds, strict=False)]

    def _write_ledger(self, worker_id: str, worker: _Worker, candidates: builtins.list[str]) -> None:
        """Record, before claiming, which jobs this worker may hold, so that reclaim finds them if it dies."""
        ids = [ref.job_id for ref, _ in filter(None, map(_parse_entry, candidates))]
        with self._lock:
            held = sorted(worker.held)
        now = self._clock()
        ledger = {"worker_id": worker_id, "written_at": now, "held": held, "candidates": ids}
        self.store.put(f"workers/{worker_id}.json", _json(ledger), "application/json")
        worker.ledgered = frozenset(held) | frozenset(ids)
        worker.ledger_at = now

    def _claim_entry(self, worker_id: str, key: str, match: Match) -> Lease | None:
        parsed = _parse_entry(key)
        assert parsed is not None
        ref = parsed[0]
        try:
            entry = json.loads(self.store.get(key).data)
        except NotFound:
            return None  # claimed or canceled since we listed it
        if "record" in entry:  # never claimed: the record is created by whoever claims or cancels first
            job, etag = _job(entry["record"]), None
        else:  # a retry: the entry points at the record
            try:
                stored = self.store.get(ref.record_key)
            except NotFound:
                self.store.delete(key)
                return None
            job, etag = _job(json.loads(stored.data)), stored.etag
            if job.status != "queued" or job.ready_key != key:
                if not (job.status == "running" and job.token == entry.get("after_token")):
                    self.store.delete(key)  # stale; unless a fail() is between writing it and re-queuing
                return None
        if not _matches(job, match):
            return None
        now = self._clock()
        running = replace(
            job,
            status="running",
            attempts=job.attempts + 1,
            token=job.token + 1,
            worker_id=worker_id,
            lease_expires_at=now + self.lease_s,
            ready_key=None,
            progress=None,
            updated_at=now,
            version=job.version + 1,
        )
        data = _json(asdict(running))
        try:
            if etag is None:
                new_etag = self.store.put_if_absent(ref.record_key, data, "application/json")
            else:
                new_etag = self.store.put_if_match(ref.record_key, data, etag, "application/json")
        except PreconditionFailed:
            if etag is None:
                self.store.delete(key)  # a record exists, so this never-claimed entry is spent
            return None
        self.store.delete(key)
        return Lease(running, new_etag)

    def heartbeat(self, lease: Lease, progress: dict[str, Any] | None = None) -> Lease:
        """Extend the lease and publish progress; raises JobCanceled (job now canceled) or LeaseLost."""
        job, etag = self._update_held(
            lease,
            lambda job, now: replace(
                job,
                lease_expires_at=now + self.lease_s,
                progress=job.progress if progress is None else progress,
            ),
        )
        return Lease(job, etag)

    def complete(self, lease: Lease, result: dict[str, Any]) -> Job:
        """Record the result, at most once; raises LeaseLost for a stale lease, JobCanceled if canceled."""
        job, _ = self._update_held(
            lease, lambda job, now: replace(job, status="succeeded", result=result, lease_expires_at=None)
        )
        self._release(lease)
        return job

    def fail(self, lease: Lease, error: str, retryable: bool = True) -> Job:
        """Record a failed attempt: re-queue after backoff while attempts remain, else dead-letter with `error`."""
        job = lease.job
        retry_key, not_before = None, 0.0
        if retryable and job.attempts < job.max_attempts:
            not_before = self._clock() + min(
                self.max_backoff_s, self.retry_backoff_s * 2 ** (job.attempts - 1)
            )
            ref = _parse_id(job.id)
            assert ref is not None
            retry_key = ref.entry_key(_ms(not_before))
            # the entry first: a crash before the record update leaves a harmless stale entry, never a lost job
            with suppress(PreconditionFailed):
                self.store.put_if_absent(retry_key, _json({"job_id": job.id, "after_token": lease.token}))

        def change(job: Job, now: float) -> Job:
            if retry_key is None:
                return replace(job, status="failed", error=error, lease_expires_at=None)
            return replace(
                job,
                status="queued",
                error=error,
                not_before=not_before,
                ready_key=retry_key,
                lease_expires_at=None,
                progress=None,
            )

        try:
            failed, _ = self._update_held(lease, change)
        finally:
            self._release(lease)
        return failed

    def _update_held(self, lease: Lease, change: Callable[[Job, float], Job]) -> tuple[Job, str]:
        """Apply `change` to the leased job by compare-and-swap, re-reading on conflict; the token decides."""
        ref = _parse_id(lease.job.id)
        assert ref is not None
        job, etag = lease.job, lease.etag
        for _ in range(_CAS_TRIES):
            if job.status != "running" or job.token != lease.token:
                self._release(lease)
                raise LeaseLost(
                    f"job {job.id} is {job.status} with token {job.token}; this lease (token {lease.token}) is stale"
                )
            now = self._clock()
            canceling = job.cancel_requested
            new = _bump(
                replace(job, status="canceled", lease_expires_at=None) if canceling else change(job, now), now
            )
            try:
                etag = self.store.put_if_match(ref.record_key, _json(asdict(new)), etag, "application/json")
            except PreconditionFailed:
                stored = self.store.get(ref.record_key)
                job, etag = _job(json.loads(stored.data)), stored.etag
                continue
            if canceling:
                self._release(lease)
                raise JobCanceled(f"job {job.id} was canceled")
            return new, etag
        raise StorageError(f"job {lease.job.id}: too many concurrent updates")

    def _release(self, lease: Lease) -> None:
        if lease.job.worker_id is None:
            return
        with self._lock:
            worker = self._workers.get(lease.job.worker_id)
            if worker is not None:
                worker.held.discard(lease.job.id)

    def reclaim_expired(self) -> builtins.list[Job]:
        """Re-queue (or dead-letter, or finish canceling) the jobs in workers' ledgers whose lease expired; returns
        them. claim() runs this about once per lease per worker."""
        now = self._clock()
        changed: builtins.list[Job] = []
        ledgers = builtins.list(self.store.list("workers/"))
        for key in ledgers:
            try:
                stored = self.store.get(key)
            except NotFound:
                continue
            ledger = json.loads(stored.data)
            silent = ledger["written_at"] < now - self.lease_s
            job_ids = ledger["held"] + (ledger["candidates"] if silent else [])
            settled = True
            for job_id in dict.fromkeys(job_ids):
                done, job = self._reclaim(job_id, ledger["worker_id"], now)
                settled = settled and done
                if job is not None:
                    changed.append(job)
            if silent and settled:
                # Only the ledger read above: its worker may have rewritten it since, about to claim (it does so
                # whenever its ledger is older than half a lease), and the new one must outlive this pass.
                with suppress(PreconditionFailed, NotFound):
                    self.store.delete_if_match(key, stored.etag)
        with self._lock:
            self._next_reclaim = now + self.lease_s * max(1, len(ledgers)) * random.uniform(0.5, 1.5)
        return changed

    def _reclaim(self, job_id: str, worker_id: str, now: float) -> tuple[bool, Job | None]:
        """(whether the ledger may forget the job, the job if this pass changed it)."""
        try:
            job, etag = self._locate(job_id)
        except NotFound:
            return True, None
        if etag is None or job.status != "running" or job.worker_id != worker_id:
            return True, None
        assert job.lease_expires_at is not None
        if job.lease_expires_at > now:
            return False, None
        ref = _parse_id(job_id)
        assert ref is not None
        note = f"lease of worker {worker_id} expired on attempt {job.attempts} of {job.max_attempts}"
        if job.cancel_requested:
            new = replace(job, status="canceled", lease_expires_at=None)
        elif job.attempts >= job.max_attempts:
            new = replace(job, status="failed", error=note, lease_expires_at=None)
        else:
            key = ref.entry_key(_ms(now))
            with suppress(PreconditionFailed):
                self.store.put_if_absent(key, _json({"job_id": job.id, "after_token": job.token}))
            new = replace(
                job,
                status="queued",
                error=note,
                not_before=now,
                ready_key=key,
                lease_expires_at=None,
                progress=None,
            )
        new = _bump(new, now)
        try:
            self.store.put_if_match(ref.record_key, _json(asdict(new)), etag, "application/json")
        except PreconditionFailed:
            return False, None  # its holder wrote first: look again next pass
        return True, new
