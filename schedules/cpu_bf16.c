/* bf16 block products on AVX-512-BF16 (vdpbf16ps: pairs of bf16 products summed into
 * fp32 lanes), or on AMX tiles where the CPU has them (the section "The same products on
 * AMX tiles" below), called from the CPU kernels through the tensor intrinsics of
 * schedules/cpu_bf16.py (TVM 0.27 cannot emit either itself).
 *
 * bf16 values are passed as their 16 bits. Blocks are 32 x 32; D is the padded head dim
 * (any multiple of 16). The P v products add to ``out`` (the kernel zeroes it); q k^T
 * writes its block.
 * Compiled with -O3: at -O2 gcc keeps the accumulator tiles in memory (3-4x slower).
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#ifndef HIDDEN /* (tests build the file with -DHIDDEN= to call its functions) */
#define HIDDEN __attribute__((visibility("hidden")))
#endif

/* Logits of one key block: out[w][t] = sum_d k[w][d] q[t][d], w, t < 32.
 * k: rows of D (row stride ldk); qp: the queries in pairs of dims, [D/2][32][2];
 * out: fp32 rows of stride ldo, written, not read (no zero fill before the call:
 * schedules/cpu.py, _slot_logits). Tiles of 8 keys x 32 queries (16 accumulators).
 * Each tile asks for the next tile's key rows into L1: in the kernels a key block is
 * one of a row's scattered blocks, in L2 at best (the caller asks for the block's first
 * tile), and a tile reads its 8 rows 4 bytes at a time as broadcasts (hires_rows in
 * bf16 0.95-0.96x the time with the requests at N = 4096 and 8192, Zen 5, in-process
 * A/B; the same requests for v in mra_bf16_pv's copy gained nothing). */
static void qk_avx512(const uint16_t *k, int32_t ldk, const uint16_t *qp, float *out,
                      int32_t ldo, int32_t D) {
  for (int w0 = 0; w0 < 32; w0 += 8) {
    if (w0 + 8 < 32)
      for (int i = 0; i < 8; ++i)
        for (int at = 0; at < 2 * D; at += 64) /* D bf16: 2D bytes a row */
          _mm_prefetch((const char *)(k + (w0 + 8 + i) * ldk) + at, _MM_HINT_T0);
    __m512 acc[8][2];
    for (int i = 0; i < 8; ++i) {
      acc[i][0] = _mm512_setzero_ps();
      acc[i][1] = _mm512_setzero_ps();
    }
    for (int p = 0; p < D / 2; ++p) {
      __m512bh q0 = (__m512bh)_mm512_loadu_si512(qp + p * 64);
      __m512bh q1 = (__m512bh)_mm512_loadu_si512(qp + p * 64 + 32);
      for (int i = 0; i < 8; ++i) {
        int32_t pair;
        __builtin_memcpy(&pair, k + (w0 + i) * ldk + 2 * p, sizeof pair);
        __m512bh kb = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], kb, q0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], kb, q1);
      }
    }
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_ps(out + (w0 + i) * ldo, acc[i][0]);
      _mm512_storeu_ps(out + (w0 + i) * ldo + 16, acc[i][1]);
    }
  }
}

/* out[t][16 j .. 16 j + 16) (+)= sum_k pp[k][t] . vp[k][16 j ..][2] for t < 32, j_lo <= j <
 * j_hi, k < pairs: one vector of dims at a time, in tiles of 8 queries (8 accumulators),
 * onto zeros where ``zero`` is set, else onto out. pp: pairs of keys' probabilities,
 * [pairs][32] 32-bit words; vp: the value rows in pairs of keys, [pairs][dims][2] bf16.
 * The last 1-3 vectors of a D that is not a multiple of 64, after the 64-dim tiles of
 * pv_dims and pv_slots_avx512. */
static void pv_vectors(const int32_t *pp, int pairs, const uint16_t *vp, int dims, int j_lo,
                       int j_hi, float *out, int32_t ldo, int zero) {
  for (int j0 = j_lo; j0 < j_hi; ++j0)
    for (int t0 = 0; t0 < 32; t0 += 8) {
      __m512 acc[8];
      for (int i = 0; i < 8; ++i)
        acc[i] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(out + (t0 + i) * ldo + j0 * 16);
      for (int k = 0; k < pairs; ++k) {
        __m512bh vb = (__m512bh)_mm512_load_si512(vp + (k * dims + j0 * 16) * 2);
        for (int i = 0; i < 8; ++i)
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pp[k * 32 + t0 + i]), vb);
      }
      for (int i = 0; i < 8; ++i) _mm512_storeu_ps(out + (t0 + i) * ldo + j0 * 16, acc[i]);
    }
}

/* The 32 rows of a value block in pairs of keys, dims in order: to[p][d][2] = (v[2p][d],
 * v[2p + 1][d]) for p < 16, d < dims (a multiple of 16); to's rows hold to_dims dims. */
static void pairs_in_order(const uint16_t *v, int32_t ldv, int dims, uint16_t *to, int to_dims) {
  /* element i of the result: a[i/2] for even i, b[i/2] for odd i (b's lanes start at 32) */
  const __m512i pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                         40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                         32, 0);
  for (int p = 0; p < 16; ++p)
    for (int d = 0; d < dims; d += 16) {
      __m512i a = _mm512_castsi256_si512(
          _mm256_loadu_si256((const __m256i *)(v + 2 * p * ldv + d)));
      __m512i b = _mm512_castsi256_si512(
          _mm256_loadu_si256((const __m256i *)(v + (2 * p + 1) * ldv + d)));
      _mm512_store_si512(to + (p * to_dims + d) * 2, _mm512_permutex2var_epi16(a, pairs, b));
    }
}

/* P v for the dims [0, Dc) of v and out (Dc <= 256, a multiple of 16), pp as below. */
static void pv_dims(const int32_t *pp, const uint16_t *v, int32_t ldv, float *out, int32_t ldo,
                    int32_t Dc) {
  uint16_t vp[16 * 256 * 2] __attribute__((aligned(64)));
  pairs_in_order(v, ldv, Dc, vp, Dc);
  const int nv = Dc / 16; /* output vectors per query row */
  int j0 = 0;
  for (; j0 + 4 <= nv; j0 += 4) /* tiles of 4 queries x 64 dims (16 accumulators) */
    for (int t0 = 0; t0 < 32; t0 += 4) {
      __m512 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_loadu_ps(out + (t0 + i) * ldo + (j0 + j) * 16);
      for (int p = 0; p < 16; ++p) {
        __m512bh vb[4];
        for (int j = 0; j < 4; ++j)
          vb[j] = (__m512bh)_mm512_load_si512(vp + (p * Dc + (j0 + j) * 16) * 2);
        for (int i = 0; i < 4; ++i) {
          __m512bh pb = (__m512bh)_mm512_set1_epi32(pp[p * 32 + t0 + i]);
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pb, vb[j]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + (t0 + i) * ldo + (j0 + j) * 16, acc[i][j]);
    }
  pv_vectors(pp, 16, vp, Dc, j0, nv, out, ldo, 0); /* the last 1-3 vectors, if any */
}

/* A key block's probabilities rounded to bf16 (nearest even) in pairs of keys:
 * pp[p][t] = (bf16(P[2p][t]), bf16(P[2p + 1][t])) as one 32-bit word, p < 16, t < 32;
 * P: key-major fp32 rows of stride ldp. pair_vector: the words pp[p][h .. h + 16). */
static inline __m512i interleaved(__m512i both) { /* halves a, b -> words (a_i, b_i) */
  const __m512i halves = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                          24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                          16, 0);
  return _mm512_permutexvar_epi16(halves, both);
}

static inline __m512i pair_vector(const float *P, int32_t ldp, int p, int h) {
  __m512 a = _mm512_loadu_ps(P + 2 * p * ldp + h), b = _mm512_loadu_ps(P + (2 * p + 1) * ldp + h);
  return interleaved((__m512i)_mm512_cvtne2ps_pbh(b, a)); /* (cvtne2ps: a in the low half) */
}

static void probability_pairs(const float *P, int32_t ldp, int32_t *pp) {
  for (int p = 0; p < 16; ++p)
    for (int h = 0; h < 32; h += 16) _mm512_store_si512(pp + p * 32 + h, pair_vector(P, ldp, p, h));
}

/* P V of one key block (the backward's; the forward's is mra_bf16_exp_pv_slots below):
 * out[t][d] += sum_w bf16(P[w][t]) v[w][d], t, w < 32, d < D.
 * P: the fp32 probabilities as the kernel computes them, key-major (rows of stride ldp),
 * rounded here to bf16 (nearest even); v: rows of D (stride ldv); out: fp32 rows of
 * stride ldo. Both operands are first put in the layout of vdpbf16ps, in pairs of keys:
 * pp[w/2][t] (one 32-bit pair per query, broadcast) and, 256 dims at a time,
 * vp[w/2][d][2] (vectors). */
static void pv_avx512(const float *P, int32_t ldp, const uint16_t *v, int32_t ldv, float *out,
                      int32_t ldo, int32_t D) {
  int32_t pp[16 * 32] __attribute__((aligned(64)));
  probability_pairs(P, ldp, pp);
  for (int d0 = 0; d0 < D; d0 += 256)
    pv_dims(pp, v + d0, ldv, out + d0, ldo, D - d0 < 256 ? D - d0 : 256);
}

/* A unit's exps, their sums and P V: mra_bf16_exp_pv_slots below. The products are the
 * same sums, in the same order, as mra_bf16_pv called slot after slot onto zeros (the
 * forward's P v used it so; the backward still does); but each tile's accumulators stay in
 * registers over up to PV_GROUP blocks, where one call a block loaded and stored them
 * every block, and the v rows of a group are paired in one pass: bf16 hires_rows
 * 0.97x the time at N = 8192, sparse (Zen 4, in-process A/B, the same bits; 6 blocks
 * a group no better than 4, whose paired rows, 16 KB at D = 64, stay in L1). */
#define PV_GROUP 4

/* A unit's exps (mra_bf16_exp_pv_slots' arguments, as vectors where they are per lane) */
typedef struct {
  const float *x; /* the logits [W][32], rows of stride ldx */
  int32_t ldx;
  const float *cap; /* the keys' caps [W] */
  __m512 c, m2[2], poly[3], shift, floor; /* see ex2 */
  __m512 *sum; /* the sums so far, [2] (16 queries each) */
  const int32_t *next_cols; /* the next unit's slots, or NULL: nothing to ask for (ask_row) */
  const uint16_t *next_k, *next_v, *next_q; /* next_q NULL: no queries to ask for */
  int32_t ldv, ldq, D, first; /* first: the unit's first filled slot */
} unit_exps;

/* Ask for row `row` of the next unit's key and value blocks of slot c into L2, and in the
 * unit's first filled slot for that row of its queries. pv_slots_avx512 spreads a slot's
 * rows over the query tiles of its products, a row every third step (bf16 hires_rows
 * 0.97x the time of the same requests two rows a pair of keys over the exps, N = 8192,
 * sparse; Zen 5, in-process A/B; head dims under 64, without those tiles: over the
 * exps), so that they do not hold the core's miss buffers in a burst. Always inlined: as
 * a call, gcc takes a function of prefetches alone for one without effects, and drops it. */
static inline __attribute__((always_inline)) void ask_row(const unit_exps *s, int32_t c,
                                                          int row) {
  if (!s->next_cols) return;
  const int32_t block = s->next_cols[c];
  for (int at = 0; block >= 0 && at < s->D; at += 32) { /* 32 bf16: a 64-byte line */
    const int64_t r = ((int64_t)block * 32 + row) * s->ldv + at;
    _mm_prefetch((const char *)(s->next_k + r), _MM_HINT_T1);
    _mm_prefetch((const char *)(s->next_v + r), _MM_HINT_T1);
  }
  for (int at = 0; s->next_q && c == s->first && at < s->D; at += 32)
    _mm_prefetch((const char *)(s->next_q + (int64_t)row * s->ldq + at), _MM_HINT_T1);
}

/* The next group of a unit's filled slots, from slot *c0 on (at most max; *c0 moves past
 * them): their value blocks and (where slots is not NULL) slots, and each one's
 * probabilities put by prepare into buf, stride words apart. Returns how many. */
static inline int next_group(const unit_exps *s, const uint16_t *v, int32_t ldv,
                             const int32_t *cols, int32_t C, int32_t *c0, int max,
                             const uint16_t **blocks, int32_t *slots,
                             void (*prepare)(const unit_exps *, int32_t, int32_t *),
                             int32_t *buf, int stride) {
  int g = 0;
  for (; *c0 < C && g < max; ++*c0) {
    if (cols[*c0] < 0) continue;
    blocks[g] = v + (int64_t)cols[*c0] * 32 * ldv;
    if (slots) slots[g] = *c0;
    prepare(s, *c0, buf + g * stride);
    ++g;
  }
  return g;
}

/* 2^y of operators.exp2_rounded for 16 queries of one key, y = min(max(x c - m2, floor),
 * cap): the operations of the kernels' own exp stage, in its order (the same bits). */
static inline __m512 ex2(const unit_exps *s, __m512 x, __m512 m2, __m512 cap) {
  __m512 y = _mm512_max_ps(_mm512_min_ps(_mm512_fmsub_ps(x, s->c, m2), cap), s->floor);
  __m512 t = _mm512_add_ps(y, s->shift);
  __m512 f = _mm512_sub_ps(y, _mm512_sub_ps(t, s->shift));
  __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(s->poly[2], f, s->poly[1]), f,
                                             s->poly[0]), f, _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)));
}

/* prepare: slot c's probabilities from its logits, in pairs of keys as probability_pairs
 * makes them (never stored in float32), each added to its query's sum in key order */
static void ex2_pairs(const unit_exps *s, int32_t c, int32_t *pp) {
  const float *x = s->x + (int64_t)c * 32 * s->ldx, *cap = s->cap + c * 32;
  __m512 sum[2] = {s->sum[0], s->sum[1]}; /* (in registers: pp's stores may alias s->sum) */
  for (int p = 0; p < 16; ++p) {
    if (s->D < 64) { /* (no 64-dim tiles in pv_slots_avx512 to ask from) */
      ask_row(s, c, 2 * p);
      ask_row(s, c, 2 * p + 1);
    }
    const __m512 cap_a = _mm512_set1_ps(cap[2 * p]), cap_b = _mm512_set1_ps(cap[2 * p + 1]);
    for (int h = 0; h < 2; ++h) {
      __m512 a = ex2(s, _mm512_loadu_ps(x + 2 * p * s->ldx + 16 * h), s->m2[h], cap_a);
      __m512 b = ex2(s, _mm512_loadu_ps(x + (2 * p + 1) * s->ldx + 16 * h), s->m2[h], cap_b);
      sum[h] = _mm512_add_ps(_mm512_add_ps(sum[h], a), b);
      _mm512_store_si512(pp + p * 32 + 16 * h, interleaved((__m512i)_mm512_cvtne2ps_pbh(b, a)));
    }
  }
  s->sum[0] = sum[0];
  s->sum[1] = sum[1];
}

static void pv_slots_avx512(const unit_exps *s, const uint16_t *v, int32_t ldv,
                            const int32_t *cols, int32_t C, float *out, int32_t ldo, int32_t D) {
  int32_t pp[PV_GROUP * 16 * 32] __attribute__((aligned(64)));
  uint16_t vp[PV_GROUP * 16 * 64 * 2] __attribute__((aligned(64)));
  int first = 1;
  for (int32_t c0 = 0; c0 < C;) {
    const uint16_t *blocks[PV_GROUP];
    int32_t slots[PV_GROUP];
    const int g = next_group(s, v, ldv, cols, C, &c0, PV_GROUP, blocks, slots, ex2_pairs, pp,
                             16 * 32);
    if (g == 0) break;
    for (int d0 = 0; d0 < D; d0 += 64) {
      const int Dc = D - d0 < 64 ? D - d0 : 64;
      if (Dc == 64) {
        /* Key pairs by in-lane word unpacks of 32 dims of two rows: the low unpack holds
           the pairs of dims {0-3, 8-11, 16-19, 24-27} of the 32, the high one the others,
           so the accumulators' lanes hold the dims in that order; they are put back in
           order once a tile is done (and taken out of it where a later group loads them).
           The in-order pairing took a lane-crossing two-source word permute per 16 dims.
           The first tile of queries pairs the rows as it reads them and keeps the pairs
           for the other tiles: the value rows' reads (from L2 or further) then overlap
           that tile's products, where a pass pairing them before the tiles waited for
           them alone (bf16 hires_rows 0.97-0.98x the time at N = 1024-8192, sparse and
           full; the same bits; Zen 5, in-process A/B). */
        /* accumulator lanes (low, high of 32 dims) -> dims in order, and back */
        const __m512i in_order0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
        const __m512i in_order1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
        const __m512i as_lo = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
        const __m512i as_hi = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
        for (int t0 = 0; t0 < 32; t0 += 4) { /* tiles of 4 queries x 64 dims (16 accumulators) */
          __m512 acc[4][4];
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; j += 2) {
              if (first) {
                acc[i][j] = acc[i][j + 1] = _mm512_setzero_ps();
              } else {
                const float *o = out + (t0 + i) * ldo + d0 + j * 16;
                __m512 o0 = _mm512_loadu_ps(o), o1 = _mm512_loadu_ps(o + 16);
                acc[i][j] = _mm512_permutex2var_ps(o0, as_lo, o1);
                acc[i][j + 1] = _mm512_permutex2var_ps(o0, as_hi, o1);
              }
            }
          if (t0 == 0)
            for (int k = 0; k < g * 16; ++k) {
              const uint16_t *row = blocks[k >> 4] + 2 * (k & 15) * ldv + d0;
              __m512i a0 = _mm512_loadu_si512(row), b0 = _mm512_loadu_si512(row + ldv);
              __m512i a1 = _mm512_loadu_si512(row + 32), b1 = _mm512_loadu_si512(row + ldv + 32);
              __m512i w[4] = {_mm512_unpacklo_epi16(a0, b0), _mm512_unpackhi_epi16(a0, b0),
                              _mm512_unpacklo_epi16(a1, b1), _mm512_unpackhi_epi16(a1, b1)};
              for (int j = 0; j < 4; ++j) _mm512_store_si512(vp + (k * 64 + j * 16) * 2, w[j]);
              for (int i = 0; i < 4; ++i) {
                __m512bh pb = (__m512bh)_mm512_set1_epi32(pp[k * 32 + i]);
                for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pb, (__m512bh)w[j]);
              }
            }
          else
            for (int k = 0; k < g * 16; ++k) {
              const int it = (t0 / 4 - 1) * g * 16 + k; /* a row of the next unit's every 3rd */
              if (d0 == 0 && it % 3 == 0 && it / 3 < g * 32)
                ask_row(s, slots[it / 96], it / 3 % 32);
              __m512bh vb[4];
              for (int j = 0; j < 4; ++j) vb[j] = (__m512bh)_mm512_load_si512(vp + (k * 64 + j * 16) * 2);
              for (int i = 0; i < 4; ++i) {
                __m512bh pb = (__m512bh)_mm512_set1_epi32(pp[k * 32 + t0 + i]);
                for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pb, vb[j]);
              }
            }
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; j += 2) {
              float *o = out + (t0 + i) * ldo + d0 + j * 16;
              _mm512_storeu_ps(o, _mm512_permutex2var_ps(acc[i][j], in_order0, acc[i][j + 1]));
              _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(acc[i][j], in_order1, acc[i][j + 1]));
            }
        }
      } else { /* the last 1-3 vectors of a D that is not a multiple of 64: pairs in order */
        for (int i = 0; i < g; ++i) pairs_in_order(blocks[i] + d0, ldv, Dc, vp + i * 16 * 64 * 2, 64);
        pv_vectors(pp, g * 16, vp, 64, 0, Dc / 16, out + d0, ldo, first);
      }
    }
    first = 0;
  }
  if (first) /* no filled slot */
    for (int t = 0; t < 32; ++t)
      for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + t * ldo + d, _mm512_setzero_ps());
}

/* The queries of a unit in the layout of mra_bf16_qk: qp[p][t][2] = q[t][2p, 2p + 1] for
 * t < 32, p < D/2 (q: rows of stride ldq, already scaled and rounded). Pairs of dims are
 * 32-bit words, so this is the transpose of a 32 x D/2 matrix of words: 16 x 16 tiles,
 * 8-word tails (D/2 = 8 mod 16) through masks. Each tile is transposed in registers in
 * four rounds, the first two within 128-bit lanes (unpacks of words, then of word
 * pairs), the last two moving whole 128-bit lanes: 74 ns a 32 x 64 block against 262 for
 * four rounds of two-source word permutes (the same bits; Zen 4, from L1), whose
 * lane-crossing shuffles are the slow kind on this hardware. */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) { /* rows 2i, 2i + 1: their words interleaved */
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) { /* then pairs of words of rows 4i .. 4i + 3 */
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) /* then 128-bit lanes: the even and the odd ones */
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

HIDDEN int32_t mra_bf16_pairs(const uint16_t *q, int32_t ldq, uint16_t *qp, int32_t D) {
  const int words = D / 2; /* a multiple of 8 */
  uint32_t *out = (uint32_t *)qp;
  for (int c0 = 0; c0 < words; c0 += 16) {
    const int width = words - c0 < 16 ? words - c0 : 16;
    const __mmask16 cols = (__mmask16)((1u << width) - 1);
    for (int t0 = 0; t0 < 32; t0 += 16) {
      __m512i x[16];
      for (int i = 0; i < 16; ++i)
        x[i] = _mm512_maskz_loadu_epi32(cols, (const uint32_t *)(q + (t0 + i) * ldq) + c0);
      transpose16(x);
      for (int j = 0; j < width; ++j) _mm512_storeu_si512(out + (c0 + j) * 32 + t0, x[j]);
    }
  }
  return 0;
}

/* ---- The same products on AMX tiles (Intel Sapphire Rapids and later) ----
 * tdpbf16ps multiplies a 16 x 32 bf16 tile (A, rows of 64 bytes) by a 32 x 16 one held
 * in pairs of its rows (B: [16][16][2], the layout of vdpbf16ps) into a 16 x 16 fp32 tile,
 * 16 times the work of a vdpbf16ps (whose zmm form runs at the rate of float32 FMAs on
 * these CPUs, so bf16 gained nothing over float32 there without the tiles). A 32 x 32
 * block is 2 x 2 fp32 tiles (0-3) from two A tiles (4, 5) and two B tiles (6, 7), 32
 * dims (q k^T) or 32 keys (P v) at a time; all eight tiles are 16 rows of 64 bytes.
 * Used where the CPU has AMX-BF16, Linux grants the process its tile state and
 * MRA_COMPILE_CPU_AMX is not 0 (decided once a process), for head dims that are a
 * multiple of 32; other calls take the AVX-512-BF16 paths above. Like vdpbf16ps, the
 * tiles treat subnormal inputs as zero and flush subnormal sums. */
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#include <cpuid.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX __attribute__((target("amx-tile,amx-bf16")))

/* 1: the calls use the tiles, 0: they do not, -1: not decided yet */
static int amx_state = -1;

static int amx_allowed(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
    return 0; /* no AMX-BF16 (bit 22) or AMX-TILE (bit 24) */
  /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: fails on kernels before 5.16 */
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

static int amx_on(void) {
  int on = __atomic_load_n(&amx_state, __ATOMIC_RELAXED);
  if (on < 0) { /* (threads racing here decide the same) */
    const char *env = getenv("MRA_COMPILE_CPU_AMX");
    on = !(env && strcmp(env, "0") == 0) && amx_allowed();
    __atomic_store_n(&amx_state, on, __ATOMIC_RELAXED);
  }
  return on;
}

/* Which path the calls take: 1 the tiles, 0 AVX-512-BF16. want 0 or 1 sets it (1 only
 * where amx_allowed), want < 0 only asks. For tests, which compare the two. */
HIDDEN int32_t mra_bf16_amx(int32_t want) {
  if (want >= 0) __atomic_store_n(&amx_state, want && amx_allowed(), __ATOMIC_RELAXED);
  return amx_on();
}

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

static const tile_config CONFIG __attribute__((aligned(64))) = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

/* The tiles as CONFIG says, each call: other code on this thread (oneDNN's AMX matmuls
 * in torch) configures them its own way. Reading the configuration back costs ~5 ns,
 * loading it ~50 (Xeon, 2026-12-06), so it is loaded only where it differs. */
AMX static inline void amx_configure(void) {
  tile_config now __attribute__((aligned(64)));
  _tile_storeconfig(&now);
  if (memcmp(&now, &CONFIG, sizeof now) != 0) _tile_loadconfig(&CONFIG);
}

/* mra_bf16_qk on the tiles: A = 16 key rows x 32 dims, straight from k; B = 32 dims x
 * 16 queries from qp (rows of 32 queries, 128 bytes). */
AMX static void qk_amx(const uint16_t *k, int32_t ldk, const uint16_t *qp, float *out,
                       int32_t ldo, int32_t D) {
  amx_configure();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int d = 0; d < D; d += 32) {
    _tile_loadd(4, k + d, 2 * ldk);
    _tile_loadd(5, k + 16 * ldk + d, 2 * ldk);
    _tile_loadd(6, qp + d * 32, 128); /* pairs d/2 .. d/2 + 16, queries 0-15 */
    _tile_loadd(7, qp + d * 32 + 32, 128); /* queries 16-31 */
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 4 * ldo);
  _tile_stored(1, out + 16, 4 * ldo);
  _tile_stored(2, out + 16 * ldo, 4 * ldo);
  _tile_stored(3, out + 16 * ldo + 16, 4 * ldo);
}

static inline __m512 widened(__m256i h) { /* 16 bf16 -> float32, exactly */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* A key block's probabilities as left operands of P v, in `parts` bf16 parts (1-3) whose
 * sum is P, each 32 x 16 words: pt[i][t][w] (rows of 32 keys, t, w < 32) = bf16 of what
 * the parts before it left of P[w][t]: the words of probability_pairs transposed, then
 * of the rests. Each rest is exact in float32 and each part takes 8 more of P's 24
 * significant bits, so three sum to P exactly, but where a part would be subnormal (P
 * under ~2^-110), which the tiles take as zero. */
static inline void probabilities_in_parts(const float *P, int32_t ldp, int32_t *pt, int parts) {
  for (int h = 0; h < 32; h += 16) {
    __m512i x[3][16];
    for (int p = 0; p < 16; ++p) {
      __m512 a = _mm512_loadu_ps(P + 2 * p * ldp + h);
      __m512 b = _mm512_loadu_ps(P + (2 * p + 1) * ldp + h);
      for (int i = 0; i < parts; ++i) {
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low half */
        x[i][p] = interleaved(both);
        a = _mm512_sub_ps(a, widened(_mm512_castsi512_si256(both)));
        b = _mm512_sub_ps(b, widened(_mm512_extracti64x4_epi64(both, 1)));
      }
    }
    for (int i = 0; i < parts; ++i) {
      transpose16(x[i]);
      for (int t = 0; t < 16; ++t) _mm512_store_si512(pt + i * 32 * 16 + (h + t) * 16, x[i][t]);
    }
  }
}

/* next_group's prepare for the tiles: ex2_pairs' probabilities by query, from a float32
 * copy (and its requests for the next unit's rows, as the exps go) */
static void ex2_by_query(const unit_exps *s, int32_t c, int32_t *pt) {
  float P[32 * 32] __attribute__((aligned(64)));
  const float *x = s->x + (int64_t)c * 32 * s->ldx;
  for (int w = 0; w < 32; ++w) {
    ask_row(s, c, w);
    const __m512 cap = _mm512_set1_ps(s->cap[c * 32 + w]);
    for (int h = 0; h < 2; ++h) {
      __m512 p = ex2(s, _mm512_loadu_ps(x + w * s->ldx + 16 * h), s->m2[h], cap);
      s->sum[h] = _mm512_add_ps(s->sum[h], p);
      _mm512_store_ps(P + w * 32 + 16 * h, p);
    }
  }
  probabilities_in_parts(P, 32, pt, 1);
}

/* The out tiles of 32 queries x 32 dims (d, with row stride ldo) to and from memory */
AMX static inline void out_tiles_load(const float *o, int32_t ldo) {
  _tile_loadd(0, o, 4 * ldo);
  _tile_loadd(1, o + 16, 4 * ldo);
  _tile_loadd(2, o + 16 * ldo, 4 * ldo);
  _tile_loadd(3, o + 16 * ldo + 16, 4 * ldo);
}

AMX static inline void out_tiles_store(float *o, int32_t ldo) {
  _tile_stored(0, o, 4 * ldo);
  _tile_stored(1, o + 16, 4 * ldo);
  _tile_stored(2, o + 16 * ldo, 4 * ldo);
  _tile_stored(3, o + 16 * ldo + 16, 4 * ldo);
}

/* The out tiles += one block's P v over 32 dims: pt one part of probabilities_in_parts, vp the
 * block's value rows over those dims in pairs of keys ([16][32][2], pairs_in_order). */
AMX static inline void pv_tiles(const int32_t *pt, const uint16_t *vp) {
  _tile_loadd(4, pt, 64);
  _tile_loadd(5, pt + 16 * 16, 64);
  _tile_loadd(6, vp, 128);
  _tile_loadd(7, vp + 32, 128);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

/* mra_bf16_pv on the tiles (parts 1: P rounded to bf16), and mra_bf16_pv_f32 (parts 3: P
 * in three bf16 parts that sum to it, probabilities_in_parts): out += each part's P v, so
 * with three as exact as the float32 FMAs' but for the order of the sums */
AMX static void pv_amx(const float *P, int32_t ldp, const uint16_t *v, int32_t ldv, float *out,
                       int32_t ldo, int32_t D, int parts) {
  int32_t pt[3 * 32 * 16] __attribute__((aligned(64)));
  uint16_t vp[16 * 32 * 2] __attribute__((aligned(64)));
  amx_configure();
  probabilities_in_parts(P, ldp, pt, parts);
  for (int d0 = 0; d0 < D; d0 += 32) {
    pairs_in_order(v + d0, ldv, 32, vp, 32);
    out_tiles_load(out + d0, ldo);
    for (int i = 0; i < parts; ++i) pv_tiles(pt + i * 32 * 16, vp);
    out_tiles_store(out + d0, ldo);
  }
}

/* pv_slots_avx512 on the tiles: the blocks of a group (up to AMX_GROUP) add into the
 * out tiles of 32 dims one after the other, in the order of mra_bf16_pv called slot
 * after slot (the same bits); the pairing of the next block's values goes to the other
 * half of vp, so that it can run beside the tiles' products. */
#define AMX_GROUP 8
AMX static void pv_slots_amx(const unit_exps *s, const uint16_t *v, int32_t ldv,
                             const int32_t *cols, int32_t C, float *out, int32_t ldo, int32_t D) {
  int32_t pt[AMX_GROUP * 32 * 16] __attribute__((aligned(64)));
  uint16_t vp[2 * 16 * 32 * 2] __attribute__((aligned(64)));
  amx_configure();
  int first = 1;
  for (int32_t c0 = 0; c0 < C;) {
    const uint16_t *blocks[AMX_GROUP];
    const int g = next_group(s, v, ldv, cols, C, &c0, AMX_GROUP, blocks, NULL, ex2_by_query, pt,
                             32 * 16); /* (its requests are ex2_by_query's: no slots to keep) */
    if (g == 0) break;
    for (int d0 = 0; d0 < D; d0 += 32) {
      if (first) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        out_tiles_load(out + d0, ldo);
      }
      for (int i = 0; i < g; ++i) {
        uint16_t *half = vp + (i & 1) * 16 * 32 * 2;
        pairs_in_order(blocks[i] + d0, ldv, 32, half, 32);
        pv_tiles(pt + i * 32 * 16, half);
      }
      out_tiles_store(out + d0, ldo);
    }
    first = 0;
  }
  if (first) /* no filled slot */
    for (int t = 0; t < 32; ++t)
      for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + t * ldo + d, _mm512_setzero_ps());
}

#define AMX_CALL(D, call, otherwise) \
  do {                               \
    if ((D) % 32 == 0 && amx_on())   \
      call;                          \
    else                             \
      otherwise;                     \
  } while (0)
#else /* a compiler without AMX intrinsics: the AVX-512-BF16 paths only */
HIDDEN int32_t mra_bf16_amx(int32_t want) {
  (void)want;
  return 0;
}
#define AMX_CALL(D, call, otherwise) otherwise
#endif

/* The block products the kernels call (the contracts above each AVX-512-BF16 path) */
HIDDEN int32_t mra_bf16_qk(const uint16_t *k, int32_t ldk, const uint16_t *qp, float *out,
                           int32_t ldo, int32_t D) {
  AMX_CALL(D, qk_amx(k, ldk, qp, out, ldo, D), qk_avx512(k, ldk, qp, out, ldo, D));
  return 0;
}

HIDDEN int32_t mra_bf16_pv(const float *P, int32_t ldp, const uint16_t *v, int32_t ldv,
                           float *out, int32_t ldo, int32_t D) {
  AMX_CALL(D, pv_amx(P, ldp, v, ldv, out, ldo, D, 1), pv_avx512(P, ldp, v, ldv, out, ldo, D));
  return 0;
}

/* A unit's exps, their sums and P v in one call (hires_rows' and hires_units' in bf16):
 * for the keys w of the filled slots (cols[w / 32] >= 0), P[w][t] = 2^y with
 * y = min(max(x[w][t] c - m[t] log2e, -limit), cap[w]) (x: the logits [W][32], rows of
 * stride ldx; c = scale log2e; m: the unit's maxima [32]; cap: the keys' caps [W]), by
 * operators.exp2_rounded's steps (poly: its polynomial's coefficients of f, f^2, f^3;
 * shift: its EXP_SHIFTER); sum[t] = the sum of P[w][t] over those keys in key order (0
 * without any); out[t] = sum_w bf16(P[w][t]) v_c[w mod 32], v_c = v + 32 cols[c] ldv,
 * written, not read. The kernel's own stages, bit for bit; but P is made as the products
 * pair it, never stored in float32 or read back, and the sums ride along, where the
 * kernel's loops wrote P, summed it in a pass of their own and the products read it
 * again (bf16 hires_rows 0.94-0.96x the time at N = 4096 and 8192, sparse and full;
 * Zen 5, in-process A/B).
 * With ask & 1 (the kernel has a next unit; next_cols: its slots), the next unit's key and
 * value rows (next_k, next_v: the kernel's k and v at its row, token 0; ldv the token
 * stride of both) are asked for into L2 as the products go (ask_row), and with ask & 2
 * its queries too (next_q: its first row; ldq their stride). */
HIDDEN int32_t mra_bf16_exp_pv_slots(const float *x, int32_t ldx, const float *m,
                                     const float *cap, float c, float log2e, float limit,
                                     float poly1, float poly2, float poly3, float shift,
                                     const uint16_t *v, int32_t ldv, const int32_t *cols,
                                     int32_t C, float *out, int32_t ldo, float *sum, int32_t D,
                                     int32_t ask, const int32_t *next_cols, const uint16_t *next_k,
                                     const uint16_t *next_v, const uint16_t *next_q,
                                     int32_t ldq) {
  __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512 l2e = _mm512_set1_ps(log2e);
  int32_t first = 0;
  while (first < C && cols[first] < 0) ++first;
  const unit_exps s = {
      .x = x, .ldx = ldx, .cap = cap, .c = _mm512_set1_ps(c),
      .m2 = {_mm512_mul_ps(_mm512_loadu_ps(m), l2e), _mm512_mul_ps(_mm512_loadu_ps(m + 16), l2e)},
      .poly = {_mm512_set1_ps(poly1), _mm512_set1_ps(poly2), _mm512_set1_ps(poly3)},
      .shift = _mm512_set1_ps(shift), .floor = _mm512_set1_ps(-limit), .sum = sums,
      .next_cols = ask & 1 ? next_cols : NULL, .next_k = next_k, .next_v = next_v,
      .next_q = ask & 2 ? next_q : NULL,
      .ldv = ldv, .ldq = ldq, .D = D, .first = first};
  AMX_CALL(D, pv_slots_amx(&s, v, ldv, cols, C, out, ldo, D),
           pv_slots_avx512(&s, v, ldv, cols, C, out, ldo, D));
  _mm512_storeu_ps(sum, sums[0]);
  _mm512_storeu_ps(sum + 16, sums[1]);
  return 0;
}

/* P V of one key block with P unrounded: out[t][d] += sum_w P[w][t] v[w][d] in float32
 * FMAs (the training forward's float32 output, which the backward reads: its P must be
 * the float32 one, as D_t = g . out cancels against g . v). P: key-major fp32 rows of stride ldp; v: bf16
 * rows of stride ldv, widened (exactly) into a float32 copy 256 dims at a time; out:
 * fp32 rows of stride ldo. Tiles of 4 queries x 64 dims (16 accumulators). On AMX tiles:
 * pv_amx (P in three bf16 parts; two, as CUDA's tensor cores take it, were 2^-16 of
 * P from it: 3e-6 where tests/test_cpu_bf16.py holds this path within 1e-6). */
static void pv_f32_avx512(const float *P, int32_t ldp, const uint16_t *v, int32_t ldv,
                          float *out, int32_t ldo, int32_t D) {
  float vf[32 * 256] __attribute__((aligned(64)));
  for (int d0 = 0; d0 < D; d0 += 256) {
    const int Dc = D - d0 < 256 ? D - d0 : 256;
    for (int w = 0; w < 32; ++w)
      for (int d = 0; d < Dc; d += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(v + w * ldv + d0 + d));
        _mm512_store_ps(vf + w * Dc + d,
                        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
    const int nv = Dc / 16;
    int j0 = 0;
    for (; j0 + 4 <= nv; j0 += 4)
      for (int t0 = 0; t0 < 32; t0 += 4) {
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            acc[i][j] = _mm512_loadu_ps(out + (t0 + i) * ldo + d0 + (j0 + j) * 16);
        for (int w = 0; w < 32; ++w) {
          __m512 vb[4];
          for (int j = 0; j < 4; ++j) vb[j] = _mm512_load_ps(vf + w * Dc + (j0 + j) * 16);
          for (int i = 0; i < 4; ++i) {
            __m512 p = _mm512_set1_ps(P[w * ldp + t0 + i]);
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(p, vb[j], acc[i][j]);
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            _mm512_storeu_ps(out + (t0 + i) * ldo + d0 + (j0 + j) * 16, acc[i][j]);
      }
    for (; j0 < nv; ++j0) /* the last 1-3 vectors of a Dc that is not a multiple of 64 */
      for (int t0 = 0; t0 < 32; t0 += 8) {
        __m512 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm512_loadu_ps(out + (t0 + i) * ldo + d0 + j0 * 16);
        for (int w = 0; w < 32; ++w) {
          __m512 vb = _mm512_load_ps(vf + w * Dc + j0 * 16);
          for (int i = 0; i < 8; ++i)
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(P[w * ldp + t0 + i]), vb, acc[i]);
        }
        for (int i = 0; i < 8; ++i) _mm512_storeu_ps(out + (t0 + i) * ldo + d0 + j0 * 16, acc[i]);
      }
  }
}

HIDDEN int32_t mra_bf16_pv_f32(const float *P, int32_t ldp, const uint16_t *v, int32_t ldv,
                               float *out, int32_t ldo, int32_t D) {
  AMX_CALL(D, pv_amx(P, ldp, v, ldv, out, ldo, D, 3), pv_f32_avx512(P, ldp, v, ldv, out, ldo, D));
  return 0;
}

/* The output of a block row: dst[t][d] = bf16(src[t][d]), t < rows, d < D (a multiple of
 * 16), rounded to the nearest even by vcvtneps2bf16. src: fp32 rows of stride lds (the
 * kernel's scratch, in L1); dst: bf16 rows of stride ldd, the op's output, written with
 * non-temporal stores where 32-byte aligned, as the kernel does not read it again (then
 * an sfence: such stores are weakly ordered, and other threads read the output after
 * the parallel loop). The stores are what gains (bf16 hires_rows 0.986x the time of
 * TVM's rounding at N = 8192, sparse; the same call with plain stores 1.02x: the
 * round trip through L1 costs more than the rounding saves; Zen 4, in-process A/B).
 * Where 64-byte aligned, a whole line a store (32 dims rounded by one vcvtne2ps2bf16):
 * half the store buffer's entries, so a block row's burst waits less for the memory
 * (bf16 hires_rows 0.989x the time, N = 8192, sparse; Zen 4, in-process A/B). */
HIDDEN int32_t mra_bf16_store_rows(const float *src, int32_t lds, uint16_t *dst, int32_t ldd,
                                   int32_t rows, int32_t D) {
  if ((((uintptr_t)dst | (uintptr_t)ldd * 2) & 63) == 0 && D % 32 == 0) {
    for (int t = 0; t < rows; ++t)
      for (int d = 0; d < D; d += 32) {
        const float *s = src + t * lds + d;
        __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s));
        _mm512_stream_si512((__m512i *)(dst + t * ldd + d), (__m512i)both);
      }
    _mm_sfence();
    return 0;
  }
  const int streamed = (((uintptr_t)dst | (uintptr_t)ldd * 2) & 31) == 0;
  for (int t = 0; t < rows; ++t)
    for (int d = 0; d < D; d += 16) {
      __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + t * lds + d));
      if (streamed)
        _mm256_stream_si256((__m256i *)(dst + t * ldd + d), h);
      else
        _mm256_storeu_si256((__m256i *)(dst + t * ldd + d), h);
    }
  if (streamed) _mm_sfence();
  return 0;
}
