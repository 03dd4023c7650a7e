"""Block selection (spec step 3) and the work plan for the high-resolution kernels.

Selection is a top-k over the n*n low-resolution scores of each row. It runs in torch:
``torch.topk`` is a tuned selection kernel, the input is small (n*n per row, n = N/b),
and its result only indexes the TVM kernels. TVM's TOPI top-k sorts the whole row and
was not faster here.

The plan groups the selected blocks of each (row, query block) into *units* of at most
``C`` key blocks; every unit is an independent piece of work for ``hires_units`` and
``combine`` merges the units of a block row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRIOR_BONUS = 5e3  # spec step 3


def selection_scores(logits, rowmax, first_n: int, diagonal_n: int):
    """S of spec step 3: [R, n, n] from logits [R, n, n] and rowmax [R, n].

    In float64: the 5e3 prior bonus would otherwise round away float32 differences
    below 5e-4 and turn near-ties into ties, changing T and Hmask.
    """
    scores = logits.double() - rowmax.double()[:, :, None]
    n = scores.shape[-1]
    if diagonal_n > 0:
        idx = torch.arange(n, device=scores.device)
        band = (idx[:, None] - idx[None, :]).abs() <= diagonal_n // 2
        scores = scores + band.to(scores.dtype) * PRIOR_BONUS
    if first_n > 0:
        first = torch.arange(n, device=scores.device) < first_n
        scores = scores + first[:, None].to(scores.dtype) * PRIOR_BONUS
        scores = scores + first[None, :].to(scores.dtype) * PRIOR_BONUS
    return scores


@dataclass
class Selection:
    """The selected blocks of every row.

    index: [R, K] int64, flat ``i * n + j``, sorted ascending (grouped by query block)
    high_mask: [R, n, n] float32, 1.0 where S >= theta ("full" mode), else None
    """

    index: torch.Tensor
    high_mask: torch.Tensor | None


@torch.no_grad()
def select_blocks(logits, rowmax, *, num_blocks, full, first_n=0, diagonal_n=0) -> Selection:
    scores = selection_scores(logits, rowmax, first_n, diagonal_n)
    R, n, _ = scores.shape
    k = min(num_blocks, n * n)
    top = torch.topk(scores.reshape(R, n * n), k, dim=1, sorted=True)
    index = top.indices.sort(dim=1).values
    high_mask = None
    if full:
        theta = top.values[:, -1]
        high_mask = (scores >= theta[:, None, None]).to(torch.float32)
    return Selection(index, high_mask)


@dataclass
class UnitPlan:
    """Work units of ``hires_units`` and how ``combine`` finds them.

    unit_row [R, U] i32: query block of each unit (-1: padding unit)
    unit_cols [R, U, C] i32: key blocks of each unit (-1: empty slot)
    row_start, row_units [R, n] i32: first unit and number of units of each block row
    ucap: max of row_units (the extent of combine's merge loop)
    """

    unit_row: torch.Tensor
    unit_cols: torch.Tensor
    row_start: torch.Tensor
    row_units: torch.Tensor
    ucap: int


@torch.no_grad()
def make_units(index, n: int, C: int) -> UnitPlan:
    """Pack the sorted selected blocks ``index`` [R, K] into units of <= C blocks."""
    R, K = index.shape
    dev = index.device
    bi = index // n
    bj = index % n
    per_row = torch.zeros(R, n, dtype=torch.int64, device=dev)
    per_row.scatter_add_(1, bi, torch.ones_like(bi))
    first = per_row.cumsum(1) - per_row  # position of each block row in the sorted list
    pos = torch.arange(K, device=dev)[None, :] - first.gather(1, bi)
    row_units = (per_row + C - 1) // C
    row_start = row_units.cumsum(1) - row_units
    unit = row_start.gather(1, bi) + pos // C
    U = max(int(row_units.sum(1).max()), 1)
    unit_cols = torch.full((R, U * C), -1, dtype=torch.int32, device=dev)
    unit_cols.scatter_(1, unit * C + pos % C, bj.to(torch.int32))
    unit_row = torch.full((R, U), -1, dtype=torch.int32, device=dev)
    unit_row.scatter_(1, unit, bi.to(torch.int32))
    return UnitPlan(
        unit_row,
        unit_cols.view(R, U, C),
        row_start.to(torch.int32),
        row_units.to(torch.int32),
        max(int(row_units.max()), 1),
    )
