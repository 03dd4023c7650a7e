"""bf16 against float32 on the CPU: the op with bf16 products (AVX-512-BF16,
``schedules/cpu_bf16.c``) against the float32 op on the same inputs, forward and
forward+backward, and the bf16 results' errors against the float64 oracle.

One interleaved run per N and table (B=1, H=12, D=64, full mode, ``block_per_row=4``):
the float32 op, the bf16 op, and (forward only) the float16 op, which computes in
float32 (on q, k, v read in place and widened since 2026-12-08, on float32 copies before:
``bench_widened_cpu.py``), and SDPA in bf16 at N <= 4096 for scale.
The forward's error is the largest per-row relative error (max |out - ref| / max |ref|
of each (batch, head)) of the bf16 op against ``mra2_reference`` in float64 on the
bf16-rounded inputs with the op's blocks, at N=1024 (the oracle is quadratic); the
gradients' is max |grad - ref| / max |ref| of each of dq, dk, dv there.

    python bench/bench_bf16_cpu.py                 # N=4096 8192, writes bench/results/bf16_cpu.md
    python bench/bench_bf16_cpu.py --sizes 4096 --repeat 5 --out /tmp/bf16.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402
from mra_compile.reference import mra2_reference  # noqa: E402
from mra_compile.targets import cpu  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def bf16_error(N: int = 1024) -> float:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, N, 64, generator=g).bfloat16() for _ in range(3))
    with torch.no_grad():
        out = mra_compile.mra_attention(q, k, v, block_per_row=4)
        sel = mra_compile.block_selection(q, k, v, None, block_per_row=4)
        ref = mra2_reference(q.double(), k.double(), v.double(), None, block_per_row=4,
                             selection=sel)
    return common.worst_head_error(out, ref)


def bf16_grad_errors(N: int = 1024) -> list[float]:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 12, N, 64, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    grad = torch.randn(1, 12, N, 64, generator=g).bfloat16()
    mra_compile.mra_attention(q, k, v, block_per_row=4).backward(grad)
    sel = mra_compile.block_selection(q, k, v, None, block_per_row=4)
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    mra2_reference(*x64, None, block_per_row=4, selection=sel).backward(grad.double())
    return [((x.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
            for x, r in zip((q, k, v), x64)]


def measure_training(N: int, repeat: int) -> dict:
    """Median ms of forward+backward of the float32 and the bf16 op, interleaved."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 12, N, 64, generator=g).requires_grad_() for _ in range(3)]
    xb = [x.detach().bfloat16().requires_grad_() for x in xs]
    grad = torch.randn(1, 12, N, 64, generator=g)
    grad_b = grad.bfloat16()

    def step(x, gr):
        mra_compile.mra_attention(*x, block_per_row=4).backward(gr)

    fns = {"fp32": lambda: step(xs, grad), "bf16": lambda: step(xb, grad_b)}
    for fn in fns.values():
        fn()
    return common.median_ms(fns, repeat)


def measure(N: int, repeat: int) -> dict:
    """Median ms of the float32 op, the bf16 op, the float16 op (computed in float32) and
    (N <= 4096) bf16 SDPA, interleaved."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, N, 64, generator=g) for _ in range(3))
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    qh, kh, vh = (x.half() for x in (q, k, v))
    fns = {
        "fp32": lambda: mra_compile.mra_attention(q, k, v, block_per_row=4),
        "bf16": lambda: mra_compile.mra_attention(qb, kb, vb, block_per_row=4),
        "fp16": lambda: mra_compile.mra_attention(qh, kh, vh, block_per_row=4),
    }
    if N <= 4096:
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(qb, kb, vb)
    with torch.no_grad():
        for fn in fns.values():
            fn()
        return common.median_ms(fns, repeat)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeat", type=int, default=11, help="interleaved rounds (median)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "bf16_cpu.md")
    args = p.parse_args()
    lines = [machine_line(), "",
             f"bf16 products: {cpu.bf16_instructions()}; "
             f"B=1, H=12, D=64, full mode, block_per_row=4; median of {args.repeat} "
             "interleaved rounds; ms.", "",
             "| N | float32 op | bf16 op | float32 / bf16 | float16 op | SDPA bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for N in args.sizes:
        t = measure(N, args.repeat)
        sdpa = f"{t['sdpa']:.1f}" if "sdpa" in t else "-"
        lines.append(f"| {N} | {t['fp32']:.2f} | {t['bf16']:.2f} | {t['fp32'] / t['bf16']:.2f}x "
                     f"| {t['fp16']:.2f} | {sdpa} |")
        print(lines[-1], flush=True)
    lines += ["", "Forward+backward (the same inputs and settings; bf16 gradients):", "",
              "| N | float32 op | bf16 op | float32 / bf16 |", "|---|---:|---:|---:|"]
    for N in args.sizes:
        t = measure_training(N, args.repeat)
        lines.append(f"| {N} | {t['fp32']:.2f} | {t['bf16']:.2f} | {t['fp32'] / t['bf16']:.2f}x |")
        print(lines[-1], flush=True)
    err = bf16_error()
    dq, dk, dv = bf16_grad_errors()
    lines += ["", f"bf16 op vs the float64 oracle (N=1024, same blocks): largest per-row "
              f"relative error {err:.2e} (the tests' bf16 tolerance: 1e-2); gradients, "
              f"largest error over largest entry: dq {dq:.2e}, dk {dk:.2e}, dv {dv:.2e}.", "",
              f"Command: `python bench/bench_bf16_cpu.py --sizes {' '.join(map(str, args.sizes))} "
              f"--repeat {args.repeat}`"]
    print(lines[-3])
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
