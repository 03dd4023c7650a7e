"""CUDA kernels without a GPU: every kernel compiles to real device code for sm_80 and
sm_90 with nvcc, uses shared memory, runs fp16/bf16 products on tensor cores, spills no
registers, and the library loads with the TVM runtime only.

What ptxas and the PTX say of each kernel comes from the library's own compile
(``device_report.json``, ``cuda_toolchain.device_report``): the checks hold for the
device code that ships.

Running them needs a GPU: ``bench/gpu_check.py`` does that on a lent H200.
"""
import json
import os
import re
import shutil
import sys

import pytest
from conftest import CUDA_HEAD_DIMS, REPO, SM90_HEAD_DIMS, run_python

from mra_compile import aot, cli, cuda_toolchain, host, library, targets

# CI sets MRA_COMPILE_REQUIRE_NVCC=1: there a missing nvcc fails these tests, never skips them.
pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("MRA_COMPILE_REQUIRE_NVCC"),
    reason="needs nvcc on the PATH")

HOT = ("hires_units", "hires_rows", "bwd_dq_units", "bwd_dkdv_units")
HALF = ("float16", "bfloat16")


@pytest.fixture(scope="module")
def sm90(sm90_library):
    return sm90_library  # (conftest.CUDA_LIBRARIES says what it holds and why)


@pytest.fixture(scope="module")
def sm80(sm80_library):
    return sm80_library  # (the library tests/test_cuda_emulation.py runs)


HEAD_DIMS = {"sm80": CUDA_HEAD_DIMS, "sm90": SM90_HEAD_DIMS}


def _manifest(directory):
    return json.loads((directory / library.MANIFEST).read_text())


def _kernel_bodies(source: str) -> dict[str, str]:
    """``{kernel name: its definition}`` of a generated CUDA source."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(
        r'extern "C" __global__ void (?:__launch_bounds__\(\d+(?:, \d+)?\) )?(\w+)\([^;]*?\{',
        source)]
    bodies = {}
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(source), None)]):
        bodies[name] = source[start:end]
    return bodies


def _by_op(directory, what="source"):
    """``{(op, io dtype, D): [kernel definitions]}`` of a CUDA library; ``what="report"``:
    the kernels' entries of its device report instead."""
    entries = {e["symbol"]: e for e in _manifest(directory)["kernels"]}
    source = (directory / library.CUDA_SOURCE).read_text()
    report = json.loads((directory / library.CUDA_REPORT).read_text())
    grouped = {}
    for name, body in _kernel_bodies(source).items():
        entry = entries[cuda_toolchain.kernel_symbols(body)[name]]
        key = (entry["op"], entry["static"].get("io", "float32"), entry["static"]["D"])
        grouped.setdefault(key, []).append(body if what == "source" else report[name])
    return grouped


def _compiled_alone(source: str, names, arch: str) -> dict[str, dict]:
    """The device report (``cuda_toolchain.device_report``) of the kernels ``names`` of a
    library's CUDA source, compiled by nvcc for ``arch`` without the others (after the
    source's common definitions)."""
    bodies = _kernel_bodies(source)
    preamble = source[:re.search(r'extern "C" __global__', source).start()]
    alone = preamble + "".join(bodies[n] for n in names)
    cuda_toolchain.prepare_compiler()
    cuda_toolchain.compile_device_code(alone, arch)
    return cuda_toolchain.device_report(cuda_toolchain.with_min_blocks(alone))


@pytest.mark.parametrize("fixture", ["sm80", "sm90"])
def test_every_kernel_is_real_device_code(fixture, request):
    directory = request.getfixturevalue(fixture)
    arch = fixture.replace("sm", "sm_")
    manifest = _manifest(directory)
    assert manifest["target"] == f"cuda-{arch}"
    images = cuda_toolchain.check_device_code(directory / library.LIBRARY, arch)
    assert images and all(img["sm"] == int(arch[3:]) for img in images)
    built = {(e["op"], json.dumps(e["static"], sort_keys=True)) for e in manifest["kernels"]}
    expected = {(op, json.dumps(static, sort_keys=True)) for op, static in aot.variants(
        [32], HEAD_DIMS[fixture], ("float32", "float16", "bfloat16"),
        scratch=True, gqa=fixture == "sm90", target=f"cuda-{arch}")}
    assert built == expected
    # every kernel of the manifest has its device functions in the library's source
    source = (directory / library.CUDA_SOURCE).read_text()
    symbols = set(cuda_toolchain.kernel_symbols(source).values())
    assert {e["symbol"] for e in manifest["kernels"]} <= symbols
    for lib in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        assert (directory / "runtime" / lib).is_file()
        # checked against this before a machine without TVM loads it
        assert host.library_file(directory, f"runtime/{lib}") == directory / "runtime" / lib
    assert host.library_file(directory, library.LIBRARY) == directory / library.LIBRARY


def test_hot_kernels_stage_blocks_in_shared_memory(sm90):
    for (op, io, D), bodies in _by_op(sm90).items():
        if op in HOT:
            assert any("buf_dyn_shmem" in b or "__shared__" in b for b in bodies), (op, io, D)


def test_half_precision_products_run_on_tensor_cores(sm90):
    grouped = _by_op(sm90)
    for op in ("hires_units", "hires_rows"):
        for io in HALF:
            body = "".join(grouped[(op, io, 64)])
            # both products of a unit (q k^T and P V) on wmma fragments of the input dtype
            assert body.count("nvcuda::wmma::mma_sync") >= 2, (op, io)
            ctype = "half" if io == "float16" else "nv_bfloat16"
            assert f"matrix_a, 16, 16, 16, {ctype}" in body, (op, io)
            # D=48: q k^T still on tensor cores, P V (3 column tiles, 4 warps) on CUDA cores
            assert "".join(grouped[(op, io, 48)]).count("nvcuda::wmma::mma_sync") >= 1
        body32 = "".join(grouped[(op, "float32", 64)])
        assert "wmma" not in body32  # fp32 stays on CUDA cores (exact to 1e-5)
    # The backward's unit products too: dq has 3 (q k^T, g v^T, dS k), dk/dv 4.
    for op, products in (("bwd_dq_units", 3), ("bwd_dkdv_units", 4)):
        for io in HALF:
            assert "".join(grouped[(op, io, 64)]).count("nvcuda::wmma::mma_sync") >= products
        assert "wmma" not in "".join(grouped[(op, "float32", 64)])
    # ... and so does the device code: in the PTX nvcc made of each hot kernel, mma
    # instructions on fp32 accumulators and operands of the kernel's dtype (PTX names fp16
    # operands implicitly: .f32.f32), none in the fp32 kernels. Every unit's P v (and
    # the backward's dS k, dS^T q) reads P (dS) column-major: stored key-major, as the
    # probabilities are, no transposing copy.
    operands = {"float16": "m16n16k16.f32.f32", "bfloat16": "m16n16k16.f32.bf16.bf16.f32"}
    for (op, io, D), kernels in _by_op(sm90, "report").items():
        if op in HOT and D == 64:
            used = set().union(*(k["mma"] for k in kernels))
            layouts = ("row.row", "col.row")
            want = ({f"wmma.mma.sync.aligned.{lay}.{operands[io]}" for lay in layouts}
                    if io in HALF else set())
            assert used == want, (op, io, used)


def test_the_build_leaves_tvms_intrinsic_sets_alone(sm90):
    # Importing tvm.s_tir.tensor_intrin parses every intrinsic of every target TVM knows:
    # 28 of the 46 s an sm_80 build for one head dim took (schedules/cuda_wmma.py).
    assert "tvm.s_tir.tensor_intrin" not in sys.modules


@pytest.mark.parametrize("fixture", ["sm80", "sm90"])
def test_hot_kernels_do_not_spill(fixture, request):
    directory = request.getfixturevalue(fixture)
    entries = {e["symbol"]: e for e in _manifest(directory)["kernels"]}
    source = (directory / library.CUDA_SOURCE).read_text()
    report = json.loads((directory / library.CUDA_REPORT).read_text())
    symbols = cuda_toolchain.kernel_symbols(source)
    assert set(report) == set(symbols)
    # The report is the library's own compile's: the first kernel of each hot op, compiled
    # again here alone, gets the same (the library is built in another process).
    sample = [next(n for n in report if entries[symbols[n]]["op"] == op) for op in HOT]
    arch = fixture.replace("sm", "sm_")
    assert _compiled_alone(source, sample, arch) == {n: report[n] for n in sample}
    for name, stats in report.items():
        assert stats["registers"] > 0, (name, stats)  # (ptxas reported on every kernel)
        op = entries[symbols[name]]["op"]
        if op in HOT:
            assert stats["spill_stores"] == 0 and stats["spill_loads"] == 0, (op, stats)
            assert stats["stack_frame"] == 0, (op, stats)


def test_kernels_are_compiled_for_two_resident_blocks(sm90, monkeypatch):
    """nvcc compiles every kernel with ``__launch_bounds__(T, MIN_BLOCKS)`` (through TVM's
    compile callback): with the thread count alone, ptxas squeezed some kernels into 32
    registers and spilled (cuda_toolchain.with_min_blocks)."""
    import tvm_ffi

    targets.get("cuda-sm_90").prepare_compiler()  # (what a build does first)
    source = (sm90 / library.CUDA_SOURCE).read_text()
    bounds = re.findall(r"__launch_bounds__\(([^)]*)\)", source)
    assert bounds and all(b.endswith(f", {cuda_toolchain.MIN_BLOCKS}") for b in bounds)
    assert cuda_toolchain.with_min_blocks(source) == source  # (idempotent)
    compiled = []  # TVM's compile callback is ours: it compiles with_min_blocks's source
    rewrite = cuda_toolchain.with_min_blocks
    monkeypatch.setattr(cuda_toolchain, "with_min_blocks",
                        lambda code: compiled.append(rewrite(code)) or compiled[-1])
    with targets.get("cuda-sm_90").tvm_target():
        assert tvm_ffi.get_global_func("tvm_callback_cuda_compile")(SMALL_KERNEL)
    assert compiled and "__launch_bounds__(64, 2)" in compiled[0]


SMALL_KERNEL = r"""
extern "C" __global__ void __launch_bounds__(64) small(float* __restrict__ x) {
  x[threadIdx.x] *= 2.0f;
}
"""


RUNTIME_ONLY = r"""
import importlib.abc, json, sys

class NoTVM(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tvm" or name.startswith("tvm."):
            raise ImportError("the TVM compiler is not installed here")

sys.meta_path.insert(0, NoTVM())
from mra_compile import build, library
loaded = library._load(library.directories()[0])
module, symbols, _ = loaded
manifest = json.loads(open(sys.argv[1] + "/manifest.json").read())
found = [library.lookup(e["key"]) is not None for e in manifest["kernels"]]
keys = [build.kernel_key(e["op"], e["static"], e["knobs"], manifest["target"])
        for e in manifest["kernels"]]
print(json.dumps({"found": all(found), "keys": keys == [e["key"] for e in manifest["kernels"]],
                  "tvm": "tvm" in sys.modules}))
"""


def test_library_loads_with_the_runtime_only(sm80, tmp_path):
    # As on a GPU machine without TVM: no compiler; the runtime comes from DIR/runtime/.
    env = {library.ENV: str(sm80), "MRA_COMPILE_CACHE_DIR": str(tmp_path)}
    assert run_python(RUNTIME_ONLY, str(sm80), env=env, timeout=300) == {
        "found": True, "keys": True, "tvm": False}


def test_source_only_modules_are_refused(tmp_path):
    # What TVM returns without a loaded CUDA runtime: a host library and no cubin.
    fake = tmp_path / "source_only.so"
    fake.write_bytes(b"\x7fELF" + b"\0" * 200 + b'extern "C" __global__ void k() {}')
    with pytest.raises(cuda_toolchain.CudaToolchainError, match="no CUDA device code"):
        cuda_toolchain.check_device_code(fake, "sm_90")


@pytest.mark.parametrize("argv", [
    ["build", "--target", "cuda", "--arch", "compute_90", "--out", "x"],
    ["build", "--target", "cuda", "--arch", "sm_60", "--out", "x"],
])
def test_build_rejects_unknown_architectures(argv):
    assert cli.main(argv) == 2


def test_gpu_check_reports_each_kernels_registers(sm90, monkeypatch):
    """bench/gpu_check.py's kernel table gives each traced call the registers and spills
    of its kernels in the bundle's build (a traced call as build.trace_kernel_calls
    records it)."""
    import mra_compile

    monkeypatch.syspath_prepend(str(REPO))
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "mc", mra_compile)
    monkeypatch.setenv(library.ENV, str(sm90))
    manifest = _manifest(sm90)
    report = json.loads((sm90 / library.CUDA_REPORT).read_text())
    for entry in manifest["kernels"][:40]:
        rec = {"op": entry["op"], "static": entry["static"], "resolved": entry["knobs"],
               "target": manifest["target"]}
        mine = {n: r for n, r in report.items() if n.startswith(entry["symbol"] + "_kernel")}
        assert gpu_check.device_resources(rec) == {
            "registers": max(r["registers"] for r in mine.values()),
            "spill B": sum(r["spill_stores"] for r in mine.values())}
    monkeypatch.setenv(library.ENV, "")
    assert gpu_check.device_resources(rec) == {}
