"""float16 / bfloat16 on the CPU without micro-kernels: the op reading q, k, v in place
(widened to float32 as its kernels read them) against the op on float32 copies of them
(``MRA_COMPILE_CPU_WIDEN=0``, how they ran before) and against the float32 op, in one
process, interleaved. bfloat16 runs with ``MRA_COMPILE_CPU_BF16=0`` throughout (as on a
CPU without AVX-512-BF16: no micro-kernels).

Each N and mode: the forward of the three, then forward+backward of the two half-
precision forms (B=1, H=12, D=64, 4 blocks per row), median ms of ``--repeat``
interleaved rounds (the order reversed every other round); the two forms' outputs and
gradients compared bit for bit; and the workspace each form keeps after an inference
call (``MRA_COMPILE_WORKSPACE_MB``'s scratch: the float32 copies of q, k, v among it).

    python bench/bench_widened_cpu.py                  # float16, bench/results/widened_cpu.md
    python bench/bench_widened_cpu.py --dtype bfloat16 --out bench/results/widened_bf16_cpu.md
    python bench/bench_widened_cpu.py --sizes 4096 --repeat 5 --out /tmp/widened.md
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

from mra_compile import memory  # noqa: E402  (registers torch.ops.mra.attention)
from mra_compile.targets import cpu  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def copied(fn):
    """``fn`` run on float32 copies of q, k, v (the switch is read every call)."""
    def call():
        os.environ[cpu.WIDEN_ENV] = "0"
        try:
            return fn()
        finally:
            del os.environ[cpu.WIDEN_ENV]
    return call


def step(q, k, v, blocks, mode, grad):
    """A forward+backward of the op: (output, dq, dk, dv)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = torch.ops.mra.attention(*leaves, None, blocks, mode)
    out.backward(grad)
    return (out.detach(), *(x.grad for x in leaves))


def workspace_mib(fn) -> float:
    """MiB of scratch this thread keeps after ``fn()`` from an empty workspace."""
    memory.clear_workspace()
    fn()
    return memory.WORKSPACE.kept_bytes() / 2**20


def measure(N: int, mode: str, repeat: int, dtype: torch.dtype) -> str:
    """One table row: N tokens, ``mode``, inputs of ``dtype``."""
    g = torch.Generator().manual_seed(N)
    q32, k32, v32 = (torch.randn(1, 12, N, 64, generator=g) for _ in range(3))
    q, k, v = (x.to(dtype) for x in (q32, k32, v32))
    grad = torch.randn(1, 12, N, 64, generator=g).to(dtype)
    blocks = 4 * N // 32

    def fwd(a, b, c):
        with torch.no_grad():
            return torch.ops.mra.attention(a, b, c, None, blocks, mode)

    fns = {"fp32": lambda: fwd(q32, k32, v32), "half": lambda: fwd(q, k, v),
           "copies": copied(lambda: fwd(q, k, v))}
    train = {"half": lambda: step(q, k, v, blocks, mode, grad),
             "copies": copied(lambda: step(q, k, v, blocks, mode, grad))}
    same = all(torch.equal(a, b) for a, b in zip(train["half"](), train["copies"]()))
    same = same and torch.equal(fns["half"](), fns["copies"]())
    kept = [workspace_mib(fns[name]) for name in ("half", "copies")]
    for fn in (*fns.values(), *train.values()):  # (builds, plans, workspace)
        fn()
    t = common.median_ms(fns, repeat, alternate=True)
    tt = common.median_ms(train, repeat, alternate=True)
    return (f"| {N} | {mode} | {t['fp32']:.2f} | {t['half']:.2f} | {t['copies']:.2f} | "
            f"{t['copies'] / t['half']:.2f}x | {t['fp32'] / t['half']:.2f}x | "
            f"{tt['half']:.2f} | {tt['copies']:.2f} | {tt['copies'] / tt['half']:.2f}x | "
            f"{'yes' if same else 'NO'} | {kept[0]:.0f} / {kept[1]:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--out", type=Path,
                   default=REPO_ROOT / "bench" / "results" / "widened_cpu.md")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    os.environ.pop(cpu.WIDEN_ENV, None)
    if dtype == torch.bfloat16:  # (no micro-kernels: widened, as without the instructions)
        os.environ[cpu.BF16_ENV] = "0"
    if not cpu.widened_in_place(dtype):
        print(f"{args.dtype} is not widened here (float16 needs F16C; another CPU targeted?)",
              file=sys.stderr)
        return 1
    switched = " (`MRA_COMPILE_CPU_BF16=0`)" if dtype == torch.bfloat16 else ""
    lines = [machine_line(), "",
             f"{args.dtype}{switched}, B=1, H=12, D=64, 4 blocks per row; median ms of "
             f"{args.repeat} interleaved rounds (order reversed every other round); "
             "\"copies\": `MRA_COMPILE_CPU_WIDEN=0`.", "",
             f"| N | mode | fp32 fwd | {args.dtype} fwd | copies fwd | copies / in place | "
             f"fp32 / {args.dtype} | {args.dtype} fwd+bwd | copies fwd+bwd | "
             "copies / in place | same bits | workspace MiB, in place / copies |",
             "|" + "---:|" * 12]
    for N in args.sizes:
        for mode in ("full", "sparse"):
            lines.append(measure(N, mode, args.repeat, dtype))
            print(lines[-1], flush=True)
    lines += ["", f"Command: `python bench/bench_widened_cpu.py --dtype {args.dtype} --sizes "
              f"{' '.join(map(str, args.sizes))} --repeat {args.repeat}`"]
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
