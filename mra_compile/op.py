"""The torch custom ops (registered on ``import mra_compile``).

- ``mra::attention``: the public op, with the documented schema. It is a composite of
  the two below (CompositeImplicitAutograd), so autograd, torch.compile and meta
  tensors see through it.
- ``mra::attention_fwd``: the forward kernels; returns the output and what the backward
  needs (selected blocks, stabilisers, normalisers, low-resolution tensors).
- ``mra::attention_bwd``: the backward kernels, registered as attention_fwd's autograd.

Each has a fake implementation that gives shapes for torch.compile and meta tensors.
"""
from __future__ import annotations

import torch

from mra_compile import validate

SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, int num_blocks, str approx_mode=\"full\", "
    "int block_size=32, int initial_prior_first_n_blocks=0, "
    "int initial_prior_diagonal_n_blocks=0) -> Tensor"
)
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, int num_blocks, str approx_mode, "
    "int block_size, int initial_prior_first_n_blocks, int initial_prior_diagonal_n_blocks) "
    "-> (Tensor out, Tensor stats, Tensor pooled, Tensor logits, Tensor high_mask, "
    "Tensor rowmax, Tensor index)"
)
BWD_SCHEMA = (
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor stats, "
    "Tensor pooled, Tensor logits, Tensor high_mask, Tensor rowmax, Tensor index, "
    "str approx_mode, int block_size) -> (Tensor dq, Tensor dk, Tensor dv)"
)


def _check(q, k, v, mask, num_blocks, approx_mode, block_size, first_n, diagonal_n):
    validate.check_options(num_blocks, approx_mode, block_size, first_n, diagonal_n)
    validate.check_tensors(q, k, v, mask)
    validate.check_sizes(q, block_size, num_blocks)


def _saved_shapes(q, num_blocks, block_size):
    """Shapes of attention_fwd's extra outputs (see mra_compile.forward.Saved)."""
    from mra_compile.forward import HEAD_DIM_MULTIPLE, compute_dtype

    B, H, N, D = q.shape
    R = B * H
    n = -(-N // block_size)
    Np, Dp = n * block_size, -(-D // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    K = min(num_blocks, n * n)
    dt = compute_dtype(q.dtype)
    return dt, [(3, R, Np), (3, R, n, Dp), (R, n, n), (R, n, n), (R, n)], (R, K)


@torch.library.custom_op("mra::attention_fwd", mutates_args=(), schema=FWD_SCHEMA)
def attention_fwd(q, k, v, mask, num_blocks, approx_mode, block_size,
                  initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks):
    """The forward kernels; returns (out, *what the backward needs)."""
    _check(q, k, v, mask, num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
           initial_prior_diagonal_n_blocks)
    validate.check_device(q)
    validate.check_mask_values(mask)
    from mra_compile.forward import mra_forward

    out, s = mra_forward(q, k, v, mask, num_blocks, approx_mode, block_size,
                         initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks, save=True)
    if s is None:  # B*H == 0
        dt, shapes, index_shape = _saved_shapes(q, num_blocks, block_size)
        return (out, *(q.new_zeros(sh, dtype=dt) for sh in shapes),
                q.new_zeros(index_shape, dtype=torch.int64))
    return out, s.stats, s.pooled, s.logits, s.high_mask, s.rowmax, s.index


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, num_blocks, approx_mode, block_size,
                        initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks):
    _check(q, k, v, mask, num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
           initial_prior_diagonal_n_blocks)
    dt, shapes, index_shape = _saved_shapes(q, num_blocks, block_size)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return (out, *(q.new_empty(sh, dtype=dt) for sh in shapes),
            q.new_empty(index_shape, dtype=torch.int64))


@torch.library.custom_op("mra::attention_bwd", mutates_args=(), schema=BWD_SCHEMA)
def attention_bwd(grad, q, k, v, mask, out, stats, pooled, logits, high_mask, rowmax, index,
                  approx_mode, block_size):
    """Gradients of q, k, v (the selection and stabilisers held constant)."""
    from mra_compile.backward import mra_backward
    from mra_compile.forward import Saved

    saved = Saved(stats, pooled, logits, high_mask, rowmax, index)
    return mra_backward(grad.contiguous(), q, k, v, mask, out, saved, approx_mode, block_size)


@attention_bwd.register_fake
def _attention_bwd_fake(grad, q, k, v, mask, out, stats, pooled, logits, high_mask, rowmax,
                        index, approx_mode, block_size):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, num_blocks, approx_mode, block_size, _, _ = inputs
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.approx_mode, ctx.block_size = approx_mode, block_size


def _backward(ctx, grad_out, *_unused):
    q, k, v, mask, out, stats, pooled, logits, high_mask, rowmax, index = ctx.saved_tensors
    dq, dk, dv = torch.ops.mra.attention_bwd(
        grad_out, q, k, v, mask, out, stats, pooled, logits, high_mask, rowmax, index,
        ctx.approx_mode, ctx.block_size,
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("mra::attention_fwd", _backward, setup_context=_setup_context)

torch.library.define("mra::attention", SCHEMA)


@torch.library.impl("mra::attention", "CompositeImplicitAutograd")
def attention(q, k, v, mask, num_blocks, approx_mode="full", block_size=32,
              initial_prior_first_n_blocks=0, initial_prior_diagonal_n_blocks=0):
    """MRA-2 attention (see ``mra_compile.mra_attention`` for the arguments)."""
    return torch.ops.mra.attention_fwd(
        q, k, v, mask, num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks,
    )[0]
