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


def check_tensors(q, k, v, mask, enable_gqa: bool = False, query_mask=None) -> None:
    """Types, ranks, shapes, dtypes and devices (no data access: fake-safe). With
    ``enable_gqa``, k and v may have ``Hkv`` heads, a divisor of q's ``H``; k and v may
    have their own length ``Nk`` (cross-attention), ``mask`` is then the keys' [B, Nk]
    and ``query_mask`` the queries' [B, Nq]."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D] (4 dims), got {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]  # the key length (cross-attention when it is not Nq)
    for name, x in (("k", k), ("v", v)):
        if enable_gqa and x.shape[1] and H % x.shape[1] == 0 and (
                x.shape[0] == B and x.shape[3] == D) and x.shape == k.shape:
            pass  # grouped-query heads: Hkv divides H
        elif enable_gqa:
            raise ValueError(
                f"{name} must have shape [B, Hkv, Nk, D] with Hkv dividing q's H (q "
                f"{tuple(q.shape)}), the shape of k, got {tuple(x.shape)}")
        elif x.shape != (B, H, Nk, D):
            raise ValueError(
                f"{name} must have shape [B, H, Nk, D] = [{B}, {H}, Nk, {D}] (q's batch, heads "
                f"and head dim; the key length Nk may differ from q's), the shape of k, got "
                f"{tuple(x.shape)} (fewer key/value heads: enable_gqa=True)")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    if Nq == 0:
        raise ValueError("q: the sequence length N must be >= 1")
    if Nk == 0:
        raise ValueError("k: the key length Nk must be >= 1")
    if D == 0:
        raise ValueError("q: the head dim D must be >= 1")
    for name, m in (("mask", mask), ("query_mask", query_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
        if name == "mask":
            check_mask_shape(m, B, Nk)
        elif tuple(m.shape) != (B, Nq):
            raise ValueError(f"query_mask must have shape [B, Nq] = [{B}, {Nq}] (1 real query, "
                             f"0 padding), got {tuple(m.shape)}")
        if m.is_complex():
            raise TypeError(f"{name} must be real (bool, integer or float), got {m.dtype}")
        if m.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {m.device}")


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


def check_sizes(q, block_size: int, Nk: int) -> None:
    """Shapes the kernels' 32-bit indexing can address (fake-safe: shapes only). ``Nk``:
    the key length (each side padded to whole blocks of its own)."""
    B, H, N, D = q.shape
    n, nk = -(-N // block_size), -(-Nk // block_size)
    longest = torch.sym_max(n, nk)  # (SymInts: no guard)
    Dp = -(-D // kernels.HEAD_DIM_MULTIPLE) * kernels.HEAD_DIM_MULTIPLE
    rows = B * H
    if rows * longest * block_size * Dp >= INDEX_LIMIT:
        raise ValueError(
            f"q: B*H*N*D = {rows}*{longest * block_size}*{Dp} (the longer of N and Nk, N and D "
            "padded) must stay below 2**31 elements, the kernels' 32-bit indexing; split "
            "the batch")
    if rows * n * nk >= INDEX_LIMIT:
        raise ValueError(
            f"q: B*H*nq*nk = {rows}*{n}*{nk} low-resolution logits (nq = N / block_size, "
            "nk = Nk / block_size) must stay below 2**31; use a larger block_size or split "
            "the batch")


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


def check_mask_values(mask, name: str = "mask") -> None:
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
            raise ValueError(f"{name} must contain only 0 (padding) and 1 (real token), found {bad}")


def check_device(q) -> None:
    targets.check_device(q.device, "q")
