"""Loading ahead-of-time kernel libraries (built by ``mra_compile.aot``).

Pointing ``MRA_COMPILE_KERNEL_LIBRARY`` at a directory DIR holding ``mra_kernels.so`` and
``manifest.json`` makes the op take its kernels from there, loaded with the TVM runtime
only (no compiler), before the per-kernel cache and before compiling. A library built
for another CPU, TVM version or operator/schedule source is ignored.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from mra_compile import host, targets
from mra_compile.targets import cuda

LIBRARY = "mra_kernels.so"
CUDA_SOURCE = cuda.SOURCE_FILE  # CUDA libraries: the generated device source, for inspection
MANIFEST = host.LIBRARY_MANIFEST
ENV = host.LIBRARY_ENV
SCHEMA_VERSION = 1


def symbol(key: str) -> str:
    """The library symbol of the kernel ``key`` (``build.kernel_key``)."""
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:20]


def built_with_tvm() -> str | None:
    """The TVM version of the library in ``MRA_COMPILE_KERNEL_LIBRARY`` (None: no library)."""
    return host.library_tvm_version()


def directories() -> list[str]:
    """The library directories in ``MRA_COMPILE_KERNEL_LIBRARY`` (``os.pathsep``-separated:
    a CPU and a CUDA library can be used together)."""
    return host.kernel_library_dirs()


@functools.cache
def _load(directory: str):
    """(module, {key: symbol}) of the library in ``directory``, or None when unusable."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        target = targets.get(manifest.get("target", targets.CPU.name))
    except (OSError, ValueError):
        return None
    if (manifest.get("schema") != SCHEMA_VERSION or manifest.get("tvm") != host.tvm_version()
            or manifest.get("host") != target.host_key()
            or manifest.get("source") != host.source_hash(target.family)):
        return None  # built for another CPU, TVM or source: fall back to the cache
    import tvm_ffi  # (TVM is loaded only when a kernel is first needed)

    target.prepare_runtime()
    path = Path(directory) / LIBRARY
    module = tvm_ffi.load_module(str(path))
    target.after_load(path)
    return module, {e["key"]: e["symbol"] for e in manifest["kernels"]}


def lookup(key: str):
    """The libraries' kernel for ``key`` (see ``build.kernel_key``), or None."""
    for directory in directories():
        loaded = _load(directory)
        if loaded is None:
            continue
        module, symbols = loaded
        name = symbols.get(key)
        if name is not None:
            return module[name]
    return None
