"""Block selection (docs/spec.md, step 3) and the work plan for the high-resolution kernels.

Selection is a top-k over the nq*nk low-resolution scores of each row (nq query blocks,
nk key blocks; nq = nk but for cross-attention). It runs on the
host in numpy/torch: the input is small (n*n per row, n = N/b), the result only indexes
the TVM kernels, and a selection (numpy's introselect, ``argpartition``) beats sorting:
TOPI's top-k sorts the whole row, and ``torch.topk`` was 5x slower than argpartition on
the 12 x 16384 scores of N = 4096.

The plan groups the selected blocks of each (row, query block) into *units* of at most
``C`` key blocks beyond a row's own ``Cr``: every unit is an independent piece of work
for ``hires_units``, and ``hires_rows`` merges the units of a block row into it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mra_compile import targets

PRIOR_BONUS = 5e3  # docs/spec.md, step 3


def selection_scores(logits, rowmax, first_n: int, diagonal_n: int, out=None):
    """S of docs/spec.md, step 3: [R, nq, nk] from logits [R, nq, nk] and rowmax [R, nq].

    With priors, in float64: the 5e3 bonus would otherwise round away float32
    differences below 5e-4 and turn near-ties into ties, changing T and Hmask.
    ``out``: where to write L - R (a kept tensor of the logits' shape and dtype: no fresh
    pages to fault in on every call); with priors S is a float64 copy of it.
    """
    scores = logits - rowmax[:, :, None] if out is None \
        else torch.sub(logits, rowmax[:, :, None], out=out)
    if first_n > 0 or diagonal_n > 0:
        scores = scores.double()
    rows = torch.arange(scores.shape[-2], device=scores.device)
    cols = torch.arange(scores.shape[-1], device=scores.device)
    if diagonal_n > 0:
        band = (rows[:, None] - cols[None, :]).abs() <= diagonal_n // 2
        scores = scores + band.to(scores.dtype) * PRIOR_BONUS
    if first_n > 0:
        scores = scores + (rows < first_n)[:, None].to(scores.dtype) * PRIOR_BONUS
        scores = scores + (cols < first_n)[None, :].to(scores.dtype) * PRIOR_BONUS
    return scores


@dataclass
class Selection:
    """The selected blocks of every row.

    index: [R, K] int64, flat ``i * nk + j``, sorted ascending (grouped by query block);
        ``nq * nk``: no block
    high_mask: [R, nq, nk] of the logits' dtype, 1.0 where S >= theta ("full" mode), else None
    """

    index: torch.Tensor
    high_mask: torch.Tensor | None


@torch.no_grad()
def select_blocks(logits, rowmax, *, num_blocks, full, first_n=0, diagonal_n=0,
                  row_blocks=None, real_pairs=None, scores_out=None) -> Selection:
    """T (and Hmask) of docs/spec.md, step 3, for logits [R, nq, nk] and rowmax [R, nq]
    (nq = nk but for cross-attention): the top ``num_blocks`` of each row; or, with
    ``row_blocks`` [R] int64 (each row's own budget, at most ``num_blocks``: "Per-sequence
    budget") and ``real_pairs`` [R, nq, nk] bool (blocks with a real query and a real key),
    each row's top ``row_blocks[r]`` real blocks, padded to ``num_blocks`` with blocks of
    padding.

    ``scores_out``: a kept tensor like ``logits`` for S (no fresh pages to fault in on
    every call); on the host, Hmask then replaces S there in place (``high_mask`` is
    ``scores_out``), so that the two take one buffer."""
    scores = selection_scores(logits, rowmax, first_n, diagonal_n, out=scores_out)
    R, nq, nk = scores.shape
    total = nq * nk
    k = min(num_blocks, total)
    if row_blocks is not None and k < total:
        return _select_per_row(scores, k, row_blocks, real_pairs, full, logits.dtype)
    flat = scores.reshape(R, total)
    if k == total:
        index = torch.arange(total, device=flat.device).expand(R, total).contiguous()
    elif targets.of_device(flat.device).selects_in_numpy:
        # numpy's introselect is ~5x faster than torch.topk here (no sorting of pairs), and
        # numpy's sort and comparisons of these small int/float rows ~8x faster than torch's.
        values = flat.numpy()
        part = top_k_numpy(values, k)
        part.sort(axis=1)
        high_mask = None
        if full:
            theta = np.take_along_axis(values, part, axis=1).min(axis=1)
            # In place over S where S has the logits' dtype (no priors; else into a new
            # tensor), in one pass: the comparison's bools are cast as they are stored.
            high_mask = flat.view(R, nq, nk) if scores.dtype == logits.dtype \
                else torch.empty(R, nq, nk, dtype=logits.dtype)
            np.greater_equal(values, theta[:, None], out=high_mask.view(R, total).numpy())
        return Selection(torch.from_numpy(part), high_mask)
    else:
        index = torch.topk(flat, k, dim=1, sorted=False).indices.sort(dim=1).values
    high_mask = None
    if full:
        theta = flat.gather(1, index).amin(dim=1)
        high_mask = (scores >= theta[:, None, None]).to(logits.dtype)
    return Selection(index, high_mask)


SAMPLE_STRIDE = 7  # odd: a strided sample of an n x n grid (n a power of two) meets every column


def top_k_numpy(values, k: int):
    """The column indices of the ``k`` largest entries of each row of ``values`` [R, T]
    (float, no NaN), in no particular order, as ``np.argpartition`` finds them (ties
    at the k-th value: any of them).

    A row of T = n*n scores with k ~ 4n costs argpartition ~60 us at N = 8192 (65536 and
    1024) and ~430 us at N = 16384, most of it on entries far below the k-th. So first a threshold from
    a strided sample (every 7th entry): the sample's (2k/7)-th largest, below the k-th
    largest overall unless the sample is very unrepresentative; then argpartition of the
    entries at or above it only (~2k per row). A row where fewer than k pass (the
    threshold came out too high) is partitioned whole: the result is exact either way."""
    R, T = values.shape
    if k >= T // 8 or T < 65536:  # (measured: no gain below n = 256 blocks)
        return np.ascontiguousarray(np.argpartition(values, T - k, axis=1)[:, T - k:])
    sample = values[:, ::SAMPLE_STRIDE]
    rank = min(2 * k // SAMPLE_STRIDE + 1, sample.shape[1])
    threshold = np.partition(sample, sample.shape[1] - rank, axis=1)[:, sample.shape[1] - rank]
    out = np.empty((R, k), dtype=np.int64)
    for r in range(R):
        candidates = np.flatnonzero(values[r] >= threshold[r])
        if candidates.size < k:
            out[r] = np.argpartition(values[r], T - k)[T - k:]
            continue
        chosen = np.argpartition(values[r, candidates], candidates.size - k)[candidates.size - k:]
        out[r] = candidates[chosen]
    return out


def _select_per_row(scores, k: int, row_blocks, real_pairs, full: bool, dtype) -> Selection:
    """Each row's top ``row_blocks[r]`` blocks with a real query and key; the row's other
    entries of the ``[R, k]`` index are ``nq * nk`` (no block: ``make_plan`` skips them)."""
    R, nq, nk = scores.shape
    flat = scores.reshape(R, nq * nk)
    real = real_pairs.reshape(R, nq * nk)
    # A block without a real query or key changes no output, but it is not selected: the
    # budget counts real blocks ("Per-sequence budget"), ranked by S.
    ranked = flat.masked_fill(~real, float("-inf"))
    if targets.of_device(flat.device).selects_in_numpy:
        return _select_per_row_numpy(ranked.numpy(), k, row_blocks.numpy(), full, scores,
                                     dtype)
    top = ranked.topk(k, dim=1, sorted=True)
    kept = (torch.arange(k, device=flat.device)[None, :] < row_blocks[:, None]) \
        & real.gather(1, top.indices)
    index = torch.where(kept, top.indices, nq * nk).sort(dim=1).values
    high_mask = None
    if full:
        theta = top.values.masked_fill(~kept, float("inf")).amin(dim=1)
        high_mask = (scores >= theta[:, None, None]).to(dtype)
    return Selection(index, high_mask)


def _select_per_row_numpy(values, k: int, row_blocks, full: bool, scores, dtype) -> Selection:
    """``_select_per_row`` on the host: the top k of each row by a selection
    (``argpartition``), then only those k ranked (a sorted torch.topk of 12 rows of
    65536 scores took 4.6 ms at N = 8192; this, ~1.5)."""
    R, total = values.shape
    part = np.argpartition(values, total - k, axis=1)[:, total - k:]
    part_values = np.take_along_axis(values, part, axis=1)
    order = np.argsort(-part_values, axis=1, kind="stable")
    ranked = np.take_along_axis(part, order, axis=1)
    ranked_values = np.take_along_axis(part_values, order, axis=1)
    kept = (np.arange(k)[None, :] < row_blocks[:, None]) & np.isfinite(ranked_values)
    index = np.where(kept, ranked, total)
    index.sort(axis=1)
    high_mask = None
    if full:
        theta = np.where(kept, ranked_values, np.inf).min(axis=1)
        high_mask = (scores >= torch.from_numpy(theta)[:, None, None]).to(dtype)
    return Selection(torch.from_numpy(index.astype(np.int64)), high_mask)


@dataclass
class Plan:
    """Where each selected block is computed.

    The first ``Cr`` selected key blocks of every block row go to that row's own unit in
    ``hires_rows``; the rest (rows with more) are packed into overflow units of ``Co``
    blocks for ``hires_units``, which ``hires_rows`` merges back.

    row_cols [R, n, Cr] i32: a row's own key blocks (-1: empty slot); n: block rows
    unit_row [R, U] i32, unit_cols [R, U, Co] i32: overflow units (-1: padding)
    ov_start, ov_units [R, n] i32: first overflow unit and count of each block row
    ucap: max of ov_units, at least 1 (the extent of the merge loop)
    """

    row_cols: torch.Tensor
    unit_row: torch.Tensor
    unit_cols: torch.Tensor
    ov_start: torch.Tensor
    ov_units: torch.Tensor
    ucap: int

    exact: bool = True  # U and ucap measured (else upper bounds: see make_plan)
    overflow: bool | None = None  # whether a row has an overflow unit, where known

    @property
    def has_overflow(self) -> bool:
        if self.overflow is not None:
            return self.overflow
        if not self.exact:
            return True  # unknown without reading the device: empty units cost little
        return bool(self.unit_row.shape[1]) and bool((self.unit_row >= 0).any())


def plan_bounds(K: int, n: int, nk: int, Cr: int, Co: int) -> tuple[int, int]:
    """(U, ucap) upper bounds from the shapes alone (n block rows of nk blocks), for
    ``make_plan(exact=False)``.

    A block row holds at most min(K, nk) selected blocks: at most e = min(K, nk) - Cr
    overflow blocks, in ceil(e / Co) units (ucap). Over a row's K blocks the overflow
    sum_i max(c_i - Cr, 0) is largest with the blocks packed into full block rows,
    and at most K // (Cr + 1) block rows overflow, each rounding up by < 1 unit."""
    per_row = max(min(K, nk) - Cr, 0)
    ucap = max(-(-per_row // Co), 1)
    rows_over = min(n, K // (Cr + 1))
    most = (K // nk) * max(nk - Cr, 0) + max(K % nk - Cr, 0)
    U = min(rows_over * ucap, (most + (Co - 1) * rows_over) // Co)
    return max(U, 1), ucap


@torch.no_grad()
def make_plan(index, n: int, nk: int, Cr: int, Co: int, exact: bool = True) -> Plan:
    """Split the sorted selected blocks ``index`` [R, K] (flat ``i * nk + j`` over n block
    rows of nk blocks) into row units and overflow units; entries ``n * nk`` (rows with
    fewer blocks, at the end) are no block.

    ``exact=False`` sizes U and ucap by ``plan_bounds`` instead of reading them from the
    device: no host synchronisation (CUDA: the call stays asynchronous and capturable
    in a CUDA graph), at the price of some empty units."""
    R, K = index.shape
    dev = index.device
    if exact and targets.of_device(dev).selects_in_numpy:
        return _make_plan_numpy(index.numpy(), n, nk, Cr, Co)
    bi = index // nk  # entries n * nk (no block, after all the others) give block row n
    bj = (index % nk).to(torch.int32)
    per_row = torch.zeros(R, n + 1, dtype=torch.int64, device=dev)
    per_row.scatter_add_(1, bi, torch.ones_like(bi))
    first = per_row.cumsum(1) - per_row  # position of each block row in the sorted list
    pos = torch.arange(K, device=dev)[None, :] - first.gather(1, bi)  # rank within its row
    valid = bi < n
    per_row, bi = per_row[:, :n], bi.clamp_max(n - 1)

    own = (pos < Cr) & valid
    row_cols = torch.full((R, n * Cr), -1, dtype=torch.int32, device=dev)
    slot = torch.where(own, bi * Cr + pos, n * Cr)  # overflow blocks go to a spill column
    spill = torch.full((R, n * Cr + 1), -1, dtype=torch.int32, device=dev)
    spill.scatter_(1, slot, bj)
    row_cols = spill[:, : n * Cr].reshape(R, n, Cr)

    extra = (per_row - Cr).clamp_min(0)
    ov_units = (extra + Co - 1) // Co
    ov_start = ov_units.cumsum(1) - ov_units
    if exact:
        U = max(int(ov_units.sum(1).max()) if K else 0, 1)
    else:
        U, ucap = plan_bounds(K, n, nk, Cr, Co)
    opos = (pos - Cr).clamp_min(0)
    # Own blocks and no-blocks go to the spill unit U.
    unit = torch.where(own | ~valid, U, ov_start.gather(1, bi) + opos // Co)
    unit_cols = torch.full((R, (U + 1) * Co), -1, dtype=torch.int32, device=dev)
    unit_cols.scatter_(1, unit * Co + opos % Co, bj)
    unit_row = torch.full((R, U + 1), -1, dtype=torch.int32, device=dev)
    unit_row.scatter_(1, unit, bi.to(torch.int32))
    return Plan(
        row_cols.contiguous(),
        unit_row[:, :U].contiguous(),
        unit_cols.view(R, U + 1, Co)[:, :U].contiguous(),
        ov_start.to(torch.int32),
        ov_units.to(torch.int32),
        max(int(ov_units.max()) if ov_units.numel() else 0, 1) if exact else ucap,
        exact,
    )


def transposed(index: torch.Tensor, n: int, nk: int):
    """Selected blocks (i, j) of an n x nk grid as sorted flat ``j * n + i``: grouped by
    key block (entries ``n * nk``, no block, stay), and each one's position in ``index``
    [R, K]."""
    flipped = torch.where(index < n * nk, (index % nk) * n + index // nk, n * nk)
    return flipped.sort(dim=1, stable=True)


def _unit_slots(index: np.ndarray, n: int, nk: int, ov_start: np.ndarray,
                Co: int) -> np.ndarray:
    """Where ``make_plan(index, n, nk, 0, Co)`` put each entry of ``index`` [R, K] (its
    ``ov_start``): the flat slot ``unit * Co + slot`` [R, K], -1 for no block."""
    rows = np.arange(index.shape[0])[:, None]
    bi, _, pos = _row_ranks(index, n, nk)
    unit = ov_start[rows, np.minimum(bi, n - 1)] + pos // Co
    return np.where(bi < n, unit * Co + pos % Co, -1)


def _row_ranks(index: np.ndarray, n: int, nk: int):
    """Of the sorted selection ``index`` [R, K] (n block rows of nk blocks): each entry's
    block row ``bi`` (n for no block, entries ``n * nk``, after all the others), the
    blocks per row [R, n + 1], and each entry's rank in its row."""
    R, K = index.shape
    rows = np.arange(R)[:, None]
    bi = index // nk
    per_row = np.bincount((bi + rows * (n + 1)).ravel(), minlength=R * (n + 1)).reshape(R, n + 1)
    first = np.cumsum(per_row, axis=1) - per_row  # position of each block row in the list
    return bi, per_row, np.arange(K)[None, :] - first[rows, bi]


@torch.no_grad()
def transposed_slots(index, by_query: Plan, Cq: int, flipped, order, by_key: Plan,
                     Ck: int, n: int, nk: int) -> torch.Tensor:
    """For each slot of the plan ``by_query`` (``make_plan(index, n, nk, 0, Cq)``), the flat
    slot ``unit * Ck + slot`` of the same block in ``by_key`` (``make_plan(flipped, nk, n,
    0, Ck)``:
    the blocks by key, ``flipped`` = the transposed blocks sorted, ``order`` their
    positions in ``index``): [R, Uq, Cq] int32, -1 for empty slots. In numpy (the CPU's
    backward uses it: 50-90 us where torch's per-operation cost made it 250-840)."""
    R = index.shape[0]
    Uq = by_query.unit_cols.shape[1]
    host = [x.cpu().numpy() for x in (index, flipped, order, by_query.ov_start, by_key.ov_start)]
    index_, flipped_, order_, q_start, k_start = host
    rows = np.arange(R)[:, None]
    q_slot = _unit_slots(index_, n, nk, q_start, Cq)[rows, order_]  # in key order
    k_slot = _unit_slots(flipped_, nk, n, k_start, Ck)
    at = np.full((R, Uq * Cq + 1), -1, dtype=np.int32)
    at[rows, np.where(q_slot >= 0, q_slot, Uq * Cq)] = k_slot
    return torch.from_numpy(np.ascontiguousarray(at[:, : Uq * Cq]).reshape(R, Uq, Cq)).to(
        index.device)


def _make_plan_numpy(index, n: int, nk: int, Cr: int, Co: int) -> Plan:
    """``make_plan`` (exact) in numpy, for selections in host memory: the same steps on
    [R, K] arrays, where numpy's per-operation cost is a few microseconds against torch's
    tens (0.55 ms for the plan of N = 8192, B*H = 12 with torch)."""
    R, K = index.shape
    rows = np.arange(R)[:, None]
    bi, per_row, pos = _row_ranks(index, n, nk)
    bj = (index % nk).astype(np.int32)
    valid = bi < n
    per_row, bi = per_row[:, :n], np.minimum(bi, n - 1)

    own = (pos < Cr) & valid
    spill = np.full((R, n * Cr + 1), -1, dtype=np.int32)  # overflow blocks: last column
    spill[rows, np.where(own, bi * Cr + pos, n * Cr)] = bj
    row_cols = spill[:, : n * Cr].reshape(R, n, Cr)

    ov_units = (np.maximum(per_row - Cr, 0) + Co - 1) // Co
    ov_start = np.cumsum(ov_units, axis=1) - ov_units
    most = int(ov_units.sum(1).max()) if K else 0  # (units of the row with the most)
    U = max(most, 1)
    opos = np.maximum(pos - Cr, 0)
    # Own blocks and no-blocks go to the spill unit U.
    unit = np.where(own | ~valid, U, ov_start[rows, bi] + opos // Co)
    unit_cols = np.full((R, (U + 1) * Co), -1, dtype=np.int32)
    unit_cols[rows, unit * Co + opos % Co] = bj
    unit_row = np.full((R, U + 1), -1, dtype=np.int32)
    unit_row[rows, unit] = bi
    return Plan(
        torch.from_numpy(np.ascontiguousarray(row_cols)),
        torch.from_numpy(np.ascontiguousarray(unit_row[:, :U])),
        torch.from_numpy(np.ascontiguousarray(unit_cols.reshape(R, U + 1, Co)[:, :U])),
        torch.from_numpy(ov_start.astype(np.int32)),
        torch.from_numpy(ov_units.astype(np.int32)),
        max(int(ov_units.max()) if ov_units.size else 0, 1),
        overflow=most > 0,
    )
