"""The op in a ``torch.compile``d inference graph against the eager call (CPU).

A compiled graph calls the op's decomposition: with nothing to differentiate,
``mra::attention_inference``, the same kernels and launch replay as an eager call; with
a gradient, ``mra::attention_fwd``. Before ``attention_inference`` existed the inference
graphs called ``attention_fwd`` too, whose forward writes what a backward would read and
replays no launches: its column here ("fwd op, compiled") is that graph, timed in the
same rounds. Inference (``torch.no_grad``), fp32, one interleaved run per size; the
inputs contiguous ``[B, H, N, D]`` or, as an attention layer passes them, transposed
views of ``[B, N, H, D]`` (``--layout heads-last``).

    python bench/bench_compiled.py                          # N = 512, 1024, 4096
    python bench/bench_compiled.py --layout heads-last --sizes 1000 4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.*)
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def inputs(n: int, args) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    shape = (1, args.heads, n, args.head_dim)
    if args.layout == "heads-last":
        return tuple(torch.randn(1, n, args.heads, args.head_dim, generator=g).transpose(1, 2)
                     for _ in range(3))
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def row(n: int, args) -> str:
    q, k, v = inputs(n, args)
    blocks = args.blocks_per_row * (-(-n // 32))

    def op(q, k, v):
        return torch.ops.mra.attention(q, k, v, None, blocks, args.mode)

    def fwd_op(q, k, v):  # (what an inference graph called before attention_inference)
        return torch.ops.mra.attention_fwd(q, k, v, None, None, blocks, args.mode)[0]

    compiled = torch.compile(op, fullgraph=True)
    compiled_fwd = torch.compile(fwd_op, fullgraph=True)
    fns = {"eager": lambda: op(q, k, v), "compiled": lambda: compiled(q, k, v),
           "fwd": lambda: compiled_fwd(q, k, v)}
    with torch.no_grad():
        same = torch.equal(compiled(q, k, v), op(q, k, v))
        for fn in fns.values():  # (builds, compiles, fills the caches)
            for _ in range(3):
                fn()
        ms = common.median_ms(fns, args.repeat, alternate=True)
    return (f"| {n} | {ms['eager']:.2f} | {ms['compiled']:.2f} | {ms['fwd']:.2f} | "
            f"{ms['compiled'] / ms['eager']:.2f}x | {ms['fwd'] / ms['eager']:.2f}x | "
            f"{'yes' if same else 'NO'} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 4096])
    p.add_argument("--heads", type=int, default=12, help="B*H (B = 1)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--mode", choices=("full", "sparse"), default="full")
    p.add_argument("--layout", choices=("contiguous", "heads-last"), default="contiguous")
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    print(machine_line())
    print(f"B*H={args.heads} D={args.head_dim} {args.blocks_per_row} blocks/row, {args.mode}, "
          f"float32, {args.layout}, inference; median of {args.repeat} interleaved rounds")
    print()
    print("| N | eager ms | compiled ms | fwd op, compiled ms | compiled / eager "
          "| fwd op compiled / eager | compiled = eager, bit for bit |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        print(row(n, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
