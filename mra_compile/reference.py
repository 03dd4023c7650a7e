"""Plain PyTorch MRA-2 attention: the test oracle.

This follows docs/spec.md step by step (the "Step N" comments below are its steps 1-6),
with dense [n, n] block matrices and dense [N, N] token matrices; where it still differs
from that page is listed in its section "Status in this release". It is meant for small
and medium sizes (N up to a few thousand) where clarity matters more than speed.
"""

import math

import torch

__all__ = ["mra2_reference", "exact_attention"]


def _pad_inputs(q, k, v, mask, block_size):
    """Pad q, k, v [B, H, N, D] and mask [B, N] with zeros up to a multiple of block_size.

    Returns (q, k, v, mask, N). When padding is needed and mask is None, a mask of
    ones for real tokens and zeros for padding is created, so padded tokens are
    treated as masked.
    """
    B, H, N, D = q.shape
    pad = (-N) % block_size
    if pad == 0:
        return q, k, v, mask, N
    if mask is None:
        mask = torch.ones(B, N, dtype=q.dtype, device=q.device)
    # Pad the token dimension (second to last) of q, k, v and the last of mask.
    q = torch.nn.functional.pad(q, (0, 0, 0, pad))
    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad))
    return q, k, v, mask, N


def _block_pool(x, counts, block_size, masked):
    """Pool x [B, H, N, D] into per-block vectors [B, H, n, D].

    With a mask, the sum over the block is divided by (count + 1e-6) (counts is
    [B, 1, n, 1]); without one it is the plain mean.
    """
    B, H, N, D = x.shape
    blocks = x.reshape(B, H, N // block_size, block_size, D)
    if masked:
        return blocks.sum(dim=3) / (counts + 1e-6)
    return blocks.mean(dim=3)


def _select_blocks(scores, num_blocks, approx_mode, first_n, diagonal_n):
    """docs/spec.md, step 3. scores: detached L - R[:, None], [B, H, n, n], before the priors.

    Returns (selected, high_mask), both bool [B, H, n, n].
    """
    B, H, n, _ = scores.shape
    S = scores.clone()
    idx = torch.arange(n, device=S.device)
    if diagonal_n > 0:
        band = (idx[:, None] - idx[None, :]).abs() <= diagonal_n // 2
        S = S + 5e3 * band.to(S.dtype)
    if first_n > 0:
        # Rows and columns get the prior separately, so the corner gets it twice.
        S = S + 5e3 * (idx[:, None] < first_n).to(S.dtype)
        S = S + 5e3 * (idx[None, :] < first_n).to(S.dtype)

    flat = S.reshape(B, H, n * n)
    if isinstance(num_blocks, torch.Tensor):
        # One budget per sequence, [B]: the top num_blocks[b] of each row of batch b.
        order = flat.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(n * n, device=S.device).expand_as(order))
        selected = rank < num_blocks.to(S.device).clamp_max(n * n)[:, None, None]
        theta = flat.masked_fill(~selected, float("inf")).amin(dim=-1)
    else:
        top = torch.topk(flat, min(num_blocks, n * n), dim=-1)
        selected = torch.zeros_like(flat, dtype=torch.bool)
        selected.scatter_(-1, top.indices, True)
        theta = top.values.min(dim=-1).values
    selected = selected.reshape(B, H, n, n)

    if approx_mode == "full":
        # Everything at least as large as the smallest selected score is high
        # resolution, so exact ties are all excluded from the low-resolution part.
        high_mask = S >= theta[:, :, None, None]
    else:
        high_mask = selected
    return selected, high_mask


def mra2_reference(q, k, v, mask=None, *, num_blocks=None, approx_mode="full", block_size=32,
                   initial_prior_first_n_blocks=0, initial_prior_diagonal_n_blocks=0,
                   scale=None, block_per_row=None, enable_gqa=False, selection=None,
                   return_selection=False):
    """MRA-2 attention, docs/spec.md steps 1-6 as written. Differentiable w.r.t. q, k, v.

    q, k, v: [B, H, N, D] (any float dtype; computation happens in that dtype).
    mask: [B, N] with 1 for real tokens and 0 for padding, or None.
    num_blocks / block_per_row: the budget, one number for every row, or per sequence: a
        sequence with c real tokens gets block_per_row * ceil(c / block_size) blocks
        (docs/spec.md, "Per-sequence budget"). Give one of the two.
    scale: the logit scale (None: 1/sqrt(D)).
    enable_gqa: k, v may have Hkv heads (H % Hkv == 0): query head h uses key/value head
        h // (H / Hkv) (docs/spec.md, "Extensions"), here by expanding them.
    selection: optional (selected, high_mask), bool [B, H, n, n], used instead of the
        top-k selection (n counts blocks after padding N up to a multiple of block_size).
    Returns out [B, H, N, D], or (out, (selected, high_mask)) if return_selection.
    """
    if approx_mode not in ("full", "sparse"):
        raise ValueError(f"unknown approx_mode {approx_mode!r}; expected 'full' or 'sparse'")

    if enable_gqa and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if (num_blocks is None) == (block_per_row is None):
        raise ValueError("give one of num_blocks and block_per_row")
    b = block_size
    if block_per_row is not None:
        real = torch.full((q.shape[0],), q.shape[2]) if mask is None else (mask != 0).sum(-1)
        num_blocks = block_per_row * torch.clamp_min(-(-real.cpu() // b), 1).to(torch.int64)
    q, k, v, mask, N_orig = _pad_inputs(q, k, v, mask, b)
    B, H, N, D = q.shape
    n = N // b
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    masked = mask is not None

    # Step 1: padded tokens replaced by zero, by selection (NaN/inf there never propagate).
    # mask_t is [B, 1, N] to broadcast over heads.
    if masked:
        mask_t = mask.to(q.dtype)[:, None, :]
        real = mask_t[..., None] > 0
        q, k, v = (torch.where(real, x, torch.zeros_like(x)) for x in (q, k, v))
        counts = mask_t.reshape(B, 1, n, b).sum(dim=-1)  # c_i, [B, 1, n]
    else:
        counts = torch.full((1, 1, n), float(b), dtype=q.dtype, device=q.device)

    # Step 2: low resolution on pooled blocks.
    q_hat = _block_pool(q, counts[..., None], b, masked)
    k_hat = _block_pool(k, counts[..., None], b, masked)
    v_hat = _block_pool(v, counts[..., None], b, masked)
    L = scale * q_hat @ k_hat.transpose(-1, -2)  # [B, H, n, n]
    # R is a stabiliser (a constant for gradients), taken before the compat penalty, over
    # the key blocks holding a real token (0 when there is none).
    R = L.detach().masked_fill(counts[..., None, :] == 0, float("-inf")).amax(dim=-1)
    R = torch.where(torch.isinf(R), torch.zeros_like(R), R)  # [B, H, n]
    if masked:
        empty_pair = (counts[..., :, None] * counts[..., None, :]) < 0.5  # [B, 1, n, n]
        L = L - 1e4 * empty_pair.to(L.dtype)

    # Step 3: block selection, no gradient.
    if selection is None:
        with torch.no_grad():
            selected, high_mask = _select_blocks(
                L.detach() - R[..., None], num_blocks, approx_mode,
                initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks)
    else:
        selected, high_mask = selection
        selected = selected.to(torch.bool)
        high_mask = high_mask.to(torch.bool)

    # Step 4: high resolution over the selected blocks, with dense [N, N] matrices.
    sel_tok = selected.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)  # [B, H, N, N]
    A = scale * q @ k.transpose(-1, -2)
    # The pairs that take part: selected, with a real key. (With a mask, step 4's
    # exp(... - 1e4) of a padding key is 0 unless m_t is below -1e4; excluding the pair
    # is that value, without the overflow the literal formula would have there.)
    pairs = sel_tok & (mask_t[:, :, None, :] > 0) if masked else sel_tok
    with torch.no_grad():
        m = A.masked_fill(~pairs, float("-inf")).amax(dim=-1)  # [B, H, N], real keys only
        m = torch.where(torch.isinf(m), torch.full_like(m, -1e5), m)
    logits = A - m[..., None]
    # Mask the exponent (not the result) so excluded pairs give exp(-inf) = 0
    # without inf * 0 = nan in the backward pass.
    P = torch.exp(logits.masked_fill(~pairs, float("-inf")))
    O_hi = P @ v  # [B, H, N, D]
    Z_hi = P.sum(dim=-1)  # [B, H, N]

    # Step 5: combine.
    if approx_mode == "sparse":
        out = O_hi / (Z_hi[..., None] + 1e-6)
    else:
        # Times c_j by selection: empty key blocks add nothing (exp may overflow there,
        # where R, over real blocks, lies below their penalised logit).
        W = torch.exp(L - R[..., None] - 1e4 * high_mask.to(L.dtype))
        W = torch.where(counts[..., None, :] > 0, W * counts[..., None, :], torch.zeros_like(W))
        O_lo = (W @ v_hat).repeat_interleave(b, dim=-2)  # [B, H, N, D]
        Z_lo = W.sum(dim=-1).repeat_interleave(b, dim=-1)  # [B, H, N]
        delta = R.repeat_interleave(b, dim=-1) - m  # [B, H, N], a constant
        if masked:
            delta = delta * mask_t
        # Scale down whichever part has the smaller stabiliser; exp(-|delta|) never overflows.
        shrink = torch.exp(-delta.abs())
        one = torch.ones_like(shrink)
        hi_factor = torch.where(delta > 0, shrink, one)
        lo_factor = torch.where(delta > 0, one, shrink)
        O_hi = O_hi * hi_factor[..., None]
        Z_hi = Z_hi * hi_factor
        O_lo = O_lo * lo_factor[..., None]
        Z_lo = Z_lo * lo_factor
        out = (O_hi + O_lo) / (Z_hi + Z_lo + 1e-6)[..., None]

    # Step 6: zero the padded queries (by selection) and drop the padding.
    if masked:
        out = torch.where(mask_t[..., None] > 0, out, torch.zeros_like(out))
    out = out[:, :, :N_orig].to(q.dtype)
    if return_selection:
        return out, (selected, high_mask)
    return out


def exact_attention(q, k, v, mask=None, scale=None):
    """Exact softmax(q k^T * scale) v over real keys; zero at padded queries.

    q, k, v: [B, H, N, D]; mask: [B, N] (1 real, 0 padding) or None; scale: None for
    1/sqrt(D). Returns [B, H, N, D] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = scale * q @ k.transpose(-1, -2)  # [B, H, N, N]
    if mask is None:
        return torch.softmax(logits, dim=-1) @ v
    real = mask.to(torch.bool)
    v = torch.where(real[:, None, :, None], v, torch.zeros_like(v))  # (NaN there: inert)
    logits = logits.masked_fill(~real[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A padded query may see no real key at all (all -inf -> nan); zero it explicitly.
    probs = torch.where(real[:, None, :, None], probs, torch.zeros_like(probs))
    return probs @ v
