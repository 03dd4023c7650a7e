"""Run Hugging Face ``transformers``' MRA models with ``torch.ops.mra.attention``.

    from transformers import MraForSequenceClassification
    from mra_compile.integrations.transformers import patch_mra_model, unpatch_mra_model

    model = MraForSequenceClassification.from_pretrained("uw-madison/mra-base-512-4")
    patch_mra_model(model)          # every MraSelfAttention now calls the TVM-compiled op
    logits = model(**batch).logits  # on the CPU, any length, fp32 / fp16 / bf16
    unpatch_mra_model(model)        # back to the stock forward

Why: ``transformers``' ``MraSelfAttention`` runs MRA-2 through CUDA kernels that it
compiles or downloads at construction time. Where they are not loaded (every CPU, or a
GPU without the ``kernels`` package), its ``mra2_attention`` silently returns zeros, so
the attention layers contribute nothing. With the kernels it needs a sequence length that
is a multiple of 32 and long enough for its fixed budget (``n * n >= num_block``, below).

What the patched forward computes is exactly the stock module's function (spec:
``docs/spec.md``, steps 1-6, which follow the authors' numerics; like the stock kernels,
this release still takes the maxima R and m_t over padding keys, see its "Deviation" and
"Status in this release"):

* the same ``query`` / ``key`` / ``value`` projections and heads;
* the mask: ``MraModel`` hands its layers the ``[B, N]`` 0/1 mask (older releases gave
  the extended additive ``[B, 1, 1, N]`` mask; both are accepted, as in the stock code:
  an additive float mask marks real tokens with 0);
* the budget ``num_blocks = module.num_block``, which ``transformers`` fixes from
  ``max_position_embeddings`` (``min(max_position_embeddings // 32 * block_per_row,
  (max_position_embeddings // 32) ** 2)``) whatever the input length. The op clamps it
  to ``n * n`` for short inputs (all blocks exact: exact attention), where the CUDA path
  would fail in ``topk``. Pass ``block_per_row=`` to ``patch_mra_model`` to give each
  input ``block_per_row * ceil(N / 32)`` blocks instead (the MRA paper's budget);
* head dims below 32: the stock module zero-pads q, k, v to 32 dims for its kernels, and
  the kernels then scale logits by ``1/sqrt(32)`` rather than ``1/sqrt(head_dim)``. The
  patch keeps that scale (q is multiplied by ``sqrt(head_dim / 32)``) without the padding;
* block size 32, ``approx_mode`` and both priors read from the module at each call (so
  changing ``module.approx_mode`` after patching takes effect);
* any length: the op pads to a multiple of 32 internally with masked tokens.

Differences: the output has the projections' dtype (the stock module upcasts to float32
and returns float32, which a float16 model's next layer rejects), and an input with a
length that is not a multiple of 32 works (the stock kernels refuse it).
"""
from __future__ import annotations

import math

import torch
from transformers.models.mra.modeling_mra import MraSelfAttention

import mra_compile  # noqa: F401  (registers torch.ops.mra.attention)
from mra_compile import options, validate

__all__ = ["patch_mra_model", "unpatch_mra_model", "is_patched", "MraCompiledSelfAttention",
           "mra_self_attention_forward"]

BLOCK_SIZE = 32  # the only block size the transformers kernels support
HF_PADDED_HEAD_DIM = 32  # head dims below this are zero-padded (and scaled) by transformers


def token_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """The ``[B, N]`` bool mask (True = real token) from what ``MraModel`` passes its layers.

    Accepts None, a ``[B, N]`` 0/1 mask (bool, int or float: nonzero = real, as the stock
    code's ``.int()`` keeps it), or a 4-dim ``[B, 1, Q, N]`` mask: additive float
    (0 = real token, as ``transformers`` reverts it: ``mask[:, 0, -1, :] == 0``) or bool
    (True = real token).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        last = attention_mask[:, 0, -1, :]
        if attention_mask.is_floating_point():
            real = last == 0
        else:
            real = last != 0
    elif attention_mask.dim() == 2:
        if attention_mask.is_floating_point():
            # The stock code truncates with .int(): 0.5 would be padding.
            real = attention_mask.to(torch.int32) != 0
        else:
            real = attention_mask != 0
    else:
        raise ValueError(
            "attention_mask must be [B, N] (1 = real token) or the extended [B, 1, Q, N] "
            f"mask, got shape {tuple(attention_mask.shape)}"
        )
    if tuple(real.shape) != (batch, seq_len):
        raise ValueError(
            f"attention_mask must cover [B, N] = [{batch}, {seq_len}] tokens, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return real


def budget(module: MraSelfAttention, seq_len: int) -> int:
    """``num_blocks`` for one call: the module's fixed ``num_block`` unless overridden."""
    block_per_row = getattr(module, "mra_compile_block_per_row", None)
    if block_per_row is None:
        return int(module.num_block)
    return options.budget(block_per_row, seq_len, BLOCK_SIZE)


def mra_self_attention_forward(module: MraSelfAttention, hidden_states: torch.Tensor,
                               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The stock ``MraSelfAttention`` function through ``torch.ops.mra.attention``.

    hidden_states: ``[B, N, hidden]``; attention_mask: see ``token_mask``.
    Returns the context ``[B, N, all_head_size]`` (before ``MraSelfOutput``).
    """
    batch, seq_len, _ = hidden_states.shape
    heads, head_dim = module.num_attention_heads, module.attention_head_size

    def split(x):
        return x.view(batch, seq_len, heads, head_dim).transpose(1, 2)

    q = split(module.query(hidden_states))
    k = split(module.key(hidden_states))
    v = split(module.value(hidden_states))
    out_dtype = q.dtype
    if head_dim < HF_PADDED_HEAD_DIM or q.dtype not in validate.DTYPES:
        # The op computes in float32 anyway; scaling q here in float32 adds no rounding.
        q, k, v = q.float(), k.float(), v.float()
    if head_dim < HF_PADDED_HEAD_DIM:
        q = q * math.sqrt(head_dim / HF_PADDED_HEAD_DIM)
    context = torch.ops.mra.attention(
        q, k, v, token_mask(attention_mask, batch, seq_len), budget(module, seq_len),
        module.approx_mode, BLOCK_SIZE, module.initial_prior_first_n_blocks,
        module.initial_prior_diagonal_n_blocks,
    )
    context = context.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
    return context.to(out_dtype)


class _CompiledForward:
    """Mixin placed in front of an ``MraSelfAttention`` class by ``patch_mra_model``."""

    _mra_compile_original_class: type

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        # Same return convention as the stock forward: a 1-tuple.
        return (mra_self_attention_forward(self, hidden_states, attention_mask),)


class MraCompiledSelfAttention(_CompiledForward, MraSelfAttention):
    """``MraSelfAttention`` with the forward of ``mra_self_attention_forward``.

    ``patch_mra_model`` switches modules to this class (same attributes, parameters and
    state dict; still an ``MraSelfAttention``); ``unpatch_mra_model`` switches them back.
    """

    _mra_compile_original_class = MraSelfAttention


_PATCHED_CLASSES: dict[type, type] = {MraSelfAttention: MraCompiledSelfAttention}


def _patched_class(cls: type) -> type:
    """The patched twin of ``cls`` (MraSelfAttention or a subclass of it)."""
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"MraCompiled{cls.__name__}", (_CompiledForward, cls),
                                     {"_mra_compile_original_class": cls,
                                      "__module__": __name__})
    return _PATCHED_CLASSES[cls]


def is_patched(module: torch.nn.Module) -> bool:
    return isinstance(module, _CompiledForward)


def _attention_modules(model: torch.nn.Module) -> list[MraSelfAttention]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MraSelfAttention)]


def patch_mra_model(model: torch.nn.Module, *, block_per_row: int | None = None) -> torch.nn.Module:
    """Make every ``MraSelfAttention`` in ``model`` compute with ``torch.ops.mra.attention``.

    model: an ``MraModel``, any ``MraFor...`` task head, or any module containing
        ``MraSelfAttention`` layers. Patched in place (and returned, for chaining).
        Weights, the state dict and the config are untouched.
    block_per_row: None (default) keeps ``transformers``' budget, the module's fixed
        ``num_block``; an int gives every input ``block_per_row * ceil(N / 32)`` blocks.

    Patching twice is allowed (the second call updates ``block_per_row``). Raises
    ValueError if the model has no MRA attention layer.
    """
    if block_per_row is not None:
        validate.check_int("block_per_row", block_per_row, 1)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} contains no transformers MraSelfAttention module")
    for module in modules:
        if not is_patched(module):
            module.__class__ = _patched_class(type(module))
        module.mra_compile_block_per_row = block_per_row
    return model


def unpatch_mra_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch_mra_model``: the modules get their original class (and forward) back."""
    for module in _attention_modules(model):
        if is_patched(module):
            module.__class__ = type(module)._mra_compile_original_class
            module.__dict__.pop("mra_compile_block_per_row", None)
    return model
