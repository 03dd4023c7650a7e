"""bench/gpu_check.py's driver without a GPU: one fault or hang loses only its own task.

Fake tasks stand for the GPU work: one raises what a sticky CUDA error raises and leaves
the "device" unusable in its process, one hangs, one kills its process. Every row
measured before and after must be in the results file, each lost task recorded, and the
report rendered from the file.
"""
import csv
import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import gpu_driver  # noqa: E402
from bench.gpu_driver import Results, Task  # noqa: E402

# The worker: a fresh interpreter running gpu_driver.work over the fake tasks, with a
# device probe that fails once the sticky task ran in this process (as CUDA's does).
WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from bench import gpu_driver
    from bench.gpu_driver import Results, Task

    broken = []

    def run(task, emit):
        emit({{"table": "rows", "id": task.id, "pid": os.getpid()}})  # measured at once
        if task.kind == "sticky":
            broken.append(1)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if task.kind == "hang":
            time.sleep(600)
        if task.kind == "crash":
            os.abort()
        if task.kind == "error":
            raise ValueError("q: wrong")

    def problem():
        return "CUDA error: an illegal memory access was encountered" if broken else None

    def failure_rows(task, status, message):
        return [{{"table": "failed", "id": task.id, "status": status, "message": message}}]

    tasks = [Task(name, kind, {seconds}) for name, kind in {tasks!r}]
    with open({stacks!r}, "a") as stacks:
        sys.exit(gpu_driver.work(tasks, Results({path!r}), run, problem, failure_rows, stacks))
""")

PLAN = [("a", "ok"), ("b", "error"), ("c", "sticky"), ("d", "ok"), ("e", "hang"), ("f", "ok"),
        ("g", "crash"), ("h", "ok")]


def failure_rows(task, status, message):
    return [{"table": "failed", "id": task.id, "status": status, "message": message}]


def supervise_fakes(tmp_path, plan, seconds=1.5, deadline_s=60.0):
    path, stacks = tmp_path / "rows.jsonl", tmp_path / "stacks.txt"
    script = WORKER.format(repo=str(REPO), seconds=seconds, tasks=plan, path=str(path),
                           stacks=str(stacks))
    tasks = [Task(name, kind, seconds) for name, kind in plan]
    results = Results(path)
    progress = []
    t0 = time.monotonic()
    gpu_driver.supervise(tasks, results, lambda: subprocess.Popen([sys.executable, "-c", script]),
                         failure_rows, deadline=t0 + deadline_s, poll=0.05, grace=0.5,
                         on_progress=lambda: progress.append(len(results.read())))
    return results, progress, time.monotonic() - t0, stacks


def test_a_fault_a_hang_and_a_crash_lose_only_their_own_task(tmp_path):
    results, progress, elapsed, stacks = supervise_fakes(tmp_path, PLAN)
    _, ended = results.task_events()
    status = {name: ended[name]["status"] for name, _ in PLAN}
    assert status == {"a": "ok", "b": "error", "c": "broken", "d": "ok", "e": "hung",
                      "f": "ok", "g": "died", "h": "ok"}
    # Every task's own row reached the file, including those of the lost tasks.
    measured = results.rows("rows")
    assert [r["id"] for r in measured] == [name for name, _ in PLAN]
    assert all(r["task"] == r["id"] for r in measured)  # tagged with the task that made them
    # A fresh worker after the sticky error, the hang and the crash: four processes.
    pids = {r["id"]: r["pid"] for r in measured}
    assert pids["a"] == pids["b"] == pids["c"] != pids["d"] == pids["e"] != pids["f"]
    assert pids["f"] == pids["g"] != pids["h"]
    assert len(results.rows("worker")) == 8  # start and exit of each
    # Each lost task stands in its table, with why.
    failed = {r["id"]: r for r in results.rows("failed")}
    assert set(failed) == {"b", "c", "e", "g"}
    assert "illegal memory access" in failed["c"]["message"]
    assert failed["b"]["message"] == "ValueError: q: wrong"
    assert "hung" in failed["e"]["message"]
    assert "signal" in failed["g"]["message"]
    assert "Timeout" in stacks.read_text()  # the hung worker's stack, for the report
    assert progress and elapsed < 15


def test_rows_are_on_disk_while_the_worker_still_runs(tmp_path):
    """A watchdog's kill after a row was measured must not lose it: appended and synced."""
    results, _, _, _ = supervise_fakes(tmp_path, [("a", "ok"), ("e", "hang")], seconds=1.0)
    lines = results.path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert any(r.get("id") == "e" and r["table"] == "rows" for r in rows)
    assert rows[-1]["table"] == "worker" or rows[-1]["table"] == "task"


def test_the_deadline_records_what_was_not_run(tmp_path):
    plan = [("a", "ok"), ("e", "hang"), ("f", "ok")]
    results, _, elapsed, _ = supervise_fakes(tmp_path, plan, seconds=30.0, deadline_s=1.0)
    _, ended = results.task_events()
    assert ended["a"]["status"] == "ok"
    assert ended["e"]["status"] == "hung" and "deadline" in ended["e"]["message"]
    assert ended["f"]["status"] == "skipped"
    assert elapsed < 8


def test_tasks_past_their_start_time_are_recorded_as_skipped(tmp_path):
    results = Results(tmp_path / "rows.jsonl")
    tasks = [Task("a", "ok", 5.0), Task("late", "ok", 5.0, start_by=time.monotonic() - 1)]
    ran = []
    code = gpu_driver.work(tasks, results, lambda t, emit: ran.append(t.id), lambda: None,
                           failure_rows)
    assert code == 0 and ran == ["a"]
    assert results.rows("failed") == [{"table": "failed", "id": "late", "status": "skipped",
                                       "message": "skipped: time budget", "task": "late"}]


def test_a_cut_last_line_loses_only_itself(tmp_path):
    results = Results(tmp_path / "rows.jsonl")
    results.append({"table": "rows", "id": "a"})
    with open(results.path, "a") as f:
        f.write('{"table": "rows", "id": "b"')  # killed mid-write
    assert results.rows("rows") == [{"table": "rows", "id": "a"}]


@pytest.mark.parametrize("args", [["--help"]])
def test_gpu_check_imports_and_helps_without_cuda(args):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--bundle" in proc.stdout


def test_report_keeps_passing_lost_and_skipped_checks_and_the_must_show_ratios(tmp_path):
    """gpu_check's side: rows of a run in which one case broke the device and one was
    never reached are all in the markdown and the CSV, and the speed summary states the
    issue's thresholds."""
    from bench import gpu_check

    args = gpu_check.parse_args(["--smoke", "--out", str(tmp_path)])
    tasks = gpu_check.plan_tasks(args, time.monotonic())
    assert [t.kind for t in tasks[:2]] == ["env", "rates"]
    assert {"baselines", "flex", "peer", "kernels"} <= {t.kind for t in tasks}
    first, broke, late = [t for t in tasks if t.kind == "correctness"][:3]
    results = Results(tmp_path / gpu_check.RESULTS)
    for task in (first, broke):  # broke's row was measured before the probe found the fault
        row = gpu_check.correctness_row(task.spec)
        row.update(status="PASS", error=1e-7, message="", task=task.id)
        results.append(row)
    gpu_driver.close_task(results, first, "ok", "", gpu_check.failure_rows)
    gpu_driver.close_task(results, broke, "broken", "device unusable after it: CUDA error: an "
                          "illegal memory access was encountered", gpu_check.failure_rows)
    gpu_driver.close_task(results, late, "skipped", "skipped: time budget", gpu_check.failure_rows)
    dtype, D, N = (gpu_check.short_dtype(gpu_check.SMOKE_SUMMARY[0]), *gpu_check.SMOKE_SUMMARY[1:])
    for impl, mode, ms in (("op", "full", 1.0), ("op_masked", "full", 1.25), ("sdpa", None, 6.0),
                           ("flex", None, 1.5), ("peer", "full", 0.8)):
        results.append({"table": "timing", "dtype": dtype, "D": D, "N": N, "impl": impl,
                        "mode": mode, "direction": "fwd", "ms": ms, "why": None,
                        "variant": "bs32" if impl == "flex" else None})
    results.append({"table": "note", "text": "kernels: hung: killed after 190 s"})
    meta = {"argv": ["python", "bench/gpu_check.py", "--smoke"], "date": "today",
            "start": time.monotonic(), "budget": 60.0, "smoke": True, "out": tmp_path,
            "fatal": [], "notes": []}
    text = gpu_check.write_outputs(results, meta)
    assert "every correctness check passes: no (1 passed, 1 failed, 1 skipped)" in text
    assert "illegal memory access" in text and "kernels: hung" in text
    assert "SDPA flash 6.000 ms (6.00x, needs >= 5x: yes)" in text
    assert "MRA-2 on Flex 0.800 ms (0.80x, needs >= 1x: NO)" in text
    lines = (tmp_path / "correctness.csv").read_text().splitlines()
    assert len(lines) == 4 and "FAIL" in lines[2] and "SKIPPED" in lines[3]
    # The masked call's time beside the unmasked one's, and their ratio.
    timings = list(csv.DictReader((tmp_path / "timings.csv").open()))
    (row,) = [r for r in timings if r["N"] == str(N) and r["mode"] == "full"
              and r["direction"] == "fwd"]
    assert float(row["op_masked_ms"]) == 1.25 and float(row["op_masked_over_op"]) == 1.25
