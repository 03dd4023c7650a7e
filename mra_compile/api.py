"""The friendly Python entry points (the op's documented arguments, with defaults)."""
from __future__ import annotations

import torch

from mra_compile import forward, op, validate
from mra_compile.options import Options


def mra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_blocks: int | None = None,
    block_per_row: int | None = None,
    approx_mode: str = "full",
    block_size: int = 32,
    initial_prior_first_n_blocks: int = 0,
    initial_prior_diagonal_n_blocks: int = 0,
    scale: float | None = None,
    enable_gqa: bool = False,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MRA-2 approximate attention (Zeng et al., ICML 2022).

    Args:
        q: ``[B, H, Nq, D]`` queries; k, v: ``[B, H, Nk, D]`` keys and values (``[B, Hkv,
            Nk, D]`` with ``enable_gqa``); float32, float16 or bfloat16, one dtype and
            device. Any Nq, Nk and D; ``Nk != Nq`` is cross-attention (each side is cut
            into blocks on its own). Non-contiguous is fine.
        mask: key padding, or None: ``[B, Nk]`` with 1 for real tokens and 0 for padding
            (bool, int or float), or SDPA's ``[B, 1, 1, Nk]``, bool (True = take part) or
            additive float (0 / -inf). Padded keys are ignored. For self-attention
            (``Nk == Nq``, no ``query_mask``) it pads the queries too: they get zero
            output. A per-query mask (``[B, 1, Nq, Nk]``) is a ValueError.
        num_blocks: exact ``block_size x block_size`` blocks per (batch, head), >= 1;
            clamped to ``n*n`` where ``n = ceil(N / block_size)``.
        block_per_row: alternative to ``num_blocks``, per sequence: a sequence with ``c``
            real tokens gets ``block_per_row * ceil(c / block_size)`` blocks (Hugging
            Face ``MraConfig.block_per_row``), so padding never changes its output. Give
            at most one of the two; with neither, ``block_per_row = 4``.
        approx_mode: ``"full"`` (MRA-2: exact blocks plus the low-resolution rest) or
            ``"sparse"`` (MRA-2-s: exact blocks only).
        block_size: block edge ``b``, a power of two in [8, 256] (default 32). N is
            padded internally to a multiple of it with masked tokens.
        initial_prior_first_n_blocks: always select the first ``f`` block rows and
            columns (global tokens), >= 0.
        initial_prior_diagonal_n_blocks: always select a band of ``g`` block diagonals
            (local attention), >= 0.
        scale: the logit scale, a positive finite float (default ``1/sqrt(D)``), as
            ``scaled_dot_product_attention``'s ``scale``.
        enable_gqa: grouped-query / multi-query heads, as in SDPA: k and v may have
            ``Hkv`` heads (``H % Hkv == 0``); query head ``h`` uses key/value head
            ``h // (H / Hkv)``, read in place (no expanded copy). Their gradients sum
            over the query heads that share them.
        query_mask: the query padding of cross-attention, ``[B, Nq]`` (1 real / 0
            padding, bool, int or float), or None (every query real; for self-attention,
            ``mask``'s). Padded queries get zero output and no gradient; the per-sequence
            budget counts a sequence's real queries.

    Returns:
        ``[B, H, Nq, D]`` in q's dtype. Contiguous, except where q, k, v are transposed
        views of ``[B, N, H, D]`` tensors (as attention layers pass them) that a CPU
        inference call reads in place: the output is then such a view too, so that the
        layer's transpose back to ``[B, N, H, D]`` is free (as
        ``scaled_dot_product_attention``'s output on the CPU is, for such inputs).

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    # Checked here too (not only in the op) so that Python-type errors are TypeErrors
    # rather than the dispatcher's RuntimeError.
    opts = Options(num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
                   initial_prior_diagonal_n_blocks, scale, block_per_row, enable_gqa)
    validate.check_tensors(q, k, v, mask, enable_gqa, query_mask)
    return op.differentiable(q, k, v, mask, opts, query_mask)


def block_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_blocks: int | None = None,
    block_per_row: int | None = None,
    approx_mode: str = "full",
    block_size: int = 32,
    initial_prior_first_n_blocks: int = 0,
    initial_prior_diagonal_n_blocks: int = 0,
    scale: float | None = None,
    enable_gqa: bool = False,
    query_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks ``torch.ops.mra.attention`` computes exactly for these arguments (the
    arguments of ``mra_attention``, budget included).

    Returns ``(selected, high_mask)``, bool ``[B, H, nq, nk]`` with ``nq = ceil(Nq /
    block_size)``, ``nk = ceil(Nk / block_size)``:
    the top-``num_blocks`` set T of docs/spec.md, step 3, and, in "full" mode, Hmask (the blocks the
    low-resolution part leaves out; equal to ``selected`` in "sparse" mode). Useful to
    inspect the pattern, and to give a reference the same blocks when scores tie. With
    ``block_per_row`` and a mask, each sequence selects ``block_per_row * ceil(c / b)`` of
    its blocks that hold a real query and a real key (``c`` real tokens).
    """
    opts = Options(num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
                   initial_prior_diagonal_n_blocks, scale, block_per_row, enable_gqa)
    validate.check_tensors(q, k, v, mask, enable_gqa, query_mask)
    validate.check_device(q)
    validate.check_mask_values(mask)
    validate.check_mask_values(query_mask, "query_mask")
    with torch.no_grad():
        return forward.block_selection(q.detach(), k.detach(), v.detach(), mask, opts, query_mask)
