"""Where the forward's time goes: each kernel of one call, re-timed alone, and the whole op.

    python bench/profile_forward.py                    # N=4096, B*H=12, D=64, 4 blocks/row
    python bench/profile_forward.py --n 8192 --mode sparse --repeat 25
    python bench/profile_forward.py --n 8192 --dtype bfloat16
    python bench/profile_forward.py --n 4096 --mode sparse --repeat 31 --before sdpa
    python bench/profile_forward.py --n 512 --mode sparse --before sdpa --layout heads-last
    python bench/profile_forward.py --n 512 --before sdpa --batch 4 --padded

Records one call's kernels with ``mra_compile.build.trace_kernel_calls`` and times each
with its recorded arguments: alone (median of ``--repeat`` back-to-back calls) and in
sequence (each launch where it runs in the call, right after the one before it, over
``--repeat`` replays of the call's launches: the caches and the branch predictor as the
call leaves them, where back to back a kernel finds its own). Then the whole
op against a replay of the recorded launches in their order (the same kernels and
tensors, nothing else: no validation, preparation, selection read-back or scratch
lookups; same inputs, so the same data-dependent plan), against itself replaying its
launches from Python (``MRA_COMPILE_NATIVE_REPLAY=0``: "from python") and with its
launch cache switched off (``MRA_COMPILE_LAUNCH_CACHE=0``: "usual"), in interleaved
rounds, each call right after ``--before`` (dense SDPA on the same q, k, v, as the sparse
op runs in ``bench_roofline_cpu.py``'s rounds; or nothing). op - replay is the host work
a call has left, op / usual what the launch cache saves, op / from python what its
replay from C saves. Back-to-back timings have warm
caches: expect the interleaved rounds of ``bench_forward.py`` to be slower (see the
README). ``--layout heads-last``: q, k, v are [B, N, H, D] tensors seen as [B, H, N, D]
(transposed views, what an attention layer passes after splitting its heads off the
hidden dim), which the kernels read in place (their heads-last variant; "copied": the op
with ``MRA_COMPILE_HEADS_LAST=0``, copying them into its own layout each call, in the
same rounds). ``--layout fused-qkv``: q and k such views, v a slice of a fused
``[B, N, 3, H, D]`` projection (ModernBERT's, whose rotary embedding makes q and k new
tensors): v copied into the heads-last layout, q and k read in place ("copied": all three
copied into the kernels' own layout). ``--batch B --padded``:
B sequences with a key padding mask (``[B, N]`` bool), as a padded batch is run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile import build, inputs, launch_cache, native_replay  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    """Median ms of ``repeat`` back-to-back calls (one function: nothing to interleave)."""
    return common.median_ms({"fn": fn}, repeat)["fn"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="sequence length N")
    p.add_argument("--heads", type=int, default=12, help="B*H rows")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--mode", choices=("full", "sparse"), default="full")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--before", choices=("none", "sdpa"), default="none",
                   help="what runs right before each call of the op and of the replay")
    p.add_argument("--layout", choices=("contiguous", "heads-last", "fused-qkv"),
                   default="contiguous",
                   help="q, k, v contiguous [B, H, N, D], or transposed views of [B, N, H, D], "
                        "or q, k such views and v a slice of a fused [B, N, 3, H, D] projection")
    p.add_argument("--batch", type=int, default=1, help="B sequences (dividing --heads)")
    p.add_argument("--padded", action="store_true",
                   help="a key padding mask: sequence i has N - i N / (2 B) real tokens")
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.heads % args.batch:
        p.error("--batch must divide --heads (B*H)")
    B, H = args.batch, args.heads // args.batch
    if args.layout == "heads-last":
        q, k, v = (torch.randn(B, args.n, H, args.head_dim, dtype=dtype).transpose(1, 2)
                   for _ in range(3))
    elif args.layout == "fused-qkv":  # (ModernBERT: q and k rotated, so new tensors)
        fused = torch.randn(B, args.n, 3, H, args.head_dim, dtype=dtype)
        q, k, v = (x.transpose(1, 2) for x in fused.unbind(2))
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    else:
        q, k, v = (torch.randn(B, H, args.n, args.head_dim, dtype=dtype) for _ in range(3))
    num_blocks = args.blocks_per_row * (-(-args.n // 32))
    mask = None
    if args.padded:  # (sequence i has N - i N / (2 B) real tokens: a padded batch)
        lengths = torch.tensor([args.n - i * args.n // (2 * args.batch)
                                for i in range(args.batch)])
        mask = torch.arange(args.n)[None, :] < lengths[:, None]

    def op():
        return torch.ops.mra.attention(q, k, v, mask, num_blocks, args.mode)

    with torch.no_grad():
        for _ in range(3):
            op()  # builds or loads the kernels, fills the workspace
        with build.trace_kernel_calls() as calls:
            op()
        print(machine_line())
        print(f"N={args.n} B*H={args.heads} D={args.head_dim} "
              f"{args.blocks_per_row} blocks/row, {args.mode}, {args.dtype}, {args.layout}, "
              f"B={args.batch}{' padded' if args.padded else ''}; "
              f"median of {args.repeat}")
        total = 0.0
        launches = []
        for call in calls:
            fn = build.kernel(call["op"], call["knobs"], call["target"], **call["static"])
            launches.append((fn, call["args"]))
        # Each launch timed where it runs in the call: right after the one before it (its
        # inputs written by it, the caches as the call's traffic leaves them).
        in_sequence = [[] for _ in launches]
        for _ in range(args.repeat):
            for times, (fn, fn_args) in zip(in_sequence, launches):
                start = time.perf_counter()
                fn(*fn_args)
                times.append(time.perf_counter() - start)
        for call, (fn, fn_args), times in zip(calls, launches, in_sequence):
            ms = median_ms(lambda f=fn, a=fn_args: f(*a), args.repeat)
            total += ms
            knobs = " ".join(f"{key}={val}" for key, val in call["resolved"].items())
            print(f"  {call['op']:16s} {ms:7.2f} ms alone, "
                  f"{1e3 * statistics.median(times):7.2f} in sequence   {knobs}")

        def replay():  # (into the recorded call's output and scratch, as the op would)
            for fn, fn_args in launches:
                fn(*fn_args)

        def before():
            if args.before == "sdpa":
                F.scaled_dot_product_attention(q, k, v)

        switches = (launch_cache.ENV, native_replay.ENV, inputs.HEADS_LAST_ENV)

        def setting(cache: str, native: str, in_place: str = "1"):
            def switch():
                before()
                os.environ.update(zip(switches, (cache, native, in_place)))
            return switch

        # (the "before" entries are timed too, and ignored: each round runs before, op,
        # before, replay, before, op replayed from Python, before, op the usual way, and
        # with --layout heads-last before, op with its inputs copied)
        given = {name: os.environ.get(name) for name in switches}
        rounds = {"before op": setting("1", "1"), "op": op,
                  "before replay": before, "replay": replay,
                  "before python": setting("1", "0"), "python": op,
                  "before usual": setting("0", "1"), "usual": op}
        if args.layout != "contiguous":
            rounds.update({"before copied": setting("1", "1", "0"), "copied": op})
        timed = common.median_ms(rounds, args.repeat)
        for name, value in given.items():  # (the caller's settings back)
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
        whole, replayed, usual = timed["op"], timed["replay"], timed["usual"]
        python = timed["python"]
    print(f"  {'kernels':16s} {total:7.2f} ms   (each alone, back to back)")
    print(f"  {'whole op':16s} {whole:7.2f} ms   (right after: {args.before})")
    print(f"  {'replay':16s} {replayed:7.2f} ms   (the launches in order, right after: "
          f"{args.before}; replay / op {replayed / whole:.3f}x, host work {whole - replayed:.2f} ms)")
    print(f"  {'from python':16s} {python:7.2f} ms   (the launch cache replaying from Python, "
          f"{native_replay.ENV}=0, right after: {args.before}; op / this {whole / python:.3f}x)")
    print(f"  {'usual':16s} {usual:7.2f} ms   (the op without its launch cache, "
          f"{launch_cache.ENV}=0, right after: {args.before}; op / usual {whole / usual:.3f}x)")
    if "copied" in timed:
        print(f"  {'copied':16s} {timed['copied']:7.2f} ms   (the op copying q, k, v into its "
              f"own layout, {inputs.HEADS_LAST_ENV}=0, right after: {args.before}; op / copied "
              f"{whole / timed['copied']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
