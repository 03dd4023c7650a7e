"""MRA-2's error against exact attention, next to fixed sparse patterns at the same budget.

For a budget of ``bpr`` exact ``32 x 32`` blocks per block row (``bpr * n`` blocks per
head, ``n = N / 32``), on inputs with realistic structure, this measures the relative
error of

* MRA-2 (``torch.ops.mra.attention``, "full": the selected blocks exactly, the rest at
  low resolution) and MRA-2-s ("sparse": the selected blocks only);
* a sliding window: the ``bpr`` blocks around the diagonal of each block row
  (Longformer's local pattern, at block granularity);
* random blocks: ``bpr`` distinct blocks per block row drawn uniformly (BigBird's random
  pattern).

The two fixed patterns are computed as exact block-sparse attention over their blocks
(MRA-2-s restricted to the given blocks: ``mra_compile.reference.mra2_reference`` in
float64 with ``selection=`` forced and ``approx_mode="sparse"``), so all four use exactly
the same number of exact blocks; MRA-2 chooses its blocks from the input, the others do
not. This is the MRA paper's comparison against Longformer / BigBird at equal budget.

Inputs (``[B, H, N, D]``, values N(0, 1)):

* ``local+prefix``: ``mra_compile.tools.common.local_prefix_inputs``, the demo's input:
  queries and keys follow a smooth random walk (each token attends mostly to its
  neighbours) plus a 32-token prefix that every query also attends to (global tokens);
* ``topics``: the sequence is a run of segments (16-256 tokens, not aligned to blocks),
  each about one of ``N / 128`` topics; a topic recurs at random places, and a token
  attends to the tokens of its own topic wherever they are (clustered, non-local
  attention, ~128 tokens per topic); tokens of a topic share half of their value vector
  (keys that cluster come from similar hidden states, so values do too);
* ``noise``: i.i.d. N(0, 1) queries and keys (flat attention, no structure): a control.

Used by ``bench/accuracy.py`` (the report) and ``mra-compile bench --plot``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mra_compile.reference import exact_attention, mra2_reference
from mra_compile.tools.common import (
    BLOCK_SIZE,
    local_prefix_inputs,
    pyplot,
    random_qkv,
    relative_error,
)

DEFAULT_BLOCKS_PER_ROW = (1, 2, 4, 8, 16)
METHODS = ("MRA-2", "MRA-2-s", "sliding window", "random blocks")

TOKENS_PER_TOPIC = 128  # N // 128 topics: with segments of ~136 tokens, most recur ~once
TOPIC_LOGIT = 6.0  # q.k/sqrt(D) between two tokens of the same topic (on average)
TOPIC_NOISE = 0.5  # per-token deviation from the topic direction
SEGMENT_TOKENS = (16, 256)  # segment lengths, uniform in this range


# ---------------------------------------------------------------------------- inputs

def topic_inputs(B, H, N, D, gen):
    """q, k, v [B, H, N, D] whose attention clusters by topic (see the module docstring).

    Every head has its own topic directions and the same segment layout per batch row.
    Tokens of a topic also share part of their value vector (half of its variance), as
    similar tokens do in a trained model.
    """
    topics = max(2, N // TOKENS_PER_TOPIC)
    centres = torch.randn(B, H, topics, D, generator=gen)
    centres = centres / centres.norm(dim=-1, keepdim=True) * math.sqrt(D)
    labels = torch.empty(B, N, dtype=torch.long)
    lo, hi = SEGMENT_TOKENS
    for b in range(B):
        start = 0
        while start < N:
            length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            labels[b, start:start + length] = int(torch.randint(0, topics, (1,), generator=gen))
            start += length
    index = labels[:, None, :, None].expand(B, H, N, D)
    base = centres.gather(2, index)  # [B, H, N, D]
    scale = math.sqrt(TOPIC_LOGIT / math.sqrt(D))  # same topic: scale^2 * D / sqrt(D)
    q = scale * (base + TOPIC_NOISE * torch.randn(B, H, N, D, generator=gen))
    k = scale * (base + TOPIC_NOISE * torch.randn(B, H, N, D, generator=gen))
    # Values: a topic part and a token part of equal variance (unit variance in all).
    topic_values = torch.randn(B, H, topics, D, generator=gen).gather(2, index)
    v = (topic_values + torch.randn(B, H, N, D, generator=gen)) / math.sqrt(2.0)
    return q, k, v


STRUCTURES = {
    "local+prefix": local_prefix_inputs,
    "topics": topic_inputs,
    "noise": random_qkv,
}

STRUCTURE_NOTES = {
    "local+prefix": "smooth random-walk queries/keys (local attention) plus a 32-token "
                    "prefix every query attends to (global tokens); the demo's input",
    "topics": f"segments of {SEGMENT_TOKENS[0]}-{SEGMENT_TOKENS[1]} tokens, each on one of N/"
              f"{TOKENS_PER_TOPIC} topics that recur at random places; tokens attend to their "
              "topic anywhere in the sequence and share half their value vector with it",
    "noise": "i.i.d. N(0,1) queries/keys: flat attention, no structure (control)",
}


# ---------------------------------------------------------------------------- patterns

def window_blocks(n: int, bpr: int) -> torch.Tensor:
    """Bool [n, n]: ``bpr`` consecutive blocks per row around the diagonal, kept inside."""
    bpr = min(bpr, n)
    first = (torch.arange(n) - (bpr - 1) // 2).clamp(0, n - bpr)
    cols = first[:, None] + torch.arange(bpr)[None, :]
    out = torch.zeros(n, n, dtype=torch.bool)
    out.scatter_(1, cols, True)
    return out


def random_blocks(B: int, H: int, n: int, bpr: int, gen) -> torch.Tensor:
    """Bool [B, H, n, n]: ``bpr`` distinct uniformly random blocks in every block row."""
    bpr = min(bpr, n)
    cols = torch.rand(B, H, n, n, generator=gen).argsort(dim=-1)[..., :bpr]
    out = torch.zeros(B, H, n, n, dtype=torch.bool)
    out.scatter_(-1, cols, True)
    return out


def block_sparse_attention(q, k, v, blocks: torch.Tensor) -> torch.Tensor:
    """Exact attention restricted to the given blocks (bool [B, H, n, n] or [n, n]), float64."""
    B, H, N, _ = q.shape
    n = -(-N // BLOCK_SIZE)
    blocks = blocks.expand(B, H, n, n)
    return mra2_reference(q.double(), k.double(), v.double(), num_blocks=int(blocks[0, 0].sum()),
                          approx_mode="sparse", block_size=BLOCK_SIZE, selection=(blocks, blocks))


# ---------------------------------------------------------------------------- measurement

@dataclass
class Row:
    structure: str
    blocks_per_row: int
    share: float  # fraction of the n*n blocks computed exactly
    errors: dict  # method -> mean relative L2 error over (batch, head)


def measure(structure: str, *, seq_len: int = 4096, heads: int = 4, head_dim: int = 64,
            batch: int = 1, blocks_per_row=DEFAULT_BLOCKS_PER_ROW, seed: int = 0,
            methods=METHODS, progress=None) -> list[Row]:
    """Errors of each method at each budget on one input of the given structure."""
    import mra_compile

    gen = torch.Generator().manual_seed(seed)
    q, k, v = STRUCTURES[structure](batch, heads, seq_len, head_dim, gen)
    exact = exact_attention(q.double(), k.double(), v.double())
    n = -(-seq_len // BLOCK_SIZE)
    rows = []
    for bpr in blocks_per_row:
        errors = {}
        for method in methods:
            if method in ("MRA-2", "MRA-2-s"):
                mode = "full" if method == "MRA-2" else "sparse"
                out = mra_compile.mra_attention(q, k, v, block_per_row=bpr, approx_mode=mode)
            elif method == "sliding window":
                out = block_sparse_attention(q, k, v, window_blocks(n, bpr))
            elif method == "random blocks":
                out = block_sparse_attention(q, k, v, random_blocks(batch, heads, n, bpr, gen))
            else:
                raise ValueError(f"unknown method {method!r}")
            errors[method] = relative_error(out.double(), exact)
        rows.append(Row(structure, bpr, min(bpr, n) / n, errors))
        if progress:
            progress(rows[-1])
    return rows


# ---------------------------------------------------------------------------- output

def markdown(rows: list[Row], methods=METHODS) -> str:
    """One table per structure: rows = budget, columns = methods (relative error, %)."""
    parts = []
    for structure in dict.fromkeys(r.structure for r in rows):
        lines = [f"**{structure}**: {STRUCTURE_NOTES.get(structure, '')}", "",
                 "| blocks per row | exact blocks | " + " | ".join(methods) + " |",
                 "|---:|---:|" + "---:|" * len(methods)]
        for r in (r for r in rows if r.structure == structure):
            best = min(r.errors[m] for m in methods)
            cells = []
            for m in methods:
                cell = f"{100 * r.errors[m]:.2f}%"
                cells.append(f"**{cell}**" if r.errors[m] == best else cell)
            lines.append(f"| {r.blocks_per_row} | {100 * r.share:.1f}% | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: list[Row], path, methods=METHODS, title=None) -> None:
    """Error vs blocks per row (log-log), one panel per structure; writes a PNG."""
    plt = pyplot()
    structures = list(dict.fromkeys(r.structure for r in rows))
    fig, axes = plt.subplots(1, len(structures), figsize=(max(6.4, 4.6 * len(structures)), 4.2),
                             squeeze=False)
    styles = {"MRA-2": ("C0", "o", "-"), "MRA-2-s": ("C0", "s", "--"),
              "sliding window": ("C1", "^", "-"), "random blocks": ("C2", "v", "-")}
    for ax, structure in zip(axes[0], structures):
        sub = [r for r in rows if r.structure == structure]
        x = [r.blocks_per_row for r in sub]
        for m in methods:
            color, marker, line = styles.get(m, (None, "o", "-"))
            ax.plot(x, [100 * r.errors[m] for r in sub], marker=marker, linestyle=line,
                    color=color, label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("exact 32x32 blocks per block row")
        ax.set_ylabel("relative error vs exact attention (%)")
        ax.set_title(structure)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

