"""Grouped-query heads against the same op on expanded key/value heads (CPU).

Issue 12's must-show: with ``Hkv = H / 4`` at N = 8192, ``enable_gqa=True`` is no slower
than the op on ``repeat_interleave``d k, v (the expansion is part of that call, as a
user without GQA support would write it), and its peak memory is lower. Time: one
interleaved run (forward, and forward + backward). Peak memory: each variant's forward
+ backward in a fresh subprocess, the growth of its peak resident set (Linux VmHWM, reset
after the inputs are made).

    python bench/bench_gqa.py                      # B=1, H=16, Hkv=4, N=8192, D=64
    python bench/bench_gqa.py --n 4096 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def inputs(args, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, args.n, args.head_dim, generator=g)
    k, v = (torch.randn(1, args.heads // args.group, args.n, args.head_dim, generator=g)
            for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def grouped(q, k, v, bpr):
    return mra_compile.mra_attention(q, k, v, block_per_row=bpr, enable_gqa=True)


def expanded(q, k, v, bpr):
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    return mra_compile.mra_attention(q, k, v, block_per_row=bpr)


VARIANTS = {"gqa": grouped, "expanded": expanded}


def peak_child(args, variant: str) -> None:
    """In a fresh process: forward + backward of one variant; prints the RSS growth (MiB)."""
    q, k, v = inputs(args, requires_grad=True)
    VARIANTS[variant](q[:, :, :64], k[:, :, :64], v[:, :, :64], args.blocks_per_row)  # kernels
    # Linux: "5" resets the peak resident set (VmHWM) to the current one (TVM's import
    # and any compile above would otherwise hold the peak).
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    VARIANTS[variant](q, k, v, args.blocks_per_row).sum().backward()
    print(json.dumps({"growth_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--group", type=int, default=4, help="query heads per key/value head")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--peak-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        peak_child(args, args.peak_child)
        return 0

    print(machine_line())
    print(f"B=1 H={args.heads} Hkv={args.heads // args.group} N={args.n} D={args.head_dim} "
          f"{args.blocks_per_row} blocks/row; median of {args.repeat} interleaved rounds")
    q, k, v = inputs(args)
    with torch.no_grad():
        fwd = {name: (lambda f=f: f(q, k, v, args.blocks_per_row)) for name, f in VARIANTS.items()}
        for fn in fwd.values():
            fn()
        t_fwd = common.median_ms(fwd, args.repeat)
        err = common.relative_error(fwd["gqa"](), fwd["expanded"]())
    leaves = inputs(args, requires_grad=True)

    def train(f):
        for x in leaves:
            x.grad = None
        f(*leaves, args.blocks_per_row).sum().backward()

    both = {name: (lambda f=f: train(f)) for name, f in VARIANTS.items()}
    for fn in both.values():
        fn()
    t_both = common.median_ms(both, max(3, args.repeat // 2))
    peaks = {}
    for name in VARIANTS:
        argv = [sys.executable, __file__, "--peak-child", name, "--n", str(args.n), "--heads",
                str(args.heads), "--group", str(args.group), "--head-dim", str(args.head_dim),
                "--blocks-per-row", str(args.blocks_per_row)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["growth_mib"]
    print("\n| variant | forward ms | forward+backward ms | peak RSS growth, fwd+bwd (MiB) |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {t_fwd[name]:.2f} | {t_both[name]:.2f} | {peaks[name]:.0f} |")
    print(f"\nexpanded / gqa: forward {t_fwd['expanded'] / t_fwd['gqa']:.2f}x, forward+backward "
          f"{t_both['expanded'] / t_both['gqa']:.2f}x, peak memory "
          f"{peaks['expanded'] / max(peaks['gqa'], 1e-9):.2f}x; outputs differ by {err:.2g} "
          "(relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
