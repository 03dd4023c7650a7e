"""The MRA-2 backward pass on the CPU: gradients of q, k, v from the saved forward.

Nothing of the forward's selection is recomputed: the selected blocks, the per-token
stabilisers and normalisers (``Saved.stats``) and the low-resolution tensors come from
the forward. Never materialises an N x N matrix: the high-resolution part runs per unit
of C selected blocks, grouped by query block for dq and by key block for dk, dv.
"""
from __future__ import annotations

import torch

from mra_compile import build, plan
from mra_compile.forward import (
    Saved, _WORKSPACE, _on_device, _pad, _torch_single_threaded, check_grid, prepare)


def _transpose_selection(index: torch.Tensor, n: int) -> torch.Tensor:
    """Selected blocks (i, j) as sorted flat ``j * n + i``: grouped by key block."""
    return ((index % n) * n + index // n).sort(dim=1).values


def mra_backward(grad_out, q, k, v, mask, out, saved: Saved, approx_mode: str, block_size: int,
                 knobs: dict | None = None):
    """(dq, dk, dv) [B, H, N, D] in q's dtype, for the upstream gradient ``grad_out``."""
    B, H, N, D = q.shape
    if B * H == 0 or saved is None:
        return tuple(torch.zeros_like(x) for x in (q, k, v))
    build.ensure_runtime()
    with _torch_single_threaded(), _on_device(q.device):
        return _backward(grad_out, q, k, v, mask, out, saved, approx_mode == "full", block_size,
                         knobs or {})


def _backward(grad_out, q, k, v, mask, out, saved, full, b, knobs):
    B, H, N, D = q.shape
    pr = prepare(q, k, v, mask, b, keep_io=True)  # CUDA fp16/bf16: the unit kernels take them
    R, Np, Dp = pr.q.shape
    n = Np // b
    dt, dev = pr.dtype, q.device

    def ws(name, *shape, dtype):
        return _WORKSPACE.get(name, *shape, dtype=dtype, device=dev)

    def run(op, *args):
        return build.kernel(op, knobs.get(op), pr.target, **pr.static_for(op))(*args)

    dout = _pad(grad_out, Np - N, Dp - D, dt)
    outp = _pad(out, Np - N, Dp - D, dt)
    stab, lo_w, inv_z = saved.stats  # [R, Np] each

    # g = dO mask / Z, D_t = g . out, and their low-resolution block sums.
    g, dsum = torch.empty(R, Np, Dp, dtype=dt, device=dev), torch.empty(R, Np, dtype=dt, device=dev)
    ga, da = torch.empty(R, n, Dp, dtype=dt, device=dev), torch.empty(R, n, dtype=dt, device=dev)
    run("bwd_prep", dout.view(R, n, b, Dp), outp.view(R, n, b, Dp), inv_z.view(R, n, b),
        lo_w.view(R, n, b), g.view(R, n, b, Dp), dsum.view(R, n, b), ga, da)

    # High resolution: units by query block (dq) and by key block (dk, dv).
    Cq = build.resolve_knobs("bwd_dq_units", knobs.get("bwd_dq_units"),
                             target=pr.target)["blocks_per_unit"]
    Ck = build.resolve_knobs("bwd_dkdv_units", knobs.get("bwd_dkdv_units"),
                             target=pr.target)["blocks_per_unit"]
    exact = dev.type == "cpu"  # CUDA: no host synchronisation (plan.plan_bounds)
    by_query = plan.make_plan(saved.index, n, 0, Cq, exact)
    by_key = plan.make_plan(_transpose_selection(saved.index, n), n, 0, Ck, exact)
    Uq, Uk = by_query.unit_row.shape[1], by_key.unit_row.shape[1]
    check_grid(dev, n=n, U=max(Uq, Uk))
    dq_unit = ws("dq_unit", R, Uq, b, Dp, dtype=dt)
    dk_unit, dv_unit = ws("dk_unit", R, Uk, b, Dp, dtype=dt), ws("dv_unit", R, Uk, b, Dp, dtype=dt)
    run("bwd_dq_units", pr.q, pr.k, pr.v, pr.mask, by_query.unit_row, by_query.unit_cols,
        stab, g, dsum, dq_unit, pr.heads, pr.scale)
    run("bwd_dkdv_units", pr.q, pr.k, pr.v, pr.mask, by_key.unit_row, by_key.unit_cols,
        stab, g, dsum, dk_unit, dv_unit, pr.heads, pr.scale)

    # Low resolution ("full"): through the block averages; "sparse" has none.
    pooled_grads = torch.zeros(3, R, n, Dp, dtype=dt, device=dev)
    if full:
        qp, kp, vp = saved.pooled
        run("bwd_lowres", saved.logits, saved.high_mask, saved.rowmax, pr.counts, qp, kp, vp,
            ga, da, pooled_grads[0], pooled_grads[1], pooled_grads[2], pr.heads, pr.scale)

    # Three separate tensors: a custom op's outputs may not alias one another.
    grads = [torch.empty(R, n, b, Dp, dtype=dt, device=dev) for _ in range(3)]
    run("bwd_finish", dq_unit, by_query.ov_start, by_query.ov_units, dk_unit, dv_unit,
        by_key.ov_start, by_key.ov_units, pooled_grads[0], pooled_grads[1], pooled_grads[2],
        pr.inv_counts, pr.mask, *grads, pr.heads, by_query.ucap, by_key.ucap)
    grads = [gr.view(B, H, Np, Dp)[:, :, :N, :D] for gr in grads]
    return tuple(gr.to(x.dtype) if x.dtype != dt else gr.contiguous()
                 for gr, x in zip(grads, (q, k, v)))
