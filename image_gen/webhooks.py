"""Webhooks: unsafe targets refused at submit; signed job events delivered with retries, each attempt recorded.

Delivery runs beside the workers, not in them: every API process runs a `WebhookDispatcher` thread that looks at
`webhooks/pending/` in the store for jobs that have finished, claims the delivery with a compare-and-swap (so two
processes do not both send it), POSTs the event and records the attempt in `webhooks/deliveries/<job id>.json`.
A failed attempt (no 2xx within the timeout) is retried after `backoff_s`, doubling each time, up to
`max_attempts`. Receivers check `X-ImageGen-Signature: t=<unix seconds>,v1=<hex>`, an HMAC-SHA256 with their
secret over `<t>.<body>` (`verify_signature` below), and deduplicate on `X-ImageGen-Delivery`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from image_gen import __version__
from image_gen.auth import ServerSecret
from image_gen.errors import ImageGenError
from storage.objects import NotFound, ObjectStore, PreconditionFailed
from storage.queue import Job, JobQueue

if TYPE_CHECKING:
    from image_gen.metrics import Metrics

log = logging.getLogger("image_gen.webhooks")

SIGNATURE_HEADER = "X-ImageGen-Signature"
EVENT_HEADER = "X-ImageGen-Event"
DELIVERY_HEADER = "X-ImageGen-Delivery"
ATTEMPT_HEADER = "X-ImageGen-Attempt"
PENDING_PREFIX = "webhooks/pending/"
RECORD_PREFIX = "webhooks/deliveries/"
MAX_BACKOFF_S = 3600.0
EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether `header` (X-ImageGen-Signature) signs `body` with `secret` and is at most `tolerance_s` old."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


def parse_networks(cidrs: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:
        raise ImageGenError(
            f"webhook_url host {host!r} does not resolve: {error}",
            param="webhook_url",
            code="webhook_url_refused",
        ) from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def _public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


def check_target(url: str, allowed: Sequence[Network] = ()) -> None:
    """Refuse (ImageGenError `webhook_url_refused`) a webhook URL that is not http(s), carries credentials, or
    resolves to any private, loopback, link-local, metadata or otherwise non-public address outside `allowed`."""

    def refuse(why: str) -> ImageGenError:
        return ImageGenError(f"webhook_url refused: {why}", param="webhook_url", code="webhook_url_refused")

    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise refuse(f"not a URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refuse("use an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise refuse("credentials in the URL are not allowed: authenticate with the signature instead")
    for address in _addresses(parts.hostname, port):
        if not _public(address) and not any(address in network for network in allowed):
            named = (
                parts.hostname
                if parts.hostname.strip("[]") == str(address)
                else f"{parts.hostname} ({address})"
            )
            raise refuse(
                f"{named} is a private, loopback, link-local or reserved address "
                "(the server's webhook_allowed_networks setting can allow such networks)"
            )


class WebhookDispatcher:
    """Registers webhooks at submit and delivers them once their jobs finish (`run` in a thread, or `run_once`).

    `render(job)` gives the job as the API shows it (the event's `data`)."""

    def __init__(
        self,
        store: ObjectStore,
        queue: JobQueue,
        secret: ServerSecret,
        render: Callable[[Job], dict[str, Any]],
        *,
        allowed_networks: Sequence[str] = (),
        max_attempts: int = 8,
        backoff_s: float = 2.0,
        timeout_s: float = 10.0,
        poll_s: float = 1.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queue = queue
        self.secret = secret
        self.render = render
        self.allowed = parse_networks(allowed_networks)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.metrics = metrics
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def secret_for(self, owner: str) -> str:
        """The signing secret of an owner's webhooks (the same in every API process on the store)."""
        return "whsec_" + self.secret.derive(f"webhook:{owner}").hex()

    def check(self, url: str) -> None:
        check_target(url, self.allowed)

    def register(self, job: Job, url: str) -> None:
        """Record that `job` (just submitted) wants its outcome posted to `url`. A resubmission with the same
        idempotency key keeps the first registration, and repairs its pending mark if the first submit stopped
        before writing it (a mark whose delivery is over is dropped by the dispatcher)."""
        record = {
            "object": "webhook",
            "job_id": job.id,
            "owner": job.owner,
            "url": url,
            "state": "pending",
            "attempts": [],
            "next_attempt_at": 0.0,
            "lease_until": 0.0,
            "created_at": self._clock(),
        }
        with suppress(PreconditionFailed):
            self.store.put_if_absent(
                self._record_key(job.id), json.dumps(record).encode(), "application/json"
            )
        self.store.put(PENDING_PREFIX + job.id, b"{}", "application/json")

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The delivery record of a job's webhook (its attempts), or None if it has none."""
        try:
            record = json.loads(self.store.get(self._record_key(job_id)).data)
        except NotFound:
            return None
        record.pop("lease_until", None)
        return record

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("webhook dispatcher error")
            self._stop.wait(self.poll_s)

    def run_once(self) -> int:
        """Deliver every due webhook of a finished job once; returns the number of attempts made."""
        attempts = 0
        pending = list(self.store.list(PENDING_PREFIX))
        if not pending:  # the usual case: no HTTP client (and its TLS context, ~20 ms of CPU) to build
            return 0
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False, trust_env=False) as client:
            for key in pending:
                if self._stop.is_set():
                    break
                attempts += self._attempt(client, key.removeprefix(PENDING_PREFIX))
        return attempts

    def _attempt(self, client: httpx.Client, job_id: str) -> int:
        try:
            job = self.queue.get(job_id)
            stored = self.store.get(self._record_key(job_id))
        except NotFound:
            self.store.delete(PENDING_PREFIX + job_id)
            return 0
        record, now = json.loads(stored.data), self._clock()
        if record["state"] != "pending":
            self.store.delete(PENDING_PREFIX + job_id)
            return 0
        if not job.finished or record["next_attempt_at"] > now or record["lease_until"] > now:
            return 0
        record["lease_until"] = now + self.timeout_s + 5
        try:
            etag = self.store.put_if_match(
                self._record_key(job_id), json.dumps(record).encode(), stored.etag, "application/json"
            )
        except (PreconditionFailed, NotFound):
            return 0  # another process is delivering it
        attempt = self._deliver(client, record, job)
        record["attempts"].append(attempt)
        if attempt["ok"]:
            record["state"] = "delivered"
        elif len(record["attempts"]) >= self.max_attempts:
            record["state"] = "failed"
        else:
            wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (len(record["attempts"]) - 1))
            record["next_attempt_at"] = self._clock() + wait
        record["lease_until"] = 0.0
        self.store.put_if_match(
            self._record_key(job_id), json.dumps(record).encode(), etag, "application/json"
        )
        if record["state"] != "pending":
            self.store.delete(PENDING_PREFIX + job_id)
        if self.metrics is not None:
            self.metrics.webhook_deliveries.inc(result="delivered" if attempt["ok"] else "failed")
        return 1

    def _deliver(self, client: httpx.Client, record: dict[str, Any], job: Job) -> dict[str, Any]:
        event = EVENTS[job.status]
        number = len(record["attempts"]) + 1
        body = json.dumps(
            {
                "id": job.id,
                "object": "event",
                "type": event,
                "created": int(job.updated_at),
                "data": self.render(job),
            },
            separators=(",", ":"),
        ).encode()
        started = time.monotonic()
        attempt: dict[str, Any] = {"at": self._clock(), "event": event, "status_code": None, "error": None}
        try:
            self.check(record["url"])  # again: the name may resolve elsewhere now
            timestamp = int(time.time())
            response = client.post(
                record["url"],
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": f"image-gen-webhooks/{__version__}",
                    EVENT_HEADER: event,
                    DELIVERY_HEADER: job.id,
                    ATTEMPT_HEADER: str(number),
                    SIGNATURE_HEADER: sign(self.secret_for(job.owner), timestamp, body),
                },
            )
            attempt["status_code"] = response.status_code
            if not response.is_success:
                attempt["error"] = f"HTTP {response.status_code}"
        except ImageGenError as error:
            attempt["error"] = error.message
        except httpx.HTTPError as error:
            attempt["error"] = f"{type(error).__name__}: {error}"[:500]
        attempt["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        attempt["ok"] = attempt["error"] is None
        log.info(
            "webhook %s of job %s attempt %d: %s", event, job.id, number, attempt["error"] or "delivered"
        )
        return attempt

    def _record_key(self, job_id: str) -> str:
        return f"{RECORD_PREFIX}{job_id}.json"
