"""MRA-2 full mode as a GPU user would write it without mra-compile's kernels.

The peer the CUDA op is timed against (issue 15): the exact (high-resolution) blocks run
in FlexAttention on a BlockMask made from the op's own block selection
(``mra_compile.block_selection``), the coarse (low-resolution) part is plain torch on
block averages, and the two are merged in log space through their log-sum-exps.
docs/spec.md, steps 1-6, in "full" mode; it matches ``mra_compile.mra_attention(...,
approx_mode="full")`` up to the spec's ``+1e-6`` in the final denominator, which this
merge leaves out (a relative change below 1e-6 of the output wherever the stabilised
denominator is at least 1).

    from bench.flex_mra import flex_mra
    out = flex_mra(q, k, v, mask, num_blocks=8 * n, flex=torch.compile(flex_attention))

Importable without a GPU; FlexAttention runs eager on the CPU (slow, dense) when it is
not given a compiled one.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # torch >= 2.9: the LSE through return_aux; return_lse is deprecated there.
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover  (older torch)
    AuxRequest = None


def kv_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count [B, H, m] int32, indices [B, H, m, m] int32) of a bool block matrix
    [B, H, m, m], each row's True columns first: BlockMask's layout."""
    order = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()


def selection_block_mask(selected: torch.Tensor, real: torch.Tensor | None,
                         block_size: int) -> BlockMask:
    """A BlockMask of exactly the ``block_size`` blocks in ``selected`` [B, H, n, n].

    ``real`` [B, n * block_size] bool marks real keys (None: all real). Without it the
    selected blocks are full blocks (no per-token work in compiled kernels); with it they
    are partial blocks whose mask_mod drops padding keys. The mask_mod also carries the
    block lookup because eager flex_attention evaluates it everywhere and ignores the
    block lists.
    """
    B, H, n, _ = selected.shape
    N = n * block_size
    count, order = kv_lists(selected)
    none = torch.zeros_like(count)
    if real is None:
        def in_block(b, h, q_idx, kv_idx):
            return selected[b, h, q_idx // block_size, kv_idx // block_size]

        return BlockMask.from_kv_blocks(none, order.clone(), count, order, BLOCK_SIZE=block_size,
                                        mask_mod=in_block, seq_lengths=(N, N))

    def in_block_real(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx // block_size, kv_idx // block_size] & real[b, kv_idx]

    return BlockMask.from_kv_blocks(count, order, none, order.clone(), BLOCK_SIZE=block_size,
                                    mask_mod=in_block_real, seq_lengths=(N, N))


def flex_with_lse(flex: Callable, q, k, v, block_mask: BlockMask, kernel_options):
    """(out, lse) of FlexAttention; lse in natural log, -inf for a query with no key."""
    if AuxRequest is not None:
        out, aux = flex(q, k, v, block_mask=block_mask, kernel_options=kernel_options,
                        return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return flex(q, k, v, block_mask=block_mask, kernel_options=kernel_options, return_lse=True)


def coarse_part(q, k, v, real: torch.Tensor | None, high_mask: torch.Tensor, block_size: int):
    """The low-resolution part of docs/spec.md steps 2 and 5, per query block, in float32.

    q, k, v [B, H, Np, D] with padding already zero; real [B, Np] bool or None;
    high_mask [B, H, n, n]. Returns (out_lo [B, H, n, D], lse_lo [B, H, n]): the
    normalised coarse output and log Σ_j W[i, j] (with W's stabiliser R added back;
    -inf where no block is left).
    """
    B, H, Np, D = q.shape
    n = Np // block_size
    blocks = [x.float().view(B, H, n, block_size, D) for x in (q, k, v)]
    if real is None:
        counts = torch.full((1, 1, n), float(block_size), device=q.device)
        q_hat, k_hat, v_hat = (x.mean(3) for x in blocks)
    else:
        counts = real.float().view(B, 1, n, block_size).sum(-1)
        # The spec's pooling: the sum over the block divided by (c_i + 1e-6).
        q_hat, k_hat, v_hat = (x.sum(3) / (counts[..., None] + 1e-6) for x in blocks)
    L = (q_hat @ k_hat.transpose(-1, -2)) / math.sqrt(D)  # [B, H, n, n]
    has_key = (counts > 0)[..., None, :]  # [B, 1, 1, n]
    # R (spec step 2) is a constant for gradients: the max over non-empty key blocks.
    R = L.detach().masked_fill(~has_key, -math.inf).amax(-1)
    R = torch.where(torch.isinf(R), torch.zeros_like(R), R)
    # log W = L - R + log c_j, over the blocks neither in Hmask nor empty.
    keep = has_key & ~high_mask
    log_w = (L - R[..., None] + counts.clamp_min(1).log()[..., None, :]).masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(log_w, -1)  # -inf where nothing is kept
    probs = torch.exp(log_w - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probs @ v_hat, lse + R


def merge_in_log_space(out_hi, lse_hi, out_lo, lse_lo):
    """(out_hi Z_hi + out_lo Z_lo) / (Z_hi + Z_lo) with Z = exp(lse), float32; zero where
    both parts are empty."""
    top = torch.maximum(lse_hi, lse_lo)
    top = torch.where(torch.isinf(top), 0.0, top)  # both -inf: both weights become 0
    w_hi, w_lo = torch.exp(lse_hi - top), torch.exp(lse_lo - top)
    total = (w_hi + w_lo).clamp_min(torch.finfo(torch.float32).tiny)
    return (w_hi[..., None] * out_hi.float() + w_lo[..., None] * out_lo) / total[..., None]


def flex_mra(q, k, v, mask=None, *, num_blocks: int | None = None,
             selection: tuple[torch.Tensor, torch.Tensor] | None = None,
             flex: Callable = flex_attention, kernel_options: dict | None = None,
             block_size: int = 32) -> torch.Tensor:
    """MRA-2 full mode of q, k, v [B, H, N, D] with mask [B, N] (1 real, 0 padding) or None.

    selection: (selected, high_mask) bool [B, H, n, n] as ``mra_compile.block_selection``
        returns them; computed by it from ``num_blocks`` when not given.
    flex: flex_attention, usually ``torch.compile(flex_attention)``.
    kernel_options: passed to flex (compiled kernels need BLOCK_M/BLOCK_N dividing
        ``block_size``). Differentiable in q, k, v (the selection is a constant).
    """
    if selection is None:
        if num_blocks is None:
            raise ValueError("num_blocks: give num_blocks or selection")
        import mra_compile  # the op's selection, so that both compute the same blocks

        selection = mra_compile.block_selection(q, k, v, mask, num_blocks=num_blocks,
                                                approx_mode="full", block_size=block_size)
    selected, high_mask = (s.to(q.device, torch.bool) for s in selection)
    B, H, N, D = q.shape
    pad = (-N) % block_size
    real = None
    if mask is not None or pad:
        real = torch.ones(B, N, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        real = F.pad(real, (0, pad), value=False)
        # Step 1: padding becomes zero by selection, so NaN or inf there stays inert.
        q, k, v = (torch.where(real[:, None, :, None], F.pad(x, (0, 0, 0, pad)), 0.0)
                   for x in (q, k, v))
    out_hi, lse_hi = flex_with_lse(flex, q, k, v, selection_block_mask(selected, real, block_size),
                                   kernel_options)
    out_lo, lse_lo = coarse_part(q, k, v, real, high_mask, block_size)
    # Each query block's coarse result serves its block_size tokens.
    out_lo, lse_lo = (x.repeat_interleave(block_size, dim=2) for x in (out_lo, lse_lo))
    out = merge_in_log_space(out_hi, lse_hi.float(), out_lo, lse_lo)
    if real is not None:
        out = torch.where(real[:, None, :, None], out, 0.0)  # step 6: padded queries are zero
    return out[:, :, :N].to(q.dtype)
