"""The backward's two work plans in one CPU kernel, written in TIR.

The backward's units go by query block (dq) and by key block (dk, dv, dS); each a plan
of ``plan.make_plan`` with no row part (``Cr = 0``), of the selection ``index`` [R, K]
and of its transpose, and the dq units read dS where the key units wrote it
(``plan.transposed_slots``). On the host those were ~25 numpy and torch steps on
[R, K] arrays: ~1.2 ms a backward warm and ~1.8 ms right after the kernels' traffic (N =
4096, B*H = 12), on one core while the other waited; here each row is a few counting
passes over its K entries, rows in parallel. Same results, entry for entry (tests/
test_plan.py).

Per row ``r`` (entries of ``index[r]``: flat ``i * nk + j`` over n query blocks and nk
key blocks, ascending, ``n * nk`` = no block, at the end):

1. blocks per query block ``i`` and per key block ``j``;
2. units of ``Cq`` blocks per query block and of ``Ck`` per key block: ``q_units``,
   ``q_start`` (the exclusive prefix sum), likewise ``k_units``, ``k_start``; ``units[r]``
   = (query units, the most of one query block, key units, the most of one key block);
3. each entry, in order, into its query unit (``q_row``: the block ``i``, ``q_cols``:
   the key blocks) and its key unit (``k_col``: ``j``, ``k_rows``: the query blocks in
   ascending order, as a stable sort by key block gives them), and ``ds_at``: for each
   query-unit slot, the flat slot ``unit * Ck + slot`` of the same block in the key
   units. Unit arrays have room for ``plan.plan_bounds``' counts; -1 fills the rest.

This module imports TVM: import it lazily (``mra_compile.kernels.Kernel.builder`` does).
"""
from __future__ import annotations

from tvm.script import tirx as T

I32, I64 = "int32", "int64"


def bwd_plan(b: int, D: int, dtype: str = "float32"):
    """The kernel's PrimFunc (``b``, ``D``, ``dtype``: unused, as for every kernel of the
    registry: the plans depend on the selection alone)."""
    del b, D, dtype

    @T.prim_func
    def kernel(a_index: T.handle, a_q_start: T.handle, a_q_units: T.handle, a_q_row: T.handle,
               a_q_cols: T.handle, a_k_start: T.handle, a_k_units: T.handle, a_k_col: T.handle,
               a_k_rows: T.handle, a_ds_at: T.handle, a_k_seen: T.handle, a_units: T.handle):
        R, K, n, nk = T.int32(), T.int32(), T.int32(), T.int32()
        Uq, Cq, Uk, Ck = T.int32(), T.int32(), T.int32(), T.int32()
        index = T.match_buffer(a_index, (R, K), I64)
        q_start = T.match_buffer(a_q_start, (R, n), I32)
        q_units = T.match_buffer(a_q_units, (R, n), I32)
        q_row = T.match_buffer(a_q_row, (R, Uq), I32)
        q_cols = T.match_buffer(a_q_cols, (R, Uq, Cq), I32)
        k_start = T.match_buffer(a_k_start, (R, nk), I32)
        k_units = T.match_buffer(a_k_units, (R, nk), I32)
        k_col = T.match_buffer(a_k_col, (R, Uk), I32)
        k_rows = T.match_buffer(a_k_rows, (R, Uk, Ck), I32)
        ds_at = T.match_buffer(a_ds_at, (R, Uq, Cq), I32)
        k_seen = T.match_buffer(a_k_seen, (R, nk), I32)  # (scratch: blocks placed per j)
        units = T.match_buffer(a_units, (R, 4), I32)
        for r in T.parallel(R):
            # (global scope and small: stack memory, which LLVM keeps in registers)
            cur = T.alloc_buffer((4,), I32)
            for i in range(n):
                q_units[r, i] = 0
            for j in range(nk):
                k_units[r, j] = 0
                k_seen[r, j] = 0
            for u in range(Uq):
                q_row[r, u] = -1
                for s in range(Cq):
                    q_cols[r, u, s] = -1
                    ds_at[r, u, s] = -1
            for u in range(Uk):
                k_col[r, u] = -1
                for s in range(Ck):
                    k_rows[r, u, s] = -1
            # 1. Blocks per query block and per key block (counts, in the unit arrays).
            for p in range(K):
                if index[r, p] < T.Cast(I64, n * nk):
                    flat = T.Cast(I32, index[r, p])
                    q_units[r, flat // nk] = q_units[r, flat // nk] + 1
                    k_units[r, flat % nk] = k_units[r, flat % nk] + 1
            # 2. Units per block and their starts.
            cur[0] = 0
            cur[1] = 0
            cur[2] = 0
            cur[3] = 0
            for i in range(n):
                q_start[r, i] = cur[0]
                q_units[r, i] = (q_units[r, i] + Cq - 1) // Cq
                cur[0] = cur[0] + q_units[r, i]
                cur[1] = T.max(cur[1], q_units[r, i])
            for j in range(nk):
                k_start[r, j] = cur[2]
                k_units[r, j] = (k_units[r, j] + Ck - 1) // Ck
                cur[2] = cur[2] + k_units[r, j]
                cur[3] = T.max(cur[3], k_units[r, j])
            for c in range(4):
                units[r, c] = cur[c]
            # 3. Every block into its two units. cur[0]: the previous block's query block,
            # cur[1]: its rank there (the entries come grouped by query block).
            cur[0] = -1
            cur[1] = 0
            for p in range(K):
                if index[r, p] < T.Cast(I64, n * nk):
                    flat = T.Cast(I32, index[r, p])
                    i, j = flat // nk, flat % nk
                    if i != cur[0]:
                        cur[0] = i
                        cur[1] = 0
                    qu = q_start[r, i] + cur[1] // Cq
                    ku = k_start[r, j] + k_seen[r, j] // Ck
                    ks = k_seen[r, j] % Ck
                    if ku < Uk:  # (never false, nor qu < Uq: rooms of plan.plan_bounds)
                        k_rows[r, ku, ks] = i
                        k_col[r, ku] = j
                    if qu < Uq:
                        q_cols[r, qu, cur[1] % Cq] = j
                        q_row[r, qu] = i
                        ds_at[r, qu, cur[1] % Cq] = ku * Ck + ks
                    k_seen[r, j] = k_seen[r, j] + 1
                    cur[1] = cur[1] + 1

    return kernel
