"""Scale-out: two API processes (`image-gen serve --workers-in-process 0`) and three `image-gen worker` processes,
all separate OS processes that share nothing but one S3 bucket (moto over HTTP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from storage.objects import S3ObjectStore
from storage.pnginfo import read_png_info
from storage.queue import JobQueue

IMAGE_GEN = Path(sys.executable).with_name("image-gen")
JOBS = 24
STARTUP_S = 300  # five processes importing torch (the APIs also gradio) at once on a small machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(poll_s)


class Processes:
    """Subprocesses with their output in log files; stopped by SIGTERM (then SIGKILL) at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> Path:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([str(IMAGE_GEN), *args], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((process, log))
        return log

    @property
    def logs(self) -> list[Path]:
        return [log for _, log in self.started]

    def check_running(self) -> None:
        for process, log in self.started:
            assert process.poll() is None, f"{log.name} exited with {process.returncode}:\n{log.read_text()}"

    def stop(self) -> list[int | None]:
        for process, _ in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process, _ in self.started:
            try:
                codes.append(process.wait(timeout=60))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes.append(None)
        return codes


def api_ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def cluster(s3_bucket: str, tiny_models_dir: Path, tmp_path: Path) -> Iterator[tuple[list[str], Processes, str]]:
    """(the two API base URLs, the processes, the store URL), every process ready."""
    url = f"s3://{s3_bucket}/scale-out"
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGE_GEN_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    common = ["--store", url, "--models-dir", str(tiny_models_dir), "--device", "cpu"]
    processes = Processes(tmp_path, env)
    bases = []
    for i in range(2):
        port = free_port()
        processes.start(f"api-{i}", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers-in-process",
                        "0", *common)
        bases.append(f"http://127.0.0.1:{port}")
    worker_logs = [processes.start(f"worker-{i}", "worker", "--max-batch", "4", *common) for i in range(3)]
    try:
        def ready() -> bool:
            processes.check_running()
            return all(map(api_ready, bases)) and all(" on s3://" in log.read_text() for log in worker_logs)

        wait_for(ready, STARTUP_S, "two APIs and three workers to start", poll_s=1.0)
        yield bases, processes, url
    finally:
        processes.stop()


@pytest.mark.slow
def test_jobs_submitted_through_two_apis_run_on_three_workers_and_are_readable_through_either(
    cluster: tuple[list[str], Processes, str], s3_bucket: str
) -> None:
    bases, processes, _ = cluster
    clients = [httpx.Client(base_url=base, timeout=30) for base in bases]
    submitted = []
    for i in range(JOBS):
        body = {"prompt": f"scale-out {i}", "model": "tiny-sd", "size": "32x32", "steps": 20, "seed": 1000 + i}
        response = clients[i % 2].post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])

    def all_finished() -> bool:
        processes.check_running()
        return all(clients[0].get(f"/v1/jobs/{job_id}").json()["status"] in ("succeeded", "failed", "canceled")
                   for job_id in submitted)

    wait_for(all_finished, 180, "the jobs to finish", poll_s=1.0)

    for i, job_id in enumerate(submitted):
        views = [client.get(f"/v1/jobs/{job_id}").json() for client in clients]
        assert views[0] == views[1]
        assert views[0]["status"] == "succeeded", views[0]
        (image,) = views[0]["images"]
        pngs = [client.get(image["url"]) for client in clients]
        assert [png.status_code for png in pngs] == [200, 200]
        assert pngs[0].content == pngs[1].content
        assert read_png_info(pngs[0].content).parameters["seed"] == 1000 + i
    queue = JobQueue(S3ObjectStore(s3_bucket, "scale-out"))
    workers = {queue.get(job_id).worker_id for job_id in submitted}
    assert len(workers) >= 2, workers  # the work was shared
    for client in clients:
        client.close()
    api_codes, worker_codes = (codes := processes.stop())[:2], codes[2:]
    assert worker_codes == [0, 0, 0]  # SIGTERM: a worker finishes its batch and exits 0
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, so an API process ends with -15
    assert set(api_codes) <= {0, -signal.SIGTERM}, api_codes
    for log in processes.logs[:2]:
        assert "Application shutdown complete" in log.read_text()
