"""The job queue alone: submit + claim + complete throughput on a local folder and on S3 (a moto server this bench
starts on 127.0.0.1), and the S3 requests each job costs in steady state, at claim limits 1 and 4.

One client does everything in turn (submit N jobs of two owners, then claim and complete them all), so this is
the queue's own cost without contention and without generation. Runs alternate between stores and limits, so that
noise from a shared machine hits all of them alike; every run starts on an empty store.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from image_gen.bench.report import machine, machine_markdown, summary, write_report
from storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore
from storage.queue import JobQueue

OWNERS = ("alice", "bob")
S3_OPERATIONS = {"PutObject": "PUT", "ListObjectsV2": "LIST", "GetObject": "GET", "DeleteObject": "DELETE"}
GOAL_REQUESTS_PER_JOB = 6


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port, and the standard AWS variables pointing boto3 at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    variables = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {name: os.environ.get(name) for name in [*variables, "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(variables)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    try:
        yield f"http://{host}:{port}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def fresh_store(kind: str, folder: Path, run_id: str) -> ObjectStore:
    """An empty store: a new folder, or a new bucket (moto lists a prefix by scanning its whole bucket)."""
    if kind == "local":
        return LocalObjectStore(folder / run_id)
    store = S3ObjectStore(f"bench-{run_id}")
    store.client.create_bucket(Bucket=store.bucket)
    return store


def run_once(store: ObjectStore, jobs: int, limit: int) -> dict:
    """Submit `jobs` jobs, then claim (`limit` at a time) and complete them all; seconds and S3 requests."""
    queue = JobQueue(store)
    queue.claim("bench-worker")  # start-up, not steady state: the first claim also reads the workers' ledgers
    counter = store.requests if isinstance(store, S3ObjectStore) else Counter()
    counter.clear()
    started = time.perf_counter()
    for i in range(jobs):
        queue.submit(OWNERS[i % len(OWNERS)], {"prompt": f"job {i}", "steps": 4})
    submitted = time.perf_counter()
    requests_after_submit = Counter(counter)
    done = 0
    while done < jobs:
        leases = queue.claim("bench-worker", limit=limit)
        if not leases:
            raise RuntimeError(f"the queue ran dry after {done} of {jobs} jobs")
        for lease in leases:
            queue.complete(lease, {"images": []})
        done += len(leases)
    finished = time.perf_counter()
    return {
        "seconds": finished - started,
        "submit_seconds": submitted - started,
        "claim_complete_seconds": finished - submitted,
        "requests": dict(counter),
        "submit_requests": dict(requests_after_submit),
    }


def per_job(runs: list[dict], jobs: int) -> dict:
    """Requests per job by S3 operation (PUT, LIST, GET, DELETE, total), averaged over the runs."""
    totals: Counter[str] = Counter()
    for run in runs:
        totals.update(run["requests"])
    result = {short: totals[operation] / (jobs * len(runs)) for operation, short in S3_OPERATIONS.items()}
    result["other"] = sum(v for k, v in totals.items() if k not in S3_OPERATIONS) / (jobs * len(runs))
    result["total"] = sum(totals.values()) / (jobs * len(runs))
    return result


def main(argv: list[str], out: Path) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench queue", description=__doc__)
    parser.add_argument("--jobs", type=int, default=256, help="jobs per run (default: 256)")
    parser.add_argument("--limits", default="1,4", help="claim limits, comma-separated (default: 1,4)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per store and limit (default: 5)")
    parser.add_argument("--stores", default="local,s3", help="which stores: local, s3 (default: both)")
    parser.add_argument("--local-dir", type=Path, default=None, help="where local stores go (default: a temp dir)")
    parser.add_argument("--name", default="queue", help="report file stem")
    args = parser.parse_args(argv)
    limits = [int(limit) for limit in args.limits.split(",")]
    kinds = [kind.strip() for kind in args.stores.split(",")]
    if not set(kinds) <= {"local", "s3"} or args.jobs < 1 or args.repeats < 1 or min(limits) < 1:
        parser.error("--stores takes local and/or s3; --jobs, --repeats and --limits must be at least 1")

    samples: dict[tuple[str, int], list[dict]] = {(kind, limit): [] for kind in kinds for limit in limits}
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.local_dir, prefix="bench-queue-")))
        if "s3" in kinds:
            stack.enter_context(moto_s3())
        for repeat in range(args.repeats + 1):  # repeat 0 warms up imports, connections and moto
            for kind in kinds:
                for limit in limits:
                    run_id = f"r{repeat}-l{limit}-{uuid.uuid4().hex[:6]}"
                    result = run_once(fresh_store(kind, folder, run_id), args.jobs, limit)
                    if repeat > 0:
                        samples[(kind, limit)].append(result)

    rows = []
    for (kind, limit), runs in samples.items():
        rows.append(
            {
                "store": kind,
                "limit": limit,
                "jobs": args.jobs,
                "jobs_per_s": summary([args.jobs / run["seconds"] for run in runs]),
                "submits_per_s": summary([args.jobs / run["submit_seconds"] for run in runs]),
                "claim_completes_per_s": summary([args.jobs / run["claim_complete_seconds"] for run in runs]),
                "s3_requests_per_job": per_job(runs, args.jobs) if kind == "s3" else None,
                "runs": runs,
            }
        )
    data = {
        "machine": {**machine(), "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]},
        "jobs": args.jobs,
        "repeats": args.repeats,
        "s3_endpoint": "moto (127.0.0.1)",
        "results": rows,
    }
    for path in write_report(out, args.name, markdown(rows, args, data["machine"]), data):
        print(path)
    return 0


def markdown(rows: list[dict], args: argparse.Namespace, machine_info: dict) -> str:
    def rate(stats: dict) -> str:
        return f"{stats['median']:.0f} ({stats['min']:.0f}-{stats['max']:.0f}, IQR {100 * stats['iqr_rel']:.0f}%)"

    lines = [
        "# Job queue: throughput and S3 requests per job",
        "",
        f"`image-gen bench queue --jobs {args.jobs} --repeats {args.repeats} --limits {args.limits}`: one client "
        f"submits {args.jobs} jobs of two owners, then claims (`limit` at a time) and completes them all; every "
        "run starts on an empty store, runs alternate between stores and limits, one warm-up round is dropped. "
        "Rates are jobs per second: median (min-max, interquartile range relative to the median) over the "
        "repeats. No generation: this is the queue's own cost, without contention.",
        "",
        "| store | claim limit | submit + claim + complete /s | submit /s | claim + complete /s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['limit']} | {rate(r['jobs_per_s'])} | {rate(r['submits_per_s'])} | "
            f"{rate(r['claim_completes_per_s'])} |"
        )
    s3_rows = [r for r in rows if r["s3_requests_per_job"] is not None]
    if s3_rows:
        lines += [
            "",
            "S3 requests per job in steady state, counted by `S3ObjectStore.requests` (retries included) over all "
            "repeats:",
            "",
            "| claim limit | PUT | LIST | GET | DELETE | **per job** | goal (at most "
            f"{GOAL_REQUESTS_PER_JOB}) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s3_rows:
            q = r["s3_requests_per_job"]
            over = q["total"] - GOAL_REQUESTS_PER_JOB
            verdict = "met" if over <= 0 else f"exceeded by {over:.2f}"
            lines.append(
                f"| {r['limit']} | {q['PUT']:.2f} | {q['LIST']:.2f} | {q['GET']:.2f} | {q['DELETE']:.2f} | "
                f"**{q['total']:.2f}** | {verdict} |"
            )
        best = min(r["s3_requests_per_job"]["total"] for r in s3_rows)
        ms_per_request = 1000 * statistics.median(
            run["seconds"] / sum(run["requests"].values()) for r in s3_rows for run in r["runs"]
        )
        lines += [
            "",
            f"The S3 rates are against moto on localhost, which took {ms_per_request:.1f} ms per request here "
            "(moto, like the client, runs in Python on the machine below), so they say little about S3 itself. "
            "There a request takes some 10 to 30 ms, so one client doing "
            f"{best:.1f} requests per job one after another manages about "
            f"{1000 / (best * 30):.0f} to {1000 / (best * 10):.0f} jobs/s; throughput grows with the number of "
            "clients (workers and API servers), each of which writes its own keys (docs/queue.md).",
        ]
    lines += ["", "Machine:", "", machine_markdown(machine_info)]
    return "\n".join(lines)
