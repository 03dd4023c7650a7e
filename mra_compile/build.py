"""Building, caching and loading the compiled kernels.

A kernel is identified by its operator, its static parameters (block edge, padded
head dim, ...), the schedule knobs and the target. It is built on first use, kept in
memory, and exported to a disk cache so that a second process loads it in
milliseconds with the TVM *runtime* only: the TVM compiler (``import tvm``, ~3 s) is
imported only when something must actually be compiled.

Cache directory: ``$MRA_COMPILE_CACHE_DIR``, else ``~/.cache/mra_compile``. Entries are
keyed by operator, static parameters, dtype, knobs, target, TVM version and a hash of
the operator and schedule sources, so editing either rebuilds.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from mra_compile import records

_LOCK = threading.RLock()
_MEMORY: dict[str, object] = {}  # by full key
_FAST: dict[tuple, object] = {}  # by call arguments: skips hashing the key on every call
_PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """Where exported kernels live (``MRA_COMPILE_CACHE_DIR`` overrides)."""
    env = os.environ.get("MRA_COMPILE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mra_compile"


@functools.lru_cache(maxsize=None)
def tvm_version() -> str:
    """The installed apache-tvm; without it (a runtime-only deployment) the version the
    kernel library in ``MRA_COMPILE_KERNEL_LIBRARY`` was built with."""
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        from mra_compile import library

        return library.built_with_tvm() or "not-installed"


def target_of(device) -> str:
    """The kernel target of a torch device: "llvm", or "cuda-sm_90" (the device's arch)."""
    if device.type == "cpu":
        return "llvm"
    if device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm_{major}{minor}"
    raise ValueError(f"no kernels for device type {device.type!r} (expected cpu or cuda)")


def cuda_arch(target: str) -> str:
    """The GPU architecture of a CUDA kernel target: "cuda-sm_90" -> "sm_90"."""
    return target.removeprefix("cuda-")


def compile_c_library(source: str, out: Path, flags: tuple[str, ...] = ()) -> Path:
    """Compile C ``source`` into the shared library ``out`` with the system C compiler
    (``$CC``, cc or gcc), once: an existing ``out`` is kept. Written to a temporary name
    and renamed, so concurrent builders never see half a file."""
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError(f"no C compiler (cc or gcc) to build {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.c"
        src.write_text(source)
        built = Path(tmp) / out.name
        subprocess.run([cc, "-shared", "-fPIC", "-O2", *flags, "-o", str(built), str(src)],
                       check=True, capture_output=True)
        staged = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copyfile(built, staged)
        os.replace(staged, out)
    return out


def _schedules(target: str):
    from mra_compile.schedules import cpu, cuda

    return cuda if target.startswith("cuda") else cpu


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def host_fingerprint() -> str:
    """Identifies the CPU a kernel was compiled for, without importing TVM."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ",".join(sorted(cpu_flags()))
    return f"{platform.machine()}|{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def host_of(target: str) -> str:
    """The host a kernel of ``target`` is tied to: this CPU for llvm kernels; for CUDA
    kernels only the machine type (their host side is generic code for it)."""
    return host_fingerprint() if target == "llvm" else platform.machine()


def default_vector_width() -> int:
    """float32 lanes of the widest vector unit: 16 with AVX-512, else 8."""
    return 16 if "avx512f" in cpu_flags() else 8


@functools.lru_cache(maxsize=None)
def _source_hash(family: str = "cpu") -> str:
    h = hashlib.sha256()
    for path in (_PACKAGE_DIR / "operators.py", _schedule_dir() / f"{family}.py"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _schedule_dir() -> Path:
    spec = importlib.util.find_spec("mra_compile.schedules")
    if spec is None or spec.origin is None:
        raise ImportError("mra_compile.schedules is missing: install the package (pip install -e .)")
    return Path(spec.origin).parent


def llvm_target():
    """The TVM target for this host's CPU (``MRA_COMPILE_TARGET`` JSON overrides)."""
    import tvm

    env = os.environ.get("MRA_COMPILE_TARGET")
    if env:
        return tvm.target.Target(json.loads(env))
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


_RUNTIME_READY = False


def ensure_runtime():
    """Load the TVM runtime (once); CPU kernels take torch's current thread count."""
    with _LOCK:
        _load_runtime()
    import torch

    from mra_compile import openmp

    openmp.set_threads(torch.get_num_threads())


def _load_runtime():
    """Make ``tvm_ffi.load_module`` able to load exported TVM kernels.

    Also sizes TVM's thread pool like torch's, before the pool starts: the two pools
    take turns (one kernel at a time), so each may use every core torch was told to,
    as long as neither spins while the other works.
    """
    global _RUNTIME_READY
    if _RUNTIME_READY:
        return
    if "TVM_NUM_THREADS" not in os.environ:
        import torch

        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())
    # TVM's workers otherwise spin after each kernel, on the cores torch's next op
    # (top-k, padding) needs: measured 2-15x slowdowns of those ops on 2 cores.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which the runtime links against)

    from mra_compile import cuda_toolchain

    lib = cuda_toolchain.runtime_dir() / "libtvm_runtime.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _RUNTIME_READY = True


def source_hash(target: str = "llvm") -> str:
    """Hash of the operator and schedule sources (part of every kernel's key)."""
    return _source_hash("cuda" if target.startswith("cuda") else "cpu")


def kernel_key(op: str, static: dict, knobs: dict, target: str = "llvm") -> str:
    """The name a kernel has in the cache and in AOT libraries (``mra_compile.library``)."""
    return _key(op, static, knobs, target)[0]


def _key(op: str, static: dict, knobs: dict, target: str) -> tuple[str, dict]:
    desc = {
        "op": op,
        "static": static,
        "dtype": "float32",
        "knobs": knobs,
        "target": target,
        "host": host_of(target),
        "tvm": tvm_version(),
        "source": source_hash(target),
        "target_override": os.environ.get("MRA_COMPILE_TARGET", "") if target == "llvm" else "",
    }
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
    return f"{op}-{digest}", desc


def default_knobs(op: str, target: str = "llvm") -> dict:
    knobs = dict(_schedules(target).KNOBS[op])
    if "vec" in knobs and target == "llvm":
        knobs["vec"] = default_vector_width()
    return knobs


def scheduled_func(op: str, static: dict, knobs: dict, target: str = "llvm"):
    """The operator's PrimFunc with the target's schedule applied (not yet compiled)."""
    from tvm import s_tir, te

    from mra_compile import operators

    schedules = _schedules(target)
    op_knobs = {k: v for k, v in knobs.items() if k in schedules.OPERATOR_KNOBS.get(op, ())}
    params = getattr(operators, op)(**static, **op_knobs)
    sch = s_tir.Schedule(te.create_prim_func(params))
    extra = {"full": static["full"]} if "full" in static else {}
    getattr(schedules, op)(sch, **knobs, **extra)
    return sch.mod["main"]


def tvm_target(target: str):
    """The TVM target of a kernel target name ("llvm", "cuda-sm_90")."""
    import tvm

    if target == "llvm":
        return llvm_target()
    return tvm.target.Target({"kind": "cuda", "arch": cuda_arch(target)})


def compile_module(funcs: dict, target: str = "llvm"):
    """Compile ``{symbol: PrimFunc}`` for ``target``; returns the TVM executable. CUDA
    device code is compiled with nvcc, on machines without a driver too
    (``mra_compile.cuda_toolchain``)."""
    if target != "llvm":
        from mra_compile import cuda_toolchain

        cuda_toolchain.prepare_compiler()
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with tvm_target(target) as tgt:
        return tvm.compile(mod, target=tgt)


def compile_kernel(op: str, static: dict, knobs: dict, target: str = "llvm"):
    """Build one kernel with the TVM compiler; returns the TVM executable."""
    return compile_module({"main": scheduled_func(op, static, knobs, target)}, target)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cached(path: Path, desc: dict):
    """The cached module, or None when absent or not provably intact.

    The sidecar ``.json`` (written last) must carry this kernel's key and the sha256 of
    the ``.so``: loading a truncated shared object can kill the process (SIGBUS) before
    any exception, so nothing is loaded unless its digest matches.
    """
    import tvm_ffi

    meta = path.with_suffix(".json")
    try:
        record = json.loads(meta.read_text())
        if record.get("key") != desc or record.get("sha256") != _file_digest(path):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return tvm_ffi.load_module(str(path))
    except Exception:  # e.g. built by an incompatible runtime: rebuild
        return None


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile_to_cache(op: str, static: dict, knobs: dict, path: Path, desc: dict, target: str):
    import tvm_ffi

    executable = compile_kernel(op, static, knobs, target)
    path.parent.mkdir(parents=True, exist_ok=True)

    def export(tmp):
        executable.export_library(tmp)
        if target != "llvm":  # never cache a module that kept only CUDA source
            from mra_compile import cuda_toolchain

            cuda_toolchain.check_device_code(Path(tmp), cuda_arch(target))

    _atomic_write(path, export)
    record = {"key": desc, "sha256": _file_digest(path)}
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return tvm_ffi.load_module(str(path))


def shape_bucket(N: int, D: int, block_size: int = 32) -> str:
    """The tuning-record bucket of a call: ``"N4096-D64-b32"``.

    N: the sequence length padded to whole blocks, rounded to the nearest power of two
    (in log scale); D: the head dim padded to 16, as the kernels are compiled.
    """
    b = max(int(block_size), 1)
    n_pad = max(-(-int(N) // b) * b, b)
    d_pad = max(-(-int(D) // 16) * 16, 16)
    return f"N{2 ** round(math.log2(n_pad))}-D{d_pad}-b{b}"


def resolve_knobs(op: str, knobs: dict | None = None, bucket: str | None = None,
                  target: str = "llvm") -> dict:
    """The knobs a kernel is built with: the defaults, overridden by the tuning record of
    this host and TVM version for the shape ``bucket`` (``shape_bucket``; the record of
    the nearest bucket when there is none for it, or when ``bucket`` is None), overridden
    by ``knobs``. See ``mra_compile.records``. CUDA kernels have no tuning records yet:
    the defaults of ``schedules/cuda.py`` overridden by ``knobs``."""
    base = default_knobs(op, target)
    if knobs is not None and base.keys() <= knobs.keys():
        return {**base, **knobs}  # complete: no record can change it
    if target != "llvm":
        return {**base, **(knobs or {})}
    match = records.lookup(op, bucket)
    if match is not None:
        base.update(match.knobs)
    if knobs:
        base.update(knobs)
    return base


_SHAPE_KNOBS: dict[tuple, dict] = {}


def knobs_for_shape(knobs: dict | None, N: int, D: int, block_size: int = 32,
                    target: str = "llvm") -> dict:
    """``{op: complete knobs}`` of every tunable operator for a call of this shape: the
    per-operator ``knobs`` given (``{op: {knob: value}}``, may be None or partial) over the
    tuning record of the shape's bucket over the defaults. Entries for other operators
    are passed on unchanged. Cached per bucket when ``knobs`` is empty."""
    bucket = shape_bucket(N, D, block_size)
    if not knobs:
        key = (bucket, records.token(), target)
        resolved = _SHAPE_KNOBS.get(key)
        if resolved is None:
            resolved = _SHAPE_KNOBS[key] = {
                op: resolve_knobs(op, None, bucket, target) for op in records.tunable_ops()}
        return {op: dict(k) for op, k in resolved.items()}
    out = {op: resolve_knobs(op, knobs.get(op), bucket, target) for op in records.tunable_ops()}
    out.update((op, k) for op, k in knobs.items() if op not in out)
    return out


_TRACE: list | None = None


@contextlib.contextmanager
def trace_kernel_calls():
    """Record every kernel call made inside the block (for the tuner and tests): yields a
    list that receives ``{"op", "knobs" (as passed), "resolved" (the knobs the kernel was
    built with), "static", "args"}`` per call (arguments by reference, after the call)."""
    global _TRACE
    calls, previous = [], _TRACE
    _TRACE = calls
    try:
        yield calls
    finally:
        _TRACE = previous


def _traced(calls, op, knobs, static, fn, target):
    resolved = resolve_knobs(op, knobs, target=target)

    def call(*args):
        result = fn(*args)
        calls.append({"op": op, "knobs": None if knobs is None else dict(knobs),
                      "resolved": resolved, "static": dict(static), "target": target,
                      "args": args})
        return result

    return call


def kernel(op: str, knobs: dict | None = None, target: str = "llvm", **static):
    """The compiled kernel ``op`` for ``target`` ("llvm" or "cuda-sm_XX", see
    ``target_of``): a callable taking torch tensors (CUDA kernels run on torch's current
    stream of the tensors' device).

    ``knobs`` may be partial or None: see ``resolve_knobs`` (the tuning record used is
    that of the nearest bucket; ``knobs_for_shape`` gives complete per-shape knobs).
    """
    if _TRACE is not None:
        return _traced(_TRACE, op, knobs, static, _kernel(op, knobs, static, target), target)
    return _kernel(op, knobs, static, target)


def _kernel(op: str, knobs: dict | None, static: dict, target: str = "llvm"):
    # The records' token keeps the fast path right when the tuning records change.
    # (The cache directory enters as its environment variable: resolving ~ costs ~10 us.)
    fast = (op, tuple(sorted(static.items())), tuple(sorted((knobs or {}).items())),
            os.environ.get("MRA_COMPILE_CACHE_DIR"), records.token(), target)
    fn = _FAST.get(fast)
    if fn is not None:
        return fn
    knobs = resolve_knobs(op, knobs, target=target)
    name, desc = _key(op, static, knobs, target)
    with _LOCK:
        fn = _MEMORY.get(name)
        if fn is not None:
            _FAST[fast] = fn
            return fn
        _load_runtime()
        from mra_compile import cuda_toolchain, library

        if target != "llvm":
            cuda_toolchain.ensure_cuda_runtime(allow_stub=True)

        fn = library.lookup(name)  # an ahead-of-time library first, when one is set
        origin, path = "library", os.environ.get(library.ENV, "")
        if fn is None:
            path = cache_dir() / f"{name}.so"
            module = _load_cached(path, desc)
            origin = "disk"
            if module is None:
                if cuda_toolchain.tvm_spec() is None:
                    raise RuntimeError(
                        f"no prebuilt kernel {op} {static} for {target}: the kernel library "
                        f"({library.ENV}={os.environ.get(library.ENV, '')!r}) lacks it and "
                        "apache-tvm is not installed to compile it; build one with "
                        "`mra-compile build` for these shapes and dtypes")
                origin = "compiled"
                module = _compile_to_cache(op, static, knobs, path, desc, target)
            if target == "llvm":
                from mra_compile import openmp

                openmp.install(path)  # parallel loops on torch's OpenMP threads
            fn = module["main"]
        _MEMORY[name] = _FAST[fast] = fn
        _EVENTS.append({"op": op, "origin": origin, "path": str(path), **desc})
        return fn


_EVENTS: list[dict] = []


def cache_events() -> list[dict]:
    """One record per kernel this process loaded: its key and whether it was
    ``"compiled"``, loaded from the ``"disk"`` cache or from an AOT ``"library"``
    (``MRA_COMPILE_KERNEL_LIBRARY``); tests and ``mra-compile info`` read it."""
    return list(_EVENTS)
