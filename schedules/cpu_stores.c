/* The float32 output of hires_rows, stored by a call of the CPU kernels through the
 * tensor intrinsic of schedules/cpu_stores.py (TVM 0.27 emits no non-temporal store).
 *
 * Compiled for the baseline of the architecture (no -m flags): the object is linked into
 * kernels built for any x86-64 CPU, SSE2 included.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MRA_STREAMS 1
#endif

#ifndef HIDDEN /* (tests build the file with -DHIDDEN= to call its functions) */
#define HIDDEN __attribute__((visibility("hidden")))
#endif

#if defined(MRA_STREAMS) && (defined(__GNUC__) || defined(__clang__))
/* A whole 64-byte line a store where the CPU has AVX-512: a block row's 128 lines (D = 64)
 * take a quarter of the store buffer's entries that 16-byte streams take, so the stores
 * wait less for the memory (float32 hires_rows 0.976-0.986x the time at N = 8192, sparse,
 * 0.995x with the caches emptied before each call, 0.981x at 4096, full; Zen 4,
 * in-process A/B). Built with a function target attribute, chosen at run time: the
 * object stays baseline. */
#define MRA_WIDE_STREAMS 1
__attribute__((target("avx512f"))) static void rows_512(const float *src, int32_t lds,
                                                        float *dst, int32_t ldd, int32_t rows,
                                                        int32_t D) {
  for (int t = 0; t < rows; ++t)
    for (int d = 0; d < D; d += 16)
      _mm512_stream_ps(dst + t * ldd + d, _mm512_loadu_ps(src + t * lds + d));
}

static int wide_streams(void) {
  static int state = -1; /* (threads that race here compute the same value) */
  int known = __atomic_load_n(&state, __ATOMIC_RELAXED);
  if (known < 0) {
    __builtin_cpu_init();
    known = __builtin_cpu_supports("avx512f") ? 1 : 0;
    __atomic_store_n(&state, known, __ATOMIC_RELAXED);
  }
  return known;
}
#endif

/* The output of a block row: dst[t][d] = src[t][d], t < rows, d < D (a multiple of 16).
 * src: rows of stride lds (the kernel's scratch, in L1); dst: rows of stride ldd, the
 * op's output, which the kernel does not read again: written with non-temporal stores
 * where 64-byte aligned (a whole cache line at a time, no read of the line first), then
 * an sfence (such stores are weakly ordered, and other threads read the output after the
 * parallel loop). float32 hires_rows 0.967x the time of TVM's own stores at N = 8192,
 * sparse (Zen 4, in-process A/B). Elsewhere a plain copy. */
HIDDEN int32_t mra_store_rows_f32(const float *src, int32_t lds, float *dst, int32_t ldd,
                                  int32_t rows, int32_t D) {
#ifdef MRA_STREAMS
  if ((((uintptr_t)dst | (uintptr_t)ldd * 4) & 63) == 0) {
#ifdef MRA_WIDE_STREAMS
    if (wide_streams()) {
      rows_512(src, lds, dst, ldd, rows, D);
      _mm_sfence();
      return 0;
    }
#endif
    for (int t = 0; t < rows; ++t)
      for (int d = 0; d < D; d += 4)
        _mm_stream_ps(dst + t * ldd + d, _mm_loadu_ps(src + t * lds + d));
    _mm_sfence();
    return 0;
  }
#endif
  for (int t = 0; t < rows; ++t) memcpy(dst + t * ldd, src + t * lds, sizeof(float) * D);
  return 0;
}
