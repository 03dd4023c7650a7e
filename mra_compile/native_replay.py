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
raises it with its message. For a masked call (a key padding mask; cross-attention's
query mask), ``mra_refresh_masks`` does in one call what the replay's torch steps did
before it (``NativeMasks``: the masks' values checked, the padded tokens of the inputs
each covers checked finite, the masks, their block counts and the budgets written):
10-60 us where those steps took 0.3-0.5 ms between the kernels of an interleaved run at
N = 512 (``bench/bench_masks.py``).

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
#include <math.h>
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

/* A masked call's refresh before a replay (launch_cache._Masks.refresh). */
typedef struct { const void *data; int64_t s[4]; int32_t heads, bits; uint64_t exponent; } Input;
typedef struct { /* one side's mask (the keys', or cross-attention's queries') */
  const void *mask; int64_t mask_sb, mask_st; /* [B, N] at these element strides */
  int32_t kind;     /* its elements: 0 one byte, 1 int32, 2 int64, 3 float32, 4 float64 */
  int32_t form;     /* 0 0/1 values, 1 bool (nonzero = real), 2 additive (0 / -inf) */
  int32_t N, checks; /* checks: bit j set: input j's padded tokens must be finite */
  int32_t Np;       /* its length padded to whole blocks */
  void *maskf, *counts, *inv_counts; /* [B, Np], [B, Np / b], [B, Np / b] */
} Side;
typedef struct {
  int32_t nsides, B, nq, b, D, wide; /* nq: the query blocks; wide: float64 tensors */
  Side sides[2];
  Input in[3];      /* q, k, v [B, heads, N, D] */
  const void *q_counts; /* [B, nq] the queries' block counts (a side's, or constant) */
  int32_t *budget;  /* [rows] int32, or NULL: no per-sequence budget */
  int32_t rows, heads, per_row, most;
} Masks;

/* Sequence i of a side's mask into row i of its maskf (1 real, 0 padding; zeros after
 * N): 0, or -1 where the mask holds a value it may not. */
#define DECODE(T)                                                             \
  static int decode_##T(const Side *m, int64_t Np, int wide, int64_t i) {     \
    const T *row = (const T *)m->mask + i * m->mask_sb;                       \
    float *f = (float *)m->maskf + i * Np;                                    \
    double *w = (double *)m->maskf + i * Np;                                  \
    for (int64_t t = 0; t < Np; ++t) {                                        \
      int r = 0;                                                              \
      if (t < m->N) {                                                         \
        double x = (double)row[t * m->mask_st];                               \
        if (m->form == 1) r = x != 0.0;                                       \
        else if (m->form == 2) { r = x == 0.0; if (!r && x != -(double)INFINITY) return -1; } \
        else { r = x == 1.0; if (!r && x != 0.0) return -1; }                 \
      }                                                                       \
      if (wide) w[t] = r; else f[t] = (float)r;                               \
    }                                                                         \
    return 0;                                                                 \
  }
DECODE(int8_t)
DECODE(int32_t)
DECODE(int64_t)
DECODE(float)
DECODE(double)

static int decode(const Side *m, int64_t Np, int wide, int64_t i) {
  switch (m->kind) {
    case 0: return decode_int8_t(m, Np, wide, i);
    case 1: return decode_int32_t(m, Np, wide, i);
    case 2: return decode_int64_t(m, Np, wide, i);
    case 3: return decode_float(m, Np, wide, i);
    default: return decode_double(m, Np, wide, i);
  }
}

static double at(const void *x, int wide, int64_t i) {
  return wide ? ((const double *)x)[i] : (double)((const float *)x)[i];
}

/* Whether every element of tokens first <= t < stop of sequence i (every head) is
 * finite: its exponent field is not all ones. The tokens' heads and elements are read
 * in memory order, rows that follow each other read as one run (a padded span of a
 * [B, H, N, D] tensor is one run a head, of an attention layer's [B, N, H, D] view one
 * run in all): an or of comparisons over a run, which the vectoriser takes at -O3 (a
 * maximum of unsigned lanes it does not on SSE2). */
#define FINITE(T)                                                             \
  static int run_##T(const T *x, int64_t n, T e) {                            \
    T bad = 0;                                                                \
    for (int64_t j = 0; j < n; ++j) bad |= (T)((x[j] & e) == e ? ~(T)0 : 0);  \
    return bad == 0;                                                          \
  }                                                                           \
  static int finite_##T(const Input *x, int64_t i, int64_t first, int64_t stop, \
                        int64_t D) {                                          \
    T e = (T)x->exponent;                                                     \
    /* the two outer loops (heads, tokens) with the one of smaller stride inside */ \
    int64_t n_out = x->heads, s_out = x->s[1], n_in = stop - first, s_in = x->s[2]; \
    if (s_out < s_in) {                                                       \
      int64_t n = n_out, st = s_out;                                          \
      n_out = n_in; s_out = s_in; n_in = n; s_in = st;                        \
    }                                                                         \
    const T *base = (const T *)x->data + i * x->s[0] + first * x->s[2];       \
    if (x->s[3] != 1) {                                                       \
      for (int64_t o = 0; o < n_out; ++o)                                     \
        for (int64_t r = 0; r < n_in; ++r)                                    \
          for (int64_t d = 0; d < D; ++d) {                                   \
            T y = base[o * s_out + r * s_in + d * x->s[3]];                   \
            if ((y & e) == e) return 0;                                       \
          }                                                                   \
      return 1;                                                               \
    }                                                                         \
    int64_t len = D, rows = n_in;                                             \
    if (s_in == D) { len = D * n_in; rows = 1; }   /* rows follow each other */ \
    if (rows == 1 && s_out == len) { len *= n_out; n_out = 1; }               \
    for (int64_t o = 0; o < n_out; ++o)                                       \
      for (int64_t r = 0; r < rows; ++r)                                      \
        if (!run_##T(base + o * s_out + r * s_in, len, e)) return 0;          \
    return 1;                                                                 \
  }
FINITE(uint16_t)
FINITE(uint32_t)
FINITE(uint64_t)

static int all_finite(const Input *x, int64_t i, int64_t first, int64_t stop, int64_t D) {
  if (x->bits == 16) return finite_uint16_t(x, i, first, stop, D);
  if (x->bits == 32) return finite_uint32_t(x, i, first, stop, D);
  return finite_uint64_t(x, i, first, stop, D);
}

/* 0: each side's mask, its block counts and their inverses, and the budgets written;
 * 1: a padded token of an input a side checks (or a real one between two padded) is
 * not finite, so the usual path would copy it; 2: a mask value other than 0 and 1 (0 and
 * -inf: additive), which the caller raises. (The sides' maskf are written in every
 * case: scratch the usual path writes again.) */
int mra_refresh_masks(const Masks *m) {
  for (int s = 0; s < m->nsides; ++s)
    for (int64_t i = 0; i < m->B; ++i)
      if (decode(&m->sides[s], m->sides[s].Np, m->wide, i)) return 2;
  for (int s = 0; s < m->nsides; ++s) {
    const Side *side = &m->sides[s];
    for (int64_t i = 0; i < m->B; ++i) {
      int64_t first = -1, stop = -1;
      for (int64_t t = 0; t < side->N; ++t)
        if (at(side->maskf, m->wide, i * side->Np + t) == 0.0) {
          if (first < 0) first = t;
          stop = t + 1;
        }
      if (first >= 0)
        for (int j = 0; j < 3; ++j)
          if ((side->checks >> j & 1) && !all_finite(&m->in[j], i, first, stop, m->D))
            return 1;
    }
  }
  for (int s = 0; s < m->nsides; ++s) {
    const Side *side = &m->sides[s];
    const int64_t n = side->Np / m->b;
    for (int64_t i = 0; i < m->B; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double c = 0;
        for (int64_t t = j * m->b; t < (j + 1) * m->b; ++t)
          c += at(side->maskf, m->wide, i * side->Np + t);
        /* (as torch.add(counts, 1e-6) then reciprocal_, in the tensors' own width) */
        if (m->wide) {
          ((double *)side->counts)[i * n + j] = c;
          ((double *)side->inv_counts)[i * n + j] = 1.0 / (c + 1e-6);
        } else {
          ((float *)side->counts)[i * n + j] = (float)c;
          ((float *)side->inv_counts)[i * n + j] = 1.0f / ((float)c + 1e-6f);
        }
      }
  }
  if (m->budget) /* forward.sequence_budgets, then write_budget */
    for (int64_t i = 0; i < m->B; ++i) {
      double real = 0;
      for (int64_t j = 0; j < m->nq; ++j) real += at(m->q_counts, m->wide, i * m->nq + j);
      int64_t rows_real = ((int64_t)real + m->b - 1) / m->b;
      int64_t blocks = (rows_real > 1 ? rows_real : 1) * m->per_row;
      if (blocks > m->most) blocks = m->most; /* (most: at most the grid's blocks) */
      for (int64_t r = i * m->heads; r < (i + 1) * m->heads && r < m->rows; ++r)
        m->budget[r] = (int32_t)blocks;
    }
  return 0;
}
"""

# -O3: the vectoriser, for the finiteness check of mra_refresh_masks (gcc's -O2 leaves
# loops of unknown trip count alone).
_FLAGS = ("-O3",)

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


class CInput(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("s", ctypes.c_int64 * 4), ("heads", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("exponent", ctypes.c_uint64)]


class CSide(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_void_p), ("mask_sb", ctypes.c_int64),
                ("mask_st", ctypes.c_int64), ("kind", ctypes.c_int32), ("form", ctypes.c_int32),
                ("N", ctypes.c_int32), ("checks", ctypes.c_int32), ("Np", ctypes.c_int32),
                ("maskf", ctypes.c_void_p),
                ("counts", ctypes.c_void_p), ("inv_counts", ctypes.c_void_p)]


class CMasks(ctypes.Structure):
    _fields_ = [("nsides", ctypes.c_int32), ("B", ctypes.c_int32), ("nq", ctypes.c_int32),
                ("b", ctypes.c_int32), ("D", ctypes.c_int32), ("wide", ctypes.c_int32),
                ("sides", CSide * 2), ("inputs", CInput * 3), ("q_counts", ctypes.c_void_p),
                ("budget", ctypes.c_void_p), ("rows", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("per_row", ctypes.c_int32), ("most", ctypes.c_int32)]


# The mask's element types mra_refresh_masks reads (its "kind"), and the inputs' exponent
# fields (all ones: not finite).
_MASK_KINDS = {torch.bool: 0, torch.uint8: 0, torch.int8: 0, torch.int32: 1, torch.int64: 2,
               torch.float32: 3, torch.float64: 4}
_EXPONENTS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000,
              torch.float64: 0x7FF0000000000000}

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
    refresh = lib.mra_refresh_masks
    refresh.argtypes = [ctypes.c_void_p]
    refresh.restype = ctypes.c_int
    return {"replay": replay, "refresh": refresh, "ffi": entries, "lib": lib}


def library_name() -> str:
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    return f"libmra_replay-{digest}.so"


def build_into(directory) -> Path:
    """Compile the library into ``directory`` (an ahead-of-time library's runtime/: a
    runtime-only machine then needs no C compiler; see ``host.compile_c_library``)."""
    return host.compile_c_library(_SOURCE, Path(directory) / library_name(), _FLAGS)


def _path() -> Path:
    """A kernel library's copy (checked against its manifest) where there is one, else
    the kernel cache's, built on first use."""
    for directory in host.kernel_library_dirs():
        shipped = host.library_file(directory, f"runtime/{library_name()}")
        if shipped is not None:
            return shipped
    return host.cached_c_library(_SOURCE, f"replay/{library_name()}", _FLAGS)


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


class NativeMasks:
    """``launch_cache._Masks.refresh`` in one C call (``mra_refresh_masks``): each side's
    mask values checked, the padded tokens of the inputs it covers checked finite, and
    the masks, their block counts, their inverses and the per-sequence budgets written
    where the plan's kernels read them; the same bits as the torch steps it replaces
    (0.2-0.6 ms of them between kernels in an interleaved run, ``bench/bench_masks.py``;
    10-60 us here). Where much is padded both read the padded tokens at the memory's
    rate (B = 4, N = 4096, 3072 padded tokens of 12 heads in each of q, k, v: ~1.1 ms
    either way), hence the reads in memory order, one run where the tokens lie in one.

    ``masks``: the plan's ``_Masks``; ``given``: the first replayed call's masks by side
    name ("mask", "query_mask"); ``qkv``: its q, k, v (their shapes and dtypes, and the
    masks', are the plan's signature; strides and data are set by each call). Raises
    ValueError where the C code does not read these masks or inputs (the refresh stays
    in Python)."""

    def __init__(self, masks, given: dict, qkv):
        lib = _library()
        if "refresh" not in lib:
            raise ValueError(lib.get("error", "no C library"))
        dt = masks.q_counts.dtype
        tensors = [masks.q_counts] + [t for side in masks.sides
                                      for t in (side.maskf, side.counts, side.inv_counts)]
        if (dt not in (torch.float32, torch.float64) or len(masks.sides) > 2
                or any(x.dtype not in _EXPONENTS for x in qkv)
                or any(given[side.given].dtype not in _MASK_KINDS for side in masks.sides)
                or any(t.dtype != dt or not t.is_contiguous() for t in tensors)):
            raise ValueError("a mask or input dtype the C refresh does not read")
        B, _, _, D = qkv[0].shape
        m = CMasks(nsides=len(masks.sides), B=B, nq=masks.q_counts.shape[1],
                   b=masks.block_size, D=D,
                   wide=int(dt == torch.float64), q_counts=masks.q_counts.data_ptr(),
                   heads=masks.heads, per_row=masks.block_per_row or 0, most=masks.k)
        for c, side in zip(m.sides, masks.sides):
            mask = given[side.given]
            c.kind = _MASK_KINDS[mask.dtype]
            c.form = 1 if mask.dtype == torch.bool else 2 if mask.dim() == 4 else 0
            c.N, c.Np = mask.shape[-1], side.maskf.shape[1]
            c.checks = sum(1 << j for j in side.checks)
            c.maskf, c.counts, c.inv_counts = (side.maskf.data_ptr(), side.counts.data_ptr(),
                                               side.inv_counts.data_ptr())
        if masks.budget is not None and masks.block_per_row is not None:
            if masks.budget.dtype != torch.int32 or not masks.budget.is_contiguous():
                raise ValueError("a budget the C refresh does not write")
            m.budget, m.rows = masks.budget.data_ptr(), masks.budget.numel()
        for c, x in zip(m.inputs, qkv):
            c.heads, c.bits, c.exponent = x.shape[1], x.element_size() * 8, _EXPONENTS[x.dtype]
        self._m = m
        self._names = tuple(side.given for side in masks.sides)
        self._address = ctypes.addressof(m)
        self._refresh = lib["refresh"]
        self._keep = tensors + [masks.budget]

    def run(self, q, k, v, given: dict) -> int:
        """mra_refresh_masks' code: 0 written, 1 an input's padding is not finite, 2 a
        mask value it may not hold."""
        m = self._m
        for c, name in zip(m.sides, self._names):
            mask = given[name]
            c.mask = mask.data_ptr()
            c.mask_sb, c.mask_st = mask.stride(0), mask.stride(-1)
        for x, c in zip((q, k, v), m.inputs):
            c.data = x.data_ptr()
            c.s[:] = x.stride()
        return self._refresh(self._address)
