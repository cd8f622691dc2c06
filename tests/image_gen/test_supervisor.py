"""`image-gen serve`'s worker processes: jobs complete through them, a killed one is replaced, they run below the
API's CPU priority, report to its metrics, and none outlives the server, whether it stops or is killed."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from fastapi import FastAPI

from image_gen.api.app import create_app
from image_gen.settings import load_settings
from image_gen.supervisor import WorkerSupervisor

IMAGE_GEN = Path(sys.executable).with_name("image-gen")
JOB = {"prompt": "a red circle", "size": "32x32", "steps": 1}
# Below the test run's own priority, but only just: test runs are often niced already, and a worker at 19 on a busy
# machine would take minutes to start.
WORKER_NICE = 1
FINISHED = ("succeeded", "failed", "canceled")


@dataclass
class Served:
    url: str
    app: FastAPI

    @property
    def supervisor(self) -> WorkerSupervisor:
        return self.app.state.supervisor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(poll_s)


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in FINISHED:
            return job
        assert time.monotonic() < deadline, {k: job[k] for k in ("status", "attempts", "error", "progress")}
        time.sleep(0.1)


@contextmanager
def serving(models_dir: Path, store: Path, **overrides: object) -> Iterator[Served]:
    """The API app under uvicorn in a thread, with its workers in child processes (serve's default); stopped, with
    its lifespan's shutdown, on exit."""
    settings = load_settings(
        models_dir=models_dir,
        store=str(store),
        default_model="tiny-sd",
        device="cpu",
        port=_free_port(),
        **{"worker_isolation": "process", "worker_nice": WORKER_NICE, **overrides},
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 60, "the server")
        yield Served(f"http://127.0.0.1:{settings.port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=90)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def served(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # A short lease, so that the job of a killed worker is retried within seconds.
    with serving(tiny_models_dir, tmp_path_factory.mktemp("store"), lease_s=3) as served:
        yield served


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


def test_a_job_completes_through_a_worker_process_that_reports_to_the_servers_metrics(
    served: Served, client: httpx.Client
) -> None:
    (pid,) = served.supervisor.pids()
    assert pid != os.getpid() and psutil.Process(pid).ppid() == os.getpid()
    assert served.app.state.workers == []  # no worker thread in the API process

    job = wait_for_job(client, client.post("/v1/jobs", json=JOB).json()["id"])

    assert job["status"] == "succeeded", job
    image = client.get(job["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    # The worker reports the job right after completing it; the supervisor passes it on within moments.
    wait_for(
        lambda: 'image_gen_jobs_finished_total{status="succeeded"}' in client.get("/metrics").text,
        10,
        "the worker's report",
    )
    assert re.search(r"^image_gen_images_generated_total [1-9]", client.get("/metrics").text, re.M)


def test_worker_processes_run_at_a_lower_cpu_priority_than_the_api(served: Served) -> None:
    (pid,) = served.supervisor.pids()
    server_nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, server_nice + WORKER_NICE)


def test_a_killed_worker_process_is_replaced_and_its_job_still_completes(
    served: Served, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="image_gen.supervisor")
    (victim,) = served.supervisor.pids()
    job_id = client.post("/v1/jobs", json={**JOB, "prompt": "a long one", "steps": 150}).json()["id"]
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 240, "the job to run", 0.02
    )

    os.kill(victim, signal.SIGKILL)

    wait_for(lambda: served.supervisor.pids() and served.supervisor.pids() != [victim], 30, "a new worker")
    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert any("exited with signal SIGKILL" in r.getMessage() for r in caplog.records), caplog.text
    after = wait_for_job(client, client.post("/v1/jobs", json=JOB).json()["id"])
    assert after["status"] == "succeeded"
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE


def test_shutdown_stops_every_worker_process(tiny_models_dir: Path, tmp_path: Path) -> None:
    with serving(tiny_models_dir, tmp_path / "store", workers_in_process=2) as served:
        wait_for(lambda: len(served.supervisor.pids()) == 2, 30, "two workers")
        children = [psutil.Process(pid) for pid in served.supervisor.pids()]
        with httpx.Client(base_url=served.url, timeout=30) as client:
            assert (
                wait_for_job(client, client.post("/v1/jobs", json=JOB).json()["id"])["status"] == "succeeded"
            )

    for child in children:
        assert not child.is_running(), f"worker process {child.pid} outlived the server"
    assert served.supervisor.pids() == []


class DeadProcess:
    """What the supervisor sees of a worker process that has exited."""

    def __init__(self, exitcode: int) -> None:
        self.pid, self.exitcode = 4242, exitcode

    def is_alive(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_worker_that_keeps_dying_is_restarted_after_1_2_4_s_up_to_60_s_and_after_1_s_once_it_lived_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = WorkerSupervisor(load_settings(), 1)
    (slot,) = supervisor._slots
    delays = []
    for lived_s in (5, 5, 5, 5, 5, 5, 5, 5, 600, 5):
        slot.process, slot.started_at = DeadProcess(-signal.SIGKILL), 1000.0  # type: ignore[assignment]
        supervisor._schedule_restart(slot, now=1000.0 + lived_s)
        delays.append(slot.restart_at - (1000.0 + lived_s))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 1, 2]
    assert (
        "worker process 0 (pid 4242) exited with signal SIGKILL after 5.0 s; restarting it in 1 s"
        in caplog.text
    )


@pytest.mark.slow
def test_image_gen_serve_runs_jobs_in_a_worker_process_that_exits_when_the_server_is_killed(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    command = [str(IMAGE_GEN), "serve", "--port", str(port), "--store", str(tmp_path / "store"),
               "--models-dir", str(tiny_models_dir), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMAGE_GEN_WORKER_NICE": str(WORKER_NICE)}
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: server.poll() is None and _ready(url), 120, "image-gen serve")
        with httpx.Client(base_url=url, timeout=30) as client:
            job = wait_for_job(client, client.post("/v1/jobs", json={**JOB, "model": "tiny-sd"}).json()["id"])
        assert job["status"] == "succeeded", log_path.read_text()
        # Its children: the worker, and multiprocessing's resource tracker.
        (worker,) = [
            c for c in psutil.Process(server.pid).children() if "spawn_main" in " ".join(c.cmdline())
        ]

        server.kill()
        server.wait(timeout=30)

        worker.wait(timeout=60)  # raises psutil.TimeoutExpired if the orphan lives on
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
