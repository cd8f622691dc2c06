"""The served product end to end: a real uvicorn server on 127.0.0.1 with its in-process worker and local store."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from image_gen.api.app import create_app
from image_gen.settings import load_settings
from storage.pnginfo import read_png_info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The whole app (API, studio, one in-process worker) on a free loopback port."""
    settings = load_settings(models_dir=tiny_models_dir, store=str(tmp_path_factory.mktemp("store")),
                             default_model="tiny-sd", device="cpu", port=_free_port(), request_timeout_s=60)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield base
    uv.should_exit = True
    thread.join(timeout=30)


def _wait(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_job_runs_through_the_queue_and_its_png_carries_the_request(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as client:
        submitted = client.post("/v1/jobs", json={"prompt": "a red circle", "seed": 11, "steps": 2, "n": 2,
                                                  "size": "64x64"})
        assert submitted.status_code == 202, submitted.text
        job = _wait(client, submitted.json()["id"])
        assert job["status"] == "succeeded", job
        assert [image["seed"] for image in job["images"]] == [11, 12]
        png = client.get(job["images"][1]["url"])
        assert png.headers["content-type"] == "image/png"
        info = read_png_info(png.content)
        assert info.parameters["seed"] == 12
        assert info.request["request"]["prompt"] == "a red circle"
        assert info.request["request"]["model"] == "tiny-sd"


def test_openai_style_generation_returns_b64_png(server: str) -> None:
    with httpx.Client(base_url=server, timeout=60) as client:
        response = client.post("/v1/images/generations", json={"prompt": "a blue square", "seed": 5, "steps": 2,
                                                                "size": "64x64", "response_format": "b64_json"})
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)


def test_bad_requests_get_openai_shaped_4xx(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as client:
        cases = [
            ({"prompt": "x", "size": "65x64"}, "size"),
            ({"prompt": "x", "steps": 0}, "steps"),
            ({"prompt": "x", "model": "no-such-model"}, "model"),
            ({"prompt": "x", "scheduler": "bogus"}, "scheduler"),
            ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
            ({"prompt": ""}, "prompt"),
        ]
        for body, param in cases:
            response = client.post("/v1/jobs", json=body)
            assert 400 <= response.status_code < 500, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert param in (error["param"] or "") + error["message"], (body, error)
        assert client.get("/v1/jobs/local.nonexistent").status_code == 404


def test_events_stream_ends_with_done(server: str) -> None:
    with httpx.Client(base_url=server, timeout=60) as client:
        job_id = client.post("/v1/jobs", json={"prompt": "a star", "steps": 3, "size": "64x64"}).json()["id"]
        kinds = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kinds.append(line.removeprefix("event: "))
                if line.startswith("data: ") and kinds[-1] == "done":
                    assert json.loads(line.removeprefix("data: "))["images"]
        assert kinds[-1] == "done"


def test_studio_page_is_served(server: str) -> None:
    response = httpx.get(server + "/", timeout=30)
    assert response.status_code == 200
    assert "image-gen studio" in response.text
