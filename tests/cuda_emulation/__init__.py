"""A CPU emulation of the generated CUDA kernels (tests/test_cuda_emulation.py).

- ``kernel_include/cuda_emu.h``: CUDA device code for g++ (threads as fibers, barriers,
  dynamic and static shared memory, half / bfloat16, vector types, wmma);
- ``fake_libcuda.c``, ``fake_libcudart.c``: the driver and runtime TVM's CUDA runtime
  calls, running the kernels on the CPU with race, uninitialised-read, out-of-bounds,
  alignment and barrier checks;
- ``emulator.py``: building those, and running the op's CUDA code path (its target, plan
  and kernels) on CPU tensors;
- ``runner.py``: the emulated process (the fakes stand in for the driver in it);
- ``broken_kernels.cu``: small kernels with one bug each, proving the checks fire.

Run: ``python -m pytest tests/test_cuda_emulation.py`` (nvcc, cc and g++ on the PATH;
~3.7 minutes on 2 cores: the sm_80 library for the head dims the GPU bundle ships, 40 64
72 96 100 128, then every case in two processes); ``MRA_COMPILE_EMULATION_HEAD_DIMS="40
64 128"`` runs fewer (~2.7 minutes). A failure names the check, the operator and its
static parameters, the kernel function (``k_<hash>_kernel[_N]``), the buffer and
element, the threads involved and the line of the library's ``mra_kernels.cu``.

What the emulation takes as the GPU's rules: a __syncthreads() orders every access of a
block before it against every one after it; a __syncwarp() or a wmma operation
(load/store/mma_sync, performed once per warp once all its lanes arrived) does so within
a warp; nothing orders two blocks of a launch; launches are ordered. Uninitialised
registers are found by value (``-ftrivial-auto-var-init`` pattern vs zero, with GCC's
scalar replacement of local arrays off so that it keeps the pattern), uninitialised
memory both by value and by tracking which bytes were written.
"""
