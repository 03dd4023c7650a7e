"""Hardening of the kernel cache and of kernel libraries (issue 14, items 2, 3 and 7).

- Every cached binary is checked before it is loaded: a truncated shared object kills the
  process that loads it with SIGBUS, before any exception, so each risky load runs in a
  fresh subprocess (``run_python``) and the test asserts that it exits cleanly.
- A cache directory that cannot be written gives one warning and a temporary cache;
  ``~`` in ``MRA_COMPILE_CACHE_DIR`` is expanded.
- A call a kernel library does not cover warns once per shape, or raises under
  ``MRA_COMPILE_LIBRARY_ONLY=1``; ``mra-compile build`` covers head dims 64 and 128.
"""
import ctypes
import hashlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_python

from mra_compile import aot, cli, host, native_replay, openmp, runtime


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def damage(path, how):
    data = Path(path).read_bytes()
    if how == "truncated":
        Path(path).write_bytes(data[: len(data) // 2])
    elif how == "empty":
        Path(path).write_bytes(b"")
    else:  # "flipped": same size, one byte changed past the headers
        at = len(data) // 2
        Path(path).write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])


# ---------------------------------------------------------------------------- item 2

OPENMP_STATUS = r"""
import json
from mra_compile import openmp
print(json.dumps({"status": openmp.status()}))
"""


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_a_damaged_cached_openmp_launcher_is_rebuilt_not_loaded(tmp_path, how):
    cache = tmp_path / "cache"
    env = {"MRA_COMPILE_CACHE_DIR": str(cache), "MRA_COMPILE_KERNEL_LIBRARY": ""}
    first = run_python(OPENMP_STATUS, env=env, cwd=REPO, timeout=300)
    assert first["status"].startswith("torch's OpenMP threads"), first
    launcher = cache / "openmp" / openmp.launcher_name()
    good = launcher.read_bytes()
    damage(launcher, how)

    # Loading the damaged file would kill this process with SIGBUS (rc -7).
    second = run_python(OPENMP_STATUS, env=env, cwd=REPO, timeout=300)
    assert second["status"].startswith("torch's OpenMP threads"), second
    assert launcher.read_bytes() == good  # rebuilt


def _has_real_driver():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


STUB = r"""
import json
from mra_compile import cuda_toolchain
print(json.dumps({"driver": cuda_toolchain.ensure_driver(allow_stub=True)}))
"""


@pytest.mark.skipif(_has_real_driver(), reason="a real libcuda.so.1 is used, not the stand-in")
def test_a_truncated_stand_in_libcuda_is_rebuilt_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    env = {"MRA_COMPILE_CACHE_DIR": str(cache)}
    assert run_python(STUB, env=env, cwd=REPO, timeout=300) == {"driver": "stub"}
    stub = cache / "nodriver" / "libcuda.so.1"
    good = stub.read_bytes()
    damage(stub, "truncated")
    assert run_python(STUB, env=env, cwd=REPO, timeout=300) == {"driver": "stub"}
    assert stub.read_bytes() == good


def test_compile_c_library_rebuilds_what_does_not_match_its_sidecar(tmp_path):
    source = "int mra_answer(void) { return 42; }\n"
    out = host.compile_c_library(source, tmp_path / "libanswer.so")
    assert host.digest_sidecar(out).read_text().strip() == sha256(out)
    assert host.verified(out)
    good = out.read_bytes()
    for how in ("truncated", "empty", "flipped"):
        damage(out, how)
        assert not host.verified(out), how
        assert host.compile_c_library(source, out) == out and out.read_bytes() == good, how
    # A file without its sidecar (as an older mra_compile left it) is rebuilt too.
    host.digest_sidecar(out).unlink()
    assert not host.verified(out)
    host.compile_c_library(source, out)
    assert host.verified(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libanswer.so", "libanswer.so.sha256"]


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory):
    """A CPU kernel library for D = 16 (block size 32, float32): ~10 s to build."""
    out = tmp_path_factory.mktemp("aot") / "lib16"
    assert cli.main(["build", "--target", "llvm", "--out", str(out), "--head-dims", "16"]) == 0
    return out


def test_the_manifest_records_the_sha256_of_every_binary(library_dir):
    manifest = json.loads((library_dir / "manifest.json").read_text())
    launcher = f"runtime/{openmp.launcher_name()}"
    replay = f"runtime/{native_replay.library_name()}"
    assert sorted(manifest["files"]) == sorted(["mra_kernels.so", launcher, replay])
    for name, digest in manifest["files"].items():
        assert digest == sha256(library_dir / name), name
        assert host.library_file(library_dir, name) == library_dir / name


RUNTIME_STATUS = r"""
import json
from mra_compile import native_replay, openmp
print(json.dumps({"openmp": openmp.status(), "replay": native_replay.status()}))
"""


@pytest.mark.parametrize("which", ["openmp", "replay"])
def test_a_truncated_runtime_library_in_a_library_is_not_loaded(library_dir, tmp_path, which):
    """The library's launcher or replay library, damaged: the kernel cache's copy is
    built and used instead."""
    name = openmp.launcher_name() if which == "openmp" else native_replay.library_name()
    lib = tmp_path / "lib"
    shutil.copytree(library_dir, lib)
    damage(lib / "runtime" / name, "truncated")
    cache = tmp_path / "cache"
    report = run_python(RUNTIME_STATUS, env={"MRA_COMPILE_CACHE_DIR": str(cache),
                                             "MRA_COMPILE_KERNEL_LIBRARY": str(lib)},
                        cwd=REPO, timeout=300)
    assert report["openmp"].startswith("torch's OpenMP threads"), report
    assert report["replay"] == "from C", report
    assert host.verified(cache / which / name)


CALL = r"""
import json, sys, warnings
import torch
import mra_compile
from mra_compile import library
warnings.simplefilter("always")
report = {"calls": []}
for D in [int(d) for d in sys.argv[1:]]:
    q = torch.randn(1, 2, 100, D)
    with warnings.catch_warnings(record=True) as caught:
        try:
            torch.ops.mra.attention(q, q, q, None, 8, "full")
            torch.ops.mra.attention(q, q, q, None, 8, "sparse")
            error = None
        except Exception as e:
            error = [type(e).__name__, str(e)]
    report["calls"].append({
        "D": D, "error": error,
        "warnings": [[w.category.__name__, str(w.message)] for w in caught
                     if issubclass(w.category, (library.KernelLibraryWarning,
                                                mra_compile.host.CacheWarning))]})
report["events"] = [{"op": e["op"], "origin": e["origin"], "path": e["path"]}
                    for e in mra_compile.cache_events()]
report["tvm"] = "tvm" in sys.modules
print(json.dumps(report))
"""


def call(*dims, **env):
    return run_python(CALL, *map(str, dims), env=env, cwd=REPO, timeout=600)


def test_a_truncated_kernel_library_is_ignored_not_loaded(library_dir, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(library_dir, lib)
    damage(lib / "mra_kernels.so", "truncated")
    cache = tmp_path / "cache"
    report = call(16, MRA_COMPILE_CACHE_DIR=str(cache), MRA_COMPILE_KERNEL_LIBRARY=str(lib),
                  MRA_COMPILE_LIBRARY_ONLY="1")
    (only,) = report["calls"]
    assert only["error"][0] == "KernelLibraryError"
    assert "sha256" in only["error"][1] and "MRA_COMPILE_LIBRARY_ONLY=1" in only["error"][1]
    assert any("is ignored" in m and "sha256" in m for _, m in only["warnings"])
    assert report["events"] == [] and not report["tvm"]
    assert not cache.exists()


def test_a_truncated_tvm_runtime_in_a_library_is_not_used(tmp_path, monkeypatch):
    # On a machine without TVM, the runtime comes from a library's runtime/ folder.
    monkeypatch.setattr(host, "tvm_spec", lambda: None)
    monkeypatch.delenv(runtime.RUNTIME_DIR_ENV, raising=False)
    lib = tmp_path / "lib"
    (lib / "runtime").mkdir(parents=True)
    so = lib / "runtime" / "libtvm_runtime.so"
    so.write_bytes(b"\x7fELF" + bytes(4000))
    manifest = {"files": {"runtime/libtvm_runtime.so": sha256(so)}}
    (lib / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(host.LIBRARY_ENV, str(lib))
    assert runtime.runtime_dir() == lib / "runtime"
    damage(so, "truncated")
    with pytest.raises(ImportError, match="TVM runtime was not found"):
        runtime.runtime_dir()


# ---------------------------------------------------------------------------- item 3

def test_tilde_in_the_cache_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(host.CACHE_ENV, "~/x")
    assert host.cache_dir() == tmp_path / "x"
    assert host.writable_cache_dir() == tmp_path / "x" and (tmp_path / "x").is_dir()
    assert not (Path.cwd() / "~").exists()


def _unwritable(kind, tmp_path):
    if kind == "a-file":
        path = tmp_path / "cache"
        path.write_text("not a directory")
        return path
    if kind == "under-a-file":
        (tmp_path / "file").write_text("not a directory")
        return tmp_path / "file" / "cache"
    if kind == "not-creatable":
        return Path("/proc/mra_compile_no_such_dir/cache")
    path = tmp_path / "cache"  # "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path


UNWRITABLE = ["a-file", "under-a-file", "not-creatable",
              pytest.param("read-only", marks=pytest.mark.skipif(
                  os.geteuid() == 0, reason="root writes to read-only directories"))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("kind", UNWRITABLE)
def test_an_unwritable_cache_warns_once_and_uses_a_temporary_one(tmp_path, kind):
    cache = _unwritable(kind, tmp_path)
    try:
        # Several kernels and the OpenMP launcher written, one warning.
        report = call(16, MRA_COMPILE_CACHE_DIR=str(cache), MRA_COMPILE_KERNEL_LIBRARY="")
    finally:
        if kind == "read-only":
            cache.chmod(0o755)
    assert [c["error"] for c in report["calls"]] == [None]
    assert len(report["events"]) >= 4
    warned = [m for c in report["calls"] for kind_, m in c["warnings"] if kind_ == "CacheWarning"]
    assert len(warned) == 1 and str(cache) in warned[0], warned
    paths = {Path(e["path"]).parent for e in report["events"]}
    assert {e["origin"] for e in report["events"]} == {"compiled"}
    (temporary,) = paths
    assert temporary != cache and temporary.name.startswith("mra_compile-cache-")
    assert str(temporary) in warned[0]
    assert not temporary.exists()  # deleted when the process exited
    if kind == "a-file":
        assert cache.read_text() == "not a directory"


# ---------------------------------------------------------------------------- item 7

def test_a_shape_the_library_lacks_warns_once_per_shape(library_dir, tmp_path):
    cache = tmp_path / "cache"
    report = call(16, 24, 24, 32, MRA_COMPILE_CACHE_DIR=str(cache),
                  MRA_COMPILE_KERNEL_LIBRARY=str(library_dir))
    d16, d24, d24_again, d32 = report["calls"]
    assert [c["error"] for c in report["calls"]] == [None] * 4
    assert d16["warnings"] == []  # covered
    # D = 24 and D = 32 share their kernels (head dims are padded to 16): one warning.
    ((category, message),) = d24["warnings"]
    assert category == "KernelLibraryWarning"
    assert "head dim 32" in message and "MRA_COMPILE_LIBRARY_ONLY=1" in message
    assert "--head-dims 32" in message
    assert d24_again["warnings"] == [] and d32["warnings"] == []
    origins = {e["origin"] for e in report["events"]}
    assert origins == {"library", "compiled"}


def test_library_only_makes_a_missing_shape_an_error(library_dir, tmp_path):
    cache = tmp_path / "cache"
    report = call(16, 24, MRA_COMPILE_CACHE_DIR=str(cache),
                  MRA_COMPILE_KERNEL_LIBRARY=str(library_dir), MRA_COMPILE_LIBRARY_ONLY="1")
    covered, missing = report["calls"]
    assert covered["error"] is None and covered["warnings"] == []
    name, message = missing["error"]
    assert name == "KernelLibraryError"
    assert "head dim 32" in message and "--head-dims 32" in message
    assert {e["origin"] for e in report["events"]} == {"library"}
    assert not report["tvm"]  # nothing compiled
    assert not cache.exists()  # nothing written


def test_library_only_without_a_library_is_an_error(tmp_path):
    cache = tmp_path / "cache"
    report = call(16, MRA_COMPILE_CACHE_DIR=str(cache), MRA_COMPILE_KERNEL_LIBRARY="",
                  MRA_COMPILE_LIBRARY_ONLY="1")
    assert report["calls"][0]["error"][0] == "KernelLibraryError"
    assert "MRA_COMPILE_KERNEL_LIBRARY is not set" in report["calls"][0]["error"][1]
    assert not report["tvm"] and not any(cache.glob("*.so"))


def test_build_covers_head_dims_64_and_128_and_says_so(capsys):
    args = cli.build_parser().parse_args(["build", "--out", "x"])
    assert {64, 128} <= set(args.head_dims) and args.block_sizes == [32]
    assert inspect.signature(aot.build_library).parameters["head_dims"].default == tuple(
        args.head_dims)
    assert cli.main(["build", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64 128)" in text and "(default: 32)" in text
    assert "MRA_COMPILE_LIBRARY_ONLY=1" in text
