"""Building, caching and loading the compiled kernels.

A kernel is identified by its operator (``mra_compile.kernels``), its static parameters
(block edge, padded head dim, ...), the schedule knobs (``mra_compile.knobs``) and the
target (``mra_compile.targets``). It is built on first use, kept in memory, and exported
to a disk cache so that a second process loads it in milliseconds with the TVM *runtime*
only: the TVM compiler (``import tvm``, ~3 s) is imported only when something must
actually be compiled. An ahead-of-time library (``mra_compile.library``) comes first.

Cache directory: ``$MRA_COMPILE_CACHE_DIR`` (``~`` expanded), else ``~/.cache/mra_compile``;
one this process cannot write is read, and new kernels go to a temporary directory
(``host.writable_cache_dir``, with a warning). Entries are
keyed by operator, static parameters, dtype, knobs, target, TVM version and a hash of
the operator and schedule sources, so editing either rebuilds.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

from mra_compile import host, kernels, knob_policy, library, progress, records, runtime, targets
from mra_compile.targets import Target

_LOCK = threading.RLock()
_MEMORY: dict[str, object] = {}  # by full key
_FAST: dict[tuple, object] = {}  # by call arguments: skips hashing the key on every call


def kernel_key(op: str, static: dict, knobs: dict, target: Target | str | None = None) -> str:
    """The name a kernel has in the cache and in AOT libraries (``mra_compile.library``)."""
    return _key(op, static, knobs, targets.get(target))[0]


def _key(op: str, static: dict, knobs: dict, target: Target) -> tuple[str, dict]:
    desc = {
        "op": op,
        "static": static,
        "dtype": "float32",
        "knobs": knobs,
        "target": target.name,
        "host": target.host_key(),
        "tvm": host.tvm_version(),
        "source": host.source_hash(target.family),
        "target_override": target.target_override(),
    }
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
    return f"{op}-{digest}", desc


def scheduled_func(op: str, static: dict, knobs: dict, target: Target | str | None = None):
    """The operator's PrimFunc with the target's schedule applied (not yet compiled)."""
    from tvm import s_tir, te, tirx

    target = targets.get(target)
    kernel = kernels.get(op)
    shape = {k: knobs[k] for k in kernel.shape_knobs}
    built = kernel.builder()(**static, **shape)  # TE tensors, or TIR itself (``Kernel.module``)
    func = built if isinstance(built, tirx.PrimFunc) else te.create_prim_func(built)
    params = tuple(p.name for p in func.params)
    if params != kernel.arg_names(static):  # calls order their named arguments by these
        raise RuntimeError(f"operators.{op} returns arguments {params}, the kernel registry "
                           f"declares {kernel.arg_names(static)}")
    sch = s_tir.Schedule(func)
    extra = {"full": static["full"]} if kernel.has_modes else {}
    if op in getattr(target.schedules, "MICRO", ()):  # the target's micro-kernels, if any
        extra["micro"] = static.get("micro")
    if op in getattr(target.schedules, "SPLIT_PV", ()):  # P v from P split in two, if any
        extra["split_pv"] = bool(static.get("split_pv"))
    getattr(target.schedules, op)(sch, **knobs, **extra)
    return sch.mod["main"]


def compile_module(funcs: dict, target: Target | str | None = None, *, log: bool = True):
    """Compile ``{symbol: PrimFunc}`` for ``target``; returns the TVM executable. ``log``:
    say so on stderr, with the time it took (``progress.timed``)."""
    target = targets.get(target)
    what = f"compiling {len(funcs)} kernels for {target.name}"
    with progress.timed(what) if log else contextlib.nullcontext():
        target.prepare_compiler()
        import tvm

        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
        # The lowering options the target's schedules ask for (``PASS_CONFIG``; in their
        # source, so part of every kernel's key).
        config = getattr(target.schedules, "PASS_CONFIG", None)
        options = tvm.transform.PassContext(config=config) if config else contextlib.nullcontext()
        with options, target.tvm_target() as tgt:
            return tvm.compile(mod, target=tgt)


def compile_kernel(op: str, static: dict, knobs: dict, target: Target | str | None = None):
    """Build one kernel with the TVM compiler (saying so on stderr, ``progress.timed``: a
    first compile takes seconds); returns the TVM executable."""
    target = targets.get(target)
    shape = " ".join(f"{k}={v}" for k, v in static.items())
    with progress.timed(f"compiling kernel {op} ({shape}) for {target.name}"):
        func = scheduled_func(op, static, knobs, target)
        return compile_module({"main": func}, target, log=False)


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
        if record.get("key") != desc or record.get("sha256") != host.file_digest(path):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return tvm_ffi.load_module(str(path))
    except Exception:  # e.g. built by an incompatible runtime: rebuild
        return None


def _compile_to_cache(op: str, static: dict, knobs: dict, path: Path, desc: dict,
                      target: Target):
    import tvm_ffi

    executable = compile_kernel(op, static, knobs, target)
    path.parent.mkdir(parents=True, exist_ok=True)

    def export(tmp):
        executable.export_library(tmp, options=target.link_objects(op, static))
        target.check_export(Path(tmp))

    host.atomic_write(path, export)
    record = {"key": desc, "sha256": host.file_digest(path)}
    host.atomic_write(path.with_suffix(".json"),
                      lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return tvm_ffi.load_module(str(path))


class _Trace(threading.local):
    calls: list | None = None


# Per thread: a recording (``trace_kernel_calls``) sees its own thread's calls only.
_TRACE = _Trace()


@contextlib.contextmanager
def trace_kernel_calls():
    """Record every kernel call this thread makes inside the block (for the tuner, the
    launch cache and tests): yields a list that receives ``{"op", "knobs" (as passed),
    "resolved" (the knobs the kernel was built with), "static", "target", "args"}`` per
    call (positional arguments by reference, after the call)."""
    calls: list[dict] = []
    previous = _TRACE.calls
    _TRACE.calls = calls
    try:
        yield calls
    finally:
        _TRACE.calls = previous


def _traced(calls, op, knobs, static, fn, target: Target):
    resolved = knob_policy.resolve_knobs(op, knobs, target=target)

    def call(*args):
        result = fn(*args)
        calls.append({"op": op, "knobs": None if knobs is None else dict(knobs),
                      "resolved": resolved, "static": dict(static), "target": target.name,
                      "args": args})
        return result

    return call


def kernel(op: str, knobs: dict | None = None, target: Target | str | None = None, **static):
    """The compiled kernel ``op`` for ``target`` (a ``Target``, its name, or None for the
    CPU): a callable taking torch tensors in the order ``kernels.KERNELS[op]`` declares
    (CUDA kernels run on torch's current stream of the tensors' device). ``run`` calls
    one with named arguments.

    ``knobs`` may be partial or None: see ``knob_policy.resolve_knobs`` (the tuning record used
    is that of the nearest bucket; ``knob_policy.knobs_for_shape`` gives complete per-shape
    knobs).
    """
    target = targets.get(target)
    if _TRACE.calls is not None:
        return _traced(_TRACE.calls, op, knobs, static, _kernel(op, knobs, static, target), target)
    return _kernel(op, knobs, static, target)


def tracing() -> bool:
    """Whether ``trace_kernel_calls`` is recording: callers that keep kernels between
    calls must then ask ``kernel`` for each call, so that it is recorded."""
    return _TRACE.calls is not None


def lookup_token() -> tuple:
    """What the kernel of a key depends on besides the op, its variant, knobs and target:
    the cache directory and the tuning records (``records.token``). (The cache directory
    enters as its environment variable: resolving ~ costs ~10 us.)"""
    return os.environ.get(host.CACHE_ENV), records.token()


def run(op: str, knobs: dict | None, target: Target, static: dict, **args) -> None:
    """Call kernel ``op`` with its arguments by name (checked against its declaration)."""
    kernel(op, knobs, target, **static)(*kernels.get(op).order(static, args))


def _kernel(op: str, knobs: dict | None, static: dict, target: Target):
    # The token keeps the fast path right when the tuning records or the cache change.
    fast = (op, tuple(sorted(static.items())), tuple(sorted((knobs or {}).items())),
            lookup_token(), target.name)
    fn = _FAST.get(fast)
    if fn is not None:
        return fn
    knobs = knob_policy.resolve_knobs(op, knobs, target=target)
    name, desc = _key(op, static, knobs, target)
    with _LOCK:
        fn = _MEMORY.get(name)
        if fn is not None:
            _FAST[fast] = fn
            return fn
        runtime.load()
        target.prepare_runtime()
        fn = library.lookup(name)  # an ahead-of-time library first, when one is set
        origin, where = "library", os.environ.get(library.ENV, "")
        if fn is None:
            library.missing(op, static, target)  # warns once per shape, or raises
            path = host.cache_dir() / f"{name}.so"
            where = str(path)
            module = _load_cached(path, desc)
            origin = "disk"
            if module is None:
                if host.tvm_spec() is None:
                    raise RuntimeError(
                        f"no prebuilt kernel {op} {static} for {target.name}: the kernel "
                        f"library ({library.ENV}={os.environ.get(library.ENV, '')!r}) lacks it "
                        "and apache-tvm is not installed to compile it; build one with "
                        "`mra-compile build` for these shapes and dtypes")
                origin = "compiled"
                # A cache this process cannot write: a temporary one (warned once).
                path = host.writable_cache_dir() / f"{name}.so"
                where = str(path)
                module = _compile_to_cache(op, static, knobs, path, desc, target)
            target.after_load(path)
            fn = module["main"]
        fn = target.wrap_kernel(fn)
        _MEMORY[name] = _FAST[fast] = fn
        _EVENTS.append({"op": op, "origin": origin, "path": where, **desc})
        return fn


_EVENTS: list[dict] = []


def cache_events() -> list[dict]:
    """One record per kernel this process loaded: its key and whether it was
    ``"compiled"``, loaded from the ``"disk"`` cache or from an AOT ``"library"``
    (``MRA_COMPILE_KERNEL_LIBRARY``); tests and ``mra-compile info`` read it."""
    return list(_EVENTS)
