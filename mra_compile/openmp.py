"""TVM's CPU kernels run their parallel loops on torch's OpenMP threads.

A compiled TVM CPU kernel starts its parallel loops through a function pointer that
the module itself holds, ``__TVMBackendParallelLaunch``, which the TVM runtime points
at its own thread pool when it loads the module. Two pools then share the cores with
torch's: after every parallel torch op, torch's OpenMP workers spin for several
milliseconds waiting for more work (libgomp's default), and a TVM kernel starting in
that window shares its cores with them (measured on 2 cores: the first kernel after an
SDPA call up to 4x slower; the whole op at N = 1024 7.3-7.8 ms instead of 4.4-4.6 ms in
the interleaved benchmark).

Here that pointer is set, for every CPU kernel module loaded, to a 40-line C function
(built once with the system C compiler into the kernel cache) that runs the kernel's
tasks in an OpenMP parallel region of the OpenMP runtime torch loaded (``GOMP_parallel``,
which GNU, LLVM and Intel OpenMP all export): the workers torch leaves spinning take
the kernel's tasks at once, and there is one pool on the machine instead of two.

A kernel's parallel loop is cut into ``TASKS_PER_THREAD`` tasks per thread, dealt in one
contiguous share per thread: each thread runs its own share's tasks in order, then takes
the tasks the others have not started yet, from the ends of their shares, one at a time.
Not fixed halves: a row's units differ in work (blocks per query block, overflow
merges), and with static halves the thread that finished first waited at the region's
end (libgomp's barrier took ~7% of the samples of ``hires_rows`` alone on 2 cores), as
it does for a thread whose core another process takes for a while (the forward at
N = 4096 with one busy process beside it on 2 cores: 0.83x the time of static halves).
And not the next task of the whole loop to whichever thread comes (one atomic counter,
until 2026-12-06), which gave each thread every other task: in shares a thread's tasks
follow each other, and each kernel's units (rows) with them. The whole op in one
process, the two schemes alternating (Zen 4, 2 cores; bench/results/roofline_cpu.md):
0.97x the time at N = 4096 (full), 0.98x at 8192 (sparse, float32 and bf16), 0.95x at
512, a training step 0.97-0.99x; beside a busy process no slower (16 against 22 ms at
N = 4096, 6.5 against 22.5 ms at 1024; static halves 56 and 33).

The same library serves the kernels' scratch (``__TVMBackendAllocWorkspace`` and
``__TVMBackendFreeWorkspace``, also pointers in the module): TVM asks for every buffer of
1 KB or more (or of a size known at run time only) that a loop body allocates (a unit's
logits, probabilities, outputs) once per iteration, and its workspace pool searched a
list on each release (~3% of the forward's samples at N = 8192). A stack of 2 MB per
thread (freed when the thread ends) serves them by a pointer bump instead: the whole op
0.95x the time at N = 1024, 0.99x at N = 8192 (fp32, Zen 5, in-process A/B); larger
requests still go to TVM's pool.

Falls back to TVM's own pool, silently but visibly in ``mra-compile info``
(``status()``), when there is no C compiler, no OpenMP runtime in the process (torch
built without OpenMP), or ``MRA_COMPILE_OPENMP=0``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import threading
from pathlib import Path

import torch

from mra_compile import host

ENV = "MRA_COMPILE_OPENMP"  # "0": kernels use TVM's own thread pool
# Tasks a kernel's parallel loop is cut into per thread (a share each; see above).
TASKS_PER_THREAD = 8
POINTER = "__TVMBackendParallelLaunch"
# The module's scratch allocation and release (``mra_workspace_alloc``/``_free`` take them).
SCRATCH_POINTERS = ("__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace")

# The TVM side follows tvm/runtime/c_backend_api.h (TVMParallelGroupEnv, FTVMParallelLambda,
# TVMBackendParallelLaunch). Tasks are spread over however many threads the team gets
# (fewer than asked when nested inside another parallel region: then one).
_SOURCE = r"""
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef void (*gomp_parallel_fn)(void (*fn)(void*), void* data, unsigned num_threads,
                                 unsigned flags);

static gomp_parallel_fn gomp_parallel;
static int default_tasks = 1;

static int tasks_per_thread = 1;

/* A loop's tasks are cut into one contiguous share per thread (at most MAX_SHARES: more
   threads take shares modulo). A thread runs its own share's tasks in order from the
   front, then takes the others' last tasks, from their ends, until none is left: each
   range [front, back) is one 64-bit word, taken by compare-and-swap. (TVM's tasks are
   independent: no kernel here uses TVMBackendParallelBarrier.) */
#define MAX_SHARES 64
struct job { FTVMParallelLambda f; void* cdata; int tasks, shares; volatile int rc;
             int arrivals; uint64_t range[MAX_SHARES]; };

/* The front task of a range (or its back one), -1 when it is empty. */
static int take(uint64_t* range, int back) {
  uint64_t old = __atomic_load_n(range, __ATOMIC_RELAXED);
  for (;;) {
    uint32_t f = (uint32_t)old, b = (uint32_t)(old >> 32);
    if (f >= b) return -1;
    uint64_t taken = back ? ((uint64_t)(b - 1) << 32) | f : ((uint64_t)b << 32) | (f + 1);
    if (__atomic_compare_exchange_n(range, &old, taken, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      return back ? (int)(b - 1) : (int)f;
  }
}

static void run_tasks(void* p) {
  struct job* j = (struct job*)p;
  TVMParallelGroupEnv env = {0, j->tasks};
  int own = __atomic_fetch_add(&j->arrivals, 1, __ATOMIC_RELAXED) % j->shares;
  for (int k = 0; k < j->shares; ++k)
    for (int t; (t = take(&j->range[(own + k) % j->shares], k != 0)) >= 0;) {
      int rc = j->f(t, &env, j->cdata);
      if (rc != 0) j->rc = rc;
    }
}

int mra_parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  int threads = num_task > 0 ? num_task : default_tasks;
  if (threads <= 1) {
    TVMParallelGroupEnv env = {0, 1};
    return f(0, &env, cdata);
  }
  int tasks = num_task > 0 ? num_task : threads * tasks_per_thread;
  int shares = threads < MAX_SHARES ? threads : MAX_SHARES;
  struct job j = {f, cdata, tasks, shares, 0, 0, {0}};
  for (int r = 0; r < shares; ++r) /* [tasks r / shares, tasks (r + 1) / shares) */
    j.range[r] = ((uint64_t)tasks * (r + 1) / shares << 32) | (uint64_t)tasks * r / shares;
  gomp_parallel(run_tasks, &j, (unsigned)threads, 0);
  return j.rc;
}

void mra_parallel_init(void* parallel) { gomp_parallel = (gomp_parallel_fn)parallel; }

/* Scratch of kernel bodies (TVMBackendAllocWorkspace / TVMBackendFreeWorkspace, whose
   pointers a module holds like the launch's): TVM puts every buffer of 1 KB or more (or
   of a run-time size) that a loop body allocates there, once per iteration, and frees it
   on the same thread at the iteration's end, in the reverse order (nested scopes). A
   stack per thread (SCRATCH_BYTES, taken from malloc on first use, freed when the
   thread exits) serves that with a pointer bump;
   what does not fit, or is not host memory, or is allocated past MAX_LIVE live buffers,
   goes to TVM's own. */
#include <pthread.h>
#include <stdlib.h>
#define SCRATCH_BYTES ((size_t)2 << 20)
#define MAX_LIVE 64
typedef void* (*alloc_fn)(int, int, uint64_t, int, int);
typedef int (*free_fn)(int, int, void*);
static alloc_fn tvm_alloc;
static free_fn tvm_free;
/* The bookkeeping heads the stack's memory; thread-local storage holds only a pointer to
   it, in the initial-exec model: one load from the thread pointer per call, where the
   default model of a shared library calls __tls_get_addr (a unit allocates ~7 buffers). */
struct scratch { char* base; size_t top; int live; size_t start[MAX_LIVE], below[MAX_LIVE];
                 char freed[MAX_LIVE]; };
#define SCRATCH_HEAD ((sizeof(struct scratch) + 63) & ~(size_t)63)
static __thread struct scratch* stack __attribute__((tls_model("initial-exec")));
static pthread_key_t stack_owner; /* its destructor frees a thread's stack at exit */
static pthread_once_t stack_owner_once = PTHREAD_ONCE_INIT;
static void make_stack_owner(void) { pthread_key_create(&stack_owner, free); }

static struct scratch* new_stack(void) {
  void* mem = 0;
  if (posix_memalign(&mem, 64, SCRATCH_HEAD + SCRATCH_BYTES) != 0) return 0;
  struct scratch* s = (struct scratch*)mem;
  s->base = (char*)mem + SCRATCH_HEAD;
  s->top = 0;
  s->live = 0;
  pthread_once(&stack_owner_once, make_stack_owner);
  pthread_setspecific(stack_owner, mem);
  return s;
}

void* mra_workspace_alloc(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  struct scratch* s = stack;
  if (device_type == 1 /* kDLCPU */ && !s) s = stack = new_stack();
  if (device_type == 1 && s && s->live < MAX_LIVE) {
    size_t at = (s->top + 63) & ~(size_t)63;
    /* (at least a byte each: no two live buffers start at the same place, which is how a
       release finds its buffer; TVM asks for 0 bytes where a symbolic extent is 0) */
    uint64_t size = nbytes ? nbytes : 1;
    if (at <= SCRATCH_BYTES && size <= SCRATCH_BYTES - at) {
      s->start[s->live] = at;
      s->below[s->live] = s->top;
      s->freed[s->live++] = 0;
      s->top = at + size;
      return s->base + at;
    }
  }
  return tvm_alloc(device_type, device_id, nbytes, code, bits);
}

int mra_workspace_free(int device_type, int device_id, void* ptr) {
  struct scratch* s = stack;
  char* p = (char*)ptr;
  if (!s || p < s->base || p >= s->base + SCRATCH_BYTES)
    return tvm_free(device_type, device_id, ptr);
  for (int i = s->live - 1; i >= 0; --i)
    if (s->start[i] == (size_t)(p - s->base)) { s->freed[i] = 1; break; }
  while (s->live > 0 && s->freed[s->live - 1]) s->top = s->below[--s->live];
  return 0;
}

void mra_workspace_init(void* alloc, void* free_) {
  tvm_alloc = (alloc_fn)alloc;
  tvm_free = (free_fn)free_;
}

void mra_parallel_set_tasks(int n) { default_tasks = n > 0 ? n : 1; }
void mra_parallel_set_tasks_per_thread(int n) { tasks_per_thread = n > 0 ? n : 1; }
int mra_parallel_get_tasks(void) { return default_tasks; }
"""

_LOCK = threading.Lock()
_STATE: dict = {}  # "shim": the loaded CDLL, "launch": its address; or "error": why not
# The count the op last asked for (``set_threads``). The launcher is set up when the first
# kernel loads, inside the op's single-threaded plan section (``inputs.torch_single_threaded``),
# where torch's count reads 1: it takes this one, so that the first call is parallel too.
_ASKED: list[int] = []


def _openmp_runtime() -> str | None:
    """Path of the OpenMP runtime this process loaded (torch's), from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("libgomp", "libiomp5", "libomp"):
        m = re.search(rf"(/\S*/{name}[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE)
        if m:
            return m.group(1)
    return None


def launcher_name() -> str:
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    return f"libmra_openmp-{digest}.so"


def build_into(directory: Path) -> Path:
    """Compile the launcher into ``directory`` (once: the name carries the source hash,
    and a truncated or corrupt one is rebuilt; see ``host.compile_c_library``)."""
    return host.compile_c_library(_SOURCE, Path(directory) / launcher_name())


def _launcher() -> Path:
    """A kernel library's launcher (``DIR/runtime/``: runtime-only machines need no
    compiler and write nothing) when it matches the sha256 the library's manifest
    records, else the kernel cache's, checked against its sidecar, built on first use
    (loading a truncated one would kill the process)."""
    for directory in host.kernel_library_dirs():
        shipped = host.library_file(directory, f"runtime/{launcher_name()}")
        if shipped is not None:
            return shipped
    return host.cached_c_library(_SOURCE, f"openmp/{launcher_name()}")


def _setup() -> dict:
    if os.environ.get(ENV, "1") == "0":
        return {"error": f"disabled by {ENV}=0"}
    runtime = _openmp_runtime()
    if runtime is None:
        return {"error": "no OpenMP runtime loaded in this process"}
    try:
        omp = ctypes.CDLL(runtime)
        shim = ctypes.CDLL(str(_launcher()))
    except (OSError, subprocess.CalledProcessError) as e:
        return {"error": f"launcher unavailable ({e})"}

    def address(fn):
        return ctypes.c_void_p(ctypes.cast(fn, ctypes.c_void_p).value)

    try:
        shim.mra_parallel_init(address(omp.GOMP_parallel))
    except AttributeError as e:
        return {"error": f"{runtime} lacks the GNU OpenMP entry points ({e})"}
    shim.mra_parallel_set_tasks(_ASKED[-1] if _ASKED else torch.get_num_threads())
    shim.mra_parallel_set_tasks_per_thread(TASKS_PER_THREAD)
    return {"shim": shim, "launch": ctypes.cast(shim.mra_parallel_launch, ctypes.c_void_p).value,
            "scratch": tuple(ctypes.cast(fn, ctypes.c_void_p).value
                             for fn in (shim.mra_workspace_alloc, shim.mra_workspace_free)),
            "runtime": runtime}


def _state() -> dict:
    with _LOCK:
        if not _STATE:
            _STATE.update(_setup())
        return _STATE


def install(path: str | os.PathLike) -> bool:
    """Point the parallel launches of the loaded CPU kernel module at ``path`` to torch's
    OpenMP threads. Returns whether it did (False: TVM's pool stays in use)."""
    state = _state()
    if "launch" not in state:
        return False
    lib = ctypes.CDLL(str(path))  # the loaded module: dlopen returns the same handle
    _install_scratch(lib, state)
    try:
        ctypes.c_void_p.in_dll(lib, POINTER).value = state["launch"]
    except ValueError:  # no parallel loops in this module
        return False
    return True


def _install_scratch(lib, state: dict) -> None:
    """Point the module's scratch allocations at the per-thread stacks of the launcher
    library (TVM's own functions, read from the first module, stay the fallback)."""
    try:
        slots = [ctypes.c_void_p.in_dll(lib, name) for name in SCRATCH_POINTERS]
    except ValueError:  # a module that allocates no scratch
        return
    ours = state["scratch"]
    with _LOCK:
        if not state.get("scratch_ready"):
            if any(slot.value in (None, *ours) for slot in slots):
                return  # not set by TVM's loader: leave the module as it is
            state["shim"].mra_workspace_init(*(ctypes.c_void_p(s.value) for s in slots))
            state["scratch_ready"] = True
    for slot, fn in zip(slots, ours):
        slot.value = fn


def set_threads(n: int) -> None:
    """Threads per kernel (torch's intra-op thread count, read by the op on each call)."""
    n = int(n)
    if _ASKED == [n]:  # (every call asks; the shim already has it)
        return
    _ASKED[:] = [n]
    state = _STATE
    if "shim" in state:
        state["shim"].mra_parallel_set_tasks(n)


def threads() -> int | None:
    """Threads per kernel now, or None when TVM's own pool is in use."""
    state = _STATE
    return state["shim"].mra_parallel_get_tasks() if "shim" in state else None


def status() -> str:
    """How CPU kernels run their parallel loops (and where their scratch comes from), for
    ``mra-compile info``."""
    state = _state()
    if "launch" in state:
        scratch = ("per-thread stacks" if state.get("scratch_ready")
                   else "per-thread stacks once a kernel module is loaded")
        return f"torch's OpenMP threads ({state['runtime']}); kernel scratch: {scratch}"
    return f"TVM's own thread pool: {state['error']}"
