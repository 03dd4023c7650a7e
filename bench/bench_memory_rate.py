"""This CPU's memory read rate for the pooling's access pattern, on one core and on all.

``pool_and_logits`` reads q, k and v once (their block sums) and is bound by the memory's
rate at large N. This script compiles a small C program (the system C compiler, OpenMP)
that computes the same block sums of three float32 tensors [H, N, D] (32 rows a block, one
head a task, the tasks taken as threads come free) on 1 thread and on one per core, the
inputs pushed out of the caches before each round by reading a 64 MB buffer (a read, not
a ``memset``: streaming stores would leave the last-level cache alone). Best of
``--rounds``.

It says how much of the pooling's time one core could take alone while the others
compute (roofline_cpu.md, "pooling against the memory's rate").

    python bench/bench_memory_rate.py                 # writes bench/results/memory_rate_cpu.md
    python bench/bench_memory_rate.py --n 4096 --out /tmp/rate.md
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import c_program  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

# argv: threads H N D rounds; prints "<ms> <GB/s>" of the best round.
SOURCE = c_program.CLOCK + r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char** argv) {
  int threads = atoi(argv[1]), H = atoi(argv[2]), N = atoi(argv[3]), D = atoi(argv[4]);
  int rounds = atoi(argv[5]), blocks = N / 32;
  size_t per = (size_t)H * N * D, evict_bytes = (size_t)64 << 20;
  float* x[3];
  for (int i = 0; i < 3; i++) {
    x[i] = aligned_alloc(64, per * sizeof(float));
    for (size_t j = 0; j < per; j++) x[i][j] = (float)(j % 7);
  }
  float* sums = aligned_alloc(64, (size_t)3 * H * blocks * D * sizeof(float));
  volatile char* evict = malloc(evict_bytes);
  for (size_t j = 0; j < evict_bytes; j++) evict[j] = (char)j;
  double best = 1e30;
  for (int r = 0; r < rounds; r++) {
    long s = 0;
    for (size_t j = 0; j < evict_bytes; j += 64) s += evict[j];
    double t = now();
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < 3; i++)
        for (int b = 0; b < blocks; b++) {
          const float* src = x[i] + ((size_t)h * N + (size_t)b * 32) * D;
          float* dst = sums + (((size_t)i * H + h) * blocks + b) * D;
          for (int d = 0; d < D; d++) dst[d] = 0.0f;
          for (int row = 0; row < 32; row++)
            for (int d = 0; d < D; d++) dst[d] += src[(size_t)row * D + d];
        }
    double el = now() - t;
    if (el < best) best = el;
    if (s == 42) printf("#");
  }
  printf("%.3f %.1f %g\n", best * 1e3, 3.0 * per * sizeof(float) / best / 1e9, sums[D + 1]);
  return 0;
}
"""


def rate(exe: Path, threads: int, H: int, N: int, D: int, rounds: int) -> tuple[float, float]:
    """(ms, GB/s) of the best round on ``threads`` threads."""
    out = subprocess.run([str(exe), str(threads), str(H), str(N), str(D), str(rounds)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=12, help="H (B*H rows)")
    p.add_argument("--n", type=int, default=8192, help="N, a multiple of 32")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeat", type=int, default=3, help="runs of each thread count, alternating")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "memory_rate_cpu.md")
    args = p.parse_args()
    if args.n % 32:
        p.error("--n must be a multiple of 32")
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    runs: dict[int, list[tuple[float, float]]] = {c: [] for c in counts}
    with tempfile.TemporaryDirectory() as tmp:
        exe = c_program.build(Path(tmp), "memory_rate", SOURCE,
                              ["-O3", "-march=native", "-fopenmp"], "bench_memory_rate.py")
        for _ in range(args.repeat):
            for c in counts:
                runs[c].append(rate(exe, c, args.heads, args.n, args.head_dim, args.rounds))
    mb = 3 * args.heads * args.n * args.head_dim * 4 / 2**20
    lines = [machine_line(), "",
             f"Block sums of q, k, v [{args.heads}, {args.n}, {args.head_dim}] float32 "
             f"({mb:.0f} MiB), the pooling's pattern; best of {args.rounds} rounds a run, "
             f"{args.repeat} runs a thread count (alternating).", "",
             "| threads | ms | GB/s |", "|---|---|---|"]
    for c in counts:
        lines.append(f"| {c} | {' / '.join(f'{ms:.2f}' for ms, _ in runs[c])} | "
                     f"{' / '.join(f'{gb:.1f}' for _, gb in runs[c])} |")
    lines += ["", f"Command: `python bench/bench_memory_rate.py --heads {args.heads} --n {args.n} "
              f"--head-dim {args.head_dim}`"]
    print("\n".join(lines))
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
