"""The worker processes of `image-gen serve`: started with `spawn`, each running what `image-gen worker` runs, at a
lower CPU priority than the API; restarted with backoff when one dies, stopped with SIGTERM (then SIGKILL)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from image_gen.settings import Settings

log = logging.getLogger("image_gen.supervisor")

FinishedHook = Callable[[str, dict[str, Any] | None], None]  # a job's final status and its result
RESTART_BACKOFF_S = 1.0  # the first restart of a worker that died; doubles while it keeps dying young
MAX_RESTART_BACKOFF_S = 60.0
STABLE_S = 60.0  # a worker that ran this long before dying is restarted after RESTART_BACKOFF_S again
WATCH_S = 0.5  # how often the supervisor looks at its workers when nothing happens


@dataclass
class _Slot:
    """One of the N workers: its current process (None while waiting to restart) and its restart schedule."""

    index: int
    process: BaseProcess | None = None
    reports: Connection | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = RESTART_BACKOFF_S


class WorkerSupervisor:
    """Runs `count` worker processes and keeps them running until `stop()`.

    Each child runs `image_gen.worker.run_worker(settings)` (the `image-gen worker` command) after lowering its CPU
    priority by `nice`, so that the API's event loop is scheduled first and generation uses what is left. The jobs
    its workers finish are passed to `on_finished` in this process (for /metrics). A child whose parent dies
    stops by itself, so that a killed server leaves no worker behind.
    """

    def __init__(
        self,
        settings: Settings,
        count: int,
        *,
        nice: int = 0,
        on_finished: FinishedHook | None = None,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.nice = nice
        self.on_finished = on_finished
        self.stop_timeout_s = stop_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index) for index in range(count)]
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for slot in self._slots:
            self._start(slot)
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM every worker (each finishes its batch in progress), wait up to `stop_timeout_s`, then SIGKILL."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        running = [
            slot.process for slot in self._slots if slot.process is not None and slot.process.is_alive()
        ]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning(
                    "worker process pid %d did not stop in %.0f s: killing it",
                    process.pid,
                    self.stop_timeout_s,
                )
                process.kill()
                process.join()
        for slot in self._slots:
            self._drain(slot)
            self._forget(slot)

    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        pids = []
        for slot in self._slots:
            process = slot.process
            try:
                if process is not None and process.is_alive() and process.pid is not None:
                    pids.append(process.pid)
            except ValueError:  # closed by the supervisor thread meanwhile: it has just died
                continue
        return pids

    def _start(self, slot: _Slot) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_process_main,
            args=(self.settings, self.nice, send),
            name=f"image-gen-worker-{slot.index}",
            daemon=True,  # multiprocessing's exit handler ends them if this process exits without stop()
        )
        process.start()
        send.close()  # the child holds the only write end: its death reads as end of file
        slot.process, slot.reports, slot.started_at = process, receive, time.monotonic()
        log.info("started worker process %d (pid %d, nice +%d)", slot.index, process.pid, self.nice)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch_once()
            except Exception:
                log.exception("worker supervisor error")
                self._stopping.wait(WATCH_S)

    def _watch_once(self) -> None:
        """Restart the workers that died and are due; then wait until one dies or reports, or WATCH_S passes."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is not None and not slot.process.is_alive():
                self._schedule_restart(slot, now)
            if slot.process is None and now >= slot.restart_at:
                try:
                    self._start(slot)
                except Exception:
                    log.exception("could not start worker process %d", slot.index)
                    self._schedule_restart(slot, now)
        waiting = [slot.restart_at - now for slot in self._slots if slot.process is None]
        handles: list[Any] = [slot.process.sentinel for slot in self._slots if slot.process is not None]
        handles += [slot.reports for slot in self._slots if slot.reports is not None]
        ready = wait(handles, max(0.0, min([WATCH_S, *waiting])))
        for slot in self._slots:
            if slot.reports is not None and slot.reports in ready:
                self._drain(slot)

    def _schedule_restart(self, slot: _Slot, now: float) -> None:
        if slot.process is not None:
            pid, exitcode, lived = slot.process.pid, slot.process.exitcode, now - slot.started_at
            self._drain(slot)
            self._forget(slot)
            slot.backoff_s = RESTART_BACKOFF_S if lived >= STABLE_S else slot.backoff_s
            log.warning(
                "worker process %d (pid %s) exited with %s after %.1f s; restarting it in %.0f s",
                slot.index, pid, _describe_exit(exitcode), lived, slot.backoff_s,
            )  # fmt: skip
        slot.restart_at = now + slot.backoff_s
        slot.backoff_s = min(MAX_RESTART_BACKOFF_S, slot.backoff_s * 2)

    def _drain(self, slot: _Slot) -> None:
        """Hand every finished job the worker reported to `on_finished`."""
        reports = slot.reports
        try:
            while reports is not None and reports.poll():
                status, result = reports.recv()
                if self.on_finished is not None:
                    self.on_finished(status, result)
        except (EOFError, OSError, pickle.UnpicklingError):  # the worker exited, perhaps mid-message
            if reports is not None:
                reports.close()
            slot.reports = None

    def _forget(self, slot: _Slot) -> None:
        if slot.reports is not None:
            slot.reports.close()
            slot.reports = None
        if slot.process is not None and not slot.process.is_alive():
            slot.process.close()
            slot.process = None


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class _Reports:
    """The child's end of its report pipe: one (status, result) message per finished job, sent whole."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        # Jobs finish on the worker's thread and, when canceled, on its lease keeper's.
        self.lock = threading.Lock()

    def __call__(self, status: str, result: dict[str, Any] | None) -> None:
        try:
            with self.lock:
                self.connection.send((status, result))
        except OSError:  # the supervisor is gone; the parent watch below stops this worker
            pass


def _stop_with_parent() -> None:
    """SIGTERM ourselves (a graceful stop) when the supervising process dies, however it died."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_process_main(settings: Settings, nice: int, reports: Connection) -> None:
    """The body of a worker process: lower priority, own process group (a Ctrl-C in the terminal reaches the server,
    which stops its workers in order), then `image-gen worker`."""
    if nice:
        os.nice(nice)  # first: the imports below (torch) already compete with the API for the CPU
    os.setpgrp()
    from image_gen.worker import run_worker

    _stop_with_parent()
    sys.exit(run_worker(settings, on_finished=_Reports(reports)))
