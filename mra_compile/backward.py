"""The MRA-2 backward pass: gradients of q, k, v from the saved forward.

Nothing of the forward's selection is recomputed: the selected blocks, the per-token
stabilisers and normalisers (``Saved.stats``) and the low-resolution tensors come from
the forward; the selection and the stabilisers are constants (docs/spec.md,
"Properties"). Never materialises an N x N matrix: the high-resolution part runs per unit
of C selected blocks, grouped by query block for dq and by key block for dk, dv.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mra_compile import kernels, knob_policy, plan, runtime, validate
from mra_compile.forward import Saved, exact_and_combine, row_parts
from mra_compile.inputs import Prepared, pad, padded, prepare, torch_single_threaded
from mra_compile.options import Options


def mra_backward(grad_out, q, k, v, mask, out, saved: Saved, opts: Options,
                 knobs: dict | None = None, query_mask=None):
    """(dq, dk, dv), shaped and typed as (q, k, v), for the upstream gradient ``grad_out``
    [B, H, Nq, D] (arguments as ``mra_compile.forward.mra_forward``'s)."""
    B, H, N, D = q.shape
    if B * H == 0 or saved is None:
        return tuple(torch.zeros_like(x) for x in (q, k, v))
    runtime.ensure()
    try:
        with torch_single_threaded():
            # CUDA fp16/bf16: as the kernels take them
            pr = prepare(q, k, v, mask, opts.block_size, opts.scale, query_mask)
            with pr.target.device_scope(q.device):
                return _backward(grad_out, q, k, v, out, saved, pr, opts.full, knobs or {})
    except validate.ScratchOverflow:
        split = row_parts(B, H, k.shape[1])  # as the forward splits (rows are independent)
        if split is None:
            raise
        take, take_mask = split.take, split.take_mask
        parts = [mra_backward(take(grad_out, p), take(q, p), take(k, p, "kv"), take(v, p, "kv"),
                              take_mask(mask, p), take(out, p), saved.rows(*split.rows(H, p)),
                              opts, knobs, take_mask(query_mask, p))
                 for p in split.parts]
        dq, dk, dv = (list(grads) for grads in zip(*parts))
        if split.shares_kv:  # (each part's dk, dv: its query heads' share of the sum)
            return torch.cat(dq, split.dim), _added(dk), _added(dv)
        return tuple(torch.cat(grads, split.dim) for grads in (dq, dk, dv))


def _added(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of gradients ``parts``, added in float32 at least and rounded once."""
    dtype = parts[0].dtype
    total = parts[0].to(torch.promote_types(dtype, torch.float32))
    for part in parts[1:]:
        total = total + part
    return total.to(dtype)


def _backward(grad_out, q, k, v, out, saved: Saved, pr: Prepared, full: bool, knobs: dict):
    B, H, N, D = q.shape
    Nk = k.shape[2]  # (cross-attention: each side padded to whole blocks of its own)
    R, Np, Dp = pr.rows
    b = pr.block_size
    n, nk = Np // b, pr.key_blocks
    dt, dev, target = pr.dtype, q.device, pr.target
    # CPU bf16 with its micro-kernels: the units' products in bf16 on dO itself (their
    # operand ``g``, exact), 1/Z going with P (``operators.bwd_prep``).
    micro = target.micro_kernels(pr.q.dtype, block_size=b)
    io = pr.q.dtype if micro else dt
    given = knobs
    # Every tunable kernel's knobs: those given, else the tuning record of this shape and
    # input dtype, else the defaults (``knob_policy``).
    knobs = knob_policy.knobs_for_shape(knobs or None, max(N, Nk), D, b, target, q.dtype)

    # (float32 for the micro-kernels too: bwd_prep rounds it into g. The gradient of a
    # training forward's float32 output comes in float32, so no copy is made of it here.)
    dout = padded(grad_out, Np, Dp, dt, "dout", target)
    stab, lo_w, inv_z = saved.stats  # [R, Np] each
    # A half-precision result, float32 sums here: D_t = g . out from the output in
    # float32. With the rounded one, g . v - D_t cancels where the softmax is peaky and
    # dq, dk lose all precision there (seen: dk off by 5% of the largest gradient, 120% of
    # its own, at scale 2.5); with one computed from half-precision P too. The training
    # forward returned it (``forward.exact_output_dtype``: ``out`` is float32 then); after
    # a forward called without ``exact_out`` it is computed again with the forward's
    # blocks: where the kernels read half-precision q, k, v, by their variant with P at
    # float32 accuracy in P v (q k^T is exact): the micro-kernels' with P v in float32,
    # CUDA's with P split in two (``Target.splits_pv``), the widened ones' (CPU fp16, bf16
    # without micro-kernels; P in float32 anyway: ``Target.widens``) with a float32
    # output; else the float32 kernels on float32 copies of q, k, v.
    # q̂, k̂, v̂ as the kernels read them (copies for cross-attention: made once)
    pooled = saved.pooled_parts() if full or out.dtype != dt else None
    if out.dtype != dt:
        assert pooled is not None
        second = pr
        if micro or target.splits_pv(pr.q.dtype) or pr.widened:
            second = dataclasses.replace(pr, float32_pv=True)
        elif pr.q.dtype != dt:
            second = dataclasses.replace(pr, q=pr.q.to(dt), k=pr.k.to(dt), v=pr.v.to(dt))
        outp = pr.scratch("out", R, n, b, Dp)
        # Kernels of the second pass's dtype: its records. Knobs given are for the
        # kernels of the input dtype; float32 copies take float32's own.
        own = given if second.q.dtype == pr.q.dtype else None
        chosen = knob_policy.knobs_for_shape(own or None, max(N, Nk), D, b, target,
                                             second.q.dtype)
        exact_and_combine(second, saved.index, saved.logits, saved.rowmax, saved.high_mask,
                          pooled[2], full, chosen, outp, pr.scratch("stats", 3, R, n, b))
    else:
        outp = pad(out, Np - N, Dp - D, dt)

    # g = dO mask / Z, D_t = g . out, and their low-resolution block sums.
    g, dsum = pr.scratch("g", R, Np, Dp, dtype=io), torch.empty(R, Np, dtype=dt, device=dev)
    ga, da = torch.empty(R, n, Dp, dtype=dt, device=dev), torch.empty(R, n, dtype=dt, device=dev)
    pr.run("bwd_prep", knobs, dout=dout.view(R, n, b, Dp), out=outp.view(R, n, b, Dp),
           inv_z=inv_z.view(R, n, b), lo_w=lo_w.view(R, n, b), g=g.view(R, n, b, Dp),
           dsum=dsum.view(R, n, b), ga=ga, da=da)

    # High resolution: units by query block (dq) and by key block (dk, dv). Where the
    # target has them (the CPU), the dk/dv units write dS and dq is made from it.
    reuse = kernels.get("bwd_dq_ds_units").on(target.family)
    dq_op, dkdv_op = ("bwd_dq_ds_units", "bwd_dkdv_ds_units") if reuse else \
        ("bwd_dq_units", "bwd_dkdv_units")
    Cq = knob_policy.resolve_knobs(dq_op, knobs.get(dq_op), target=target,
                                   dtype=q.dtype)["blocks_per_unit"]
    Ck = knob_policy.resolve_knobs(dkdv_op, knobs.get(dkdv_op), target=target,
                                   dtype=q.dtype)["blocks_per_unit"]
    ds_at = None
    if reuse and kernels.get("bwd_plan").on(target.family):
        by_query, by_key, ds_at = _unit_plans(pr, knobs, saved.index, n, nk, Cq, Ck)
    else:
        exact = target.exact_plan  # else no host synchronisation (plan.plan_bounds)
        by_query = plan.make_plan(saved.index, n, nk, 0, Cq, exact)
        flipped, order = plan.transposed(saved.index, n, nk)
        by_key = plan.make_plan(flipped, nk, n, 0, Ck, exact)
    Uq, Uk = by_query.unit_row.shape[1], by_key.unit_row.shape[1]
    target.check_launch(n=max(n, nk), U=max(Uq, Uk))
    validate.check_scratch("dq-unit", R, Uq, b, Dp)
    validate.check_scratch("dk/dv-unit", R, Uk, b, Dp)
    dq_unit = pr.scratch("dq_unit", R, Uq, b, Dp)
    dk_unit, dv_unit = pr.scratch("dk_unit", R, Uk, b, Dp), pr.scratch("dv_unit", R, Uk, b, Dp)
    shared = dict(q=pr.q, k=pr.k, v=pr.v, **pr.masks, stab=stab, g=g, dsum=dsum, inv_z=inv_z,
                  heads=pr.heads, group=pr.group, scale=pr.scale)
    if reuse:
        validate.check_scratch("dS", R, Uk * Ck, b, b)
        ds_blocks = pr.scratch("ds_blocks", R, Uk, Ck, b, b)
        pr.run(dkdv_op, knobs, unit_col=by_key.unit_row, unit_rows=by_key.unit_cols,
               dk_unit=dk_unit, dv_unit=dv_unit, ds_blocks=ds_blocks, **shared)
        if ds_at is None:
            ds_at = plan.transposed_slots(saved.index, by_query, Cq, flipped, order, by_key, Ck,
                                          n, nk)
        pr.run(dq_op, knobs, k=pr.k, unit_cols=by_query.unit_cols, ds_at=ds_at,
               ds_blocks=ds_blocks.view(R, Uk * Ck, b, b), dq_unit=dq_unit, group=pr.group)
    else:
        pr.run(dq_op, knobs, unit_row=by_query.unit_row, unit_cols=by_query.unit_cols,
               dq_unit=dq_unit, **shared)
        pr.run(dkdv_op, knobs, unit_col=by_key.unit_row, unit_rows=by_key.unit_cols,
               dk_unit=dk_unit, dv_unit=dv_unit, **shared)

    # Low resolution ("full"): through the block averages; "sparse" has none.
    dqp = torch.zeros(R, n, Dp, dtype=dt, device=dev)
    dkp, dvp = (torch.zeros(R, nk, Dp, dtype=dt, device=dev) for _ in range(2))
    if full:
        assert pooled is not None
        qp, kp, vp = pooled
        pr.run("bwd_lowres", knobs, logits=saved.logits, hmask=saved.high_mask, rowmax=saved.rowmax,
               counts=pr.counts, qp=qp, kp=kp, vp=vp, ga=ga, da=da, dqp=dqp, dkp=dkp, dvp=dvp,
               heads=pr.heads, scale=pr.scale)

    # Grouped-query heads: a key/value head's gradient sums over the query heads sharing
    # it. bwd_finish sums their unit partials (its grouped variant); their block averages'
    # gradients (n x D a row) are summed here.
    Rk = R // pr.group
    if pr.group > 1:
        dkp, dvp = (x.view(Rk, pr.group, nk, Dp).sum(1) for x in (dkp, dvp))
    # Three separate tensors: a custom op's outputs may not alias one another. In q's
    # dtype where bwd_finish writes that (bf16 with the micro-kernels: ``Kernel.writes_io``),
    # else in the compute dtype, rounded by a copy below.
    grad_dtype = pr.q.dtype if "io" in pr.static("bwd_finish") else dt
    grads = [pr.result(rows, blocks, b, Dp, dtype=grad_dtype)
             for rows, blocks in ((R, n), (Rk, nk), (Rk, nk))]
    pr.run("bwd_finish", knobs, dq_unit=dq_unit, q_start=by_query.ov_start, q_units=by_query.ov_units,
           dk_unit=dk_unit, dv_unit=dv_unit, k_start=by_key.ov_start, k_units=by_key.ov_units,
           dqp=dqp, dkp=dkp, dvp=dvp, inv_counts=pr.inv_counts,
           q_inv_counts=pr.q_inv_counts, **pr.masks, dq=grads[0], dk=grads[1], dv=grads[2],
           heads=pr.heads, group=pr.group, ucap_q=by_query.ucap, ucap_k=by_key.ucap)
    grads = [gr.view(B, -1, blocks * b, Dp)[:, :, :length, :D]
             for gr, blocks, length in zip(grads, (n, nk, nk), (N, Nk, Nk))]
    return tuple(gr if gr.dtype == x.dtype and gr.is_contiguous()
                 else pr.result(*gr.shape, dtype=x.dtype).copy_(gr)
                 for gr, x in zip(grads, (q, k, v)))


def _unit_plans(pr: Prepared, knobs: dict, index, n: int, nk: int, Cq: int, Ck: int):
    """(by_query, by_key, ds_at): ``plan.make_plan(index, n, nk, 0, Cq)``, the plan of the
    same blocks by key block (``make_plan`` of ``plan.transposed(index, n, nk)``'s, ``Ck``)
    and ``plan.transposed_slots`` of the two, from one ``bwd_plan`` kernel (``plan_tir``:
    the same arrays, where the host's numpy and torch steps took ~1.8 ms a backward at
    N = 4096, B*H = 12). Its unit arrays have room for ``plan.plan_bounds``' counts; the
    kernels get them trimmed to the rows' most, as ``make_plan`` makes them."""
    R, K = index.shape
    rooms = {"q": plan.plan_bounds(K, n, nk, 0, Cq)[0], "k": plan.plan_bounds(K, nk, n, 0, Ck)[0]}
    shapes = dict(q_start=(R, n), q_units=(R, n), q_row=(R, rooms["q"]),
                  q_cols=(R, rooms["q"], Cq), k_start=(R, nk), k_units=(R, nk),
                  k_col=(R, rooms["k"]), k_rows=(R, rooms["k"], Ck),
                  ds_at=(R, rooms["q"], Cq), k_seen=(R, nk), units=(R, 4))
    out: dict[str, Any] = {name: pr.scratch(f"bwd_plan_{name}", *shape, dtype=torch.int32)
                           for name, shape in shapes.items()}
    pr.run("bwd_plan", knobs, index=index, **out)
    q_total, q_most, k_total, k_most = out["units"].amax(0).tolist() if R else (0, 0, 0, 0)

    def made(side: str, total: int, most: int, row: str, cols: str) -> plan.Plan:
        U = max(total, 1)
        blocks = n if side == "q" else nk
        return plan.Plan(torch.empty(R, blocks, 0, dtype=torch.int32),
                         out[row][:, :U].contiguous(), out[cols][:, :U].contiguous(),
                         out[f"{side}_start"], out[f"{side}_units"], max(most, 1),
                         overflow=total > 0)

    by_query = made("q", q_total, q_most, "q_row", "q_cols")
    return (by_query, made("k", k_total, k_most, "k_col", "k_rows"),
            out["ds_at"][:, :by_query.unit_row.shape[1]].contiguous())
