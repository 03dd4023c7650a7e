"""Building ahead-of-time kernel libraries: every kernel in one exported shared object.

``mra-compile build --target llvm|cuda [--arch sm_90] --out DIR`` compiles each operator
(``mra_compile.kernels``) for the requested block sizes, head dims and dtypes (with the
knobs the op would use) into ``DIR/mra_kernels.so`` plus ``DIR/manifest.json``, which
``mra_compile.library`` loads.

What a library carries besides its kernels depends on its target
(``Target.library_extras``): CUDA libraries hold real device code (a build that kept only
CUDA source fails), their generated source, and TVM's runtime libraries in DIR/runtime/,
so that a machine with torch but without TVM runs them (plus the ``apache-tvm-ffi`` wheel
of its Python); CPU libraries carry the OpenMP launcher there (``mra_compile.openmp``).
The manifest's ``files`` record the sha256 of ``mra_kernels.so`` and of every
``runtime/*.so``: nothing of a library is loaded unless it matches.
"""
from __future__ import annotations

import importlib.metadata
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from mra_compile import build, host, kernels, knob_policy, library, targets
from mra_compile.targets import Target

# What ``mra-compile build`` covers unless told: the head dims of the common models.
DEFAULT_BLOCK_SIZES = (32,)
DEFAULT_HEAD_DIMS = (64, 128)


def variants(block_sizes, head_dims, dtypes=("float32",), scratch: bool = False,
             gqa: bool = False, *, target: Target | str | None):
    """(op, static) pairs the forward and backward call on ``target``, for these shapes
    and input dtypes ("float32", "float64", "float16", "bfloat16": the kernels that read
    q, k, v take them in ``Target.io_dtype``, e.g. fp16/bf16 as they are on CUDA; the rest
    compute in float32); ``scratch``: the target's ``scratch_args``; ``gqa``: also the
    grouped-query variants of the kernels that read k, v (``enable_gqa=True`` with fewer
    key/value heads). On targets whose kernels read q, k, v in an attention layer's layout
    (``Target.reads_heads_last``), those variants of the inference calls too."""
    target = targets.get(target)
    m = kernels.HEAD_DIM_MULTIPLE
    padded = sorted({-(-d // m) * m for d in head_dims})
    seen = set()
    for b in block_sizes:
        for D in padded:
            for dt in dtypes:
                compute = "float64" if dt == "float64" else "float32"
                for kernel, io_dtype, micro, split_pv, widened in _calls(target,
                                                                      getattr(torch, dt), b):
                    io = str(io_dtype).removeprefix("torch.")
                    grouped = (False, True) if gqa and (kernel.reads_qkv or kernel.sums_groups) \
                        else (False,)
                    # (inference only: not the recomputed float32-P v variants)
                    layouts = (False, True) if (
                        kernel.heads_last and target.reads_heads_last and not split_pv
                        and micro == target.micro_kernels(io_dtype, block_size=b)) else (False,)
                    for full in ((True, False) if kernel.has_modes else (None,)):
                        for grouped_heads in grouped:
                            for heads_last in layouts:
                                static = kernel.static(b, D, compute, io, full, scratch,
                                                       grouped_heads, micro, split_pv,
                                                       heads_last, widened)
                                key = json.dumps([kernel.name, static], sort_keys=True)
                                if key not in seen:  # e.g. fp16 and fp32 share CPU kernels
                                    seen.add(key)
                                    yield kernel.name, static


# The kernels of ``forward.exact_and_combine`` that also run for the output in float32 of
# a half-precision result (``forward.exact_output_dtype``: the training forward's, or the
# backward's after a forward without ``exact_out``): where the kernels call micro-kernels,
# their variant with P v in float32 (CPU bf16); where they split P (CUDA fp16/bf16:
# ``Target.splits_pv``), that variant; where they widen q, k, v as they read them (CPU
# fp16, bf16 without micro-kernels: ``Target.widens``), their variant with a float32
# output; where they read q, k, v
# in half precision otherwise, the float32 kernels.
RECOMPUTED = ("hires_units", "lowres_out", "hires_rows")


def _calls(target: Target, dtype: torch.dtype, b: int):
    """(kernel, I/O dtype of q, k, v, micro-kernels, split_pv, widened) of every kernel
    call for inputs of ``dtype``."""
    io = target.io_dtype(dtype, b)
    micro = target.micro_kernels(io, block_size=b)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    widened = io != compute and target.widens(io, b)
    for kernel in kernels.KERNELS.values():
        if not kernel.on(target.family):
            continue
        yield kernel, io, micro, False, widened
        if kernel.name not in RECOMPUTED:
            continue
        if micro:
            yield kernel, io, target.micro_kernels(io, True, b), False, False
        elif target.splits_pv(io) or widened:
            yield kernel, io, None, True, widened
        elif io != compute:
            yield kernel, compute, None, False, False


def input_dtype(static: dict) -> torch.dtype:
    """The input dtype whose tuning records a kernel variant ``static`` follows: its q, k,
    v dtype where it reads them in their own, else its compute dtype."""
    return getattr(torch, static.get("io", static.get("dtype", "float32")))


def space_points(op: str, target: Target, shape: tuple[int, int] | None = None) -> list[dict]:
    """Every legal point of ``op``'s tuning search space on ``target`` (``SPACES``,
    ``constraints``; for ``shape``, the head dim padded to 16 and the block size, where
    given), in order."""
    space = target.schedules.SPACES[op]
    points = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    return [p for p in points if target.schedules.constraints(op, p, shape)]


def knob_settings(op: str, static: dict, target: Target, tuning_variants=()) -> list[dict]:
    """The knobs a library builds kernel variant ``(op, static)`` with: every setting the
    op may pick (the tuning records of each sequence-length bucket, 64 ... 128k tokens,
    else the defaults), and where ``tuning_variants`` (see ``build_library``) names its
    input dtype and head dim, every legal point of its search space (not for the
    grouped-query variants)."""
    settings = {}
    dtype = input_dtype(static)
    for p in range(6, 18):
        bucket = knob_policy.shape_bucket(2**p, static["D"], static["b"])
        chosen = knob_policy.resolve_knobs(op, None, bucket, target, dtype)
        settings[json.dumps(chosen, sort_keys=True)] = chosen
    m = kernels.HEAD_DIM_MULTIPLE
    tuned_for = {(str(dt), -(-int(d) // m) * m) for dt, d in tuning_variants}
    if ((str(dtype).removeprefix("torch."), static["D"]) in tuned_for
            and op in kernels.tunable(target) and not static.get("gqa")):
        for point in space_points(op, target, (static["D"], static["b"])):
            settings.setdefault(json.dumps(point, sort_keys=True), point)
    return list(settings.values())


def build_library(out_dir, block_sizes=DEFAULT_BLOCK_SIZES, head_dims=DEFAULT_HEAD_DIMS,
                  dtypes=("float32",), log=print, target: Target | str | None = None,
                  gqa: bool = False, tuning_variants=()) -> Path:
    """Compile every variant for ``target`` (the CPU, or e.g. "cuda-sm_90") into
    ``out_dir``, with ``gqa`` the grouped-query ones too; returns the manifest path.

    ``tuning_variants``: (input dtype name, head dim) pairs for which the tunable kernels
    (``SPACES`` of the target's schedules) are also built at every legal point of their
    search space, for a tuning run on a machine without TVM (``bench/gpu_check.py``)."""
    target = targets.get(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    funcs, entries = {}, []
    for op, static in variants(block_sizes, head_dims, dtypes, target.scratch_args, gqa,
                               target=target):
        for chosen in knob_settings(op, static, target, tuning_variants):
            key = build.kernel_key(op, static, chosen, target)
            name = library.symbol(key)
            funcs[name] = build.scheduled_func(op, static, chosen, target)
            entries.append({"op": op, "static": static, "knobs": chosen, "key": key,
                            "symbol": name})
            log(f"  {op:16s} {json.dumps(static, sort_keys=True)} {json.dumps(chosen)}")
    executable = build.compile_module(funcs, target)
    objects = dict.fromkeys(o for e in entries for o in target.link_objects(e["op"], e["static"]))
    executable.export_library(str(out / library.LIBRARY), options=list(objects))
    manifest = {
        "schema": library.SCHEMA_VERSION,
        "target": target.name,
        "tvm_target": str(target.tvm_target()),
        "host": target.host_key(),
        "tvm": host.tvm_version(),
        "source": host.source_hash(target.family),
        "kernels": entries,
    }
    target.library_extras(out, out / library.LIBRARY, executable, manifest)
    # The binaries a user of the library loads, checked against these before loading.
    binaries = [out / library.LIBRARY, *sorted((out / "runtime").glob("*.so"))]
    manifest["files"] = {p.relative_to(out).as_posix(): host.file_digest(p) for p in binaries}
    path = out / library.MANIFEST
    host.atomic_write(path, lambda tmp: Path(tmp).write_text(
        json.dumps(manifest, indent=1, sort_keys=True)))
    return path


def download_ffi_wheel(out_dir, python: str) -> Path:
    """Download the apache-tvm-ffi wheel of the installed version for ``python`` ("3.12")
    into ``out_dir/wheels`` (its compiled core is per Python version). Needs PyPI."""
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
