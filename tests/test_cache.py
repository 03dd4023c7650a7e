"""The kernel disk cache, observed from fresh processes.

Each test points ``MRA_COMPILE_CACHE_DIR`` at its own empty directory and runs the op in
``sys.executable`` subprocesses, which report ``mra_compile.cache_events()``, a hash of
the output bytes and whether the TVM compiler (the ``tvm`` package) was imported.
"""

import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_python

SCRIPT = r"""
import hashlib, json, sys
import torch
import mra_compile
tvm_after_import = any(m == "tvm" or m.startswith("tvm.") for m in sys.modules)
g = torch.Generator().manual_seed(1234)
q, k, v = (torch.randn(2, 3, 520, 24, generator=g) for _ in range(3))
mask = torch.ones(2, 520)
mask[1, 450:] = 0
h = hashlib.sha256()
# 17 block rows and 284 of their 289 blocks: at least 12 rows hold all 17, more than a
# row's own unit takes (row_unit_blocks <= 16), so they need overflow units.
for args in ((None, 284, "full"), (mask, 60, "sparse", 32, 1, 2)):
    out = torch.ops.mra.attention(q, k, v, *args)
    h.update(out.numpy().tobytes())
print(json.dumps({
    "events": [{"op": e["op"], "origin": e["origin"], "path": e["path"]}
               for e in mra_compile.cache_events()],
    "hash": h.hexdigest(),
    "tvm_after_import": tvm_after_import,
    "tvm_at_end": any(m == "tvm" or m.startswith("tvm.") for m in sys.modules),
    "cache_dir": str(mra_compile.cache_dir()),
}))
"""

# The seven kernels SCRIPT needs: pool_and_logits and hires_rows come in a "full" and a
# "sparse" variant.
OPS = sorted(["pool_and_logits", "pool_and_logits", "select_plan", "hires_units", "lowres_out",
              "hires_rows", "hires_rows"])


def run_script(cache, script=SCRIPT, timeout=300):
    return run_python(script, env={"MRA_COMPILE_CACHE_DIR": str(cache)}, cwd=REPO,
                      timeout=timeout)


def origins(report):
    return sorted((e["op"], e["origin"]) for e in report["events"])


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "kernel-cache"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One process on an empty cache directory: (directory, its report)."""
    cache = tmp_path_factory.mktemp("first") / "kernel-cache"
    return cache, run_script(cache)


def test_second_process_loads_from_disk_without_tvm(first_run):
    cache, first = first_run
    assert first["cache_dir"] == str(cache)
    assert sorted(e["op"] for e in first["events"]) == OPS
    assert {e["origin"] for e in first["events"]} == {"compiled"}
    assert not first["tvm_after_import"]
    for e in first["events"]:
        path = Path(e["path"])
        assert path.parent == cache and path.suffix == ".so" and path.stat().st_size > 0
        assert path.with_suffix(".json").exists()
    # No temporary files left behind by the export-then-rename (beside the kernels: the
    # OpenMP launcher's folder, and the objects hires_rows and select_plan link: the
    # output's stores, the selection's scans).
    files = sorted(p.suffix for p in cache.iterdir() if p.is_file())
    assert files == [".json"] * len(OPS) + [".so"] * len(OPS)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["micro", "openmp"]
    assert sorted(p.suffix for p in (cache / "micro").iterdir()) == [".o", ".o", ".sha256",
                                                                     ".sha256"]

    second = run_script(cache)
    assert sorted(e["op"] for e in second["events"]) == OPS
    assert {e["origin"] for e in second["events"]} == {"disk"}
    assert sorted(e["path"] for e in second["events"]) == sorted(e["path"] for e in first["events"])
    assert second["hash"] == first["hash"]
    # The cached path loads kernels with the runtime (tvm_ffi) only: the TVM compiler
    # package is never imported.
    assert not second["tvm_after_import"]
    assert not second["tvm_at_end"], "tvm was imported although every kernel came from disk"


def test_import_does_not_import_tvm(cache):
    script = (
        "import sys, json\n"
        "import mra_compile\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'tvm' or m.startswith('tvm.'))))\n"
    )
    assert run_script(cache, script, timeout=120) == []
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("damage", ["garbage", "empty", "elf-header-only", "truncated-half",
                                    "other-kernel"])
def test_corrupt_cache_file_is_rebuilt(first_run, cache, damage):
    source, first = first_run
    shutil.copytree(source, cache)
    name = next(Path(e["path"]).name for e in first["events"] if e["op"] == "hires_units")
    victim = cache / name
    good = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(b"this is not a shared library\n" * 100)
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "elf-header-only":
        victim.write_bytes(good[:64])
    elif damage == "other-kernel":
        # A valid library of another operator under this kernel's name.
        other = next(Path(e["path"]) for e in first["events"] if e["op"] == "hires_rows")
        victim.write_bytes((cache / other.name).read_bytes())
    else:
        victim.write_bytes(good[: len(good) // 2])

    second = run_script(cache)
    assert second["hash"] == first["hash"]
    got = {(e["op"], Path(e["path"]).name): e["origin"] for e in second["events"]}
    assert got[("hires_units", name)] == "compiled"
    assert sorted(o for (op, _), o in got.items() if op != "hires_units") == ["disk"] * (len(OPS) - 1)
    assert victim.read_bytes()[:4] == b"\x7fELF" and victim.stat().st_size >= len(good) // 2

    # Rebuilt for good: a third process loads everything from disk again.
    third = run_script(cache)
    assert {e["origin"] for e in third["events"]} == {"disk"}
    assert third["hash"] == first["hash"]
    assert not third["tvm_at_end"]


def test_kernels_are_not_shared_across_cache_dirs(first_run, cache):
    # A different MRA_COMPILE_CACHE_DIR starts empty: everything is compiled there too.
    other = run_script(cache)
    assert {e["origin"] for e in other["events"]} == {"compiled"}
    assert other["hash"] == first_run[1]["hash"]


def test_every_operator_module_is_in_the_kernels_key(tmp_path, monkeypatch):
    """Editing any module that defines kernels (``Kernel.module``: the TE operators and the
    TIR selection kernel) changes the source hash in every kernel's key: a rebuild."""
    from mra_compile import host, kernels

    modules = kernels.operator_modules()
    assert {"operators", "selection_tir", "plan_tir"} <= set(modules)
    assert kernels.operator_modules("cpu") == modules
    for m in modules:
        (tmp_path / f"{m}.py").write_bytes((host.PACKAGE_DIR / f"{m}.py").read_bytes())
    monkeypatch.setattr(host, "PACKAGE_DIR", tmp_path)
    source_hash = host.source_hash.__wrapped__  # (not the per-process cache)
    base = source_hash("cpu")
    for m in modules:
        path = tmp_path / f"{m}.py"
        text = path.read_text()
        path.write_text(text + "\n# edited\n")
        assert source_hash("cpu") != base, m
        path.write_text(text)
    assert source_hash("cpu") == base


def test_cuda_kernels_key_on_their_own_modules(tmp_path, monkeypatch):
    """A CUDA library's kernels key on the modules of CUDA's kernels: editing a CPU-only
    TIR kernel (selection, the backward's plans) leaves a CUDA library built before valid;
    editing the TE operators does not."""
    from mra_compile import host, kernels

    cuda = kernels.operator_modules("cuda")
    assert "operators" in cuda and not {"selection_tir", "plan_tir"} & set(cuda)
    for m in kernels.operator_modules():
        (tmp_path / f"{m}.py").write_bytes((host.PACKAGE_DIR / f"{m}.py").read_bytes())
    monkeypatch.setattr(host, "PACKAGE_DIR", tmp_path)
    source_hash = host.source_hash.__wrapped__
    base = source_hash("cuda")
    for m, changes in (("plan_tir", False), ("selection_tir", False), ("operators", True)):
        path = tmp_path / f"{m}.py"
        text = path.read_text()
        path.write_text(text + "\n# edited\n")
        assert (source_hash("cuda") != base) == changes, m
        path.write_text(text)
