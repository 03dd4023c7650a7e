"""Run Hugging Face ``transformers`` models with ``torch.ops.mra.attention``.

Importing this module registers ``attn_implementation="mra"`` in transformers' attention
registry (``register()``, idempotent): every model that dispatches its attention through
``transformers.AttentionInterface`` (BERT, RoBERTa, XLM-RoBERTa, ModernBERT, EuroBERT, ...)
then runs MRA-2 with ``from_pretrained(..., attn_implementation="mra")`` or
``model.set_attn_implementation("mra")``, its options read from the model config
(``mra_block_per_row``, ``mra_approx_mode``, ...): see ``mra_compile.integrations.hf_attention``.

``MraModel`` does not dispatch through that registry; its attention modules are patched::

    from transformers import MraForSequenceClassification
    from mra_compile.integrations.transformers import (from_pretrained, is_patched,
                                                       patch_mra_model, unpatch_mra_model)

    model = MraForSequenceClassification.from_pretrained("uw-madison/mra-base-512-4")
    patch_mra_model(model)          # every MraSelfAttention now calls the TVM-compiled op
    logits = model(**batch).logits  # on the CPU, any length, fp32 / fp16 / bf16
    is_patched(model)               # True
    model.save_pretrained(path)     # the stock checkpoint, plus config.mra_block_per_row
    model = from_pretrained(MraForSequenceClassification, path)   # loads back patched
    unpatch_mra_model(model)        # back to the stock forward, exactly

Why: ``transformers``' ``MraSelfAttention`` runs MRA-2 through CUDA kernels that it
compiles or downloads at construction time. Where they are not loaded (every CPU, or a
GPU without the ``kernels`` package), its ``mra2_attention`` silently returns zeros, so
the attention layers contribute nothing. Once this module is imported, that stock path
warns (``MraStockAttentionWarning``, once per process). With the kernels, the stock path
needs a sequence length that is a multiple of 32 and long enough for its fixed budget
(``n * n >= num_block``, below), and it mixes up the padding masks of a batch: it
reshapes the ``[B, N]`` mask with ``repeat(1, num_heads, 1)``, which gives head ``h`` of
sample ``b`` the mask of sample ``(b * H + h) % B`` whenever a padded batch has B > 1
and H > 1. The patched forward gives every head its own sample's mask.

What the patched forward computes is the stock module's function with each sample's own
mask (spec: ``docs/spec.md``, steps 1-6, which follow the authors' numerics except for
its "Deviation": the maxima R and m_t range over real keys only, so padded batches can
differ from the stock kernels in the rows that deviation describes; unpadded inputs are
unaffected):

* the same ``query`` / ``key`` / ``value`` projections and heads;
* the mask: ``MraModel`` hands its layers the ``[B, N]`` 0/1 mask (older releases gave
  the extended additive ``[B, 1, 1, N]`` mask; both are accepted, as in the stock code:
  an additive float mask marks real tokens with 0);
* the budget ``num_blocks = module.num_block``, which ``transformers`` fixes from
  ``max_position_embeddings`` (``min(max_position_embeddings // 32 * block_per_row,
  (max_position_embeddings // 32) ** 2)``) whatever the input length. The op clamps it
  to ``n * n`` for short inputs (all blocks exact: exact attention), where the CUDA path
  would fail in ``topk``. ``patch_mra_model(model, block_per_row=k)`` gives each input
  ``k * ceil(N / 32)`` blocks instead (the MRA paper's budget), recorded in
  ``model.config.mra_block_per_row`` so that it saves and loads with the checkpoint;
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

import functools
import math
import warnings
from typing import Any

import torch
from transformers.models.mra import modeling_mra
from transformers.models.mra.modeling_mra import MraSelfAttention

import mra_compile  # noqa: F401  (registers torch.ops.mra.attention)
from mra_compile import options, validate

try:
    from mra_compile.integrations import hf_attention
except ImportError:  # a transformers without masking_utils.AttentionMaskInterface (< 4.53)
    hf_attention = None  # type: ignore[assignment]

__all__ = ["patch_mra_model", "unpatch_mra_model", "is_patched", "from_pretrained", "register",
           "MraCompiledSelfAttention", "MraStockAttentionWarning", "mra_self_attention_forward"]

BLOCK_SIZE = 32  # the only block size the transformers kernels support
HF_PADDED_HEAD_DIM = 32  # head dims below this are zero-padded (and scaled) by transformers

# Where patch_mra_model records its budget override (None: transformers' num_block); the
# same key as attn_implementation="mra"'s budget.
CONFIG_KEY = "mra_block_per_row"
FROM_CONFIG = "config"  # patch_mra_model's default block_per_row: the config's value
BACKUP_ATTRIBUTE = "mra_compile_config_backup"  # on the patched model: the config before


def register() -> str:
    """Register ``attn_implementation="mra"`` in transformers (done on import; idempotent).
    Returns the name. Needs a transformers with ``masking_utils.AttentionMaskInterface``."""
    if hf_attention is None:
        raise ImportError("attn_implementation='mra' needs transformers.masking_utils."
                          "AttentionMaskInterface (transformers >= 4.53)")
    return hf_attention.register()


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


def is_patched(model: torch.nn.Module) -> bool:
    """True if ``model`` (a whole model, any module inside one, or one attention module)
    has MRA attention layers and ``patch_mra_model`` has patched every one of them."""
    modules = _attention_modules(model)
    return bool(modules) and all(isinstance(m, _CompiledForward) for m in modules)


def _attention_modules(model: torch.nn.Module) -> list[MraSelfAttention]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MraSelfAttention)]


def _config(model: torch.nn.Module) -> Any:
    """The model's transformers config, or None (a plain module holding MRA layers)."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") else None


def patch_mra_model(model: torch.nn.Module, *,
                    block_per_row: int | None | str = FROM_CONFIG) -> torch.nn.Module:
    """Make every ``MraSelfAttention`` in ``model`` compute with ``torch.ops.mra.attention``.

    model: an ``MraModel``, any ``MraFor...`` task head, or any module containing
        ``MraSelfAttention`` layers. Patched in place (and returned, for chaining).
        Weights and the state dict are untouched.
    block_per_row: None keeps ``transformers``' budget, the module's fixed ``num_block``;
        an int gives every input ``block_per_row * ceil(N / 32)`` blocks. The default,
        ``"config"``, takes ``model.config.mra_block_per_row`` (absent: None), so that a
        model saved patched and loaded again gets its budget back.

    The budget is recorded in ``model.config.mra_block_per_row`` (when ``model`` has a
    transformers config), so ``save_pretrained`` keeps it; ``unpatch_mra_model`` restores
    the config as it was. Patching twice is allowed (the second call updates the budget).
    Raises ValueError if the model has no MRA attention layer.
    """
    modules = _attention_modules(model)
    config = _config(model)
    name = "block_per_row"
    if isinstance(block_per_row, str) and block_per_row == FROM_CONFIG:
        block_per_row = getattr(config, CONFIG_KEY, None)
        name = f"config.{CONFIG_KEY}"
    if block_per_row is not None:
        validate.check_int(name, block_per_row, 1)
    if not modules:
        raise ValueError(f"{type(model).__name__} contains no transformers MraSelfAttention module")
    if config is not None:
        if BACKUP_ATTRIBUTE not in vars(model):
            # (had the key, its value): deep copies and pickles keep it meaningful.
            vars(model)[BACKUP_ATTRIBUTE] = (hasattr(config, CONFIG_KEY),
                                             getattr(config, CONFIG_KEY, None))
        setattr(config, CONFIG_KEY, block_per_row)
    for module in modules:
        if not isinstance(module, _CompiledForward):
            module.__class__ = _patched_class(type(module))
        module.mra_compile_block_per_row = block_per_row
    return model


def unpatch_mra_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch_mra_model`` exactly: the modules get their original class (and forward)
    back and lose the attribute the patch added; the config gets back the
    ``mra_block_per_row`` it had before (or none). Unpatching an unpatched model is a no-op."""
    for module in _attention_modules(model):
        if isinstance(module, _CompiledForward):
            module.__class__ = type(module)._mra_compile_original_class
            module.__dict__.pop("mra_compile_block_per_row", None)
    backup = vars(model).pop(BACKUP_ATTRIBUTE, None)
    config = _config(model)
    if backup is not None and config is not None:
        had_key, value = backup
        if had_key:
            setattr(config, CONFIG_KEY, value)
        elif hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
    return model


def from_pretrained(model_class: Any, pretrained_model_name_or_path: Any, *args, **kwargs) -> Any:
    """Load a model that computes its attention with mra-compile.

    ``model_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)`` for any
    transformers model class (``AutoModel...`` included), with
    ``attn_implementation="mra"`` unless ``kwargs`` name one; then a model with MRA
    attention layers (``MraModel``, ``MraFor...``; they ignore ``attn_implementation``)
    is patched by ``patch_mra_model`` with the budget its config recorded.
    """
    if hf_attention is not None:
        kwargs.setdefault("attn_implementation", hf_attention.NAME)
    model = model_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    if _attention_modules(model):
        patch_mra_model(model)
    return model


# ---------------------------------------------------------------------------- the stock path


class MraStockAttentionWarning(UserWarning):
    """transformers' own ``MraSelfAttention`` computes no attention on this machine."""


STOCK_ZEROS_MESSAGE = (
    "transformers' MraSelfAttention returns zeros on this machine: its CUDA kernels "
    "(kernels-community/mra) are not loaded, so every MRA attention layer contributes nothing "
    "and the model's outputs are wrong. Compute it with mra-compile: "
    "mra_compile.integrations.transformers.patch_mra_model(model), or load the model with "
    "mra_compile.integrations.transformers.from_pretrained(ModelClass, path). "
    "(This warning is given once per process.)"
)
STOCK_WARNING = {"given": False}


def warn_if_stock_returns_zeros() -> None:
    """Warn (``MraStockAttentionWarning``, once per process) if transformers' ``mra2_attention``
    returns zeros here, i.e. its CUDA kernels are not loaded."""
    if modeling_mra.mra_cuda_kernel is None and not STOCK_WARNING["given"]:
        STOCK_WARNING["given"] = True
        warnings.warn(STOCK_ZEROS_MESSAGE, MraStockAttentionWarning, stacklevel=3)


def install_stock_warning() -> None:
    """Wrap ``transformers.models.mra.modeling_mra.mra2_attention`` (which the stock
    ``MraSelfAttention.forward`` calls; the patched forward does not) so that it calls
    ``warn_if_stock_returns_zeros`` first. Same results; idempotent; done on import."""
    original = modeling_mra.mra2_attention
    if getattr(original, "mra_compile_warns", False):
        return

    @functools.wraps(original)
    def mra2_attention(*args, **kwargs):
        warn_if_stock_returns_zeros()
        return original(*args, **kwargs)

    setattr(mra2_attention, "mra_compile_warns", True)  # noqa: B010
    modeling_mra.mra2_attention = mra2_attention


install_stock_warning()
if hf_attention is not None:
    hf_attention.register()
