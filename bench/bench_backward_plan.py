"""A training step with the backward's unit plans from the ``bwd_plan`` kernel against the
same step with them made on the host (CPU, in one process).

The CPU backward needs two plans of the selected blocks (by query block, by key block)
and where dq's units read dS; ``bwd_plan`` (``mra_compile/plan_tir.py``) makes them in
one kernel, rows in parallel; before, ~25 numpy and torch steps made them on the host.
The "host" calls here take that path again: the kernel registry's ``bwd_plan`` entry is
withheld from the CPU for them (``mra_compile.kernels.KERNELS``), everything else the
same. Each round runs both steps (forward, then ``backward``), alternating their order;
fp32, full mode, B*H = 12, D = 64, 4 blocks per row.

    python bench/bench_backward_plan.py                     # N = 512, 1024, 4096, 8192
    python bench/bench_backward_plan.py --sizes 1024 --repeat 41
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile import kernels  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def row(n: int, args) -> str:
    kernel = kernels.KERNELS["bwd_plan"]
    withheld = dataclasses.replace(kernel, families=())
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=g).requires_grad_()
               for _ in range(3))
    grad = torch.randn(q.shape, generator=g)
    blocks = args.blocks_per_row * (n // 32)

    def step(entry):
        def run():  # -> the step's gradients
            kernels.KERNELS["bwd_plan"] = entry
            try:
                torch.ops.mra.attention(q, k, v, None, blocks, "full").backward(grad)
            finally:
                kernels.KERNELS["bwd_plan"] = kernel
            grads = [x.grad for x in (q, k, v)]
            for x in (q, k, v):
                x.grad = None
            return grads
        return run

    fns = {"host": step(withheld), "kernel": step(kernel)}
    # (the first call builds the kernels; the same gradients either way)
    grads = {name: fn() for name, fn in fns.items()}
    same = all(torch.equal(a, b) for a, b in zip(grads["host"], grads["kernel"]))
    ms = common.median_ms(fns, args.repeat, alternate=True)
    return (f"| {n} | {ms['host']:.2f} | {ms['kernel']:.2f} | {ms['kernel'] / ms['host']:.3f}x "
            f"| {'yes' if same else 'NO'} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 4096, 8192])
    p.add_argument("--heads", type=int, default=12, help="B*H (B = 1)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--repeat", type=int, default=21)
    args = p.parse_args()
    print(machine_line())
    print(f"B*H={args.heads} D={args.head_dim} {args.blocks_per_row} blocks/row, full, float32; "
          f"forward + backward, median of {args.repeat} alternating rounds")
    print()
    print("| N | host plans ms | bwd_plan kernel ms | kernel / host | same gradients |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        print(row(n, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
