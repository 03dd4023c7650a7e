/* A stand-in for the CUDA 13 runtime (libcudart.so.13) for the CPU emulator: the entry
 * points TVM's CUDA runtime imports (``nm -D --undefined-only libtvm_runtime_cuda.so``),
 * exported with the ``libcudart.so.13`` symbol version they are bound to (version
 * script ``cudart.map``). Device memory is host memory from the emulator core
 * (fake_libcuda.c: ``emu_alloc``, with redzones and shadow state), streams and events
 * are synchronous, graphs are not supported. Load fake_libcuda first (RTLD_GLOBAL):
 * the emu_* functions are resolved from it.
 */
#define _GNU_SOURCE
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

void* emu_alloc(size_t size, size_t offset, int kind, const char* name);
int emu_free(void* p);
int emu_mark_init(void* p, size_t n, const unsigned char* mask);

enum { K_WORKSPACE = 1 };

EXPORT cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return cudaErrorInvalidValue;
  *count = 1;
  return cudaSuccess;
}
EXPORT cudaError_t cudaGetDevice(int* device) {
  if (!device) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}
EXPORT cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

/* An A100 (sm_80) as far as TVM asks. */
EXPORT cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (!value || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 49152; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 166912; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = 108; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 8; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrL2CacheSize: *value = 41943040; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrClockRate: *value = 1410000; break;
    case cudaDevAttrMemoryClockRate: *value = 1215000; break;
    case cudaDevAttrGlobalMemoryBusWidth: *value = 5120; break;
    default: *value = 0; break;
  }
  return cudaSuccess;
}

EXPORT cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
  if (!prop || device != 0) return cudaErrorInvalidValue;
  memset(prop, 0, sizeof *prop);
  snprintf(prop->name, sizeof prop->name, "CPU emulation of an NVIDIA sm_80 GPU");
  prop->major = 8;
  prop->minor = 0;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->sharedMemPerBlock = 49152;
  prop->sharedMemPerBlockOptin = 166912;
  prop->multiProcessorCount = 108;
  prop->totalGlobalMem = 80ull << 30;
  return cudaSuccess;
}

EXPORT cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
  if (free_bytes) *free_bytes = 64ull << 30;
  if (total) *total = 80ull << 30;
  return cudaSuccess;
}

EXPORT cudaError_t cudaMalloc(void** p, size_t size) {
  if (!p) return cudaErrorInvalidValue;
  *p = emu_alloc(size, 0, K_WORKSPACE, NULL);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
EXPORT cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  return emu_free(p) == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
EXPORT cudaError_t cudaMallocHost(void** p, size_t size) {
  if (!p) return cudaErrorInvalidValue;
  *p = malloc(size ? size : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
EXPORT cudaError_t cudaFreeHost(void* p) {
  free(p);
  return cudaSuccess;
}

static void copy(void* dst, const void* src, size_t count) {
  memmove(dst, src, count);
  emu_mark_init(dst, count, NULL); /* (a no-op for host memory) */
}
EXPORT cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind,
                                   cudaStream_t stream) {
  (void)kind, (void)stream;
  copy(dst, src, count);
  return cudaSuccess;
}
EXPORT cudaError_t cudaMemcpyPeerAsync(void* dst, int dst_device, const void* src, int src_device,
                                       size_t count, cudaStream_t stream) {
  (void)dst_device, (void)src_device, (void)stream;
  copy(dst, src, count);
  return cudaSuccess;
}

struct emu_event { struct timespec t; };
EXPORT cudaError_t cudaEventCreate(cudaEvent_t* event) {
  if (!event) return cudaErrorInvalidValue;
  *event = (cudaEvent_t)calloc(1, sizeof(struct emu_event));
  return cudaSuccess;
}
EXPORT cudaError_t cudaEventDestroy(cudaEvent_t event) {
  free(event);
  return cudaSuccess;
}
EXPORT cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  (void)stream;
  if (!event) return cudaErrorInvalidResourceHandle;
  clock_gettime(CLOCK_MONOTONIC, &((struct emu_event*)event)->t);
  return cudaSuccess;
}
EXPORT cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  (void)event;
  return cudaSuccess;
}
EXPORT cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms || !start || !end) return cudaErrorInvalidValue;
  struct timespec a = ((struct emu_event*)start)->t, b = ((struct emu_event*)end)->t;
  *ms = (float)((b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6);
  return cudaSuccess;
}

EXPORT cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  if (!stream) return cudaErrorInvalidValue;
  *stream = (cudaStream_t)calloc(1, 64);
  return cudaSuccess;
}
EXPORT cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  (void)flags;
  return cudaStreamCreate(stream);
}
EXPORT cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  free(stream);
  return cudaSuccess;
}
EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  (void)stream;
  return cudaSuccess;
}
EXPORT cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  (void)stream, (void)event, (void)flags;
  return cudaSuccess;
}
EXPORT cudaError_t cudaStreamBeginCapture(cudaStream_t stream, enum cudaStreamCaptureMode mode) {
  (void)stream, (void)mode;
  return cudaErrorNotSupported;
}
EXPORT cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  (void)stream, (void)graph;
  return cudaErrorNotSupported;
}
EXPORT cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph,
                                        unsigned long long flags) {
  (void)exec, (void)graph, (void)flags;
  return cudaErrorNotSupported;
}
EXPORT cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  (void)exec, (void)stream;
  return cudaErrorNotSupported;
}
EXPORT cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  (void)exec;
  return cudaSuccess;
}
EXPORT cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  (void)graph;
  return cudaSuccess;
}

EXPORT cudaError_t cudaGetLastError(void) { return cudaSuccess; }
EXPORT cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
EXPORT const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}
EXPORT const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }
