"""Forward-pass benchmark on the CPU: the compiled op against the baselines, side by side.

Behind ``mra-compile bench`` and ``bench/bench_forward.py``. For every sequence length N
(``--sizes``) and both approximation modes it times

* ``torch.ops.mra.attention`` (the TVM-compiled op),
* ``mra_compile.tools.fallback.mra2_fallback`` (MRA-2 in plain PyTorch, gather / bmm /
  scatter-add, the way the original authors' fallback is written),
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

Progress (stderr, ``mra_compile.progress``): the size, part and round running, and every
kernel compile; ``--quiet`` or ``MRA_COMPILE_QUIET=1`` silences it.

``--plot`` also writes ``time_vs_n.png`` (log-log time against N for every
implementation) and ``error_vs_blocks_per_row.png`` (MRA-2's error against exact
attention as the budget grows, next to a sliding window and random blocks of the same
budget; see ``mra_compile.tools.accuracy``) next to the CSV. It needs matplotlib
(``pip install 'mra-compile[plot]'``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mra_compile.progress import Status, silenced
from mra_compile.tools.common import (
    BLOCK_SIZE,
    cpu_model,
    median_ms,
    package_version,
    pyplot,
    random_qkv,
)
from mra_compile.tools.fallback import mra2_fallback

BATCH, HEADS, HEAD_DIM, BLOCKS_PER_ROW = 1, 12, 64, 4
MODES = ("full", "sparse")
DEFAULT_SIZES = (512, 1024, 2048, 4096, 8192)
# Peak memory of mra2_reference, in fp32 [B, H, N, N] matrices (measured: ~4.4-4.9).
REFERENCE_NXN_MATRICES = 5
CSV_FIELDS = ("N", "mode", "op_ms", "fallback_ms", "reference_ms", "sdpa_ms",
              "fallback_over_op", "sdpa_over_op", "reference_over_op",
              "max_rel_err_op_vs_fallback", "other_cpu_share")
SKIPPED = "skipped (dense N×N)"
NOT_FOUND = "n/a"
TIME_PLOT, ERROR_PLOT = "time_vs_n.png", "error_vs_blocks_per_row.png"
ERROR_PLOT_STRUCTURE = "local+prefix"


# ---------------------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser, out_dir: Path | str = "bench/results") -> None:
    """Register the benchmark's options on ``p`` (the CLI's subparser or the script's parser)."""
    out_dir = Path(out_dir)
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
    p.add_argument("--csv", type=Path, default=out_dir / "forward_cpu.csv",
                   help=f"CSV output (default: {out_dir / 'forward_cpu.csv'})")
    p.add_argument("--md", type=Path, default=out_dir / "forward_cpu.md",
                   help=f"markdown output (default: {out_dir / 'forward_cpu.md'})")
    p.add_argument("--plot", action="store_true",
                   help=f"also write {TIME_PLOT} and {ERROR_PLOT} next to the CSV "
                        "(needs matplotlib)")
    p.add_argument("--error-seq-len", type=int, default=2048,
                   help="N of the error-vs-blocks-per-row plot (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (sizes, rounds, kernel compiles)")


def check_arguments(args) -> str | None:
    """A usage error message, or None."""
    if args.repeat < 1 or args.warmup < 1:
        return "--repeat and --warmup must be >= 1 (the first op call builds kernels)"
    if any(n < 1 for n in args.sizes):
        return "--sizes must be positive"
    if args.error_seq_len < 2 * BLOCK_SIZE:
        return f"--error-seq-len must be >= {2 * BLOCK_SIZE}"
    return None


# ---------------------------------------------------------------------------- machine

def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_line() -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
            f"torch.get_num_threads()={torch.get_num_threads()}, torch {torch.__version__}, "
            f"TVM {package_version('apache-tvm')}, {now}, load average {load_average()}")


def report_head(title: str, setup: str, columns: list[str]) -> list[str]:
    """A report's first lines: its title, the machine, the setup and a table's header."""
    return [f"# {title}", "", machine_line(), "", setup, "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


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


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


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


# ---------------------------------------------------------------------------- fallback

def load_fallback():
    """The PyTorch baseline to time, ``mra2_fallback`` (shipped in the package).

    A function so that a caller can replace it with one returning None: the table then
    leaves the fallback out (its columns read n/a).
    """
    return mra2_fallback


# ---------------------------------------------------------------------------- timing

def reference_fits(n_tokens: int, max_gb: float) -> bool:
    peak = REFERENCE_NXN_MATRICES * BATCH * HEADS * n_tokens * n_tokens * 4
    return peak <= max_gb * 1e9


def implementations(q, k, v, num_blocks: int, fallback) -> dict:
    """The interleaved set: (impl, mode) -> zero-argument callable; SDPA's mode is None."""
    impls: dict[tuple[str, str | None], Callable[[], torch.Tensor]] = {}
    for mode in MODES:
        impls[("op", mode)] = functools.partial(torch.ops.mra.attention, q, k, v, None,
                                                num_blocks, mode, BLOCK_SIZE)
        if fallback is not None:
            impls[("fallback", mode)] = functools.partial(
                fallback, q, k, v, num_blocks=num_blocks, approx_mode=mode, block_size=BLOCK_SIZE)
    impls[("sdpa", None)] = lambda: F.scaled_dot_product_attention(q, k, v)
    return impls


def reference_implementations(q, k, v, num_blocks: int) -> dict:
    from mra_compile.reference import mra2_reference

    return {("reference", mode): (lambda m=mode: mra2_reference(
        q, k, v, num_blocks=num_blocks, approx_mode=m, block_size=BLOCK_SIZE))
        for mode in MODES}


def warm_up(impls: dict, calls: int, show=None) -> dict:
    """Call everything ``calls`` times; returns the last outputs of the op and fallback.
    ``show(text)``: progress (which implementation warms up)."""
    outputs = {}
    for name, fn in impls.items():
        if show is not None:
            show(f"warm-up, {name[0]}" + (f" {name[1]}" if name[1] else ""))
        for _ in range(calls):
            out = fn()
        if name[0] in ("op", "fallback"):
            outputs[name] = out
        del out
    return outputs


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (normwise, so tiny entries don't blow it up)."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_size(n_tokens: int, args, fallback, status: Status | None = None) -> list[dict]:
    import mra_compile  # noqa: F401  (registers torch.ops.mra.attention)

    def show(text):
        if status is not None:
            status.update(f"N={n_tokens}: {text}")

    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = random_qkv(BATCH, HEADS, n_tokens, HEAD_DIM, gen)
    num_blocks = BLOCKS_PER_ROW * (-(-n_tokens // BLOCK_SIZE))
    impls = implementations(q, k, v, num_blocks, fallback)
    with torch.no_grad(), OtherLoad() as load:
        outputs = warm_up(impls, args.warmup, show)
        errors = {m: (max_rel_err(outputs[("op", m)], outputs[("fallback", m)])
                      if ("fallback", m) in outputs else None) for m in MODES}
        del outputs
        times = median_ms(impls, args.repeat, on_round=lambda i: show(
            f"round {i}/{args.repeat} (op, fallback, SDPA)"))
        if reference_fits(n_tokens, args.reference_max_gb):
            ref_impls = reference_implementations(q, k, v, num_blocks)
            warm_up(ref_impls, args.warmup, show)
            times.update(median_ms(ref_impls, args.repeat, on_round=lambda i: show(
                f"dense reference, round {i}/{args.repeat}")))
    return [make_row(n_tokens, mode, times, errors[mode], load.share) for mode in MODES]


def make_row(n_tokens: int, mode: str, times: dict, err, other_load: float) -> dict:
    op = times[("op", mode)]
    ref = times.get(("reference", mode))
    fb, sdpa = times.get(("fallback", mode)), times[("sdpa", None)]
    return {"N": n_tokens, "mode": mode, "op_ms": op, "fallback_ms": fb, "reference_ms": ref,
            "sdpa_ms": sdpa, "fallback_over_op": None if fb is None else fb / op,
            "sdpa_over_op": sdpa / op, "reference_over_op": None if ref is None else ref / op,
            "max_rel_err_op_vs_fallback": err, "other_cpu_share": other_load}


# ---------------------------------------------------------------------------- output

def fmt_ms(x, missing=SKIPPED) -> str:
    if x is None:
        return missing
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def markdown_table(rows: list[dict]) -> str:
    lines = [("| N | mode | op ms | fallback ms | reference ms | SDPA ms "
              "| fallback/op | SDPA/op | reference/op |"),
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['mode']} | {fmt_ms(r['op_ms'])} "
            f"| {fmt_ms(r['fallback_ms'], NOT_FOUND)} "
            f"| {fmt_ms(r['reference_ms'])} | {fmt_ms(r['sdpa_ms'])} "
            f"| {fmt_ratio(r['fallback_over_op'])} | {fmt_ratio(r['sdpa_over_op'])} "
            f"| {fmt_ratio(r['reference_over_op'])} |")
    return "\n".join(lines)


def error_table(rows: list[dict]) -> str:
    lines = [("Sanity check, max |op − fallback| / max |fallback| (fp32; the two may pick "
              "different blocks at exact score ties, so this is reported, not asserted):"),
             "",
             "| N | mode | max rel. error op vs fallback |",
             "|---:|:---|---:|"]
    for r in rows:
        err = r["max_rel_err_op_vs_fallback"]
        lines.append(f"| {r['N']} | {r['mode']} | {NOT_FOUND if err is None else f'{err:.2e}'} |")
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


# ---------------------------------------------------------------------------- plots

def plot_times(rows: list[dict], path: Path, title: str = "") -> None:
    """Time against N, log-log: op, fallback, reference (both modes) and dense SDPA."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    series = [("op", "torch.ops.mra.attention (TVM)", "C0", "o"),
              ("fallback", "PyTorch fallback (gather/bmm)", "C1", "s"),
              ("reference", "dense reference (N×N)", "C2", "^")]
    for key, label, color, marker in series:
        for mode, line in (("full", "-"), ("sparse", "--")):
            pts = [(r["N"], r[f"{key}_ms"]) for r in rows
                   if r["mode"] == mode and r[f"{key}_ms"] is not None]
            if pts:
                ax.plot(*zip(*pts), color=color, marker=marker, linestyle=line,
                        label=f"{label}, {mode}")
    sdpa = sorted({(r["N"], r["sdpa_ms"]) for r in rows})
    ax.plot(*zip(*sdpa), color="k", marker="x", linestyle=":", label="dense SDPA (exact)")
    sizes = sorted({r["N"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward time (ms, median)")
    ax.set_title(title or f"CPU forward, B={BATCH} H={HEADS} D={HEAD_DIM}, "
                          f"{BLOCKS_PER_ROW} blocks per row, fp32", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_errors(path: Path, seq_len: int, seed: int = 0, status: Status | None = None) -> list:
    """Error vs blocks per row on the demo's structured input; returns the measured rows."""
    from mra_compile.tools import accuracy

    budgets = accuracy.DEFAULT_BLOCKS_PER_ROW
    done = []

    def progress(row):
        done.append(row)
        if status is not None and len(done) < len(budgets):
            status.update(f"error plot: {len(done) + 1}/{len(budgets)} budgets "
                          f"({budgets[len(done)]} blocks per row)")

    if status is not None:
        status.update(f"error plot: 1/{len(budgets)} budgets ({budgets[0]} blocks per row)")
    rows = accuracy.measure(ERROR_PLOT_STRUCTURE, seq_len=seq_len, seed=seed,
                            blocks_per_row=budgets, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracy.plot(rows, path, title=f"Same number of exact blocks for every method "
                                    f"(N={seq_len}, H=4, D=64)")
    return rows


# ---------------------------------------------------------------------------- entry points

def run(args) -> int:
    """Run the benchmark for parsed ``args`` (see ``add_arguments``); returns the exit code."""
    with silenced(getattr(args, "quiet", False)):
        return _run(args)


def _run(args) -> int:
    if args.plot:
        pyplot()  # fail before the long run if matplotlib is missing
    torch.manual_seed(args.seed)
    fallback = load_fallback()
    header = [machine_line(), setup_line(args)]
    if fallback is None:
        header.append("Fallback: not timed (its columns read n/a)")
    print("\n".join(header), flush=True)
    rows = []
    status = Status("bench", every=2.0)
    for n_tokens in args.sizes:
        t0 = time.perf_counter()
        size_rows = bench_size(n_tokens, args, fallback, status)
        status.close()
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
    if args.plot:
        out_dir = args.csv.parent
        plot_times(rows, out_dir / TIME_PLOT)
        print(f"wrote {out_dir / TIME_PLOT}", flush=True)
        plot_errors(out_dir / ERROR_PLOT, args.error_seq_len, args.seed, status)
        status.close()
        print(f"wrote {out_dir / ERROR_PLOT}")
    return 0


def main(argv=None, out_dir: Path | str = "bench/results") -> int:
    """The script entry point (``bench/bench_forward.py``)."""
    p = argparse.ArgumentParser(prog=Path(sys.argv[0]).name or "bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, out_dir)
    args = p.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        p.error(problem)
    return run(args)
