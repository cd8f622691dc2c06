"""Webhooks end to end: a loopback receiver (allowed explicitly by the server's settings) gets signed events,
retried with backoff, every attempt recorded; unsafe targets are refused at submit."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from image_gen.errors import ImageGenError
from image_gen.webhooks import check_target, parse_networks, sign, verify_signature

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
JOB = {"prompt": "a webhook", "steps": 1, "size": "32x32"}


@dataclass
class Receiver:
    """A loopback HTTP server answering `statuses` in turn (then 200), recording each delivery."""

    statuses: list[int]
    deliveries: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def wait(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries arrived"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(statuses=[500, 503])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.deliveries.append((time.monotonic(), dict(self.headers), body))
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/image-gen"
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def server(start_api: Callable[..., str]) -> str:
    return start_api(
        webhook_allowed_networks=["127.0.0.0/8"],
        webhook_backoff_s=0.3,
        webhook_poll_s=0.05,
        webhook_max_attempts=4,
    )


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(client: httpx.Client, job_id: str, state: str) -> dict:
    deadline = time.monotonic() + 30
    while (record := client.get(f"/v1/jobs/{job_id}/webhook").json())["state"] != state:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    return record


def test_webhook_arrives_signed_and_is_retried_with_backoff_and_recorded(
    client: httpx.Client, receiver: Receiver
) -> None:
    secret = client.get("/v1/webhooks/secret").json()["secret"]
    job = client.post("/v1/jobs", json={**JOB, "webhook_url": receiver.url})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    receiver.wait(3)
    for number, (_, headers, body) in enumerate(receiver.deliveries, start=1):
        assert verify_signature(secret, headers["X-ImageGen-Signature"], body)
        stamp, digest = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", headers["X-ImageGen-Signature"]).groups()
        assert digest == hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert abs(int(stamp) - time.time()) < 60
        assert (headers["X-ImageGen-Attempt"], headers["X-ImageGen-Delivery"]) == (str(number), job_id)
        event = json.loads(body)
        assert (event["type"], event["id"], event["data"]["id"], event["data"]["status"]) == (
            "job.succeeded",
            job_id,
            job_id,
            "succeeded",
        )
        assert event["data"]["images"][0]["url"] == f"/v1/images/{job_id}_0"
    times = [at for at, _, _ in receiver.deliveries]
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.6, "backoff doubles"
    record = _record(client, job_id, "delivered")
    assert [a["status_code"] for a in record["attempts"]] == [500, 503, 200]
    assert [a["ok"] for a in record["attempts"]] == [False, False, True]
    assert record["url"] == receiver.url
    time.sleep(0.3)
    assert len(receiver.deliveries) == 3, "a delivered webhook is not sent again"
    metrics = client.get("/metrics").text
    delivered = re.search(r'^image_gen_webhook_deliveries_total\{result="delivered"\} (\d+)', metrics, re.M)
    assert delivered and int(delivered[1]) >= 1


def test_a_webhook_that_never_succeeds_is_given_up_after_max_attempts(client: httpx.Client) -> None:
    closed = f"http://127.0.0.1:{_free_port()}/nobody-listens"
    job_id = client.post("/v1/jobs", json={**JOB, "webhook_url": closed}).json()["id"]
    record = _record(client, job_id, "failed")
    assert len(record["attempts"]) == 4
    assert all(a["status_code"] is None and "Connect" in a["error"] for a in record["attempts"])


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.20:8080/",
        "http://172.16.0.1/",
        "http://100.100.100.200/",
        "http://[::1]/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:10.0.0.1]/",
        "http://0.0.0.0/",
        "http://0x0a000001/",
        "ftp://example.com/",
        "http://user:password@127.0.0.1/",
        "not a url",
    ],
)
def test_unsafe_webhook_targets_are_refused_at_submit(client: httpx.Client, url: str) -> None:
    before = len(client.get("/v1/jobs", params={"limit": 100}).json()["data"])
    response = client.post("/v1/jobs", json={**JOB, "webhook_url": url})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("webhook_url", "webhook_url_refused")
    assert len(client.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before, "no job was queued"


def test_loopback_is_refused_unless_allowed() -> None:
    for url in ("http://127.0.0.1:9/", "http://localhost/"):
        with pytest.raises(ImageGenError, match="loopback"):
            check_target(url)
        check_target(url, parse_networks(["127.0.0.0/8", "::1/128"]))
    check_target("https://93.184.216.34/hook")  # a public address (an IP literal: no DNS needed)


def test_signatures_reject_tampering_other_secrets_and_old_timestamps() -> None:
    body = b'{"id":"x"}'
    now = int(time.time())
    header = sign("whsec_a", now, body)
    assert verify_signature("whsec_a", header, body)
    assert not verify_signature("whsec_a", header, body + b" ")
    assert not verify_signature("whsec_b", header, body)
    assert not verify_signature("whsec_a", sign("whsec_a", now - 600, body), body)
    assert not verify_signature("whsec_a", "v1=" + header.split("v1=")[1], body)
    assert not verify_signature("whsec_a", "garbage", body)


def test_the_receiver_example_in_the_docs_verifies_a_real_delivery(client: httpx.Client) -> None:
    example = re.search(r"```python receiver\n(.*?)```", DOCS.read_text(), re.S)
    assert example, "docs/api.md has no receiver example"
    port = _free_port()
    secret = client.get("/v1/webhooks/secret").json()["secret"]
    env = {**os.environ, "WEBHOOK_SECRET": secret, "PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-c", example.group(1)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.05)
        job = client.post("/v1/jobs", json={**JOB, "webhook_url": f"http://127.0.0.1:{port}/"})
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    job_id = job.json()["id"]
    assert process.returncode == 0, err
    assert out.split() == ["job.succeeded", job_id]
    assert _record(client, job_id, "delivered")["attempts"][-1]["status_code"] == 204
