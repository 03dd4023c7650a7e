"""Accuracy report: MRA-2's error against exact attention as the budget grows, next to a
sliding window and random blocks with the same number of exact blocks.

Run from the repository checkout; writes ``bench/results/accuracy.md`` (and
``bench/results/accuracy.png`` with ``--plot``). What is measured, on which inputs, is
described in ``mra_compile/tools/accuracy.py``.

    python bench/accuracy.py --plot                 # N=4096, H=4, D=64, 1..16 blocks per row
    python bench/accuracy.py --seq-len 2048 --blocks-per-row 1 4 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mra_compile.tools import accuracy  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402
from mra_compile.tools.common import pyplot  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096, help="N (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="H (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="D (default: %(default)s)")
    p.add_argument("--blocks-per-row", type=int, nargs="+",
                   default=list(accuracy.DEFAULT_BLOCKS_PER_ROW),
                   help="budgets, exact 32x32 blocks per block row (default: %(default)s)")
    p.add_argument("--structures", nargs="+", default=list(accuracy.STRUCTURES),
                   choices=list(accuracy.STRUCTURES), help="inputs (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--md", type=Path, default=RESULTS / "accuracy.md",
                   help="markdown output (default: bench/results/accuracy.md)")
    p.add_argument("--plot", action="store_true",
                   help="also write accuracy.png next to the markdown (needs matplotlib)")
    args = p.parse_args(argv)
    if args.seq_len < 64 or args.heads < 1 or args.head_dim < 2 or min(args.blocks_per_row) < 1:
        p.error("need --seq-len >= 64, --heads >= 1, --head-dim >= 2, --blocks-per-row >= 1")
    return args


def report(args, rows, seconds: float) -> str:
    n = -(-args.seq_len // accuracy.BLOCK_SIZE)
    intro = (
        f"Relative L2 error of each method against exact softmax attention, "
        f"‖out − exact‖ / ‖exact‖ per (batch, head), mean over {args.heads} heads; "
        f"N={args.seq_len} ({n} block rows), D={args.head_dim}, block 32, seed {args.seed}. "
        "Every method computes the same number of exact 32×32 blocks: "
        "`blocks per row` × n. MRA-2 (`torch.ops.mra.attention`, fp32, \"full\": the "
        "selected blocks exactly plus a low-resolution estimate of the rest) and MRA-2-s "
        "(\"sparse\": the selected blocks only) choose their blocks from the input; the "
        "sliding window (the blocks around the diagonal, Longformer's local pattern) and "
        "random blocks (distinct uniform blocks per block row, BigBird's random pattern) "
        "are fixed, computed as exact block-sparse attention over their blocks "
        "(`mra2_reference`, float64, selection forced, sparse mode). Bold: the smallest "
        "error in the row. Errors above 100% are possible where exact attention is spread "
        "over many tokens with independent values: its output then has a small norm, and "
        "an average over fewer tokens is further from it than zero is.")
    return "\n\n".join([
        "# MRA-2 accuracy at equal budget",
        intro,
        accuracy.markdown(rows),
        f"{machine_line()}; {seconds:.0f} s. Reproduce: `python bench/accuracy.py --plot`.",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        pyplot()  # fail before the run if matplotlib is missing
    start = time.perf_counter()
    rows = []
    for structure in args.structures:
        print(f"{structure}:", flush=True)
        rows += accuracy.measure(
            structure, seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim,
            blocks_per_row=args.blocks_per_row, seed=args.seed,
            progress=lambda r: print(f"  {r.blocks_per_row:3d} blocks per row: " + ", ".join(
                f"{m} {100 * e:.2f}%" for m, e in r.errors.items()), flush=True))
    text = report(args, rows, time.perf_counter() - start)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(text + "\n")
    print(f"\nwrote {args.md}")
    if args.plot:
        png = args.md.with_suffix(".png")
        accuracy.plot(rows, png, title=f"Relative error vs exact attention at equal budget "
                                       f"(N={args.seq_len}, H={args.heads}, D={args.head_dim})")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
