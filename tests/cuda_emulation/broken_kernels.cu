// Small CUDA kernels with one bug each, and correct twins: the CPU emulator's checks
// must report each bug, and nothing in the twins (tests/test_cuda_emulation.py). They
// compile with nvcc for sm_80 as they are (the test does so: its cubin is the module
// image the fake driver loads).
#include <cuda_fp16.h>
#include <mma.h>

// ---- races

// Reads a neighbour's shared memory with no __syncthreads() in between.
extern "C" __global__ void __launch_bounds__(64) race_shared(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  float* buf = (float*)smem;
  buf[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 64];
}

extern "C" __global__ void __launch_bounds__(64) race_shared_fixed(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  float* buf = (float*)smem;
  buf[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 64];
}

// Lane 0 sums what the other lanes of its warp wrote, without __syncwarp() (the pattern
// of bwd_prep's dsum).
extern "C" __global__ void __launch_bounds__(32) race_warp(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  float* buf = (float*)smem;
  buf[threadIdx.x] = 1.0f + threadIdx.x;
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < 32; ++i) sum += buf[i];
    out[0] = sum;
  }
}

extern "C" __global__ void __launch_bounds__(32) race_warp_fixed(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  float* buf = (float*)smem;
  buf[threadIdx.x] = 1.0f + threadIdx.x;
  __syncwarp();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < 32; ++i) sum += buf[i];
    out[0] = sum;
  }
}

// Every thread of every block stores to out[0] (the pattern of bwd_prep's da).
extern "C" __global__ void __launch_bounds__(32) race_global(float* out) {
  out[0] = (float)(blockIdx.x * 32 + threadIdx.x);
}

// ---- out of bounds

// One thread too many: out has n elements.
extern "C" __global__ void __launch_bounds__(64) oob_global(float* out, int n) {
  if ((int)threadIdx.x <= n) out[threadIdx.x] = 1.0f;
}

// Shared memory indexed past the dynamic allocation (64 floats).
extern "C" __global__ void __launch_bounds__(64) oob_shared(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  float* buf = (float*)smem;
  buf[threadIdx.x + 1] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// ---- uninitialised reads

// Threads 0-31 read the half of shared memory nobody wrote.
extern "C" __global__ void __launch_bounds__(64) uninit_shared(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  float* buf = (float*)smem;
  if (threadIdx.x < 32) buf[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x < 32 ? threadIdx.x + 32 : threadIdx.x - 32];
}

// A register only thread 0 sets, stored by every thread (bwd_prep's da store outside
// its guard); one thread per block, so that this is no race.
extern "C" __global__ void __launch_bounds__(32) uninit_register(float* out) {
  float acc[1];
  if (threadIdx.x == 0) acc[0] = 3.0f;
  out[blockIdx.x * 32 + threadIdx.x] = acc[0];
}

// Device memory the host never wrote.
extern "C" __global__ void __launch_bounds__(64) uninit_global(float* out, const float* in) {
  out[threadIdx.x] = in[threadIdx.x] + 1.0f;
}

// ---- alignment

// A 16-byte vector load from an address that is 4 modulo 16.
extern "C" __global__ void __launch_bounds__(32) misaligned_uint4(uint4* out,
                                                                   const unsigned char* in) {
  out[threadIdx.x] = *(const uint4*)(in + 4 + 16 * threadIdx.x);
}

// A wmma load from shared memory 16 bytes past a 256-bit boundary.
extern "C" __global__ void __launch_bounds__(32) misaligned_wmma(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  half* tile = (half*)smem;
  for (int i = threadIdx.x; i < 16 * 24; i += 32) tile[i] = __float2half(1.0f);
  __syncwarp();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::row_major> b;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
  nvcuda::wmma::fill_fragment(c, 0.0f);
  nvcuda::wmma::load_matrix_sync(a, tile + 8, 16);
  nvcuda::wmma::load_matrix_sync(b, tile, 16);
  nvcuda::wmma::mma_sync(c, a, b, c);
  nvcuda::wmma::store_matrix_sync(out, c, 16, nvcuda::wmma::mem_row_major);
}

// ---- barriers

// Two halves of the block wait at different __syncthreads().
extern "C" __global__ void __launch_bounds__(64) divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// ---- correct: a 16x16x16 product on tensor cores, C = A B (A, B half, row major)

extern "C" __global__ void __launch_bounds__(64) wmma_matmul(float* c_out, const half* a_in,
                                                             const half* b_in) {
  extern __shared__ __align__(64) unsigned char smem[];
  half* a_tile = (half*)smem;  // staged through shared memory, as the generated kernels do
  half* b_tile = a_tile + 256;
  for (int i = threadIdx.y * 32 + threadIdx.x; i < 256; i += 64) {
    a_tile[i] = a_in[i];
    b_tile[i] = b_in[i];
  }
  __syncthreads();
  if (threadIdx.y == 1) {  // the second warp computes, the first one only staged
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::row_major> b;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
    nvcuda::wmma::fill_fragment(c, 0.0f);
    nvcuda::wmma::load_matrix_sync(a, a_tile, 16);
    nvcuda::wmma::load_matrix_sync(b, b_tile, 16);
    nvcuda::wmma::mma_sync(c, a, b, c);
    nvcuda::wmma::store_matrix_sync(c_out, c, 16, nvcuda::wmma::mem_row_major);
  }
}

// ---- static shared arrays (TVM's "shared" scope), placed after the dynamic ones

// Reads a neighbour's element of a static array with no __syncthreads() in between.
extern "C" __global__ void __launch_bounds__(64) race_static_shared(float* out) {
  __shared__ alignas(64) float buf[64];
  buf[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 64];
}

// One element past a static array of 64 (the last of the block's shared memory).
extern "C" __global__ void __launch_bounds__(64) oob_static_shared(float* out) {
  __shared__ alignas(64) float buf[64];
  buf[threadIdx.x + 1] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// Dynamic and two static arrays together, correct: out[t] = 3 t + 1 of a neighbour.
extern "C" __global__ void __launch_bounds__(64) static_shared_fixed(float* out) {
  extern __shared__ __align__(64) unsigned char smem[];
  __shared__ alignas(64) float a[64];
  __shared__ alignas(16) int b[64];
  float* d = (float*)smem;
  d[threadIdx.x] = (float)threadIdx.x;
  a[threadIdx.x] = 2.0f * threadIdx.x;
  b[threadIdx.x] = 1;
  __syncthreads();
  int n = (threadIdx.x + 1) % 64;
  out[threadIdx.x] = d[n] + a[n] + (float)b[n];
}
