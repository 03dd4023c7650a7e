"""Plain PyTorch MRA-2 attention: the test oracle.

This follows docs/spec.md step by step (the "Step N" comments below are its steps 1-6),
with dense [n, n] block matrices and dense [N, N] token matrices; where it still differs
from that page is listed in its section "Status in this release". It is meant for small
and medium sizes (N up to a few thousand) where clarity matters more than speed.
"""

import math

import torch

__all__ = ["mra2_reference", "exact_attention"]


def _pad_side(xs, mask, block_size):
    """Pad the tensors ``xs`` ([B, H, N, D], one side: the queries, or the keys and
    values) and their mask [B, N] with zeros up to a multiple of block_size.

    Returns (xs, mask). When padding is needed and mask is None, a mask of ones for real
    tokens and zeros for padding is created, so padded tokens are treated as masked.
    """
    B, _, N, _ = xs[0].shape
    pad = (-N) % block_size
    if pad == 0:
        return xs, mask
    if mask is None:
        mask = torch.ones(B, N, dtype=xs[0].dtype, device=xs[0].device)
    # Pad the token dimension (second to last) of the tensors and the last of mask.
    xs = [torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in xs]
    return xs, torch.nn.functional.pad(mask, (0, pad))


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
    """docs/spec.md, step 3. scores: detached L - R[:, None], [B, H, nq, nk], before the
    priors (nq = nk for self-attention; the diagonal prior follows i = j).

    Returns (selected, high_mask), both bool [B, H, nq, nk].
    """
    B, H, nq, nk = scores.shape
    S = scores.clone()
    iq = torch.arange(nq, device=S.device)[:, None]
    ik = torch.arange(nk, device=S.device)[None, :]
    if diagonal_n > 0:
        band = (iq - ik).abs() <= diagonal_n // 2
        S = S + 5e3 * band.to(S.dtype)
    if first_n > 0:
        # Rows and columns get the prior separately, so the corner gets it twice.
        S = S + 5e3 * (iq < first_n).to(S.dtype)
        S = S + 5e3 * (ik < first_n).to(S.dtype)

    total = nq * nk
    flat = S.reshape(B, H, total)
    if isinstance(num_blocks, torch.Tensor):
        # One budget per sequence, [B]: the top num_blocks[b] of each row of batch b.
        order = flat.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(total, device=S.device).expand_as(order))
        selected = rank < num_blocks.to(S.device).clamp_max(total)[:, None, None]
        theta = flat.masked_fill(~selected, float("inf")).amin(dim=-1)
    else:
        top = torch.topk(flat, min(num_blocks, total), dim=-1)
        selected = torch.zeros_like(flat, dtype=torch.bool)
        selected.scatter_(-1, top.indices, True)
        theta = top.values.min(dim=-1).values
    selected = selected.reshape(B, H, nq, nk)

    if approx_mode == "full":
        # Everything at least as large as the smallest selected score is high
        # resolution, so exact ties are all excluded from the low-resolution part.
        high_mask = S >= theta[:, :, None, None]
    else:
        high_mask = selected
    return selected, high_mask


def mra2_reference(q, k, v, mask=None, *, num_blocks=None, approx_mode="full", block_size=32,
                   initial_prior_first_n_blocks=0, initial_prior_diagonal_n_blocks=0,
                   scale=None, block_per_row=None, enable_gqa=False, query_mask=None,
                   selection=None, return_selection=False):
    """MRA-2 attention, docs/spec.md steps 1-6 as written. Differentiable w.r.t. q, k, v.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any float dtype; computation happens in that
        dtype). Nk != Nq is cross-attention (docs/spec.md, "Extensions"): each length is
        cut into blocks on its own.
    mask: [B, Nk] with 1 for real tokens and 0 for padding, or None: the key padding mask
        and, for self-attention without ``query_mask``, the query mask too.
    query_mask: [B, Nq], the query padding mask (cross-attention), or None.
    num_blocks / block_per_row: the budget, one number for every row, or per sequence: a
        sequence with c real tokens gets block_per_row * ceil(c / block_size) blocks
        (docs/spec.md, "Per-sequence budget"). Give one of the two.
    scale: the logit scale (None: 1/sqrt(D)).
    enable_gqa: k, v may have Hkv heads (H % Hkv == 0): query head h uses key/value head
        h // (H / Hkv) (docs/spec.md, "Extensions"), here by expanding them.
    selection: optional (selected, high_mask), bool [B, H, nq, nk], used instead of the
        top-k selection (nq, nk count blocks after padding Nq, Nk up to multiples of
        block_size).
    Returns out [B, H, Nq, D], or (out, (selected, high_mask)) if return_selection.
    """
    if approx_mode not in ("full", "sparse"):
        raise ValueError(f"unknown approx_mode {approx_mode!r}; expected 'full' or 'sparse'")

    if enable_gqa and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if (num_blocks is None) == (block_per_row is None):
        raise ValueError("give one of num_blocks and block_per_row")
    b = block_size
    Nq_orig = q.shape[2]
    if query_mask is None and k.shape[2] == Nq_orig:
        query_mask = mask  # self-attention: one mask for both sides
    if block_per_row is not None:
        # Per sequence: r blocks per real query block row.
        real = (torch.full((q.shape[0],), Nq_orig) if query_mask is None
                else (query_mask != 0).sum(-1))
        num_blocks = block_per_row * torch.clamp_min(-(-real.cpu() // b), 1).to(torch.int64)
    (q,), query_mask = _pad_side([q], query_mask, b)
    (k, v), mask = _pad_side([k, v], mask, b)
    B, H, Nq, D = q.shape
    nq, nk = Nq // b, k.shape[2] // b
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    masked = mask is not None or query_mask is not None

    # Step 1: padded tokens replaced by zero, by selection (NaN/inf there never propagate).
    # mask_t / qmask_t are [B, 1, Nk] / [B, 1, Nq] to broadcast over heads (ones without a
    # mask on that side).
    mask_t = (torch.ones(B, 1, k.shape[2], dtype=q.dtype, device=q.device) if mask is None
              else mask.to(q.dtype)[:, None, :])
    qmask_t = (torch.ones(B, 1, Nq, dtype=q.dtype, device=q.device) if query_mask is None
               else query_mask.to(q.dtype)[:, None, :])
    if masked:
        q = torch.where(qmask_t[..., None] > 0, q, torch.zeros_like(q))
        k, v = (torch.where(mask_t[..., None] > 0, x, torch.zeros_like(x)) for x in (k, v))
    counts = mask_t.reshape(B, 1, nk, b).sum(dim=-1)  # c_j of the key blocks, [B, 1, nk]
    q_counts = qmask_t.reshape(B, 1, nq, b).sum(dim=-1)  # of the query blocks, [B, 1, nq]

    # Step 2: low resolution on pooled blocks.
    q_hat = _block_pool(q, q_counts[..., None], b, masked)
    k_hat = _block_pool(k, counts[..., None], b, masked)
    v_hat = _block_pool(v, counts[..., None], b, masked)
    L = scale * (q_hat @ k_hat.transpose(-1, -2))  # [B, H, nq, nk]; scaled after, as the op
    # R is a stabiliser (a constant for gradients), taken before the compat penalty, over
    # the key blocks holding a real token (0 when there is none).
    R = L.detach().masked_fill(counts[..., None, :] == 0, float("-inf")).amax(dim=-1)
    R = torch.where(torch.isinf(R), torch.zeros_like(R), R)  # [B, H, nq]
    if masked:
        empty_pair = (q_counts[..., :, None] * counts[..., None, :]) < 0.5  # [B, 1, nq, nk]
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
    sel_tok = selected.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)  # [B, H, Nq, Nk]
    A = scale * (q @ k.transpose(-1, -2))  # (scaled after the product, as the op)
    # The pairs that take part: selected, with a real key. (With a mask, step 4's
    # exp(... - 1e4) of a padding key is 0 unless m_t is below -1e4; excluding the pair
    # is that value, without the overflow the literal formula would have there.)
    pairs = sel_tok & (mask_t[:, :, None, :] > 0) if masked else sel_tok
    with torch.no_grad():
        m = A.masked_fill(~pairs, float("-inf")).amax(dim=-1)  # [B, H, N], real keys only
        # (-1e5 of docs/spec.md, step 4; float16's lowest, -65504, in float16: such a
        # row has no pair, so every one of its terms is excluded either way)
        m = torch.where(torch.isinf(m), torch.full_like(m, max(-1e5, torch.finfo(m.dtype).min)), m)
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
        delta = R.repeat_interleave(b, dim=-1) - m  # [B, H, Nq], a constant
        if masked:
            delta = delta * qmask_t
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
        out = torch.where(qmask_t[..., None] > 0, out, torch.zeros_like(out))
    out = out[:, :, :Nq_orig].to(q.dtype)
    if return_selection:
        return out, (selected, high_mask)
    return out


def exact_attention(q, k, v, mask=None, scale=None, query_mask=None):
    """Exact softmax(q k^T * scale) v over real keys; zero at padded queries.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; mask: the key mask [B, Nk] (1 real, 0 padding)
    or None, also the query mask for self-attention without ``query_mask`` [B, Nq];
    scale: None for 1/sqrt(D). Returns [B, H, Nq, D] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if query_mask is None and k.shape[2] == q.shape[2]:
        query_mask = mask
    logits = scale * (q @ k.transpose(-1, -2))  # [B, H, Nq, Nk]
    if mask is not None:
        real = mask.to(torch.bool)
        v = torch.where(real[:, None, :, None], v, torch.zeros_like(v))  # (NaN there: inert)
        logits = logits.masked_fill(~real[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if query_mask is not None:
        # A padded query may see no real key at all (all -inf -> nan); zero it explicitly.
        keep = query_mask.to(torch.bool)[:, None, :, None]
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs @ v
