"""Best-of-N: a request with `best_of` generates that many candidates and presents the best n by CLIPScore against
the prompt, in the service, the images endpoint and jobs; bad values are refused with a 4xx."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from eval.clip import load_scorer
from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from image_gen.worker import Worker
from pipelines.params import GenerationParams
from pipelines.registry import ModelRegistry
from storage.objects import LocalObjectStore
from storage.queue import JobQueue

PROMPT = "a red circle left of a blue star"


# --- the service, with a scorer whose scores are known ----------------------------------------------------------


class KnownScores:
    """A scorer that gives the i-th image it is shown score `scores[i]` and counts its calls."""

    def __init__(self, scores: list[float]):
        self.scores, self.calls = scores, 0

    def score(self, images, texts) -> np.ndarray:
        self.calls += 1
        assert all(text == PROMPT for text in texts)
        return np.array(self.scores[: len(images)])

    def identity(self) -> dict:
        return {"name": "known", "content_hash": "0"}


@pytest.fixture
def service_with(tiny_models_dir: Path, tmp_path: Path) -> Callable[[KnownScores], tuple[GenerationService, Worker]]:
    def build(scorer: KnownScores) -> tuple[GenerationService, Worker]:
        registry = ModelRegistry([tiny_models_dir], device="cpu", hash_cache=tmp_path / "hashes.json")
        store = LocalObjectStore(tmp_path / "store")
        queue = JobQueue(store)
        return GenerationService(registry, store, queue, "tiny-sd", scorer=lambda: scorer), Worker(queue, store, registry)

    return build


def test_the_service_presents_the_best_n_candidates_best_first_and_ranks_once(service_with):
    scorer = KnownScores([10.0, 30.0, 20.0, 30.0])
    service, worker = service_with(scorer)
    params = GenerationParams(prompt=PROMPT, num_images=2, steps=1, seed=11)
    job = service.submit("alice", params, best_of=4)
    assert job.payload["params"]["num_images"] == 4 and service.best_of(job) == 4
    assert worker.run_once() == 1
    job = service.job("alice", job.id)
    chosen = service.images_of("alice", job)
    assert [record["seed"] for record in chosen] == [12, 14]  # 30 and 30 (ties keep candidate order), not 20
    assert [record["clip_score"] for record in chosen] == [30.0, 30.0]
    assert service.images_of("alice", job) == chosen and scorer.calls == 1  # stored, not scored again


def test_jobs_without_best_of_present_every_image_unscored(service_with):
    scorer = KnownScores([])
    service, worker = service_with(scorer)
    job = service.submit("alice", GenerationParams(prompt=PROMPT, num_images=2, steps=1, seed=1))
    worker.run_once()
    records = service.images_of("alice", service.job("alice", job.id))
    assert [record["seed"] for record in records] == [1, 2] and "clip_score" not in records[0]
    assert scorer.calls == 0


@pytest.mark.parametrize("best_of", [1, 17, 0, True])
def test_the_service_refuses_best_of_outside_n_to_16(service_with, best_of):
    service, _ = service_with(KnownScores([]))
    with pytest.raises(ImageGenError, match="best_of") as error:
        service.submit("alice", GenerationParams(prompt=PROMPT, num_images=2, steps=1), best_of=best_of)
    assert error.value.param == "best_of"


def test_a_server_without_a_scorer_refuses_best_of_instead_of_failing_later(tiny_models_dir: Path, tmp_path: Path):
    def missing():
        raise ValueError("the bundled in-house CLIP is missing")

    store = LocalObjectStore(tmp_path / "store")
    registry = ModelRegistry([tiny_models_dir], device="cpu", hash_cache=tmp_path / "hashes.json")
    service = GenerationService(registry, store, JobQueue(store), "tiny-sd", scorer=missing)
    with pytest.raises(ImageGenError, match="best_of is not available") as error:
        service.submit("alice", GenerationParams(prompt=PROMPT, steps=1), best_of=2)
    assert error.value.code == "model_load_failed"


# --- the REST API, with the bundled in-house CLIP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_api: Callable[..., str]) -> str:
    return start_api(max_images=6)


@pytest.fixture
def client(server: str) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


def _scores_of(client: httpx.Client, image_ids: list[str]) -> dict[str, float]:
    """The bundled scorer's CLIPScore of each stored candidate, computed here independently."""
    images = [Image.open(io.BytesIO(client.get(f"/v1/images/{image_id}").content)) for image_id in image_ids]
    return dict(zip(image_ids, load_scorer().score(images, [PROMPT] * len(images)).tolist(), strict=True))


def test_images_endpoint_returns_the_candidate_the_scorer_ranks_best(client: httpx.Client):
    body = {"prompt": PROMPT, "n": 1, "best_of": 3, "size": "32x32", "steps": 2, "seed": 40}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    (data,) = response.json()["data"]
    job = client.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert job["best_of"] == 3 and job["params"]["num_images"] == 3
    candidates = [f"{job['id']}_{index}" for index in range(3)]
    scores = _scores_of(client, candidates)
    best = max(candidates, key=lambda image_id: scores[image_id])
    assert data["clip_score"] == pytest.approx(scores[best], abs=1e-3)
    assert base64.b64decode(data["b64_json"]) == client.get(f"/v1/images/{best}").content


def test_a_best_of_job_lists_its_n_best_candidates_best_first(client: httpx.Client):
    body = {"prompt": PROMPT, "n": 2, "best_of": 4, "size": "32x32", "steps": 2, "seed": 70}
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)
    scores = _scores_of(client, [f"{job_id}_{index}" for index in range(4)])
    expected = sorted(scores, key=lambda image_id: -scores[image_id])[:2]
    assert job["best_of"] == 4 and [image["id"] for image in job["images"]] == expected
    assert [image["clip_score"] for image in job["images"]] == pytest.approx([scores[i] for i in expected], abs=1e-3)
    assert client.get(f"/v1/jobs/{job_id}").json()["images"] == job["images"]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/images/generations", {"best_of": 0}, "greater than or equal to 1"),
    ("/v1/images/generations", {"best_of": 11}, "less than or equal to 10"),
    ("/v1/images/generations", {"best_of": "many"}, "valid integer"),
    ("/v1/images/generations", {"n": 3, "best_of": 2}, "best_of (2) must be at least n (3)"),
    ("/v1/jobs", {"n": 2, "best_of": 1}, "best_of (1) must be at least n (2)"),
    ("/v1/jobs", {"best_of": 8}, "best_of 8 candidates is over this server's limit of 6 images"),
])
def test_bad_best_of_values_are_refused_with_400(client: httpx.Client, path: str, body: dict, message: str):
    response = client.post(path, json={"prompt": PROMPT, "size": "32x32", "steps": 1, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == "best_of"
