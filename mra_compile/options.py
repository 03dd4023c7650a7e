"""The op's options, validated once into a frozen ``Options`` that the op, the plan, the
forward and the backward take.

The fields are the op's arguments after q, k, v, mask, in schema order: the torch op
schemas (``mra_compile.op``) are generated from them, so an option is added here (a
field, its check in ``__post_init__``), where it is used, and in the user API.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

from mra_compile import validate

MODES = ("full", "sparse")
MIN_BLOCK_SIZE = 8
MAX_BLOCK_SIZE = 256
DEFAULT_BLOCK_PER_ROW = 4  # the budget when neither num_blocks nor block_per_row is given


@dataclass(frozen=True)
class Options:
    """The budget, one of (docs/spec.md, step 3 and "Per-sequence budget"):
    num_blocks: exact blocks per (batch, head), >= 1, one number for every row;
    block_per_row: ``r`` blocks per block row, >= 1: a sequence with ``c`` real tokens
        gets ``r * ceil(c / block_size)`` blocks. With neither, ``block_per_row = 4``.
    approx_mode: "full" (MRA-2) or "sparse" (MRA-2-s: exact blocks only).
    block_size: block edge b, a power of two in [8, 256].
    initial_prior_first_n_blocks / initial_prior_diagonal_n_blocks: the selection priors.
    scale: the logit scale, a positive finite float; None: ``1/sqrt(D)``.
    enable_gqa: k, v may have fewer heads than q (a divisor of H), shared by groups of
        query heads (docs/spec.md, "Extensions"), as in SDPA.

    ``schema`` metadata: the default the public op's schema gives the argument.
    ``block_per_row`` rather than a ``num_blocks`` computed from N keeps the op's arguments
    free of the sequence length: one graph serves every length under torch.compile."""

    num_blocks: int | None = field(default=None, metadata={"schema": True})
    approx_mode: str = field(default="full", metadata={"schema": True})
    block_size: int = field(default=32, metadata={"schema": True})
    initial_prior_first_n_blocks: int = field(default=0, metadata={"schema": True})
    initial_prior_diagonal_n_blocks: int = field(default=0, metadata={"schema": True})
    scale: float | None = field(default=None, metadata={"schema": True})
    block_per_row: int | None = field(default=None, metadata={"schema": True})
    enable_gqa: bool = field(default=False, metadata={"schema": True})

    def __post_init__(self):
        # int checks accept torch.SymInt: a size-derived option under torch.compile.
        if self.num_blocks is not None:
            if self.block_per_row is not None:
                raise ValueError("give num_blocks or block_per_row, not both")
            validate.check_int("num_blocks", self.num_blocks, 1)
        else:
            bpr = DEFAULT_BLOCK_PER_ROW if self.block_per_row is None else self.block_per_row
            validate.check_int("block_per_row", bpr, 1)
            # Any budget of n or more blocks per row selects every block (n < 2**31):
            # capping it keeps the products within int64.
            if isinstance(bpr, int):
                bpr = min(bpr, validate.INDEX_LIMIT)
            object.__setattr__(self, "block_per_row", bpr)
        if not isinstance(self.approx_mode, str):
            raise TypeError(f"approx_mode must be a str, got {type(self.approx_mode).__name__}")
        if self.approx_mode not in MODES:
            raise ValueError(f"approx_mode must be 'full' or 'sparse', got {self.approx_mode!r}")
        b = validate.check_int("block_size", self.block_size, MIN_BLOCK_SIZE)
        if b & (b - 1) or b > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be a power of two between {MIN_BLOCK_SIZE} and "
                             f"{MAX_BLOCK_SIZE}, got {b}")
        validate.check_int("initial_prior_first_n_blocks", self.initial_prior_first_n_blocks, 0)
        validate.check_int("initial_prior_diagonal_n_blocks",
                           self.initial_prior_diagonal_n_blocks, 0)
        if self.scale is not None:
            validate.check_scale(self.scale)
        if not isinstance(self.enable_gqa, bool):
            raise TypeError(f"enable_gqa must be a bool, got {type(self.enable_gqa).__name__}")

    def max_blocks(self, n, nk=None):
        """K, the selected blocks of the fullest row, for ``n`` query block rows and ``nk``
        key blocks (default ``n``): ``num_blocks`` or ``block_per_row * n``, at most
        ``n * nk`` (``n``, ``nk`` may be SymInts: no guard)."""
        total = n * (n if nk is None else nk)
        if self.num_blocks is not None:
            want = self.num_blocks
        else:
            assert self.block_per_row is not None  # (set by __post_init__)
            want = self.block_per_row * n
        if type(want) is int and type(total) is int:  # (sym_min: ~15 us a call)
            return min(want, total)
        return torch.sym_min(want, total)

    @property
    def full(self) -> bool:
        return self.approx_mode == "full"

    @property
    def first_n(self) -> int:
        return self.initial_prior_first_n_blocks

    @property
    def diagonal_n(self) -> int:
        return self.initial_prior_diagonal_n_blocks

    def as_args(self) -> tuple:
        """The values in schema order (the op's arguments after q, k, v, mask)."""
        return tuple([getattr(self, name) for name in _NAMES])

    def blocks(self, N: int) -> int:
        """Blocks per row ``n`` of a sequence of ``N`` tokens (padded to whole blocks)."""
        return -(-N // self.block_size)


# Field annotations (strings, from __future__ annotations) as torch schema types.
_SCHEMA_TYPES: dict[object, str] = {"int": "int", "str": "str", "float | None": "float?",
                                    "int | None": "int?", "bool": "bool"}


def _schema_default(value) -> str:
    if value is None:
        return "None"
    return json.dumps(value) if isinstance(value, str) else str(value)


def schema(defaults: bool) -> str:
    """The options as torch schema arguments: ``int num_blocks, str approx_mode="full", ...``
    (``defaults``: with the public op's defaults)."""
    parts = []
    fields = dataclasses.fields(Options)
    for i, f in enumerate(fields):
        text = f"{_SCHEMA_TYPES[f.type]} {f.name}"
        # Trailing defaults even without ``defaults``: the compiled graphs' calls leave
        # out trailing arguments equal to their default.
        trailing = all(g.default is not dataclasses.MISSING for g in fields[i:])
        if (defaults and f.metadata.get("schema")) or trailing:
            text += "=" + _schema_default(f.default)
        parts.append(text)
    return ", ".join(parts)


_PLAIN = (int, float, str, bool, type(None))
_PARSED: dict[tuple, Options] = {}


def parse(args: tuple) -> Options:
    """``Options(*args)``, kept per distinct arguments of plain Python types (an op call
    parses its options twice; the checks cost ~4 us each time, and far more when torch
    work before the call has left the caches cold). Others (SymInts under
    torch.compile) are parsed each time."""
    if not all(type(a) in _PLAIN for a in args):
        return Options(*args)
    key = tuple((type(a), a) for a in args)  # (True and 1 are equal keys otherwise)
    opts = _PARSED.get(key)
    if opts is None:
        opts = Options(*args)  # (raises for bad options: nothing is kept)
        if len(_PARSED) >= 1024:
            _PARSED.clear()
        _PARSED[key] = opts
    return opts


def count() -> int:
    """How many options the op takes after q, k, v, mask."""
    return _COUNT


# (read on every call of the op: ``fields`` cost 12-20 us there after other heavy torch
# work, the interpreter's caches cold; so did ``as_args`` going through it. Not an
# ``operator.attrgetter``: torch.compile does not trace one.)
_NAMES = tuple(f.name for f in dataclasses.fields(Options))
_COUNT = len(_NAMES)


def budget(block_per_row: int, N: int, block_size: int) -> int:
    """``num_blocks`` for a budget of ``block_per_row`` blocks per block row of a sequence
    of ``N`` tokens (at least one block row): ``block_per_row * ceil(N / block_size)``."""
    validate.check_int("block_per_row", block_per_row, 1)
    validate.check_int("block_size", block_size, MIN_BLOCK_SIZE)
    # Any budget of n or more blocks per row selects every block (num_blocks is clamped to
    # n * n, n < 2**31): capping it here keeps the product within int64.
    if isinstance(block_per_row, int):
        block_per_row = min(block_per_row, validate.INDEX_LIMIT)
    return block_per_row * max(-(-N // block_size), 1)
