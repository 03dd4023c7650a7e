"""Peak memory of one forward call on the CPU: how much the process's peak resident set
grows during it (N=16384, B=1, H=12, D=64, 4 blocks per row, fp32), per mode.

Each mode runs in a fresh process, which first calls the op on a short sequence in the
same mode (so that the kernels are built or loaded before, not during, the measured
call) and then once at N; ``ru_maxrss`` before and after that call. ``--root`` measures
another checkout of this repository with the same script (its ``mra_compile`` and
``schedules``), e.g. a worktree of an earlier commit, for a before/after comparison.

    python bench/bench_peak_memory.py
    git worktree add /tmp/before <commit> && python bench/bench_peak_memory.py --root /tmp/before
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
N, HEADS, HEAD_DIM = 16384, 12, 64


def child(root: str, mode: str) -> None:
    """In a fresh process: the peak resident-set growth (MiB) of one call, as JSON."""
    import gc
    import importlib.util
    import resource

    # The checkout's package and its schedules (shipped as mra_compile.schedules), bound
    # before the package runs so that it cannot pick up another checkout's.
    package = importlib.util.spec_from_file_location(
        "mra_compile", f"{root}/mra_compile/__init__.py",
        submodule_search_locations=[f"{root}/mra_compile"])
    schedules = importlib.util.spec_from_file_location(
        "mra_compile.schedules", f"{root}/schedules/__init__.py",
        submodule_search_locations=[f"{root}/schedules"])
    pkg, sch = importlib.util.module_from_spec(package), importlib.util.module_from_spec(schedules)
    sys.modules["mra_compile"], sys.modules["mra_compile.schedules"] = pkg, sch
    schedules.loader.exec_module(sch)
    pkg.schedules = sch
    package.loader.exec_module(pkg)

    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N, HEAD_DIM, generator=g) for _ in range(3))
    with torch.no_grad():
        short = slice(0, 1024)
        torch.ops.mra.attention(q[:, :, short], k[:, :, short], v[:, :, short], None,
                                4 * 1024 // 32, mode)
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = torch.ops.mra.attention(q, k, v, None, 4 * N // 32, mode)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (after - before) / 1024, "output": out.numel() * 4 / 2**20}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO_ROOT), help="the checkout to measure")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per mode")
    p.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    from mra_compile.tools.benchmarks import machine_line

    print(machine_line())
    print(f"\nfp32, B=1, H={HEADS}, N={N}, D={HEAD_DIM}, 4 blocks per row; checkout {args.root}; "
          f"growth of the peak resident set during one forward call, MiB "
          f"(median of {args.repeat} fresh processes)\n")
    print("| mode | peak growth | of it the output |")
    print("|---|---:|---:|")
    for mode in ("full", "sparse"):
        runs = []
        for _ in range(args.repeat):
            done = subprocess.run([sys.executable, __file__, "--child", args.root, mode],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        growth = statistics.median(r["growth"] for r in runs)
        print(f"| {mode} | {growth:.1f} | {runs[0]['output']:.1f} |")
    print(f"\nCommand: `python bench/bench_peak_memory.py"
          f"{'' if args.root == str(REPO_ROOT) else ' --root ' + args.root}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
