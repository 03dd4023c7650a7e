"""Tuned against default schedule knobs on the CPU, per operator and for the whole op.

For every sequence length N (``--sizes``): B*H = 12 rows, D = 64, block size 32, 4 blocks
per row ("full" mode), random inputs through the real pipeline (``tuning.Case``). The
"default" configuration is ``KNOBS`` (vec = this CPU's vector width); "tuned" is what the
tuning records give for the call's shape bucket (``knob_policy.knobs_for_shape``, with the
records' source shown). Each kernel is timed alone on the arguments the real forward
passes it under that configuration's plan; "whole op" times ``forward.mra_forward``
end to end, and "op as called" times ``torch.ops.mra.attention`` as the op runs now
(it reads the records itself). Within a round every variant runs once, in rotating
order (interleaved, so machine noise hits them alike); the median of ``--repeat``
rounds (``--op-repeat`` for the whole op) is reported, in milliseconds, with the gain from
the per-round ratios and the number of rounds in which tuned was faster.

    python bench/bench_tuning.py                       # writes bench/results/tuning_cpu.md
    python bench/bench_tuning.py --sizes 1024 4096 --repeat 7 --md /tmp/t.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from statistics import median

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile import host, knob_policy, records, runtime, tuning  # noqa: E402
from mra_compile.tools.benchmarks import load_average  # noqa: E402
from mra_compile.tools.common import cpu_model  # noqa: E402

ROWS, HEAD_DIM, BLOCK_SIZE, BLOCKS_PER_ROW = 12, 64, 32, 4
DEFAULT_SIZES = (512, 1024, 2048, 4096, 8192)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    p.add_argument("--repeat", type=int, default=31,
                   help="interleaved rounds per kernel (default: %(default)s)")
    p.add_argument("--op-repeat", type=int, default=61,
                   help="interleaved rounds of the whole op (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--md", type=Path, default=REPO_ROOT / "bench" / "results" / "tuning_cpu.md")
    args = p.parse_args(argv)
    if min(args.repeat, args.op_repeat) < 1 or any(n < 1 for n in args.sizes):
        p.error("--repeat, --op-repeat and --sizes must be positive")
    return args


def _shown(path: Path) -> Path:
    """``path`` relative to the checkout where it lies inside it."""
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def changed(default: dict, tuned: dict) -> str:
    diff = [f"{k}={tuning.fmt(v)}" for k, v in tuned.items() if default.get(k) != v]
    return " ".join(diff) or "(default)"


def bench_size(N: int, repeat: int, op_repeat: int, seed: int):
    shape = tuning.Shape(rows=ROWS, N=N, D=HEAD_DIM, block_size=BLOCK_SIZE,
                         blocks_per_row=BLOCKS_PER_ROW)
    case = tuning.Case(shape, seed)
    default = tuning.default_config()
    tuned = knob_policy.knobs_for_shape(None, N, HEAD_DIM, BLOCK_SIZE)
    sources = {op: tuning.chosen_knobs(op, shape.bucket) for op in tuning.OPS}
    rows = []

    def row(name, base, other, knobs, rec):
        wins = f"{sum(o < b for b, o in zip(base, other))}/{len(base)}"
        return (name, median(base), median(other), tuning.paired_ratio(base, other), wins, knobs, rec)

    for op in tuning.OPS:
        s_def, s_tun = tuning.interleaved_samples(
            [case.runner(op, default), case.runner(op, tuned)], repeat)
        src = sources[op]
        rows.append(row(op, s_def, s_tun, changed(default[op], tuned[op]),
                        src.bucket if src.source != "default" else "none"))
    q, k, v = case.q, case.k, case.v
    op_call = lambda: torch.ops.mra.attention(q, k, v, None, shape.num_blocks, "full")  # noqa: E731
    s_def, s_tun, s_op = tuning.interleaved_samples(
        [case.runner("forward", default), case.runner("forward", tuned), op_call], op_repeat)
    rows.append(row("**whole op**", s_def, s_tun, "all of the above and the plan", ""))
    rows.append(row("op as called", s_def, s_op,
                    "`torch.ops.mra.attention` (reads the records itself) vs default", ""))
    return shape.bucket, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    runtime.ensure()
    paths = [p for p in records.db_paths() if p.exists()]
    start_load = load_average()
    lines = []
    for N in args.sizes:
        bucket, rows = bench_size(N, args.repeat, args.op_repeat, args.seed)
        for name, t_def, t_tun, ratio, wins, knobs, rec in rows:
            gain = 100 * (1 - ratio)
            lines.append(f"| {N} | {name} | {1e3 * t_def:.3f} | {1e3 * t_tun:.3f} | {gain:+.1f}% "
                         f"| {wins} | {knobs} | {rec} |")
            print(f"N={N:<5} {name:<16} default {1e3 * t_def:9.3f} ms  tuned {1e3 * t_tun:9.3f} ms  "
                  f"{gain:+6.1f}%  {knobs}", flush=True)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = [
        "# Tuned vs default schedule knobs (CPU)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads()="
        f"{torch.get_num_threads()}, torch {torch.__version__}, TVM {host.tvm_version()}, {now}",
        f"Host fingerprint: `{host.host_fingerprint()}`",
        f"Records: {', '.join(f'`{_shown(p)}`' for p in paths) or 'none'}",
        f"Setup: B*H={ROWS}, D={HEAD_DIM}, block {BLOCK_SIZE}, {BLOCKS_PER_ROW} blocks per row, "
        f"\"full\" mode, fp32; median of {args.repeat} interleaved rounds per kernel and "
        f"{args.op_repeat} for the whole op (default and tuned alternate within each round); "
        "ms. Gain: 1 - the median over rounds of the tuned/default time ratio (paired within "
        "a round). Kernels are timed alone on the arguments the real forward passes them "
        "(under each configuration's own plan: `hires_units` and "
        "`hires_rows` split the selected blocks differently when `row_unit_blocks` / "
        "`blocks_per_unit` differ, so their per-kernel times move in opposite directions; "
        "the whole op is the number that matters).",
        f"Load average at start: {start_load}, at the end: {load_average()} (a 2-core machine "
        "shared with other work: single-kernel differences of a few percent are within noise).",
        "",
        "| N | operator | default ms | tuned ms | gain | rounds tuned faster "
        "| tuned knobs (changed) | record bucket |",
        "|---:|:---|---:|---:|---:|---:|:---|:---|",
    ]
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
