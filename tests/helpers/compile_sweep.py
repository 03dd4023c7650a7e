"""Every variant of the CPU unit kernels built at every unit width of its knob space and
at wide head dims: a manual check after a schedule change (not run by the suite; ~20
minutes on 2 cores with the defaults).

    python tests/helpers/compile_sweep.py [--head-dims 16 48 128 256 512]

The kernels' static variants (dtype, bf16 micro-kernels and their float32-P form,
heads-last inputs, grouped heads, full or sparse mode) are those real calls launch:
forward and backward calls of the op with overflow units are traced on this CPU, so a
CPU without AVX-512-BF16 sweeps no bf16 variant. Each ``hires_units`` and ``hires_rows``
variant is then compiled at each head dim for each ``blocks_per_unit`` /
``row_unit_blocks`` of ``schedules/cpu.py``'s ``SPACES``, the other knobs at their
defaults. TVM can fail to lower a schedule at some of these points only (its
StorageRewrite gave a unit's bf16 queries' buffer to its float32 logits at one block a
unit or D >= 256, before ``extern_calls.pointer``), which the suite's shapes do not all
reach. Prints each failure and a summary; exits 1 if any failed.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's helpers

from conftest import make_qkv  # noqa: E402

import mra_compile  # noqa: E402
from mra_compile import build, knob_policy  # noqa: E402
from mra_compile.schedules import cpu as cpu_schedules  # noqa: E402
from mra_compile.tuning import BLOCK_KNOBS  # noqa: E402


def launched_variants() -> dict:
    """(op, its static arguments but D) -> the static arguments, for the unit kernels that
    forward and backward calls launch on this CPU."""
    variants = {}
    for dtype, mode, train, heads_last, gqa in itertools.product(
            (torch.float32, torch.bfloat16), ("full", "sparse"), (False, True),
            (False, True), (False, True)):
        if train and heads_last:
            continue  # (training calls read their own layout)
        q, k, v = make_qkv(1, 1, 4, 544, 64, dtype=dtype)  # 17 whole block rows
        if gqa:
            k, v = k[:, :2], v[:, :2]
        if heads_last:
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        for x in (q, k, v):
            x.requires_grad_(train)
        with build.trace_kernel_calls() as calls, torch.set_grad_enabled(train):
            out = mra_compile.mra_attention(q, k, v, block_per_row=10, approx_mode=mode,
                                            enable_gqa=gqa)
            if train:
                out.backward(torch.ones_like(out))
        for call in calls:
            if call["op"] in BLOCK_KNOBS:
                static = {name: value for name, value in call["static"].items() if name != "D"}
                variants[(call["op"], tuple(sorted(static.items())))] = static
    return variants


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[16, 48, 128, 256, 512])
    args = p.parse_args()
    variants = launched_variants()
    print(f"{len(variants)} static variants of {sorted(BLOCK_KNOBS)}", flush=True)
    failed, built, start = 0, 0, time.time()
    for (op, _), static in sorted(variants.items(), key=lambda item: str(item[0])):
        knob = BLOCK_KNOBS[op]
        for D, width in itertools.product(args.head_dims, cpu_schedules.SPACES[op][knob]):
            knobs = {**knob_policy.resolve_knobs(op, None), knob: width}
            built += 1
            try:
                build.compile_kernel(op, {**static, "D": D}, knobs)
            except Exception as e:  # (any failure to lower is what this looks for)
                failed += 1
                print(f"FAILED {op} {static} D={D} {knob}={width}: {str(e)[-200:]}", flush=True)
    print(f"{built} kernels built, {failed} failed, {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
