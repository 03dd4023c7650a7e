"""Masked calls against the unmasked op on the CPU: what a padding mask costs.

One interleaved run (fp32, B=1, H=12, D=64, ``block_per_row=4`` unless said): the op
without a mask, with an all-ones mask, with the last 100 tokens padded (per-sequence
budget), and the same padding with ``num_blocks = 4 * n`` (one budget for every row).
Each masked call twice: as it runs (a replay refreshes the mask's scratch in one C call,
``native_replay.NativeMasks``) and with that refresh in torch steps, as without the C
library (``launch_cache._Masks.refresh``). ``--batch B`` (B > 1) adds a padded batch: B
sequences, sequence i with N - i N / (2 B) real tokens, q, k, v an attention layer's
transposed views of [B, N, 12, 64] tensors (much padding: the refresh reads it all).

    python bench/bench_masks.py                  # N=8192, writes bench/results/masks_cpu.md
    python bench/bench_masks.py --n 4096 --repeat 5 --out /tmp/masks.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402
from mra_compile import memory  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

_NATIVE: dict = {}  # id of a plan's _Masks -> its NativeMasks, while set aside


def refreshed(fn, native: bool):
    """``fn`` with this thread's replay plans refreshing their masks from C (``native``) or
    in torch steps (their ``NativeMasks`` set aside for the call)."""
    def call():
        for plan in memory.WORKSPACE.plans.values():
            masks = getattr(plan, "masks", None)
            if masks is not None:
                if masks.native:
                    _NATIVE[id(masks)] = masks.native
                masks.native = _NATIVE.get(id(masks)) if native else False
        return fn()
    return call


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="sequence length N")
    p.add_argument("--repeat", type=int, default=9, help="interleaved rounds (median)")
    p.add_argument("--batch", type=int, default=1, help="B > 1: a padded batch too")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "masks_cpu.md")
    args = p.parse_args()
    N = args.n
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, N, 64, generator=g) for _ in range(3))
    ones = torch.ones(1, N)
    padded = torch.ones(1, N)
    padded[0, -100:] = 0
    masked = {
        "all-ones mask": lambda: mra_compile.mra_attention(q, k, v, ones, block_per_row=4),
        "100 padded, block_per_row=4": lambda: mra_compile.mra_attention(q, k, v, padded,
                                                                         block_per_row=4),
        "100 padded, num_blocks=4n": lambda: mra_compile.mra_attention(
            q, k, v, padded, num_blocks=4 * (-(-N // 32))),
    }
    if args.batch > 1:
        B = args.batch
        qb, kb, vb = (torch.randn(B, N, 12, 64, generator=g).transpose(1, 2) for _ in range(3))
        lengths = torch.tensor([N - i * N // (2 * B) for i in range(B)])
        batch_mask = torch.arange(N)[None, :] < lengths[:, None]
        masked[f"B={B} padded batch ({', '.join(map(str, lengths.tolist()))} tokens)"] = (
            lambda: mra_compile.mra_attention(qb, kb, vb, batch_mask, block_per_row=4))
    fns = {"no mask": lambda: mra_compile.mra_attention(q, k, v, block_per_row=4)}
    for name, fn in masked.items():
        fns[name] = refreshed(fn, True)
        fns[f"{name}, refresh in torch steps"] = refreshed(fn, False)
    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()  # (the second call replays, and makes its plan's C refresh)
        times = common.median_ms(fns, args.repeat)
    lines = [machine_line(), "",
             f"fp32, B=1, H=12, N={N}, D=64, full mode; median of {args.repeat} interleaved "
             "rounds.", "", "| call | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in times.items()]
    batch = f" --batch {args.batch}" if args.batch > 1 else ""
    lines += ["", f"Command: `python bench/bench_masks.py --n {N} --repeat {args.repeat}{batch}`"]
    print("\n".join(lines))
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
