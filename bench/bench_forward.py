"""Forward-pass benchmark on the CPU: the compiled op against the baselines, side by side.

For every sequence length N (``--sizes``) and both approximation modes it times

* ``torch.ops.mra.attention`` (the TVM-compiled op),
* ``bench.fallback.mra2_fallback`` (MRA-2 in plain PyTorch, gather / bmm / scatter-add,
  the way the original authors' fallback is written),
* ``mra_compile.reference.mra2_reference`` (the dense N x N oracle; only where its
  estimated peak memory fits in ``--reference-max-gb``),
* dense ``torch.nn.functional.scaled_dot_product_attention`` (mode independent: timed
  once per N and shown in both rows).

Shapes: B=1, H=12, D=64, block size 32, 4 blocks per row (num_blocks = 4 * N / 32), fp32.
Every implementation is called ``--warmup`` times first (the op's first call builds or
loads its kernels), then ``--repeat`` rounds follow; within each round the op, the
fallback and SDPA run once each, in turn (both modes), so machine noise hits all of them
alike. The reference gets its own rounds afterwards: it allocates gigabytes per call,
and interleaving it would leave the others to run on evicted caches and fresh pages.
The median of the rounds is reported, in milliseconds.

    python bench/bench_forward.py                          # full run, writes bench/results/
    python bench/bench_forward.py --sizes 512 1024 --repeat 3
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from bench.fallback import mra2_fallback  # noqa: E402
from mra_compile.reference import mra2_reference  # noqa: E402

BATCH, HEADS, HEAD_DIM, BLOCK_SIZE, BLOCKS_PER_ROW = 1, 12, 64, 32, 4
MODES = ("full", "sparse")
DEFAULT_SIZES = (512, 1024, 2048, 4096, 8192)
# Peak memory of mra2_reference, in fp32 [B, H, N, N] matrices (measured: ~4.4-4.9).
REFERENCE_NXN_MATRICES = 5
CSV_FIELDS = ("N", "mode", "op_ms", "fallback_ms", "reference_ms", "sdpa_ms",
              "fallback_over_op", "sdpa_over_op", "reference_over_op",
              "max_rel_err_op_vs_fallback", "other_cpu_share")
SKIPPED = "skipped (dense N×N)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="sequence lengths N (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=7,
                   help="timed rounds per size; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls of each implementation first (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: %(default)s)")
    p.add_argument("--reference-max-gb", type=float, default=6.0,
                   help="run the dense reference only while its estimated peak memory "
                        "fits in this many GB; 0 disables it (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=REPO_ROOT / "bench" / "results" / "forward_cpu.csv",
                   help="CSV output (default: bench/results/forward_cpu.csv)")
    p.add_argument("--md", type=Path, default=REPO_ROOT / "bench" / "results" / "forward_cpu.md",
                   help="markdown output (default: bench/results/forward_cpu.md)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 1:
        p.error("--repeat and --warmup must be >= 1 (the first op call builds kernels)")
    if any(n < 1 for n in args.sizes):
        p.error("--sizes must be positive")
    return args


# ---------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line() -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
            f"torch.get_num_threads()={torch.get_num_threads()}, torch {torch.__version__}, "
            f"TVM {package_version('apache-tvm')}, {now}, load average {load_average()}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def setup_line(args) -> str:
    return (f"Setup: B={BATCH}, H={HEADS}, D={HEAD_DIM}, block {BLOCK_SIZE}, "
            f"{BLOCKS_PER_ROW} blocks per row (num_blocks = {BLOCKS_PER_ROW}·N/{BLOCK_SIZE}), "
            f"fp32, CPU; median of {args.repeat} rounds after {args.warmup} warm-up call(s), "
            f"op/fallback/SDPA interleaved, reference in its own rounds; ms")


def busy_cpu_seconds() -> float:
    """Machine-wide busy CPU time so far (all processes), from /proc/stat; 0 if unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in fields]
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system, irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Share of the machine's CPU capacity used by other processes over a with-block."""

    def __enter__(self):
        self.wall, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        others = (busy_cpu_seconds() - self.busy) - (own_cpu() - self.own)
        self.share = max(0.0, others) / (wall * (os.cpu_count() or 1))
        return False


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------- timing

def make_inputs(n_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, n_tokens, HEAD_DIM)
    return tuple(torch.randn(shape, generator=gen) for _ in range(3))


def reference_fits(n_tokens: int, max_gb: float) -> bool:
    peak = REFERENCE_NXN_MATRICES * BATCH * HEADS * n_tokens * n_tokens * 4
    return peak <= max_gb * 1e9


def implementations(q, k, v, num_blocks: int) -> dict:
    """The interleaved set: name -> zero-argument callable; names are (impl, mode),
    SDPA's mode is None (timed once per N)."""
    impls = {}
    for mode in MODES:
        impls[("op", mode)] = (lambda m=mode: torch.ops.mra.attention(
            q, k, v, None, num_blocks, m, BLOCK_SIZE))
        impls[("fallback", mode)] = (lambda m=mode: mra2_fallback(
            q, k, v, num_blocks=num_blocks, approx_mode=m, block_size=BLOCK_SIZE))
    impls[("sdpa", None)] = lambda: F.scaled_dot_product_attention(q, k, v)
    return impls


def reference_implementations(q, k, v, num_blocks: int) -> dict:
    return {("reference", mode): (lambda m=mode: mra2_reference(
        q, k, v, num_blocks=num_blocks, approx_mode=m, block_size=BLOCK_SIZE))
        for mode in MODES}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def warm_up(impls: dict, calls: int) -> dict:
    """Call everything ``calls`` times; returns the last outputs of the op and fallback."""
    outputs = {}
    for name, fn in impls.items():
        for _ in range(calls):
            out = fn()
        if name[0] in ("op", "fallback"):
            outputs[name] = out
        del out
    return outputs


def median_times(impls: dict, repeat: int) -> dict:
    """Interleaved rounds: each round calls every implementation once."""
    samples = {name: [] for name in impls}
    for _ in range(repeat):
        for name, fn in impls.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in samples.items()}


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (normwise, so tiny entries don't blow it up)."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_size(n_tokens: int, args) -> list[dict]:
    q, k, v = make_inputs(n_tokens, args.seed)
    num_blocks = BLOCKS_PER_ROW * (-(-n_tokens // BLOCK_SIZE))
    impls = implementations(q, k, v, num_blocks)
    with torch.no_grad(), OtherLoad() as load:
        outputs = warm_up(impls, args.warmup)
        errors = {m: max_rel_err(outputs[("op", m)], outputs[("fallback", m)]) for m in MODES}
        del outputs
        times = median_times(impls, args.repeat)
        if reference_fits(n_tokens, args.reference_max_gb):
            ref_impls = reference_implementations(q, k, v, num_blocks)
            warm_up(ref_impls, args.warmup)
            times.update(median_times(ref_impls, args.repeat))
    return [make_row(n_tokens, mode, times, errors[mode], load.share) for mode in MODES]


def make_row(n_tokens: int, mode: str, times: dict, err: float, other_load: float) -> dict:
    op = times[("op", mode)]
    ref = times.get(("reference", mode))
    fb, sdpa = times[("fallback", mode)], times[("sdpa", None)]
    return {"N": n_tokens, "mode": mode, "op_ms": op, "fallback_ms": fb, "reference_ms": ref,
            "sdpa_ms": sdpa, "fallback_over_op": fb / op, "sdpa_over_op": sdpa / op,
            "reference_over_op": None if ref is None else ref / op,
            "max_rel_err_op_vs_fallback": err, "other_cpu_share": other_load}


# ---------------------------------------------------------------------------- output

def fmt_ms(x) -> str:
    if x is None:
        return SKIPPED
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| N | mode | op ms | fallback ms | reference ms | SDPA ms "
             "| fallback/op | SDPA/op | reference/op |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['mode']} | {fmt_ms(r['op_ms'])} | {fmt_ms(r['fallback_ms'])} "
            f"| {fmt_ms(r['reference_ms'])} | {fmt_ms(r['sdpa_ms'])} "
            f"| {fmt_ratio(r['fallback_over_op'])} | {fmt_ratio(r['sdpa_over_op'])} "
            f"| {fmt_ratio(r['reference_over_op'])} |")
    return "\n".join(lines)


def error_table(rows: list[dict]) -> str:
    lines = ["Sanity check, max |op − fallback| / max |fallback| (fp32; the two may pick "
             "different blocks at exact score ties, so this is reported, not asserted):",
             "",
             "| N | mode | max rel. error op vs fallback |",
             "|---:|:---|---:|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['mode']} | {r['max_rel_err_op_vs_fallback']:.2e} |")
    return "\n".join(lines)


def load_note(rows: list[dict]) -> str:
    shares = {r["N"]: r["other_cpu_share"] for r in rows}
    parts = ", ".join(f"N={n} {100 * x:.0f}%" for n, x in shares.items())
    return ("Share of the machine's CPU used by other processes while each size ran "
            f"(noise indicator; 0% is a quiet machine): {parts}")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else
                                 f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                             for k in CSV_FIELDS})


def write_markdown(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    header = [machine_line(), setup_line(args)]
    print("\n".join(header), flush=True)
    rows = []
    for n_tokens in args.sizes:
        t0 = time.perf_counter()
        size_rows = bench_size(n_tokens, args)
        rows += size_rows
        gc.collect()
        ops = ", ".join(f"{r['mode']} op {r['op_ms']:.2f} ms" for r in size_rows)
        print(f"  N={n_tokens}: {ops} ({time.perf_counter() - t0:.0f} s, other processes used "
              f"{100 * size_rows[0]['other_cpu_share']:.0f}% of the CPU)", flush=True)
    header.append(f"Load average at the end: {load_average()} (other processes on the "
                  "machine add noise to the timings)")
    report = "\n\n".join(["\n".join(header), markdown_table(rows), load_note(rows),
                           error_table(rows)])
    print()
    print(report)
    write_csv(args.csv, rows)
    write_markdown(args.md, report)
    print(f"\nwrote {args.csv} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
