/* A stand-in for the NVIDIA driver (libcuda.so.1) that runs CUDA kernels on the CPU,
 * for tests: TVM's CUDA runtime (libtvm_runtime_cuda.so) loads a module and launches
 * its kernels through the entry points below exactly as on a GPU; the kernels run
 * from an emulation library (the module's CUDA source compiled by g++ against
 * kernel_include/cuda_emu.h), one fiber per CUDA thread, so that __syncthreads() is a
 * real barrier and the order in which threads run between barriers is chosen here.
 *
 * Checks (each a report: ``emu_report_json``):
 *   race        two accesses to one byte of shared or global memory, at least one a
 *               write, from different threads with no barrier between them (threads of
 *               one block: __syncthreads, or __syncwarp / a wmma collective within a
 *               warp; threads of different blocks: never ordered within a launch);
 *   uninit      a read of shared memory not written earlier in the block, of a
 *               workspace (cudaMalloc) not written since the op started, or of a
 *               device buffer byte the host marked uninitialised (emu_mark_init);
 *   oob         an access outside the block's shared memory (dynamic, then static) or outside its
 *               allocation (redzones around every one, checked after each launch too);
 *   wild        an access to memory that is neither (the launch is stopped);
 *   misaligned  a misaligned access (-fsanitize=alignment) or wmma pointer / leading
 *               dimension (256-bit / 16-byte rules); the launch is stopped;
 *   barrier     __syncthreads() reached at different places, a deadlock, a collective
 *               with missing or diverging lanes;
 *   launch      a launch the driver refuses (block, grid, shared memory, bounds).
 * Memory accesses reach the checks through GCC's ThreadSanitizer instrumentation of the
 * emulation library: this file implements the __tsan_* callbacks it calls.
 *
 * Built with ``cc -shared -fPIC -fvisibility=hidden -I<CUDA include>``, with
 * -Wl,-soname,libcuda.so.1; x86-64 and aarch64 switch threads themselves, other POSIX
 * systems (or -DEMU_UCONTEXT) through ucontext.
 */
#define _GNU_SOURCE
#include <cuda.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if (defined(__x86_64__) || defined(__aarch64__)) && !defined(EMU_UCONTEXT)
#define EMU_OWN_SWITCH 1 /* our context switch (ucontext's makes a syscall per switch) */
#else
#include <ucontext.h>
#endif

#define EXPORT __attribute__((visibility("default")))

/* ---------------------------------------------------------------- builtins, shared memory */

typedef struct { unsigned int x, y, z; } emu_uint3;
typedef struct { emu_uint3 thread_idx, block_idx, block_dim, grid_dim; } emu_builtins_t;
EXPORT emu_builtins_t emu_builtins;

#define SMEM_MAX (232448) /* sm_90: 227 KB of dynamic shared memory per block */
#define SMEM_RZ 4096
#define CANARY 0xCB
__attribute__((visibility("hidden"), aligned(4096)))
unsigned char emu_smem_arena[SMEM_RZ + SMEM_MAX + SMEM_RZ];
/* emu_dyn_smem: the block's dynamic shared memory, inside the arena's redzones. */
__asm__(".globl emu_dyn_smem\n\t.type emu_dyn_smem, @object\n\t.size emu_dyn_smem, 232448\n"
        "\t.set emu_dyn_smem, emu_smem_arena + 4096\n");
#define SMEM_BASE ((uintptr_t)emu_smem_arena + SMEM_RZ)

/* ---------------------------------------------------------------- shadow memory */

#define NONE 0xffffffffu
typedef struct {
  uint32_t stamp; /* block (shared) or launch (global) the entry belongs to */
  uint32_t w_tid, w_bep, w_wep;
  uint32_t r1_tid, r1_bep, r1_wep;
  uint32_t r2_tid, r2_bep, r2_wep;
} cell_t;
static cell_t smem_shadow[SMEM_MAX];

enum { K_ARG = 0, K_WORKSPACE = 1, K_USER = 2 };
typedef struct {
  uintptr_t lo, hi, alo, ahi; /* the buffer; the allocation with its redzones */
  unsigned char* raw;
  cell_t* shadow;
  unsigned char* init; /* 1: byte holds a defined value */
  char name[64];       /* set by the host, else the last kernel parameter it was passed as */
  int kind;
  int named;
} region_t;
#define REGION_RZ 4096
#define MAX_REGIONS 4096
static region_t* regions[MAX_REGIONS];
static int nregions;
static region_t* last_region;

/* ---------------------------------------------------------------- threads (fibers) */

enum { T_RUNNABLE, T_BARRIER, T_WARP, T_EXITED };
struct emu_coll {
  int kind;
  const void* ptr;
  unsigned int ldm;
  int layout;
  int elem_size;
  void* d;
  const void* a;
  const void* b;
  const void* c;
  int frag_bytes;
};
typedef struct {
  void* sp;
  int state;
  unsigned int tid; /* linear in the block */
  emu_uint3 idx;
  uint32_t bep, wep; /* barriers passed: block-wide, and warp-wide (incl. block-wide) */
  int site;          /* source line of the __syncthreads() it waits at */
  unsigned int mask; /* __syncwarp mask it waits with */
  struct emu_coll* coll;
#ifndef EMU_OWN_SWITCH
  ucontext_t uc;
#endif
} fiber_t;

#define MAX_THREADS 1024
#define STACK_SIZE (256 * 1024)
static fiber_t fibers[MAX_THREADS];
static char* stacks; /* MAX_THREADS stacks, a guard page below each */
static uintptr_t stacks_lo, stacks_hi;

/* ---------------------------------------------------------------- functions, modules */

#define MAX_LIBS 8
#define MAX_PARAMS 64
typedef struct {
  char name[160];
  void (*entry[MAX_LIBS])(void**);
  int bound;
  int nparams;
  char pkind[MAX_PARAMS]; /* 'p' pointer, 'i' 32-bit int, 'f' float, 'l' 64-bit */
  char pname[MAX_PARAMS][48];
  int max_dyn_smem;
  size_t static_smem; /* bytes of its static __shared__ arrays (emu_static_<name>) */
} func_t;
typedef struct {
  const void* image;
  size_t size;
} module_t;

static void* libs[MAX_LIBS];
static char lib_paths[MAX_LIBS][512];
static int nlibs;

/* ---------------------------------------------------------------- reports */

typedef struct {
  char kind[16];
  char kernel[160];
  char space[8];
  char region[64];
  long long offset;
  unsigned int size;
  int write;
  emu_uint3 block, thread;
  int has_other;
  emu_uint3 oblock, othread;
  int owrite;
  char module[512];
  unsigned long long pc;
  unsigned long long count;
  char detail[256];
} report_t;
#define MAX_REPORTS 512
static report_t reports[MAX_REPORTS];
static int nreports;
static unsigned long long dropped_reports;

/* ---------------------------------------------------------------- the state of a launch */

static struct {
  int active; /* a launch is running: the hooks check */
  func_t* func;
  void** params;
  void (*entry)(void**);
  unsigned int nthreads, live;
  fiber_t* cur;
  uint32_t cur_gtid; /* (block in launch << 10) | tid */
  void* sched_sp;
#ifndef EMU_OWN_SWITCH
  ucontext_t sched_uc;
#endif
  uint32_t block_serial, launch_serial, block_in_launch;
  size_t smem; /* the block's shared memory: dynamic, then static (at static_base) */
  size_t static_base;
  int aborted;
  CUresult error; /* what the launch returns */
  char error_text[1024];
  /* the variant: which emulation library, thread and block order, preemption, poison */
  int lib, thread_order, block_order, preempt_period, poison;
  unsigned long long rng;
  long preempt_left;
  /* collectives being performed, per warp (another warp's may run meanwhile) */
  struct emu_coll* coll_lanes[MAX_THREADS / 32][32];
  /* statistics */
  unsigned long long accesses, launches, blocks, threads;
  /* kernels launched since emu_begin_call */
  char launched[256][160];
  int nlaunched;
} S = {.lib = 0, .poison = 0xff, .rng = 0x9e3779b97f4a7c15ull};

static int last_error_code;

static unsigned long long rnd(void) {
  unsigned long long x = S.rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  S.rng = x;
  return x * 0x2545f4914f6cdd1dull;
}

static emu_uint3 unlinear(unsigned long long i, emu_uint3 dim) {
  emu_uint3 r;
  r.x = (unsigned)(i % dim.x);
  r.y = (unsigned)((i / dim.x) % dim.y);
  r.z = (unsigned)(i / ((unsigned long long)dim.x * dim.y));
  return r;
}

static void report(const char* kind, const char* space, const region_t* region, long long offset,
                   unsigned size, int write, int has_other, uint32_t other, int owrite,
                   const void* pc, const char* fmt, ...) {
  const char* kernel = S.func ? S.func->name : "";
  const char* rname = region ? region->name : (space && !strcmp(space, "shared") ? "shared memory" : "");
  for (int i = 0; i < nreports; ++i) {
    report_t* r = &reports[i];
    if (!strcmp(r->kind, kind) && !strcmp(r->kernel, kernel) && !strcmp(r->space, space ? space : "") &&
        !strcmp(r->region, rname) && r->write == write && r->owrite == (has_other ? owrite : 0)) {
      r->count++;
      return;
    }
  }
  if (nreports == MAX_REPORTS) {
    dropped_reports++;
    return;
  }
  report_t* r = &reports[nreports++];
  memset(r, 0, sizeof *r);
  snprintf(r->kind, sizeof r->kind, "%s", kind);
  snprintf(r->kernel, sizeof r->kernel, "%s", kernel);
  snprintf(r->space, sizeof r->space, "%s", space ? space : "");
  snprintf(r->region, sizeof r->region, "%s", rname);
  r->offset = offset;
  r->size = size;
  r->write = write;
  r->count = 1;
  if (S.active && S.cur) {
    r->block = emu_builtins.block_idx;
    r->thread = S.cur->idx;
  }
  if (has_other) {
    r->has_other = 1;
    r->oblock = unlinear(other >> 10, emu_builtins.grid_dim);
    r->othread = unlinear(other & 1023, emu_builtins.block_dim);
    r->owrite = owrite;
  }
  if (pc) {
    Dl_info info;
    if (dladdr(pc, &info) && info.dli_fname) {
      snprintf(r->module, sizeof r->module, "%s", info.dli_fname);
      r->pc = (unsigned long long)((uintptr_t)pc - (uintptr_t)info.dli_fbase);
    }
  }
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->detail, sizeof r->detail, fmt, ap);
  va_end(ap);
}

static void fail_launch(CUresult code, const char* fmt, ...) {
  if (S.error == CUDA_SUCCESS) {
    S.error = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(S.error_text, sizeof S.error_text, fmt, ap);
    va_end(ap);
  }
}

/* ---------------------------------------------------------------- context switch */

#if defined(EMU_OWN_SWITCH) && defined(__x86_64__)
/* emu_switch(save, to): save callee-saved registers, mxcsr and the x87 control word on
 * this stack, store its pointer in *save, continue on the stack ``to``. */
__asm__(".text\n\t.p2align 4\n\t.globl emu_switch\n\t.hidden emu_switch\n"
        "\t.type emu_switch, @function\nemu_switch:\n"
        "\tpushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n"
        "\tsubq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n"
        "\tmovq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n"
        "\tldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n"
        "\tpopq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n"
        "\t.size emu_switch, .-emu_switch\n");
#elif defined(EMU_OWN_SWITCH) && defined(__aarch64__)
__asm__(".text\n\t.p2align 4\n\t.globl emu_switch\n\t.hidden emu_switch\n"
        "\t.type emu_switch, %function\nemu_switch:\n"
        "\tsub sp, sp, #176\n"
        "\tstp x19, x20, [sp, #0]\n\tstp x21, x22, [sp, #16]\n\tstp x23, x24, [sp, #32]\n"
        "\tstp x25, x26, [sp, #48]\n\tstp x27, x28, [sp, #64]\n\tstp x29, x30, [sp, #80]\n"
        "\tstp d8, d9, [sp, #96]\n\tstp d10, d11, [sp, #112]\n\tstp d12, d13, [sp, #128]\n"
        "\tstp d14, d15, [sp, #144]\n\tmrs x9, fpcr\n\tstr x9, [sp, #160]\n"
        "\tmov x9, sp\n\tstr x9, [x0]\n\tmov sp, x1\n"
        "\tldp x19, x20, [sp, #0]\n\tldp x21, x22, [sp, #16]\n\tldp x23, x24, [sp, #32]\n"
        "\tldp x25, x26, [sp, #48]\n\tldp x27, x28, [sp, #64]\n\tldp x29, x30, [sp, #80]\n"
        "\tldp d8, d9, [sp, #96]\n\tldp d10, d11, [sp, #112]\n\tldp d12, d13, [sp, #128]\n"
        "\tldp d14, d15, [sp, #144]\n\tldr x9, [sp, #160]\n\tmsr fpcr, x9\n"
        "\tadd sp, sp, #176\n\tret\n"
        "\t.size emu_switch, .-emu_switch\n");
#endif
#ifdef EMU_OWN_SWITCH
void emu_switch(void** save, void* to);
#endif

static void fiber_main(void);

static void fiber_init(fiber_t* t, unsigned int i) {
  char* lo = stacks + (size_t)i * STACK_SIZE + 4096;
  uintptr_t top = ((uintptr_t)lo + STACK_SIZE - 4096) & ~(uintptr_t)63;
#if defined(EMU_OWN_SWITCH) && defined(__x86_64__)
  uint64_t* sp = (uint64_t*)top;
  *--sp = 0;                                /* fiber_main's return address: none */
  *--sp = (uint64_t)(uintptr_t)&fiber_main; /* emu_switch returns here */
  for (int r = 0; r < 6; ++r) *--sp = 0;    /* rbp rbx r12-r15 */
  --sp;
  ((uint32_t*)sp)[0] = 0x1f80; /* mxcsr: round to nearest, exceptions masked */
  ((uint32_t*)sp)[1] = 0x037f; /* x87 control word */
  t->sp = sp;
#elif defined(EMU_OWN_SWITCH) && defined(__aarch64__)
  uint64_t* sp = (uint64_t*)(top - 176);
  memset(sp, 0, 176);
  sp[11] = (uint64_t)(uintptr_t)&fiber_main; /* x30: where ret goes */
  t->sp = sp;
#else
  getcontext(&t->uc);
  t->uc.uc_stack.ss_sp = lo;
  t->uc.uc_stack.ss_size = STACK_SIZE - 4096;
  t->uc.uc_link = NULL;
  makecontext(&t->uc, fiber_main, 0);
  (void)top;
#endif
}

static void to_scheduler(fiber_t* t) {
#ifdef EMU_OWN_SWITCH
  emu_switch(&t->sp, S.sched_sp);
#else
  swapcontext(&t->uc, &S.sched_uc);
#endif
}

static void resume(fiber_t* t) {
  S.cur = t;
  S.cur_gtid = (S.block_in_launch << 10) | t->tid;
  emu_builtins.thread_idx = t->idx;
#ifdef EMU_OWN_SWITCH
  emu_switch(&S.sched_sp, t->sp);
#else
  swapcontext(&S.sched_uc, &t->uc);
#endif
  S.cur = NULL;
}

/* Stop the launch from inside a thread: it never resumes. */
static void abort_launch(void) {
  S.aborted = 1;
  fiber_t* t = S.cur;
  t->state = T_EXITED;
  to_scheduler(t);
  abort(); /* unreachable */
}

static void try_release_warp(unsigned int warp);

static void fiber_main(void) {
  fiber_t* t = S.cur;
  S.entry(S.params);
  t->state = T_EXITED;
  S.live--;
  try_release_warp(t->tid / 32);
  to_scheduler(t);
  abort();
}

/* ---------------------------------------------------------------- happens-before */

static inline int ordered(uint32_t tid, uint32_t bep, uint32_t wep) {
  if (tid == S.cur_gtid) return 1;
  if ((tid >> 10) != (S.cur_gtid >> 10)) return 0; /* other block: never within a launch */
  if (bep < S.cur->bep) return 1;                    /* a __syncthreads() in between */
  if (((tid & 1023) >> 5) == (S.cur->tid >> 5) && wep < S.cur->wep) return 1; /* same warp */
  return 0;
}

/* One byte: returns 0, or the conflicting access (1 write-write, 2 read-write,
 * 3 write-read) with its thread in *other. */
static inline int touch(cell_t* c, uint32_t stamp, int write, uint32_t* other, int* uninit) {
  fiber_t* t = S.cur;
  int conflict = 0;
  if (c->stamp != stamp) {
    c->stamp = stamp;
    c->w_tid = c->r1_tid = c->r2_tid = NONE;
  }
  if (write) {
    if (c->w_tid != NONE && !ordered(c->w_tid, c->w_bep, c->w_wep)) {
      conflict = 1;
      *other = c->w_tid;
    } else if (c->r1_tid != NONE && !ordered(c->r1_tid, c->r1_bep, c->r1_wep)) {
      conflict = 2;
      *other = c->r1_tid;
    } else if (c->r2_tid != NONE && !ordered(c->r2_tid, c->r2_bep, c->r2_wep)) {
      conflict = 2;
      *other = c->r2_tid;
    }
    c->w_tid = S.cur_gtid;
    c->w_bep = t->bep;
    c->w_wep = t->wep;
    c->r1_tid = c->r2_tid = NONE;
  } else {
    if (c->w_tid == NONE) {
      *uninit = 1;
    } else if (!ordered(c->w_tid, c->w_bep, c->w_wep)) {
      conflict = 3;
      *other = c->w_tid;
    }
    if (c->r1_tid == NONE || ordered(c->r1_tid, c->r1_bep, c->r1_wep)) {
      c->r1_tid = S.cur_gtid;
      c->r1_bep = t->bep;
      c->r1_wep = t->wep;
    } else if (c->r2_tid == NONE || ordered(c->r2_tid, c->r2_bep, c->r2_wep)) {
      c->r2_tid = S.cur_gtid;
      c->r2_bep = t->bep;
      c->r2_wep = t->wep;
    }
  }
  return conflict;
}

/* ``touch`` over the n bytes of one access. Its outcome depends only on a cell's state
 * before (the thread's state is the same for every byte): a byte whose cell holds what
 * the byte before it held gets what that byte got, copied, not worked out again. Most
 * accesses are 4-16 bytes with equal cells, and the bytewise walk was over half of the
 * emulation's time (perf, 2026-12-06). */
static inline int touch_range(cell_t* c, size_t n, uint32_t stamp, int write, uint32_t* other,
                              int* uninit) {
  int conflict = 0;
  cell_t before, after;
  for (size_t i = 0; i < n; ++i) {
    if (i > 0 && memcmp(&c[i], &before, sizeof before) == 0) {
      c[i] = after; /* (its conflict, if any, is the one recorded for the byte before) */
      continue;
    }
    before = c[i];
    int k = touch(&c[i], stamp, write, other, uninit);
    after = c[i];
    if (k && !conflict) conflict = k;
  }
  return conflict;
}

static const char* const conflict_name[] = {"", "write after write", "write after read",
                                            "read after write"};

static region_t* find_region(uintptr_t a) {
  if (last_region && a >= last_region->alo && a < last_region->ahi) return last_region;
  int lo = 0, hi = nregions - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    region_t* r = regions[mid];
    if (a < r->alo) hi = mid - 1;
    else if (a >= r->ahi) lo = mid + 1;
    else return last_region = r;
  }
  return NULL;
}

static void shared_access(uintptr_t a, size_t size, int write, const void* pc) {
  long long off = (long long)(a - SMEM_BASE);
  if (a < SMEM_BASE || off + (long long)size > (long long)S.smem) {
    report("oob", "shared", NULL, off, (unsigned)size, write, 0, 0, 0, pc,
           "%s of %zu bytes at offset %lld of %zu bytes of shared memory",
           write ? "write" : "read", size, off, S.smem);
    fail_launch(CUDA_ERROR_ILLEGAL_ADDRESS, "out-of-bounds shared memory access in %s",
                S.func->name);
    return;
  }
  int uninit = 0;
  uint32_t other = 0;
  int conflict = touch_range(&smem_shadow[off], size, S.block_serial, write, &other, &uninit);
  if (conflict)
    report("race", "shared", NULL, off, (unsigned)size, write, 1, other, conflict != 2, pc,
           "%s in shared memory at byte %lld (%zu-byte access) with no barrier between",
           conflict_name[conflict], off, size);
  if (uninit)
    report("uninit", "shared", NULL, off, (unsigned)size, 0, 0, 0, 0, pc,
           "read of shared memory at byte %lld (%zu bytes) not written before in this block", off,
           size);
}

static void global_access(region_t* r, uintptr_t a, size_t size, int write, const void* pc) {
  long long off = (long long)(a - r->lo);
  if (a < r->lo || a + size > r->hi) {
    report("oob", "global", r, off, (unsigned)size, write, 0, 0, 0, pc,
           "%s of %zu bytes at byte %lld of '%s' (%zu bytes)", write ? "write" : "read", size, off,
           r->name, (size_t)(r->hi - r->lo));
    fail_launch(CUDA_ERROR_ILLEGAL_ADDRESS, "out-of-bounds access to '%s' in %s", r->name,
                S.func->name);
    return;
  }
  int uninit = 0, dummy = 0;
  uint32_t other = 0;
  int conflict = touch_range(&r->shadow[off], size, S.launch_serial, write, &other, &dummy);
  if (write) memset(&r->init[off], 1, size);
  else if (memchr(&r->init[off], 0, size)) uninit = 1;
  if (conflict)
    report("race", "global", r, off, (unsigned)size, write, 1, other, conflict != 2, pc,
           "%s on '%s' at byte %lld (%zu-byte access) with no barrier between",
           conflict_name[conflict], r->name, off, size);
  if (uninit)
    report("uninit", "global", r, off, (unsigned)size, 0, 0, 0, 0, pc,
           "read of '%s' at byte %lld (%zu bytes) before anything wrote it (%s)", r->name, off, size,
           r->kind == K_WORKSPACE ? "a workspace: not since the op started"
                                  : "not the host, no earlier kernel, not this one yet");
}

static void yield_now(void);

static void on_access(void* addr, size_t size, int write, const void* pc) {
  if (!S.active || !S.cur) return;
  uintptr_t a = (uintptr_t)addr;
  S.accesses++;
  if (S.preempt_period && --S.preempt_left <= 0) {
    S.preempt_left = 1 + (long)(rnd() % (unsigned long long)(2 * S.preempt_period));
    yield_now();
  }
  if (a >= (uintptr_t)emu_smem_arena && a < (uintptr_t)emu_smem_arena + sizeof emu_smem_arena) {
    shared_access(a, size, write, pc);
    return;
  }
  if (a >= stacks_lo && a < stacks_hi) return; /* registers and local memory */
  if (a >= (uintptr_t)&emu_builtins && a < (uintptr_t)(&emu_builtins + 1)) return;
  region_t* r = find_region(a);
  if (r) {
    global_access(r, a, size, write, pc);
    return;
  }
  Dl_info info;
  const char* what = dladdr(addr, &info) && info.dli_sname ? info.dli_sname : "no allocation";
  report("wild", "global", NULL, 0, (unsigned)size, write, 0, 0, 0, pc,
         "%s of %zu bytes at %p (%s): outside every device allocation", write ? "write" : "read",
         size, addr, what);
  fail_launch(CUDA_ERROR_ILLEGAL_ADDRESS, "illegal address %p in %s", addr, S.func->name);
  abort_launch();
}

/* ---------------------------------------------------------------- ThreadSanitizer ABI */

#define RA __builtin_return_address(0)
#define TSAN_SIZE(n)                                                                  \
  EXPORT void __tsan_read##n(void* p) { on_access(p, n, 0, RA); }                   \
  EXPORT void __tsan_write##n(void* p) { on_access(p, n, 1, RA); }                  \
  EXPORT void __tsan_unaligned_read##n(void* p) { on_access(p, n, 0, RA); }         \
  EXPORT void __tsan_unaligned_write##n(void* p) { on_access(p, n, 1, RA); }        \
  EXPORT void __tsan_volatile_read##n(void* p) { on_access(p, n, 0, RA); }          \
  EXPORT void __tsan_volatile_write##n(void* p) { on_access(p, n, 1, RA); }         \
  EXPORT void __tsan_unaligned_volatile_read##n(void* p) { on_access(p, n, 0, RA); } \
  EXPORT void __tsan_unaligned_volatile_write##n(void* p) { on_access(p, n, 1, RA); }
TSAN_SIZE(1)
TSAN_SIZE(2)
TSAN_SIZE(4)
TSAN_SIZE(8)
TSAN_SIZE(16)
EXPORT void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, 0, RA); }
EXPORT void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, 1, RA); }
EXPORT void __tsan_init(void) {}
EXPORT void __tsan_func_entry(void* pc) { (void)pc; }
EXPORT void __tsan_func_exit(void) {}
EXPORT void __tsan_vptr_update(void** p, void* v) { (void)p; (void)v; }
EXPORT void __tsan_vptr_read(void** p) { (void)p; }

/* ---------------------------------------------------------------- -fsanitize=alignment */

struct ubsan_loc { const char* file; unsigned int line, column; };
struct ubsan_type { unsigned short kind, info; char name[1]; };
struct ubsan_mismatch {
  struct ubsan_loc loc;
  const struct ubsan_type* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
static const char* const check_kinds[] = {"load of", "store to", "reference binding to",
                                          "member access within", "member call on",
                                          "constructor call on", "downcast of", "downcast of",
                                          "upcast of", "cast to virtual base of", "_Nonnull binding to",
                                          "dynamic operation on"};

static void misaligned(struct ubsan_mismatch* d, uintptr_t ptr, const void* pc) {
  unsigned long align = 1ul << d->log_alignment;
  const char* what = d->check_kind < sizeof check_kinds / sizeof *check_kinds ? check_kinds[d->check_kind] : "access to";
  region_t* r = S.active ? find_region(ptr) : NULL;
  const char* space = ptr >= SMEM_BASE && ptr < SMEM_BASE + SMEM_MAX ? "shared" : "global";
  long long off = r ? (long long)(ptr - r->lo) : (long long)(ptr - SMEM_BASE);
  if (!S.active) {
    fprintf(stderr, "emulator: misaligned %s %s at %p (%s:%u)\n", what, d->type->name, (void*)ptr,
            d->loc.file, d->loc.line);
    abort();
  }
  report("misaligned", space, r, off, 0, d->check_kind == 1, 0, 0, 0, pc,
         "%s misaligned address %p for type %s, which requires %lu-byte alignment (%s:%u)", what,
         (void*)ptr, d->type->name, align, d->loc.file, d->loc.line);
  fail_launch(CUDA_ERROR_MISALIGNED_ADDRESS, "misaligned %s %s at %p in %s (%s:%u)", what,
              d->type->name, (void*)ptr, S.func->name, d->loc.file, d->loc.line);
  abort_launch();
}
EXPORT void __ubsan_handle_type_mismatch_v1(struct ubsan_mismatch* d, uintptr_t ptr) {
  misaligned(d, ptr, __builtin_return_address(0));
}
EXPORT void __ubsan_handle_type_mismatch_v1_abort(struct ubsan_mismatch* d, uintptr_t ptr) {
  misaligned(d, ptr, __builtin_return_address(0));
}

/* ---------------------------------------------------------------- barriers, collectives */

static void yield_now(void) { to_scheduler(S.cur); }

/* Where the running block's static __shared__ arrays start, from emu_dyn_smem (the
 * emulation's source declares them as pointers there: emulator.static_shared). */
EXPORT size_t emu_static_base(void) { return S.static_base; }

EXPORT void emu_syncthreads(int line) {
  fiber_t* t = S.cur;
  t->site = line;
  t->state = T_BARRIER;
  to_scheduler(t);
}

static void try_release_warp(unsigned int warp) {
  unsigned int first = warp * 32, last = first + 32 > S.nthreads ? S.nthreads : first + 32;
  unsigned int mask = 0;
  int waiting = 0;
  for (unsigned int i = first; i < last; ++i) {
    fiber_t* t = &fibers[i];
    if (t->state == T_WARP && !t->coll) {
      if (waiting && t->mask != mask) return; /* different masks: not (yet) one sync */
      mask = t->mask;
      waiting = 1;
    }
  }
  if (!waiting) return;
  for (unsigned int i = first; i < last; ++i) {
    fiber_t* t = &fibers[i];
    if (!(mask >> (i - first) & 1u) || t->state == T_EXITED) continue;
    if (t->state != T_WARP || t->coll) return; /* a lane of the mask has not arrived */
  }
  for (unsigned int i = first; i < last; ++i) {
    fiber_t* t = &fibers[i];
    if ((mask >> (i - first) & 1u) && t->state == T_WARP) {
      t->wep++;
      t->state = T_RUNNABLE;
    }
  }
}

EXPORT void emu_syncwarp(unsigned int mask) {
  fiber_t* t = S.cur;
  if (!(mask >> (t->tid % 32) & 1u)) {
    report("barrier", "", NULL, 0, 0, 0, 0, 0, 0, __builtin_return_address(0),
           "__syncwarp(0x%08x) called by lane %u, which is not in its mask", mask, t->tid % 32);
  }
  t->state = T_WARP;
  t->mask = mask;
  t->coll = NULL;
  try_release_warp(t->tid / 32);
  if (t->state != T_RUNNABLE) to_scheduler(t);
}

EXPORT void emu_report_lane_divergence(const char* what) {
  report("barrier", "", NULL, 0, 0, 0, 0, 0, 0, __builtin_return_address(0), "%s", what);
}

EXPORT struct emu_coll* const* emu_collective_begin(struct emu_coll* mine) {
  fiber_t* t = S.cur;
  unsigned int warp = t->tid / 32, first = warp * 32;
  t->state = T_WARP;
  t->coll = mine;
  if (first + 32 > S.nthreads) {
    report("barrier", "", NULL, 0, 0, 0, 0, 0, 0, __builtin_return_address(0),
           "wmma operation in warp %u, which has fewer than 32 threads", warp);
    fail_launch(CUDA_ERROR_LAUNCH_FAILED, "wmma in an incomplete warp in %s", S.func->name);
    abort_launch();
  }
  for (unsigned int i = first; i < first + 32; ++i) {
    if (fibers[i].state != T_WARP || !fibers[i].coll) {
      to_scheduler(t); /* the last lane to arrive performs it */
      t->coll = NULL;
      return NULL;
    }
  }
  struct emu_coll* c0 = fibers[first].coll;
  for (unsigned int i = first; i < first + 32; ++i) {
    struct emu_coll* c = fibers[i].coll;
    if (c->kind != c0->kind || c->ptr != c0->ptr || c->ldm != c0->ldm || c->layout != c0->layout) {
      report("barrier", "", NULL, 0, 0, 0, 0, 0, 0, __builtin_return_address(0),
             "lanes %u and %u of warp %u reach different wmma operations or pass different "
             "pointers / leading dimensions (%p/%u vs %p/%u)",
             0u, i - first, warp, c0->ptr, c0->ldm, c->ptr, c->ldm);
      fail_launch(CUDA_ERROR_LAUNCH_FAILED, "divergent wmma operation in %s", S.func->name);
      abort_launch();
    }
    S.coll_lanes[warp][i - first] = c;
  }
  if (c0->ptr) {
    uintptr_t p = (uintptr_t)c0->ptr;
    if (p % 32 || ((unsigned long)c0->ldm * c0->elem_size) % 16) {
      region_t* r = find_region(p);
      int shared = p >= SMEM_BASE && p < SMEM_BASE + SMEM_MAX;
      report("misaligned", shared ? "shared" : "global", r,
             r ? (long long)(p - r->lo) : (long long)(p - SMEM_BASE), 0, c0->kind == 2, 0, 0, 0,
             __builtin_return_address(0),
             "wmma %s at %p with ldm %u: the pointer must be 256-bit aligned and ldm a "
             "multiple of 16 bytes",
             c0->kind == 2 ? "store_matrix_sync" : "load_matrix_sync", c0->ptr, c0->ldm);
      fail_launch(CUDA_ERROR_MISALIGNED_ADDRESS, "misaligned wmma pointer in %s", S.func->name);
      abort_launch();
    }
  }
  for (unsigned int i = first; i < first + 32; ++i) fibers[i].wep++; /* lanes gathered */
  t->state = T_RUNNABLE;
  t->coll = NULL;
  return S.coll_lanes[warp];
}

/* By the lane that performed the collective: release its warp. */
EXPORT void emu_collective_end(void) {
  unsigned int first = S.cur->tid / 32 * 32;
  for (unsigned int i = first; i < first + 32; ++i) {
    fiber_t* t = &fibers[i];
    t->wep++;
    if (t->state == T_WARP && t->coll) {
      t->state = T_RUNNABLE;
    }
  }
}

/* ---------------------------------------------------------------- running a launch */

static unsigned int order_buf[MAX_THREADS];

static void make_order(unsigned int* out, unsigned int n, int policy) {
  for (unsigned int i = 0; i < n; ++i) out[i] = policy == 1 ? n - 1 - i : i;
  if (policy == 2) {
    for (unsigned int i = n - 1; i > 0; --i) {
      unsigned int j = (unsigned int)(rnd() % (i + 1));
      unsigned int tmp = out[i];
      out[i] = out[j];
      out[j] = tmp;
    }
  }
}

static void run_block(void) {
  unsigned int n = S.nthreads;
  for (unsigned int i = 0; i < n; ++i) {
    fiber_t* t = &fibers[i];
    memset(t, 0, sizeof *t);
    t->state = T_RUNNABLE;
    t->tid = i;
    t->idx = unlinear(i, emu_builtins.block_dim);
    fiber_init(t, i);
  }
  S.live = n;
  for (;;) {
    make_order(order_buf, n, S.thread_order);
    for (unsigned int k = 0; k < n; ++k) {
      fiber_t* t = &fibers[order_buf[k]];
      if (t->state != T_RUNNABLE) continue;
      resume(t);
      if (S.aborted) return;
    }
    if (S.live == 0) return;
    int runnable = 0, at_barrier = 0, site = -1, sites_differ = 0;
    for (unsigned int i = 0; i < n; ++i) {
      fiber_t* t = &fibers[i];
      if (t->state == T_RUNNABLE) runnable++;
      if (t->state == T_BARRIER) {
        if (site >= 0 && t->site != site) sites_differ = 1;
        site = t->site;
        at_barrier++;
      }
    }
    if (runnable) continue;
    if ((unsigned)at_barrier == S.live) {
      if (sites_differ) {
        report("barrier", "", NULL, 0, 0, 0, 0, 0, 0, NULL,
               "threads of one block wait at __syncthreads() of different source lines");
      }
      for (unsigned int i = 0; i < n; ++i) {
        fiber_t* t = &fibers[i];
        if (t->state == T_BARRIER) {
          t->bep++;
          t->wep++;
          t->state = T_RUNNABLE;
        }
      }
      continue;
    }
    report("barrier", "", NULL, 0, 0, 0, 0, 0, 0, NULL,
           "deadlock: %d of %u live threads wait at __syncthreads(), the others at a warp "
           "barrier or wmma operation that not all of their lanes reach",
           at_barrier, S.live);
    fail_launch(CUDA_ERROR_LAUNCH_FAILED, "deadlock in %s", S.func->name);
    S.aborted = 1;
    return;
  }
}

static void check_canaries(void) {
  for (size_t i = 0; i < SMEM_RZ; ++i) {
    if (emu_smem_arena[i] != CANARY) {
      report("oob", "shared", NULL, (long long)i - SMEM_RZ, 1, 1, 0, 0, 0, NULL,
             "the redzone before dynamic shared memory was overwritten (byte %lld)",
             (long long)i - SMEM_RZ);
      fail_launch(CUDA_ERROR_ILLEGAL_ADDRESS, "shared memory redzone overwritten in %s", S.func->name);
      break;
    }
  }
  for (size_t i = SMEM_RZ + S.smem; i < sizeof emu_smem_arena; ++i) {
    if (emu_smem_arena[i] != CANARY) {
      report("oob", "shared", NULL, (long long)(i - SMEM_RZ), 1, 1, 0, 0, 0, NULL,
             "bytes after the %zu of shared memory were overwritten (byte %zu)", S.smem,
             i - SMEM_RZ);
      fail_launch(CUDA_ERROR_ILLEGAL_ADDRESS, "shared memory redzone overwritten in %s", S.func->name);
      break;
    }
  }
  for (int k = 0; k < nregions; ++k) {
    region_t* r = regions[k];
    for (uintptr_t p = r->alo; p < r->ahi; ++p) {
      if (p == r->lo) p = r->hi;
      if (p >= r->ahi) break;
      if (*(unsigned char*)p != CANARY) {
        report("oob", "global", r, (long long)(p - r->lo), 1, 1, 0, 0, 0, NULL,
               "the redzone of '%s' was overwritten at byte %lld", r->name, (long long)(p - r->lo));
        fail_launch(CUDA_ERROR_ILLEGAL_ADDRESS, "redzone of '%s' overwritten in %s", r->name,
                    S.func->name);
        memset((void*)r->alo, CANARY, r->lo - r->alo);
        memset((void*)r->hi, CANARY, r->ahi - r->hi);
        break;
      }
    }
  }
}

static void on_segv(int sig, siginfo_t* info, void* ctx) {
  (void)ctx;
  char buf[512];
  int n = snprintf(buf, sizeof buf,
                   "\nemulator: signal %d (address %p) in kernel %s, block (%u,%u,%u) thread "
                   "(%u,%u,%u)\n",
                   sig, info->si_addr, S.func ? S.func->name : "?", emu_builtins.block_idx.x,
                   emu_builtins.block_idx.y, emu_builtins.block_idx.z, emu_builtins.thread_idx.x,
                   emu_builtins.thread_idx.y, emu_builtins.thread_idx.z);
  if (write(2, buf, (size_t)n) < 0) {
  }
  _exit(70);
}

static void setup_once(void) {
  static int done;
  if (done) return;
  done = 1;
  size_t bytes = (size_t)MAX_THREADS * STACK_SIZE;
  stacks = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) {
    perror("emulator: mmap of the thread stacks");
    abort();
  }
  for (size_t i = 0; i < MAX_THREADS; ++i) mprotect(stacks + i * STACK_SIZE, 4096, PROT_NONE);
  stacks_lo = (uintptr_t)stacks;
  stacks_hi = stacks_lo + bytes;
  static char altstack[65536];
  stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
  sigaltstack(&ss, NULL);
}

static CUresult launch(func_t* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, unsigned smem, void** params, void** extra) {
  setup_once();
  S.error = CUDA_SUCCESS;
  S.error_text[0] = 0;
  S.func = f;
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (extra || !params) {
    fail_launch(CUDA_ERROR_NOT_SUPPORTED, "the emulator takes kernelParams only");
    return S.error;
  }
  unsigned long long nthreads = (unsigned long long)bx * by * bz;
  unsigned long long nblocks = (unsigned long long)gx * gy * gz;
  if (!nthreads || nthreads > 1024 || bx > 1024 || by > 1024 || bz > 64 || !nblocks ||
      gx > 2147483647u || gy > 65535 || gz > 65535) {
    report("launch", "", NULL, 0, 0, 0, 0, 0, 0, NULL, "invalid launch: grid (%u,%u,%u) block (%u,%u,%u)",
           gx, gy, gz, bx, by, bz);
    fail_launch(CUDA_ERROR_INVALID_VALUE, "invalid grid (%u,%u,%u) or block (%u,%u,%u) for %s", gx,
                gy, gz, bx, by, bz, f->name);
    return S.error;
  }
  if (nblocks > (1ull << 22)) { /* thread ids are (block << 10) | thread in 32 bits */
    fail_launch(CUDA_ERROR_NOT_SUPPORTED, "the emulator runs at most 4M blocks per launch");
    return S.error;
  }
  if (f->bound && nthreads > (unsigned)f->bound) {
    report("launch", "", NULL, 0, 0, 0, 0, 0, 0, NULL,
           "%llu threads per block exceed the kernel's __launch_bounds__(%d)", nthreads, f->bound);
    fail_launch(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "too many threads for %s", f->name);
    return S.error;
  }
  /* static arrays after the dynamic memory (as emu_static_base says), 64-byte aligned */
  size_t static_base = ((size_t)smem + 63) & ~(size_t)63;
  size_t total = f->static_smem ? static_base + f->static_smem : smem;
  /* As the driver: dynamic memory up to the function's attribute where it was set (which
   * cuFuncSetAttribute checked against the opt-in maximum, static memory included), else
   * dynamic and static together up to 48 KB. */
  int over = f->max_dyn_smem > 0 ? smem > (unsigned)f->max_dyn_smem
                                 : smem + f->static_smem > 48 * 1024;
  if (over || total > SMEM_MAX) {
    report("launch", "", NULL, 0, 0, 0, 0, 0, 0, NULL,
           "%u bytes of dynamic and %zu of static shared memory: more than allowed (%d of "
           "dynamic memory set by cuFuncSetAttribute; else 48 KB in all)", smem, f->static_smem,
           f->max_dyn_smem);
    fail_launch(CUDA_ERROR_INVALID_VALUE, "too much shared memory for %s", f->name);
    return S.error;
  }
  S.entry = f->entry[S.lib];
  if (!S.entry) {
    fail_launch(CUDA_ERROR_NOT_FOUND, "%s is not in emulation library %d", f->name, S.lib);
    return S.error;
  }
  S.launch_serial++;
  /* Pointer arguments name the allocation they point into. */
  for (int i = 0; i < f->nparams; ++i) {
    if (f->pkind[i] != 'p') continue;
    uintptr_t p = (uintptr_t) * (void**)params[i];
    if (!p) continue;
    region_t* r = find_region(p);
    if (!r || p >= r->hi || p < r->lo) {
      report("wild", "global", r, 0, 0, 0, 0, 0, 0, NULL,
             "argument %s = %p points outside every device allocation", f->pname[i], (void*)p);
      continue;
    }
    if (!r->named) { /* a workspace: named after the kernel parameter */
      snprintf(r->name, sizeof r->name, "%.*s", (int)(strlen(f->pname[i]) > 4 &&
               !strcmp(f->pname[i] + strlen(f->pname[i]) - 4, "_ptr") ? strlen(f->pname[i]) - 4
               : strlen(f->pname[i])), f->pname[i]);
    }
  }
  S.params = params;
  S.nthreads = (unsigned)nthreads;
  S.smem = total;
  S.static_base = static_base;
  S.aborted = 0;
  S.preempt_left = S.preempt_period;
  emu_builtins.block_dim = (emu_uint3){bx, by, bz};
  emu_builtins.grid_dim = (emu_uint3){gx, gy, gz};
  memset(emu_smem_arena, CANARY, sizeof emu_smem_arena);
  struct sigaction sa, old_segv, old_bus;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
  unsigned long long* block_order = malloc(nblocks * sizeof *block_order);
  for (unsigned long long k = 0; k < nblocks; ++k) block_order[k] = S.block_order == 1 ? nblocks - 1 - k : k;
  if (S.block_order == 2) {
    for (unsigned long long k = nblocks - 1; k > 0; --k) {
      unsigned long long j = rnd() % (k + 1), tmp = block_order[k];
      block_order[k] = block_order[j];
      block_order[j] = tmp;
    }
  }
  S.active = 1;
  for (unsigned long long k = 0; k < nblocks && !S.aborted; ++k) {
    unsigned long long b = block_order[k];
    emu_builtins.block_idx = unlinear(b, emu_builtins.grid_dim);
    S.block_in_launch = (uint32_t)b;
    S.block_serial++;
    memset((void*)SMEM_BASE, S.poison, S.smem);
    run_block();
    S.blocks++;
    S.threads += nthreads;
  }
  S.active = 0;
  free(block_order);
  sigaction(SIGSEGV, &old_segv, NULL);
  sigaction(SIGBUS, &old_bus, NULL);
  check_canaries();
  S.launches++;
  if (S.nlaunched < 256) snprintf(S.launched[S.nlaunched++], sizeof S.launched[0], "%s", f->name);
  S.func = NULL;
  return S.error;
}

/* ---------------------------------------------------------------- the emulator's own API */

EXPORT int emu_set_libraries(int n, const char** paths) {
  for (int i = 0; i < n && i < MAX_LIBS; ++i) {
    libs[i] = dlopen(paths[i], RTLD_NOW | RTLD_LOCAL);
    if (!libs[i]) {
      fprintf(stderr, "emulator: %s\n", dlerror());
      return -1;
    }
    snprintf(lib_paths[i], sizeof lib_paths[i], "%s", paths[i]);
  }
  nlibs = n;
  return 0;
}

EXPORT void emu_set_variant(int lib, int thread_order, int block_order, unsigned long long seed,
                            int preempt_period, int poison) {
  S.lib = lib;
  S.thread_order = thread_order;
  S.block_order = block_order;
  S.rng = seed ? seed : 0x9e3779b97f4a7c15ull;
  S.preempt_period = preempt_period;
  S.poison = poison;
}

static void insert_region(region_t* r) {
  int i = nregions++;
  while (i > 0 && regions[i - 1]->lo > r->lo) {
    regions[i] = regions[i - 1];
    i--;
  }
  regions[i] = r;
}

/* A device allocation: ``size`` bytes at an address that is ``offset`` modulo 512 (the
 * CUDA caching allocator's granularity: views keep their alignment), redzones around. */
EXPORT void* emu_alloc(size_t size, size_t offset, int kind, const char* name) {
  if (nregions == MAX_REGIONS) return NULL;
  size_t total = REGION_RZ + offset + size + REGION_RZ;
  void* raw = NULL;
  if (posix_memalign(&raw, 4096, total)) return NULL;
  region_t* r = calloc(1, sizeof *r);
  r->raw = raw;
  r->alo = (uintptr_t)raw;
  r->lo = r->alo + REGION_RZ + offset;
  r->hi = r->lo + size;
  r->ahi = r->alo + total;
  r->shadow = calloc(size ? size : 1, sizeof(cell_t));
  r->init = calloc(size ? size : 1, 1);
  r->kind = kind;
  if (name && *name) {
    snprintf(r->name, sizeof r->name, "%s", name);
    r->named = 1;
  } else {
    snprintf(r->name, sizeof r->name, "allocation of %zu bytes", size);
  }
  memset(raw, CANARY, total);
  memset((void*)r->lo, S.poison, size);
  insert_region(r);
  return (void*)r->lo;
}

EXPORT int emu_free(void* p) {
  for (int i = 0; i < nregions; ++i) {
    region_t* r = regions[i];
    if (r->lo == (uintptr_t)p) {
      memmove(&regions[i], &regions[i + 1], (size_t)(nregions - i - 1) * sizeof *regions);
      nregions--;
      if (last_region == r) last_region = NULL;
      free(r->raw);
      free(r->shadow);
      free(r->init);
      free(r);
      return 0;
    }
  }
  return -1;
}

/* Mark bytes of an allocation (un)initialised: mask[i] != 0 initialised; NULL: all. */
EXPORT int emu_mark_init(void* p, size_t n, const unsigned char* mask) {
  region_t* r = find_region((uintptr_t)p);
  if (!r || (uintptr_t)p < r->lo || (uintptr_t)p + n > r->hi) return -1;
  unsigned char* init = r->init + ((uintptr_t)p - r->lo);
  if (mask) for (size_t i = 0; i < n; ++i) init[i] = mask[i] != 0;
  else memset(init, 1, n);
  return 0;
}

/* The initialised bytes of an allocation (1/0 per byte into ``out``). */
EXPORT int emu_get_init(void* p, size_t n, unsigned char* out) {
  region_t* r = find_region((uintptr_t)p);
  if (!r || (uintptr_t)p < r->lo || (uintptr_t)p + n > r->hi) return -1;
  memcpy(out, r->init + ((uintptr_t)p - r->lo), n);
  return 0;
}

/* Before one op's kernels run: its workspaces (TVM's cudaMalloc'd intermediates, which
 * live within one call) hold ``poison`` and count as uninitialised again. */
EXPORT void emu_begin_call(void) {
  for (int i = 0; i < nregions; ++i) {
    region_t* r = regions[i];
    if (r->kind != K_WORKSPACE) continue;
    memset((void*)r->lo, S.poison, r->hi - r->lo);
    memset(r->init, 0, r->hi - r->lo);
  }
  S.nlaunched = 0;
}

EXPORT int emu_launched_count(void) { return S.nlaunched; }
EXPORT const char* emu_launched(int i) { return i >= 0 && i < S.nlaunched ? S.launched[i] : ""; }

EXPORT int emu_report_count(void) { return nreports; }
EXPORT unsigned long long emu_dropped_reports(void) { return dropped_reports; }
EXPORT void emu_clear_reports(void) {
  nreports = 0;
  dropped_reports = 0;
}

static void json_str(char** p, char* end, const char* s) {
  *p += snprintf(*p, (size_t)(end - *p), "\"");
  for (; *s && *p < end - 8; ++s) {
    if (*s == '"' || *s == '\\') *p += snprintf(*p, (size_t)(end - *p), "\\%c", *s);
    else if ((unsigned char)*s < 32) *p += snprintf(*p, (size_t)(end - *p), " ");
    else *(*p)++ = *s;
  }
  *p += snprintf(*p, (size_t)(end - *p), "\"");
}

EXPORT int emu_report_json(int i, char* buf, int n) {
  if (i < 0 || i >= nreports) return -1;
  report_t* r = &reports[i];
  char *p = buf, *end = buf + n;
  p += snprintf(p, (size_t)(end - p), "{\"kind\": ");
  json_str(&p, end, r->kind);
  p += snprintf(p, (size_t)(end - p), ", \"kernel\": ");
  json_str(&p, end, r->kernel);
  p += snprintf(p, (size_t)(end - p), ", \"space\": ");
  json_str(&p, end, r->space);
  p += snprintf(p, (size_t)(end - p), ", \"region\": ");
  json_str(&p, end, r->region);
  p += snprintf(p, (size_t)(end - p),
                ", \"offset\": %lld, \"size\": %u, \"write\": %d, \"block\": [%u, %u, %u], "
                "\"thread\": [%u, %u, %u], \"count\": %llu, \"pc\": %llu",
                r->offset, r->size, r->write, r->block.x, r->block.y, r->block.z, r->thread.x,
                r->thread.y, r->thread.z, r->count, r->pc);
  if (r->has_other)
    p += snprintf(p, (size_t)(end - p),
                  ", \"other_block\": [%u, %u, %u], \"other_thread\": [%u, %u, %u], \"other_write\": %d",
                  r->oblock.x, r->oblock.y, r->oblock.z, r->othread.x, r->othread.y, r->othread.z,
                  r->owrite);
  p += snprintf(p, (size_t)(end - p), ", \"module\": ");
  json_str(&p, end, r->module);
  p += snprintf(p, (size_t)(end - p), ", \"detail\": ");
  json_str(&p, end, r->detail);
  p += snprintf(p, (size_t)(end - p), "}");
  return (int)(p - buf);
}

EXPORT void emu_stats(unsigned long long* out) {
  out[0] = S.launches;
  out[1] = S.blocks;
  out[2] = S.threads;
  out[3] = S.accesses;
}

/* A DLPack tensor (legacy DLManagedTensor) over ``data``, freed by its deleter. */
typedef struct {
  void* data;
  int32_t device_type, device_id;
  int32_t ndim;
  uint8_t code, bits;
  uint16_t lanes;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} dl_tensor_t;
typedef struct dl_managed {
  dl_tensor_t t;
  void* ctx;
  void (*deleter)(struct dl_managed*);
  int64_t dims[];
} dl_managed_t;
static void dl_free(dl_managed_t* m) { free(m); }
EXPORT void* emu_make_dltensor(void* data, int device_type, int device_id, int ndim,
                               const int64_t* shape, const int64_t* strides, int code, int bits,
                               int lanes) {
  dl_managed_t* m = calloc(1, sizeof *m + 2 * (size_t)(ndim ? ndim : 1) * sizeof(int64_t));
  m->t.data = data;
  m->t.device_type = device_type;
  m->t.device_id = device_id;
  m->t.ndim = ndim;
  m->t.code = (uint8_t)code;
  m->t.bits = (uint8_t)bits;
  m->t.lanes = (uint16_t)lanes;
  m->t.shape = m->dims;
  m->t.strides = m->dims + ndim;
  for (int i = 0; i < ndim; ++i) {
    m->dims[i] = shape[i];
    m->dims[ndim + i] = strides[i];
  }
  m->deleter = dl_free;
  return m;
}

/* ---------------------------------------------------------------- the driver API */

static const char* error_name(CUresult e) {
  switch (e) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case CUDA_ERROR_MISALIGNED_ADDRESS: return "CUDA_ERROR_MISALIGNED_ADDRESS";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

static char error_buf[1200];
EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  if (e != CUDA_SUCCESS && (int)e == last_error_code && last_error_code && S.error_text[0]) {
    snprintf(error_buf, sizeof error_buf, "%s (emulator: %s)", error_name(e), S.error_text);
    *s = error_buf;
  } else {
    *s = error_name(e);
  }
  return CUDA_SUCCESS;
}
EXPORT CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

EXPORT CUresult cuInit(unsigned int flags) {
  (void)flags;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDriverGetVersion(int* v) {
  if (v) *v = 13000;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
  (void)dev;
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  snprintf(name, (size_t)len, "CPU emulation of an NVIDIA sm_80 GPU (mra-compile tests)");
  return CUDA_SUCCESS;
}

/* The size of a cubin (ELF) or fatbin image, or 0 when unknown. */
static size_t image_size(const unsigned char* p) {
  if (!memcmp(p, "\x7f" "ELF", 4) && p[4] == 2) {
    uint64_t shoff, phoff;
    uint16_t shentsize, shnum, phentsize, phnum;
    memcpy(&phoff, p + 0x20, 8);
    memcpy(&shoff, p + 0x28, 8);
    memcpy(&phentsize, p + 0x36, 2);
    memcpy(&phnum, p + 0x38, 2);
    memcpy(&shentsize, p + 0x3a, 2);
    memcpy(&shnum, p + 0x3c, 2);
    size_t a = shoff + (size_t)shentsize * shnum, b = phoff + (size_t)phentsize * phnum;
    return a > b ? a : b;
  }
  uint32_t magic;
  memcpy(&magic, p, 4);
  if (magic == 0xba55ed50u) {
    uint16_t header;
    uint64_t body;
    memcpy(&header, p + 6, 2);
    memcpy(&body, p + 8, 8);
    return header + body;
  }
  return 0;
}

EXPORT CUresult cuModuleLoadData(CUmodule* module, const void* image) {
  if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
  if (!nlibs) {
    fprintf(stderr, "emulator: cuModuleLoadData before emu_set_libraries\n");
    return CUDA_ERROR_INVALID_IMAGE;
  }
  module_t* m = calloc(1, sizeof *m);
  m->image = image;
  m->size = image_size(image);
  *module = (CUmodule)m;
  return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule module) {
  free(module);
  return CUDA_SUCCESS;
}

static void parse_params(func_t* f, const char* spec) {
  /* "p:name,i:name,..." */
  f->nparams = 0;
  while (spec && *spec && f->nparams < MAX_PARAMS) {
    f->pkind[f->nparams] = spec[0];
    const char* name = spec + 2;
    const char* comma = strchr(name, ',');
    size_t len = comma ? (size_t)(comma - name) : strlen(name);
    snprintf(f->pname[f->nparams], sizeof f->pname[0], "%.*s", (int)len, name);
    f->nparams++;
    spec = comma ? comma + 1 : NULL;
  }
}

EXPORT CUresult cuModuleGetFunction(CUfunction* hfunc, CUmodule hmod, const char* name) {
  if (!hfunc || !hmod || !name) return CUDA_ERROR_INVALID_VALUE;
  module_t* m = (module_t*)hmod;
  if (m->size && !memmem(m->image, m->size, name, strlen(name))) return CUDA_ERROR_NOT_FOUND;
  func_t* f = calloc(1, sizeof *f);
  snprintf(f->name, sizeof f->name, "%s", name);
  char sym[256];
  for (int i = 0; i < nlibs; ++i) {
    snprintf(sym, sizeof sym, "emu_entry_%s", name);
    f->entry[i] = (void (*)(void**))dlsym(libs[i], sym);
    if (!f->entry[i]) {
      free(f);
      return CUDA_ERROR_NOT_FOUND;
    }
    if (i == 0) {
      snprintf(sym, sizeof sym, "emu_bound_%s", name);
      const int* bound = dlsym(libs[i], sym);
      f->bound = bound ? *bound : 0;
      snprintf(sym, sizeof sym, "emu_static_%s", name);
      const int* stat = dlsym(libs[i], sym);
      f->static_smem = stat ? (size_t)*stat : 0;
      snprintf(sym, sizeof sym, "emu_params_%s", name);
      const char* const* params = dlsym(libs[i], sym);
      parse_params(f, params ? *params : "");
    }
  }
  *hfunc = (CUfunction)f;
  return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
  func_t* f = (func_t*)hfunc;
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (attrib == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
    /* sm_80: 163 KB per block at most, static memory included */
    if (value < 0 || (size_t)value + f->static_smem > 166912) return CUDA_ERROR_INVALID_VALUE;
    f->max_dyn_smem = value;
    return CUDA_SUCCESS;
  }
  return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig* config, CUfunction f, void** params,
                                 void** extra) {
  if (!config) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = launch((func_t*)f, config->gridDimX, config->gridDimY, config->gridDimZ,
                      config->blockDimX, config->blockDimY, config->blockDimZ,
                      config->sharedMemBytes, params, extra);
  last_error_code = (int)r;
  return r;
}

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                               unsigned int bx, unsigned int by, unsigned int bz, unsigned int smem,
                               CUstream stream, void** params, void** extra) {
  (void)stream;
  CUresult r = launch((func_t*)f, gx, gy, gz, bx, by, bz, smem, params, extra);
  last_error_code = (int)r;
  return r;
}

EXPORT CUresult cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                                       void* address, const cuuint64_t* dims,
                                       const cuuint64_t* strides, const cuuint32_t* box,
                                       const cuuint32_t* element_strides,
                                       CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                       CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill fill) {
  (void)map, (void)type, (void)rank, (void)address, (void)dims, (void)strides, (void)box;
  (void)element_strides, (void)interleave, (void)swizzle, (void)l2, (void)fill;
  return CUDA_ERROR_NOT_SUPPORTED;
}
