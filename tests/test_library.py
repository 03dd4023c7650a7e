"""Ahead-of-time kernel libraries: ``mra-compile build`` and MRA_COMPILE_KERNEL_LIBRARY."""
import json
from pathlib import Path

import pytest
from conftest import run_python

from mra_compile import cli, kernels, targets

RUN = r"""
import hashlib, json, sys
import torch, mra_compile, mra_compile.openmp
g = torch.Generator().manual_seed(3)
h = hashlib.sha256()
for N in (100, 700):
    q, k, v = (torch.randn(1, 2, N, 16, generator=g).requires_grad_() for _ in range(3))
    for mode in ("full", "sparse"):
        out = torch.ops.mra.attention(q, k, v, None, 3 * ((N + 31) // 32), mode)
        out.square().sum().backward()
        for t in (out, q.grad, k.grad, v.grad):
            h.update(t.detach().numpy().tobytes())
        q.grad = k.grad = v.grad = None
with torch.no_grad():
    # (an attention layer's views, [B, N, H, D] transposed: read where they lie)
    q, k, v = (torch.randn(2, 128, 2, 16, generator=g).transpose(1, 2) for _ in range(3))
    for mode in ("full", "sparse"):
        h.update(torch.ops.mra.attention(q, k, v, None, 8, mode).numpy().tobytes())
    # (inference calls of one signature: replayed by the launch cache)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g) for _ in range(3))
    for _ in range(3):
        out = torch.ops.mra.attention(q, k, v, None, 8, "sparse")
    h.update(out.numpy().tobytes())
from mra_compile import memory, native_replay
print(json.dumps({"origins": sorted({e["origin"] for e in mra_compile.cache_events()}),
                  "ops": sorted({e["op"] for e in mra_compile.cache_events()}),
                  "heads_last": sorted({e["op"] for e in mra_compile.cache_events()
                                        if e["static"].get("heads_last")}),
                  "hash": h.hexdigest(), "tvm": "tvm" in sys.modules,
                  "openmp": mra_compile.openmp.status(), "replay": native_replay.status(),
                  "from_c": any(p and p.native for p in memory.WORKSPACE.plans.values())}))
"""


def _run(env):
    return run_python(RUN, env=env, timeout=600)


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    assert cli.main(["build", "--target", "llvm", "--out", str(out), "--head-dims", "16"]) == 0
    return out


def test_build_writes_library_and_manifest(library_dir):
    manifest = json.loads((library_dir / "manifest.json").read_text())
    assert (library_dir / "mra_kernels.so").stat().st_size > 0
    ops = {e["op"] for e in manifest["kernels"]}
    # every kernel the CPU has, forward and backward
    assert ops == set(kernels.on_target(targets.CPU))
    # and the inference kernels that read q, k, v, also in an attention layer's layout
    assert {e["op"] for e in manifest["kernels"] if e["static"].get("heads_last")} == {
        "pool_and_logits", "hires_units", "hires_rows"}


def test_op_runs_from_the_library_with_the_runtime_only(library_dir, tmp_path):
    cached = _run({"MRA_COMPILE_CACHE_DIR": str(tmp_path / "reference-cache")})
    from_library = _run({"MRA_COMPILE_CACHE_DIR": str(tmp_path / "empty-cache"),
                         "MRA_COMPILE_KERNEL_LIBRARY": str(library_dir)})
    assert from_library["origins"] == ["library"]
    assert from_library["tvm"] is False  # no TVM compiler in the process
    assert not (tmp_path / "empty-cache").exists()
    # Its kernels' parallel loops on torch's threads, through the library's own launcher,
    # and its launch cache replaying from C through the library's own replay library
    # (nothing compiled: the empty cache stays absent).
    shipped = sorted(p.name.split("-")[0] for p in (library_dir / "runtime").glob("*.so"))
    assert shipped == ["libmra_openmp", "libmra_replay"]
    assert from_library["openmp"].startswith("torch's OpenMP threads")
    assert from_library["replay"] == "from C" and from_library["from_c"]
    assert from_library["hash"] == cached["hash"]
    assert from_library["ops"] == cached["ops"]
    assert from_library["heads_last"] == cached["heads_last"] == ["hires_rows", "pool_and_logits"]


def test_a_library_for_other_sources_is_ignored(library_dir, tmp_path):
    bad = tmp_path / "stale"
    bad.mkdir()
    manifest = json.loads((library_dir / "manifest.json").read_text())
    manifest["source"] = "0" * 16
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "mra_kernels.so").write_bytes((library_dir / "mra_kernels.so").read_bytes())
    report = _run({"MRA_COMPILE_CACHE_DIR": str(tmp_path / "cache"),
                   "MRA_COMPILE_KERNEL_LIBRARY": str(bad)})
    assert "library" not in report["origins"]


@pytest.mark.parametrize("argv", [
    ["build", "--target", "cuda", "--arch", "compute_90", "--out", "x"],
    ["build", "--out", "x", "--block-sizes", "12"],
    ["build", "--out", "x", "--head-dims", "0"],
])
def test_build_rejects_what_it_cannot_do(argv):
    assert cli.main(argv) == 2


UNINSTALLED = r"""
import importlib.util, json, sys
# As on a machine given only the checkout: no install, so no package-dir mapping.
sys.meta_path = [f for f in sys.meta_path
                 if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path.insert(0, sys.argv[1])
import mra_compile
from mra_compile import kernels, targets
from mra_compile.schedules import cpu, cuda
print(json.dumps({"schedules": importlib.util.find_spec("mra_compile.schedules").origin,
                  "ops": sorted(cuda.KNOBS) == sorted(kernels.on_target(targets.get("cuda-sm_90")))
                         and sorted(cpu.KNOBS) == sorted(kernels.on_target(targets.CPU))}))
"""


def test_a_source_checkout_finds_its_schedules_without_install(tmp_path):
    root = Path(cli.__file__).resolve().parent.parent
    report = run_python(UNINSTALLED, str(root), cwd=tmp_path, timeout=300)
    assert report == {"schedules": str(root / "schedules" / "__init__.py"), "ops": True}


FP16 = r"""
import json, warnings
import torch, mra_compile
warnings.simplefilter("error")  # (a library miss warns)
g = torch.Generator().manual_seed(4)
q, k, v = (torch.randn(1, 2, 128, 16, generator=g).half().requires_grad_() for _ in range(3))
grad = torch.randn(1, 2, 128, 16, generator=g).half()
out = torch.ops.mra.attention(q, k, v, None, 8, "full")
out.backward(grad)
x32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
out32 = torch.ops.mra.attention(*x32, None, 8, "full")
out32.backward(grad.float())
print(json.dumps({
    "origins": sorted({e["origin"] for e in mra_compile.cache_events()}),
    "widened": any(e["static"].get("widened") for e in mra_compile.cache_events()),
    "same": torch.equal(out, out32.half())
    and all(torch.equal(a.grad, b.grad.half()) for a, b in zip((q, k, v), x32))}))
"""


def test_float16_runs_on_copies_with_a_library_built_without_its_variants(library_dir,
                                                                          tmp_path):
    """float16 inputs with a library built for float32 only (no ``--dtypes float16``):
    its float32 kernels on float32 copies, as before the in-place variants existed, no
    warning and no compile, even with MRA_COMPILE_LIBRARY_ONLY=1."""
    manifest = json.loads((library_dir / "manifest.json").read_text())
    assert not any(e["static"].get("widened") for e in manifest["kernels"])
    report = run_python(FP16, env={"MRA_COMPILE_CACHE_DIR": str(tmp_path / "empty"),
                                   "MRA_COMPILE_KERNEL_LIBRARY": str(library_dir),
                                   "MRA_COMPILE_LIBRARY_ONLY": "1"}, timeout=600)
    assert report == {"origins": ["library"], "widened": False, "same": True}
