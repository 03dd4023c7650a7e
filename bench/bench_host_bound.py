"""How much of an inference call is host work: the op against a replay of its own kernel
launches (CPU).

The op's kernels for one input are recorded once (``mra_compile.build.trace_kernel_calls``:
each kernel with the arguments it was given); the replay calls them again with the same
tensors and nothing else (no validation, no preparation, no selection read-back, no
scratch lookups). Its outputs are the op's exactly (same inputs: the data-dependent plan is
the same), so the ratio replay / op bounds what caching a call's host work per signature
(a plan, FlashInfer-style) could save. Each call runs right after ``--before`` (dense SDPA
on the same q, k, v: the rounds of ``bench_roofline_cpu.py`` run the sparse op right after
it; or nothing), op and replay alternating, median of ``--repeat``.

    python bench/bench_host_bound.py --sizes 512 4096 8192 --mode sparse
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra)
from mra_compile import build  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

HEADS, HEAD_DIM, BLOCKS_PER_ROW = 12, 64, 4


def recorded_launches(op):
    """The kernels ``op()`` launches, as (kernel, arguments) to call again."""
    with build.trace_kernel_calls() as calls:
        op()
    return [(build.kernel(c["op"], c["knobs"], c["target"], **c["static"]), c["args"])
            for c in calls], [c["op"] for c in calls]


def one_size(n: int, mode: str, before: str, repeat: int) -> tuple[float, float, list[str]]:
    """(op ms, replay ms, the kernels) at N = ``n``, each call right after ``before``."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for _ in range(3))
    nb = BLOCKS_PER_ROW * (n // 32)

    def op():
        return torch.ops.mra.attention(q, k, v, None, nb, mode)

    op()
    # (the replay writes into the recorded call's output and scratch, as the op would)
    launches, names = recorded_launches(op)

    def replay():
        for kernel, args in launches:
            kernel(*args)

    pre = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "none": lambda: None}[before]
    times: dict[str, list[float]] = {"op": [], "replay": []}
    for i in range(repeat):
        order = (("op", op), ("replay", replay)) if i % 2 else (("replay", replay), ("op", op))
        for name, fn in order:
            pre()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return (statistics.median(times["op"]) * 1e3, statistics.median(times["replay"]) * 1e3,
            names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 8192])
    parser.add_argument("--mode", choices=["full", "sparse"], default="sparse")
    parser.add_argument("--before", choices=["sdpa", "none"], default="sdpa")
    parser.add_argument("--repeat", type=int, default=31)
    args = parser.parse_args()
    print(machine_line())
    print(f"fp32, B=1, H={HEADS}, D={HEAD_DIM}, {BLOCKS_PER_ROW} blocks per row, {args.mode} "
          f"mode; each call right after: {args.before}; op and replay alternating, median "
          f"of {args.repeat}; ms\n")
    print("| N | op | replay of its kernels | replay / op | host work (op - replay) | kernels |")
    print("|---|---:|---:|---:|---:|---|")
    with torch.no_grad():
        for n in args.sizes:
            op_ms, replay_ms, names = one_size(n, args.mode, args.before, args.repeat)
            print(f"| {n} | {op_ms:.3f} | {replay_ms:.3f} | {replay_ms / op_ms:.3f}x | "
                  f"{op_ms - replay_ms:.3f} | {', '.join(names)} |")
    print(f"\nCommand: `python bench/bench_host_bound.py --sizes "
          f"{' '.join(map(str, args.sizes))} --mode {args.mode} --before {args.before}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
