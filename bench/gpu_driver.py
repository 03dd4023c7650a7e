"""Run a list of tasks so that a GPU fault or a hang loses only the task it happened in.

Used by bench/gpu_check.py; no torch here, so that it is testable anywhere.

- ``Results``: the results file, one JSON object per line, each appended, flushed and
  fsynced as soon as it exists; data rows carry their task's id. Task records
  (``{"table": "task", "event": "begin" | "end", ...}``) sit beside the data rows and say
  which task was running.
- ``work``: the worker's loop, in the process that touches the device. It runs the tasks
  not yet begun in the file, in order; after each task it asks whether the device is
  still usable, and when it is not (a sticky CUDA error such as an illegal address makes
  every later call fail) it records that and exits with ``EXIT_BROKEN``.
- ``supervise``: the parent, which never touches the device. It starts workers until
  every task has an end record, kills a worker whose task outlives its allowance (or that
  stays silent), records the task a dead or killed worker was running, and starts a
  fresh worker for the rest.
"""
from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

EXIT_BROKEN = 3  # worker exit status: the device is unusable; a fresh process may run the rest
GRACE_SECONDS = 10.0  # past a task's allowance before the supervisor kills the worker
STARTUP_SECONDS = 180.0  # a worker that begins no task for this long is killed
ATTEMPTS_WITHOUT_PROGRESS = 2  # workers that end no task before the rest is given up


@dataclass(frozen=True)
class Task:
    """One unit of work. ``id`` is stable across processes (both build the same list);
    ``seconds`` is its allowance; it is not started after ``start_by`` (time.monotonic,
    the same clock in every process of the machine); ``spec`` is free for the runner."""

    id: str
    kind: str
    seconds: float
    start_by: float = float("inf")
    spec: Any = field(default=None, compare=False)


def one_line(exc: BaseException) -> str:
    """The first lines of an exception as one line, for a table cell."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines[:2])}"[:400]


class Results:
    """The append-only results file (JSON lines)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        """Write one record and push it to the disk before returning: a fault or a kill
        right after loses nothing already measured."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=str) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill mid-write: what it held is lost, not the rest
        return records

    def rows(self, table: str) -> list[dict]:
        return [r for r in self.read() if r.get("table") == table]

    def task_events(self) -> tuple[dict, dict]:
        """({task id: begin record}, {task id: end record})."""
        begun, ended = {}, {}
        for r in self.rows("task"):
            (begun if r["event"] == "begin" else ended)[r["id"]] = r
        return begun, ended

    def begin(self, task: Task) -> None:
        self.append({"table": "task", "event": "begin", "id": task.id, "kind": task.kind,
                     "pid": os.getpid(), "t": time.monotonic()})

    def end(self, task: Task, status: str, message: str = "") -> None:
        self.append({"table": "task", "event": "end", "id": task.id, "kind": task.kind,
                     "status": status, "message": message, "pid": os.getpid(),
                     "t": time.monotonic()})


# A runner's signature: run(task, emit) with emit(row) appending a data row at once.
Runner = Callable[[Task, Callable[[dict], None]], None]
# failure_rows(task, status, message): the rows that stand for a task that did not finish
# (e.g. a FAIL row in the correctness table), so that its table stays complete.
FailureRows = Callable[[Task, str, str], Iterable[dict]]


def close_task(results: Results, task: Task, status: str, message: str,
               failure_rows: FailureRows) -> None:
    if status != "ok":
        for row in failure_rows(task, status, message):
            results.append({**row, "task": task.id})
    results.end(task, status, message)


def work(tasks: list[Task], results: Results, run: Runner, device_problem: Callable[[], str | None],
         failure_rows: FailureRows, stacks: IO | None = None) -> int:
    """Run every task that no earlier worker began; returns 0, or EXIT_BROKEN when the
    device became unusable (the task that broke it is recorded first).

    ``device_problem()`` returns None while the device works, else why not; it is asked
    after every task, so a fault surfacing late is pinned to the task whose work ran.
    ``stacks``: where the Python stacks go when a task outlives its allowance (the
    worker then exits and the supervisor records the task as hung).
    """
    begun, _ = results.task_events()
    for task in tasks:
        if task.id in begun:
            continue
        if time.monotonic() > task.start_by:
            close_task(results, task, "skipped", "skipped: time budget", failure_rows)
            continue
        results.begin(task)
        if stacks is not None:
            faulthandler.dump_traceback_later(task.seconds, exit=True, file=stacks)
        def emit(row: dict, task_id: str = task.id) -> None:
            results.append({**row, "task": task_id})  # which task measured it

        try:
            run(task, emit)
            status, message = "ok", ""
        except Exception as exc:  # noqa: BLE001  (recorded; the next task runs)
            status, message = "error", one_line(exc)
        # The probe waits for the task's device work, so the watchdog stays armed over it.
        problem = device_problem()
        if stacks is not None:
            faulthandler.cancel_dump_traceback_later()
        if problem is not None:
            message = f"{message + '; ' if message else ''}device unusable after it: {problem}"
            close_task(results, task, "broken", message, failure_rows)
            return EXIT_BROKEN
        close_task(results, task, status, message, failure_rows)
    return 0


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def watch(proc: subprocess.Popen, by_id: dict[str, Task], results: Results, deadline: float,
          poll: float, grace: float, on_progress: Callable[[], None]) -> str | None:
    """Wait for a worker to exit; kill it when its task outlives its allowance, when it
    begins no task for STARTUP_SECONDS, or at ``deadline`` (each plus ``grace``, so that
    the worker's own watchdog can dump its stacks first). Returns why it was killed,
    or None when it exited by itself."""
    quiet_since, ended_count = time.monotonic(), 0
    while proc.poll() is None:
        time.sleep(poll)
        begun, ended = results.task_events()
        now = time.monotonic()
        if len(ended) != ended_count:
            ended_count, quiet_since = len(ended), now
            on_progress()
        running = [t for t in begun if t not in ended]
        why = None
        if running:
            task, started = by_id[running[-1]], begun[running[-1]]["t"]
            if now - started > task.seconds + grace:
                why = f"hung: killed after {now - started:.0f} s (allowance {task.seconds:.0f} s)"
        elif now - quiet_since > STARTUP_SECONDS:
            why = f"worker began no task in {STARTUP_SECONDS:.0f} s"
        if now > deadline + grace:
            why = "time budget: the run's deadline passed"
        if why is not None:
            proc.kill()
            proc.wait()
            return why
    return None


def never_raising(fn: Callable[[], None]) -> Callable[[], None]:
    """fn, with its errors printed instead of raised: a report that fails to render must
    not stop the run (the rows stay in the results file)."""
    def call() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            print(f"gpu_driver: progress callback failed: {one_line(exc)}", file=sys.stderr,
                  flush=True)
    return call


def supervise(tasks: list[Task], results: Results, spawn: Callable[[], subprocess.Popen],
              failure_rows: FailureRows, deadline: float, poll: float = 0.5,
              grace: float = GRACE_SECONDS, on_progress: Callable[[], None] = lambda: None) -> None:
    """Start workers (``spawn()``) until every task has an end record or time is up.
    ``on_progress()`` runs after every finished task (e.g. to rewrite the report)."""
    by_id = {t.id: t for t in tasks}
    on_progress = never_raising(on_progress)
    fruitless = 0
    while True:
        _, ended = results.task_events()
        pending = [t for t in tasks if t.id not in ended]
        if not pending:
            return
        if time.monotonic() > deadline or fruitless >= ATTEMPTS_WITHOUT_PROGRESS:
            why = ("skipped: time budget" if time.monotonic() > deadline else
                   f"skipped: {fruitless} workers in a row finished no task")
            for task in pending:
                close_task(results, task, "skipped", why, failure_rows)
            return
        proc = spawn()
        results.append({"table": "worker", "event": "start", "pid": proc.pid})
        killed = watch(proc, by_id, results, deadline, poll, grace, on_progress)
        results.append({"table": "worker", "event": "exit", "pid": proc.pid,
                        "returncode": proc.returncode, "killed": killed})
        record_lost_task(results, by_id, killed, proc.returncode, failure_rows)
        _, after = results.task_events()
        fruitless = 0 if len(after) > len(ended) else fruitless + 1
        on_progress()


def record_lost_task(results: Results, by_id: dict[str, Task], killed: str | None,
                     returncode: int, failure_rows: FailureRows) -> None:
    """The task a worker was running when it died or was killed gets its end record:
    "hung" when it was killed or outlived its allowance (the worker's own watchdog),
    "died" otherwise (a crash: segfault, abort, os._exit)."""
    begun, ended = results.task_events()
    for task_id in [t for t in begun if t not in ended]:
        task = by_id[task_id]
        elapsed = time.monotonic() - begun[task_id]["t"]
        if killed is not None:
            status, why = "hung", killed
        elif elapsed >= task.seconds:
            status, why = "hung", (f"hung: no result after {elapsed:.0f} s (allowance "
                                   f"{task.seconds:.0f} s; stacks in the worker's log)")
        else:
            status, why = "died", f"worker died ({describe_exit(returncode)}) after {elapsed:.1f} s"
        close_task(results, task, status, why, failure_rows)
