"""bf16 inference at small head dims: P kept in float32 for P v (``forward.SMALL_HEAD_DIM``)
against P rounded to bf16 (what every head dim did before 2026-12-07), on a CPU with
AVX-512-BF16.

One interleaved run per head dim (B=1, H=12, N=4096, sparse mode, ``block_per_row=4``):
the op as it is and the op with ``forward.SMALL_HEAD_DIM`` set to 0 (P rounded at every
D), alternating call by call. The launch cache is off for both (``MRA_COMPILE_LAUNCH_CACHE=0``:
it keys calls by their signature, which the constant is not part of), so both pay the
usual path's host work.

    python bench/bench_small_head_dims.py      # D = 1 2 4 8 16, bench/results/small_head_dims_cpu.md
    python bench/bench_small_head_dims.py --head-dims 1 8 --rounds 11 --out /tmp/small.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402
from mra_compile import forward  # noqa: E402
from mra_compile.targets import cpu  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import report_head  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--n", type=int, default=4096, help="sequence length N")
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds (median)")
    p.add_argument("--out", type=Path,
                   default=REPO_ROOT / "bench" / "results" / "small_head_dims_cpu.md")
    args = p.parse_args(argv)
    if not cpu.bf16_products():
        p.error("this CPU has no AVX-512-BF16: bf16 runs in float32 here, P is never rounded")
    if any(d < 1 for d in args.head_dims) or args.n < 1 or args.rounds < 1:
        p.error("--head-dims, --n and --rounds must be positive")
    os.environ["MRA_COMPILE_LAUNCH_CACHE"] = "0"
    kept = forward.SMALL_HEAD_DIM
    lines = report_head(
        "bf16 inference at small head dims: P in float32 for P v, or rounded to bf16",
        f"B*H=12 N={args.n} bf16, sparse, 4 blocks/row; median ms of {args.rounds} interleaved "
        f"rounds, the launch cache off; forward.SMALL_HEAD_DIM = {kept}",
        ["D", "P in float32 below SMALL_HEAD_DIM (today)", "P rounded to bf16", "ratio"])
    for line in lines:
        print(line)
    for D in args.head_dims:
        g = torch.Generator().manual_seed(D)
        q, k, v = (torch.randn(1, 12, args.n, D, generator=g).bfloat16() for _ in range(3))

        def call(small, q=q, k=k, v=v):
            forward.SMALL_HEAD_DIM = small
            try:
                mra_compile.mra_attention(q, k, v, None, block_per_row=4, approx_mode="sparse")
            finally:
                forward.SMALL_HEAD_DIM = kept

        fns = {"today": lambda: call(kept), "rounded": lambda: call(0)}
        for fn in fns.values():
            fn()  # (builds or loads the kernels)
        ms = common.median_ms(fns, args.rounds, alternate=True)
        lines.append(f"| {D} | {ms['today']:.2f} | {ms['rounded']:.2f} | "
                     f"{ms['today'] / ms['rounded']:.2f}x |")
        print(lines[-1])
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python bench/bench_small_head_dims.py", *given])
    lines += ["", f"Command: `{command}`"]
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
