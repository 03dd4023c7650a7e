"""Where the forward's time goes: each kernel of one call, re-timed alone, and the whole op.

    python bench/profile_forward.py                    # N=4096, B*H=12, D=64, 4 blocks/row
    python bench/profile_forward.py --n 8192 --mode sparse --repeat 25
    python bench/profile_forward.py --n 8192 --dtype bfloat16

Records one call's kernels with ``mra_compile.build.trace_kernel_calls`` and times each
with its recorded arguments (median of ``--repeat`` back-to-back calls), then the whole
op the same way. The difference between the two totals is the glue: padding, block
selection, the work plan and the op's dispatch. Back-to-back timings have warm caches:
expect the interleaved rounds of ``bench_forward.py`` to be slower (see the README).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile import build  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    """Median ms of ``repeat`` back-to-back calls (one function: nothing to interleave)."""
    return common.median_ms({"fn": fn}, repeat)["fn"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="sequence length N")
    p.add_argument("--heads", type=int, default=12, help="B*H rows (B=1)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--mode", choices=("full", "sparse"), default="full")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(1, args.heads, args.n, args.head_dim, dtype=dtype) for _ in range(3))
    num_blocks = args.blocks_per_row * (-(-args.n // 32))

    def op():
        return torch.ops.mra.attention(q, k, v, None, num_blocks, args.mode)

    with torch.no_grad():
        for _ in range(3):
            op()  # builds or loads the kernels, fills the workspace
        with build.trace_kernel_calls() as calls:
            op()
        print(machine_line())
        print(f"N={args.n} B*H={args.heads} D={args.head_dim} "
              f"{args.blocks_per_row} blocks/row, {args.mode}, {args.dtype}; median of {args.repeat}")
        total = 0.0
        for call in calls:
            fn = build.kernel(call["op"], call["knobs"], call["target"], **call["static"])
            ms = median_ms(lambda f=fn, a=call["args"]: f(*a), args.repeat)
            total += ms
            knobs = " ".join(f"{key}={val}" for key, val in call["resolved"].items())
            print(f"  {call['op']:16s} {ms:7.2f} ms   {knobs}")
        whole = median_ms(op, args.repeat)
    print(f"  {'kernels':16s} {total:7.2f} ms")
    print(f"  {'whole op':16s} {whole:7.2f} ms   (glue and dispatch: {whole - total:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
