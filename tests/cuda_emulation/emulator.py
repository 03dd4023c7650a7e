"""Running a CUDA kernel library of mra_compile on the CPU, the way a GPU would.

Building (any process):
    fakes = build_fakes(dir)              # libcuda.so.1, libcudart.so.13 (fake_lib*.c)
    libs = build_emulation(cu, dir)       # the library's mra_kernels.cu for g++, twice:
                                          # registers pattern- and zero-initialised
Running (a process of its own: the fakes stand in for the NVIDIA driver there):
    emu = Emulator(fakes, libs, manifest) # loads the fakes first, then the libraries
    install(emu)                          # CPU tensors take the op's CUDA path

The op then runs as on a GPU: ``targets.of_device`` gives an ``EmulatedCudaTarget`` (the
CUDA target, named like the library's, so its keys match), whose ``wrap_kernel`` passes
each tensor to the TVM kernel as a CUDA (kDLCUDA) tensor over a fresh device allocation
of the fake driver, with the tensor's alignment modulo 512 (one tensor given as two
arguments, e.g. self-attention's one mask for keys and queries, gets one allocation, and
a kernel that writes it is a finding: every pointer is ``__restrict__``); TVM's CUDA
runtime launches the kernels through the fakes, which run them on the CPU with their
checks.

Every kernel call runs once per ``Variant`` (registers, shared memory and workspaces
initialised differently; threads and blocks in different orders, preempted or not) on
the same inputs; the outputs must agree bit for bit, and the fakes' reports (races,
uninitialised reads, out-of-bounds and misaligned accesses, barrier errors) must be
empty. ``Emulator.findings`` collects what did not hold, by kernel and operator.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_INCLUDE = HERE / "kernel_include"

# ``extern "C" __global__ void __launch_bounds__(N) name(params) {``: a kernel definition
DEFINITION = re.compile(
    r'extern "C" __global__ void (?:__launch_bounds__\((\d+)(?:,\s*\d+)?\)\s+)?(\w+)\(([^;{)]*)\)\s*\{')
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?[\w ]+?(\w+)\[\];")
STATIC_SHARED = re.compile(r"^\s*__shared__ ", re.M)
# ``__shared__ alignas(A) T name[n];``: a static array of a kernel (TVM's "shared" scope)
STATIC_ARRAY = re.compile(r"^(\s*)__shared__ alignas\((\d+)\) ([\w ]+?) (\w+)\[(\d+)\];", re.M)
SIZEOF = {"float": 4, "int": 4, "unsigned int": 4, "double": 8, "half": 2, "nv_bfloat16": 2,
          "signed char": 1, "uchar": 1, "unsigned char": 1, "long long": 8, "int64_t": 8}

CXXFLAGS = ("-std=c++17", "-O2", "-g1", "-fPIC", "-fno-strict-aliasing", "-fwrapv",
            # every memory access calls the fakes' __tsan_* checks, misaligned ones their
            # __ubsan_handle_type_mismatch_v1
            "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
            "-fsanitize=alignment", "-w",
            # local arrays (TVM's registers) stay arrays: otherwise GCC folds a read of an
            # uninitialised one into the other path's value, and -ftrivial-auto-var-init
            # (pattern vs zero) could not show it
            "-fno-tree-sra")
INITS = ("pattern", "zero")  # -ftrivial-auto-var-init: uninitialised registers differ


def cuda_include() -> Path:
    """The CUDA toolkit's include directory (cuda.h, cuda_runtime_api.h), as nvcc uses it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("the CUDA emulation needs the CUDA toolkit's headers (nvcc on the PATH)")
    proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    candidates = [Path(p) for p in re.findall(r'INCLUDES="-I([^"]+)"', proc.stdout + proc.stderr)]
    root = Path(nvcc).resolve().parent.parent
    candidates += [root / "include", root / "targets" / f"{platform.machine()}-linux" / "include"]
    for include in candidates:
        if (include / "cuda.h").is_file() and (include / "cuda_runtime_api.h").is_file():
            return include.resolve()
    raise RuntimeError(f"no cuda.h / cuda_runtime_api.h found for {nvcc}")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def build_fakes(out: Path) -> dict[str, str]:
    """Compile the fake libcuda.so.1 and libcudart.so.13 into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("the CUDA emulation needs a C compiler (cc)")
    common = [compiler, "-O2", "-g", "-Wall", "-shared", "-fPIC", "-fvisibility=hidden",
              f"-I{cuda_include()}"]
    libcuda, libcudart = out / "libcuda.so.1", out / "libcudart.so.13"
    _run([*common, "-Wl,-soname,libcuda.so.1", str(HERE / "fake_libcuda.c"), "-o", str(libcuda)])
    _run([*common, "-Wl,-soname,libcudart.so.13", f"-Wl,--version-script={HERE / 'cudart.map'}",
          str(HERE / "fake_libcudart.c"), "-o", str(libcudart)])
    return {"libcuda": str(libcuda), "libcudart": str(libcudart)}


def _param(text: str) -> tuple[str, str, str]:
    """(C type, name, kind) of one kernel parameter: kind p(ointer), i(nt), f(loat), l(ong)."""
    m = re.fullmatch(r"(.*?)(\w+)", text.strip())
    if m is None:
        raise ValueError(f"cannot parse kernel parameter {text!r}")
    ctype = m.group(1).replace("__restrict__", "").strip()
    if ctype.endswith("*"):
        kind = "p"
    else:
        kinds = {"int": "i", "int32_t": "i", "float": "f", "int64_t": "l", "long long": "l"}
        if ctype not in kinds:
            raise ValueError(f"kernel parameter of unsupported type {ctype!r}")
        kind = kinds[ctype]
    return ctype, m.group(2), kind


def entry_points(source: str, static: dict[str, int] | None = None) -> str:
    """C++ for every kernel of ``source``: ``emu_entry_<name>(void** params)`` calling it
    with the launch's parameters, ``emu_bound_<name>`` (its __launch_bounds__),
    ``emu_static_<name>`` (bytes of its static shared arrays, ``static``) and
    ``emu_params_<name>`` ("p:name,i:name,...", for the fakes' reports)."""
    lines = []
    for bound, name, params in DEFINITION.findall(source):
        parsed = [_param(" ".join(p.split())) for p in params.split(",")] if params.strip() else []
        call = ", ".join(f"*({ctype}*)p[{i}]" for i, (ctype, _, _) in enumerate(parsed))
        spec = ",".join(f"{kind}:{pname}" for _, pname, kind in parsed)
        # (not instrumented: the parameter array is the driver's memory, not the kernel's)
        lines += [f'extern "C" __attribute__((no_sanitize_thread)) void emu_entry_{name}'
                  f'(void** p) {{ {name}({call}); }}',
                  f'extern "C" const int emu_bound_{name} = {bound or 0};',
                  f'extern "C" const int emu_static_{name} = {(static or {}).get(name, 0)};',
                  f'extern "C" const char* const emu_params_{name} = "{spec}";']
    if not lines:
        raise ValueError("no kernel definitions found")
    return "\n".join(lines) + "\n"


def static_shared(source: str) -> tuple[str, dict[str, int]]:
    """``source`` with each kernel's static ``__shared__`` arrays declared as pointers into
    the block's shared memory after its dynamic part (``emu_static_base``), on the same
    lines; and ``{kernel: bytes of its static arrays}``. So their accesses are checked as
    the dynamic ones are (bounds, races, uninitialised reads)."""
    starts = [(m.start(), m.group(2)) for m in DEFINITION.finditer(source)]
    sizes, pieces, at = {}, [], 0
    for k, (start, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(source)
        text, sizes[name] = _static_arrays(source[start:end], name)
        pieces += [source[at:start], text]
        at = end
    rewritten = "".join(pieces) + source[at:]
    if STATIC_SHARED.search(rewritten):
        raise RuntimeError("static __shared__ arrays of another form than "
                           "`__shared__ alignas(A) T name[n];` are not emulated")
    return rewritten, sizes


def _static_arrays(kernel: str, name: str) -> tuple[str, int]:
    """One kernel's text with its static arrays as pointers (``static_shared``), and
    their bytes."""
    offset = 0

    def pointer(m):
        nonlocal offset
        indent, align, ctype, var, count = m.groups()
        if ctype not in SIZEOF:
            raise RuntimeError(f"{name}: static __shared__ array of unknown type {ctype!r}")
        offset = -(-offset // int(align)) * int(align)
        text = (f"{indent}{ctype}* const {var} = ({ctype}*)(emu_dyn_smem + "
                f"emu_static_base() + {offset});")
        offset += SIZEOF[ctype] * int(count)
        return text

    return STATIC_ARRAY.sub(pointer, kernel), offset


def kernel_names(source: str) -> list[str]:
    """The ``__global__`` functions defined in ``source``."""
    return [name for _, name, _ in DEFINITION.findall(source)]


def build_emulation(cu: Path, out: Path, inits=INITS) -> list[str]:
    """Compile the CUDA source ``cu`` for the emulator, once per ``-ftrivial-auto-var-init``
    value (in parallel); returns the shared libraries in the order of ``inits``."""
    cu, out = Path(cu).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source, static = static_shared(cu.read_text())
    emulated = out / f"{cu.stem}_emulated.cu"  # (the same lines as ``cu``)
    emulated.write_text(source)
    unit = out / f"{cu.stem}_emulation.cc"
    unit.write_text(f'#include "{emulated}"\n' + entry_points(source, static))
    defines = [f"-D{name}=emu_dyn_smem" for name in sorted(set(DYNAMIC_SHARED.findall(source)))]
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("the CUDA emulation needs a C++ compiler (g++)")

    def one(init: str) -> str:
        obj, lib = out / f"{cu.stem}_emulation_{init}.o", out / f"{cu.stem}_emulation_{init}.so"
        _run([compiler, *CXXFLAGS, f"-ftrivial-auto-var-init={init}", "-include", "cuda_emu.h",
              f"-I{KERNEL_INCLUDE}", *defines, "-c", str(unit), "-o", str(obj)])
        # Linked without the sanitizer runtimes: the fakes implement their callbacks.
        _run([compiler, "-shared", str(obj), "-o", str(lib)])
        return str(lib)

    with ThreadPoolExecutor(max_workers=len(inits)) as pool:
        return list(pool.map(one, inits))


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Variant:
    """One way to run every kernel call. ``lib``: the emulation library (index into
    ``INITS``); ``threads``, ``blocks``: 0 in order, 1 reversed, 2 random; ``preempt``:
    switch threads every ~N memory accesses (0: only at barriers); ``poison``: the byte
    shared memory and workspaces start with; ``zero_unwritten``: device copies of tensor
    elements nothing wrote yet (torch's NaN / max-int fill) hold zeros instead."""

    name: str
    description: str
    lib: int
    threads: int
    blocks: int
    preempt: int
    poison: int
    zero_unwritten: bool
    seed: int = 0


VARIANTS = (
    Variant("in-order", "threads and blocks in order; registers pattern-initialised, shared "
            "memory, workspaces NaN (0xff bytes), unwritten elements torch's NaN",
            0, 0, 0, 0, 0xFF, False),
    Variant("zero-init", "registers, shared memory, workspaces and unwritten elements zero",
            1, 0, 0, 0, 0x00, True),
    Variant("reversed", "threads and blocks in reverse order", 0, 1, 1, 0, 0xFF, False),
    Variant("random", "threads and blocks in random order, switched at random memory "
            "accesses", 0, 2, 2, 40, 0xFF, False, seed=0x5EED),
)
# Outputs differing from VARIANTS[0] in variant i mean: i == 1 reads of uninitialised
# registers or memory, else a dependence on the thread schedule (a race).
DIFFERENCE = {1: "uninitialised", 2: "schedule", 3: "schedule"}

K_ARG = 0
KDL_CUDA = 2
_DL_CODES = {}  # torch dtype -> (DLPack type code, bits)
_UNWRITTEN = {}  # torch dtype -> (integer view dtype, the bits torch fills empty tensors with)


def _dtype_tables():
    import torch

    if not _DL_CODES:
        _DL_CODES.update({torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16),
                          torch.float64: (2, 64), torch.int32: (0, 32), torch.int64: (0, 64),
                          torch.uint8: (1, 8), torch.int8: (0, 8), torch.bool: (6, 8)})
        # torch.utils.deterministic.fill_uninitialized_memory: NaN, the largest integer
        _UNWRITTEN.update({torch.float32: (torch.int32, 0x7FC00000),
                           torch.float16: (torch.int16, 0x7E00),
                           torch.bfloat16: (torch.int16, 0x7FC0),
                           torch.float64: (torch.int64, 0x7FF8000000000000),
                           torch.int32: (torch.int32, 2**31 - 1),
                           torch.int64: (torch.int64, 2**63 - 1)})


class _Buffer:
    """A device copy of one tensor argument: its storage span, at the same address
    modulo 512 as on a GPU (views keep their offsets)."""

    def __init__(self, emu: Emulator, tensor, name: str):
        import torch

        self.emu, self.tensor, self.name = emu, tensor, name
        self.itemsize = tensor.element_size()
        self.elems = 0
        if tensor.numel():
            if any(s < 0 for s in tensor.stride()):
                raise ValueError(f"{name}: negative strides are not emulated")
            self.elems = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
        self.nbytes = self.elems * self.itemsize
        self.flat = torch.as_strided(tensor, (self.elems,), (1,)) if self.elems else None
        self.storage = tensor.untyped_storage()
        self.start = self.flat.data_ptr() - self.storage.data_ptr() if self.elems else 0
        self._unwritten = None
        offset = (tensor.storage_offset() * self.itemsize) % 512
        self.ptr = emu.core.emu_alloc(max(self.nbytes, 1), offset, K_ARG, name.encode())
        if not self.ptr:
            raise MemoryError(f"emulated device allocation of {self.nbytes} bytes")

    def span(self):
        start = self.flat.data_ptr() if self.flat is not None else 0
        return start, start + self.nbytes

    def unwritten_bytes(self):
        """uint8 [nbytes], 1 where the tensor holds torch's fill for never-written memory
        (torch.empty under ``fill_uninitialized_memory``) and no kernel wrote it (a kernel
        may write that very NaN, e.g. from reading such an element)."""
        import torch

        if self._unwritten is None:
            view = _UNWRITTEN.get(self.tensor.dtype)
            if view is None or self.flat is None:
                return None
            unwritten = (self.flat.view(view[0]) == view[1]).to(torch.uint8)
            unwritten = unwritten.repeat_interleave(self.itemsize)
            written = self.emu.written_bytes(self.storage)
            if written is not None:
                unwritten &= 1 - written[self.start:self.start + self.nbytes]
            self._unwritten = unwritten
        return self._unwritten

    def record_writes(self, init) -> None:
        """Remember the bytes this call left initialised (``snapshot``'s mask)."""
        if self.nbytes:
            written = self.emu.written_bytes(self.storage, create=True)
            written[self.start:self.start + self.nbytes] |= init.to(written.dtype)

    def load(self, variant: Variant) -> None:
        """Copy the tensor in; mark torch's never-written elements uninitialised."""
        if not self.nbytes:
            return
        ctypes.memmove(self.ptr, self.flat.data_ptr(), self.nbytes)
        unwritten = self.unwritten_bytes()
        if unwritten is None or not bool(unwritten.any()):
            self.emu.core.emu_mark_init(self.ptr, self.nbytes, None)
            return
        if variant.zero_unwritten:
            device = self.device_bytes()
            device[unwritten.bool()] = 0
        mask = (1 - unwritten).contiguous()
        self.emu.core.emu_mark_init(self.ptr, self.nbytes, mask.data_ptr())

    def device_bytes(self):
        """The device copy as a uint8 tensor (no copy)."""
        import torch

        array = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        return torch.frombuffer(array, dtype=torch.uint8)

    def snapshot(self):
        """(bytes, initialised mask) of the device copy."""
        import torch

        if not self.nbytes:
            return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.bool)
        init = torch.empty(self.nbytes, dtype=torch.uint8)
        self.emu.core.emu_get_init(self.ptr, self.nbytes, init.data_ptr())
        return self.device_bytes().clone(), init.bool()

    def store(self, data) -> None:
        if self.nbytes:
            ctypes.memmove(self.flat.data_ptr(), data.data_ptr(), self.nbytes)

    def dlpack(self):
        """A CUDA DLPack tensor over the device copy, as a tvm_ffi Tensor."""
        import tvm_ffi

        t = self.tensor
        code, bits = _DL_CODES[t.dtype]
        ndim = t.dim()
        shape = (ctypes.c_int64 * max(ndim, 1))(*t.shape)
        strides = (ctypes.c_int64 * max(ndim, 1))(*t.stride())
        managed = self.emu.core.emu_make_dltensor(self.ptr, KDL_CUDA, 0, ndim, shape, strides, code,
                                                  bits, 1)
        capsule = _capsule_new(managed, b"dltensor", None)
        return tvm_ffi.from_dlpack(capsule)

    def free(self) -> None:
        self.emu.core.emu_free(self.ptr)


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class Emulator:
    """The fakes, loaded into this process (before TVM's CUDA runtime), and the kernel
    calls made through them."""

    def __init__(self, fakes: dict, libs: list[str], manifest: dict | None = None,
                 variants=VARIANTS):
        self.core = ctypes.CDLL(fakes["libcuda"], mode=ctypes.RTLD_GLOBAL)
        self.cudart = ctypes.CDLL(fakes["libcudart"], mode=ctypes.RTLD_GLOBAL)
        c = self.core
        c.emu_alloc.restype = ctypes.c_void_p
        c.emu_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p]
        c.emu_free.argtypes = [ctypes.c_void_p]
        c.emu_mark_init.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        c.emu_get_init.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        c.emu_set_variant.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong,
                                      ctypes.c_int, ctypes.c_int]
        c.emu_launched.restype = ctypes.c_char_p
        c.emu_report_json.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        c.emu_make_dltensor.restype = ctypes.c_void_p
        c.emu_make_dltensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int]
        c.emu_stats.argtypes = [ctypes.c_void_p]
        paths = (ctypes.c_char_p * len(libs))(*[str(p).encode() for p in libs])
        if c.emu_set_libraries(len(libs), paths) != 0:
            raise RuntimeError(f"could not load the emulation libraries {libs}")
        self.libs = [str(p) for p in libs]
        self.variants = tuple(variants)
        self.symbols = {}  # library symbol k_<hash> -> manifest entry
        for entry in (manifest or {}).get("kernels", []):
            self.symbols[entry["symbol"]] = entry
        self.findings: list[dict] = []
        self.calls: list[dict] = []
        self.launched: set[str] = set()
        # storage address -> (the storage, kept alive so that the address stays its own;
        # uint8 per byte: written by a kernel)
        self._written: dict[int, tuple] = {}

    def written_bytes(self, storage, create: bool = False):
        """Which bytes of ``storage`` kernels have written (None: none known)."""
        import torch

        record = self._written.get(storage.data_ptr())
        if record is None or record[0].nbytes() != storage.nbytes():
            if not create:
                return None
            record = (storage, torch.zeros(storage.nbytes(), dtype=torch.uint8))
            self._written[storage.data_ptr()] = record
        return record[1]

    def forget_writes(self) -> None:
        """Release the storages whose writes are remembered (between independent runs)."""
        self._written.clear()

    # ------------------------------------------------------------------ reports

    def entry_of(self, kernel: str) -> dict:
        """The manifest entry of a kernel function ``k_<hash>_kernel[_N]``."""
        return self.symbols.get(re.sub(r"_kernel(_\d+)?$", "", kernel), {})

    def take_reports(self) -> list[dict]:
        buf = ctypes.create_string_buffer(8192)
        out = []
        for i in range(self.core.emu_report_count()):
            n = self.core.emu_report_json(i, buf, len(buf))
            out.append(json.loads(buf.raw[:n].decode()))
        self.core.emu_clear_reports()
        return out

    def stats(self) -> dict:
        values = (ctypes.c_ulonglong * 4)()
        self.core.emu_stats(values)
        return dict(zip(("launches", "blocks", "threads", "accesses"), values))

    def _finding(self, check: str, kernel: str, variant: str, message: str, what: str = "",
                 **extra) -> None:
        """Record a finding; one per (check, kernel, ``what``), counted over calls."""
        entry = self.entry_of(kernel) if kernel else {}
        op = extra.pop("op", None) or entry.get("op")
        static = extra.pop("static", None) or entry.get("static")
        key = (check, kernel, json.dumps(static, sort_keys=True), what)
        for f in self.findings:
            if f["key"] == key:
                f["count"] += 1
                if variant not in f["variants"]:
                    f["variants"].append(variant)
                return
        self.findings.append({"key": key, "check": check, "kernel": kernel, "op": op,
                              "static": static, "variants": [variant], "count": 1,
                              "message": message, **extra})

    # ------------------------------------------------------------------ calls

    def wrap(self, fn):
        def call(*args):
            return self.call(fn, args)

        call.emulated = fn
        return call

    def call(self, fn, args):
        import torch

        _dtype_tables()
        buffers: list[_Buffer | None] = []
        same: dict[tuple, _Buffer] = {}  # one tensor passed twice: one device copy
        try:
            for i, a in enumerate(args):
                if not isinstance(a, torch.Tensor):
                    buffers.append(None)
                    continue
                view = (a.data_ptr(), a.dtype, tuple(a.shape), a.stride())
                if view not in same:
                    same[view] = _Buffer(self, a, f"arg{i}")
                buffers.append(same[view])
            unique = list(same.values())
            self._check_overlaps(unique)
            results = []
            for variant in self.variants:
                results.append(self._run_variant(fn, args, buffers, variant))
            launched = results[0]["launched"]
            entry = self.entry_of(launched[0]) if launched else {}
            names = self._arg_names(entry, len(args))
            for b, name in zip(buffers, names):
                if b is not None:
                    b.name = name
            label = f"{entry.get('op', '?')} {entry.get('static', '')}"
            self.calls.append({"op": entry.get("op"), "static": entry.get("static"),
                               "kernels": launched})
            self.launched.update(launched)
            for i, result in enumerate(results):
                variant = self.variants[i].name
                kernel = launched[0] if launched else ""
                if result["error"]:
                    self._finding("launch", result["kernel"] or kernel, variant,
                                  f"{label}: the call failed: {result['error']}", "error")
                for r in result["reports"]:
                    what = f"{r['space']} {r['region']} {r['write']} {r.get('other_write')}"
                    self._finding(r["kind"], r["kernel"], variant, self._describe(r, buffers),
                                  what, report=r)
                if i and result["launched"] != launched:
                    self._finding("schedule", kernel, variant,
                                  f"{label}: launched {result['launched']}, not {launched}",
                                  "launches")
                if i:
                    self._compare(results[0], result, buffers, i, kernel, label)
            for b in unique:
                if buffers.count(b) > 1 and not torch.equal(
                        results[0]["snapshots"][buffers.index(b)][0], b.flat.view(torch.uint8)
                        if b.nbytes else torch.zeros(0, dtype=torch.uint8)):
                    # Every pointer is __restrict__: one buffer under two names is only
                    # valid when neither writes it.
                    self._finding("alias", launched[0] if launched else "", self.variants[0].name,
                                  f"{label}: writes {b.name}, passed as more than one argument",
                                  b.name)
            for b, (data, init) in zip(buffers, results[0]["snapshots"]):
                if b is not None:
                    b.store(data)
                    b.record_writes(init)
        finally:
            for b in same.values():
                b.free()

    def _run_variant(self, fn, args, buffers, variant: Variant) -> dict:
        c = self.core
        c.emu_set_variant(variant.lib, variant.threads, variant.blocks, variant.seed,
                          variant.preempt, variant.poison)
        c.emu_begin_call()
        for b in dict.fromkeys(b for b in buffers if b is not None):  # (each once)
            b.load(variant)
        call_args = [b.dlpack() if b is not None else a for a, b in zip(args, buffers)]
        error = None
        try:
            fn(*call_args)
        except Exception as e:  # noqa: BLE001  (a failed launch: TVM raises its own error type)
            error = " ".join(str(e).split("// CUDA Source")[0].split())[:600]
        launched = [c.emu_launched(i).decode() for i in range(c.emu_launched_count())]
        reports = self.take_reports()
        snapshots = [b.snapshot() if b is not None else (None, None) for b in buffers]
        kernel = reports[0]["kernel"] if reports else (launched[-1] if launched else "")
        return {"error": error, "launched": launched, "reports": reports,
                "snapshots": snapshots, "kernel": kernel}

    @staticmethod
    def _check_overlaps(buffers: list[_Buffer]) -> None:
        spans = sorted((b.span(), b.name) for b in buffers if b.nbytes)
        for (a, name_a), (b, name_b) in zip(spans, spans[1:]):
            if b[0] < a[1]:
                raise ValueError(f"kernel arguments {name_a} and {name_b} overlap in memory: not "
                                 "emulated (each argument gets a device copy of its own)")

    @staticmethod
    def _arg_names(entry: dict, n: int) -> list[str]:
        if entry:
            from mra_compile import kernels

            names = list(kernels.get(entry["op"]).arg_names(entry["static"]))
            if len(names) == n:
                return names
        return [f"arg{i}" for i in range(n)]

    def _describe(self, r: dict, buffers) -> str:
        entry = self.entry_of(r["kernel"])
        where = f"{entry.get('op', '?')} {entry.get('static', '')}, kernel {r['kernel']}"
        who = f"block {tuple(r['block'])} thread {tuple(r['thread'])}"
        if "other_thread" in r:
            who += (f" vs block {tuple(r['other_block'])} thread {tuple(r['other_thread'])}"
                    f" ({'write' if r['other_write'] else 'read'})")
        detail = r["detail"]
        m = re.fullmatch(r"arg(\d+)", r["region"])
        if m and int(m.group(1)) < len(buffers) and buffers[int(m.group(1))] is not None:
            b = buffers[int(m.group(1))]  # the tensor argument: its name, the element
            detail = detail.replace(f"'{r['region']}'", f"'{b.name}'")
            if 0 <= r["offset"] < b.nbytes and b.tensor.is_contiguous():
                index = _unravel(r["offset"] // b.itemsize, tuple(b.tensor.shape))
                detail += f" (element {list(index)} of {b.name} {list(b.tensor.shape)})"
        line = source_line(r)
        return f"{r['kind']} in {where}: {detail} [{who}]{' at ' + line if line else ''}"

    def _compare(self, base: dict, other: dict, buffers, index: int, kernel: str, label: str):
        for b, (data0, init0), (data, _) in zip(buffers, base["snapshots"], other["snapshots"]):
            if b is None or not b.nbytes:
                continue
            differs = (data0 != data) & init0
            if not bool(differs.any()):
                continue
            first = int(differs.nonzero()[0]) // b.itemsize
            count = int(differs.view(-1, b.itemsize).any(1).sum()) if b.itemsize > 1 else int(
                differs.sum())
            dtype = b.tensor.dtype
            v0 = data0[first * b.itemsize:(first + 1) * b.itemsize].view(dtype).item()
            v1 = data[first * b.itemsize:(first + 1) * b.itemsize].view(dtype).item()
            what = DIFFERENCE.get(index, "schedule")
            self._finding(
                "uninitialised" if what == "uninitialised" else "nondeterministic", kernel,
                self.variants[index].name,
                f"{label}: output '{b.name}' differs in {count} of {b.elems} elements with "
                f"{self.variants[index].description} (element {first}: {v1!r}, in order: {v0!r}); "
                + ("it reads uninitialised registers or memory" if what == "uninitialised"
                   else "it depends on the order threads run in (a race)"), b.name)


def _unravel(flat: int, shape: tuple) -> tuple:
    index = []
    for n in reversed(shape):
        index.append(flat % n if n else 0)
        flat = flat // n if n else 0
    return tuple(reversed(index))


_LINES: dict[tuple, str] = {}


def source_line(r: dict) -> str:
    """``file:line`` of a report's program counter (addr2line on its emulation library)."""
    module, pc = r.get("module"), r.get("pc")
    if not module or not pc or shutil.which("addr2line") is None:
        return ""
    key = (module, pc)
    if key not in _LINES:
        proc = subprocess.run(["addr2line", "-e", module, hex(pc - 1)], capture_output=True,
                              text=True)
        text = proc.stdout.strip().split(" ")[0] if proc.returncode == 0 else ""
        _LINES[key] = "" if text.startswith("??") else Path(text.split(":")[0]).name + ":" + (
            text.split(":")[1] if ":" in text else "?")
    return _LINES[key]


# ----------------------------------------------------------------------------- the target


def emulated_target(emulator: Emulator, arch: str = "sm_80"):
    """The CUDA target of ``arch`` (same name, so the library's kernel keys match) for CPU
    tensors: no torch.cuda device scope, every kernel through ``emulator``."""
    from mra_compile.targets.cuda import CudaTarget

    class EmulatedCudaTarget(CudaTarget):
        device_type = "cpu"

        def prepare_runtime(self) -> None:
            # The fakes are loaded (Emulator): ensure_cuda_runtime finds them by soname.
            super().prepare_runtime()
            if not hasattr(ctypes.CDLL("libcuda.so.1"), "emu_set_variant"):
                raise RuntimeError("TVM's CUDA runtime is bound to another libcuda.so.1 than "
                                   "the emulator's: load the Emulator before anything else")

        def device_scope(self, device):
            return contextlib.nullcontext()

        def wrap_kernel(self, fn):
            return emulator.wrap(fn)

    return EmulatedCudaTarget(arch)


def install(emulator: Emulator, arch: str = "sm_80"):
    """Make every tensor take the emulated CUDA target (this process only), and refuse
    to compile a kernel: they all must come from the library."""
    from mra_compile import build, targets

    target = emulated_target(emulator, arch)

    def of_device(device):
        targets.check_device(device, "tensor")
        return target

    def refuse(op, static, knobs, target=None):
        raise RuntimeError(f"the emulation compiled {op} {static}: every kernel must come from "
                           "the CUDA library (MRA_COMPILE_KERNEL_LIBRARY)")

    targets.of_device = of_device
    build.compile_kernel = refuse
    return target
