"""What building and loading CUDA kernels needs from the system.

TVM's CUDA runtime (``libtvm_runtime_cuda.so``) links against the driver library
``libcuda.so.1``. Where no driver is installed (CI, build machines) that library fails to
load, and ``tvm.compile`` then *silently* keeps only the CUDA source: no device code,
nothing runnable. Building device code needs no driver call at all (nvcc compiles, the
runtime only wraps the bytes), so on such machines a stand-in ``libcuda.so.1`` whose
every entry point reports "no device" is loaded first. It is used only to build:
loading a kernel's functions through it fails with a CUDA error, never silently.

Also: the nvcc compile of the generated source (``compile_device_code``, with
``with_min_blocks``) and what ptxas and the PTX say about each kernel it compiled
(``device_report``), and checking that a built module really holds device code.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mra_compile import host, runtime

EM_CUDA = 190  # ELF e_machine of NVIDIA device code (cubin)

# The driver entry points libtvm_runtime_cuda.so imports (``nm -D --undefined-only``).
_STUB_SOURCE = r"""
/* Build-time stand-in for libcuda.so.1 (mra_compile.cuda_toolchain): no device. */
#define NO_DEVICE 100 /* CUDA_ERROR_NO_DEVICE */
static const char *kName = "CUDA_ERROR_NO_DEVICE";
static const char *kText = "no CUDA driver: mra_compile's build-time stand-in libcuda";
int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = kName; return 0; }
int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = kText; return 0; }
int cuDeviceGetName(void) { return NO_DEVICE; }
int cuFuncSetAttribute(void) { return NO_DEVICE; }
int cuLaunchKernelEx(void) { return NO_DEVICE; }
int cuModuleGetFunction(void) { return NO_DEVICE; }
int cuModuleLoadData(void) { return NO_DEVICE; }
int cuModuleUnload(void) { return NO_DEVICE; }
int cuTensorMapEncodeTiled(void) { return NO_DEVICE; }
"""

_DRIVER: str | None = None  # "driver" or "stub" once loaded
_CUDA_RUNTIME = False


class CudaToolchainError(RuntimeError):
    """Building or loading CUDA kernels is not possible on this machine (says why)."""


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _build_stub() -> Path:
    # In the kernel cache, checked against its sha256 sidecar (rebuilt when it does not
    # match: loading a truncated library can kill the process).
    try:
        return host.cached_c_library(_STUB_SOURCE, "nodriver/libcuda.so.1",
                                     ("-Wl,-soname,libcuda.so.1",))
    except OSError as e:
        raise CudaToolchainError("building CUDA kernels without a driver needs a C compiler "
                                 "(cc or gcc) for the stand-in libcuda.so.1") from e


def ensure_driver(allow_stub: bool) -> str:
    """Load ``libcuda.so.1``: the real driver, else (``allow_stub``) the stand-in.

    Returns "driver" or "stub". Must run before ``libtvm_runtime_cuda.so`` loads.
    """
    global _DRIVER
    if _DRIVER is not None:
        return _DRIVER
    if _has_driver():
        _DRIVER = "driver"
    elif allow_stub:
        ctypes.CDLL(str(_build_stub()), mode=ctypes.RTLD_GLOBAL)
        _DRIVER = "stub"
    else:
        raise CudaToolchainError("libcuda.so.1 (the NVIDIA driver) is not installed")
    return _DRIVER


def _preload_cudart() -> None:
    """libtvm_runtime_cuda links libcudart.so.13; torch's CUDA 13 wheels ship it in the
    ``nvidia`` packages, outside the loader's search path."""
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        for path in sorted(Path(root).glob("**/libcudart.so.13*")):
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue
    raise CudaToolchainError("libcudart.so.13 (CUDA 13 runtime), which TVM's CUDA runtime "
                             "links against, was not found")


def ensure_cuda_runtime(allow_stub: bool = False) -> str:
    """Load TVM's CUDA runtime (registers the "cuda" module loader); returns the driver
    kind. The base runtime (``runtime.load``) must be loaded first."""
    global _CUDA_RUNTIME
    kind = ensure_driver(allow_stub)
    if not _CUDA_RUNTIME:
        _preload_cudart()
        ctypes.CDLL(str(runtime.runtime_dir() / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
        _CUDA_RUNTIME = True
    return kind


MIN_BLOCKS = 2  # thread blocks per SM every kernel is compiled to allow (with_min_blocks)


def with_min_blocks(source: str) -> str:
    """The generated CUDA ``source`` with every ``__launch_bounds__(T)`` made
    ``__launch_bounds__(T, MIN_BLOCKS)``.

    Given only the thread count, ptxas (13.0) aims at full occupancy: 32 registers for
    256 threads on sm_80/sm_90, and spills a few bytes rather than use 40 (measured: hires_rows
    D128 fp32 and bwd_dkdv_units D96 among others, moving from variant to variant with any
    small change of the code). Asking for 2 resident blocks caps registers at
    65536 / (2 T) instead: no variant spills, and most use as few registers as before."""
    return re.sub(r"__launch_bounds__\((\d+)\)", rf"__launch_bounds__(\1, {MIN_BLOCKS})", source)


# nvcc's options for the generated source (those of TVM's own nvcc compile): -O3, fast
# math, the half-precision operators and conversions TVM's code uses, ptxas at its highest
# register-use level; ``-v`` makes ptxas report every kernel's resources (``device_report``).
# ``--no-compress``: nvcc 13 compresses a large fatbin's cubins (a library of ~370 kernels,
# with the tuning variants), and ``check_device_code`` could no longer see that the
# library holds device code; the drivers load either.
NVCC_OPTIONS = (
    "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
    "--no-compress",
    *(f"-U__CUDA_NO_{name}__" for name in (
        "HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS",
        "BFLOAT162_OPERATORS", "BFLOAT162_CONVERSIONS")),
    "--ptxas-options=-v,--register-usage-level=10,--warn-on-local-memory-usage",
)

# The device report of every source compiled in this process, by the source's sha256.
_REPORTS: dict[str, dict[str, dict]] = {}


def _source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def compile_device_code(code: str, arch: str | None = None) -> bytes:
    """nvcc's fatbin (SASS for ``arch``, default the current TVM target's) of
    ``with_min_blocks(code)``; TVM's compile callback (``prepare_compiler``). Keeps the
    compile's ``device_report``."""
    source = with_min_blocks(code)
    arch = arch or _current_arch()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        # --keep: the PTX stays in tmp (kernels.ptx), for the report
        proc = subprocess.run(
            ["nvcc", "--fatbin", "-gencode", f"arch=compute_{arch[3:]},code={arch}",
             *NVCC_OPTIONS, "--keep", f"--keep-dir={tmp}", "-o", str(out), str(src)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaToolchainError(f"nvcc -arch={arch} failed:\n{proc.stderr[-3000:]}")
        binary = out.read_bytes()
        ptx_text = (Path(tmp) / "kernels.ptx").read_text()
    _REPORTS[_source_key(source)] = _report(proc.stderr + proc.stdout, ptx_text)
    return binary


def _current_arch() -> str:
    import tvm

    target = tvm.target.Target.current(allow_none=True)
    arch = str(getattr(target, "arch", "") or "")
    if not re.fullmatch(r"sm_\d+", arch):
        raise CudaToolchainError(f"compiling CUDA code needs a CUDA target with an sm_ arch, "
                                 f"not {target}")
    return arch


def device_report(source: str) -> dict[str, dict]:
    """Per kernel of ``source`` (a device source as compiled: ``device_source``), what
    its compile in this process made: ptxas's registers, spill stores and loads, stack
    frame and static shared memory (bytes), barriers, and the tensor-core (``mma``)
    instructions of its PTX."""
    try:
        return _REPORTS[_source_key(source)]
    except KeyError:
        raise CudaToolchainError("this CUDA source was not compiled in this process") from None


def _report(log: str, ptx_text: str) -> dict[str, dict]:
    report: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'|Function properties for (\w+)", line)
        if m:
            current = m.group(1) or m.group(2)
            report.setdefault(current, {})
            continue
        if current is None:
            continue
        for key, pattern in (("stack_frame", r"(\d+) bytes stack frame"),
                             ("spill_stores", r"(\d+) bytes spill stores"),
                             ("spill_loads", r"(\d+) bytes spill loads"),
                             ("registers", r"Used (\d+) registers"),
                             ("barriers", r"used (\d+) barriers"),
                             ("shared", r"(\d+) bytes smem")):
            hit = re.search(pattern, line)
            if hit:
                report[current][key] = int(hit.group(1))
    # PTX: ".entry NAME(" opens each kernel, up to the next one
    entries = list(re.finditer(r"\.entry (\w+)\(", ptx_text))
    for m, after in zip(entries, entries[1:] + [None]):
        body = ptx_text[m.end():after.start() if after else len(ptx_text)]
        report.setdefault(m.group(1), {})["mma"] = sorted(
            set(re.findall(r"\b(?:wmma\.)?mma\.sync[\w.]*", body)))
    return report


_COMPILE_HOOKED = False


def prepare_compiler() -> None:
    """Before compiling CUDA kernels: a (possibly stand-in) driver, TVM's CUDA runtime,
    and nvcc as the compiler (TVM's default, NVRTC, needs the cuda-bindings package),
    through ``compile_device_code``."""
    global _COMPILE_HOOKED
    if shutil.which("nvcc") is None:
        raise CudaToolchainError("building CUDA kernels needs nvcc on the PATH")
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    ensure_driver(allow_stub=True)
    import tvm  # noqa: F401  (loads libtvm_runtime_cuda itself when the driver loads)
    import tvm_ffi

    ensure_cuda_runtime(allow_stub=True)
    if not _COMPILE_HOOKED:
        # TVM compiles the device module through this global (tvm.support.nvcc's).
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_device_code,
                                     override=True)
        _COMPILE_HOOKED = True


def device_images(blob: bytes) -> list[dict]:
    """The NVIDIA device-code ELF images (cubins) embedded in ``blob``: offset, sm arch."""
    images: list[dict] = []
    start = 0
    while True:
        at = blob.find(b"\x7fELF", start)
        if at < 0:
            return images
        start = at + 4
        if at + 0x34 > len(blob) or blob[at + 4] != 2:  # ELFCLASS64 only
            continue
        machine = int.from_bytes(blob[at + 18:at + 20], "little")
        if machine != EM_CUDA:
            continue
        flags = int.from_bytes(blob[at + 48:at + 52], "little")
        # e_flags keeps the SM version in its low bits (0x5a = sm_90; newer ELF ABIs
        # shift it by 8): report both readings, the plausible one wins.
        low, shifted = flags & 0xFF, (flags >> 8) & 0xFF
        sm = low if 50 <= low <= 130 else shifted
        images.append({"offset": at, "sm": sm, "flags": flags})


def check_device_code(path: Path, arch: str) -> list[dict]:
    """Raise unless the exported library at ``path`` holds cubins for ``arch`` ("sm_90")."""
    images = device_images(Path(path).read_bytes())
    want = int(arch.removeprefix("sm_"))
    if not images:
        raise CudaToolchainError(
            f"{path} holds no CUDA device code: TVM kept only the CUDA source (is the "
            "CUDA runtime loaded? see mra_compile.cuda_toolchain)")
    if not any(img["sm"] == want for img in images):
        raise CudaToolchainError(f"{path}: device code is for sm_{images[0]['sm']}, not {arch}")
    return images


def device_source(executable) -> str:
    """The CUDA source of a compiled TVM executable's device module, as nvcc compiled it
    (``with_min_blocks``)."""
    for module in executable.mod.imports:
        if module.kind == "cuda":
            return with_min_blocks(module.inspect_source())
    raise CudaToolchainError("the executable has no CUDA device module")


def kernel_symbols(source: str) -> dict[str, str]:
    """``{__global__ kernel name: PrimFunc symbol}`` of a generated CUDA source (TVM names
    a PrimFunc's kernels ``<symbol>_kernel``, ``<symbol>_kernel_1``, ...)."""
    names = re.findall(
        r'extern "C" __global__ void (?:__launch_bounds__\(\d+(?:, \d+)?\) )?(\w+)\(', source)
    return {name: re.sub(r"_kernel(_\d+)?$", "", name) for name in names}


def nvcc_version() -> str:
    """``nvcc --version``'s release line (e.g. "release 13.0, V13.0.48")."""
    proc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if "release" in line]
    return lines[-1].split(",", 1)[-1].strip() if lines else "unknown"
