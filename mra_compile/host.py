"""Facts about this machine and installation, and small file utilities.

The lowest layer: imports nothing of mra_compile, neither TVM nor torch. Everything that
keys a kernel to where it was built (CPU fingerprint, TVM version, source hash) and
every place files are written (the cache directory, atomic writes, the C compiler for
the small helper libraries) lives here, with the checks binaries pass before anything
loads them (``verified``, ``library_file``).
"""
from __future__ import annotations

import atexit
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
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from mra_compile import kernels

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_ENV = "MRA_COMPILE_CACHE_DIR"
# Ahead-of-time kernel libraries (``mra_compile.library``): directories, os.pathsep-separated.
LIBRARY_ENV = "MRA_COMPILE_KERNEL_LIBRARY"
LIBRARY_MANIFEST = "manifest.json"


class CacheWarning(UserWarning):
    """The kernel cache directory cannot be written: this process keeps its new kernels
    in a temporary directory (see ``writable_cache_dir``)."""


def cache_dir() -> Path:
    """Where exported kernels live (``MRA_COMPILE_CACHE_DIR`` overrides; ``~`` expanded)."""
    env = os.environ.get(CACHE_ENV)
    if not env:
        return Path.home() / ".cache" / "mra_compile"
    try:
        return Path(env).expanduser()
    except RuntimeError:  # "~user" of an unknown user: taken as it is
        return Path(env)


_WRITABLE_LOCK = threading.Lock()
_WRITABLE: dict[str, Path] = {}  # cache_dir() -> where this process writes its new files
_TEMPORARY: list[Path] = []  # this process's stand-in cache, when it needed one


def writable_cache_dir() -> Path:
    """Where new cache files go: ``cache_dir()`` (created if need be) when this process
    can write there; else (read-only, a file, a path that cannot be created) a temporary
    directory of this process, deleted at exit, with one ``CacheWarning`` per directory.
    Files already in ``cache_dir()`` are still read from there."""
    wanted = cache_dir()
    with _WRITABLE_LOCK:
        where = _WRITABLE.get(str(wanted))
        if where is None:
            where = _WRITABLE[str(wanted)] = _probe_writable(wanted)
        return where


def _probe_writable(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
        return directory
    except OSError as e:
        error = e
    if not _TEMPORARY:
        _TEMPORARY.append(Path(tempfile.mkdtemp(prefix="mra_compile-cache-")))
        atexit.register(shutil.rmtree, _TEMPORARY[0], ignore_errors=True)
    warnings.warn(
        f"mra_compile: the kernel cache {directory} cannot be written "
        f"({type(error).__name__}: {error.strerror or error}); this process keeps the "
        f"kernels it builds in {_TEMPORARY[0]}, deleted at exit, so the next process builds "
        f"them again. Set {CACHE_ENV} to a writable directory.", CacheWarning, stacklevel=3)
    return _TEMPORARY[0]


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
    """Hash of the operator definitions (the modules of the kernel registry's
    ``Kernel.module`` that define the ``family``'s kernels) and the ``family`` ("cpu",
    "cuda") schedules: part of every kernel's key, so that editing either rebuilds. (Of
    its own kernels only: an edit of a CPU-only TIR kernel does not make a CUDA library
    built before it stale.)"""
    h = hashlib.sha256()
    operators = [PACKAGE_DIR / f"{m}.py" for m in kernels.operator_modules(family)]
    # (the family's micro-kernels too: schedules/<family>_*.py and their C sources)
    extra = sorted(schedule_dir().glob(f"{family}_*.*"))
    for path in (*operators, schedule_dir() / f"{family}.py", *extra):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_sidecar(path: Path) -> Path:
    """The file holding the sha256 of the cached binary ``path`` (``<name>.sha256``)."""
    return path.with_name(path.name + ".sha256")


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return file_digest(Path(path))


def verified(path: Path, digest: str | None = None) -> bool:
    """Whether the binary ``path`` exists and its sha256 is ``digest`` (None: the one its
    ``digest_sidecar`` records). Loading a truncated or corrupt shared object can kill
    the process (SIGBUS) before any exception, so none is loaded unless this holds."""
    try:
        if digest is None:
            digest = digest_sidecar(path).read_text().strip()
        st = os.stat(path)
        return _digest_of(str(path), st.st_size, st.st_mtime_ns, st.st_ino) == digest
    except OSError:
        return False


def library_file(directory: str | os.PathLike, relative: str) -> Path | None:
    """``directory/relative`` of a kernel library (``mra-compile build``) when its
    manifest's ``files`` record that file's sha256 and the file matches it, else None."""
    try:
        files = json.loads((Path(directory) / LIBRARY_MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    digest = files.get(relative) if isinstance(files, dict) else None
    path = Path(directory) / relative
    return path if isinstance(digest, str) and verified(path, digest) else None


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


def compile_c_library(source: str, out: Path, flags: tuple[str, ...] = (),
                      shared: bool = True) -> Path:
    """Compile C ``source`` into the shared library ``out`` (``shared=False``: the
    position-independent object file ``out``, to link into another library) with the
    system C compiler (``$CC``, cc or gcc), once: an existing ``out`` whose
    ``digest_sidecar`` matches it is kept, a truncated or corrupt one (or one without
    sidecar) is rebuilt. Written to a temporary name and renamed, then its sidecar, so
    concurrent builders never see half a file (and build the same bytes)."""
    if verified(out):
        return out
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError(f"no C compiler (cc or gcc) to build {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.c"
        src.write_text(source)
        built = Path(tmp) / out.name
        kind = ["-shared", "-O2"] if shared else ["-c"]
        subprocess.run([cc, *kind, "-fPIC", *flags, "-o", str(built), str(src)],
                       check=True, capture_output=True)
        digest = file_digest(built)
        staged = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copyfile(built, staged)
        os.replace(staged, out)
    atomic_write(digest_sidecar(out), lambda tmp: Path(tmp).write_text(digest + "\n"))
    return out


def cached_c_library(source: str, relative: str, flags: tuple[str, ...] = (),
                     shared: bool = True) -> Path:
    """The helper library (or object file, ``shared=False``) ``relative`` of the kernel
    cache (e.g. "openmp/libx.so"): the cache's copy when it is intact, else compiled
    (``compile_c_library``) into ``writable_cache_dir()``."""
    existing = cache_dir() / relative
    if verified(existing):
        return existing
    return compile_c_library(source, writable_cache_dir() / relative, flags, shared)


def text_digest(text: str) -> str:
    """sha256 of ``text`` (hex)."""
    return hashlib.sha256(text.encode()).hexdigest()
