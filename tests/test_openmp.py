"""CPU kernels run their parallel loops on torch's OpenMP threads (mra_compile.openmp)."""
import ctypes
import hashlib
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python

import mra_compile
from mra_compile import openmp

SCRIPT = r"""
import hashlib, json, torch
import mra_compile
from mra_compile import openmp
g = torch.Generator().manual_seed(7)
h = hashlib.sha256()
for (B, H, N, D), mode, masked in (((2, 3, 300, 40), "full", True), ((1, 4, 1024, 64), "sparse", False)):
    q, k, v = (torch.randn(B, H, N, D, generator=g, requires_grad=True) for _ in range(3))
    mask = (torch.rand(B, N, generator=g) > 0.2).float() if masked else None
    out = torch.ops.mra.attention(q, k, v, mask, 5 * (-(-N // 32)), mode)
    out.backward(torch.randn(out.shape, generator=g))
    for t in (out, q.grad, k.grad, v.grad):
        h.update(t.detach().numpy().tobytes())
print(json.dumps({"hash": h.hexdigest(), "status": openmp.status()}))
"""


def run_script(**env):
    return run_python(SCRIPT, env=env, cwd=REPO, timeout=600)


def test_same_results_as_tvms_own_pool():
    """Forward and backward, masked and not: bit for bit what TVM's pool computes (an
    iteration of a kernel's parallel loop computes the same whichever task runs it)."""
    ours, tvm_pool = run_script(), run_script(MRA_COMPILE_OPENMP="0")
    assert ours["status"].startswith("torch's OpenMP threads")
    assert tvm_pool["status"] == "TVM's own thread pool: disabled by MRA_COMPILE_OPENMP=0"
    assert ours["hash"] == tvm_pool["hash"]


def test_every_loaded_cpu_kernel_uses_the_launcher():
    q = torch.randn(1, 2, 256, 32)
    torch.ops.mra.attention(q, q, q, None, 24, "full")
    state = openmp._state()
    assert "launch" in state, openmp.status()
    events = [e for e in mra_compile.cache_events() if e["target"] == "llvm"]
    assert events
    with_scratch = 0
    for e in events:
        lib = ctypes.CDLL(e["path"])
        assert ctypes.c_void_p.in_dll(lib, openmp.POINTER).value == state["launch"], e["op"]
        try:  # (a kernel whose loop bodies allocate nothing has no scratch pointers)
            scratch = [ctypes.c_void_p.in_dll(lib, name).value
                       for name in openmp.SCRATCH_POINTERS]
        except ValueError:
            continue
        assert tuple(scratch) == state["scratch"], e["op"]
        with_scratch += 1
    assert with_scratch  # (hires_rows' units allocate their logits there)


def test_scratch_is_a_stack_per_thread():
    """Kernel scratch comes from a per-thread stack: 64-byte aligned, reused once freed
    (in any order), and what does not fit goes to TVM's own allocator."""
    q = torch.randn(1, 2, 256, 32)
    torch.ops.mra.attention(q, q, q, None, 24, "full")  # (TVM's allocator is the fallback)
    shim = openmp._state()["shim"]
    alloc, free = shim.mra_workspace_alloc, shim.mra_workspace_free
    alloc.restype, alloc.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_int,
                                                      ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    free.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]

    def take(nbytes):
        return alloc(1, 0, nbytes, 2, 32)

    def give(ptr):
        assert free(1, 0, ptr) == 0

    def run():
        a, b = take(1000), take(5000)
        assert a % 64 == 0 and b % 64 == 0 and b >= a + 1000
        give(b)
        assert take(64) == b  # the top, freed, is reused
        give(b)
        give(a)  # free in any order: both are released once the top is
        c, d = take(3000), take(3000)
        assert c == a and d >= c + 3000
        give(c)
        e = take(100)
        assert e >= d + 3000  # c is not the top: not reused yet
        give(e), give(d)
        assert take(10) == a
        give(a)
        e0, e1 = take(0), take(0)  # (empty requests: distinct places all the same)
        assert e0 == a and e1 > e0
        give(e0)  # not the top: e1 stays its own
        f = take(8)
        assert f > e1
        give(e1), give(f)
        assert take(4) == a
        give(a)
        big = take(64 << 20)  # larger than the stack: TVM's allocator
        assert big and not a <= big < a + (64 << 20)
        give(big)
        return a

    mine = run()
    other = []
    t = threading.Thread(target=lambda: other.append(run()))
    t.start()
    t.join()
    assert other and other[0] != mine  # each thread its own stack

    def rss_mb():
        status = Path("/proc/self/status").read_text()
        return int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1]) / 1024

    def touch_and_leave():  # 1.5 MB of a thread's stack written, then the thread ends
        p = take(3 << 19)
        ctypes.memset(p, 1, 3 << 19)
        give(p)

    if Path("/proc/self/status").exists():
        before = rss_mb()
        for _ in range(100):  # 150 MB if the stacks of ended threads were kept
            t = threading.Thread(target=touch_and_leave)
            t.start()
            t.join()
        assert rss_mb() - before < 50


def test_tasks_are_handed_out_as_threads_come_free():
    """A parallel loop is cut into TASKS_PER_THREAD tasks per thread, each run once, in
    one share per thread: a thread runs its own share in order, then the tasks the others
    have not started, from the ends of their shares. One thread kept busy by its first
    task leaves the rest to the other: its own share in order, then the busy one's share
    from its end."""
    state = openmp._state()
    assert "shim" in state, openmp.status()
    shim = state["shim"]
    lam = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    before = openmp.threads()
    tasks = 2 * openmp.TASKS_PER_THREAD
    seen, lock = [], threading.Lock()
    all_seen = threading.Event()

    @lam
    def task(task_id, penv, cdata):
        num_task = ctypes.cast(penv, ctypes.POINTER(ctypes.c_int32 * 4)).contents[2]
        with lock:
            seen.append((task_id, num_task, threading.get_ident()))
            if len(seen) == tasks:
                all_seen.set()
        if task_id == 0:  # (held until every task started: another thread ran the rest)
            all_seen.wait(10)
        return 0

    try:
        shim.mra_parallel_set_tasks(2)
        rc = shim.mra_parallel_launch(task, None, 0)
    finally:
        shim.mra_parallel_set_tasks(before)
    assert rc == 0
    assert sorted(t for t, _, _ in seen) == list(range(tasks))
    assert {n for _, n, _ in seen} == {tasks}
    holder = next(who for t, _, who in seen if t == 0)
    assert all(who != holder for t, _, who in seen if t != 0)
    share = tasks // 2
    assert [t for t, _, who in seen if who != holder] == [
        *range(share, tasks), *range(share - 1, 0, -1)]


def test_threads_follow_torch():
    q = torch.randn(1, 2, 256, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.mra.attention(q, q, q, None, 24, "full")
        assert openmp.threads() == 1
    finally:
        torch.set_num_threads(before)
    again = torch.ops.mra.attention(q, q, q, None, 24, "full")
    assert openmp.threads() == before
    torch.testing.assert_close(single, again, rtol=0, atol=0)


def test_calls_from_several_python_threads():
    g = torch.Generator().manual_seed(3)
    inputs = [tuple(torch.randn(1, 3, 512, 64, generator=g) for _ in range(3)) for _ in range(4)]
    expected = [torch.ops.mra.attention(q, k, v, None, 64, "full") for q, k, v in inputs]
    results = [None] * len(inputs)

    def work(i):
        q, k, v = inputs[i]
        for _ in range(3):
            results[i] = torch.ops.mra.attention(q, k, v, None, 64, "full")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_launcher_is_built_once_per_source(tmp_path):
    first = openmp.build_into(tmp_path)
    digest = hashlib.sha256(openmp._SOURCE.encode()).hexdigest()[:16]
    assert first.parent == tmp_path and first.exists() and digest in first.name
    mtime = first.stat().st_mtime_ns
    assert openmp.build_into(tmp_path) == first and first.stat().st_mtime_ns == mtime
    # no temporaries: the launcher and its sha256 sidecar (checked before loading it)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_finds_torchs_openmp_runtime():
    path = openmp._openmp_runtime()
    assert path is not None and Path(path).exists()
    assert any(name in Path(path).name for name in ("libgomp", "libiomp5", "libomp"))


def test_the_first_call_of_a_process_is_parallel_too():
    """The launcher is set up when the first kernel loads, inside the op's single-threaded
    plan section: it must still take torch's thread count (it took that section's 1, and
    the whole first call, and every kernel timed alone after it, ran on one thread)."""
    got = run_python(
        "import json, torch\n"
        "import mra_compile\n"
        "from mra_compile import openmp\n"
        "torch.set_num_threads(2)\n"
        "q = torch.randn(1, 2, 256, 32)\n"
        "torch.ops.mra.attention(q, q, q, None, 24, 'full')\n"
        "print(json.dumps({'threads': openmp.threads(), 'status': openmp.status()}))\n",
        cwd=REPO, timeout=600)
    assert got["status"].startswith("torch's OpenMP threads"), got["status"]
    assert got["threads"] == 2
