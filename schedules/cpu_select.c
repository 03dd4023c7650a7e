/* The selection kernel's two scans that pick entries out of a row (mra_compile/
 * selection_tir.py, steps 2 and 3), called from its TIR through T.call_extern: the
 * candidates (the scores >= a bound, with their positions, in order) and the read-off of
 * T (the candidates > theta and the first ties at theta, in order). Both are a compare
 * per entry and a data-dependent store, which TIR wrote as a branch per vector, a dozen
 * instructions of lane reduction and a scalar loop per entry (with the row's scores
 * written out first). Here a vector's passing lanes are moved to its front and stored
 * with no branch on the data: by vcompressps and masked stores on AVX-512, by a
 * permutation from a table on AVX2 (the candidates); elsewhere portable loops.
 *
 * Compiled for the baseline of the architecture (no -m flags): the object is linked into
 * the kernels of any CPU; the vector paths are built with function target attributes
 * and chosen at run time. Tests build it with -DMRA_SELECT_NO_AVX512 (the AVX2 path on
 * an AVX-512 CPU) and -DMRA_SELECT_PORTABLE (the portable paths only) to compare them.
 */
#include <stdint.h>

#ifndef HIDDEN /* (tests build the file with -DHIDDEN= to call its functions) */
#define HIDDEN __attribute__((visibility("hidden")))
#endif

/* The lanes of a mask up to its first ``n`` set ones (n >= 0). */
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

#if !defined(MRA_SELECT_PORTABLE) && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <pthread.h>
#define MRA_SELECT_SIMD 1
#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2")))

/* AVX2 has no compress: the passing lanes are moved to the front by a permutation from
 * this table, indexed by the 8-bit mask of passing lanes (their lane numbers in order,
 * a byte each), and the whole vector is stored where the room allows (the lanes past
 * the passing ones are written over next, or lie past the count). */
static uint64_t packed_lanes[256];

static void fill_packed_lanes(void) {
  for (uint32_t mask = 0; mask < 256; ++mask) {
    uint64_t lanes = 0;
    int n = 0;
    for (int l = 0; l < 8; ++l)
      if (mask >> l & 1) lanes |= (uint64_t)l << (8 * n++);
    packed_lanes[mask] = lanes;
  }
}

/* 2: AVX-512, 1: AVX2 (``packed_lanes`` filled), 0: neither; decided once a process.
 * -DMRA_SELECT_NO_AVX512 leaves AVX-512 out (tests run the AVX2 path on CPUs with it). */
static int simd_level(void) {
  static int state = -1; /* (threads that race here compute the same value) */
  static pthread_once_t table = PTHREAD_ONCE_INIT;
  int known = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
  if (known < 0) {
    __builtin_cpu_init();
#ifndef MRA_SELECT_NO_AVX512
    known = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    known = __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
    if (known == 1) pthread_once(&table, fill_packed_lanes);
    __atomic_store_n(&state, known, __ATOMIC_RELEASE);
  }
  return known;
}

/* The candidates among rows x[i][0:cols] - sub[i], i < rows (sub NULL: x itself), at
 * positions i * cols + j, with no branch on the data: each vector's passing lanes moved
 * to its front (vcompressps) and stored (a masked store). The candidates are ~3% of a
 * row at N = 8192, scattered, so a branch on "any lane passes" is mispredicted about
 * every other vector: the passing lanes of those vectors taken one by one instead took
 * 18-22 against 11-13 us a row of 65536 scores, 1801 passing, on a Zen 5 (rows that
 * differ from call to call; 4.4 against 11 us where one row repeats, which the branch
 * predictor learns). */
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

AVX2 static int32_t candidates_256(const float *x, const float *sub, int32_t rows,
                                   int32_t cols, float t, float *val, int32_t *idx,
                                   int32_t room) {
  const __m256 bound = _mm256_set1_ps(t);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int32_t found = 0;
  for (int32_t i = 0; i < rows; ++i) {
    const float m = sub ? sub[i] : 0.0f;
    const __m256 mv = _mm256_set1_ps(m);
    const float *row = x + (int64_t)i * cols;
    int32_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      const __m256 s = _mm256_sub_ps(_mm256_loadu_ps(row + j), mv);
      const uint32_t pass = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s, bound, _CMP_GE_OQ));
      if (found + 8 <= room) {
        const __m256i order =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)&packed_lanes[pass]));
        const __m256i at = _mm256_add_epi32(iota, _mm256_set1_epi32(i * cols + j));
        _mm256_storeu_ps(val + found, _mm256_permutevar8x32_ps(s, order));
        _mm256_storeu_si256((__m256i *)(idx + found), _mm256_permutevar8x32_epi32(at, order));
        found += __builtin_popcount(pass);
      } else { /* (near the room's end: lane by lane) */
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        for (uint32_t left = first_ones(pass, room - found); left; left &= left - 1) {
          val[found] = lanes[__builtin_ctz(left)];
          idx[found++] = i * cols + j + __builtin_ctz(left);
        }
      }
    }
    for (; j < cols; ++j) {
      const float s = row[j] - m;
      if (s >= t && found < room) {
        val[found] = s;
        idx[found++] = i * cols + j;
      }
    }
  }
  return found;
}

AVX512 static int32_t read_off_512(const float *val, const int32_t *idx, int32_t m,
                                   float theta, int32_t want, int64_t ties, int64_t *index,
                                   float *least) {
  const __m512 th = _mm512_set1_ps(theta);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
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
    const __m512i where = idx ? _mm512_loadu_si512(idx + e)
                              : _mm512_add_epi32(iota, _mm512_set1_epi32(e));
    const __m512i at = _mm512_maskz_compress_epi32((__mmask16)take, where);
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
      index[pos++] = idx ? idx[e] : e;
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
        (index)[pos_++] = (idx) ? (idx)[e_] : e_;                                         \
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
 * from the logits L [n][nk] and their row maxima R [n] (``*_rows_*``), the same float
 * subtraction as the kernel's, so that the two agree to the bit. */
HIDDEN int32_t mra_select_candidates_f32(const float *s, int32_t tot, float t, float *val,
                                         int32_t *idx, int32_t room) {
#ifdef MRA_SELECT_SIMD
  const int level = simd_level();
  if (level == 2) return candidates_512(s, 0, 1, tot, t, val, idx, room);
  if (level == 1) return candidates_256(s, 0, 1, tot, t, val, idx, room);
#endif
  CANDIDATES(float, s, (const float *)0, 1, tot, t, val, idx, room);
}

HIDDEN int32_t mra_select_candidates_rows_f32(const float *logits, const float *rowmax,
                                              int32_t n, int32_t nk, float t, float *val,
                                              int32_t *idx, int32_t room) {
#ifdef MRA_SELECT_SIMD
  const int level = simd_level();
  if (level == 2) return candidates_512(logits, rowmax, n, nk, t, val, idx, room);
  if (level == 1) return candidates_256(logits, rowmax, n, nk, t, val, idx, room);
#endif
  CANDIDATES(float, logits, rowmax, n, nk, t, val, idx, room);
}

HIDDEN int32_t mra_select_candidates_f64(const double *s, int32_t tot, double t,
                                         double *val, int32_t *idx, int32_t room) {
  CANDIDATES(double, s, (const double *)0, 1, tot, t, val, idx, room);
}

HIDDEN int32_t mra_select_candidates_rows_f64(const double *logits, const double *rowmax,
                                              int32_t n, int32_t nk, double t, double *val,
                                              int32_t *idx, int32_t room) {
  CANDIDATES(double, logits, rowmax, n, nk, t, val, idx, room);
}

/* Step 3's T from the m candidates (val, at positions idx, in order): those > theta and
 * the first ``ties`` of those == theta, in order, at most ``want``; their positions into
 * index (int64) and the smallest of them, and *least, into *least. Returns how many.
 * idx NULL: val is a row's scores themselves, each at its own position (the rows with
 * more ties at theta than the candidates' room, ``*_scores_*`` below). */
HIDDEN int32_t mra_select_read_off_f32(const float *val, const int32_t *idx, int32_t m,
                                       float theta, int32_t want, int64_t ties,
                                       int64_t *index, float *least) {
#ifdef MRA_SELECT_SIMD
  if (simd_level() == 2) return read_off_512(val, idx, m, theta, want, ties, index, least);
#endif
  READ_OFF(float, val, idx, m, theta, want, ties, index, least);
}

HIDDEN int32_t mra_select_read_off_f64(const double *val, const int32_t *idx, int32_t m,
                                       double theta, int32_t want, int64_t ties,
                                       int64_t *index, double *least) {
  READ_OFF(double, val, idx, m, theta, want, ties, index, least);
}

HIDDEN int32_t mra_select_read_off_scores_f32(const float *s, int32_t tot, float theta,
                                              int32_t want, int64_t ties, int64_t *index,
                                              float *least) {
  return mra_select_read_off_f32(s, 0, tot, theta, want, ties, index, least);
}

HIDDEN int32_t mra_select_read_off_scores_f64(const double *s, int32_t tot, double theta,
                                              int32_t want, int64_t ties, int64_t *index,
                                              double *least) {
  return mra_select_read_off_f64(s, 0, tot, theta, want, ties, index, least);
}
