"""The MRA-2 forward pass on the CPU: plan in torch, compute in the TVM kernels.

Inputs are validated by the caller (``mra_compile.validate``). Computation is in
float32; float16/bfloat16 inputs are upcast and the result cast back.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

from mra_compile import build, plan

HEAD_DIM_MULTIPLE = 16  # kernels are compiled for head dims padded to this (one AVX-512 vector)


class _Workspace(threading.local):
    """Per-thread scratch buffers for the intermediates, reused between calls.

    A fresh 50 MB intermediate costs ~10 ms of page faults on first touch, as much as
    the kernel that fills it; reusing the memory removes that. ``clear_workspace()``
    frees it.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


@contextlib.contextmanager
def _torch_single_threaded():
    """Run the plan's small torch ops on the calling thread only.

    Torch's OpenMP workers spin for a while after each parallel op; TVM's kernels that
    follow then share the cores with spinning threads (measured: the next kernel 1.5-3x
    slower on 2 cores). The plan's ops are small (n*n per row), so one thread loses
    little, and TVM's own pool (sized from torch's thread count) runs the kernels.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clear_workspace() -> None:
    """Free this thread's scratch buffers."""
    _WORKSPACE.buffers.clear()


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


def _pool_and_select(q, k, v, mask, num_blocks, full, block_size, first_n, diagonal_n, knobs):
    """Steps 1-3; returns the padded inputs, the low-resolution tensors and the selection."""
    b = block_size
    qf, kf, vf, maskf, counts, inv_counts, heads = prepare(q, k, v, mask, b)
    R, Np, Dp = qf.shape
    n = Np // b
    scale = 1.0 / math.sqrt(q.shape[-1])
    ws = _WORKSPACE.get
    qp, kp, vp = ws("qp", R, n, Dp), ws("kp", R, n, Dp), ws("vp", R, n, Dp)
    logits, rowmax = ws("logits", R, n, n), ws("rowmax", R, n)
    build.kernel("pool_and_logits", knobs.get("pool_and_logits"), b=b, D=Dp)(
        qf, kf, vf, maskf, counts, inv_counts, qp, kp, vp, logits, rowmax, heads, scale
    )
    sel = plan.select_blocks(
        logits, rowmax, num_blocks=num_blocks, full=full, first_n=first_n, diagonal_n=diagonal_n
    )
    return dict(qf=qf, kf=kf, vf=vf, maskf=maskf, counts=counts, heads=heads, scale=scale,
                vp=vp, logits=logits, rowmax=rowmax, sel=sel)


def block_selection(q, k, v, mask, num_blocks, approx_mode="full", block_size=32, first_n=0,
                    diagonal_n=0):
    """The blocks the op computes exactly, for tests and inspection.

    Returns ``(selected, high_mask)``, bool ``[B, H, n, n]``: T of spec step 3 and, in
    "full" mode, Hmask (equal to ``selected`` in "sparse" mode). Same computation and
    tie-breaking as ``torch.ops.mra.attention`` on the same inputs.
    """
    B, H = q.shape[:2]
    st = _pool_and_select(q, k, v, mask, num_blocks, approx_mode == "full", block_size,
                          first_n, diagonal_n, {})
    n = st["logits"].shape[-1]
    selected = torch.zeros(B * H, n * n, dtype=torch.bool)
    selected.scatter_(1, st["sel"].index, True)
    selected = selected.view(B, H, n, n)
    hm = st["sel"].high_mask
    high_mask = selected.clone() if hm is None else hm.bool().view(B, H, n, n)
    return selected, high_mask


def mra_forward(
    q, k, v, mask, num_blocks: int, approx_mode: str, block_size: int, first_n: int, diagonal_n: int,
    knobs: dict | None = None,
):
    """MRA-2 of spec steps 1-6. q, k, v [B, H, N, D]; mask [B, N] or None -> [B, H, N, D]."""
    B, H, N, D = q.shape
    out_dtype = q.dtype
    if B * H == 0:
        return q.new_zeros(q.shape)
    build.ensure_runtime()  # sizes TVM's pool from torch's threads before they change
    with _torch_single_threaded():
        return _forward(q, k, v, mask, num_blocks, approx_mode, block_size, first_n, diagonal_n,
                        knobs or {})


def _forward(q, k, v, mask, num_blocks, approx_mode, block_size, first_n, diagonal_n, knobs):
    B, H, N, D = q.shape
    out_dtype = q.dtype
    b = block_size
    full = approx_mode == "full"
    st = _pool_and_select(q, k, v, mask, num_blocks, full, b, first_n, diagonal_n, knobs)
    qf, kf, vf, maskf, heads, scale = (st[x] for x in ("qf", "kf", "vf", "maskf", "heads", "scale"))
    R, Np, Dp = qf.shape
    n = Np // b
    ws = _WORKSPACE.get

    def run(op, *args, **static):
        return build.kernel(op, knobs.get(op), b=b, D=Dp, **static)(*args)

    Cr = build.resolve_knobs("hires_rows", knobs.get("hires_rows"))["blocks_per_row"]
    Co = build.resolve_knobs("hires_units", knobs.get("hires_units"))["blocks_per_unit"]
    p = plan.make_plan(st["sel"].index, n, Cr, Co)
    U = p.unit_row.shape[1]

    # Step 4 for the blocks beyond each row's own Cr: overflow units.
    ov_max, ov_sum = ws("unit_max", R, U, b), ws("unit_sum", R, U, b)
    ov_out = ws("unit_out", R, U, b, Dp)
    if p.has_overflow:
        run("hires_units", qf, kf, vf, maskf, p.unit_row, p.unit_cols, ov_max, ov_out, ov_sum,
            heads, scale)

    # Step 4 for each row's own blocks, merged with its overflow units; steps 5 and 6.
    out = torch.empty(R, n, b, Dp)
    args = [qf, kf, vf, maskf, p.row_cols, ov_max, ov_out, ov_sum, p.ov_start, p.ov_units]
    if full:
        o_lo, z_lo = ws("o_lo", R, n, Dp), ws("z_lo", R, n)
        run("lowres_out", st["logits"], st["rowmax"], st["sel"].high_mask, st["counts"], st["vp"],
            o_lo, z_lo, heads)
        args += [o_lo, z_lo, st["rowmax"]]
    run("hires_rows", *args, out, heads, scale, p.ucap, full=full)
    out = out.view(B, H, Np, Dp)[:, :, :N, :D]
    return out.to(out_dtype) if out_dtype != torch.float32 else out.contiguous()
