"""Cross-attention on the CPU: the op against SDPA, and against its own self-attention at
the longer length (what the padding of the shorter side to one length costs).

Each shape in one interleaved run (fp32, B=1, H=12, D=64, 4 blocks per query block row,
``block_per_row=4``): the op with ``Nq`` queries and ``Nk`` keys in "full" and "sparse"
mode, ``scaled_dot_product_attention`` on the same q, k, v, and the op on ``max(Nq, Nk)``
tokens on both sides (self-attention; the same padded length inside). Then the op in
"full" mode with a key mask and a query mask (the last eighth of each side padded), as
it runs (from the second call of a shape on, a replay of its kernel launches, the masks
written again by each: ``mra_compile.launch_cache``) and the usual way every call
(``MRA_COMPILE_LAUNCH_CACHE=0``, as cross-attention ran before 2026-12-06).

    python bench/bench_cross.py                          # writes bench/results/cross_cpu.md
    python bench/bench_cross.py --shapes 1024x8192 --repeat 5 --out /tmp/cross.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402
from mra_compile import launch_cache  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

HEADS, HEAD_DIM, BLOCKS_PER_ROW = 12, 64, 4


def shape(text: str) -> tuple[int, int]:
    nq, _, nk = text.partition("x")
    return int(nq), int(nk)


def run_shape(Nq: int, Nk: int, repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, Nq, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, HEADS, Nk, HEAD_DIM, generator=g) for _ in range(2))
    N = max(Nq, Nk)
    qs, ks, vs = (torch.randn(1, HEADS, N, HEAD_DIM, generator=g) for _ in range(3))

    def op(mode, *x, **kw):
        return lambda: mra_compile.mra_attention(*x, block_per_row=BLOCKS_PER_ROW,
                                                 approx_mode=mode, **kw)

    def usual(fn):
        def call():
            before = os.environ.get(launch_cache.ENV)
            os.environ[launch_cache.ENV] = "0"
            try:
                return fn()
            finally:
                if before is None:
                    del os.environ[launch_cache.ENV]
                else:
                    os.environ[launch_cache.ENV] = before
        return call

    key_mask, query_mask = torch.ones(1, Nk), torch.ones(1, Nq)
    key_mask[:, Nk - Nk // 8:] = 0
    query_mask[:, Nq - Nq // 8:] = 0
    masked = op("full", q, k, v, key_mask, query_mask=query_mask)
    fns = {"full": op("full", q, k, v), "sparse": op("sparse", q, k, v),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
           "self_full": op("full", qs, ks, vs), "masked": masked, "masked_usual": usual(masked)}
    with torch.no_grad():
        for fn in fns.values():  # warm-up: kernels loaded, caches filled
            fn()
        return common.median_ms(fns, repeat)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", type=shape,
                   default=[(1024, 8192), (8192, 1024), (4096, 4096)],
                   help="NqxNk pairs (default: 1024x8192 8192x1024 4096x4096)")
    p.add_argument("--repeat", type=int, default=9, help="interleaved rounds (median)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "cross_cpu.md")
    args = p.parse_args()
    lines = [machine_line(), "",
             f"fp32, B=1, H={HEADS}, D={HEAD_DIM}, block_per_row={BLOCKS_PER_ROW}; median of "
             f"{args.repeat} interleaved rounds, ms. self full: the op on max(Nq, Nk) tokens on "
             "both sides.", "",
             "| Nq | Nk | op full | op sparse | SDPA | SDPA / op full | self full (max length) "
             "| masked full | masked full, usual path every call |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for Nq, Nk in args.shapes:
        t = run_shape(Nq, Nk, args.repeat)
        lines.append(f"| {Nq} | {Nk} | {t['full']:.2f} | {t['sparse']:.2f} | {t['sdpa']:.2f} | "
                     f"{t['sdpa'] / t['full']:.2f}x | {t['self_full']:.2f} | {t['masked']:.2f} | "
                     f"{t['masked_usual']:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", "Command: `python bench/bench_cross.py "
              + " ".join(["--shapes", *(f"{a}x{b}" for a, b in args.shapes),
                          "--repeat", str(args.repeat)]) + "`"]
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
