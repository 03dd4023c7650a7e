"""The torch custom op ``torch.ops.mra.attention`` (registered on import).

The op's implementation runs the compiled kernels (``mra_compile.forward``); the fake
implementation gives shapes for torch.compile and meta tensors.
"""
from __future__ import annotations

import torch

from mra_compile import validate

SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, int num_blocks, str approx_mode=\"full\", "
    "int block_size=32, int initial_prior_first_n_blocks=0, "
    "int initial_prior_diagonal_n_blocks=0) -> Tensor"
)


@torch.library.custom_op("mra::attention", mutates_args=(), schema=SCHEMA)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    num_blocks: int,
    approx_mode: str = "full",
    block_size: int = 32,
    initial_prior_first_n_blocks: int = 0,
    initial_prior_diagonal_n_blocks: int = 0,
) -> torch.Tensor:
    """MRA-2 attention (see ``mra_compile.mra_attention`` for the arguments)."""
    validate.check_options(
        num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks,
    )
    validate.check_tensors(q, k, v, mask)
    validate.check_device(q)
    validate.check_mask_values(mask)
    from mra_compile.forward import mra_forward

    return mra_forward(
        q, k, v, mask, num_blocks, approx_mode, block_size,
        initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks,
    )


@attention.register_fake
def _attention_fake(q, k, v, mask, num_blocks, approx_mode="full", block_size=32,
                    initial_prior_first_n_blocks=0, initial_prior_diagonal_n_blocks=0):
    validate.check_options(
        num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks,
    )
    validate.check_tensors(q, k, v, mask)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
