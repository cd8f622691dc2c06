"""The worker on the tiny model, against the local store and S3 (moto over HTTP): publishing, batching,
cancellation, dead letters, fair share, SIGTERM and store outages."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.config import Config
from PIL import Image

from image_gen.errors import ImageGenError
from image_gen.jobs import image_prefix, job_payload
from image_gen.service import GenerationService
from image_gen.worker import Worker
from pipelines.errors import PipelineError
from pipelines.params import GenerationParams
from pipelines.registry import ModelRegistry
from pipelines.text2image import Text2ImagePipeline
from storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore
from storage.pnginfo import read_png_info
from storage.queue import Job, JobQueue, Lease

TINY = {"model": "tiny-sd", "width": 32, "height": 32, "steps": 2}
IMAGE_GEN = Path(sys.executable).with_name("image-gen")


@pytest.fixture(scope="module")
def registry(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry([tiny_models_dir], device="cpu", hash_cache=tmp_path_factory.mktemp("cache") / "h.json")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh empty store: a directory, or a prefix in a fresh moto bucket (endpoint from AWS_ENDPOINT_URL)."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    return S3ObjectStore(request.getfixturevalue("s3_bucket"), prefix="image-gen/test")


@pytest.fixture
def queue(store: ObjectStore) -> JobQueue:
    return JobQueue(store, retry_backoff_s=0.0)


@pytest.fixture
def service(registry: ModelRegistry, store: ObjectStore, queue: JobQueue) -> GenerationService:
    return GenerationService(registry, store, queue)


def submit(service: GenerationService, owner: str, prompt: str, **params: Any) -> Job:
    return service.submit(owner, GenerationParams(prompt=prompt, **{**TINY, **params}))


class PipelineCalls:
    """Records every batch the pipeline runs (its prompts and seeds); optionally fails some of them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_if: Callable[[list[str]], bool] | None = None):
        self.batches: list[tuple[list[str], list[int]]] = []
        original = Text2ImagePipeline.__call__

        def call(pipe: Text2ImagePipeline, prompts: list[str], negatives: list[str], seeds: list[int],
                 *args: Any, **kwargs: Any) -> list[Image.Image]:
            self.batches.append((list(prompts), list(seeds)))
            if fail_if is not None and fail_if(prompts):
                raise RuntimeError("poisoned prompt: the pipeline crashed")
            return original(pipe, prompts, negatives, seeds, *args, **kwargs)

        monkeypatch.setattr(Text2ImagePipeline, "__call__", call)


def pixels(store: ObjectStore, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.get(key).data)).convert("RGB"), dtype=np.int16)


def run_until_finished(w: Worker, queue: JobQueue, jobs: list[Job], rounds: int = 20) -> list[Job]:
    for _ in range(rounds):
        current = [queue.get(job.id) for job in jobs]
        if all(job.finished for job in current):
            return current
        w.run_once()
    raise AssertionError(f"jobs not finished after {rounds} rounds: {[queue.get(j.id) for j in jobs]}")


# --- one job end to end ----------------------------------------------------------------------------------------


def test_a_job_runs_end_to_end_and_publishes_pngs_and_thumbnails_under_its_owner(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry
) -> None:
    job = submit(service, "alice", "a red circle", seed=7, num_images=2)

    assert Worker(queue, store, registry).run_once() == 1

    done = queue.get(job.id)
    assert done.status == "succeeded" and done.attempts == 1
    records = done.result["images"]
    assert [(r["id"], r["seed"], r["width"], r["height"]) for r in records] == [
        (f"{job.id}_0", 7, 32, 32), (f"{job.id}_1", 8, 32, 32)
    ]
    assert done.result["model"] == "tiny-sd" and done.result["content_hash"] == registry.get("tiny-sd").content_hash
    prefix = image_prefix("alice", job.id)
    expected = {r["key"] for r in records} | {r["key"].removesuffix(".png") + ".thumb.webp" for r in records}
    assert all(key.startswith(f"{prefix}{done.token}/") for key in expected)
    assert set(store.list(prefix)) == expected
    for record in records:
        info = read_png_info(store.get(record["key"]).data)
        assert info.parameters["seed"] == record["seed"]
        assert info.parameters["model"] == "tiny-sd"
        assert info.request["request"]["prompt"] == "a red circle"
        assert info.request["request"]["seed"] == record["seed"] and info.request["job_id"] == job.id
        thumbnail = service.image("alice", record["id"], thumbnail=True)
        assert thumbnail.content_type == "image/webp"
        assert Image.open(io.BytesIO(thumbnail.data)).size == (32, 32)
        assert service.image("alice", record["id"]).data == store.get(record["key"]).data


# --- batching --------------------------------------------------------------------------------------------------


def test_compatible_jobs_run_as_one_pipeline_call_and_get_the_images_of_single_runs(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = PipelineCalls(monkeypatch)
    requests = [("a red circle", 11, 1), ("two blue stars", 22, 2), ("a green cross", 33, 1)]
    batched = [submit(service, "alice", prompt, seed=seed, num_images=n) for prompt, seed, n in requests]

    assert Worker(queue, store, registry, max_batch=4).run_once() == 3

    assert calls.batches == [
        (["a red circle", "two blue stars", "two blue stars", "a green cross"], [11, 22, 23, 33])
    ]
    singles = [submit(service, "bob", prompt, seed=seed, num_images=n) for prompt, seed, n in requests]
    single_worker = Worker(queue, store, registry, max_batch=1)
    for _ in singles:
        assert single_worker.run_once() == 1
    assert len(calls.batches) == 4
    for in_batch, alone in zip(batched, singles, strict=True):
        a, b = queue.get(in_batch.id).result["images"], queue.get(alone.id).result["images"]
        assert [r["seed"] for r in a] == [r["seed"] for r in b]
        for x, y in zip(a, b, strict=True):
            assert read_png_info(store.get(x["key"]).data).parameters["seed"] == x["seed"]
            # A row's pixels do not depend on the other rows, up to float32 rounding of batched matmuls.
            assert np.abs(pixels(store, x["key"]) - pixels(store, y["key"])).max() <= 1


def test_incompatible_jobs_are_not_batched(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = PipelineCalls(monkeypatch)
    jobs = [
        submit(service, "alice", "two steps", steps=2),
        submit(service, "alice", "one step", steps=1),
        submit(service, "alice", "bigger", width=64, height=64),
        submit(service, "alice", "other model", model="tiny-minilm"),
    ]
    w = Worker(queue, store, registry, max_batch=4)

    assert [w.run_once() for _ in jobs] == [1, 1, 1, 1]

    assert sorted(prompts for prompts, _ in calls.batches) == sorted([job.payload["params"]["prompt"]]
                                                                     for job in jobs)
    assert all(queue.get(job.id).status == "succeeded" for job in jobs)


# --- progress and cancellation ---------------------------------------------------------------------------------


class UnetSteps:
    """Counts UNet forward passes (one per denoising step) and runs `action` right after pass `at_step`."""

    def __init__(self, registry: ModelRegistry, model: str, at_step: int, action: Callable[[], None]) -> None:
        self.count = 0
        self.unet = registry.load(model).unet

        def hook(*_: Any) -> None:
            self.count += 1
            if self.count == at_step:
                action()

        self.handle = self.unet.register_forward_hook(hook)

    def __enter__(self) -> UnetSteps:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def test_heartbeats_publish_the_progress_of_a_running_job(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry
) -> None:
    job = submit(service, "alice", "watch me", steps=40)
    seen: list[dict[str, Any] | None] = []
    with UnetSteps(registry, "tiny-sd", at_step=30, action=lambda: seen.append(queue.get(job.id).progress)):
        Worker(queue, store, registry, heartbeat_s=0.02).run_once()

    (progress,) = seen
    assert progress is not None and 1 <= progress["step"] < 30 and progress["total"] == 40
    assert progress["preview"].startswith("data:image/jpeg;base64,")
    assert queue.get(job.id).status == "succeeded"


def test_cancelling_a_running_job_stops_it_within_one_step_and_publishes_nothing(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry
) -> None:
    job = submit(service, "alice", "a long one", steps=30)
    with UnetSteps(registry, "tiny-sd", at_step=5, action=lambda: service.cancel("alice", job.id)) as steps:
        Worker(queue, store, registry).run_once()

    assert steps.count <= 6
    canceled = queue.get(job.id)
    assert canceled.status == "canceled" and canceled.result is None
    assert list(store.list(image_prefix("alice", job.id))) == []


def test_cancelling_one_job_of_a_batch_lets_the_others_finish(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry
) -> None:
    keep, cancel = (submit(service, "alice", prompt, steps=10) for prompt in ("keep me", "cancel me"))
    with UnetSteps(registry, "tiny-sd", at_step=3, action=lambda: service.cancel("alice", cancel.id)) as steps:
        assert Worker(queue, store, registry, max_batch=2).run_once() == 2

    assert steps.count == 10
    assert queue.get(keep.id).status == "succeeded"
    assert queue.get(cancel.id).status == "canceled"
    assert list(store.list(image_prefix("alice", cancel.id))) == []


def test_the_lease_is_kept_alive_through_a_model_load_longer_than_the_lease(
    store: ObjectStore, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = JobQueue(store, lease_s=1.0)
    job = submit(GenerationService(registry, store, queue), "alice", "slow to load")
    reclaimed: list[Job] = []
    load = registry.load

    def slow_load(name: str) -> Text2ImagePipeline:
        time.sleep(2.5)  # meanwhile another worker looks for expired leases
        reclaimed.extend(JobQueue(store, lease_s=1.0).reclaim_expired())
        return load(name)

    monkeypatch.setattr(registry, "load", slow_load)
    Worker(queue, store, registry, heartbeat_s=0.2).run_once()

    assert reclaimed == []
    done = queue.get(job.id)
    assert done.status == "succeeded" and done.attempts == 1


# --- failures --------------------------------------------------------------------------------------------------


def test_a_poison_job_is_dead_lettered_after_max_attempts_and_the_jobs_batched_with_it_succeed(
    service: GenerationService, queue: JobQueue, store: ObjectStore, registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = PipelineCalls(monkeypatch, fail_if=lambda prompts: "poison" in prompts)
    jobs = [submit(service, "alice", prompt) for prompt in ("fine", "poison", "also fine")]
    w = Worker(queue, store, registry, max_batch=4)

    fine, poison, also_fine = run_until_finished(w, queue, jobs)

    assert poison.status == "failed" and poison.attempts == queue.max_attempts == 3
    assert "RuntimeError: poisoned prompt" in poison.error
    assert list(store.list(image_prefix("alice", poison.id))) == []
    for job in (fine, also_fine):
        assert job.status == "succeeded" and job.attempts == 1 and len(job.result["images"]) == 1
    assert calls.batches[0][0] == ["fine", "poison", "also fine"]  # first as one batch, then one at a time


def test_a_job_whose_model_fails_to_load_is_dead_lettered_with_the_load_error(
    tiny_sd_model: Path, tiny_models_dir: Path, tmp_path: Path, store: ObjectStore, queue: JobQueue
) -> None:
    shutil.copytree(tiny_sd_model, tmp_path / "models" / "fragile")
    registry = ModelRegistry([tiny_models_dir, tmp_path / "models"], device="cpu", hash_cache=tmp_path / "h.json")
    service = GenerationService(registry, store, queue)
    broken = submit(service, "alice", "on the fragile model", model="fragile")
    fine = submit(service, "bob", "on a good model")
    for weights in (tmp_path / "models" / "fragile" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")  # the model breaks after the job was accepted

    broken, fine = run_until_finished(Worker(queue, store, registry), queue, [broken, fine])

    assert broken.status == "failed" and broken.attempts == 3
    with pytest.raises(PipelineError) as load_error:
        registry.load("fragile")
    assert broken.error == str(load_error.value) and "fragile" in broken.error
    assert fine.status == "succeeded"


# --- fair share ------------------------------------------------------------------------------------------------


class RecordingQueue(JobQueue):
    """A JobQueue that remembers the order in which it handed out jobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed: list[str] = []

    def claim(self, worker_id: str, **kwargs: Any) -> list[Lease]:
        leases = super().claim(worker_id, **kwargs)
        self.claimed += [lease.job.owner for lease in leases]
        return leases


@pytest.mark.parametrize("compatible", [True, False], ids=["same-batch-key", "other-batch-key"])
def test_another_owners_job_starts_within_the_next_max_batch_claims(
    compatible: bool, store: ObjectStore, registry: ModelRegistry
) -> None:
    queue = RecordingQueue(store)
    service = GenerationService(registry, store, queue)
    for i in range(200):
        submit(service, "alice", f"backlog {i}", steps=1)
    bobs = submit(service, "bob", "just one", steps=1 if compatible else 2)
    w = Worker(queue, store, registry, max_batch=4)

    w.run_once()
    if not compatible:
        assert queue.claimed == ["alice"] * 4
        w.run_once()

    assert queue.get(bobs.id).status == "succeeded"
    assert queue.claimed.index("bob") <= w.max_batch
    assert len(queue.claimed) <= 2 * w.max_batch


# --- worker threads sharing a registry (serve with worker_isolation="thread") ----------------------------------


def test_worker_threads_sharing_a_registry_take_turns_on_a_pipeline(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline is not thread-safe (prompt cache, VAE tiling switch): two worker threads never run one at once."""
    store = LocalObjectStore(tmp_path / "store")
    queue = JobQueue(store)
    service = GenerationService(registry, store, queue)
    original = Text2ImagePipeline.__call__
    guard = threading.Lock()
    running = 0
    seen: list[int] = []  # how many calls were running as each call started, itself included

    def call(pipe: Text2ImagePipeline, *args: Any, **kwargs: Any) -> list[Image.Image]:
        nonlocal running
        with guard:
            running += 1
            seen.append(running)
        try:
            time.sleep(0.05)  # a window in which another thread would enter
            return original(pipe, *args, **kwargs)
        finally:
            with guard:
                running -= 1

    monkeypatch.setattr(Text2ImagePipeline, "__call__", call)
    jobs = [submit(service, f"owner{i}", f"prompt {i}", steps=1) for i in range(6)]
    workers = [Worker(queue, store, registry, max_batch=1, idle_poll_s=0.02) for _ in range(2)]
    threads = [threading.Thread(target=w.run, name=f"worker-{i}") for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(queue.get(job.id).finished for job in jobs), 120, "the jobs")
    finally:
        for w in workers:
            w.stop()
        for thread in threads:
            thread.join(timeout=60)

    finished = [queue.get(job.id) for job in jobs]
    assert all(job.status == "succeeded" for job in finished)
    assert {job.worker_id for job in finished} == {w.worker_id for w in workers}  # both threads worked
    assert seen == [1] * len(jobs)


def test_the_lease_s_setting_sets_the_lease_of_every_queue(tiny_models_dir: Path, tmp_path: Path) -> None:
    from image_gen.api.app import create_app
    from image_gen.runtime import open_queue
    from image_gen.settings import load_settings

    settings = load_settings(
        store=str(tmp_path / "store"), models_dir=tiny_models_dir, device="cpu", lease_s=12, workers_in_process=0
    )
    _, queue = open_queue(settings)  # what `image-gen worker` and serve's worker processes use
    job = queue.submit("alice", {"params": {}})
    (lease,) = queue.claim("w1")
    assert queue.lease_s == 12 and lease.job.id == job.id
    assert lease.expires_at - lease.job.updated_at == pytest.approx(12, abs=0.5)
    assert create_app(settings).state.service.queue.lease_s == 12  # the API's, and its worker threads'
    with pytest.raises(ImageGenError, match="lease_s"):
        load_settings(lease_s=1)


# --- SIGTERM ---------------------------------------------------------------------------------------------------


def worker_env(tmp_path: Path) -> dict[str, str]:
    """A lean subprocess environment: one torch thread, the AWS_* variables of the s3_bucket fixture if set."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("IMAGE_GEN_")}
    return {**clean, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}


def store_url(store: ObjectStore) -> str:
    if isinstance(store, S3ObjectStore):
        return f"s3://{store.bucket}/{store.prefix}"
    assert isinstance(store, LocalObjectStore)
    return str(store.root)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, (
            f"timed out after {timeout_s:.0f} s waiting for {what}" + (f"; log:\n{log.read_text()}" if log else "")
        )
        time.sleep(poll_s)


@pytest.mark.slow
def test_sigterm_mid_job_finishes_the_job_claims_nothing_more_and_exits_0(
    service: GenerationService, queue: JobQueue, store: ObjectStore, tiny_models_dir: Path, tmp_path: Path
) -> None:
    long_job = submit(service, "alice", "a long one", steps=150)
    next_job = submit(service, "alice", "next")
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [str(IMAGE_GEN), "worker", "--store", store_url(store), "--max-batch", "1",
             "--models-dir", str(tiny_models_dir), "--device", "cpu"],
            env=worker_env(tmp_path), stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: process.poll() is None and queue.get(long_job.id).progress is not None, 180,
                 "the job to make progress", log=log_path)
        process.send_signal(signal.SIGTERM)
        assert queue.get(long_job.id).status == "running"  # so the signal came mid-job
        assert process.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    finished = queue.get(long_job.id)
    assert finished.status == "succeeded", log_path.read_text()
    assert len(finished.result["images"]) == 1
    assert queue.get(next_job.id).status == "queued"
    assert "finishing the current batch" in log_path.read_text()


# --- store outages ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Outage:
    """A moto server of its own, which an outage stops and a recovery starts again on the same port (moto keeps
    its buckets in memory, so the objects survive). The worker's client tries twice, so that a request fails in
    about a second instead of botocore's default many seconds."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = self._start()
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket="outage")

    def _start(self) -> Any:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        return server

    def store(self, attempts: int) -> S3ObjectStore:
        config = Config(retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=1, read_timeout=5)
        return S3ObjectStore("outage", "image-gen", boto3.client("s3", endpoint_url=self.endpoint, config=config))

    def begin(self) -> None:
        self.server.stop()
        self.server = None

    def end(self) -> None:
        if self.server is None:
            self.server = self._start()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class LocalOutage:
    """The store's folder made read-only (reads still work): by chmod, or for root, whom permissions do not stop,
    by `chattr +i`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.down = False
        probe = root.parent / "probe"
        probe.mkdir()
        try:
            self._read_only(probe, True)
            (probe / "x").write_bytes(b"")
            read_only = False
        except (OSError, subprocess.CalledProcessError) as error:
            read_only = isinstance(error, PermissionError)
        finally:
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                self._read_only(probe, False)
        if not read_only:
            pytest.skip("cannot make a folder read-only here (root without chattr)")

    @staticmethod
    def _read_only(folder: Path, read_only: bool) -> None:
        if os.geteuid() == 0:
            command = ["chattr", "-R", "+i" if read_only else "-i", str(folder)]
        else:
            command = ["chmod", "-R", "a-w" if read_only else "u+w", str(folder)]
        subprocess.run(command, check=True, capture_output=True)

    def begin(self) -> None:
        self._read_only(self.root, True)
        self.down = True

    def end(self) -> None:
        if self.down:
            self._read_only(self.root, False)
            self.down = False

    def close(self) -> None:
        self.end()


@pytest.fixture(params=["local", "s3"])
def outage_store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ObjectStore, ObjectStore, Any]]:
    """(the worker's store, the test's view of the same store, an outage with begin() and end())."""
    if request.param == "local":
        worker_store = LocalObjectStore(tmp_path / "store")
        outage: Any = LocalOutage(worker_store.root)
        view: ObjectStore = LocalObjectStore(tmp_path / "store")
    else:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        outage = S3Outage()
        worker_store, view = outage.store(attempts=2), outage.store(attempts=8)
    try:
        yield worker_store, view, outage
    finally:
        outage.close()


def test_a_store_outage_mid_job_makes_the_worker_back_off_then_recover_without_losing_the_job(
    outage_store: tuple[ObjectStore, ObjectStore, Any], registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    worker_store, view, outage = outage_store
    lease_s, outage_s = 2.0, 4.0
    service = GenerationService(registry, view, JobQueue(view, lease_s=lease_s))
    interrupted = submit(service, "alice", "interrupted by the outage", steps=10)
    waiting = submit(service, "alice", "queued during the outage", steps=1)
    w = Worker(JobQueue(worker_store, lease_s=lease_s), worker_store, registry, idle_poll_s=0.05,
               max_backoff_s=1.0, heartbeat_s=0.5)
    timer = threading.Timer(outage_s, outage.end)
    thread = threading.Thread(target=w.run, name="worker")
    caplog.set_level(logging.WARNING, logger="image_gen.worker")

    def begin() -> None:
        outage.begin()
        timer.start()

    try:
        with UnetSteps(registry, "tiny-sd", at_step=1, action=begin):
            thread.start()
            wait_for(lambda: timer.is_alive(), 60, "the outage")
            timer.join()
            outage_warnings = [r for r in caplog.records if "store unavailable" in r.getMessage()]
            assert thread.is_alive()
            queue = JobQueue(view, lease_s=lease_s)
            wait_for(lambda: all(queue.get(j.id).finished for j in (interrupted, waiting)), 60, "recovery", 0.25)
            after = submit(service, "bob", "after the outage", steps=1)
            wait_for(lambda: queue.get(after.id).finished, 30, "a job after the outage", 0.1)
    finally:
        timer.cancel()
        outage.end()
        w.stop()
        if thread.is_alive():
            thread.join(timeout=60)

    # backed off (about 0.05, 0.1, 0.2, 0.4, 0.8, 1, 1 s...) instead of retrying in a tight loop
    assert 2 <= len(outage_warnings) <= 12, [r.getMessage() for r in outage_warnings]
    interrupted, waiting, after = (queue.get(j.id) for j in (interrupted, waiting, after))
    assert interrupted.status == "succeeded" and interrupted.attempts == 2
    assert waiting.status == "succeeded" and after.status == "succeeded"


def test_a_store_outage_before_any_job_does_not_stop_the_worker(
    outage_store: tuple[ObjectStore, ObjectStore, Any], registry: ModelRegistry
) -> None:
    worker_store, view, outage = outage_store
    w = Worker(JobQueue(worker_store), worker_store, registry, idle_poll_s=0.05, max_backoff_s=0.5)
    thread = threading.Thread(target=w.run, name="worker")
    outage.begin()
    try:
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive()
        outage.end()
        service = GenerationService(registry, view, JobQueue(view))
        job = submit(service, "alice", "after the outage", steps=1)
        wait_for(lambda: service.queue.get(job.id).finished, 30, "the job")
        assert service.queue.get(job.id).status == "succeeded"
    finally:
        outage.end()
        w.stop()
        thread.join(timeout=60)


def test_an_invalid_payload_is_dead_lettered_at_once(
    queue: JobQueue, store: ObjectStore, registry: ModelRegistry
) -> None:
    params = GenerationParams(prompt="x", **TINY)
    bad = queue.submit("alice", {"params": {"prompt": 3}})
    good = queue.submit("alice", job_payload(params.model_copy(update={"seed": 1, "scheduler": "ddim",
                                                                       "guidance_scale": 1.0})))
    w = Worker(queue, store, registry)

    bad, good = run_until_finished(w, queue, [bad, good])

    assert bad.status == "failed" and bad.attempts == 1 and "invalid job payload" in bad.error
    assert good.status == "succeeded"
