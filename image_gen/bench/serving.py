"""Serving throughput: one worker with cross-request batching against the same worker one job at a time, under 1, 2,
4 and 8 concurrent clients.

Each client submits a job (a new prompt, 1 image), waits for it to finish, and submits the next, `--jobs` times.
The worker (image_gen.worker.Worker: claim, generate, write PNG and thumbnail, complete) runs in a thread of this
process on a fresh local store per run, over a registry whose pipeline is loaded and warmed up once. Batched: the
worker claims up to `--max-batch` jobs with the same batch key into one UNet batch; one at a time: max_batch 1.
Modes alternate at every concurrency level. Throughput is jobs per second of wall time, and jobs per CPU second of
the worker's thread (with one torch thread it does all the generation; the clients' polling is not counted), the
latter being robust to other tenants of a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from image_gen.bench.measure import Stopwatch
from image_gen.bench.models import BUILDERS, INHOUSE_ARCH
from image_gen.bench.pipeline import PROMPTS, build_registry, resolve_model
from image_gen.bench.report import machine, machine_markdown, summary, write_report
from image_gen.jobs import batch_key, job_payload
from image_gen.worker import Worker
from pipelines.attention import AUTOCAST_MODES
from pipelines.params import GenerationParams
from pipelines.registry import ModelRegistry
from storage.objects import LocalObjectStore
from storage.queue import JobQueue

POLL_S = 0.05


def client(queue: JobQueue, params: GenerationParams, jobs: int, index: int, failures: list[str]) -> None:
    for n in range(jobs):
        prompt = f"{PROMPTS[(index + n) % len(PROMPTS)]}, client {index} job {n}"
        job_params = params.model_copy(update={"prompt": prompt, "seed": 1000 * index + n})
        job = queue.submit(f"client-{index}", job_payload(job_params), batch_key=batch_key(job_params))
        while not (job := queue.get(job.id)).finished:
            time.sleep(POLL_S)
        if job.status != "succeeded":
            failures.append(f"{job.id}: {job.status} {job.error}")


def run_once(registry: ModelRegistry, params: GenerationParams, clients: int, jobs: int, max_batch: int,
             folder: Path) -> dict:
    """One timed run: a fresh store and worker, `clients` clients of `jobs` jobs each."""
    store = LocalObjectStore(folder)
    queue = JobQueue(store)
    worker = Worker(queue, store, registry, max_batch=max_batch, idle_poll_s=POLL_S)
    worker_cpu: list[float] = []

    def work() -> None:
        started = time.thread_time()
        worker.run()
        worker_cpu.append(time.thread_time() - started)

    worker_thread = threading.Thread(target=work, daemon=True)
    worker_thread.start()
    failures: list[str] = []
    threads = [threading.Thread(target=client, args=(queue, params, jobs, i, failures)) for i in range(clients)]
    clock = Stopwatch("cpu")
    started = clock.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = clock.stop(started)
    worker.stop()
    worker_thread.join()
    done = clients * jobs - len(failures)
    return {"jobs": done, "failures": failures[:5], "wall_s": elapsed.wall, "process_cpu_s": elapsed.cpu,
            "worker_cpu_s": worker_cpu[0], "jobs_per_s": done / elapsed.wall, "jobs_per_cpu_s": done / worker_cpu[0]}


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench serving", description=__doc__)
    parser.add_argument("--model", default=INHOUSE_ARCH, help=f"registry name or a stand-in: {', '.join(BUILDERS)}")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated numbers of clients")
    parser.add_argument("--jobs", type=int, default=3, help="jobs each client submits in a run (default: 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode and concurrency (default: 1)")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched worker's max_batch (default: 8)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=int, default=None, help="square size (default: the model's native)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's own)")
    parser.add_argument("--autocast", choices=AUTOCAST_MODES, default="off",
                        help="the pipelines' autocast (bfloat16 on CPUs with AVX-512 BF16; default: off)")
    parser.add_argument("--name", default="serving", help="report file stem")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    registry = build_registry(args.device, dtype, "sdpa", autocast=args.autocast)
    info = resolve_model(args.model, registry)
    registry.load(info.name)
    params = info.resolve(GenerationParams(prompt="warm up", model=info.name, steps=args.steps, seed=0,
                                           width=args.size, height=args.size))
    levels = [int(level) for level in args.concurrency.split(",")]
    modes = {"one at a time": 1, "batched": args.max_batch}
    load_before = machine()["load_average"]
    runs: dict[tuple[int, str], list[dict]] = {(level, mode): [] for level in levels for mode in modes}
    with tempfile.TemporaryDirectory(prefix="image-gen-bench-serving-") as tmp:
        run_once(registry, params, 1, 1, 1, Path(tmp) / "warm-up")
        for level in levels:
            for repeat in range(args.repeats):
                order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
                for mode in order:
                    folder = Path(tmp) / f"{level}-{mode.replace(' ', '-')}-{repeat}"
                    result = run_once(registry, params, level, args.jobs, modes[mode], folder)
                    print(level, mode, {k: v for k, v in result.items() if k != "failures"}, flush=True)
                    runs[(level, mode)].append(result)
    rows = []
    for level in levels:
        single, batched = runs[(level, "one at a time")], runs[(level, "batched")]
        rows.append({
            "clients": level,
            "one_at_a_time": {"jobs_per_s": summary([r["jobs_per_s"] for r in single]),
                              "jobs_per_cpu_s": summary([r["jobs_per_cpu_s"] for r in single])},
            "batched": {"jobs_per_s": summary([r["jobs_per_s"] for r in batched]),
                        "jobs_per_cpu_s": summary([r["jobs_per_cpu_s"] for r in batched])},
            "ratio_wall": summary([b["jobs_per_s"] / s["jobs_per_s"] for s, b in zip(single, batched, strict=True)]),
            "ratio_cpu": summary([b["jobs_per_cpu_s"] / s["jobs_per_cpu_s"]
                                  for s, b in zip(single, batched, strict=True)]),
            "failures": [f for r in single + batched for f in r["failures"]],
            "runs": {"one_at_a_time": single, "batched": batched},
        })
    data = {
        "model": info.name,
        "label": info.label,
        "params": {"size": params.width, "steps": params.steps, "scheduler": params.scheduler,
                   "guidance": params.guidance_scale},
        "autocast": args.autocast,
        "threads": torch.get_num_threads(),
        "jobs_per_client": args.jobs,
        "max_batch": args.max_batch,
        "repeats": args.repeats,
        "command": "image-gen bench serving " + " ".join(argv),
        "machine": {**machine(), "load_average_before": load_before},
        "results": rows,
    }
    for path in write_report(out, args.name, markdown(data), data):
        print(path)
    return 0


def _columns_note(threads: int) -> str:
    if threads == 1:
        return ("Jobs per CPU second of the worker thread (one torch thread, clients' polling not counted) are robust "
                "to other tenants; jobs per wall second are what the clients saw.")
    return (f"{threads} torch threads: the CPU columns count the worker's own thread only, not torch's other "
            "threads, so read the wall columns (what the clients saw), measured with the machine to itself.")


def markdown(data: dict) -> str:
    p = data["params"]
    lines = [
        f"# Serving: cross-request batching against one job at a time ({data['model']})",
        "",
        f"`{data['command']}`",
        "",
        f"{data['model']} ({data['label']}), {p['size']}x{p['size']} px, {p['steps']} steps {p['scheduler']}, "
        f"guidance {p['guidance']:g}, autocast {data.get('autocast', 'off')}, one image per job. N clients each "
        f"submit {data['jobs_per_client']} jobs one after another (submit, wait, submit) to one worker: batched "
        f"(max_batch {data['max_batch']}: same-key jobs share a UNet batch) or one at a time (max_batch 1). Includes "
        "claiming, PNG and thumbnail writing and completion on a local store. Medians over "
        f"{data['repeats']} run(s) per cell. " + _columns_note(data.get("threads", 1)),
        "",
        "| clients | one at a time jobs/CPU-s | batched jobs/CPU-s | **ratio (CPU)** | one at a time jobs/s (wall) "
        "| batched jobs/s (wall) | ratio (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        single, batched = r["one_at_a_time"], r["batched"]
        lines.append(
            f"| {r['clients']} | {single['jobs_per_cpu_s']['median']:.3f} | {batched['jobs_per_cpu_s']['median']:.3f} "
            f"| **{r['ratio_cpu']['median']:.2f}** | {single['jobs_per_s']['median']:.3f} | "
            f"{batched['jobs_per_s']['median']:.3f} | {r['ratio_wall']['median']:.2f} |"
        )
    failures = [f for r in data["results"] for f in r["failures"]]
    lines += ["", f"Failed jobs: {len(failures)}" + (f" (e.g. {failures[0]})" if failures else "."), ""]
    lines += ["Machine:", "", machine_markdown(data["machine"])]
    return "\n".join(lines)
