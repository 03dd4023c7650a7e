"""``attn_implementation="mra"``: MRA-2 through Hugging Face ``transformers``' attention registry.

Every model that dispatches its attention through ``transformers.AttentionInterface``
(BERT, RoBERTa, XLM-RoBERTa, ModernBERT, EuroBERT and the other encoders written that way)
can compute it with ``mra_compile.mra_attention``::

    import mra_compile.integrations.transformers    # registers "mra" (= hf_attention.register())
    model = AutoModelForMaskedLM.from_pretrained(path, attn_implementation="mra")
    model.config.mra_block_per_row = 8               # optional; saved with save_pretrained
    model.set_attn_implementation("sdpa")            # and back

``register()`` puts two functions under one name: ``mra_attention_forward`` in
``AttentionInterface`` (what each attention layer calls) and ``mra_mask`` in
``transformers.masking_utils.AttentionMaskInterface`` (what builds the mask the layers get;
without it transformers hands a custom implementation no mask at all, and padded keys
would silently take part).

The op's options come from the model config, so that they save and load with the
checkpoint (``CONFIG_DEFAULTS``; a missing key or ``None`` is the default):

* ``mra_block_per_row`` (4): exact blocks per block row, ``num_blocks = mra_block_per_row *
  ceil(N / mra_block_size)`` per (sample, head);
* ``mra_approx_mode`` (``"full"``): ``"full"`` = MRA-2, ``"sparse"`` = MRA-2-s;
* ``mra_block_size`` (32), ``mra_initial_prior_first_n_blocks`` (0),
  ``mra_initial_prior_diagonal_n_blocks`` (0): as in ``mra_compile.mra_attention``;
* ``mra_sliding_window`` (``"error"``): what a sliding-window (local attention) layer does
  when its window does not cover the sequence (ModernBERT's local layers): ``"error"``
  raises, ``"sdpa"`` runs such layers with exact local attention through transformers'
  ``sdpa``. A layer whose window covers the whole sequence is plain global attention and
  runs MRA-2 either way.

What the attention function does with the interface's arguments:

* the mask: the op takes one ``[B, N]`` padding mask for keys and queries. Accepted: None,
  ``[B, N]`` (nonzero = real token), or a 4-D ``[B or 1, 1 or H, N or 1, N]`` mask, bool
  (True = attend) or additive float (0 = attend, ``<= -1e4`` = masked: ``finfo.min``,
  ``-inf``, the old ``-10000``), that is the same for every query row and head, i.e. says
  only which keys are padding. Anything else (causal, sliding-window, block patterns, an
  additive bias) is a ValueError (a RuntimeError from ``torch._assert_async`` under
  ``torch.compile``, where the check runs in the graph). ``mra_mask`` gives bidirectional
  layers the padding mask as a ``[B, 1, N, N]`` view of ``[B, 1, 1, N]`` (nothing
  ``N x N`` is allocated and nothing needs checking); other patterns get ``sdpa_mask``'s
  bool mask;
* a masked key is also a padded query for the op, whose attention output there is zero.
  No real token attends to it, so nothing changes at real positions; hidden states at
  padded positions differ from ``sdpa``'s and ``eager``'s;
* ``scaling``: the op's logit scale is ``1/sqrt(D)``; another ``scaling`` is applied by
  multiplying q by ``scaling * sqrt(D)`` (identical for MRA-2: q enters only through
  ``q . k`` and its block means). Where ``mra_compile.mra_attention`` has a ``scale``
  parameter, ``scale=scaling`` is passed instead (checked at call time);
* grouped-query attention (fewer key/value heads than query heads): k and v are expanded
  with ``repeat_interleave`` (as transformers' ``repeat_kv``), or passed as they are with
  ``enable_gqa=True`` where ``mra_compile.mra_attention`` has that parameter;
* refused with a ValueError: causal attention (a decoder, or ``is_decoder=True``: MRA-2
  has no causal form), cross-attention or a cache (query and key lengths differ), and an
  attention bias, softcap or sinks (``position_bias``, ``softcap``, ``s_aux``, ``sinks``);
* attention dropout is not applied (MRA-2 never forms the attention probabilities): with
  ``dropout > 0`` in training mode it warns once. No attention weights are returned.

Returns ``(attn_output [B, N, H, D], None)`` like transformers' ``sdpa_attention_forward``.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

import mra_compile
from mra_compile import options, validate

__all__ = ["NAME", "CONFIG_DEFAULTS", "register", "mra_attention_forward", "mra_mask",
           "key_padding_mask", "settings", "warn_once"]

NAME = "mra"

CONFIG_DEFAULTS: dict[str, Any] = {
    "mra_block_per_row": options.DEFAULT_BLOCK_PER_ROW,
    "mra_approx_mode": "full",
    "mra_block_size": 32,
    "mra_initial_prior_first_n_blocks": 0,
    "mra_initial_prior_diagonal_n_blocks": 0,
    "mra_sliding_window": "error",
}
SLIDING_WINDOW_CHOICES = ("error", "sdpa")

# An additive float mask marks attended keys with 0 and masked ones with a large negative
# number: finfo(dtype).min (transformers' eager_mask), -inf, or -10000 (older releases).
MASKED_AT_OR_BELOW = -1e4

# Interface arguments that add something to the logits, which MRA-2 cannot do.
UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")

# Keys of the warnings already given in this process (warn_once).
WARNED: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` the first time ``key`` is seen in this process."""
    if key in WARNED:
        return
    WARNED.add(key)
    warnings.warn(message, category, stacklevel=3)


def register(name: str = NAME) -> str:
    """Register ``mra_attention_forward`` and ``mra_mask`` under ``name`` in transformers'
    global ``AttentionInterface`` and ``AttentionMaskInterface``. Idempotent; importing
    ``mra_compile.integrations.transformers`` calls it. Returns ``name``."""
    AttentionInterface.register(name, mra_attention_forward)
    AttentionMaskInterface.register(name, mra_mask)
    return name


# ---------------------------------------------------------------------------- the options


def settings(config: Any) -> dict[str, Any]:
    """The op's options from a model config (``CONFIG_DEFAULTS``' keys; missing or None =
    the default), checked: a bad value is a TypeError / ValueError naming the config key."""
    values = {}
    for key, default in CONFIG_DEFAULTS.items():
        value = getattr(config, key, None) if config is not None else None
        values[key] = default if value is None else value
    validate.check_int("config.mra_block_per_row", values["mra_block_per_row"], 1)
    validate.check_int("config.mra_block_size", values["mra_block_size"], options.MIN_BLOCK_SIZE,
                       options.MAX_BLOCK_SIZE)
    validate.check_int("config.mra_initial_prior_first_n_blocks",
                       values["mra_initial_prior_first_n_blocks"], 0)
    validate.check_int("config.mra_initial_prior_diagonal_n_blocks",
                       values["mra_initial_prior_diagonal_n_blocks"], 0)
    if values["mra_approx_mode"] not in options.MODES:
        raise ValueError(f"config.mra_approx_mode must be one of {options.MODES}, "
                         f"got {values['mra_approx_mode']!r}")
    if values["mra_sliding_window"] not in SLIDING_WINDOW_CHOICES:
        raise ValueError(f"config.mra_sliding_window must be one of {SLIDING_WINDOW_CHOICES}, "
                         f"got {values['mra_sliding_window']!r}")
    return values


# ---------------------------------------------------------------------------- masks


def mra_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function=bidirectional_mask_function, attention_mask: torch.Tensor | None = None,
             allow_is_bidirectional_skip: bool = False, **kwargs) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function registered with ``mra_attention_forward``.

    Bidirectional layers (``create_bidirectional_mask``): the 2-D padding mask as a bool
    ``[B, 1, q_length, kv_length]`` view of ``[B, 1, 1, kv_length]`` (True = attend), or
    None where transformers allows skipping it and no key is padding. Any other pattern
    (sliding windows, causal, overlays): ``sdpa_mask``'s materialised bool mask (never
    the ``is_causal`` shortcut, so that a causal pattern cannot pass as None), which
    ``mra_attention_forward`` accepts only when it is padding-only.
    """
    if mask_function is bidirectional_mask_function and kwargs.get("local_size") is None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            if allow_is_bidirectional_skip:
                return None
            keep = torch.ones(1, 1, 1, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
        else:
            padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
            if (allow_is_bidirectional_skip and not torch.compiler.is_compiling()
                    and not torch.jit.is_tracing() and bool(padding.all())):
                return None
            keep = padding[:, None, None, :]
        return keep.expand(batch_size, 1, q_length, kv_length)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def _require(condition: torch.Tensor, message: str) -> None:
    """ValueError(message) unless ``condition`` (a bool tensor) holds; under torch.compile
    an in-graph assertion (RuntimeError) instead of a graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


NOT_PADDING_ONLY = (
    "attn_implementation='mra' needs a padding-only attention mask: the same for every query "
    "and head, saying which keys are padding. This mask differs between {what} (a causal, "
    "sliding-window, block or custom pattern), which MRA-2 cannot express."
)


def key_padding_mask(attention_mask: torch.Tensor | None, batch: int, heads: int, seq_len: int,
                     hint: str = "") -> torch.Tensor | None:
    """The op's ``[B, N]`` bool mask (True = real token) from an ``AttentionInterface`` mask.

    attention_mask: None; ``[B, N]`` (nonzero = real token); or 4-D ``[B or 1, 1 or H,
    N or 1, N]``, bool (True = attend) or additive float (0 = attend, ``<= -1e4`` =
    masked), the same for every query row and head. ``hint`` is appended to the error
    of a mask that is not padding-only. Raises TypeError / ValueError.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError("attn_implementation='mra' needs a tensor attention mask (or None), got "
                        f"{type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2:
        if shape != (batch, seq_len):
            raise ValueError(f"a 2-D attention_mask must be [B, N] = [{batch}, {seq_len}], got {shape}")
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if (attention_mask.dim() != 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads)
            or shape[2] not in (1, seq_len) or shape[3] != seq_len):
        raise ValueError(f"attention_mask must be [B, N] or 4-D [B or 1, 1 or H, N or 1, N] with "
                         f"B={batch}, H={heads}, N={seq_len}; got shape {shape}")
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        raise ValueError("a 4-D attention_mask must be bool (True = attend) or additive float "
                         f"(0 = attend), got {attention_mask.dtype}")
    row = attention_mask[:, :1, :1, :]
    # An expanded mask (stride 0, what mra_mask gives) is the same everywhere by construction.
    varies = [what for dim, what in ((2, "query rows"), (1, "heads"))
              if shape[dim] > 1 and attention_mask.stride(dim) != 0]
    if varies:
        _require((attention_mask == row).all(), NOT_PADDING_ONLY.format(what=" and ".join(varies)) + hint)
    if attention_mask.is_floating_point():
        keep = row == 0
        _require((keep | (row <= MASKED_AT_OR_BELOW)).all(),
                 "an additive float attention_mask must hold only 0 (attend) and large negative "
                 f"values (<= {MASKED_AT_OR_BELOW:g}, masked); other values are an attention bias, "
                 "which attn_implementation='mra' cannot add")
    else:
        keep = row
    return keep[:, 0, 0, :].expand(batch, seq_len)


# ---------------------------------------------------------------------------- the attention


@torch.compiler.assume_constant_result
def _op_takes() -> tuple[bool, bool]:
    """Whether the function in place takes (``enable_gqa``, ``scale``): the op gains
    parameters independently of this file. A constant to torch.compile, which calls it
    while tracing instead of tracing it (it had traced the cache below, with a warning on
    every compiled model: "Dynamo detected a call to a `functools.lru_cache`-wrapped
    function")."""
    params = _parameters(mra_compile.mra_attention)
    return "enable_gqa" in params, "scale" in params


@functools.lru_cache(maxsize=4)
def _parameters(fn) -> Any:
    return inspect.signature(fn).parameters  # (~20 us: once per function)


def mra_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function registered as ``"mra"``.

    module: the calling attention layer (its ``config`` holds the ``mra_*`` options, its
        ``is_causal`` must be False). query: ``[B, H, N, D]``; key, value: ``[B, H_kv, N, D]``
        with ``H`` a multiple of ``H_kv``. attention_mask: see ``key_padding_mask``.
        scaling: the logit scale (None = ``1/sqrt(D)``). kwargs: the interface's extras
        (``sliding_window`` is read; ``position_bias``, ``softcap``, ``s_aux``, ``sinks``
        are refused unless None; the rest is ignored, as by ``sdpa``).
    Returns ``(attn_output [B, N, H, D], None)``.
    """
    name = type(module).__name__
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if is_causal:
        raise ValueError(
            f"attn_implementation='mra' cannot run {name}: it is causal attention (a decoder, or "
            "a model configured with is_decoder=True) and MRA-2 has no causal form; use it for "
            "encoders (bidirectional self-attention)")
    for arg in UNSUPPORTED_KWARGS:
        if kwargs.get(arg) is not None:
            raise ValueError(f"attn_implementation='mra' cannot add {arg} to the attention logits "
                             f"({name})")
    opts = settings(getattr(module, "config", None))
    sliding = kwargs.get("sliding_window") is not None
    if sliding and opts["mra_sliding_window"] == "sdpa":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=False, **kwargs)

    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[2] != seq_len:
        raise ValueError(
            f"attn_implementation='mra' is self-attention over one sequence: {name} has {seq_len} "
            f"queries and {key.shape[2]} keys (cross-attention, or a cache)")
    if tuple(value.shape) != tuple(key.shape) or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"attn_implementation='mra' needs query [B, H, N, D] and key, value "
                         f"[B, H_kv, N, D]; got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    hint = ""
    if sliding:
        hint = (f" {name} is a sliding-window layer whose window does not cover this sequence: set "
                "model.config.mra_sliding_window = 'sdpa' to run such layers with exact local "
                "attention through sdpa.")
    mask = key_padding_mask(attention_mask, batch, heads, seq_len, hint)

    if not torch.compiler.is_compiling():
        if dropout and module.training:
            warn_once("dropout", f"attn_implementation='mra' applies no attention dropout "
                      f"(dropout={dropout} ignored): MRA-2 never forms the attention probabilities")
        if kwargs.get("output_attentions"):
            warn_once("output_attentions", "attn_implementation='mra' returns no attention weights")

    takes_gqa, takes_scale = _op_takes()
    extra: dict[str, Any] = {}
    if kv_heads != heads:
        if takes_gqa:
            extra["enable_gqa"] = True
        else:
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
    if scaling is not None:
        if takes_scale:
            extra["scale"] = scaling
        else:
            # Same function: MRA-2 sees q only through q . k / sqrt(D) and q's block means.
            factor = float(scaling) * math.sqrt(head_dim)
            if abs(factor - 1.0) > 1e-12:
                query = query * factor
    out = mra_compile.mra_attention(
        query, key, value, mask, block_per_row=opts["mra_block_per_row"],
        approx_mode=opts["mra_approx_mode"], block_size=opts["mra_block_size"],
        initial_prior_first_n_blocks=opts["mra_initial_prior_first_n_blocks"],
        initial_prior_diagonal_n_blocks=opts["mra_initial_prior_diagonal_n_blocks"], **extra,
    )
    return out.transpose(1, 2).contiguous(), None
