"""Chaos: 300 jobs on four worker processes sharing one store, while a supervisor SIGKILLs a random busy worker
every few seconds (up to 20 times) and starts a new one. Every job must complete exactly once, none lost, none stuck.

"Exactly once" is counted from every version the job records ever had, not from what the workers report: the S3
bucket has versioning on, and the local store keeps a copy of each record version (`VersionedLocalStore`). A job
completed twice would have two versions whose status is `succeeded`.

To fit in about two minutes on a small shared machine, worker processes are forked from a server that imported
torch once (a fresh `image-gen worker` spends some 10 s of CPU importing it), each uses one torch thread, and the
model is tiny-sd with an even smaller UNet.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import tqdm
from PIL import Image

from image_gen.jobs import batch_key, job_payload
from image_gen.service import GenerationService
from image_gen.worker import Worker
from pipelines.params import GenerationParams
from pipelines.registry import ModelRegistry
from storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore, open_store
from storage.queue import JobQueue

JOBS = 300
OWNERS = ("ana", "ben", "cy")
WORKERS = 4
LEASE_S = 3.0
MAX_ATTEMPTS = 50  # a job may be on a killed worker several times; here losing it is the failure, not retrying
KILL_EVERY_S = (1.0, 3.0)
MAX_KILLS = 20
"""Enough to interrupt dozens of jobs; unbounded, a slow machine would see more kills the longer its run takes, more
reruns from them, and a longer run again (47 kills and 129 s for S3 on one 2-core machine, 24 and 79 s on the next
try)."""
TICK_S = 0.2
QUEUE_SAMPLE_S = 1.0
"""How often the supervisor lists the queue: a LIST of up to 300 keys, which on S3 competes with the workers'
requests for the moto server (one request at a time, in this process)."""
DEADLINE_S = 180.0
# Imported once by the fork server, so that a worker starts in about a second instead of importing torch.
PRELOAD = [
    "torch",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.unets.unet_2d_condition",
    "transformers.models.clip.modeling_clip",
    "boto3",
    "image_gen.worker",
    "image_gen.service",
]


class VersionedLocalStore(LocalObjectStore):
    """A local store that keeps every version of each job record, as a versioned bucket does. Under the record's
    lock, each new version is first copied to `versions/<record key>/<version>-<n>`; a writer killed between copy
    and write leaves a copy that never became the record, and the next write of the record, which has the same
    version number and a higher n, supersedes it."""

    def _replace(self, key: str, path: Path, data: bytes) -> str:  # every write, under the key's lock
        if key.startswith("jobs/"):
            folder = f"versions/{key}/"
            copy = f"{folder}{json.loads(data)['version']:08d}-{len(list(self.list(folder))):04d}"
            super()._replace(copy, self._path(copy), data)
        return super()._replace(key, path, data)


def open_chaos_store(url: str) -> ObjectStore:
    return open_store(url) if url.startswith("s3://") else VersionedLocalStore(url)


class FlaggedWorker(Worker):
    """A worker that holds the file `busy` while it runs a batch. A SIGKILL skips the `finally`, so a flag left
    behind by a killed worker proves the kill interrupted a batch, whose jobs must then run again elsewhere."""

    def __init__(self, *args: Any, busy: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy = busy

    def run_batch(self, leases: list[Any]) -> None:
        self.busy.write_text(json.dumps([lease.job.id for lease in leases]))
        try:
            super().run_batch(leases)
        finally:
            self.busy.unlink()


def worker_process(store_url: str, models_dir: str, hash_cache: str, env: dict[str, str], flag: str) -> None:
    """One worker process, which creates the file `<flag>.ready` once its model is loaded and holds `<flag>.busy`
    while it runs a batch; SIGTERM stops it after its batch, SIGKILL is what the supervisor sends."""
    os.environ.update(env)
    torch.set_num_threads(1)
    # tqdm's default lock is a named semaphore, which a SIGKILLed process leaves behind; a thread lock does here.
    tqdm.tqdm.set_lock(threading.RLock())
    store = open_chaos_store(store_url)
    registry = ModelRegistry([Path(models_dir)], device="cpu", hash_cache=Path(hash_cache))
    worker = FlaggedWorker(JobQueue(store, lease_s=LEASE_S), store, registry, max_batch=4,
                           heartbeat_s=LEASE_S / 3, idle_poll_s=0.5, max_backoff_s=2.0, busy=Path(f"{flag}.busy"))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    registry.load("tinier")
    Path(f"{flag}.ready").touch()  # after the SIGTERM handler: the supervisor terminates only workers that are ready
    worker.run()


@pytest.fixture(scope="module")
def chaos_models(tiny_sd_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with `tinier`: tiny-sd with a UNet of 8 and 16 channels, so that a job of one or two steps
    is mostly the queue's and the store's work (a batch of four takes about 60 ms here, tiny-sd's 200 ms)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("chaos-models")
    shutil.copytree(tiny_sd_model, root / "tinier", ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).save_pretrained(root / "tinier" / "unet")
    return root


@pytest.fixture(scope="module")
def forkserver() -> Iterator[BaseContext]:
    """Worker processes forked from one server process that has imported torch and the worker once, with one
    torch thread; the server is stopped when the module is done."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, worker_process.__module__])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        multiprocessing.forkserver.ensure_running()
    yield context
    multiprocessing.forkserver._forkserver._stop()  # no public way to stop it before the interpreter exits


def record_versions(store: ObjectStore) -> dict[str, list[dict[str, Any]]]:
    """Every version each job record had, oldest first, by job id."""
    versions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if isinstance(store, S3ObjectStore):
        client = boto3.client("s3")
        found = []
        for page in client.get_paginator("list_object_versions").paginate(
            Bucket=store.bucket, Prefix=f"{store.prefix}jobs/"
        ):
            found += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
        for key, version_id in found:
            data = client.get_object(Bucket=store.bucket, Key=key, VersionId=version_id)["Body"].read()
            record = json.loads(data)
            versions[record["id"]].append(record)
    else:
        latest: dict[tuple[str, str], str] = {}
        for key in store.list("versions/"):
            folder, _, name = key.rpartition("/")
            latest[(folder, name.split("-")[0])] = key  # the last copy of each version number is the real one
        for key in latest.values():
            record = json.loads(store.get(key).data)
            versions[record["id"]].append(record)
    return {job_id: sorted(records, key=lambda r: r["version"]) for job_id, records in versions.items()}


@pytest.fixture(params=["local", "s3"])
def chaos_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(store URL, the environment a worker process needs to reach it)."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    bucket = request.getfixturevalue("s3_bucket")
    boto3.client("s3").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    env = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    return f"s3://{bucket}/chaos", env


@pytest.mark.slow
def test_every_job_completes_exactly_once_while_workers_are_killed(
    chaos_store: tuple[str, dict[str, str]], forkserver: BaseContext, chaos_models: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    url, env = chaos_store
    store = open_chaos_store(url)
    hash_cache = tmp_path / "hashes.json"
    registry = ModelRegistry([chaos_models], device="cpu", hash_cache=hash_cache)
    queue = JobQueue(store, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)
    service = GenerationService(registry, store, queue)
    templates = [  # one and two steps: two batch keys
        service.resolve(GenerationParams(prompt="-", model="tinier", steps=steps, guidance_scale=1.0, seed=0))
        for steps in (1, 2)
    ]
    jobs = []
    for i in range(JOBS):
        params = templates[i % 2].model_copy(update={"prompt": f"chaos {i}", "seed": i})
        jobs.append(queue.submit(OWNERS[i % len(OWNERS)], job_payload(params), batch_key=batch_key(params)))
    submitted = time.monotonic()
    rng = random.Random(6)
    flags = tmp_path / "flags"
    flags.mkdir()
    workers: dict[Any, Path] = {}  # process -> its flag files' stem

    def start() -> None:
        flag = flags / uuid.uuid4().hex
        args = (url, str(chaos_models), str(hash_cache), env, str(flag))
        process = forkserver.Process(target=worker_process, args=args, name="chaos-worker")
        process.start()
        workers[process] = flag

    def in_service() -> list[Any]:
        """The workers that are ready: killing one still starting would interrupt no job."""
        return [process for process, flag in workers.items() if flag.with_suffix(".ready").exists()]

    finished: dict[str, Any] = {}
    kills = interrupting_kills = 0
    try:
        for _ in range(WORKERS):
            start()
        next_kill = time.monotonic()  # the first kill as soon as a worker is busy: a fast machine may need no more
        timeline: list[tuple[int, int]] = []  # (seconds, jobs queued), for the message of a timeout
        queued, next_sample = JOBS, 0.0
        while len(finished) < JOBS:
            assert time.monotonic() - started < DEADLINE_S, (
                f"{JOBS - len(finished)} jobs unfinished after {DEADLINE_S:.0f} s and {kills} kills; queued over "
                f"time: {timeline}; unfinished (status, attempts): "
                f"{[(j.status, j.attempts) for j in map(queue.get, (j.id for j in jobs if j.id not in finished))]}"
            )
            time.sleep(TICK_S)
            sampled = time.monotonic() >= next_sample
            if sampled:
                queued = len(list(store.list("q/")))
                timeline.append((round(time.monotonic() - started), queued))
                next_sample = time.monotonic() + QUEUE_SAMPLE_S
            # The victim is a worker in the middle of a batch, so that the kills interrupt jobs however fast
            # the machine runs them; with none busy right now, the kill waits for the next tick. Kills stop once
            # nothing is queued: with only the last few jobs running, every kill would land on one of them, and on
            # a busy machine, where a batch outlasts the time between kills, the same job would be killed again
            # each time it is reclaimed (21 times in one run), until the deadline.
            busy = [process for process in in_service() if workers[process].with_suffix(".busy").exists()]
            if kills < MAX_KILLS and time.monotonic() >= next_kill and busy and queued > 0:
                victim = rng.choice(busy)
                victim.kill()
                victim.join()
                kills += 1
                interrupting_kills += workers.pop(victim).with_suffix(".busy").exists()
                start()
                next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
            if sampled and queued == 0:  # nothing queued: are they all done?
                for job in jobs:
                    if job.id not in finished:
                        if not (current := queue.get(job.id)).finished:
                            break
                        finished[job.id] = current
        wait_until = time.monotonic() + 60
        while len(in_service()) < len(workers) and time.monotonic() < wait_until:
            time.sleep(0.2)
        for process in workers:
            process.terminate()  # SIGTERM: finish the batch, exit 0
        for process in workers:
            process.join(timeout=30)
        assert [process.exitcode for process in workers] == [0] * WORKERS
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
                process.join()

    ran = time.monotonic()
    versions = record_versions(store)
    reruns = 0
    for job in jobs:
        final = finished[job.id]
        assert final.status == "succeeded", final
        history = versions[job.id]
        assert history[-1]["version"] == final.version and history[-1]["status"] == "succeeded"
        assert [r["status"] for r in history].count("succeeded") == 1, [(r["status"], r["token"]) for r in history]
        reruns += final.attempts > 1
        (record,) = final.result["images"]
        assert record["key"].startswith(f"images/{job.owner}/{job.id}/{final.token}/")
        assert record["seed"] == job.payload["params"]["seed"]
        assert Image.open(io.BytesIO(store.get(record["key"]).data)).size == (32, 32)
    assert list(store.list("q/")) == []
    assert interrupting_kills > 0, f"none of the {kills} kills hit a worker in the middle of a batch"
    assert reruns > 0  # the interrupted jobs ran again
    print(f"{JOBS} jobs, {kills} kills ({interrupting_kills} mid-batch), {reruns} jobs ran more than once; seconds: {submitted - started:.0f} to "
          f"submit, {ran - submitted:.0f} to run, {time.monotonic() - ran:.0f} to check")
