"""The served API end to end on a single-user server (no keys): OpenAI and web UI compatibility, jobs, events,
validation, metrics, and the examples of docs/api.md run as written."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from storage.pnginfo import read_png_info

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
FINISHED = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def server(start_api: Callable[..., str]) -> str:
    return start_api(with_studio=True)


@pytest.fixture
def client(server: str) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def wait_for(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in FINISHED:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_openai_client_generates_b64_pngs_whose_metadata_matches_the_request(server: str) -> None:
    openai = OpenAI(base_url=f"{server}/v1", api_key="any-key-while-the-server-has-none")
    result = openai.images.generate(
        model="tiny-sd", prompt="a red circle", n=2, size="32x32", response_format="b64_json",
        extra_body={"seed": 7, "steps": 2, "negative_prompt": "blue"},
    )  # fmt: skip
    assert len(result.data) == 2
    for offset, item in enumerate(result.data):
        png = base64.b64decode(item.b64_json)
        assert Image.open(io.BytesIO(png)).size == (32, 32)
        info = read_png_info(png)
        assert info.parameters["prompt"] == "a red circle"
        assert info.parameters["negative_prompt"] == "blue"
        assert (info.parameters["seed"], info.parameters["steps"]) == (7 + offset, 2)
        assert (info.parameters["width"], info.parameters["height"]) == (32, 32)
        assert info.request["request"]["model"] == "tiny-sd"


def test_openai_client_url_format_gives_signed_links_that_fetch_the_png(server: str) -> None:
    openai = OpenAI(base_url=f"{server}/v1", api_key="unused")
    result = openai.images.generate(
        model="tiny-sd",
        prompt="a green star",
        size="48x32",
        response_format="url",
        extra_body={"seed": 3, "steps": 1},
    )
    url = result.data[0].url
    assert url.startswith(server) and "signature=" in url and "expires=" in url
    png = httpx.get(url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    info = read_png_info(png.content)
    assert (info.parameters["prompt"], info.parameters["seed"]) == ("a green star", 3)
    assert Image.open(io.BytesIO(png.content)).size == (48, 32)
    tampered = re.sub(r"signature=(\w)", lambda m: "signature=" + ("1" if m[1] == "0" else "0"), url)
    assert tampered != url
    assert httpx.get(tampered).status_code == 404
    expired = re.sub(r"expires=\d+", "expires=1", url)
    assert httpx.get(expired).status_code == 404


def test_on_an_s3_store_image_links_are_presigned_expiring_urls_that_download_the_png(
    start_api: Callable[..., str], s3_bucket: str, moto_endpoint: str
) -> None:
    server = start_api(store=f"s3://{s3_bucket}/image-gen", image_url_expires_s=600)
    with httpx.Client(base_url=server, timeout=60) as client:
        generated = client.post(
            "/v1/images/generations",
            json={"prompt": "a blue square", "size": "32x32", "steps": 1, "seed": 5, "response_format": "url"},
        )
        assert generated.status_code == 200, generated.text
        url = generated.json()["data"][0]["url"]
        (job,) = client.get("/v1/jobs").json()["data"]
        owned = client.get(job["images"][0]["url"])  # the owner's GET /v1/images/{id}

    # The link is the store's, presigned (S3 signature v4) for image_url_expires_s from now.
    query = parse_qs(urlparse(url).query)
    assert url.startswith(f"{moto_endpoint}/{s3_bucket}/image-gen/"), url
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Signature"][0]
    assert query["X-Amz-Expires"] == ["600"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(signed_at.timestamp() - time.time()) < 120
    # It downloads the PNG over plain HTTP, without a key or credentials: the bytes the owner gets from the API.
    png = httpx.get(url)
    assert png.status_code == 200, png.text
    assert png.content == owned.content and owned.headers["content-type"] == "image/png"
    info = read_png_info(png.content)
    assert (info.parameters["prompt"], info.parameters["seed"]) == ("a blue square", 5)


def test_jpeg_and_webp_output_formats(client: httpx.Client) -> None:
    for output_format, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        response = client.post(
            "/v1/images/generations",
            json={
                "prompt": "x",
                "size": "32x32",
                "steps": 1,
                "output_format": output_format,
                "output_compression": 50,
            },
        )
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["data"][0]["b64_json"]).startswith(magic)


def test_quality_low_uses_the_models_speed_preset(client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json={"prompt": "x", "quality": "low", "size": "32x32"}).json()
    models = client.get("/v1/models").json()["data"]
    speed = next(m for m in models if m["id"] == "tiny-sd")["presets"]["speed"]
    assert job["params"]["steps"] == speed["steps"]
    wait_for(client, job["id"])


def test_job_runs_through_the_queue_and_its_png_carries_the_request(client: httpx.Client) -> None:
    submitted = client.post(
        "/v1/jobs", json={"prompt": "a red circle", "seed": 11, "steps": 2, "n": 2, "size": "64x64"}
    )
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["location"] == f"/v1/jobs/{submitted.json()['id']}"
    job = wait_for(client, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    assert [image["seed"] for image in job["images"]] == [11, 12]
    png = client.get(job["images"][1]["url"])
    assert png.headers["content-type"] == "image/png"
    info = read_png_info(png.content)
    assert info.parameters["seed"] == 12
    assert info.request["request"]["prompt"] == "a red circle"
    assert (
        client.get(job["images"][1]["url"], params={"thumbnail": True}).headers["content-type"]
        == "image/webp"
    )


def test_idempotency_key_returns_the_first_job(client: httpx.Client) -> None:
    body = {"prompt": "once", "steps": 1, "size": "32x32"}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"}).json()
    again = client.post(
        "/v1/jobs", json={**body, "prompt": "twice"}, headers={"Idempotency-Key": "order-42"}
    ).json()
    assert again["id"] == first["id"]
    assert again["params"]["prompt"] == "once"
    wait_for(client, first["id"])


def test_jobs_list_filters_by_status_and_paginates(client: httpx.Client) -> None:
    ids = [
        client.post("/v1/jobs", json={"prompt": f"p{i}", "steps": 1, "size": "32x32"}).json()["id"]
        for i in range(3)
    ]
    for job_id in ids:
        wait_for(client, job_id)
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/jobs", params={"limit": 2, "status": "succeeded", **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        seen += [job["id"] for job in page.json()["data"]]
        assert all(job["status"] == "succeeded" for job in page.json()["data"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert set(ids) <= set(seen)
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 400


def test_cancel_a_queued_job(client: httpx.Client) -> None:
    busy = client.post("/v1/jobs", json={"prompt": "long", "steps": 150, "n": 4, "size": "64x64"}).json()
    queued = client.post("/v1/jobs", json={"prompt": "never", "steps": 1, "size": "32x32"}).json()
    canceled = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert canceled.status_code == 200
    assert wait_for(client, queued["id"])["status"] == "canceled"
    client.post(f"/v1/jobs/{busy['id']}/cancel")
    assert wait_for(client, busy["id"])["status"] == "canceled"


def test_events_stream_progress_then_done(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json={"prompt": "a star", "steps": 4, "size": "64x64"}).json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "done" and events[-1][1]["images"]
    assert {kind for kind, _ in events} <= {"queued", "progress", "done"}


def test_sdapi_txt2img_returns_images_and_info(client: httpx.Client) -> None:
    payload = {
        "prompt": "a lighthouse", "negative_prompt": "fog", "seed": 1234, "steps": 2, "cfg_scale": 6.5,
        "width": 48, "height": 32, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 1, "restore_faces": False,
        "enable_hr": False, "styles": [], "override_settings": {"sd_model_checkpoint": "tiny-sd"},
        "alwayson_scripts": {}, "save_images": False,
    }  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1234, 1235]
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("Euler a", 2, 6.5)
    assert (info["width"], info["height"], info["sd_model_name"]) == (48, 32, "tiny-sd")
    assert len(body["images"]) == 2 and len(info["infotexts"]) == 2
    png = base64.b64decode(body["images"][1])
    parameters = read_png_info(png).parameters
    assert (parameters["prompt"], parameters["seed"], parameters["sampler"]) == (
        "a lighthouse",
        1235,
        "Euler a",
    )
    assert "Seed: 1235" in info["infotexts"][1]
    refused = client.post("/sdapi/v1/txt2img", json={**payload, "enable_hr": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "enable_hr"


def test_sdapi_lists_models_samplers_options_and_progress(client: httpx.Client) -> None:
    models = client.get("/sdapi/v1/sd-models").json()
    assert {"tiny-sd", "tiny-lcm"} <= {model["model_name"] for model in models}
    assert all(model["title"].endswith(f"[{model['hash']}]") for model in models)
    samplers = {sampler["name"] for sampler in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M Karras", "DDIM", "LCM"} <= samplers
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-sd")
    progress = client.get("/sdapi/v1/progress")
    assert progress.status_code == 200 and 0 <= progress.json()["progress"] <= 1


BAD_REQUESTS = [
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "bell \x07"}, "prompt"),
    ({"prompt": "x", "size": "65x64"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "48x7"}, "height 7"),
    ({"prompt": "x", "size": "0x0"}, "width 0"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 151}, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ({"prompt": "x", "seed": -5}, "seed"),
    ({"prompt": "x", "model": "no-such-model"}, "model"),
    ({"prompt": "x", "scheduler": "bogus"}, "scheduler"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "x", "quality": "ultra"}, "quality"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "background": "transparent"}, "background"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": 5}, "prompt"),
    ([1, 2], None),
    ("a string", None),
]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_bad_requests_get_openai_shaped_4xx(client: httpx.Client, path: str) -> None:
    for body, param in BAD_REQUESTS:
        response = client.post(path, json=body)
        assert response.status_code == (404 if param == "model" else 400), (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        if param is not None:
            assert param in (error["param"] or "") + error["message"], (body, error)
    malformed = [b"{not json", b"[" * 60000, b'{"prompt": "\\ud800"}', b"\xff\xfe"]
    for raw in malformed:
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (raw[:20], response.text)
        assert "message" in response.json()["error"]
    too_big = client.post(path, json={"prompt": "x" * 70000})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert client.post(path, json={"prompt": "x", "webhook_url": "http://10.0.0.1/"}).status_code == 400


def test_unknown_ids_and_routes_get_openai_shaped_404(client: httpx.Client) -> None:
    for path in (
        "/v1/jobs/local.nonexistent",
        "/v1/jobs/x/events",
        "/v1/images/local.0100000000000aaaaaaaa_0",
        "/v1/jobs/local.0100000000000aaaaaaaa/webhook",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    client.get("/v1/models")
    generated = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", "steps": 1})
    assert generated.status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(
        r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="(\\.|[^"\\])*",?)*\})? -?(\d+(\.\d+)?(e[-+]?\d+)?|\+Inf)$'
    )
    types = {}
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
    assert types["image_gen_http_requests_total"] == "counter"
    assert types["image_gen_http_request_duration_seconds"] == "histogram"
    for name in ("image_gen_queue_depth", "image_gen_jobs", "image_gen_images_per_second"):
        assert types[name] == "gauge"
    assert types["image_gen_generation_seconds"] == "histogram"
    text = response.text
    assert 'image_gen_http_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert 'image_gen_jobs_finished_total{status="succeeded"}' in text
    assert re.search(r"^image_gen_images_generated_total [1-9]", text, re.M)
    assert re.search(r"^image_gen_generation_seconds_count [1-9]", text, re.M)


def test_health_readiness_and_studio(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    studio = client.get("/")
    assert studio.status_code == 200 and "image-gen studio" in studio.text


def _examples(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.S)


@pytest.mark.parametrize("language", ["python", "bash"])
def test_docs_examples_run_as_written(server: str, tmp_path: Path, language: str) -> None:
    """Every ```python and ```bash block of docs/api.md, against this server (IMAGE_GEN_URL points at it)."""
    blocks = _examples(language)
    assert blocks, f"docs/api.md has no {language} example"
    env = {**os.environ, "IMAGE_GEN_URL": server, "IMAGE_GEN_KEY": "unused-without-keys"}
    for block in blocks:
        command = (
            [sys.executable, "-c", block]
            if language == "python"
            else ["bash", "-euo", "pipefail", "-c", block]
        )
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{block}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
