// CUDA device code on the CPU: what the generated kernels (mra_kernels.cu) use, for
// g++. Force-included before the kernel source (``-include cuda_emu.h``); the
// <cuda.h>, <cuda_fp16.h>, <cuda_bf16.h>, <mma.h> the source includes are the stubs
// next to this file.
//
// Every CUDA thread runs as a fiber of the emulator core (fake_libcuda.c): threadIdx,
// blockIdx, blockDim and gridDim are the current fiber's, __syncthreads() and
// __syncwarp() are real barriers, dynamic shared memory is the core's arena, and the
// warp-collective wmma operations run once per warp with the warp's lanes gathered.
// Memory accesses of the kernels are seen by the core through GCC's ThreadSanitizer
// instrumentation (-fsanitize=thread, whose __tsan_* callbacks the core implements)
// and misaligned ones through -fsanitize=alignment (__ubsan_handle_type_mismatch_v1).
#ifndef MRA_CUDA_EMU_H
#define MRA_CUDA_EMU_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __CUDACC__ 1
#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __device_builtin__

// --------------------------------------------------------------------- the core's API

extern "C" {
struct emu_uint3 { unsigned int x, y, z; };
struct emu_builtins_t { emu_uint3 thread_idx, block_idx, block_dim, grid_dim; };
extern emu_builtins_t emu_builtins;
// Dynamic shared memory of the running block (-D<name>=emu_dyn_smem for the source's
// ``extern __shared__ uchar <name>[]``).
extern unsigned char emu_dyn_smem[];
// Where its static shared arrays start in it (after the dynamic ones; the emulation's
// source declares them as pointers there: emulator.static_shared).
size_t emu_static_base(void);
void emu_syncthreads(int line);
void emu_syncwarp(unsigned int mask);

// A warp-collective operation: every lane passes its arguments; the lane that arrives
// last gets all lanes' arguments (and performs the operation), the others get NULL
// once it is done.
struct emu_coll {
  int kind;          // EMU_COLL_*
  const void* ptr;   // memory operand (load / store)
  unsigned int ldm;  // its leading dimension, in elements
  int layout;        // 0 row major, 1 column major
  int elem_size;     // bytes per element of the memory operand
  void* d;           // destination fragment
  const void* a;     // source fragments
  const void* b;
  const void* c;
  int frag_bytes;    // size of one fragment
};
struct emu_coll* const* emu_collective_begin(struct emu_coll* mine);
void emu_collective_end(void);
void emu_report_lane_divergence(const char* what);
}

enum { EMU_COLL_LOAD = 1, EMU_COLL_STORE = 2, EMU_COLL_MMA = 3 };

#define threadIdx (emu_builtins.thread_idx)
#define blockIdx (emu_builtins.block_idx)
#define blockDim (emu_builtins.block_dim)
#define gridDim (emu_builtins.grid_dim)
#define warpSize 32

#define __syncthreads() emu_syncthreads(__LINE__)
static inline void __syncwarp(unsigned int mask = 0xffffffffu) { emu_syncwarp(mask); }

// --------------------------------------------------------------------- vector types
// Alignments as CUDA 13's vector_types.h: a misaligned vector access is caught by
// -fsanitize=alignment exactly where the GPU would fault.

#define EMU_VEC2(T, name, al) struct __attribute__((aligned(al))) name { T x, y; };
#define EMU_VEC3(T, name) struct name { T x, y, z; };
#define EMU_VEC4(T, name, al) struct __attribute__((aligned(al))) name { T x, y, z, w; };
EMU_VEC2(float, float2, 8)
EMU_VEC4(float, float4, 16)
EMU_VEC2(int, int2, 8)
EMU_VEC4(int, int4, 16)
EMU_VEC2(unsigned int, uint2, 8)
EMU_VEC4(unsigned int, uint4, 16)
EMU_VEC2(short, short2, 4)
EMU_VEC4(short, short4, 8)
EMU_VEC2(unsigned short, ushort2, 4)
EMU_VEC4(unsigned short, ushort4, 8)
EMU_VEC2(char, char2, 2)
EMU_VEC4(char, char4, 4)
EMU_VEC2(unsigned char, uchar2, 2)
EMU_VEC4(unsigned char, uchar4, 4)
EMU_VEC2(long long, longlong2, 16)
EMU_VEC4(long long, longlong4, 16)
EMU_VEC2(unsigned long long, ulonglong2, 16)
EMU_VEC4(unsigned long long, ulonglong4, 16)
EMU_VEC2(double, double2, 16)
EMU_VEC4(double, double4, 16)
EMU_VEC3(float, float3)
EMU_VEC3(int, int3)
EMU_VEC3(unsigned int, uint3)
struct dim3 { unsigned int x, y, z; };

#define EMU_MAKE2(T, name) static inline name make_##name(T x, T y) { name v; v.x = x; v.y = y; return v; }
#define EMU_MAKE4(T, name) \
  static inline name make_##name(T x, T y, T z, T w) { name v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
EMU_MAKE2(float, float2)
EMU_MAKE4(float, float4)
EMU_MAKE2(int, int2)
EMU_MAKE4(int, int4)
EMU_MAKE2(unsigned int, uint2)
EMU_MAKE4(unsigned int, uint4)
EMU_MAKE2(double, double2)
EMU_MAKE4(unsigned long long, ulonglong4)
EMU_MAKE4(long long, longlong4)

// --------------------------------------------------------------------- math

static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
// CUDA's float max/min are fmaxf/fminf (a NaN operand yields the other one).
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
static inline unsigned int __float_as_uint(float f) { unsigned int x; memcpy(&x, &f, 4); return x; }
static inline float __uint_as_float(unsigned int x) { float f; memcpy(&f, &x, 4); return f; }

// --------------------------------------------------------------------- half, bfloat16
// IEEE binary16 and bfloat16 with round-to-nearest-even conversions from float.

static inline unsigned short emu_float_to_half_bits(float f) {
  unsigned int x;
  memcpy(&x, &f, 4);
  unsigned int sign = (x >> 16) & 0x8000u;
  unsigned int ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // inf, nan (quiet, payload kept where it fits)
    return (unsigned short)(sign | (ax > 0x7f800000u ? 0x7e00u | ((ax >> 13) & 0x3ffu) : 0x7c00u));
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
    if (ax < 0x33000000u) return (unsigned short)sign;  // < 2^-25
    unsigned int e = ax >> 23;
    unsigned int m = (ax & 0x7fffffu) | 0x800000u;
    unsigned int shift = 126u - e;
    unsigned int q = m >> shift, rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) q++;
    return (unsigned short)(sign | q);
  }
  unsigned int h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13));
  unsigned int rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return (unsigned short)(sign | h);
}

static inline float emu_half_bits_to_float(unsigned short h) {
  unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
  unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
  if (e == 0x1fu) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    x = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    x = sign;
  } else {  // subnormal: normalise
    e = 113u;
    while (!(m & 0x400u)) { m <<= 1; e--; }
    x = sign | (e << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static inline unsigned short emu_float_to_bf16_bits(float f) {
  unsigned int x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return (unsigned short)(x >> 16);
}

static inline float emu_bf16_bits_to_float(unsigned short b) {
  unsigned int x = (unsigned int)b << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

#define EMU_16BIT_FLOAT(NAME, TO_BITS, TO_FLOAT)                                   \
  struct NAME {                                                                    \
    unsigned short __x;                                                            \
    NAME() = default;                                                              \
    NAME(float f) : __x(TO_BITS(f)) {}                                             \
    NAME(double f) : __x(TO_BITS((float)f)) {}                                     \
    NAME(int i) : __x(TO_BITS((float)i)) {}                                        \
    NAME(unsigned int i) : __x(TO_BITS((float)i)) {}                               \
    NAME(long long i) : __x(TO_BITS((float)i)) {}                                  \
    NAME(unsigned long long i) : __x(TO_BITS((float)i)) {}                         \
    operator float() const { return TO_FLOAT(__x); }                               \
  };

EMU_16BIT_FLOAT(__half, emu_float_to_half_bits, emu_half_bits_to_float)
EMU_16BIT_FLOAT(__nv_bfloat16, emu_float_to_bf16_bits, emu_bf16_bits_to_float)
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

struct __attribute__((aligned(4))) __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half a, __half b) : x(a), y(b) {}
};
typedef __half2 half2;
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
typedef __nv_bfloat162 nv_bfloat162;

static inline float __half2float(__half h) { return (float)h; }
static inline __half __float2half(float f) { return __half(f); }
static inline __half __float2half_rn(float f) { return __half(f); }
static inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
static inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline bool __hgt(__half a, __half b) { return (float)a > (float)b; }
static inline bool __hlt(__half a, __half b) { return (float)a < (float)b; }
static inline bool __hgt(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)a > (float)b; }
static inline bool __hlt(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)a < (float)b; }
static inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
static inline __half2 make_half2(__half a, __half b) { return __half2(a, b); }

// --------------------------------------------------------------------- wmma

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct emu_tile;
template <int M, int N, int K> struct emu_tile<matrix_a, M, N, K> { enum { rows = M, cols = K }; };
template <int M, int N, int K> struct emu_tile<matrix_b, M, N, K> { enum { rows = K, cols = N }; };
template <int M, int N, int K> struct emu_tile<accumulator, M, N, K> { enum { rows = M, cols = N }; };

template <typename L> struct emu_layout { enum { col = 0 }; };
template <> struct emu_layout<col_major> { enum { col = 1 }; };

// A fragment holds its whole tile (row major) in every lane: the lanes of a warp hold
// the same values, as the collective operations below keep them.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  enum { rows = emu_tile<Use, M, N, K>::rows, cols = emu_tile<Use, M, N, K>::cols };
  enum { num_elements = rows * cols };
  T x[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  // Not a collective in CUDA: each lane fills its own elements.
  for (int i = 0; i < f.rows * f.cols; ++i) f.x[i] = T(v);
}

// The lanes' fragments and the core's bookkeeping are no device memory: not instrumented.
#define EMU_NOT_DEVICE_MEMORY __attribute__((no_sanitize_thread, noinline))

template <typename F>
EMU_NOT_DEVICE_MEMORY void emu_copy_to_lanes(struct emu_coll* const* lanes, const F& value) {
  for (int l = 0; l < 32; ++l) {
    if (lanes[l]->d != (const void*)&value) memcpy(lanes[l]->d, &value, sizeof(F));
  }
}

template <typename F>
EMU_NOT_DEVICE_MEMORY void emu_check_same(struct emu_coll* const* lanes, const void* (emu_coll::*which), const char* what) {
  for (int l = 1; l < 32; ++l) {
    if (memcmp(lanes[l]->*which, lanes[0]->*which, sizeof(F)) != 0) {
      emu_report_lane_divergence(what);
      return;
    }
  }
}

// A warp-wide load of fragment f (element type T) from p, column-major if col.
template <typename T, typename F, typename P>
inline void emu_load_fragment(F& f, const P* p, unsigned ldm, bool col) {
  struct emu_coll me = {EMU_COLL_LOAD, p, ldm, col, (int)sizeof(P), &f,
                        nullptr, nullptr, nullptr, (int)sizeof(F)};
  struct emu_coll* const* lanes = emu_collective_begin(&me);
  if (!lanes) return;
  F tile;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      tile.x[r * F::cols + c] = T(col ? p[c * ldm + r] : p[r * ldm + c]);
  emu_copy_to_lanes(lanes, tile);
  emu_collective_end();
}

// load_matrix_sync of matrix_a / matrix_b (layout from the fragment type).
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  emu_load_fragment<T>(f, p, ldm, emu_layout<Layout>::col);
}

// load_matrix_sync of an accumulator (layout as an argument).
template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm,
                             layout_t layout) {
  emu_load_fragment<T>(f, p, ldm, layout == mem_col_major);
}

template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm,
                              layout_t layout) {
  typedef fragment<accumulator, M, N, K, T, void> F;
  struct emu_coll me = {EMU_COLL_STORE, p, ldm, layout == mem_col_major, (int)sizeof(P), nullptr,
                        &f, nullptr, nullptr, (int)sizeof(F)};
  struct emu_coll* const* lanes = emu_collective_begin(&me);
  if (!lanes) return;
  emu_check_same<F>(lanes, &emu_coll::a, "store_matrix_sync: the lanes' accumulator fragments differ");
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      P v = P(f.x[r * F::cols + c]);
      if (layout == mem_col_major) p[c * ldm + r] = v; else p[r * ldm + c] = v;
    }
  emu_collective_end();
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC,
          typename TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD, void>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, TC, void>& c) {
  typedef fragment<accumulator, M, N, K, TD, void> FD;
  typedef fragment<matrix_a, M, N, K, TA, LA> FA;
  typedef fragment<matrix_b, M, N, K, TB, LB> FB;
  typedef fragment<accumulator, M, N, K, TC, void> FC;
  struct emu_coll me = {EMU_COLL_MMA, nullptr, 0, 0, 0, &d, &a, &b, &c, (int)sizeof(FD)};
  struct emu_coll* const* lanes = emu_collective_begin(&me);
  if (!lanes) return;
  emu_check_same<FA>(lanes, &emu_coll::a, "mma_sync: the lanes' matrix_a fragments differ");
  emu_check_same<FB>(lanes, &emu_coll::b, "mma_sync: the lanes' matrix_b fragments differ");
  emu_check_same<FC>(lanes, &emu_coll::c, "mma_sync: the lanes' accumulator fragments differ");
  FD out;
  // fp16/bf16 products are exact in float; accumulated in float, k in order.
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = (float)c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += (float)a.x[i * K + k] * (float)b.x[k * N + j];
      out.x[i * N + j] = TD(acc);
    }
  emu_copy_to_lanes(lanes, out);
  emu_collective_end();
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // MRA_CUDA_EMU_H
