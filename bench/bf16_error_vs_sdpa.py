"""bf16 forward error of the op next to torch's own SDPA in bf16, where both compute exact
attention: one key block (N <= 32, ``num_blocks=1``, full mode), so the op's output is
softmax attention and the two differ only in their rounding.

For each head dim, ``--cases`` random cases (B = H = 2, N drawn from 1..32, q, k, v standard
normal rounded to bf16): each output's error as the tests measure it (per (batch, head),
max |out - ref| / max |ref| against float64 SDPA on the same bf16 inputs; the worst head
of the case), then the largest, the 99th percentile and how many cases exceed the bf16
tolerance of the tests (1e-2). Where an output is much smaller than ``sum P|v| / Z`` (P v
cancels), rounding P to bf16 for P v, as both do, costs more than 1% of the head's
largest output; at D = 1 a head's largest output is one of N values, so such heads occur.

    python bench/bf16_error_vs_sdpa.py              # writes bench/results/bf16_error_vs_sdpa_cpu.md
    python bench/bf16_error_vs_sdpa.py --cases 100 --out /tmp/e.md
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
from mra_compile.targets import cpu  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402
from mra_compile.tools.common import worst_head_error, write_report  # noqa: E402

TOLERANCE = 1e-2  # the bf16 tolerance of tests/ (per (batch, head), relative to its max)


def errors(head_dim: int, cases: int, seed: int) -> dict[str, torch.Tensor]:
    """Per case, the worst head error of the op and of SDPA, both in bf16."""
    g = torch.Generator().manual_seed(seed)
    got: dict[str, list[float]] = {"op": [], "SDPA": []}
    with torch.no_grad():
        for _ in range(cases):
            n = int(torch.randint(1, 33, (1,), generator=g))
            q, k, v = (torch.randn(2, 2, n, head_dim, generator=g).bfloat16() for _ in range(3))
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
            op = mra_compile.mra_attention(q, k, v, num_blocks=1, approx_mode="full")
            got["op"].append(worst_head_error(op, ref))
            got["SDPA"].append(worst_head_error(F.scaled_dot_product_attention(q, k, v), ref))
    return {name: torch.tensor(values) for name, values in got.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--cases", type=int, default=500, help="random cases per head dim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   default=REPO_ROOT / "bench" / "results" / "bf16_error_vs_sdpa_cpu.md")
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error("--cases must be >= 1")
    if min(args.head_dims) < 1:
        p.error("--head-dims must be >= 1")
    lines = [
        "# bf16 forward error: the op next to SDPA, exact attention (one block)", "",
        machine_line(), "",
        f"bf16 products: {cpu.bf16_instructions()}; B = H = 2, N in 1..32, {args.cases} "
        f"cases per head dim, seed {args.seed} + D; error per (batch, head): max |out - ref| / "
        "max |ref| against float64 SDPA on the same bf16 inputs, the worst head of a case.",
        "", "| D | who | largest | 99th percentile | cases > 1e-2 |", "|---|---|---|---|---|",
    ]
    for d in args.head_dims:
        for name, e in errors(d, args.cases, args.seed + d).items():
            lines.append(f"| {d} | {name} | {e.max().item():.2e} | {e.quantile(0.99).item():.2e} "
                         f"| {int((e > TOLERANCE).sum())} of {len(e)} |")
    given = sys.argv[1:] if argv is None else argv
    lines += ["", f"Command: `python bench/bf16_error_vs_sdpa.py{''.join(' ' + a for a in given)}`"]
    print("\n".join(lines))
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
