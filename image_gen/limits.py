"""Per-key limits: token-bucket request rates (per process) and the concurrent-job quota (shared through the store).

Rates are kept in memory: with N API processes a key gets up to N times its rate, which bounds the load without a
store write per request. The quota is a compare-and-swap record per owner in the store, so it holds across every
API process: `quotas/<owner>.json` lists the owner's unfinished jobs and in-flight reservations.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from image_gen.errors import ImageGenError
from storage.objects import NotFound, ObjectStore, PreconditionFailed, StorageError
from storage.queue import JobQueue

BURST_SECONDS = 10.0  # a bucket holds this many seconds' worth of requests (at least one)
RESERVATION_S = 120.0  # a reservation whose submitter died is forgotten after this long
_CAS_TRIES = 32


class RateLimited(ImageGenError):
    """Too many requests: `retry_after` seconds until one would be accepted."""

    def __init__(self, message: str, retry_after: float, *, code: str = "rate_limit_exceeded") -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `capacity`; a request takes one token."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """Named token buckets, e.g. one for each key's requests and one for its generations."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, name: str, per_minute: float | None, what: str) -> None:
        """Take one token from bucket `name` (refilled at `per_minute`); raise RateLimited if it is empty."""
        if per_minute is None:
            return
        rate = per_minute / 60
        capacity = max(1.0, rate * BURST_SECONDS)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[name] = TokenBucket(rate, capacity, capacity, now)
            wait = bucket.take(now)
        if wait:
            raise RateLimited(
                f"rate limit of {per_minute:g} {what} per minute reached: retry after {math.ceil(wait)} s",
                wait,
            )


class ConcurrencyQuota:
    """At most `limit` unfinished jobs per owner, counted across every process that shares the store."""

    def __init__(self, store: ObjectStore, queue: JobQueue, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.queue = queue
        self._clock = clock

    @contextmanager
    def slot(self, owner: str, limit: int | None) -> Iterator[Callable[[str], None]]:
        """Reserve a place for one job, or raise RateLimited (`concurrency_limit_exceeded`). The body submits the
        job and calls the yielded function with its id; if the body raises, the place is given back."""
        if limit is None:
            yield lambda job_id: None
            return
        reservation = f"~{secrets.token_hex(8)}"
        self._update(owner, lambda active, finished: self._reserve(active, finished, reservation, limit))
        bound = False

        def bind(job_id: str) -> None:
            nonlocal bound
            self._update(owner, lambda active, _: self._swap(active, reservation, job_id))
            bound = True

        try:
            yield bind
        finally:
            if not bound:
                self._update(owner, lambda active, _: self._release(active, reservation))

    def active(self, owner: str) -> int:
        """Unfinished jobs and reservations the record holds (finished ones are pruned on the next change)."""
        try:
            return len(json.loads(self.store.get(self._path(owner)).data)["active"])
        except NotFound:
            return 0

    def _reserve(
        self, active: dict[str, float], finished: Callable[[str], bool], reservation: str, limit: int
    ) -> None:
        now = self._clock()
        for name, since in list(active.items()):
            expired = since < now - RESERVATION_S if name.startswith("~") else finished(name)
            if expired:
                del active[name]
        if len(active) >= limit:
            raise RateLimited(
                f"{limit} unfinished job{'s' if limit > 1 else ''} at once is this key's limit: wait for one to "
                "finish (or cancel one) and retry",
                1.0,
                code="concurrency_limit_exceeded",
            )
        active[reservation] = now

    def _release(self, active: dict[str, float], reservation: str) -> None:
        active.pop(reservation, None)

    def _swap(self, active: dict[str, float], reservation: str, job_id: str) -> None:
        active.pop(reservation, None)
        active.setdefault(job_id, self._clock())  # an idempotent resubmission returns a job already counted

    def _update(self, owner: str, change: Callable[[dict[str, float], Callable[[str], bool]], None]) -> None:
        path = self._path(owner)
        known: dict[str, bool] = {}

        def finished(job_id: str) -> bool:
            if job_id not in known:
                try:
                    known[job_id] = self.queue.get(job_id).finished
                except NotFound:
                    known[job_id] = True
            return known[job_id]

        for _ in range(_CAS_TRIES):
            try:
                stored = self.store.get(path)
                record, etag = json.loads(stored.data), stored.etag
            except NotFound:
                record, etag = {"active": {}}, None
            change(record["active"], finished)
            data = json.dumps(record).encode()
            try:
                if etag is None:
                    self.store.put_if_absent(path, data, "application/json")
                else:
                    self.store.put_if_match(path, data, etag, "application/json")
                return
            except (PreconditionFailed, NotFound):
                continue
        raise StorageError(f"quota of {owner}: too many concurrent updates")

    def _path(self, owner: str) -> str:
        return f"quotas/{owner}.json"
