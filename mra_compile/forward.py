"""The MRA-2 forward pass (docs/spec.md, steps 1-6): plan in torch, compute in the kernels.

Inputs are validated by the caller (``mra_compile.validate``, ``mra_compile.options``).
Computation is in float32, or in float64 for float64 inputs; the kernels that read q, k,
v take them in the target's I/O dtype (``Target.io_dtype``), and the output has q's
dtype. Tensors live on the inputs' device; CUDA kernels run on torch's current stream
there.

Stages: ``inputs.prepare`` (pad, mask tensors) -> ``pool_and_logits`` kernel -> block
selection and the work plan (the ``select_plan`` kernel where the target has it, for
calls without priors; else ``plan.select_blocks`` and ``plan.make_plan`` on the host)
-> ``hires_units`` kernel (overflow) -> ``lowres_out`` kernel ("full") -> ``hires_rows``
kernel (output and the statistics the backward needs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mra_compile import kernels, knob_policy, memory, plan, runtime, validate
from mra_compile.inputs import Prepared, prepare, torch_single_threaded
from mra_compile.options import Options


@dataclass
class LowRes:
    """Steps 2-3: pooled q̂ [R, n, Dp], k̂, v̂ [R, nk, Dp]; logits [R, n, nk], rowmax; the
    selection; the work plan where the selection kernel made it with the selection (else
    None)."""

    # [3, R, max(n, nk), Dp] (``Saved.pooled``), where the call keeps it for a backward
    pooled: torch.Tensor | None
    vp: torch.Tensor  # v̂ [R, nk, Dp] as the kernels read it
    logits: torch.Tensor
    rowmax: torch.Tensor
    sel: plan.Selection
    work: plan.Plan | None = None
    # What the backward reads for Hmask where the selection kernel wrote it: Hmask
    # ("full", also ``sel.high_mask``) or zeros ("sparse").
    saved_mask: torch.Tensor | None = None


def _pool_and_select(pr: Prepared, opts: Options, knobs: dict) -> LowRes:
    R, Np, Dp = pr.rows
    n, nk = Np // pr.block_size, pr.key_blocks
    # What the backward reads (n x D and n x nk per row): results where the call returns
    # them (``Prepared.saved``).
    pooled = None
    if pr.keeps_saved and n == nk:
        pooled = pr.result(3, R, n, Dp)
        qp, kp, vp = pooled.unbind(0)
    else:  # (three cached scratch views: unbind cost 10-25 us a call)
        sizes = {"q": n, "k": nk, "v": nk}
        qp, kp, vp = (pr.scratch(f"pooled_{x}", R, sizes[x], Dp) for x in "qkv")
    logits, rowmax = pr.saved("saved_logits", R, n, nk), pr.saved("saved_rowmax", R, n)
    # v̂ only feeds the low-resolution output ("full"); "sparse" saves zeros in its place.
    values = dict(v=pr.v, vp=vp) if opts.full else {}
    if not opts.full and pr.keeps_saved:
        vp.zero_()
    pr.run("pool_and_logits", knobs, opts.full, q=pr.q, k=pr.k, **values, **pr.masks,
           counts=pr.counts, inv_counts=pr.inv_counts, q_counts=pr.q_counts,
           q_inv_counts=pr.q_inv_counts, qp=qp, kp=kp, logits=logits, rowmax=rowmax,
           heads=pr.heads, group=pr.group, scale=pr.scale)
    if pr.keeps_saved and pooled is None:  # (cross-attention: one tensor of the longer side)
        pooled = pr.result(3, R, max(n, nk), Dp).zero_()
        for saved, x in zip(pooled.unbind(0), (qp, kp, vp)):
            saved[:, :x.shape[1]].copy_(x)
    row_blocks = real_pairs = None
    if opts.block_per_row is not None and pr.masked:  # padding: per-sequence budgets
        row_blocks = sequence_budgets(pr.q_counts, pr.heads, pr.block_size,
                                      opts.block_per_row, n * nk)
    # The top-k runs over the n x nk grid of the spec (cross-attention: each side padded
    # to whole blocks of its own, inputs._prepare_cross).
    k = opts.max_blocks(n, nk)
    if (kernels.get("select_plan").on(pr.target.family) and opts.first_n == 0
            and opts.diagonal_n == 0 and k < n * nk):
        sel, work, saved_mask = _select_and_plan(pr, logits, rowmax, k, opts.full, knobs,
                                                 row_blocks)
        return LowRes(pooled, vp, logits, rowmax, sel, work, saved_mask)
    if row_blocks is not None:
        real_pairs = _real_pairs(pr)
    # S goes to kept memory, not fresh pages: where Hmask (which the backward reads)
    # replaces it ("full"), or that the backward's zeros then take ("sparse").
    sel = plan.select_blocks(logits, rowmax, num_blocks=k, full=opts.full,
                             first_n=opts.first_n, diagonal_n=opts.diagonal_n,
                             row_blocks=row_blocks, real_pairs=real_pairs,
                             scores_out=pr.saved("saved_scores", R, n, nk))
    return LowRes(pooled, vp, logits, rowmax, sel)


# Room for the selection kernel's candidates per row (``selection_tir``, step 2), in
# multiples of the number of selected blocks: the bisection runs on all n*n scores only
# until this many or fewer are above its lower bound (~1.75 K at N = 8192, 8 passes).
CANDIDATE_ROOM = 2

# Head dims below which a forward on the bf16 micro-kernels keeps P at float32 accuracy
# in P v (their float32-P variant, ``Prepared.float32_pv``) for inference too (``_forward``).
SMALL_HEAD_DIM = 16


def _select_and_plan(pr: Prepared, logits, rowmax, k: int, full: bool, knobs: dict,
                     row_blocks=None):
    """Step 3 and the work plan in one kernel (``selection_tir``): the selection of
    ``plan.select_blocks`` (with per-sequence budgets ``row_blocks`` [R], and over the
    nq x nk grid of cross-attention) and the plan ``plan.make_plan`` makes of it; for
    calls without priors and k < n * nk. Returns (selection, plan, Hmask or, "sparse",
    zeros [R, n, nk]: what the backward reads for Hmask)."""
    R, n, nk = logits.shape
    Cr, Co = _unit_blocks(knobs, pr.target)
    room, _ = plan.plan_bounds(k, n, nk, Cr, Co)  # (the most overflow units a row can have)
    i32 = torch.int32
    # S where the backward reads Hmask: Hmask ("full") or zeros ("sparse") replace it in
    # place.
    scores = pr.saved("saved_scores", R, n, nk)
    index = pr.saved("saved_index", R, k, dtype=torch.int64)
    row_cols = pr.scratch("row_cols", R, n, Cr, dtype=i32)
    ov_start, ov_units = pr.scratch("ov_start", R, n, dtype=i32), pr.scratch("ov_units", R, n, dtype=i32)
    unit_row = pr.scratch("unit_row", R, room, dtype=i32)
    unit_cols = pr.scratch("unit_cols", R, room, Co, dtype=i32)
    units = pr.scratch("units", R, 2, dtype=i32)
    cands = min(CANDIDATE_ROOM * k, n * nk)  # (never more than the scores: R*n*nk < 2**31)
    if row_blocks is None:
        budget = _uniform_budget(R, k, pr)
    else:
        budget = pr.scratch("budget", R, dtype=i32)
        write_budget(budget, row_blocks, k)
    pr.run("select_plan", knobs, logits=logits, rowmax=rowmax, counts=pr.counts,
           q_counts=pr.q_counts, budget=budget, scores=scores.view(R, n * nk),
           cand_val=pr.scratch("cand_val", R, cands),
           cand_idx=pr.scratch("cand_idx", R, cands, dtype=i32), index=index,
           row_cols=row_cols, ov_start=ov_start, ov_units=ov_units, unit_row=unit_row,
           unit_cols=unit_cols, units=units, heads=pr.heads,
           real_only=int(row_blocks is not None), write_mask=_mask_written(full, pr))
    if units.device.type == "cpu":
        # (numpy, not torch: each torch call costs 10-35 us right after other heavy
        # work, as the kernels' traffic leaves the interpreter's caches cold)
        most, widest = unit_counts(units.numpy())
        U = max(most, 1)
        used_row = pr.scratch("unit_row_used", R, U, dtype=i32)
        used_cols = pr.scratch("unit_cols_used", R, U, Co, dtype=i32)
        used_row.numpy()[...] = unit_row.numpy()[:, :U]
        used_cols.numpy()[...] = unit_cols.numpy()[:, :U]
    else:  # (one read of the row counts for both)
        most, widest = units.amax(0).tolist()
        U = max(most, 1)
        used_row, used_cols = unit_row[:, :U].contiguous(), unit_cols[:, :U].contiguous()
    work = plan.Plan(row_cols, used_row, used_cols, ov_start, ov_units, max(widest, 1),
                     overflow=most > 0)
    return plan.Selection(index, scores if full else None), work, scores


def _mask_written(full: bool, pr: Prepared) -> int:
    """``select_plan``'s ``write_mask``: Hmask (1, "full": the low-resolution part reads
    it), zeros (0, "sparse" with a backward to read them in Hmask's place) or nothing (2:
    "sparse" inference; the zeros were a 3 MB write a call at N = 8192, B*H = 12)."""
    if full:
        return 1
    return 0 if pr.keeps_saved else 2


def unit_counts(units) -> tuple[int, int]:
    """(the most overflow units of a row, the widest row unit) from ``select_plan``'s
    per-row counts ``units`` [R, 2] (a numpy array: read on the host, see above)."""
    counts = units.tolist()
    return max(c[0] for c in counts), max(c[1] for c in counts)


def _uniform_budget(R: int, k: int, pr: Prepared) -> torch.Tensor:
    """``select_plan``'s budget [R] of k blocks for every row: kept between calls where
    the target keeps memory (``memory.kept_constants``; the kernel only reads it, and a
    fill cost 10-30 us a call)."""
    dev = pr.q.device
    return memory.kept_constants(
        ("budget", R, k, dev), lambda: torch.full((R,), k, dtype=torch.int32, device=dev),
        pr.target.reuses_workspace)


def _unit_blocks(knobs: dict, target) -> tuple[int, int]:
    """(Cr, Co): the blocks of a row unit (``hires_rows``) and of an overflow unit
    (``hires_units``) for these knobs."""
    def knob(op, name):  # (complete knobs, as knobs_for_shape gives them, hold it)
        given = knobs.get(op)
        if given and name in given:
            return given[name]
        return knob_policy.resolve_knobs(op, given, target=target)[name]

    return knob("hires_rows", "row_unit_blocks"), knob("hires_units", "blocks_per_unit")


def sequence_budgets(q_counts, heads: int, block_size: int, block_per_row: int, grid: int):
    """docs/spec.md, "Per-sequence budget": each row's ``r * ceil(c / b)`` blocks (at
    least r, at most ``grid``, the blocks of the grid) for its sequence's ``c`` real
    tokens (queries), [R] int64, from the queries' block counts ``q_counts`` [Bm, nq]
    (row r of mask row r // ``heads``)."""
    real_tokens = q_counts.sum(-1)  # [Bm]
    rows_real = torch.ceil(real_tokens / block_size).clamp_min(1).to(torch.int64)
    budget = (rows_real * block_per_row).clamp_max(grid)
    return _per_head(budget, heads)


def _per_head(x, heads: int):
    """``x`` [Bm, ...] with each row repeated ``heads`` times: [Bm * heads, ...]. An
    expanded view made contiguous (``repeat_interleave`` by a count reads nothing on the
    host in recent torch, but this is plainly so: a CUDA graph's capture takes it)."""
    return x[:, None].expand(x.shape[0], heads, *x.shape[1:]).reshape(-1, *x.shape[1:])


def write_budget(budget, row_blocks, k: int) -> None:
    """``select_plan``'s ``budget`` [R] int32 from per-sequence budgets ``row_blocks``:
    a row's budget beyond k takes its k best, as ``plan.select_blocks`` does."""
    budget.copy_(row_blocks.clamp_max(k))


def _real_pairs(pr: Prepared):
    """The blocks with a real query and a real key (those a per-sequence budget counts),
    [R, nq, nk] bool."""
    pairs = (pr.q_counts > 0.5)[:, :, None] & (pr.counts > 0.5)[:, None, :]
    return _per_head(pairs, pr.heads)


def block_selection(q, k, v, mask, opts: Options, query_mask=None):
    """The blocks the op computes exactly, for tests and inspection.

    Returns ``(selected, high_mask)``, bool ``[B, H, nq, nk]`` (``n = ceil(N / b)`` per
    side): T of docs/spec.md, step 3 and, in "full" mode, Hmask (equal to ``selected`` in
    "sparse" mode). Same computation and tie-breaking as ``torch.ops.mra.attention`` on
    the same inputs.
    """
    B, H, N, D = q.shape
    nq, nk = opts.blocks(N), opts.blocks(k.shape[2])
    runtime.ensure()
    with torch_single_threaded():
        pr = prepare(q, k, v, mask, opts.block_size, opts.scale, query_mask)
        with pr.target.device_scope(q.device):
            knobs = knob_policy.knobs_for_shape(None, max(N, k.shape[2]), D, opts.block_size,
                                                pr.target, q.dtype)
            lr = _pool_and_select(pr, opts, knobs)
    selected = torch.zeros(B * H, nq * nk + 1, dtype=torch.bool, device=q.device)
    selected.scatter_(1, lr.sel.index, True)  # (entries nq * nk: no block)
    selected = selected[:, : nq * nk].reshape(B, H, nq, nk)
    hm = lr.sel.high_mask
    high_mask = selected.clone() if hm is None else hm.bool().view(B, H, nq, nk)
    return selected, high_mask


@dataclass
class Saved:
    """What the forward hands to the backward (see ``mra_compile.backward``).

    stats [3, R, Np]: stab, lo_w, inv_z per query token; pooled [3, R, max(n, nk), Dp]:
    q̂ [R, n, Dp], k̂, v̂ [R, nk, Dp] in the first n, nk rows of each (``pooled_parts``;
    v̂ zeros in "sparse" mode); logits, high_mask [R, n, nk] (high_mask zeros in "sparse"
    mode); rowmax [R, n]; index [R, K] int64: the selected blocks, sorted.
    """

    stats: torch.Tensor
    pooled: torch.Tensor
    logits: torch.Tensor
    high_mask: torch.Tensor
    rowmax: torch.Tensor
    index: torch.Tensor

    def rows(self, start: int, stop: int) -> Saved:
        """The rows (batch * heads) ``start:stop``."""
        return Saved(self.stats[:, start:stop], self.pooled[:, start:stop],
                     self.logits[start:stop], self.high_mask[start:stop],
                     self.rowmax[start:stop], self.index[start:stop])

    @staticmethod
    def cat(parts: list[Saved]) -> Saved:
        """Consecutive row ranges, joined."""
        return Saved(*(torch.cat([getattr(p, f.name) for p in parts],
                                 1 if f.name in ("stats", "pooled") else 0)
                       for f in dataclasses.fields(Saved)))

    def pooled_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q̂ [R, n, Dp], k̂ [R, nk, Dp], v̂ [R, nk, Dp]) as the kernels read them (whole
        tensors: copies where n != nk, cross-attention, else views of ``pooled``)."""
        _, n, nk = self.logits.shape
        qp, kp, vp = self.pooled.unbind(0)
        return qp[:, :n].contiguous(), kp[:, :nk].contiguous(), vp[:, :nk].contiguous()


def exact_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the output of a forward asked for its exact output (``mra_forward``'s
    ``exact_out``) for inputs of ``dtype``: float32 for half-precision inputs, else
    ``dtype``. The caller rounds it, and the backward's D_t = g . out reads it without a
    second forward pass. CPU kernels compute it in float32 anyway (float16, and bfloat16
    without AVX-512-BF16) or with P v in float32 FMAs (the bf16 micro-kernels); CUDA's
    tensor-core kernels from P split into two half-precision parts (``split_pv``)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class RowPart:
    """One part of a split call (``row_parts``): the range ``q`` of q's (and the
    output's) batch or heads, and ``kv`` of k's and v's."""

    q: tuple[int, int]
    kv: tuple[int, int]


@dataclass(frozen=True)
class RowSplit:
    """How a call whose scratch is beyond 32-bit indexing splits (``row_parts``):
    ``dim`` 0 (the batch) or 1 (the heads of one sequence), the ``parts``, and whether
    every part reads all of k, v (``shares_kv``: one key/value head for all query heads,
    whose gradients then add up over the parts instead of joining)."""

    dim: int
    parts: tuple[RowPart, ...]
    shares_kv: bool = False

    def take(self, x, part: RowPart, side: str = "q"):
        """``x`` [B, H, N, D] narrowed to ``part``'s range of ``side`` ("q" or "kv")."""
        start, stop = part.q if side == "q" else part.kv
        return x.narrow(self.dim, start, stop - start)

    def take_mask(self, mask, part: RowPart):
        """A mask (per sequence, in any of its forms: [B, N], [B, 1, 1, N]): narrowed
        where the split is over the batch; None stays None."""
        if mask is None or self.dim == 1:
            return mask
        return mask.narrow(0, part.q[0], part.q[1] - part.q[0])

    def rows(self, H: int, part: RowPart) -> tuple[int, int]:
        """The query rows (batch * heads) of ``part``."""
        start, stop = part.q
        return (start * H, stop * H) if self.dim == 0 else (start, stop)


def row_parts(B: int, H: int, Hkv: int) -> RowSplit | None:
    """Halves of the batch, or for one sequence of the heads: rows are independent
    (docs/spec.md, "Properties"), and each half's rows are a consecutive range of the
    whole's (row = batch * H + head). With grouped heads (``Hkv < H``) the halves of the
    key/value heads with their query heads; with one key/value head, halves of the query
    heads, each reading it whole. None for one row."""
    if B > 1:
        half = B // 2
        return RowSplit(0, (RowPart((0, half), (0, half)), RowPart((half, B), (half, B))))
    if H == 1:
        return None
    if Hkv == 1:
        half = H // 2
        return RowSplit(1, (RowPart((0, half), (0, 1)), RowPart((half, H), (0, 1))),
                        shares_kv=True)
    group, half = H // Hkv, Hkv // 2
    return RowSplit(1, tuple(RowPart((a * group, z * group), (a, z))
                             for a, z in ((0, half), (half, Hkv))))


def mra_forward(q, k, v, mask, opts: Options, knobs: dict | None = None, save: bool = False,
                query_mask=None, exact_out: bool = True):
    """MRA-2 of docs/spec.md, steps 1-6. q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; mask
    [B, Nk] or None; query_mask [B, Nq] or None -> [B, H, Nq, D]. ``knobs``: ``{op:
    schedule knobs}`` (see ``knob_policy.knobs_for_shape``).

    With ``save=True`` returns ``(out, Saved)`` for the backward; without, what the
    backward would read lives in scratch memory for the call only. ``exact_out``: with
    ``save``, the output not rounded to q's dtype where it can be so
    (``exact_output_dtype``; a training call's: the backward reads it).
    """
    B, H, N, D = q.shape
    if B * H == 0:
        out = q.new_zeros(q.shape)
        if save and exact_out:
            out = out.to(exact_output_dtype(q.dtype))
        return (out, None) if save else out
    runtime.ensure()  # sizes the kernels' threads from torch's before they change
    try:
        with torch_single_threaded():
            # (inference: the backward's kernels have no variant reading q, k, v as
            # [B, N, H, D]; where q, k, v are read so, the output is written so too and
            # returned as its [B, H, N, D] view)
            pr = prepare(q, k, v, mask, opts.block_size, opts.scale, query_mask,
                         heads_last=not save)
            pr.keeps_saved = save
            with pr.target.device_scope(q.device):
                chosen = knob_policy.knobs_for_shape(knobs, max(N, k.shape[2]), D,
                                                     opts.block_size, pr.target, q.dtype)
                out, saved = _forward(q, pr, opts, chosen, save and exact_out)
    except validate.ScratchOverflow:
        split = row_parts(B, H, k.shape[1])
        if split is None:
            raise
        take, take_mask = split.take, split.take_mask
        results = [mra_forward(take(q, p), take(k, p, "kv"), take(v, p, "kv"),
                               take_mask(mask, p), opts, knobs, save=save,
                               query_mask=take_mask(query_mask, p), exact_out=exact_out)
                   for p in split.parts]
        if not save:
            return torch.cat(results, split.dim)
        out = torch.cat([o for o, _ in results], split.dim)
        saved = Saved.cat([s for _, s in results])
    return (out, saved) if save else out


def _forward(q, pr: Prepared, opts: Options, knobs: dict,
             exact_out: bool) -> tuple[torch.Tensor, Saved | None]:
    """(out, what the backward reads, or None where ``pr`` does not keep it);
    ``exact_out``: see ``mra_forward``."""
    B, H, N, D = q.shape
    lr = _pool_and_select(pr, opts, knobs)
    R, Np, Dp = pr.rows
    n = Np // opts.block_size
    dt = pr.dtype
    # Training with a half-precision result (``exact_output_dtype``): the kernels write
    # the output in float32, for the backward (the caller rounds it); where they read q,
    # k, v in half precision (the CPU's bf16 micro-kernels, CUDA), their variant with P
    # at float32 accuracy in P v (``Prepared.float32_pv``).
    # Below ``SMALL_HEAD_DIM`` every call does so (the output rounded here): P rounded to
    # bf16 errs by up to 2^-9 of sum P|v|, which where P v cancels is more than the bf16
    # tolerance of the output itself, far likelier at D = 1 than at larger D (a head's
    # outputs then all cancel together); at such D, P v is a small part of the work.
    small = (D < SMALL_HEAD_DIM and not pr.heads_last
             and pr.target.micro_kernels(pr.q.dtype, block_size=pr.block_size) is not None)
    exact = (exact_out or small) and exact_output_dtype(q.dtype) != q.dtype
    written = dt if exact else pr.q.dtype
    result = dt if exact and exact_out else q.dtype
    runs = dataclasses.replace(pr, float32_pv=True) if exact and pr.q.dtype != dt else pr
    # The result is a copy of part of the kernels' output (below) where padded or of
    # another dtype: then scratch memory, reused between calls where the target allows it
    # (no fresh pages to fault in).
    copied = N < Np or D < Dp or result != written
    shape = (R, n, opts.block_size, Dp)
    # The kernels that read q, k, v as [B, N, H, D] write the output so too: the op
    # returns its [B, H, N, D] view, which an attention layer's transpose back makes
    # contiguous at no cost (``schedules/cpu.py``, ``_heads_last_output``).
    heads_last = pr.heads_last and not copied
    if heads_last:
        out = pr.result(B, n, opts.block_size, H, D, dtype=written)
    elif copied:
        out = pr.scratch("out", *shape, dtype=written)
    else:
        out = pr.result(*shape, dtype=written)
    stats = pr.saved("saved_stats", 3, R, n, opts.block_size)
    high_mask = lr.sel.high_mask
    exact_and_combine(runs, lr.sel.index, lr.logits, lr.rowmax, high_mask, lr.vp,
                      opts.full, knobs, out, stats, lr.work)
    if copied:  # (never hand out scratch)
        out = pr.result(B, H, N, D, dtype=result).copy_(out.view(B, H, Np, Dp)[:, :, :N, :D])
    elif heads_last:
        out = out.view(B, N, H, D).transpose(1, 2)
    else:
        out = out.view(B, H, N, D)
    if not pr.keeps_saved:
        return out, None
    if high_mask is None:  # ("sparse": zeros, from the selection kernel where it ran)
        high_mask = (lr.saved_mask if lr.saved_mask is not None
                     else pr.result(R, n, pr.key_blocks).zero_())
    assert lr.pooled is not None  # (kept: keeps_saved)
    saved = Saved(stats.view(3, R, Np), lr.pooled, lr.logits,
                  high_mask if high_mask.dtype == dt else high_mask.to(dt), lr.rowmax,
                  lr.sel.index)
    return out, saved


def exact_and_combine(pr: Prepared, index, logits, rowmax, high_mask, vp, full: bool,
                      knobs: dict, out, stats, work: plan.Plan | None = None) -> None:
    """Steps 4-6 for the selected blocks ``index`` [R, K] (and, "full", the
    low-resolution part from ``logits``, ``rowmax``, ``high_mask`` [R, n, nk] and the
    pooled values ``vp`` [R, nk, Dp]): the output into ``out`` [R, n, b, Dp] (in the I/O
    dtype of ``pr``) and the per-token statistics into ``stats`` [3, R, n, b]. ``work``:
    the plan of ``index`` for these knobs, where the selection made it (else made here)."""
    R, Np, Dp = pr.rows
    b = pr.block_size
    n = Np // b
    dt, target = pr.dtype, pr.target

    if work is None:
        Cr, Co = _unit_blocks(knobs, target)
        work = plan.make_plan(index, n, pr.key_blocks, Cr, Co, exact=target.exact_plan)
    p = work
    U = p.unit_row.shape[1]
    target.check_launch(n=n, U=U)
    validate.check_scratch("overflow-unit", R, U, b, Dp)

    # Step 4 for the blocks beyond each row's own Cr: overflow units.
    ov_max, ov_sum = pr.scratch("unit_max", R, U, b), pr.scratch("unit_sum", R, U, b)
    ov_out = pr.scratch("unit_out", R, U, b, Dp)
    if p.has_overflow:
        pr.run("hires_units", knobs, q=pr.q, k=pr.k, v=pr.v, **pr.masks,
               unit_row=p.unit_row, unit_cols=p.unit_cols, unit_max=ov_max, unit_out=ov_out,
               unit_sum=ov_sum, heads=pr.heads, group=pr.group, scale=pr.scale)

    # Step 4 for each row's own blocks, merged with its overflow units; steps 5 and 6.
    lowres = {}
    if full:
        assert high_mask is not None  # (the selection makes it in "full" mode)
        o_lo, z_lo = pr.scratch("o_lo", R, n, Dp), pr.scratch("z_lo", R, n)
        hmask = high_mask if high_mask.dtype == dt else high_mask.to(dt)
        pr.run("lowres_out", knobs, logits=logits, rowmax=rowmax, hmask=hmask,
               counts=pr.counts, vp=vp, o_lo=o_lo, z_lo=z_lo, heads=pr.heads)
        lowres = dict(o_lo=o_lo, z_lo=z_lo, rowmax=rowmax)
    pr.run("hires_rows", knobs, full, q=pr.q, k=pr.k, v=pr.v, **pr.masks,
           row_cols=p.row_cols, ov_max=ov_max, ov_out=ov_out, ov_sum=ov_sum, ov_start=p.ov_start,
           ov_units=p.ov_units, **lowres, out=out, stab=stats[0], lo_w=stats[1], inv_z=stats[2],
           heads=pr.heads, group=pr.group, scale=pr.scale, ucap=p.ucap)
