"""``MRASelfAttention``: multi-head self-attention whose attention is ``torch.ops.mra.attention``.

    import torch
    from mra_compile.nn import MRASelfAttention

    attn = MRASelfAttention(hidden_size=768, num_attention_heads=12, block_per_row=4)
    x = torch.randn(2, 4096, 768)
    mask = torch.ones(2, 4096); mask[1, 3000:] = 0      # 1 = real token, 0 = padding
    y = attn(x, mask)                                     # [2, 4096, 768]

The module holds the four projections of a Transformer attention layer (``query``,
``key``, ``value`` -- named as in Hugging Face's ``MraSelfAttention``, so their weights
load directly -- and ``out_proj``); everything between them is one call of the op.
It works under ``torch.compile(module, fullgraph=True)``. For training, gradients flow
through the projections and the op's autograd formula; the module adds nothing that would
block them.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mra_compile import options, validate
from mra_compile.options import Options

__all__ = ["MRASelfAttention"]

# The MraConfig fields this module reads; attention_probs_dropout_prob is accepted and
# ignored (see the class docstring).
CONFIG_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "block_per_row",
    "approx_mode",
    "initial_prior_first_n_blocks",
    "initial_prior_diagonal_n_blocks",
)


class MRASelfAttention(nn.Module):
    """Multi-head self-attention computed with MRA-2 (``torch.ops.mra.attention``).

    Args (the names of Hugging Face's ``MraConfig`` fields):
        hidden_size: model width; split into ``num_attention_heads`` heads of
            ``hidden_size // num_attention_heads`` dims.
        num_attention_heads: number of heads; must divide ``hidden_size``.
        block_per_row: exact ``block_size x block_size`` blocks per block row; a sequence
            with ``c`` real tokens gets ``block_per_row * ceil(c / block_size)`` blocks
            (default 4), whatever the padding of its batch. Hugging Face's
            ``MraSelfAttention`` instead fixes the budget from ``max_position_embeddings``; the two agree at
            ``N = max_position_embeddings`` (use
            ``mra_compile.integrations.transformers.patch_mra_model`` to keep Hugging
            Face's exact behaviour).
        approx_mode: ``"full"`` (MRA-2) or ``"sparse"`` (MRA-2-s, exact blocks only).
        initial_prior_first_n_blocks: always select the first ``f`` block rows/columns.
        initial_prior_diagonal_n_blocks: always select a band of ``g`` block diagonals.
        block_size: the block edge (default 32, as in MRA-2 and Hugging Face).
        num_blocks: a fixed budget of exact blocks per (batch, head) instead of
            ``block_per_row`` (clamped to ``n*n`` by the op).
        scale: the logit scale (default ``1/sqrt(head dim)``), a positive finite float.
        num_key_value_heads: grouped-query attention: ``key`` and ``value`` project to
            this many heads (a divisor of ``num_attention_heads``; default: as many),
            each shared by a group of query heads without being copied.
        bias: whether the projections have biases (default True).
        attention_probs_dropout_prob: accepted so that ``MraConfig`` values pass through,
            and ignored: MRA-2 never forms the ``N x N`` attention probabilities, so there
            is nothing to drop out (Hugging Face's ``MraSelfAttention`` also builds a
            dropout layer that it never calls). Put dropout on the output if you need it.
        device, dtype: for the parameters, as in ``torch.nn.Linear``.

    Forward:
        hidden_states: ``[B, N, hidden_size]``, float32 / float16 / bfloat16.
        attention_mask: optional ``[B, N]``, 1 (or True) for real tokens and 0 for padding.
            Padded positions get a zero attention output (then ``out_proj``'s bias)
            and are never attended to.
        Returns ``[B, N, hidden_size]`` in the dtype of ``hidden_states``' projections.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        *,
        block_per_row: int = 4,
        approx_mode: str = "full",
        initial_prior_first_n_blocks: int = 0,
        initial_prior_diagonal_n_blocks: int = 0,
        block_size: int = 32,
        num_blocks: int | None = None,
        scale: float | None = None,
        num_key_value_heads: int | None = None,
        bias: bool = True,
        attention_probs_dropout_prob: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        validate.check_int("hidden_size", hidden_size, 1)
        validate.check_int("num_attention_heads", num_attention_heads, 1)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
                f"({num_attention_heads})"
            )
        kv_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        validate.check_int("num_key_value_heads", kv_heads, 1)
        if num_attention_heads % kv_heads:
            raise ValueError(f"num_key_value_heads ({kv_heads}) must divide num_attention_heads "
                             f"({num_attention_heads})")
        validate.check_int("block_per_row", block_per_row, 1)
        if num_blocks is not None:
            validate.check_int("num_blocks", num_blocks, 1)
        # The remaining options are checked exactly as the op will check them.
        Options(num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
                initial_prior_diagonal_n_blocks, scale)
        del attention_probs_dropout_prob  # not applicable, see the docstring

        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = kv_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.block_per_row = block_per_row
        self.approx_mode = approx_mode
        self.initial_prior_first_n_blocks = initial_prior_first_n_blocks
        self.initial_prior_diagonal_n_blocks = initial_prior_diagonal_n_blocks
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scale = scale

        factory = {"device": device, "dtype": dtype}
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        kv_size = kv_heads * self.attention_head_size
        self.key = nn.Linear(hidden_size, kv_size, bias=bias, **factory)
        self.value = nn.Linear(hidden_size, kv_size, bias=bias, **factory)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)

    @classmethod
    def from_config(cls, config, **overrides) -> MRASelfAttention:
        """Build from a Hugging Face ``MraConfig`` (or any object or mapping with its fields).

        Reads ``hidden_size``, ``num_attention_heads``, ``block_per_row``, ``approx_mode``,
        ``initial_prior_first_n_blocks`` and ``initial_prior_diagonal_n_blocks`` (the
        last four optional, with MraConfig's defaults); ``overrides`` are passed to the
        constructor on top (e.g. ``dtype=torch.bfloat16``).
        """
        def get(name):
            if isinstance(config, Mapping):
                return config.get(name, _MISSING)
            return getattr(config, name, _MISSING)

        kwargs = {}
        for name in CONFIG_FIELDS:
            value = get(name)
            if value is not _MISSING:
                kwargs[name] = value
        for name in ("hidden_size", "num_attention_heads"):
            if name not in kwargs and name not in overrides:
                raise ValueError(f"config has no {name!r}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def budget(self, seq_len: int) -> int:
        """The blocks per (batch, head) of a sequence of ``seq_len`` real tokens."""
        if self.num_blocks is not None:
            return self.num_blocks
        return options.budget(self.block_per_row, seq_len, self.block_size)

    def _heads(self, x: torch.Tensor, batch: int, seq_len: int, heads: int) -> torch.Tensor:
        # [B, N, H*Dh] -> [B, H, N, Dh] as a view: the op reads strided inputs.
        return x.view(batch, seq_len, heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must have shape [B, N, {self.hidden_size}], "
                f"got {tuple(hidden_states.shape)}"
            )
        batch, seq_len, _ = hidden_states.shape
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        q = self._heads(self.query(hidden_states), batch, seq_len, H)
        k = self._heads(self.key(hidden_states), batch, seq_len, Hkv)
        v = self._heads(self.value(hidden_states), batch, seq_len, Hkv)
        # The op takes block_per_row itself: no argument depends on seq_len, so one graph
        # serves every length under torch.compile / torch.export.
        context = torch.ops.mra.attention(
            q, k, v, attention_mask, self.num_blocks, self.approx_mode, self.block_size,
            self.initial_prior_first_n_blocks, self.initial_prior_diagonal_n_blocks, self.scale,
            None if self.num_blocks is not None else self.block_per_row, Hkv != H,
        )
        context = context.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(context)

    def extra_repr(self) -> str:
        budget = (f"num_blocks={self.num_blocks}" if self.num_blocks is not None
                  else f"block_per_row={self.block_per_row}")
        return (f"hidden_size={self.hidden_size}, num_attention_heads={self.num_attention_heads}, "
                f"{budget}, approx_mode={self.approx_mode!r}, block_size={self.block_size}, "
                f"initial_prior_first_n_blocks={self.initial_prior_first_n_blocks}, "
                f"initial_prior_diagonal_n_blocks={self.initial_prior_diagonal_n_blocks}"
                + ("" if self.scale is None else f", scale={self.scale}")
                + ("" if self.num_key_value_heads == self.num_attention_heads
                   else f", num_key_value_heads={self.num_key_value_heads}"))


_MISSING = object()
