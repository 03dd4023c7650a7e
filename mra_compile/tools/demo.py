"""MRA-2 demo: build (or load) the kernels, then check accuracy and speed on a long sequence.

    python -m mra_compile.tools.demo                 # N=8192, B=1, H=12, D=64, full mode
    python -m mra_compile.tools.demo --seq-len 4096 --mode sparse

It prints a short report: how long the kernels took to build or load, the relative error
of MRA-2 against exact attention on inputs with structure (local attention plus a
shared prefix that every token looks at), and the speed against dense
``torch.nn.functional.scaled_dot_product_attention``. What it is doing meanwhile (kernel
compiles, each step of the accuracy and speed parts) shows on stderr
(``mra_compile.progress``; ``--quiet`` or ``MRA_COMPILE_QUIET=1``: none).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from mra_compile.progress import Status, silenced
from mra_compile.tools.common import (
    BLOCK_SIZE,
    CORRELATION_LENGTH,
    PREFIX_TOKENS,
    cpu_model,
    local_prefix_inputs,
    median_ms,
    package_version,
    random_qkv,
    relative_error,
)

TIMED_RUNS = 5


PROG = "python -m mra_compile.tools.demo"


def parse_args(argv=None, prog: str = PROG):
    """The demo's arguments; ``prog``: the command as usage and errors show it (the CLI
    passes ``mra-compile demo``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192, help="N, tokens (default: %(default)s)")
    p.add_argument("--heads", type=int, default=12, help="H (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="D (default: %(default)s)")
    p.add_argument("--block-per-row", type=int, default=4,
                   help="exact 32x32 blocks per block row (default: %(default)s)")
    p.add_argument("--mode", choices=("full", "sparse"), default="full",
                   help="'full' = MRA-2, 'sparse' = MRA-2-s (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="kernel cache directory (sets MRA_COMPILE_CACHE_DIR; an empty "
                        "directory forces a fresh build)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (kernel compiles, the steps of each part)")
    args = p.parse_args(argv)
    if args.seq_len < 2 * BLOCK_SIZE or args.heads < 1 or args.head_dim < 2 or args.block_per_row < 1:
        p.error(f"need --seq-len >= {2 * BLOCK_SIZE}, --heads >= 1, --head-dim >= 2, "
                "--block-per-row >= 1")
    return args


# ---------------------------------------------------------------------------- inputs

def prefix_mass(q, k, samples: int = 256) -> float:
    """Average share of attention the prefix gets, over a sample of queries."""
    idx = torch.linspace(0, q.shape[2] - 1, min(samples, q.shape[2])).long()
    logits = q[:, :, idx] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1)[..., :PREFIX_TOKENS].sum(-1).mean().item()


# ---------------------------------------------------------------------------- attention

def sliding_window(q, k, v, half_width: int) -> torch.Tensor:
    """Exact attention restricted to keys within +-half_width tokens of each query."""
    B, H, N, D = q.shape
    b, w = BLOCK_SIZE, half_width
    pad = (-N) % b
    n = (N + pad) // b
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n, b, D)
    kw = F.pad(k, (0, 0, w, w + pad)).unfold(2, b + 2 * w, b)  # [B, H, n, D, b+2w]
    vw = F.pad(v, (0, 0, w, w + pad)).unfold(2, b + 2 * w, b)
    logits = torch.einsum("bhitd,bhidl->bhitl", qb, kw) / math.sqrt(D)
    t = torch.arange(n)[:, None, None] * b + torch.arange(b)[None, :, None]  # query token
    s = t - t % b - w + torch.arange(b + 2 * w)[None, None, :]  # key token
    keep = ((s - t).abs() <= w) & (s >= 0) & (s < N)
    logits = logits.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bhitl,bhidl->bhitd", torch.softmax(logits, dim=-1), vw)
    return out.reshape(B, H, n * b, D)[:, :, :N]


# ---------------------------------------------------------------------------- report

def machine_line() -> str:
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}, TVM {package_version('apache-tvm')}")


def build_kernels(args, run) -> str:
    """Run the op once on a small input so every kernel is built or loaded; describe it."""
    import mra_compile

    tiny = torch.randn(1, args.heads, 2 * BLOCK_SIZE, args.head_dim)
    start = time.perf_counter()
    run(tiny, tiny, tiny)
    seconds = time.perf_counter() - start
    events = mra_compile.cache_events()
    built = sum(e["origin"] == "compiled" for e in events)
    loaded = len(events) - built
    how = (f"{built} compiled with TVM" if built else "") + (" + " if built and loaded else "") + (
        f"{loaded} loaded from the disk cache" if loaded else "")
    return f"Kernels: {how or 'already in memory'} in {seconds:.2f} s  ({mra_compile.cache_dir()})"


def main(argv=None, prog: str = PROG) -> int:
    args = parse_args(argv, prog)
    if args.cache_dir:
        os.environ["MRA_COMPILE_CACHE_DIR"] = args.cache_dir
    with silenced(args.quiet):
        return run(args)


def run(args) -> int:
    """The demo for parsed ``args``."""
    import mra_compile  # after MRA_COMPILE_CACHE_DIR is set

    B, H, N, D, b = 1, args.heads, args.seq_len, args.head_dim, BLOCK_SIZE
    n = -(-N // b)
    bpr = args.block_per_row

    def mra(q, k, v):
        return mra_compile.mra_attention(q, k, v, block_per_row=bpr, approx_mode=args.mode)

    print(f"MRA-2 demo: torch.ops.mra.attention (TVM-compiled, CPU), mode {args.mode!r}")
    print(machine_line(), flush=True)
    status = Status("demo", every=0.0)  # (a dozen steps: elsewhere than a terminal, all)
    status.update("building or loading the kernels (compiled on first use, then cached)")
    built = build_kernels(args, mra)
    status.close()
    print(built, flush=True)
    print(f"Problem: B={B}, H={H}, N={N}, D={D}, fp32; {bpr} exact {b}x{b} blocks per block row "
          f"= {bpr * n} of {n * n} blocks ({100 * bpr / n:.1f}% of the score matrix)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        status.update("making the inputs")
        q, k, v = local_prefix_inputs(B, H, N, D, gen)
        status.close()
        print(f"Input: queries/keys follow a smooth random walk (correlation length "
              f"{CORRELATION_LENGTH} tokens), so each token attends mostly to its neighbours; "
              f"the first {PREFIX_TOKENS} tokens are a shared prefix that every query also "
              f"attends to ({100 * prefix_mass(q, k):.0f}% of the attention mass); values are "
              f"i.i.d. N(0,1).", flush=True)
        report_accuracy(args, mra, q, k, v, gen, status)
        report_speed(mra, q, k, v, status)
    return 0


ACCURACY_STEPS = ("exact attention (dense SDPA)", "MRA-2", "sliding window",
                  "exact attention on noise", "MRA-2 on noise")


def report_accuracy(args, mra, q, k, v, gen, status: Status | None = None) -> None:
    B, H, N, D = q.shape
    w = args.block_per_row * BLOCK_SIZE // 2
    step = iter(range(1, len(ACCURACY_STEPS) + 1))

    def show(what):
        i = next(step)
        if status is not None:
            status.update(f"accuracy {i}/{len(ACCURACY_STEPS)}: {what}")

    show(ACCURACY_STEPS[0])
    exact = F.scaled_dot_product_attention(q, k, v)
    show(ACCURACY_STEPS[1])
    rows = [(f"MRA-2 ({args.mode})", relative_error(mra(q, k, v), exact))]
    show(ACCURACY_STEPS[2])
    rows.append((f"sliding window +-{w} tokens (same budget)",
                 relative_error(sliding_window(q, k, v, w), exact)))
    nq, nk, nv = random_qkv(B, H, N, D, gen)
    show(ACCURACY_STEPS[3])
    exact = F.scaled_dot_product_attention(nq, nk, nv)
    show(ACCURACY_STEPS[4])
    rows.append((f"MRA-2 ({args.mode}) on i.i.d. noise (flat attention), for contrast",
                 relative_error(mra(nq, nk, nv), exact)))
    if status is not None:
        status.close()
    print("\nAccuracy: relative L2 error vs exact attention, mean over heads")
    width = max(len(name) for name, _ in rows)
    for name, err in rows:
        print(f"  {name:<{width}}  {100 * err:6.2f}%")


def report_speed(mra, q, k, v, status: Status | None = None) -> None:
    fns = {"mra": lambda: mra(q, k, v),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    if status is not None:
        status.update("speed: warm-up")
    for fn in fns.values():  # warm-up
        fn()

    def on_round(i):
        if status is not None:
            status.update(f"speed: round {i}/{TIMED_RUNS} (MRA-2, then dense SDPA)")

    t = median_ms(fns, TIMED_RUNS, on_round=on_round)
    if status is not None:
        status.close()
    print(f"\nSpeed: median of {TIMED_RUNS} runs after warm-up")
    print(f"  MRA-2 (torch.ops.mra.attention)  {t['mra']:9.1f} ms")
    print(f"  dense SDPA (exact)               {t['sdpa']:9.1f} ms")
    print(f"  speedup                          {t['sdpa'] / t['mra']:9.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
