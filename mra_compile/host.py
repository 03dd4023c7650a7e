"""Facts about this machine and installation, and small file utilities.

The lowest layer: imports nothing of mra_compile, neither TVM nor torch. Everything that
keys a kernel to where it was built (CPU fingerprint, TVM version, source hash) and
every place files are written (the cache directory, atomic writes, the C compiler for
the small helper libraries) lives here.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_ENV = "MRA_COMPILE_CACHE_DIR"
# Ahead-of-time kernel libraries (``mra_compile.library``): directories, os.pathsep-separated.
LIBRARY_ENV = "MRA_COMPILE_KERNEL_LIBRARY"
LIBRARY_MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """Where exported kernels live (``MRA_COMPILE_CACHE_DIR`` overrides)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "mra_compile"


def kernel_library_dirs() -> list[str]:
    """The kernel library directories in ``MRA_COMPILE_KERNEL_LIBRARY`` (a CPU and a CUDA
    library can be used together)."""
    return [d for d in os.environ.get(LIBRARY_ENV, "").split(os.pathsep) if d]


def tvm_spec():
    """The installed ``tvm`` package's import spec, or None (a runtime-only machine)."""
    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):
        return None
    return spec if spec is not None and spec.submodule_search_locations else None


def library_tvm_version() -> str | None:
    """The TVM version the first readable kernel library was built with (None: none)."""
    for directory in kernel_library_dirs():
        try:
            return json.loads((Path(directory) / LIBRARY_MANIFEST).read_text()).get("tvm")
        except (OSError, ValueError):
            continue
    return None


@functools.cache
def tvm_version() -> str:
    """The installed apache-tvm; without it (a runtime-only deployment) the version the
    kernel library in ``MRA_COMPILE_KERNEL_LIBRARY`` was built with."""
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return library_tvm_version() or "not-installed"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
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


def machine() -> str:
    """The machine type ("x86_64"): what code generic for it is tied to."""
    return platform.machine()


def default_vector_width() -> int:
    """float32 lanes of the widest vector unit: 16 with AVX-512, else 8."""
    return 16 if "avx512f" in cpu_flags() else 8


def schedule_dir() -> Path:
    """The folder of ``mra_compile.schedules`` (the top-level ``schedules/``)."""
    spec = importlib.util.find_spec("mra_compile.schedules")
    if spec is None or spec.origin is None:
        raise ImportError("mra_compile.schedules is missing: install the package (pip install -e .)")
    return Path(spec.origin).parent


@functools.cache
def source_hash(family: str) -> str:
    """Hash of the operator definitions and the ``family`` ("cpu", "cuda") schedules: part
    of every kernel's key, so that editing either rebuilds."""
    h = hashlib.sha256()
    for path in (PACKAGE_DIR / "operators.py", schedule_dir() / f"{family}.py"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` then rename: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
