"""Ahead-of-time kernel libraries: every kernel in one exported shared object.

``mra-compile build --target llvm --out DIR`` compiles each operator for the requested
block sizes and head dims (with the knobs the op would use) into ``DIR/mra_kernels.so``
plus ``DIR/manifest.json``. Pointing ``MRA_COMPILE_KERNEL_LIBRARY`` at DIR makes the op
take its kernels from there, loaded with the TVM runtime only (no compiler), before the
per-kernel cache and before compiling.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

LIBRARY = "mra_kernels.so"
MANIFEST = "manifest.json"
ENV = "MRA_COMPILE_KERNEL_LIBRARY"
SCHEMA_VERSION = 1


def variants(block_sizes, head_dims, dtypes=("float32",)):
    """(op, static) pairs the forward and backward call, for these shapes."""
    from mra_compile.forward import HEAD_DIM_MULTIPLE

    padded = sorted({-(-d // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE for d in head_dims})
    ops = ("pool_and_logits", "lowres_out", "hires_units", "bwd_prep", "bwd_dq_units",
           "bwd_dkdv_units", "bwd_lowres", "bwd_finish")
    for b in block_sizes:
        for D in padded:
            for dt in dtypes:
                extra = {} if dt == "float32" else {"dtype": dt}
                for op in ops:
                    yield op, dict(b=b, D=D, **extra)
                for full in (True, False):
                    yield "hires_rows", dict(b=b, D=D, full=full, **extra)


def symbol(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:20]


def build_library(out_dir, block_sizes=(32,), head_dims=(64,), dtypes=("float32",),
                  log=print) -> Path:
    """Compile every variant into ``out_dir``; returns the manifest path."""
    import tvm
    from tvm import s_tir, te

    from mra_compile import build, operators
    from mra_compile.schedules import cpu

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    funcs, entries = {}, []
    for op, static in variants(block_sizes, head_dims, dtypes):
        # Every knob setting the op may pick for these shapes: the tuning records of each
        # sequence-length bucket (64 ... 128k tokens), else the defaults.
        settings = {}
        for p in range(6, 18):
            knobs = build.resolve_knobs(op, None, build.shape_bucket(2**p, static["D"],
                                                                      static["b"]))
            settings[json.dumps(knobs, sort_keys=True)] = knobs
        for knobs in settings.values():
            key = build.kernel_key(op, static, knobs)
            name = symbol(key)
            op_knobs = {k: v for k, v in knobs.items() if k in cpu.OPERATOR_KNOBS.get(op, ())}
            prim = te.create_prim_func(getattr(operators, op)(**static, **op_knobs))
            sch = s_tir.Schedule(prim)
            extra = {"full": static["full"]} if "full" in static else {}
            getattr(cpu, op)(sch, **knobs, **extra)
            funcs[name] = sch.mod["main"].with_attr("global_symbol", name)
            entries.append({"op": op, "static": static, "knobs": knobs, "key": key,
                            "symbol": name})
            log(f"  {op:16s} {json.dumps(static, sort_keys=True)} {json.dumps(knobs)}")
    with build.llvm_target() as target:
        executable = tvm.compile(tvm.IRModule(funcs), target=target)
    executable.export_library(str(out / LIBRARY))
    manifest = {
        "schema": SCHEMA_VERSION,
        "target": str(target),
        "host": build.host_fingerprint(),
        "tvm": build.tvm_version(),
        "source": build.source_hash(),
        "kernels": entries,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


@functools.lru_cache(maxsize=None)
def _load(directory: str):
    """(module, {key: symbol}) of the library in ``directory``, or None when unusable."""
    import tvm_ffi

    from mra_compile import build

    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (manifest.get("schema") != SCHEMA_VERSION or manifest.get("tvm") != build.tvm_version()
            or manifest.get("host") != build.host_fingerprint()
            or manifest.get("source") != build.source_hash()):
        return None  # built for another CPU, TVM or source: fall back to the cache
    module = tvm_ffi.load_module(str(Path(directory) / LIBRARY))
    return module, {e["key"]: e["symbol"] for e in manifest["kernels"]}


def lookup(key: str):
    """The library's kernel for ``key`` (see ``build.kernel_key``), or None."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    loaded = _load(directory)
    if loaded is None:
        return None
    module, symbols = loaded
    name = symbols.get(key)
    return None if name is None else module[name]
