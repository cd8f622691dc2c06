"""Prometheus metrics of one API process, rendered in the text exposition format (version 0.0.4).

HTTP requests come from `HttpMetrics` (ASGI middleware); jobs, generation time and images from `MeteredJobQueue`
(the queue of the process's worker threads) or from the reports of its worker processes (`ReportingJobQueue`); queue
depth and jobs by status are read from the store when scraped (cached for a few seconds, since that is a listing).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.objects import ObjectStore
from storage.queue import Job, JobCanceled, JobQueue, Lease

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0
GAUGE_CACHE_S = 5.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[name]) for name in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(str(labels[name]) for name in self.label_names), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.label_names, key)} {_number(v)}" for key, v in items]
        return lines


class Gauge:
    """A gauge read at scrape time from `read()`, which returns {label values: value}."""

    def __init__(
        self,
        name: str,
        help_text: str,
        read: Callable[[], dict[tuple[str, ...], float]],
        labels: tuple[str, ...] = (),
    ) -> None:
        self.name, self.help, self.label_names, self.read = name, help_text, labels, read

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        lines += [
            f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.read().items())
        ]
        return lines


class Histogram:
    def __init__(
        self, name: str, help_text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        self._series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts, then +Inf count, then sum
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[name]) for name in self.label_names)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            series[bisect.bisect_left(self.buckets, value)] += 1
            series[-1] += value

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((key, list(series)) for key, series in self._series.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, series in items:
            cumulative = 0.0
            for bound, count in zip((*self.buckets, math.inf), series[:-1], strict=True):
                cumulative += count
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-1])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(cumulative)}")
        return lines


class Metrics:
    """Every metric of the process. `queue_counts` (queued and running jobs of the whole store) is read at most
    every GAUGE_CACHE_S seconds."""

    def __init__(self, queue_counts: Callable[[], dict[str, int]] | None = None) -> None:
        self.requests = Counter(
            "image_gen_http_requests_total",
            "HTTP requests by route and status",
            ("method", "route", "status"),
        )
        self.latency = Histogram(
            "image_gen_http_request_duration_seconds",
            "HTTP request latency",
            LATENCY_BUCKETS,
            ("method", "route"),
        )
        self.jobs_submitted = Counter("image_gen_jobs_submitted_total", "jobs submitted through this process")
        self.jobs_finished = Counter(
            "image_gen_jobs_finished_total",
            "jobs this process's workers finished, by final status",
            ("status",),
        )
        self.generation_seconds = Histogram(
            "image_gen_generation_seconds",
            "denoising and decoding time of each finished job's batch",
            GENERATION_BUCKETS,
        )
        self.images = Counter(
            "image_gen_images_generated_total", "images generated by this process's workers"
        )
        self.rejected = Counter(
            "image_gen_requests_limited_total", "requests refused by a rate limit or quota", ("reason",)
        )
        self.webhook_deliveries = Counter(
            "image_gen_webhook_deliveries_total", "webhook delivery attempts by result", ("result",)
        )
        self._queue_counts = queue_counts
        self._cached: tuple[float, dict[str, int]] | None = None
        self._recent_images: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._gauges = [
            Gauge("image_gen_queue_depth", "jobs waiting in the queue (whole store)", self._depth),
            Gauge("image_gen_jobs", "unfinished jobs by status (whole store)", self._by_status, ("status",)),
            Gauge(
                "image_gen_images_per_second",
                f"images generated per second by this process over the last {RATE_WINDOW_S:g} s",
                self._images_per_second,
            ),
        ]

    def job_finished(self, status: str, result: dict[str, Any] | None = None) -> None:
        """A job this process's workers (threads or supervised processes) finished, with its final status."""
        self.jobs_finished.inc(status=status)
        if status != "succeeded" or not result:
            return
        images = len(result.get("images", []))
        self.images.inc(images)
        if isinstance(result.get("seconds"), int | float):
            self.generation_seconds.observe(result["seconds"])
        with self._lock:
            self._recent_images.append((time.monotonic(), images))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests, self.latency, self.jobs_submitted, self.jobs_finished, self.generation_seconds,
            self.images, self.rejected, self.webhook_deliveries, *self._gauges,
        ):  # fmt: skip
            lines += metric.render()
        return "\n".join(lines) + "\n"

    def _counts(self) -> dict[str, int]:
        if self._queue_counts is None:
            return {}
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > GAUGE_CACHE_S:
            self._cached = (now, self._queue_counts())
        return self._cached[1]

    def _depth(self) -> dict[tuple[str, ...], float]:
        counts = self._counts()
        return {(): counts["queued"]} if "queued" in counts else {}

    def _by_status(self) -> dict[tuple[str, ...], float]:
        return {(status,): n for status, n in self._counts().items()}

    def _images_per_second(self) -> dict[tuple[str, ...], float]:
        cutoff = time.monotonic() - RATE_WINDOW_S
        with self._lock:
            while self._recent_images and self._recent_images[0][0] < cutoff:
                self._recent_images.popleft()
            total = sum(n for _, n in self._recent_images)
        return {(): total / RATE_WINDOW_S}


class ReportingJobQueue(JobQueue):
    """A JobQueue that reports each job its workers finish (completed, dead-lettered, or canceled while running) to
    `on_finished(status, result)`: a worker process reports through it to the server that supervises it."""

    def __init__(
        self, store: ObjectStore, on_finished: Callable[[str, dict[str, Any] | None], None], **options: Any
    ) -> None:
        super().__init__(store, **options)
        self.on_finished = on_finished

    def complete(self, lease: Lease, result: dict[str, Any]) -> Job:
        job = self._watch(lambda: super(ReportingJobQueue, self).complete(lease, result))
        self.on_finished(job.status, job.result)
        return job

    def fail(self, lease: Lease, error: str, retryable: bool = True) -> Job:
        job = self._watch(lambda: super(ReportingJobQueue, self).fail(lease, error, retryable))
        if job.finished:
            self.on_finished(job.status, job.result)
        return job

    def heartbeat(self, lease: Lease, progress: dict[str, Any] | None = None) -> Lease:
        return self._watch(lambda: super(ReportingJobQueue, self).heartbeat(lease, progress))

    def _watch(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except JobCanceled:
            self.on_finished("canceled", None)
            raise


class MeteredJobQueue(ReportingJobQueue):
    """The API process's queue: submissions, and the jobs its in-process workers finish, go to `metrics`."""

    def __init__(self, store: ObjectStore, metrics: Metrics, **options: Any) -> None:
        super().__init__(store, metrics.job_finished, **options)
        self.metrics = metrics

    def submit(self, owner: str, payload: dict[str, Any], **options: Any) -> Job:
        job = super().submit(owner, payload, **options)
        self.metrics.jobs_submitted.inc()
        return job


class HttpMetrics:
    """ASGI middleware counting requests and timing them by route template (never by raw path: ids would make
    a series per job)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            if isinstance(route, Mount):
                label = (route.path or "") + "/*"
            else:
                label = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.inc(method=method, route=label, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, method=method, route=label)
