"""Argument checks for torch.ops.mra.attention's tensors (the other options:
``mra_compile.options``).

Every bad input becomes a TypeError or ValueError naming the argument: the kernels
do not bounds-check, so nothing unchecked may reach them.
"""
from __future__ import annotations

import math

import torch

from mra_compile import kernels, targets

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


INT64_MAX = 2**63 - 1  # the op's int arguments are int64 in its schema


def check_int(name: str, value, minimum: int, maximum: int = INT64_MAX):
    # torch.SymInt: a size-derived argument under torch.compile(dynamic=True).
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if isinstance(value, int) and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_scale(value) -> None:
    """The logit scale: a positive finite real number (int or float, not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a positive finite float, got {value}")


def check_tensors(q, k, v, mask, enable_gqa: bool = False) -> None:
    """Types, ranks, shapes, dtypes and devices (no data access: fake-safe). With
    ``enable_gqa``, k and v may have ``Hkv`` heads, a divisor of q's ``H``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D] (4 dims), got {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dim() == 4 and x.shape[2] != q.shape[2]:
            raise ValueError(
                f"{name} must have q's length N = {q.shape[2]}, got shape {tuple(x.shape)}: "
                "cross-attention (a key length other than the query length) is not "
                "supported yet")
        if enable_gqa and x.shape[1] and q.shape[1] % x.shape[1] == 0 and (
                x.shape[:1] + x.shape[2:] == q.shape[:1] + q.shape[2:]) and x.shape == k.shape:
            pass  # grouped-query heads: Hkv divides H
        elif enable_gqa:
            raise ValueError(
                f"{name} must have shape [B, Hkv, N, D] with Hkv dividing q's H (q "
                f"{tuple(q.shape)}), the shape of k, got {tuple(x.shape)}")
        elif x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)} "
                             "(fewer key/value heads: enable_gqa=True)")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    B, H, N, D = q.shape
    if N == 0:
        raise ValueError("q: the sequence length N must be >= 1")
    if D == 0:
        raise ValueError("q: the head dim D must be >= 1")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        check_mask_shape(mask, B, N)
        if mask.is_complex():
            raise TypeError(f"mask must be real (bool, integer or float), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on the device of q ({q.device}), got {mask.device}")


def check_mask_shape(mask, B: int, N: int) -> None:
    """A key padding mask: ``[B, N]`` (1 real / 0 padding) or SDPA's ``[B, 1, 1, N]``
    (bool: True = take part; float: additive, 0 / -inf). Any other 4-d shape would mask
    per query (or per head): not key padding, which is all MRA-2's selection can express."""
    if mask.dim() == 4:
        if mask.shape[0] == B and mask.shape[-1] == N and (mask.shape[1] != 1 or mask.shape[2] != 1):
            raise ValueError(
                f"mask: a [B, H, Nq, Nk] = {list(mask.shape)} mask is a per-query (or per-head) "
                "pattern, not key padding; MRA-2 takes key padding only: [B, Nk] or "
                f"[B, 1, 1, Nk] = [{B}, 1, 1, {N}]")
        if tuple(mask.shape) == (B, 1, 1, N):
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError("mask: a [B, 1, 1, Nk] mask must be bool (True = take part) or "
                                f"additive float (0 / -inf), got {mask.dtype}")
            return
    elif mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] == N:
        return
    raise ValueError(f"mask must have shape [B, Nk] = [{B}, {N}] or [B, 1, 1, Nk] = "
                     f"[{B}, 1, 1, {N}], got {tuple(mask.shape)}")


INDEX_LIMIT = 2**31  # the kernels index with 32-bit integers


def check_sizes(q, block_size: int) -> None:
    """Shapes the kernels' 32-bit indexing can address (fake-safe: shapes only)."""
    B, H, N, D = q.shape
    n = -(-N // block_size)
    Dp = -(-D // kernels.HEAD_DIM_MULTIPLE) * kernels.HEAD_DIM_MULTIPLE
    rows = B * H
    if rows * n * block_size * Dp >= INDEX_LIMIT:
        raise ValueError(
            f"q: B*H*N*D = {rows}*{n * block_size}*{Dp} (N, D padded) must stay below 2**31 "
            "elements, the kernels' 32-bit indexing; split the batch")
    if rows * n * n >= INDEX_LIMIT:
        raise ValueError(
            f"q: B*H*n*n = {rows}*{n}*{n} low-resolution logits (n = N / block_size) must stay "
            "below 2**31; use a larger block_size or split the batch")


class ScratchOverflow(ValueError):
    """A call's per-unit scratch is beyond the kernels' 32-bit indexing. The forward and
    backward catch it and run the batch (then the heads) in parts; it reaches the user
    only when one (batch, head) row alone is too large."""


SCRATCH_LIMIT = INDEX_LIMIT  # its own name: tests lower it to exercise the split


def check_scratch(name: str, *shape: int) -> None:
    """A scratch tensor of ``shape`` must stay within the kernels' 32-bit indexing
    (checked before it is allocated)."""
    numel = 1
    for extent in shape:
        numel *= int(extent)
    if numel >= SCRATCH_LIMIT:
        dims = " x ".join(str(int(e)) for e in shape)
        raise ScratchOverflow(
            f"num_blocks: this call needs a {name} buffer of {dims} = {numel} elements, more "
            "than the kernels' 32-bit indexing allows (2**31) even for one (batch, head) "
            "row; use fewer blocks (num_blocks / block_per_row) or a larger block_size")


def check_mask_values(mask) -> None:
    """Mask entries must be 0 or 1, or 0 or -inf for an additive ``[B, 1, 1, N]`` mask
    (reads the data: real implementation only)."""
    if mask is not None and mask.numel():
        if mask.dtype == torch.bool:
            return
        if mask.dim() == 4:
            ok = (mask == 0) | (mask == float("-inf"))
            if not bool(ok.all()):
                bad = mask[~ok].flatten()[0].item()
                raise ValueError("mask: an additive [B, 1, 1, Nk] float mask must hold only 0 "
                                 f"(take part) and -inf (padding), found {bad}")
            return
        ok = (mask == 0) | (mask == 1)
        if not bool(ok.all()):
            bad = mask[~ok].flatten()[0].item()
            raise ValueError(f"mask must contain only 0 (padding) and 1 (real token), found {bad}")


def check_device(q) -> None:
    targets.check_device(q.device, "q")
