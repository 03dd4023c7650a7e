"""Loading the TVM runtime that runs exported kernels (no TVM compiler needed).

``tvm_ffi.load_module`` loads an exported kernel module once ``libtvm_runtime.so`` is in
the process. It comes from the installed ``tvm`` package, or, on a machine with torch but
without TVM, from the ``runtime/`` folder a kernel library carries (``mra-compile build``).
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from mra_compile import host, openmp

RUNTIME_DIR_ENV = "MRA_COMPILE_TVM_RUNTIME_DIR"

_LOCK = threading.Lock()
_LOADED = False


def runtime_dir() -> Path:
    """The directory holding ``libtvm_runtime.so`` (and ``libtvm_runtime_cuda.so``).

    ``$MRA_COMPILE_TVM_RUNTIME_DIR``, else the installed ``tvm`` package, else the
    ``runtime/`` folder of a kernel library in ``$MRA_COMPILE_KERNEL_LIBRARY`` whose
    runtime libraries all match the sha256 its manifest records (a truncated one would
    kill the process that loads it).
    """
    env = os.environ.get(RUNTIME_DIR_ENV)
    if env:
        return Path(env)
    spec = host.tvm_spec()
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / "lib"
    for library in host.kernel_library_dirs():
        shipped = Path(library) / "runtime"
        names = [p.name for p in shipped.glob("libtvm_runtime*.so")]
        if "libtvm_runtime.so" in names and all(
                host.library_file(library, f"runtime/{name}") is not None for name in names):
            return shipped
    raise ImportError(
        "the TVM runtime was not found: install apache-tvm, or set "
        f"{RUNTIME_DIR_ENV} (or {host.LIBRARY_ENV} to a library built with "
        "`mra-compile build`, which carries the runtime)")


def load() -> None:
    """Make ``tvm_ffi.load_module`` able to load exported TVM kernels (once).

    Also sizes TVM's own thread pool like torch's, before the pool starts (it is used
    where the OpenMP launcher is not: ``mra_compile.openmp``).
    """
    global _LOADED
    if _LOADED:  # (every call of the op asks: no lock once it is done)
        return
    with _LOCK:
        if _LOADED:
            return
        if "TVM_NUM_THREADS" not in os.environ:
            os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())
        # TVM's workers otherwise spin after each kernel, on the cores torch's next op
        # (top-k, padding) needs: measured 2-15x slowdowns of those ops on 2 cores.
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which the runtime links against)

        ctypes.CDLL(str(runtime_dir() / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
        _LOADED = True


def ensure() -> None:
    """Load the runtime (once); CPU kernels take torch's current thread count."""
    load()
    openmp.set_threads(torch.get_num_threads())
