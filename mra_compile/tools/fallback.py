"""MRA-2 in plain PyTorch, in the sparse style of the original authors' fallback.

This is the speed baseline the compiled kernels must beat (``mra-compile bench``). It
computes the same function as mra_compile.reference.mra2_reference (docs/spec.md, steps
1-6) but never builds an N x N matrix: the low resolution is a dense n x n matrix on
pooled blocks, and the high resolution gathers only the selected query/key/value blocks
into [R, K, b, D] tensors (R = B*H rows, K selected blocks per row), multiplies them with
batched matmuls and scatters the block results back to tokens with index_add.

Works in float32 (the benchmark) and float64 (checked against the reference).
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["mra2_fallback"]


def _gather_blocks(x_blocks, block_idx):
    """Pick blocks per row: x_blocks [R, n, ...], block_idx [R, K] -> [R, K, ...]."""
    rows = torch.arange(x_blocks.shape[0], device=x_blocks.device)[:, None]
    return x_blocks[rows, block_idx]


def mra2_fallback(q, k, v, mask=None, *, num_blocks, approx_mode="full", block_size=32,
                  initial_prior_first_n_blocks=0, initial_prior_diagonal_n_blocks=0, scale=None):
    """MRA-2 attention with gathered blocks and scatter-add.

    q, k, v: [B, H, N, D]; mask: [B, N] (1 real, 0 padding) or None; scale: the logit
    scale (None: 1/sqrt(D)).
    Returns [B, H, N, D] in q's dtype.
    """
    if approx_mode not in ("full", "sparse"):
        raise ValueError(f"unknown approx_mode {approx_mode!r}; expected 'full' or 'sparse'")

    B, H, N_orig, D = q.shape
    b = block_size
    dtype, device = q.dtype, q.device

    # Pad N up to a multiple of b; padded tokens are masked (a mask is made if needed).
    pad = (-N_orig) % b
    if pad:
        if mask is None:
            mask = torch.ones(B, N_orig, dtype=dtype, device=device)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        mask = F.pad(mask, (0, pad))
    N = N_orig + pad
    n = N // b
    R = B * H
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    masked = mask is not None

    # Work on rows r = (batch, head) flattened, batch major.
    q = q.reshape(R, N, D)
    k = k.reshape(R, N, D)
    v = v.reshape(R, N, D)
    if masked:
        tok_mask = mask.to(dtype).repeat_interleave(H, dim=0)  # [R, N]
        real = tok_mask[..., None] > 0  # padding replaced by zero, by selection (step 1)
        q, k, v = (torch.where(real, x, torch.zeros_like(x)) for x in (q, k, v))
        counts = tok_mask.view(R, n, b).sum(dim=-1)  # c_i, [R, n]
        q_hat = q.view(R, n, b, D).sum(dim=2) / (counts[..., None] + 1e-6)
        k_hat = k.view(R, n, b, D).sum(dim=2) / (counts[..., None] + 1e-6)
        v_hat = v.view(R, n, b, D).sum(dim=2) / (counts[..., None] + 1e-6)
    else:
        counts = torch.full((1, n), float(b), dtype=dtype, device=device)
        q_hat = q.view(R, n, b, D).mean(dim=2)
        k_hat = k.view(R, n, b, D).mean(dim=2)
        v_hat = v.view(R, n, b, D).mean(dim=2)

    # Low resolution: dense n x n block logits. The row max is taken before the penalty,
    # over the key blocks holding a real token (0 without one).
    low = scale * q_hat @ k_hat.transpose(-1, -2)  # [R, n, n]
    low_max = low.detach().masked_fill(counts[:, None, :] == 0, float("-inf")).amax(dim=-1)
    low_max = torch.where(torch.isinf(low_max), torch.zeros_like(low_max), low_max)  # [R, n]
    if masked:
        low = low - 1e4 * ((counts[:, :, None] * counts[:, None, :]) < 0.5).to(dtype)

    # Block selection (no gradient): top-k of the shifted scores plus priors.
    with torch.no_grad():
        score = low.detach() - low_max[:, :, None]
        idx = torch.arange(n, device=device)
        if initial_prior_diagonal_n_blocks > 0:
            band = (idx[:, None] - idx[None, :]).abs() <= initial_prior_diagonal_n_blocks // 2
            score = score + 5e3 * band.to(dtype)
        if initial_prior_first_n_blocks > 0:
            score = score + 5e3 * (idx[:, None] < initial_prior_first_n_blocks).to(dtype)
            score = score + 5e3 * (idx[None, :] < initial_prior_first_n_blocks).to(dtype)
        K = min(num_blocks, n * n)
        top_val, top_idx = torch.topk(score.reshape(R, n * n), K, dim=-1)
        blk_row = top_idx // n  # [R, K] query block of each selected block
        blk_col = top_idx % n  # [R, K] key block

    # High resolution: gather the selected blocks and use batched matmuls.
    q_blk = _gather_blocks(q.view(R, n, b, D), blk_row)  # [R, K, b, D]
    k_blk = _gather_blocks(k.view(R, n, b, D), blk_col)
    v_blk = _gather_blocks(v.view(R, n, b, D), blk_col)
    logits = scale * q_blk @ k_blk.transpose(-1, -2)  # [R, K, b, b]

    # Token index (within the row) of every query position of every selected block.
    q_tok = (blk_row[:, :, None] * b + torch.arange(b, device=device)).reshape(R, K * b)

    # Padding keys take no part (docs/spec.md, step 4: m_t over real keys only).
    if masked:
        key_mask = _gather_blocks(tok_mask.view(R, n, b), blk_col)  # [R, K, b]
        logits = logits.masked_fill(key_mask[:, :, None, :] == 0, float("-inf"))
    # Per-token row max over the real keys of the selected blocks of its block row; -1e5
    # where there is none.
    with torch.no_grad():
        m = torch.full((R, N), float("-inf"), dtype=dtype, device=device)
        m = m.scatter_reduce(1, q_tok, logits.amax(dim=-1).reshape(R, K * b), reduce="amax")
        m = torch.where(torch.isinf(m), torch.full_like(m, -1e5), m)
    P = torch.exp(logits - m.gather(1, q_tok).view(R, K, b, 1))
    blk_out = P @ v_blk  # [R, K, b, D]
    blk_sum = P.sum(dim=-1)  # [R, K, b]

    # Scatter-add the block results to their query tokens, over flattened (row, token).
    flat_tok = (torch.arange(R, device=device)[:, None] * N + q_tok).reshape(-1)
    O_hi = torch.zeros(R * N, D, dtype=dtype, device=device)
    O_hi = O_hi.index_add(0, flat_tok, blk_out.reshape(-1, D)).view(R, N, D)
    Z_hi = torch.zeros(R * N, dtype=dtype, device=device)
    Z_hi = Z_hi.index_add(0, flat_tok, blk_sum.reshape(-1)).view(R, N)

    if approx_mode == "sparse":
        out = O_hi / (Z_hi[..., None] + 1e-6)
    else:
        # Low resolution covers exactly the blocks below the selection threshold.
        with torch.no_grad():
            theta = top_val.min(dim=-1).values
            high_mask = score >= theta[:, None, None]  # [R, n, n]
        W = torch.exp(low - low_max[:, :, None] - 1e4 * high_mask.to(dtype))
        W = torch.where(counts[:, None, :] > 0, W * counts[:, None, :], torch.zeros_like(W))
        O_lo = (W @ v_hat).repeat_interleave(b, dim=1)  # [R, N, D]
        Z_lo = W.sum(dim=-1).repeat_interleave(b, dim=1)  # [R, N]

        # Bring both parts to the larger of the two stabilisers.
        delta = low_max.repeat_interleave(b, dim=1) - m  # [R, N]
        if masked:
            delta = delta * tok_mask
        shrink = torch.exp(-delta.abs())
        one = torch.ones_like(shrink)
        hi_factor = torch.where(delta > 0, shrink, one)
        lo_factor = torch.where(delta > 0, one, shrink)
        out = ((O_hi * hi_factor[..., None] + O_lo * lo_factor[..., None])
               / (Z_hi * hi_factor + Z_lo * lo_factor + 1e-6)[..., None])

    if masked:
        out = torch.where(tok_mask[..., None] > 0, out, torch.zeros_like(out))
    return out.view(B, H, N, D)[:, :, :N_orig]
