"""Block selection (docs/spec.md, step 3) and the work plan in one CPU kernel, written in TIR.

A top-k is data-dependent control flow, which tensor expressions cannot state, so this
operator is TIR itself (TVMScript), with its schedule in it: rows in parallel, scans in
vectors. It computes what ``plan.select_blocks`` and ``plan.make_plan`` compute on the
host (the same T, Hmask and plan; ties at the k-th score: the first in row-major
order), for every call without priors (those select on the host, in float64).

Per row of ``R = B*H`` (T = n*nk scores over the grid of n query blocks and nk key
blocks, K = min(``budget[r]``, the index's width) selected):

1. S = L - R[:, None]. The usual call (without per-sequence budgets) computes it where
   it reads it, from the logits; with ``real_only`` (per-sequence budgets, docs/spec.md)
   it is written into ``scores`` first, with NaN (excluded by every comparison) where a
   block has no real query or key (``q_counts``, ``counts``) or S is -inf.
2. theta, the K-th largest S, by bisection on the scores' order-preserving integer keys
   (a float's bits with the magnitude bits flipped when negative): each step counts
   S >= t in one vector pass. Once at most ``C`` (``cand_val``'s room) scores are >= the
   lower bound, those are copied with their positions (in order: a C scan,
   ``CANDIDATES``) and the bisection ends on them; rows with more ties at theta than
   that room stay on all T scores.
3. T: the scores > theta and the first ties at theta, in row-major order (a C scan of
   the candidates, ``READ_OFF``): the flat indices ``i * nk + j``, ascending (then
   ``n * nk``: no block, when a row has fewer).
   ``write_mask`` 1: Hmask = (L - R >= the smallest selected S) over the grid, into
   ``scores``; 0: zeros ("sparse": what the backward reads in Hmask's place, made here
   in parallel and in vectors, where a torch ``zero_`` of the 3 MB at N = 8192 had cost
   ~0.3 ms on one thread); 2: neither (a "sparse" call that saves nothing for a
   backward: inference), ``scores`` then scratch: S where step 1 wrote it.
4. The plan of ``plan.Plan`` for row units of Cr blocks and overflow units of Co
   (``row_cols``' and ``unit_cols``' last dims): ``row_cols``, ``ov_start``, ``ov_units``,
   and the overflow units in ``unit_row``/``unit_cols`` (room for ``plan.plan_bounds``'s
   U; -1 beyond the row's own). ``units[r]`` = (the row's overflow units, its largest
   ``ov_units``): the caller trims the unit arrays to the largest over rows.

This module imports TVM: import it lazily (``mra_compile.kernels.Kernel.builder`` does).
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

I32, I64 = "int32", "int64"
ACCS = 4  # vectors of partial counts in a counting pass

# The C scans of steps 2 and 3 by dtype (``schedules/cpu_select.c``, linked into the
# kernel's library: ``targets.cpu``): the candidates (the scores >= a bound with their
# positions, in order) and the read-off of T from them; TIR cannot move a vector's
# passing lanes together (a branch per vector and a loop per entry there: about half of
# the kernel's time at N = 8192).
CANDIDATES = {"float32": "mra_select_candidates_f32", "float64": "mra_select_candidates_f64"}
# (the same from the logits and their row maxima: S computed on the fly, ``direct`` below)
CANDIDATES_ROWS = {"float32": "mra_select_candidates_rows_f32",
                   "float64": "mra_select_candidates_rows_f64"}
READ_OFF = {"float32": "mra_select_read_off_f32", "float64": "mra_select_read_off_f64"}
# (the same from a row's scores themselves: the rows with more ties than the room)
READ_OFF_SCORES = {"float32": "mra_select_read_off_scores_f32",
                   "float64": "mra_select_read_off_scores_f64"}


def _key_constants(dtype: str) -> tuple[str, int, int, int, int]:
    """(integer dtype of the keys, sign shift, magnitude mask, key(-inf), key(+inf) + 1)."""
    bits = np.dtype(dtype).itemsize * 8
    idt = f"int{bits}"
    mask = (1 << (bits - 1)) - 1
    raw = np.array([-np.inf, np.inf], dtype=dtype).view(idt).astype(np.int64)
    keys = [int(b) ^ mask if b < 0 else int(b) for b in raw]
    return idt, bits - 1, mask, keys[0], keys[1] + 1


def select_plan(b: int, D: int, dtype: str = "float32"):
    """The kernel's PrimFunc (``b``, ``D``: unused, as for every kernel of the registry);
    ``dtype``: of the logits, "float32" or "float64"."""
    del b, D
    idt, shift, magnitude, key_lo, key_hi = _key_constants(dtype)
    lanes = 64 // (np.dtype(dtype).itemsize)  # one AVX-512 vector
    one, zero = tirx.const(1, I64), tirx.const(0, I64)
    neg_inf, pos_inf = tirx.const(-np.inf, dtype), tirx.const(np.inf, dtype)
    nan = tirx.const(np.nan, dtype)
    half = tirx.const(0.5, dtype)
    # The bisection's state (int64 slots): lo, hi are keys with count(S >= value(lo)) >= K
    # > count(S >= value(hi)); c_lo, c_hi those counts; mid, cnt the step's; pos: blocks
    # written; found: candidates.
    lo, hi, c_lo, c_hi, mid, cnt, pos, found = range(8)
    candidates, read_off_c = CANDIDATES[dtype], READ_OFF[dtype]
    candidates_rows, read_off_scores = CANDIDATES_ROWS[dtype], READ_OFF_SCORES[dtype]

    def key(x):  # integer bits <-> order key (an involution)
        return T.bitwise_xor(x, T.bitwise_and(T.shift_right(x, tirx.const(shift, idt)),
                                              tirx.const(magnitude, idt)))

    def value(k):  # the float whose key is the int64 ``k``
        return T.reinterpret(dtype, key(T.Cast(idt, k)))

    # (keys span the whole int64 range for float64: no differences of keys, which overflow)
    def midpoint(lo, hi):  # floor((lo + hi) / 2) without overflow
        return (T.shift_right(lo, one) + T.shift_right(hi, one)
                + T.bitwise_and(T.bitwise_and(lo, hi), one))

    @T.macro
    def count_at_least(values, r, length, t, acc, st):
        """st[cnt] = the number of values[r, :length] >= t (in vectors)."""
        threshold = t  # (bound once, outside the vector loop)
        # ACCS vectors of counts: one alone made each vector's add wait for the last.
        for l in T.vectorized(ACCS * lanes):
            acc[l] = 0
        for c in range(length // (ACCS * lanes)):
            for a in T.unroll(ACCS):
                for l in T.vectorized(lanes):
                    acc[a * lanes + l] = acc[a * lanes + l] + T.Select(
                        values[r, (c * ACCS + a) * lanes + l] >= threshold, 1, 0)
        for c in range(length // (ACCS * lanes) * ACCS, length // lanes):
            for l in T.vectorized(lanes):
                acc[l] = acc[l] + T.Select(values[r, c * lanes + l] >= threshold, 1, 0)
        st[cnt] = zero
        for l in range(ACCS * lanes):
            st[cnt] = st[cnt] + T.Cast(I64, acc[l])
        for e in range(length // lanes * lanes, length):
            st[cnt] = st[cnt] + T.Select(values[r, e] >= threshold, one, zero)

    @T.macro
    def count_s_at_least(logits, rowmax, r, n, nk, t, acc, st):
        """st[cnt] = the number of S = logits[r] - rowmax[r, :, None] >= t (in vectors
        along each row: the same subtraction as S's, so the same counts)."""
        threshold = t
        vecs = nk // lanes
        for l in T.vectorized(ACCS * lanes):
            acc[l] = 0
        st[cnt] = zero
        for i in range(n):
            m = rowmax[r, i]
            for c in range(vecs // ACCS):
                for a in T.unroll(ACCS):
                    for l in T.vectorized(lanes):
                        acc[a * lanes + l] = acc[a * lanes + l] + T.Select(
                            logits[r, i, (c * ACCS + a) * lanes + l] - m >= threshold, 1, 0)
            for c in range(vecs // ACCS * ACCS, vecs):
                for l in T.vectorized(lanes):
                    acc[l] = acc[l] + T.Select(logits[r, i, c * lanes + l] - m >= threshold,
                                               1, 0)
            for j in range(vecs * lanes, nk):
                st[cnt] = st[cnt] + T.Select(logits[r, i, j] - m >= threshold, one, zero)
        for l in range(ACCS * lanes):
            st[cnt] = st[cnt] + T.Cast(I64, acc[l])

    @T.prim_func
    def kernel(a_logits: T.handle, a_rowmax: T.handle, a_counts: T.handle, a_q_counts: T.handle,
               a_budget: T.handle, a_scores: T.handle, a_cand_val: T.handle,
               a_cand_idx: T.handle, a_index: T.handle, a_row_cols: T.handle, a_ov_start: T.handle,
               a_ov_units: T.handle, a_unit_row: T.handle, a_unit_cols: T.handle, a_units: T.handle,
               heads: T.int32, real_only: T.int32, write_mask: T.int32):
        R, n, nk, tot, C, K = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        Bm = T.int32()
        # Cr, Co: blocks of a row unit and of an overflow unit; Ub: room for units
        Cr, Ub, Co = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(a_logits, (R, n, nk), dtype)
        rowmax = T.match_buffer(a_rowmax, (R, n), dtype)
        counts = T.match_buffer(a_counts, (Bm, nk), dtype)
        q_counts = T.match_buffer(a_q_counts, (Bm, n), dtype)
        budget = T.match_buffer(a_budget, (R,), I32)
        scores = T.match_buffer(a_scores, (R, tot), dtype)  # S, then Hmask or zeros
        cand_val = T.match_buffer(a_cand_val, (R, C), dtype)
        cand_idx = T.match_buffer(a_cand_idx, (R, C), I32)
        index = T.match_buffer(a_index, (R, K), I64)
        row_cols = T.match_buffer(a_row_cols, (R, n, Cr), I32)
        ov_start = T.match_buffer(a_ov_start, (R, n), I32)
        ov_units = T.match_buffer(a_ov_units, (R, n), I32)
        unit_row = T.match_buffer(a_unit_row, (R, Ub), I32)
        unit_cols = T.match_buffer(a_unit_cols, (R, Ub, Co), I32)
        units = T.match_buffer(a_units, (R, 2), I32)
        for r in T.parallel(R):
            # (global scope and small: stack memory, which LLVM keeps in registers; TVM
            # gives every other scope, "local" included, a workspace allocation per row)
            acc = T.alloc_buffer((ACCS * lanes,), I32)
            st = T.alloc_buffer((8,), I64)
            # (the plan) units so far, the largest unit count, the current block row, its
            # first flat index, a block's rank in it
            cur = T.alloc_buffer((5,), I32)
            least = T.alloc_buffer((1,), dtype)  # the smallest selected score
            kr = T.min(budget[r], K)  # (the index has room for K)
            b = r // heads
            vecs = nk // lanes
            # Without budgets (the usual call): S = L - R is computed where it is read,
            # from the logits (a 3 MB write and read less a call at N = 8192).
            direct = real_only == 0
            # Else S into ``scores``; NaN, which every comparison below excludes, where a
            # block may not be selected: without a real query or a real key, or at -inf
            # (as on the host). (Each lane's tests cost as much as the rest of this pass.)
            for i in range(0 if direct else n):
                for jo in range(vecs):
                    for l in T.vectorized(lanes):
                        scores[r, i * nk + jo * lanes + l] = T.Select(
                            q_counts[b, i] > half and counts[b, jo * lanes + l] > half
                            and logits[r, i, jo * lanes + l] - rowmax[r, i] > neg_inf,
                            logits[r, i, jo * lanes + l] - rowmax[r, i], nan)
                for j in range(vecs * lanes, nk):
                    scores[r, i * nk + j] = T.Select(
                        q_counts[b, i] > half and counts[b, j] > half
                        and logits[r, i, j] - rowmax[r, i] > neg_inf,
                        logits[r, i, j] - rowmax[r, i], nan)
            st[lo] = T.int64(key_lo)
            st[hi] = T.int64(key_hi)
            st[c_lo] = T.Cast(I64, tot)
            st[c_hi] = zero
            # Bisection on all scores while more than C are >= value(lo).
            while st[lo] + one < st[hi] and st[c_lo] > T.Cast(I64, C):
                st[mid] = midpoint(st[lo], st[hi])
                if direct:
                    count_s_at_least(logits, rowmax, r, n, nk, value(st[mid]), acc, st)
                else:
                    count_at_least(scores, r, tot, value(st[mid]), acc, st)
                if st[cnt] >= T.Cast(I64, kr):
                    st[lo] = st[mid]
                    st[c_lo] = st[cnt]
                else:
                    st[hi] = st[mid]
                    st[c_hi] = st[cnt]
            st[found] = zero
            least[0] = pos_inf
            if st[c_lo] <= T.Cast(I64, C):
                # The candidates: the scores >= value(lo), with their positions, in order
                # (a C scan: ``CANDIDATES``).
                if direct:
                    st[found] = T.Cast(I64, T.call_extern(
                        I32, candidates_rows, T.address_of(logits[r, 0, 0]),
                        T.address_of(rowmax[r, 0]), n, nk, value(st[lo]),
                        T.address_of(cand_val[r, 0]), T.address_of(cand_idx[r, 0]), C))
                else:
                    st[found] = T.Cast(I64, T.call_extern(
                        I32, candidates, T.address_of(scores[r, 0]), tot, value(st[lo]),
                        T.address_of(cand_val[r, 0]), T.address_of(cand_idx[r, 0]), C))
                m = T.Cast(I32, st[found])
                while st[lo] + one < st[hi]:
                    st[mid] = midpoint(st[lo], st[hi])
                    count_at_least(cand_val, r, m, value(st[mid]), acc, st)
                    if st[cnt] >= T.Cast(I64, kr):
                        st[lo] = st[mid]
                    else:
                        st[hi] = st[mid]
                        st[c_hi] = st[cnt]
                st[pos] = T.Cast(I64, T.call_extern(  # (a C scan: ``READ_OFF``)
                    I32, read_off_c, T.address_of(cand_val[r, 0]), T.address_of(cand_idx[r, 0]),
                    m, value(st[lo]), kr, T.Cast(I64, kr) - st[c_hi],
                    T.address_of(index[r, 0]), T.address_of(least[0])))
            else:
                # More ties at theta than the candidates' room: theta is exact already.
                # (S into ``scores`` first where it was computed on the fly: rare.)
                for i in range(n if direct else 0):
                    for jo in range(vecs):
                        for l in T.vectorized(lanes):
                            scores[r, i * nk + jo * lanes + l] = (logits[r, i, jo * lanes + l]
                                                                  - rowmax[r, i])
                    for j in range(vecs * lanes, nk):
                        scores[r, i * nk + j] = logits[r, i, j] - rowmax[r, i]
                st[pos] = T.Cast(I64, T.call_extern(
                    I32, read_off_scores, T.address_of(scores[r, 0]), tot, value(st[lo]), kr,
                    T.Cast(I64, kr) - st[c_hi], T.address_of(index[r, 0]),
                    T.address_of(least[0])))
            for p in range(T.Cast(I32, st[pos]), K):  # (no block)
                index[r, p] = T.Cast(I64, tot)
            if write_mask == 1:
                # Hmask: S >= the smallest selected score, over the whole grid (blocks
                # without a real query or key included, as on the host).
                t4 = least[0]
                for i in range(n):
                    for jo in range(vecs):
                        for l in T.vectorized(lanes):
                            scores[r, i * nk + jo * lanes + l] = T.Select(
                                logits[r, i, jo * lanes + l] - rowmax[r, i] >= t4,
                                T.Cast(dtype, 1), T.Cast(dtype, 0))
                    for j in range(vecs * lanes, nk):
                        scores[r, i * nk + j] = T.Select(
                            logits[r, i, j] - rowmax[r, i] >= t4,
                            T.Cast(dtype, 1), T.Cast(dtype, 0))
            elif write_mask == 0:
                for i in range(n):
                    for jo in range(vecs):
                        for l in T.vectorized(lanes):
                            scores[r, i * nk + jo * lanes + l] = T.Cast(dtype, 0)
                    for j in range(vecs * lanes, nk):
                        scores[r, i * nk + j] = T.Cast(dtype, 0)

            # The plan. Blocks per block row first (in ov_units), then units and starts.
            for i in range(n):
                ov_units[r, i] = 0
                for s in range(Cr):
                    row_cols[r, i, s] = -1
            for u in range(Ub):
                unit_row[r, u] = -1
                for s in range(Co):
                    unit_cols[r, u, s] = -1
            # (T ascends: each block's row by stepping from the last one's, where dividing
            # by the runtime nk took two idiv a block, ~a sixth of the kernel at N = 8192)
            cur[2] = 0  # the block row so far
            cur[3] = 0  # its first flat index, cur[2] * nk
            for p in range(T.Cast(I32, st[pos])):
                while T.Cast(I32, index[r, p]) >= cur[3] + nk:
                    cur[2] = cur[2] + 1
                    cur[3] = cur[3] + nk
                ov_units[r, cur[2]] = ov_units[r, cur[2]] + 1
            cur[0] = 0  # units so far
            cur[1] = 0  # the largest count
            for i in range(n):
                extra = T.max(ov_units[r, i] - Cr, 0)
                ov_start[r, i] = cur[0]
                ov_units[r, i] = (extra + Co - 1) // Co
                cur[0] = cur[0] + ov_units[r, i]
                cur[1] = T.max(cur[1], ov_units[r, i])
            units[r, 0] = cur[0]
            units[r, 1] = cur[1]
            cur[2] = 0  # the block row so far, as above
            cur[3] = 0
            cur[4] = 0  # the block's rank in its row
            for p in range(T.Cast(I32, st[pos])):
                flat = T.Cast(I32, index[r, p])
                if flat >= cur[3] + nk:
                    cur[4] = 0
                    while flat >= cur[3] + nk:
                        cur[2] = cur[2] + 1
                        cur[3] = cur[3] + nk
                if cur[4] < Cr:
                    row_cols[r, cur[2], cur[4]] = flat - cur[3]
                else:
                    over = cur[4] - Cr
                    unit = ov_start[r, cur[2]] + over // Co
                    if unit < Ub:  # (never false: Ub is plan.plan_bounds')
                        unit_cols[r, unit, over % Co] = flat - cur[3]
                        unit_row[r, unit] = cur[2]
                cur[4] = cur[4] + 1

    return kernel
