"""The launch cache's replay of a call's kernel launches, from C (CPU).

``launch_cache`` keeps the launches of an inference call per signature and runs them
again for later calls. From Python each launch goes through tvm_ffi, which turns every
torch tensor argument into a DLTensor again, and between the selection and the rest the
overflow count is read and the overflow units copied with numpy. Right after other heavy
torch work (whose traffic leaves the interpreter's caches cold) each of those steps costs
tens of microseconds: a TVM call with 21 tensors took 44 us from Python and 32 us from C
(``TVMFFIFunctionCall``, its DLTensors made beforehand), the call's host work 0.51 ms at
N = 4096 (bench/results/roofline_cpu.md).

Here a plan's launches become C structures once: each argument a ``TVMFFIAny`` (a
``DLTensor*`` made from the recorded tensor, an int, a float); the caller's q, k, v and
the output are four DLTensors whose data pointers a call sets. ``mra_replay`` runs the
head, reads the selection's per-row unit counts, picks the tail recorded for that count
(or returns 1: none yet), copies the overflow units and runs the tail: one C call per op
call. A kernel's error returns its code, and the caller replays from Python, which
raises it with its message.

The C library is built with the system C compiler into the kernel cache, or shipped in
an ahead-of-time library's runtime/ (like ``openmp``'s launcher); without either, or
with ``MRA_COMPILE_NATIVE_REPLAY=0``, replays stay in Python.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import torch

from mra_compile import host

ENV = "MRA_COMPILE_NATIVE_REPLAY"  # "0": replay from Python

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef struct { int32_t type_index; uint32_t pad; int64_t v; } Any;  /* TVMFFIAny */
typedef int (*ffi_call)(void *func, Any *args, int32_t num_args, Any *result);
typedef void (*ffi_move_error)(void **error);
typedef int (*ffi_dec_ref)(void *obj);

typedef struct { void *func; Any *args; int32_t nargs; int32_t ucap_at; } Launch;
typedef struct {
  int32_t most, nlaunch;
  Launch *launches;
  int32_t *used_row, *used_cols; /* NULL: no overflow units */
} Tail;
typedef struct {
  ffi_call call;
  ffi_move_error move_error;
  ffi_dec_ref dec_ref;
  int32_t nhead, ntail;
  Launch *head;
  Tail *tails;
  void **data[4]; /* the data fields of the q, k, v and output DLTensors */
  const int32_t *units, *unit_row, *unit_cols;
  int32_t rows, room, cols;
} Plan;

/* 0, or -1 - i where launch i failed (its error taken from the FFI and released). */
static int run(const Plan *p, Launch *l, int32_t n, int64_t ucap) {
  for (int32_t i = 0; i < n; ++i) {
    Any result = {0, 0, 0};
    if (l[i].ucap_at >= 0) l[i].args[l[i].ucap_at].v = ucap;
    if (p->call(l[i].func, l[i].args, l[i].nargs, &result) != 0) {
      void *error = 0;
      p->move_error(&error);
      if (error) p->dec_ref(error);
      return -1 - i;
    }
    if (result.type_index >= 64 && result.v) p->dec_ref((void *)(intptr_t)result.v);
  }
  return 0;
}

/* 0: done; 1: no tail for this call's overflow count (the head ran for nothing);
 * < 0: a launch failed (-1 - i in the head, -1001 - i in the tail). */
int mra_replay(const Plan *p, void *q, void *k, void *v, void *out) {
  void *ptrs[4] = {q, k, v, out};
  for (int i = 0; i < 4; ++i) *p->data[i] = ptrs[i];
  int rc = run(p, p->head, p->nhead, 0);
  if (rc) return rc;
  int32_t most = 0, widest = 0;
  for (int32_t r = 0; r < p->rows; ++r) {
    if (p->units[2 * r] > most) most = p->units[2 * r];
    if (p->units[2 * r + 1] > widest) widest = p->units[2 * r + 1];
  }
  const Tail *t = 0;
  for (int32_t j = 0; j < p->ntail; ++j)
    if (p->tails[j].most == most) t = &p->tails[j];
  if (!t) return 1;
  if (t->used_row) /* the units the overflow kernel reads: [R, most] of [R, room] */
    for (int32_t r = 0; r < p->rows; ++r) {
      memcpy(t->used_row + (size_t)r * most, p->unit_row + (size_t)r * p->room,
             (size_t)most * sizeof(int32_t));
      memcpy(t->used_cols + (size_t)r * most * p->cols,
             p->unit_cols + (size_t)r * p->room * p->cols,
             (size_t)most * p->cols * sizeof(int32_t));
    }
  rc = run(p, t->launches, t->nlaunch, widest > 1 ? widest : 1);
  return rc ? rc - 1000 : 0;
}
"""

# TVMFFIAny type indices (tvm/ffi/c_api.h)
_INT, _FLOAT, _DLTENSOR = 1, 3, 7
_KDLCPU = 1
# torch dtype -> DLPack (code, bits): kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6
_DL_DTYPES = {torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16),
              torch.bfloat16: (4, 16), torch.int64: (0, 64), torch.int32: (0, 32),
              torch.int16: (0, 16), torch.int8: (0, 8), torch.uint8: (1, 8),
              torch.bool: (6, 8)}
IO = ("q", "k", "v", "out")


class AnyValue(ctypes.Structure):
    _fields_ = [("type_index", ctypes.c_int32), ("pad", ctypes.c_uint32), ("v", ctypes.c_int64)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32),
                ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class CLaunch(ctypes.Structure):
    _fields_ = [("func", ctypes.c_void_p), ("args", ctypes.POINTER(AnyValue)),
                ("nargs", ctypes.c_int32), ("ucap_at", ctypes.c_int32)]


class CTail(ctypes.Structure):
    _fields_ = [("most", ctypes.c_int32), ("nlaunch", ctypes.c_int32),
                ("launches", ctypes.POINTER(CLaunch)),
                ("used_row", ctypes.c_void_p), ("used_cols", ctypes.c_void_p)]


class CPlan(ctypes.Structure):
    _fields_ = [("call", ctypes.c_void_p), ("move_error", ctypes.c_void_p),
                ("dec_ref", ctypes.c_void_p), ("nhead", ctypes.c_int32),
                ("ntail", ctypes.c_int32), ("head", ctypes.POINTER(CLaunch)),
                ("tails", ctypes.POINTER(CTail)), ("data", ctypes.c_void_p * 4),
                ("units", ctypes.c_void_p), ("unit_row", ctypes.c_void_p),
                ("unit_cols", ctypes.c_void_p), ("rows", ctypes.c_int32),
                ("room", ctypes.c_int32), ("cols", ctypes.c_int32)]


_LOCK = threading.Lock()
_STATE: dict = {}


def _library() -> dict:
    """{"replay": the C entry, "ffi": (call, move_error, dec_ref) addresses}, or
    {"error": why not} (once per process)."""
    with _LOCK:
        if not _STATE:
            _STATE.update(_load())
        return _STATE


def _load() -> dict:
    try:
        import tvm_ffi.libinfo

        ffi = ctypes.CDLL(tvm_ffi.libinfo.find_libtvm_ffi())  # (loaded: the same handle)
        entries = tuple(ctypes.cast(getattr(ffi, name), ctypes.c_void_p).value for name in (
            "TVMFFIFunctionCall", "TVMFFIErrorMoveFromRaised", "TVMFFIObjectDecRef"))
        lib = ctypes.CDLL(str(_path()))
    except (OSError, AttributeError, ImportError, subprocess.CalledProcessError) as e:
        return {"error": str(e)}
    replay = lib.mra_replay
    replay.argtypes = [ctypes.c_void_p] * 5
    replay.restype = ctypes.c_int
    return {"replay": replay, "ffi": entries, "lib": lib}


def library_name() -> str:
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    return f"libmra_replay-{digest}.so"


def build_into(directory) -> Path:
    """Compile the library into ``directory`` (an ahead-of-time library's runtime/: a
    runtime-only machine then needs no C compiler; see ``host.compile_c_library``)."""
    return host.compile_c_library(_SOURCE, Path(directory) / library_name(), ("-O2",))


def _path() -> Path:
    """A kernel library's copy (checked against its manifest) where there is one, else
    the kernel cache's, built on first use."""
    for directory in host.kernel_library_dirs():
        shipped = host.library_file(directory, f"runtime/{library_name()}")
        if shipped is not None:
            return shipped
    return host.cached_c_library(_SOURCE, f"replay/{library_name()}", ("-O2",))


def enabled() -> bool:
    """Whether plans replay from C (the library loads, ``MRA_COMPILE_NATIVE_REPLAY`` is not
    "0")."""
    return os.environ.get(ENV, "1") != "0" and "replay" in _library()


def status() -> str:
    """How the launch cache replays a call, for ``mra-compile info``."""
    if os.environ.get(ENV, "1") == "0":
        return f"from Python ({ENV}=0)"
    state = _library()
    return "from C" if "replay" in state else f"from Python: {state['error']}"


class NativePlan:
    """A launch-cache plan as C structures (``launch_cache._Plan``: its head, tails, the
    selection's outputs and the views of the caller's tensors); ``run`` replays it."""

    def __init__(self, plan):
        lib = _library()
        self._keep: list = []  # every ctypes object and tensor the structures point into
        io = {}
        for name in IO:  # (data pointers set by each call; a dummy for those read through
            # a copy, ``launch_cache._Plan.copies``)
            shape, dtype = plan.views.get(name, ((1,), torch.uint8))
            io[name] = self._dltensor(shape, dtype, None)
        head = self._launches(plan.head, io)
        tails = (CTail * len(plan.tails))()
        for j, (most, tail) in enumerate(plan.tails.items()):
            used = (None, None) if tail.used is None else tuple(
                u.ctypes.data for u in tail.used)
            tails[j] = CTail(most, len(tail.launches), self._launches(tail.launches, io), *used)
        p = CPlan(*lib["ffi"], len(plan.head), len(plan.tails), head, tails)
        for i, name in enumerate(IO):
            p.data[i] = ctypes.addressof(io[name]) + DLTensor.data.offset
        p.units, p.unit_row, p.unit_cols = (plan.units.ctypes.data, plan.unit_row.ctypes.data,
                                            plan.unit_cols.ctypes.data)
        p.rows, p.room = plan.unit_row.shape
        p.cols = plan.unit_cols.shape[2]
        self._keep += [tails, p, plan.units, plan.unit_row, plan.unit_cols]
        self.plan = p  # (the C structure mra_replay reads)
        self._plan = ctypes.addressof(p)
        self._replay = lib["replay"]

    def run(self, q, k, v, out) -> int:
        """mra_replay's code (0 done, 1 no tail, < 0 a launch failed)."""
        return self._replay(self._plan, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                            out.data_ptr())

    def _dltensor(self, shape, dtype, data, strides=None) -> DLTensor:
        code, bits = _DL_DTYPES[dtype]
        dims = (ctypes.c_int64 * len(shape))(*shape)
        steps = None
        if strides is not None:
            steps = (ctypes.c_int64 * len(strides))(*strides)
        t = DLTensor(data, _KDLCPU, 0, len(shape), code, bits, 1, dims, steps, 0)
        self._keep += [dims, steps, t]
        return t

    def _launches(self, launches, io):
        out = (CLaunch * len(launches))()
        for i, launch in enumerate(launches):
            slots = dict(launch.slots)
            args = (AnyValue * len(launch.args))()
            for j, a in enumerate(launch.args):
                if j in slots:
                    args[j] = AnyValue(_DLTENSOR, 0, ctypes.addressof(io[slots[j]]))
                elif isinstance(a, torch.Tensor):
                    t = self._dltensor(tuple(a.shape), a.dtype, a.data_ptr(), a.stride())
                    self._keep.append(a)
                    args[j] = AnyValue(_DLTENSOR, 0, ctypes.addressof(t))
                elif isinstance(a, bool) or not isinstance(a, (int, float)):
                    raise TypeError(f"argument {j} of a launch: {type(a).__name__}")
                elif isinstance(a, int):
                    args[j] = AnyValue(_INT, 0, a)
                else:
                    bits = ctypes.c_int64.from_buffer_copy(ctypes.c_double(a)).value
                    args[j] = AnyValue(_FLOAT, 0, bits)
            ucap = -1 if launch.ucap is None else launch.ucap
            out[i] = CLaunch(launch.fn.__chandle__(), args, len(args), ucap)
            self._keep += [args, launch.fn]
        self._keep.append(out)
        return out
