"""The CPU op against its flop floor and against compiled FlexAttention on its own blocks.

Issue 16's must-show rows, each from one interleaved run (every round calls every
implementation once, in turn):

- the flop floor: ``4·k·b²·D + 4·n²·D`` flops per (batch, head) row at this CPU's fp32
  matmul peak, measured in the same run before and after the rounds (the best of square
  ``torch.mm`` sizes, the higher of the two runs), and in every round (2048 x 2048,
  called in turn with the rest: ~90 ms, a rate that what ran before it barely moves,
  where 512 x 512, often the best back to back, ran 15% slower in the rounds);
- full mode, interleaved with dense SDPA: op / floor, at the higher peak of before and
  after the rounds, and the median over the rounds of each round's op / floor at that
  round's peak (the host's speed drifts over a run, by 10-25% here: a ratio within a
  round sees one speed, the op and torch.mm alike);
- sparse mode against compiled FlexAttention (Inductor's C++ flex template) on exactly
  the op's blocks in its fastest form: 32-token blocks, all marked full (no mask_mod
  work), built from ``mra_compile.block_selection``.

    python bench/bench_roofline_cpu.py                       # N = 4096 and 8192
    python bench/bench_roofline_cpu.py --sizes 512 1024 --repeat 21
    python bench/bench_roofline_cpu.py --backward --sizes 8192   # + forward+backward
    python bench/bench_roofline_cpu.py --bf16     # + sparse mode in bf16 against Flex

``--bf16`` adds, to the same rounds, the op (sparse) and Flex on bf16 copies of the
inputs, and compares the bf16 op with Flex in its faster dtype on this CPU.

Forward+backward's floor is 3.5 times the forward's: the backward's minimal work is 2.5
times the forward's (recomputing the logits, then dP, dV, dQ, dK: five products per
block against two, as in FlashAttention's backward). A step is the op's forward and
``out.backward(grad)`` with a given upstream gradient, the leaves' ``.grad`` set to None
after it (what ``optimizer.zero_grad()`` does); the second column times the step as
this script did before 2026-12-02, for comparison: ``out.sum().backward()`` (an expanded
upstream gradient the op first copies) with the gradients accumulated into the leaves'
``.grad`` (three more passes over q, k, v's size that are not the op's). The two are
interleaved.

B·H = 12, D = 64, 4 blocks per row, fp32, as the issue states. Writes nothing: the
table goes to stdout with the machine line.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402
from bench.flex_mra import selection_block_mask  # noqa: E402
from mra_compile.targets import cpu  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

B, H, D, BLOCK = 1, 12, 64, 32


def matmul_peak_gflops(repeat: int = 7) -> float:
    """fp32 GFLOP/s of the best square torch.mm here (all of torch's threads), after a
    second of warm-up (a just-started VM measured 94 against 185 GFLOP/s without it)."""
    a = torch.randn(1024, 1024)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        torch.mm(a, a)
    best = 0.0
    for size in (512, 1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        ms = common.median_ms({"mm": lambda a=a, b=b: torch.mm(a, b)}, repeat)["mm"]
        best = max(best, 2 * size**3 / ms / 1e6)
    return best


def matmul(size: int):
    """A torch.mm of two square ``size`` operands, for the rounds, and its flops."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return (lambda: torch.mm(a, b)), 2 * size**3


def per_round_ratio(op_ms: list, mm_ms: list, floor: float, peak: float,
                    mm_flops: int) -> float:
    """Median over the rounds of op time / floor, the floor (``floor`` ms at ``peak``
    GFLOP/s, inversely proportional to the rate) taken at each round's torch.mm rate
    (``mm_flops`` in that round's ``mm_ms``)."""
    return statistics.median(t / (floor * peak / (mm_flops / m / 1e6))
                             for t, m in zip(op_ms, mm_ms))


def floor_ms(n_tokens: int, blocks_per_row: int, peak: float) -> float:
    """The flop floor of one call at ``peak`` GFLOP/s (docs/spec.md, "Cost")."""
    n = -(-n_tokens // BLOCK)
    k = blocks_per_row * n
    flops = B * H * (4 * k * BLOCK * BLOCK * D + 4 * n * n * D)
    return flops / peak / 1e6


def flex_on_blocks(q, k, v, num_blocks: int):
    """Compiled FlexAttention on the op's sparse-mode blocks, all full (its fastest form)."""
    from torch.nn.attention.flex_attention import flex_attention

    selected, _ = mra_compile.block_selection(q, k, v, num_blocks=num_blocks,
                                              approx_mode="sparse")
    mask = selection_block_mask(selected, None, BLOCK)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda: flex(q, k, v, block_mask=mask)


def implementations(q, k, v, nb: int, bf16: bool = False) -> dict:
    """What one round calls, in turn."""
    impls = {
        "full": lambda: torch.ops.mra.attention(q, k, v, None, nb, "full"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "sparse": lambda: torch.ops.mra.attention(q, k, v, None, nb, "sparse"),
        "flex": flex_on_blocks(q, k, v, nb),
    }
    if bf16:
        qb, kb, vb = (x.bfloat16() for x in (q, k, v))
        impls["sparse_bf16"] = lambda: torch.ops.mra.attention(qb, kb, vb, None, nb, "sparse")
        impls["flex_bf16"] = flex_on_blocks(qb, kb, vb, nb)
    return impls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--backward", action="store_true",
                   help="also forward+backward (full mode) against 3.5x the forward floor")
    p.add_argument("--bf16", action="store_true",
                   help="also sparse mode in bf16, the op against Flex")
    args = p.parse_args()

    torch.manual_seed(0)
    print(machine_line())
    # The floor uses the higher of two measurements, before and after the rounds (a
    # lower peak would flatter the op); both are printed, and the tables after them.
    peak_before = matmul_peak_gflops()
    mm_size = 2048
    mm_call, mm_flops = matmul(mm_size)
    forward, both = [], []
    for n_tokens in args.sizes:
        q, k, v = (torch.randn(B, H, n_tokens, D) for _ in range(3))
        nb = args.blocks_per_row * (-(-n_tokens // BLOCK))
        with torch.no_grad():
            impls = {**implementations(q, k, v, nb, args.bf16), "mm": mm_call}
            for fn in impls.values():  # builds, compiles, fills caches
                fn()
                fn()
            forward.append((n_tokens, common.round_ms(impls, args.repeat)))
    if args.backward:
        for n_tokens in args.sizes:
            leaves = [torch.randn(B, H, n_tokens, D, requires_grad=True) for _ in range(3)]
            kept = [x.detach().clone().requires_grad_() for x in leaves]  # (grads accumulate)
            grad = torch.randn(B, H, n_tokens, D)
            nb = args.blocks_per_row * (-(-n_tokens // BLOCK))

            def step(leaves=leaves, nb=nb, grad=grad):
                torch.ops.mra.attention(*leaves, None, nb, "full").backward(grad)
                for x in leaves:
                    x.grad = None

            def accumulated(leaves=kept, nb=nb):
                torch.ops.mra.attention(*leaves, None, nb, "full").sum().backward()

            step(), accumulated()
            both.append((n_tokens, common.round_ms(
                {"step": step, "accumulated": accumulated, "mm": mm_call}, args.repeat)))
    peak_after = matmul_peak_gflops()
    peak = max(peak_before, peak_after)
    in_rounds = [mm_flops / statistics.median(t["mm"]) / 1e6 for _, t in forward + both]
    print(f"fp32 matmul peak (best torch.mm 512-2048): {peak:.0f} GFLOP/s "
          f"(before the rounds {peak_before:.0f}, after {peak_after:.0f}; in the rounds, "
          f"{mm_size}x{mm_size}, median per N: "
          + ", ".join(f"{x:.0f}" for x in in_rounds) + ")")
    products = f"; bf16 products: {cpu.bf16_instructions()}" if args.bf16 else ""
    print(f"B*H={B * H} D={D} {args.blocks_per_row} blocks/row; median of {args.repeat} "
          f"interleaved rounds{products}\n")
    bf16_columns = (" op sparse bf16 ms | op sparse fp32/bf16 | Flex bf16 ms "
                    "| Flex bf16/op bf16 | faster Flex/op bf16 |")
    print("| N | floor ms | op full ms | SDPA ms | op/floor | op/floor, per round | SDPA/op "
          "| op sparse ms | Flex ms | Flex/op sparse |" + (bf16_columns if args.bf16 else ""))
    print("|---|---|---|---|---|---|---|---|---|---|"
          + ("---|---|---|---|---|" if args.bf16 else ""))
    for n_tokens, samples in forward:
        t = {name: statistics.median(ts) for name, ts in samples.items()}
        floor = floor_ms(n_tokens, args.blocks_per_row, peak)
        rounds = per_round_ratio(samples["full"], samples["mm"], floor, peak, mm_flops)
        row = (f"| {n_tokens} | {floor:.2f} | {t['full']:.2f} | {t['sdpa']:.2f} | "
               f"{t['full'] / floor:.2f}x | {rounds:.2f}x | {t['sdpa'] / t['full']:.2f}x | "
               f"{t['sparse']:.2f} | {t['flex']:.2f} | {t['flex'] / t['sparse']:.2f}x |")
        if args.bf16:
            ob, fb = t["sparse_bf16"], t["flex_bf16"]
            row += (f" {ob:.2f} | {t['sparse'] / ob:.2f}x | {fb:.2f} | {fb / ob:.2f}x | "
                    f"{min(fb, t['flex']) / ob:.2f}x |")
        print(row)
    if both:
        print("\n| N | fwd+bwd floor ms | op fwd+bwd ms (full) | op/floor | op/floor, per round "
              "| sum(), accumulated ms | its /floor |\n|---|---|---|---|---|---|---|")
    for n_tokens, samples in both:
        floor = 3.5 * floor_ms(n_tokens, args.blocks_per_row, peak)
        ms, acc = (statistics.median(samples[name]) for name in ("step", "accumulated"))
        rounds = per_round_ratio(samples["step"], samples["mm"], floor, peak, mm_flops)
        print(f"| {n_tokens} | {floor:.2f} | {ms:.2f} | {ms / floor:.2f}x | {rounds:.2f}x | "
              f"{acc:.2f} | {acc / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
