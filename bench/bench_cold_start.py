"""The op's call right after memory-heavy torch work, against its back-to-back time (CPU).

Each setting runs in a fresh process: the op (full mode, B=1, H=12, N=4096, D=64, 4 blocks
per row) is called ``--calls`` times right after the PyTorch MRA-2 fallback (many large
gathers and scatters, then freed), each time followed by a call right after another call
of the op (back to back; the two kinds alternate since 2026-12-02: before, the
back-to-back calls all came after the others, and the machine's drift between the two
halves entered the ratio). Settings: no
switch; torch's ``THP_MEM_ALLOC_ENABLE=1``; glibc's
``GLIBC_TUNABLES=glibc.malloc.top_pad=268435456`` (both are environment variables read
at process start, so they cannot be set from inside a running program). The op keeps
its results' memory mapped between calls itself (``mra_compile.memory``): what is left
after the fallback is mostly its cache traffic.

``--causes``: instead, in one fresh process, the op right after each of several kinds of
work, in alternating rounds (each round runs them all, every other round in reverse
order), against the op right after itself: the fallback; SDPA on the same q, k, v; a
64 MB read; a 64 MB write; 256 MB of new pages written and freed. It tells the inputs'
trip from memory (any large read) from what only some work leaves behind.

    python bench/bench_cold_start.py                 # writes bench/results/cold_start_cpu.md
    python bench/bench_cold_start.py --calls 6 --out /tmp/cold.md
    python bench/bench_cold_start.py --causes --calls 25 --out /tmp/causes.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SETTINGS = {
    "no switch": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "GLIBC_TUNABLES=glibc.malloc.top_pad=268435456": {
        "GLIBC_TUNABLES": "glibc.malloc.top_pad=268435456"},
}
N, HEADS, HEAD_DIM = 4096, 12, 64


def _call_and_fallback():
    """(q, k, v, op, fallback): the inputs, the op's call on them (full mode, 4 blocks per
    row) and the PyTorch MRA-2 fallback's on the same, as both child processes run them."""
    import torch

    import mra_compile  # noqa: F401  (registers torch.ops.mra.attention)
    from mra_compile.tools.fallback import mra2_fallback

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N, HEAD_DIM, generator=g) for _ in range(3))
    blocks = 4 * N // 32

    def op():
        return torch.ops.mra.attention(q, k, v, None, blocks, "full")

    def fallback():
        return mra2_fallback(q, k, v, None, num_blocks=blocks, approx_mode="full")

    return q, k, v, op, fallback


def child(calls: int) -> None:
    """In a fresh process: the timings (ms) after the fallback and back to back, as JSON."""
    import resource

    _, _, _, op, fallback = _call_and_fallback()
    op()
    fallback()
    # The two kinds of call alternate (a drifting machine moves both alike): a call right
    # after the fallback, then one right after another call of the op.
    after, system, back = [], [], []
    for _ in range(calls):
        fallback()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        start = time.perf_counter()
        op()
        after.append((time.perf_counter() - start) * 1e3)
        system.append((resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) * 1e3)
        op()
        start = time.perf_counter()
        op()
        back.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"after": after, "system": system, "back": back}))


def causes(calls: int) -> None:
    """In a fresh process: the op's medians (ms) right after each kind of work, as JSON."""
    import torch
    import torch.nn.functional as F

    q, k, v, op, fallback = _call_and_fallback()
    other = torch.ones(16 << 20)  # (64 MB)

    def new_pages():
        x = torch.empty(64 << 20)
        x.fill_(1.0)
        del x

    before = {
        "the op (back to back)": op,
        "the PyTorch MRA-2 fallback": fallback,
        "SDPA on the same q, k, v": lambda: F.scaled_dot_product_attention(q, k, v),
        "a 64 MB read": other.sum,
        "a 64 MB write": lambda: other.fill_(1.0),
        "256 MB of new pages, written and freed": new_pages,
    }
    times: dict = {name: [] for name in before}
    with torch.no_grad():
        for fn in before.values():  # (warm: kernels loaded, the fallback's code compiled)
            fn()
            op()
        for r in range(calls):
            for name, fn in list(before.items())[::-1 if r % 2 else 1]:
                fn()
                start = time.perf_counter()
                op()
                times[name].append((time.perf_counter() - start) * 1e3)
    print(json.dumps({name: statistics.median(t) for name, t in times.items()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--out", type=Path,
                   default=REPO_ROOT / "bench" / "results" / "cold_start_cpu.md")
    p.add_argument("--causes", action="store_true",
                   help="the op right after each of several kinds of work, in one process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        (causes if args.causes else child)(args.calls)
        return 0
    from mra_compile.tools import common
    from mra_compile.tools.benchmarks import machine_line

    if args.causes:
        out = subprocess.run([sys.executable, __file__, "--child", "--causes", "--calls",
                              str(args.calls)], capture_output=True, text=True, check=True).stdout
        medians = json.loads(out.strip().splitlines()[-1])
        back = next(iter(medians.values()))
        lines = [machine_line(), "",
                 f"fp32, B=1, H={HEADS}, N={N}, D={HEAD_DIM}, full mode, 4 blocks per row; "
                 f"one process, {args.calls} alternating rounds; the op's median, ms.", "",
                 "| right after | op | / back to back |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.2f} | {ms / back:.3f}x |" for name, ms in medians.items()]
        lines += ["", f"Command: `python bench/bench_cold_start.py --causes --calls {args.calls}`"]
        print("\n".join(lines))
        common.write_report(args.out, lines)
        return 0

    lines = [machine_line(), "",
             f"fp32, B=1, H={HEADS}, N={N}, D={HEAD_DIM}, full mode, 4 blocks per row; "
             f"{args.calls} calls each right after the PyTorch MRA-2 fallback, alternating "
             f"with {args.calls} back to back; one fresh process per setting; ms.", "",
             "| setting | after fallback: median | worst | system time (median) | "
             "back to back: median | after / back to back |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             check=True).stdout
        t = json.loads(out.strip().splitlines()[-1])
        after, back = statistics.median(t["after"]), statistics.median(t["back"])
        lines.append(f"| {name} | {after:.1f} | {max(t['after']):.1f} | "
                     f"{statistics.median(t['system']):.1f} | {back:.1f} | {after / back:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"Command: `python bench/bench_cold_start.py --calls {args.calls}`"]
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
