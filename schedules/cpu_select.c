/* The selection kernel's two scans that pick entries out of a row (mra_compile/
 * selection_tir.py, steps 2 and 3), called from its TIR through T.call_extern: the
 * candidates (the scores >= a bound, with their positions, in order) and the read-off of
 * T (the candidates > theta and the first ties at theta, in order). Both are a compare
 * per entry and a data-dependent store; in TIR they were a branch per vector (taken
 * where some lane passes: scattered over a row, so mispredicted about every other
 * vector) and a scalar loop per entry. Here, on AVX-512, a vector's passing lanes are
 * moved together (vcompressps) and written with a masked store, with no branch on the
 * data; elsewhere a portable loop.
 *
 * Compiled for the baseline of the architecture (no -m flags): the object is linked into
 * the kernels of any CPU; the AVX-512 paths are built with a function target attribute
 * and chosen at run time. -DMRA_SELECT_PORTABLE builds the portable paths only (tests
 * compare the two).
 */
#include <stdint.h>

#ifndef HIDDEN /* (tests build the file with -DHIDDEN= to call its functions) */
#define HIDDEN __attribute__((visibility("hidden")))
#endif

#if !defined(MRA_SELECT_PORTABLE) && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MRA_SELECT_AVX512 1
#define AVX512 __attribute__((target("avx512f")))

static int has_avx512(void) {
  static int state = -1; /* (threads that race here compute the same value) */
  int known = __atomic_load_n(&state, __ATOMIC_RELAXED);
  if (known < 0) {
    __builtin_cpu_init();
    known = __builtin_cpu_supports("avx512f") ? 1 : 0;
    __atomic_store_n(&state, known, __ATOMIC_RELAXED);
  }
  return known;
}

/* The lanes of a 16-bit mask up to its first ``n`` set ones (n >= 0). */
static inline uint32_t first_ones(uint32_t mask, int64_t n) {
  if (n <= 0) return 0;
  if (n >= __builtin_popcount(mask)) return mask;
  uint32_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    kept |= mask & (0u - mask);
    mask &= mask - 1;
  }
  return kept;
}

/* The candidates among rows x[i][0:cols] - sub[i], i < rows (sub NULL: x itself), at
 * positions i * cols + j. */
AVX512 static int32_t candidates_512(const float *x, const float *sub, int32_t rows,
                                     int32_t cols, float t, float *val, int32_t *idx,
                                     int32_t room) {
  const __m512 bound = _mm512_set1_ps(t);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int32_t found = 0;
  for (int32_t i = 0; i < rows; ++i) {
    const __m512 m = _mm512_set1_ps(sub ? sub[i] : 0.0f); /* (x - 0 is x, NaN and -0 too) */
    const float *row = x + (int64_t)i * cols;
    for (int32_t j = 0; j < cols; j += 16) {
      const __mmask16 in = (__mmask16)(cols - j >= 16 ? 0xFFFF : (1u << (cols - j)) - 1);
      const __m512 s = _mm512_sub_ps(_mm512_maskz_loadu_ps(in, row + j), m);
      uint32_t pass = _mm512_mask_cmp_ps_mask(in, s, bound, _CMP_GE_OQ); /* (NaN: never) */
      if (found + __builtin_popcount(pass) > room) pass = first_ones(pass, room - found);
      const int n = __builtin_popcount(pass);
      const __mmask16 out = (__mmask16)((1u << n) - 1);
      const __m512i at = _mm512_add_epi32(iota, _mm512_set1_epi32(i * cols + j));
      _mm512_mask_storeu_ps(val + found, out, _mm512_maskz_compress_ps((__mmask16)pass, s));
      _mm512_mask_storeu_epi32(idx + found, out,
                               _mm512_maskz_compress_epi32((__mmask16)pass, at));
      found += n;
    }
  }
  return found;
}

AVX512 static int32_t read_off_512(const float *val, const int32_t *idx, int32_t m,
                                   float theta, int32_t want, int64_t ties, int64_t *index,
                                   float *least) {
  const __m512 th = _mm512_set1_ps(theta);
  __m512 low = _mm512_set1_ps(*least);
  int32_t pos = 0;
  int32_t e = 0;
  for (; e + 16 <= m && pos < want; e += 16) {
    const __m512 x = _mm512_loadu_ps(val + e);
    uint32_t take = _mm512_cmp_ps_mask(x, th, _CMP_GT_OQ);
    const uint32_t tied = _mm512_cmp_ps_mask(x, th, _CMP_EQ_OQ);
    if (tied && ties > 0) { /* (rare: theta's own entries) the first ties, in order */
      const uint32_t kept = first_ones(tied, ties);
      ties -= __builtin_popcount(kept);
      take |= kept;
    }
    take = first_ones(take, want - pos);
    const int n = __builtin_popcount(take);
    low = _mm512_mask_min_ps(low, (__mmask16)take, low, x);
    const __m512i at = _mm512_maskz_compress_epi32((__mmask16)take,
                                                   _mm512_loadu_si512(idx + e));
    _mm512_mask_storeu_epi64(index + pos, (__mmask8)((1u << (n < 8 ? n : 8)) - 1),
                             _mm512_cvtepi32_epi64(_mm512_castsi512_si256(at)));
    if (n > 8)
      _mm512_mask_storeu_epi64(index + pos + 8, (__mmask8)((1u << (n - 8)) - 1),
                               _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(at, 1)));
    pos += n;
  }
  float l = _mm512_reduce_min_ps(low);
  for (; e < m && pos < want; ++e) {
    const float x = val[e];
    if (x > theta || (x == theta && ties > 0)) {
      if (x == theta) --ties;
      index[pos++] = idx[e];
      l = x < l ? x : l;
    }
  }
  *least = l;
  return pos;
}
#endif

/* The portable paths (and float64's, which only tests use): one entry at a time. */
#define CANDIDATES(T, x, sub, rows, cols, t, val, idx, room)                             \
  do {                                                                                    \
    int32_t found_ = 0;                                                                   \
    for (int32_t i_ = 0; i_ < (rows); ++i_)                                               \
      for (int32_t j_ = 0; j_ < (cols); ++j_) {                                           \
        const T s_ = (x)[(int64_t)i_ * (cols) + j_] - ((sub) ? (sub)[i_] : (T)0);         \
        if (s_ >= (t) && found_ < (room)) {                                               \
          (val)[found_] = s_;                                                             \
          (idx)[found_++] = i_ * (cols) + j_;                                             \
        }                                                                                 \
      }                                                                                   \
    return found_;                                                                        \
  } while (0)

#define READ_OFF(T, val, idx, m, theta, want, ties, index, least)                         \
  do {                                                                                    \
    int32_t pos_ = 0;                                                                     \
    int64_t ties_ = (ties);                                                               \
    T l_ = *(least);                                                                      \
    for (int32_t e_ = 0; e_ < (m) && pos_ < (want); ++e_) {                               \
      const T x_ = (val)[e_];                                                             \
      if (x_ > (theta) || (x_ == (theta) && ties_ > 0)) {                                 \
        if (x_ == (theta)) --ties_;                                                       \
        (index)[pos_++] = (idx)[e_];                                                      \
        l_ = x_ < l_ ? x_ : l_;                                                           \
      }                                                                                   \
    }                                                                                     \
    *(least) = l_;                                                                        \
    return pos_;                                                                          \
  } while (0)

/* Step 2's candidates: the scores s >= t (NaN: never), at most ``room`` of them (the
 * caller knows how many there are: room bounds the memory only), their values into val
 * and their positions into idx, in order; returns how many. The scores are s[0:tot]
 * (``mra_select_candidates_*``: S as the kernel wrote it), or S = L - R computed here
 * from the logits L [n][n] and their row maxima R [n] (``*_rows_*``), the same float
 * subtraction as the kernel's, so that the two agree to the bit. */
HIDDEN int32_t mra_select_candidates_f32(const float *s, int32_t tot, float t, float *val,
                                         int32_t *idx, int32_t room) {
#ifdef MRA_SELECT_AVX512
  if (has_avx512()) return candidates_512(s, 0, 1, tot, t, val, idx, room);
#endif
  CANDIDATES(float, s, (const float *)0, 1, tot, t, val, idx, room);
}

HIDDEN int32_t mra_select_candidates_rows_f32(const float *logits, const float *rowmax,
                                              int32_t n, float t, float *val, int32_t *idx,
                                              int32_t room) {
#ifdef MRA_SELECT_AVX512
  if (has_avx512()) return candidates_512(logits, rowmax, n, n, t, val, idx, room);
#endif
  CANDIDATES(float, logits, rowmax, n, n, t, val, idx, room);
}

HIDDEN int32_t mra_select_candidates_f64(const double *s, int32_t tot, double t,
                                         double *val, int32_t *idx, int32_t room) {
  CANDIDATES(double, s, (const double *)0, 1, tot, t, val, idx, room);
}

HIDDEN int32_t mra_select_candidates_rows_f64(const double *logits, const double *rowmax,
                                              int32_t n, double t, double *val, int32_t *idx,
                                              int32_t room) {
  CANDIDATES(double, logits, rowmax, n, n, t, val, idx, room);
}

/* Step 3's T from the m candidates (val, at positions idx, in order): those > theta and
 * the first ``ties`` of those == theta, in order, at most ``want``; their positions into
 * index (int64) and the smallest of them, and *least, into *least. Returns how many. */
HIDDEN int32_t mra_select_read_off_f32(const float *val, const int32_t *idx, int32_t m,
                                       float theta, int32_t want, int64_t ties,
                                       int64_t *index, float *least) {
#ifdef MRA_SELECT_AVX512
  if (has_avx512()) return read_off_512(val, idx, m, theta, want, ties, index, least);
#endif
  READ_OFF(float, val, idx, m, theta, want, ties, index, least);
}

HIDDEN int32_t mra_select_read_off_f64(const double *val, const int32_t *idx, int32_t m,
                                       double theta, int32_t want, int64_t ties,
                                       int64_t *index, double *least) {
  READ_OFF(double, val, idx, m, theta, want, ties, index, least);
}
