"""Loading ahead-of-time kernel libraries (built by ``mra_compile.aot``).

Pointing ``MRA_COMPILE_KERNEL_LIBRARY`` at a directory DIR holding ``mra_kernels.so`` and
``manifest.json`` makes the op take its kernels from there, loaded with the TVM runtime
only (no compiler), before the per-kernel cache and before compiling. A library built
for another CPU, TVM version or operator/schedule source, or whose ``mra_kernels.so``
does not match the sha256 its manifest records, is ignored with a
``KernelLibraryWarning``.

A kernel no library has (``missing``) is taken from the kernel cache or compiled, with a
``KernelLibraryWarning`` once per shape; with ``MRA_COMPILE_LIBRARY_ONLY=1`` it is a
``KernelLibraryError`` instead (nothing compiled, nothing read from or written to the
kernel cache).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path

from mra_compile import host, targets
from mra_compile.targets import cuda

LIBRARY = "mra_kernels.so"
CUDA_SOURCE = cuda.SOURCE_FILE  # CUDA libraries: the generated device source, for inspection
CUDA_REPORT = cuda.REPORT_FILE  # ... and each kernel's registers, spills, mma instructions
MANIFEST = host.LIBRARY_MANIFEST
ENV = host.LIBRARY_ENV
ONLY_ENV = "MRA_COMPILE_LIBRARY_ONLY"  # "1": a kernel no library has is an error
# 2: the manifest's "files" record the sha256 of mra_kernels.so and of runtime/*.so.
SCHEMA_VERSION = 2


class KernelLibraryWarning(UserWarning):
    """A kernel library is ignored, or lacks a kernel the op needs (which is then taken
    from the kernel cache or compiled)."""


class KernelLibraryError(RuntimeError):
    """``MRA_COMPILE_LIBRARY_ONLY=1`` and no kernel library has a kernel the op needs."""


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


_IGNORED: dict[str, str] = {}  # library directory -> why it is not used


def _problem(directory: str, manifest: dict) -> str | None:
    """Why the library in ``directory`` (``manifest``) cannot be used here, or None."""
    try:
        target = targets.get(manifest.get("target", targets.CPU.name))
    except ValueError as e:
        return str(e)
    if manifest.get("schema") != SCHEMA_VERSION:
        return (f"manifest schema {manifest.get('schema')!r}, this mra_compile reads "
                f"{SCHEMA_VERSION}: rebuild it with `mra-compile build`")
    if manifest.get("tvm") != host.tvm_version():
        return f"built with TVM {manifest.get('tvm')}, this is {host.tvm_version()}"
    if manifest.get("host") != target.host_key():
        return (f"built for another host ({manifest.get('host')!r}, this is "
                f"{target.host_key()!r})")
    if manifest.get("source") != host.source_hash(target.family):
        return "built from other operator or schedule sources"
    # Checked before loading: a truncated or corrupt shared object kills the process.
    if host.library_file(directory, LIBRARY) is None:
        return f"{LIBRARY} does not match the sha256 its manifest records (truncated or corrupt)"
    return None


@functools.cache
def _load(directory: str):
    """(module, {key: symbol}, the kernel variants' flags it has: "heads_last",
    "widened") of the library in ``directory``, or None when unusable (said once, by a
    ``KernelLibraryWarning``)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        why = _problem(directory, manifest)
    except (OSError, ValueError, AttributeError) as e:
        why = f"no readable {MANIFEST} ({e})"
    if why is not None:
        _IGNORED[directory] = why
        warnings.warn(f"mra_compile: kernel library {directory} ({ENV}) is ignored: {why}",
                      KernelLibraryWarning, stacklevel=4)
        return None
    import tvm_ffi  # (TVM is loaded only when a kernel is first needed)

    target = targets.get(manifest.get("target", targets.CPU.name))
    target.prepare_runtime()
    path = Path(directory) / LIBRARY
    module = tvm_ffi.load_module(str(path))
    target.after_load(path)
    return (module, {e["key"]: e["symbol"] for e in manifest["kernels"]},
            frozenset(flag for e in manifest["kernels"] for flag in ("heads_last", "widened")
                      if e.get("static", {}).get(flag)))


def has_heads_last() -> bool:
    """Whether a library in ``MRA_COMPILE_KERNEL_LIBRARY`` that this process can use has
    the kernels' variants that read q, k, v in an attention layer's layout
    (``static["heads_last"]``; ``mra-compile build`` makes them for targets that have
    them)."""
    return _has("heads_last")


def has_widened() -> bool:
    """Whether a library in ``MRA_COMPILE_KERNEL_LIBRARY`` that this process can use has
    the CPU's variants that read float16 (or bfloat16) q, k, v in place
    (``static["widened"]``; ``mra-compile build --dtypes float16 ...`` makes them)."""
    return _has("widened")


def _has(flag: str) -> bool:
    return any(flag in loaded[2] for loaded in map(_load, directories()) if loaded is not None)


def lookup(key: str):
    """The libraries' kernel for ``key`` (see ``build.kernel_key``), or None."""
    for directory in directories():
        loaded = _load(directory)
        if loaded is None:
            continue
        module, symbols, _ = loaded
        name = symbols.get(key)
        if name is not None:
            return module[name]
    return None


_MISS_LOCK = threading.Lock()
_MISSED: set[tuple] = set()  # shapes already warned about


def only() -> bool:
    """Whether ``MRA_COMPILE_LIBRARY_ONLY`` forbids kernels from anywhere but a library."""
    return os.environ.get(ONLY_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def missing(op: str, static: dict, target) -> None:
    """Called when ``lookup`` found no kernel ``op`` ``static`` for ``target``: nothing
    without libraries (and without ``MRA_COMPILE_LIBRARY_ONLY``); a
    ``KernelLibraryError`` with ``MRA_COMPILE_LIBRARY_ONLY=1``; else a
    ``KernelLibraryWarning`` once per shape (target, block size, head dim, dtype), as
    the kernel will be taken from the kernel cache or compiled."""
    dirs = directories()
    if not dirs and not only():
        return
    dtype = static.get("io", static.get("dtype", "float32"))
    shape = (target.name, static.get("b"), static.get("D"), static.get("dtype", "float32"),
             bool(static.get("gqa")))
    ignored = "; ".join(f"{d} ignored: {_IGNORED[d]}" for d in dirs if d in _IGNORED)
    what = (f"no kernel library has {op} for {target.name}, block size {static.get('b')}, "
            f"head dim {static.get('D')} (padded to a multiple of 16), {dtype}"
            + (", grouped key/value heads" if static.get("gqa") else "")
            + (f" ({ignored})" if ignored else ""))
    cover = (f"`mra-compile build --out DIR --block-sizes {static.get('b')} "
             f"--head-dims {static.get('D')}"
             + (" --grouped-heads" if static.get("gqa") else "")
             + (f" --dtypes {dtype}" if dtype != "float32" else "")
             + f"` (for {target.name}) covers it")
    if only():
        where = f"{ENV}={os.environ.get(ENV, '')!r}" if dirs else f"{ENV} is not set"
        raise KernelLibraryError(
            f"mra_compile: {what} ({where}), and {ONLY_ENV}=1 forbids compiling it or "
            f"taking it from the kernel cache; {cover}")
    with _MISS_LOCK:
        if shape in _MISSED:
            return
        _MISSED.add(shape)
    warnings.warn(f"mra_compile: {what}; it is taken from the kernel cache or compiled "
                  f"with TVM (once per shape: this warning is not repeated). {cover}; "
                  f"{ONLY_ENV}=1 makes this an error.", KernelLibraryWarning, stacklevel=4)
