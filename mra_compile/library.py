"""Ahead-of-time kernel libraries: every kernel in one exported shared object.

``mra-compile build --target llvm|cuda [--arch sm_90] --out DIR`` compiles each operator
for the requested block sizes, head dims and dtypes (with the knobs the op would use) into
``DIR/mra_kernels.so`` plus ``DIR/manifest.json``. Pointing ``MRA_COMPILE_KERNEL_LIBRARY``
at DIR makes the op take its kernels from there, loaded with the TVM runtime only (no
compiler), before the per-kernel cache and before compiling.

CUDA libraries hold real device code (cubins compiled by nvcc; a build that kept only CUDA
source fails), and DIR/runtime/ carries TVM's runtime libraries, so that a machine with
torch but without TVM runs them (plus the ``apache-tvm-ffi`` wheel of its Python). CPU
libraries carry the OpenMP launcher there (``mra_compile.openmp``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

LIBRARY = "mra_kernels.so"
CUDA_SOURCE = "mra_kernels.cu"  # CUDA libraries: the generated device source, for inspection
MANIFEST = "manifest.json"
ENV = "MRA_COMPILE_KERNEL_LIBRARY"
SCHEMA_VERSION = 1


OPS = ("pool_and_logits", "lowres_out", "hires_units", "bwd_prep", "bwd_dq_units",
       "bwd_dkdv_units", "bwd_lowres", "bwd_finish")


def variants(block_sizes, head_dims, dtypes=("float32",)):
    """(op, static) pairs the forward and backward call, for these shapes and input
    dtypes ("float32", "float64", and on CUDA "float16", "bfloat16", whose kernels that
    read q, k, v take them as they are and the rest compute in float32)."""
    from mra_compile.forward import HEAD_DIM_MULTIPLE, IO_OPS

    padded = sorted({-(-d // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE for d in head_dims})
    seen = set()
    for b in block_sizes:
        for D in padded:
            for dt in dtypes:
                extra = {"dtype": "float64"} if dt == "float64" else {}
                io = {"io": dt} if dt in ("float16", "bfloat16") else {}
                for op in OPS + ("hires_rows",):
                    for full in ((True, False) if op == "hires_rows" else (None,)):
                        static = dict(b=b, D=D, **extra, **(io if op in IO_OPS else {}))
                        if full is not None:
                            static["full"] = full
                        key = json.dumps([op, static], sort_keys=True)
                        if key not in seen:  # fp16 and bf16 share the float32 backward
                            seen.add(key)
                            yield op, static


def symbol(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:20]


def build_library(out_dir, block_sizes=(32,), head_dims=(64,), dtypes=("float32",),
                  log=print, target: str = "llvm") -> Path:
    """Compile every variant for ``target`` ("llvm" or "cuda-sm_90") into ``out_dir``;
    returns the manifest path."""
    from mra_compile import build, cuda_toolchain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    funcs, entries = {}, []
    for op, static in variants(block_sizes, head_dims, dtypes):
        # Every knob setting the op may pick for these shapes: the tuning records of each
        # sequence-length bucket (64 ... 128k tokens), else the defaults.
        settings = {}
        for p in range(6, 18):
            knobs = build.resolve_knobs(op, None, build.shape_bucket(2**p, static["D"],
                                                                      static["b"]), target)
            settings[json.dumps(knobs, sort_keys=True)] = knobs
        for knobs in settings.values():
            key = build.kernel_key(op, static, knobs, target)
            name = symbol(key)
            funcs[name] = build.scheduled_func(op, static, knobs, target)
            entries.append({"op": op, "static": static, "knobs": knobs, "key": key,
                            "symbol": name})
            log(f"  {op:16s} {json.dumps(static, sort_keys=True)} {json.dumps(knobs)}")
    executable = build.compile_module(funcs, target)
    executable.export_library(str(out / LIBRARY))
    manifest = {
        "schema": SCHEMA_VERSION,
        "target": target,
        "tvm_target": str(build.tvm_target(target)),
        "host": build.host_of(target),
        "tvm": build.tvm_version(),
        "source": build.source_hash(target),
        "kernels": entries,
    }
    if target == "llvm":  # its kernels' parallel loops run on torch's OpenMP threads
        from mra_compile import openmp

        openmp.build_into(out / "runtime")
    else:
        images = cuda_toolchain.check_device_code(out / LIBRARY, build.cuda_arch(target))
        manifest["device_images"] = len(images)
        (out / CUDA_SOURCE).write_text(cuda_toolchain.device_source(executable))
        runtime = out / "runtime"
        runtime.mkdir(exist_ok=True)
        for lib in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
            shutil.copy2(cuda_toolchain.runtime_dir() / lib, runtime / lib)
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def download_ffi_wheel(out_dir, python: str) -> Path:
    """Download the apache-tvm-ffi wheel of the installed version for ``python`` ("3.12")
    into ``out_dir/wheels`` (its compiled core is per Python version). Needs PyPI."""
    import importlib.metadata
    import platform
    import subprocess
    import sys

    version = importlib.metadata.version("apache-tvm-ffi")
    wheels = Path(out_dir) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    tag = python.replace(".", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={version}", "--no-deps",
         "--only-binary=:all:", "--python-version", python,
         "--platform", f"manylinux_2_28_{platform.machine()}", "-d", str(wheels)],
        capture_output=True, text=True)
    found = sorted(wheels.glob(f"apache_tvm_ffi-{version}-cp{tag}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download apache-tvm-ffi {version} for Python {python}: "
                           f"{proc.stderr.strip()[-500:]}")
    return found[-1]


def built_with_tvm() -> str | None:
    """The TVM version of the library in ``MRA_COMPILE_KERNEL_LIBRARY`` (None: no library)."""
    for directory in directories():
        try:
            return json.loads((Path(directory) / MANIFEST).read_text()).get("tvm")
        except (OSError, ValueError):
            continue
    return None


@functools.lru_cache(maxsize=None)
def _load(directory: str):
    """(module, {key: symbol}) of the library in ``directory``, or None when unusable."""
    import tvm_ffi

    from mra_compile import build

    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    target = manifest.get("target", "llvm")
    if (manifest.get("schema") != SCHEMA_VERSION or manifest.get("tvm") != build.tvm_version()
            or manifest.get("host") != build.host_of(target)
            or manifest.get("source") != build.source_hash(target)):
        return None  # built for another CPU, TVM or source: fall back to the cache
    if target != "llvm":
        from mra_compile import cuda_toolchain

        cuda_toolchain.ensure_cuda_runtime(allow_stub=True)
    module = tvm_ffi.load_module(str(Path(directory) / LIBRARY))
    if target == "llvm":
        from mra_compile import openmp

        openmp.install(Path(directory) / LIBRARY)  # parallel loops on torch's OpenMP threads
    return module, {e["key"]: e["symbol"] for e in manifest["kernels"]}


def directories() -> list[str]:
    """The library directories in ``MRA_COMPILE_KERNEL_LIBRARY`` (``os.pathsep``-separated:
    a CPU and a CUDA library can be used together)."""
    return [d for d in os.environ.get(ENV, "").split(os.pathsep) if d]


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
