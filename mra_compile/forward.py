"""The MRA-2 forward pass on the CPU: plan in torch, compute in the TVM kernels.

Inputs are validated by the caller (``mra_compile.validate``). Computation is in
float32; float16/bfloat16 inputs are upcast and the result cast back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mra_compile import build, plan

HEAD_DIM_MULTIPLE = 16  # kernels are compiled for head dims padded to this (one AVX-512 vector)


def _pad(x: torch.Tensor, n_pad: int, d_pad: int) -> torch.Tensor:
    """[B, H, N, D] -> contiguous float32 [B*H, N + n_pad, D + d_pad], zero padded."""
    x = x.to(torch.float32)
    if n_pad or d_pad:
        x = F.pad(x, (0, d_pad, 0, n_pad))
    B, H, N, D = x.shape
    return x.reshape(B * H, N, D).contiguous()


def prepare(q, k, v, mask, block_size: int):
    """Pad to whole blocks and build the mask tensors the kernels read.

    Returns (q, k, v [R, Np, Dp], maskf [Bm, Np], counts, inv_counts [Bm, n], heads)
    where row r of q uses mask row r // heads.
    """
    B, H, N, D = q.shape
    b = block_size
    Np = -(-N // b) * b
    Dp = -(-D // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    n = Np // b
    qf, kf, vf = (_pad(x, Np - N, Dp - D) for x in (q, k, v))
    if mask is None and Np == N:
        # No mask: one shared row of ones; block means divide by b (spec step 2).
        maskf = torch.ones(1, Np)
        counts = torch.full((1, n), float(b))
        inv_counts = torch.full((1, n), 1.0 / b)
        heads = B * H
    else:
        # A given mask, or the padding of a partial last block, which the spec
        # treats as masked tokens.
        real = torch.ones(B, N) if mask is None else mask.to(torch.float32)
        maskf = F.pad(real, (0, Np - N)).contiguous()
        counts = maskf.view(B, n, b).sum(-1)
        inv_counts = 1.0 / (counts + 1e-6)
        heads = H
    return qf, kf, vf, maskf, counts.contiguous(), inv_counts.contiguous(), heads


def mra_forward(
    q, k, v, mask, num_blocks: int, approx_mode: str, block_size: int, first_n: int, diagonal_n: int,
    knobs: dict | None = None,
):
    """MRA-2 of spec steps 1-6. q, k, v [B, H, N, D]; mask [B, N] or None -> [B, H, N, D]."""
    B, H, N, D = q.shape
    out_dtype = q.dtype
    if B * H == 0:
        return q.new_zeros(q.shape)
    b = block_size
    full = approx_mode == "full"
    knobs = knobs or {}
    qf, kf, vf, maskf, counts, inv_counts, heads = prepare(q, k, v, mask, b)
    R, Np, Dp = qf.shape
    n = Np // b
    scale = 1.0 / math.sqrt(D)

    def run(op, *args, **static):
        return build.kernel(op, knobs.get(op), b=b, D=Dp, **static)(*args)

    # Step 2: block averages, low-resolution logits and their row maxima.
    qp, kp, vp = (torch.empty(R, n, Dp) for _ in range(3))
    logits, rowmax = torch.empty(R, n, n), torch.empty(R, n)
    run("pool_and_logits", qf, kf, vf, maskf, counts, inv_counts, qp, kp, vp, logits, rowmax, heads, scale)

    # Step 3: which blocks are computed exactly.
    sel = plan.select_blocks(
        logits, rowmax, num_blocks=num_blocks, full=full, first_n=first_n, diagonal_n=diagonal_n
    )
    C = build.resolve_knobs("hires_units", knobs.get("hires_units"))["blocks_per_unit"]
    units = plan.make_units(sel.index, n, C)
    U = units.unit_row.shape[1]

    # Step 4: the selected blocks, unit by unit.
    unit_max, unit_sum = torch.empty(R, U, b), torch.empty(R, U, b)
    unit_out = torch.empty(R, U, b, Dp)
    run("hires_units", qf, kf, vf, maskf, units.unit_row, units.unit_cols,
        unit_max, unit_out, unit_sum, heads, scale)

    # Step 5 and 6.
    out = torch.empty(R, n, b, Dp)
    args = [unit_max, unit_out, unit_sum, units.row_start, units.row_units, maskf]
    if full:
        o_lo, z_lo = torch.empty(R, n, Dp), torch.empty(R, n)
        run("lowres_out", logits, rowmax, sel.high_mask, counts, vp, o_lo, z_lo, heads)
        args += [o_lo, z_lo, rowmax]
    run("combine", *args, out, heads, units.ucap, full=full)
    out = out.view(B, H, Np, Dp)[:, :, :N, :D]
    return out.to(out_dtype) if out_dtype != torch.float32 else out.contiguous()
