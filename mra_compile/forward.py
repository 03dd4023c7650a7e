"""The MRA-2 forward pass on the CPU: plan in torch, compute in the TVM kernels.

Inputs are validated by the caller (``mra_compile.validate``). Computation is in
float32, or in float64 for float64 inputs. On the CPU float16/bfloat16 inputs are upcast
and the result cast back; on CUDA the kernels that read q, k, v take them as they are
(fp16/bf16 tensor-core operands, fp32 sums) and the forward writes the output in their
dtype.
Tensors live on the inputs' device; CUDA kernels run on torch's current stream there.

Stages: ``prepare`` (pad, mask tensors) -> ``pool_and_logits`` kernel -> block selection
(``plan.select_blocks``) -> ``plan.make_plan`` -> ``hires_units`` kernel (overflow) ->
``lowres_out`` kernel ("full") -> ``hires_rows`` kernel (output and saved statistics).
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

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

    def get(self, name: str, *shape: int, dtype=torch.float32, device=None) -> torch.Tensor:
        numel = math.prod(shape)
        device = torch.device("cpu") if device is None else device
        if device.type != "cpu":
            # A CUDA tensor reused across calls could still be read by a kernel queued
            # on another stream: fresh memory from torch's caching allocator is cheap.
            return torch.empty(shape, dtype=dtype, device=device)
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels run in float32, or float64 for float64 inputs (tests, gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_io_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype q, k, v have in the kernels: fp16/bf16 stay so on CUDA."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return compute_dtype(dtype)


def _static(dtype: torch.dtype) -> dict:
    # float32 kernels keep their historical cache keys (no dtype entry).
    return {"dtype": "float64"} if dtype == torch.float64 else {}


_TVM_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

# The kernels that read q, k, v: on CUDA they take fp16/bf16 as they are; every other
# kernel computes in float32.
IO_OPS = ("pool_and_logits", "hires_units", "hires_rows", "bwd_dq_units", "bwd_dkdv_units")


def _pad(x: torch.Tensor, n_pad: int, d_pad: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, D] -> contiguous [B*H, N + n_pad, D + d_pad] of ``dtype``, zero padded."""
    x = x.to(dtype)
    if n_pad or d_pad:
        x = F.pad(x, (0, d_pad, 0, n_pad))
    B, H, N, D = x.shape
    return x.reshape(B * H, N, D).contiguous()


@dataclass
class Prepared:
    """Inputs as the kernels read them.

    q, k, v [R, Np, Dp]; mask [Bm, Np] (row r of q uses mask row r // heads);
    counts, inv_counts [Bm, n]; scale = 1/sqrt(D) of the real head dim.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor
    inv_counts: torch.Tensor
    heads: int
    scale: float
    block_size: int
    target: str = "llvm"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the mask and every kernel output but ``out``)."""
        return self.mask.dtype

    @property
    def static(self) -> dict:
        return dict(b=self.block_size, D=self.q.shape[-1], **_static(self.dtype))

    def static_for(self, op: str) -> dict:
        """``static`` of kernel ``op``: those of ``IO_OPS`` also carry q's dtype when it is
        narrower than the compute dtype."""
        io = _TVM_DTYPE.get(self.q.dtype) if op in IO_OPS else None
        return {**self.static, "io": io} if io else self.static


def prepare(q, k, v, mask, block_size: int, keep_io: bool = False) -> Prepared:
    """Pad to whole blocks and head dims of a multiple of 16; the mask tensors.

    ``keep_io``: q, k, v keep their dtype where the kernels take it (CUDA fp16/bf16)."""
    B, H, N, D = q.shape
    b = block_size
    Np = -(-N // b) * b
    Dp = -(-D // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    n = Np // b
    dt = compute_dtype(q.dtype)
    dev = q.device
    io = kernel_io_dtype(q.dtype, dev) if keep_io else dt
    qf, kf, vf = (_pad(x, Np - N, Dp - D, io) for x in (q, k, v))
    if mask is None and Np == N:
        # No mask: one shared row of ones; block means divide by b (spec step 2).
        maskf = torch.ones(1, Np, dtype=dt, device=dev)
        counts = torch.full((1, n), float(b), dtype=dt, device=dev)
        inv_counts = torch.full((1, n), 1.0 / b, dtype=dt, device=dev)
        heads = B * H
    else:
        # A given mask, or the padding of a partial last block, which the spec
        # treats as masked tokens.
        real = torch.ones(B, N, dtype=dt, device=dev) if mask is None else mask.to(dt)
        maskf = F.pad(real, (0, Np - N)).contiguous()
        counts = maskf.view(B, n, b).sum(-1)
        inv_counts = 1.0 / (counts + 1e-6)
        heads = H
    from mra_compile import build

    return Prepared(qf, kf, vf, maskf, counts.contiguous(), inv_counts.contiguous(), heads,
                    1.0 / math.sqrt(D), b, build.target_of(dev))


@dataclass
class LowRes:
    """Steps 2-3: pooled [3, R, n, Dp] (q̂, k̂, v̂); logits, rowmax; the selection."""

    pooled: torch.Tensor
    logits: torch.Tensor
    rowmax: torch.Tensor
    sel: plan.Selection


def _pool_and_select(pr: Prepared, num_blocks, full, first_n, diagonal_n, knobs) -> LowRes:
    R, Np, Dp = pr.q.shape
    n = Np // pr.block_size
    dt, dev = pr.dtype, pr.q.device
    # Fresh tensors (small: n x D and n x n per row): the backward keeps them.
    pooled = torch.empty(3, R, n, Dp, dtype=dt, device=dev)
    qp, kp, vp = pooled.unbind(0)
    logits = torch.empty(R, n, n, dtype=dt, device=dev)
    rowmax = torch.empty(R, n, dtype=dt, device=dev)
    build.kernel("pool_and_logits", knobs.get("pool_and_logits"), pr.target,
                 **pr.static_for("pool_and_logits"))(
        pr.q, pr.k, pr.v, pr.mask, pr.counts, pr.inv_counts, qp, kp, vp, logits, rowmax,
        pr.heads, pr.scale,
    )
    sel = plan.select_blocks(
        logits, rowmax, num_blocks=num_blocks, full=full, first_n=first_n, diagonal_n=diagonal_n
    )
    return LowRes(pooled, logits, rowmax, sel)


def block_selection(q, k, v, mask, num_blocks, approx_mode="full", block_size=32, first_n=0,
                    diagonal_n=0):
    """The blocks the op computes exactly, for tests and inspection.

    Returns ``(selected, high_mask)``, bool ``[B, H, n, n]``: T of spec step 3 and, in
    "full" mode, Hmask (equal to ``selected`` in "sparse" mode). Same computation and
    tie-breaking as ``torch.ops.mra.attention`` on the same inputs.
    """
    B, H = q.shape[:2]
    build.ensure_runtime()
    with _torch_single_threaded(), _on_device(q.device):
        pr = prepare(q, k, v, mask, block_size, keep_io=True)
        knobs = build.knobs_for_shape(None, q.shape[2], q.shape[3], block_size, pr.target)
        lr = _pool_and_select(pr, num_blocks, approx_mode == "full", first_n, diagonal_n, knobs)
    n = lr.logits.shape[-1]
    selected = torch.zeros(B * H, n * n, dtype=torch.bool, device=q.device)
    selected.scatter_(1, lr.sel.index, True)
    selected = selected.view(B, H, n, n)
    hm = lr.sel.high_mask
    high_mask = selected.clone() if hm is None else hm.bool().view(B, H, n, n)
    return selected, high_mask


@dataclass
class Saved:
    """What the forward hands to the backward (see ``mra_compile.backward``).

    stats [3, R, Np]: stab, lo_w, inv_z per token; pooled [3, R, n, Dp]: q̂, k̂, v̂;
    logits, high_mask [R, n, n] (high_mask zeros in "sparse" mode); rowmax [R, n];
    index [R, K] int64: the selected blocks, sorted.
    """

    stats: torch.Tensor
    pooled: torch.Tensor
    logits: torch.Tensor
    high_mask: torch.Tensor
    rowmax: torch.Tensor
    index: torch.Tensor


def mra_forward(
    q, k, v, mask, num_blocks: int, approx_mode: str, block_size: int, first_n: int, diagonal_n: int,
    knobs: dict | None = None, save: bool = False,
):
    """MRA-2 of spec steps 1-6. q, k, v [B, H, N, D]; mask [B, N] or None -> [B, H, N, D].

    With ``save=True`` returns ``(out, Saved)`` for the backward.
    """
    B, H, N, D = q.shape
    if B * H == 0:
        out = q.new_zeros(q.shape)
        return (out, None) if save else out
    build.ensure_runtime()  # sizes TVM's pool from torch's threads before they change
    target = build.target_of(q.device)
    with _torch_single_threaded(), _on_device(q.device):
        out, saved = _forward(q, k, v, mask, num_blocks, approx_mode, block_size, first_n,
                              diagonal_n, build.knobs_for_shape(knobs, N, D, block_size, target))
    return (out, saved) if save else out


CUDA_GRID_Y = 65535  # blockIdx.y limit: CUDA kernels put a row's blocks / units there


def check_grid(device, **extents: int) -> None:
    """CUDA kernels launch one thread block per (row, block or unit)."""
    if device.type != "cuda":
        return
    for name, extent in extents.items():
        if extent > CUDA_GRID_Y:
            raise ValueError(
                f"num_blocks/N: {extent} {'blocks per row' if name == 'n' else 'work units per row'}"
                f" exceed the CUDA grid's {CUDA_GRID_Y}; use fewer blocks or a larger block_size")


def _on_device(device):
    """Make ``device`` current for the call: torch's current stream is per device, and
    the kernels launch on the current stream of their tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _forward(q, k, v, mask, num_blocks, approx_mode, block_size, first_n, diagonal_n, knobs):
    B, H, N, D = q.shape
    b = block_size
    full = approx_mode == "full"
    pr = prepare(q, k, v, mask, b, keep_io=True)
    lr = _pool_and_select(pr, num_blocks, full, first_n, diagonal_n, knobs)
    R, Np, Dp = pr.q.shape
    n = Np // b
    dt, dev = pr.dtype, q.device

    def ws(name, *shape, dtype):
        return _WORKSPACE.get(name, *shape, dtype=dtype, device=dev)

    def run(op, *args, **static):
        return build.kernel(op, knobs.get(op), pr.target, **pr.static_for(op), **static)(*args)

    Cr = build.resolve_knobs("hires_rows", knobs.get("hires_rows"),
                             target=pr.target)["blocks_per_row"]
    Co = build.resolve_knobs("hires_units", knobs.get("hires_units"),
                             target=pr.target)["blocks_per_unit"]
    p = plan.make_plan(lr.sel.index, n, Cr, Co, exact=dev.type == "cpu")
    U = p.unit_row.shape[1]
    check_grid(dev, n=n, U=U)

    # Step 4 for the blocks beyond each row's own Cr: overflow units.
    ov_max, ov_sum = ws("unit_max", R, U, b, dtype=dt), ws("unit_sum", R, U, b, dtype=dt)
    ov_out = ws("unit_out", R, U, b, Dp, dtype=dt)
    if p.has_overflow:
        run("hires_units", pr.q, pr.k, pr.v, pr.mask, p.unit_row, p.unit_cols, ov_max, ov_out,
            ov_sum, pr.heads, pr.scale)

    # Step 4 for each row's own blocks, merged with its overflow units; steps 5 and 6.
    out = torch.empty(R, n, b, Dp, dtype=pr.q.dtype, device=dev)
    stats = torch.empty(3, R, n, b, dtype=dt, device=dev)
    args = [pr.q, pr.k, pr.v, pr.mask, p.row_cols, ov_max, ov_out, ov_sum, p.ov_start, p.ov_units]
    if full:
        o_lo, z_lo = ws("o_lo", R, n, Dp, dtype=dt), ws("z_lo", R, n, dtype=dt)
        run("lowres_out", lr.logits, lr.rowmax, lr.sel.high_mask.to(dt), pr.counts, lr.pooled[2],
            o_lo, z_lo, pr.heads)
        args += [o_lo, z_lo, lr.rowmax]
    run("hires_rows", *args, out, stats[0], stats[1], stats[2], pr.heads, pr.scale, p.ucap,
        full=full)
    out = out.view(B, H, Np, Dp)[:, :, :N, :D]
    out = out.to(q.dtype) if q.dtype != out.dtype else out.contiguous()
    high_mask = lr.sel.high_mask if full else torch.zeros(R, n, n, dtype=dt, device=dev)
    saved = Saved(stats.view(3, R, Np), lr.pooled, lr.logits,
                  high_mask.to(dt), lr.rowmax, lr.sel.index)
    return out, saved
