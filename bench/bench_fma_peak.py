"""This CPU's vector FMA peaks, against which the roofline's floor (torch.mm's rate) sits.

``bench/bench_roofline_cpu.py`` puts the flop floor at the best square ``torch.mm`` rate,
as issue 16 defines it. That is not what the FMA units can do: this script compiles a
small C program (the system C compiler, AVX-512) that runs

- 12 independent chains of ``vfmadd231ps`` on 16-float vectors (no loads: the units'
  peak), and the same with ``vdpbf16ps`` (bf16 pairs into float32) where the CPU has
  AVX-512-BF16;
- a 32 x 32 x 64 block product from L1 as the op's float32 units compute q kᵀ (each key's
  value broadcast, the queries as two vectors), with 4, 8 and 16 keys per register tile
  (8, 16 and 32 accumulators);

first in one process alone, then in one per core at once; then torch.mm's best square
rate on all cores, as the roofline bench measures it.

    python bench/bench_fma_peak.py              # writes bench/results/fma_peak_cpu.md
    python bench/bench_fma_peak.py --out /tmp/fma.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import c_program  # noqa: E402
from mra_compile import host  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402

# Each line the program prints: "<name> <GFLOP/s>".
SOURCE = c_program.CLOCK + r"""
#include <immintrin.h>
#include <stdio.h>

/* 12 independent accumulator chains of STEP(acc) on 16 float lanes, N times;
   FLOPS per instruction (32: an FMA; 64: a bf16 pair dot). */
#define CHAINS(NAME, N, FLOPS, STEP)                                                   \
  static void NAME(void) {                                                             \
    __m512 acc[12];                                                                    \
    for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_ps((float)j);                    \
    double t = now();                                                                  \
    for (long i = 0; i < (N); i++) {                                                   \
      _Pragma("GCC unroll 12")                                                         \
      for (int j = 0; j < 12; j++) acc[j] = STEP(acc[j]);                              \
    }                                                                                  \
    double el = now() - t;                                                             \
    float s = 0;                                                                       \
    for (int j = 0; j < 12; j++) s += _mm512_reduce_add_ps(acc[j]);                    \
    printf(#NAME " %.1f %g\n", (N) * 12.0 * (FLOPS) / el / 1e9, s);                    \
  }

#define FMA(a) _mm512_fmadd_ps(a, _mm512_set1_ps(1.0000001f), _mm512_set1_ps(1e-7f))
CHAINS(fp32_fma, 100000000L, 32, FMA)
#ifdef BF16
#pragma GCC target("avx512bf16")
#define BF16_ONE ((__m512bh)_mm512_set1_epi16(0x3f80))
#define DOT(a) _mm512_dpbf16_ps(a, BF16_ONE, BF16_ONE)
CHAINS(bf16_dot, 50000000L, 64, DOT)
#endif

/* C[w][t] = sum_d K[w][d] QT[d][t]: 32 keys x 32 queries x 64 dims, R keys per tile. */
#define TILE(R)                                                                        \
  __attribute__((noinline)) static void tile_##R(const float* K, const float* QT,      \
                                                 float* C) {                           \
    for (int w0 = 0; w0 < 32; w0 += R) {                                               \
      __m512 acc[R][2];                                                                \
      _Pragma("GCC unroll 16")                                                         \
      for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();         \
      for (int d = 0; d < 64; d++) {                                                   \
        __m512 q0 = _mm512_loadu_ps(QT + d * 32), q1 = _mm512_loadu_ps(QT + d * 32 + 16); \
        _Pragma("GCC unroll 16")                                                       \
        for (int r = 0; r < R; r++) {                                                  \
          __m512 k = _mm512_set1_ps(K[(w0 + r) * 64 + d]);                             \
          acc[r][0] = _mm512_fmadd_ps(k, q0, acc[r][0]);                               \
          acc[r][1] = _mm512_fmadd_ps(k, q1, acc[r][1]);                               \
        }                                                                              \
      }                                                                                \
      _Pragma("GCC unroll 16")                                                         \
      for (int r = 0; r < R; r++) {                                                    \
        _mm512_storeu_ps(C + (w0 + r) * 32, acc[r][0]);                                \
        _mm512_storeu_ps(C + (w0 + r) * 32 + 16, acc[r][1]);                           \
      }                                                                                \
    }                                                                                  \
  }
TILE(4)
TILE(8)
TILE(16)

static float K[32 * 64], QT[64 * 32], C[32 * 32];

static void tile(const char* name, void (*f)(const float*, const float*, float*)) {
  long n = 150000;
  double t = now();
  for (long i = 0; i < n; i++) {
    f(K, QT, C);
    K[i & 2047] += C[i & 1023] * 1e-9f;  /* a dependency: the calls cannot be elided */
  }
  double el = now() - t;
  printf("%s %.1f %g\n", name, n * 2.0 * 32 * 32 * 64 / el / 1e9, C[5]);
}

int main(void) {
  for (int i = 0; i < 2048; i++) { K[i] = i * 1e-3f; QT[i] = 1.0f - i * 1e-4f; }
  fp32_fma();
#ifdef BF16
  bf16_dot();
#endif
  tile("tile_4_keys", tile_4);
  tile("tile_8_keys", tile_8);
  tile("tile_16_keys", tile_16);
  return 0;
}
"""

LABELS = {
    "fp32_fma": "float32 FMA, 12 chains (no loads)",
    "bf16_dot": "bf16 vdpbf16ps, 12 chains (no loads)",
    "tile_4_keys": "float32 block product from L1, 4 keys per tile (the op's default)",
    "tile_8_keys": "float32 block product from L1, 8 keys per tile",
    "tile_16_keys": "float32 block product from L1, 16 keys per tile",
}


def run_on_every_core(exe: Path, cores: int) -> list[dict[str, float]]:
    """The program's rates in ``cores`` processes started together, one per core."""
    procs = [subprocess.Popen(["taskset", "-c", str(c), str(exe)] if shutil.which("taskset")
                              else [str(exe)], stdout=subprocess.PIPE, text=True)
             for c in range(cores)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        results.append({line.split()[0]: float(line.split()[1]) for line in out.splitlines()})
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "fma_peak_cpu.md")
    args = p.parse_args()
    flags = host.cpu_flags()
    if "avx512f" not in flags:
        raise SystemExit("bench_fma_peak.py measures AVX-512 units; this CPU has none")
    bf16 = "avx512_bf16" in flags
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        exe = c_program.build(Path(tmp), "fma_peak", SOURCE,
                              ["-O3", "-mavx512f", *(["-DBF16"] if bf16 else [])],
                              "bench_fma_peak.py")
        alone = run_on_every_core(exe, 1)[0]
        per_core = run_on_every_core(exe, cores)
    from bench.bench_roofline_cpu import matmul_peak_gflops

    mm = matmul_peak_gflops()
    lines = [machine_line(), "",
             f"One process alone, then one per core ({cores}) started together; GFLOP/s.", "",
             "| kernel | one core alone | each core, all busy | all cores |",
             "|---|---|---|---|"]
    for key, label in LABELS.items():
        if key not in per_core[0]:
            continue
        each = [r[key] for r in per_core]
        lines.append(f"| {label} | {alone[key]:.0f} | {' / '.join(f'{x:.0f}' for x in each)} "
                     f"| {sum(each):.0f} |")
    fma = sum(r["fp32_fma"] for r in per_core)
    lines += [f"| torch.mm, best square 512-2048, all threads (the roofline's floor) | - | - | "
              f"{mm:.0f} |", "",
              f"torch.mm reaches {mm / fma:.0%} of the float32 FMA peak.", "",
              "Command: `python bench/bench_fma_peak.py`"]
    print("\n".join(lines))
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
