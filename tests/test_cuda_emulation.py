"""The CUDA kernels run on the CPU, the way a GPU runs them (tests/cuda_emulation/).

A CUDA library is built as for a GPU (``mra-compile build --target cuda --arch sm_80``:
TVM host code, nvcc cubins and the generated CUDA source). In a subprocess, stand-ins for
the NVIDIA driver and runtime (``fake_libcuda.c``, ``fake_libcudart.c``) are loaded
before TVM's CUDA runtime, which then loads the library and launches its kernels
through them exactly as on a GPU; they run each kernel from the library's CUDA source
compiled by g++ (``kernel_include/cuda_emu.h``), one fiber per CUDA thread. The op's
forward and backward take the CUDA code path on CPU tensors (the CUDA target with its
plan, I/O dtypes and kernel keys: ``emulator.install``), every kernel from the library.

Every kernel call runs under four variants (``emulator.VARIANTS``: threads and blocks in
order, reversed, random with preemption; registers, shared memory and workspaces
pattern- or zero-initialised) whose outputs must agree bit for bit, with checks on every
memory access: races (no barrier between two threads' conflicting accesses),
uninitialised reads, out-of-bounds and misaligned accesses, barrier errors. Outputs are
compared with the float64 reference (``mra2_reference``, with the op's own selection).

This test caught ``bwd_prep`` (before commit "bwd_prep: one kernel per stage"): its
outputs shared one kernel with cross-thread dependencies and no barrier (all warps wrote
``g`` that warp 0 then read, lane 0 read the other lanes' ``dsum``, ``da`` was stored by
every thread from a register only thread 0 set); every backward case failed on it.
``test_each_check_fires`` proves each check on a small kernel with that one bug.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUDA_HEAD_DIMS, EMULATION_RUNS, RTOL_FP32, SKIP_EMULATION
from cuda_emulation import emulator

from mra_compile import library

HERE = Path(__file__).resolve().parent

# CI sets MRA_COMPILE_REQUIRE_NVCC=1: there a missing nvcc, or a CUDA build of torch, fails
# these tests, never skips them.
pytestmark = [
    pytest.mark.skipif(
        shutil.which("nvcc") is None and not os.environ.get("MRA_COMPILE_REQUIRE_NVCC"),
        reason="needs nvcc on the PATH"),
    pytest.mark.skipif(
        SKIP_EMULATION,
        reason="needs a CPU build of torch (this one is a CUDA build, whose CUDA runtime "
               "the emulation cannot stand in for; conftest.SKIP_EMULATION)"),
]

ARCH = "sm_80"
HEAD_DIMS = CUDA_HEAD_DIMS  # ~3.3 minutes on 2 cores, the library built (conftest.sm80_library)
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("full", "sparse")
# As tests/test_op.py and tests/test_backward.py hold the CPU op to.
FORWARD_RTOL = {"float32": RTOL_FP32, "float16": 2e-3, "bfloat16": 1e-2}
BACKWARD_RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# The float32 output of a half-precision training forward (P v from P_hi + P_lo).
SPLIT_RTOL = 5e-5
WORKERS = 2  # emulating processes run side by side (one core each)


def _case(D, dtype, mode, masked):
    # N = 100: 4 blocks of 32, the last one mostly padding; 9 of the 16 blocks selected,
    # so that some block rows overflow into units. Masked: two sequences (the mask's
    # rows are per batch), a whole block of padding, padding at the end of one.
    # Unmasked: an inference forward too (the output in q's dtype: fp16/bf16 kernels other
    # than the training forward's, whose output is float32, ``split_pv``).
    return {"D": D, "dtype": dtype, "mode": mode, "masked": masked, "N": 100, "num_blocks": 9,
            "B": 2 if masked else 1, "H": 1 if masked else 2, "seed": D, "backward": True,
            "inference": not masked}


CASES = {f"{dtype}-{mode}-{'mask' if masked else 'nomask'}-D{D}": _case(D, dtype, mode, masked)
         for D in HEAD_DIMS for dtype in DTYPES for mode in MODES for masked in (False, True)}
# Cross-attention (docs/spec.md, "Extensions"): 70 queries (a query mask) against 130 keys
# (a key mask): both sides padded to 160 inside, the queries' extra blocks all padding.
CASES.update({f"{dtype}-{mode}-cross-D64": {**_case(64, dtype, mode, True), "Nk": 130, "N": 70}
              for dtype in DTYPES for mode in MODES})
# A peaky softmax (logit scale 2.5; one real query of 5 against 57 keys, 1 block per row):
# with D_t = g . out taken from the rounded half-precision output, g . v - D_t cancels and
# dq, dk came out 126-143% off their own size (this seed, simulated on the CPU); the
# backward computes the output again in float32 (``backward._backward``). Each gradient
# is held to the dtype's tolerance of its own largest entry.
PEAKY = {f"{dtype}-peaky-D64": {"D": 64, "dtype": dtype, "mode": "full", "masked": False,
                                "N": 5, "Nk": 57, "B": 1, "H": 1, "seed": 10,
                                "real_queries": 1, "scale": 2.5, "block_per_row": 1,
                                "backward": True}
         for dtype in ("float16", "bfloat16")}
CASES.update(PEAKY)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cuda_library(sm80_library):
    """The CUDA kernel library of the emulated GPU (the one tests/test_cuda_build.py checks)."""
    return sm80_library


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    return emulator.build_fakes(tmp_path_factory.mktemp("emulated_driver"))


def _run(spec: dict, workdir: Path, name: str, popen=subprocess.Popen) -> subprocess.Popen:
    (workdir / f"{name}.json").write_text(json.dumps(spec))
    return popen(
        [sys.executable, str(HERE / "cuda_emulation" / "runner.py"), str(workdir / f"{name}.json"),
         str(workdir / f"{name}.out.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _wait(proc: subprocess.Popen, workdir: Path, name: str, timeout: int) -> dict:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"the emulation ({name}) took more than {timeout} s:\n{output[-3000:]}")
    assert proc.returncode == 0, f"the emulation ({name}) failed:\n{output[-6000:]}"
    return json.loads((workdir / f"{name}.out.json").read_text())


def _emulate(cuda_library: Path, libs: list[str], cases: dict, fakes, workdir: Path,
             popen) -> dict:
    """Every case of ``cases``, forward and backward, emulated (``WORKERS`` processes, each
    started by ``popen``) on the kernels of ``cuda_library`` (``libs``: their builds for
    the emulation)."""
    env = {library.ENV: str(cuda_library), "MRA_COMPILE_CACHE_DIR": str(workdir / "cache"),
           library.ONLY_ENV: "1"}  # kernels from the library only: nothing compiled
    names = list(cases)
    procs = []
    try:
        for w in range(WORKERS):
            spec = {"fakes": fakes, "libs": libs, "manifest": str(cuda_library / library.MANIFEST),
                    "env": env, "arch": ARCH, "cases": [cases[n] for n in names[w::WORKERS]]}
            procs.append(_run(spec, workdir, f"worker{w}", popen))
        outs = [_wait(p, workdir, f"worker{w}", 1800) for w, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {}
    for w, out in enumerate(outs):
        for name, result in zip(names[w::WORKERS], out["results"]):
            results[name] = result
    return {"results": results, "launched": set().union(*(o["launched"] for o in outs)),
            "origins": set().union(*(o["origins"] for o in outs)),
            "source": (cuda_library / library.CUDA_SOURCE).read_text(),
            "manifest": json.loads((cuda_library / library.MANIFEST).read_text()),
            "report": json.loads((cuda_library / library.CUDA_REPORT).read_text())}


def _emulation_run(cases: dict):
    """A ``conftest.EMULATION_RUNS`` entry: ``cases`` emulated on the kernels of its
    library, with stand-ins for the driver of their own."""
    def run(builds, name: str, workdir: Path) -> dict:
        cuda_library, libs = builds.get(name), builds.emulation(name)
        workdir.mkdir(parents=True, exist_ok=True)
        fakes = emulator.build_fakes(workdir / "driver")
        return _emulate(cuda_library, libs, cases, fakes, workdir, builds.popen)
    return run


@pytest.fixture(scope="module")
def emulation(cuda_library, cuda_libraries):
    """Every case, forward and backward, emulated (``WORKERS`` processes): run by the
    session's background thread after the builds (``conftest.CudaLibraryBuilds``), beside
    the CPU tests. (``cuda_library``: a library fixture, so that this file runs last.)"""
    return cuda_libraries.emulated("emulation")


def _phase(emulation, case: str, phase: str) -> dict:
    """The forward or backward result of ``case``; it ran to its end."""
    result = emulation["results"][case]
    for earlier in ("forward", "backward")[:("forward", "backward").index(phase) + 1]:
        assert earlier in result, f"{case}: no {earlier} result"
        assert "exception" not in result[earlier], result[earlier]["exception"]
    return result[phase]


def _findings(findings: list[dict]) -> str:
    return "\n".join(f"  - [{f['check']}] {f['message']} ({f['count']}x; "
                     f"{', '.join(f['variants'])})" for f in findings)


# ----------------------------------------------------------------------------- the kernels


def test_kernels_come_from_the_library(emulation):
    failed = [r["forward"]["exception"] for r in emulation["results"].values()
              if "exception" in r["forward"]]
    assert emulation["origins"] == {"library"}, failed[:1]


def test_every_kernel_of_the_library_runs(emulation):
    names = set(emulator.kernel_names(emulation["source"]))
    assert names and names <= emulation["launched"], sorted(names - emulation["launched"])
    symbols = {re.sub(r"_kernel(_\d+)?$", "", n) for n in emulation["launched"]}
    # every (operator, static) variant of the manifest: each head dim, I/O dtype, mode
    assert {e["symbol"] for e in emulation["manifest"]["kernels"]} <= symbols


@pytest.mark.parametrize("case", list(CASES))
def test_forward(emulation, case):
    result = _phase(emulation, case, "forward")
    assert not result["findings"], f"forward of {case}:\n{_findings(result['findings'])}"
    assert result["finite"]
    dtype = CASES[case]["dtype"]
    assert result["error"] <= FORWARD_RTOL[dtype], (
        f"forward of {case}: relative error {result['error']:.3g} > {FORWARD_RTOL[dtype]:g}")
    if CASES[case]["masked"]:
        assert result["padding_zero"], "padded query rows are not zero"
    # The training forward's output: float32 for a half-precision result (its backward
    # reads it, forward.exact_output_dtype); an inference forward's in q's dtype. From P
    # split in two (``split_pv``) it is within ~2e-6 of the float64 reference (emulated,
    # D = 64); with P rounded once, 2-3e-3 (bf16) and 3e-4 (fp16).
    assert result["dtype"] == "torch.float32", result["dtype"]
    if dtype != "float32":
        assert result["error"] <= SPLIT_RTOL, (
            f"training forward of {case}: relative error {result['error']:.3g} > {SPLIT_RTOL:g}")
    if CASES[case].get("inference"):
        assert result["inference_dtype"] == f"torch.{dtype}", result["inference_dtype"]
        assert result["inference_finite"]
        assert result["inference_error"] <= FORWARD_RTOL[dtype], (
            f"inference forward of {case}: relative error {result['inference_error']:.3g}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_training_splits_p(emulation, dtype):
    """A half-precision training forward computes its float32 output on tensor cores
    from P split in two (``split_pv``), so the backward runs no forward kernel again (it
    had computed the output a second time from float32 copies of q, k, v: 3.1 of the
    17.0 ms of a bf16 training step on an H200, bench/results/gpu_h200.md)."""
    cases = [c for c in CASES if CASES[c]["dtype"] == dtype]
    for case in cases:
        forward = _phase(emulation, case, "forward")["training_calls"]
        hires = [c for c in forward if c["op"] in ("hires_units", "hires_rows")]
        assert hires and all(c["static"].get("split_pv") for c in hires), (case, hires)
        backward = _phase(emulation, case, "backward")["calls"]
        again = [c["op"] for c in backward
                 if c["op"] in ("hires_units", "hires_rows", "lowres_out")]
        assert not again, (case, again)


def test_the_cuda_path_reads_no_value_on_the_host(emulation):
    """No forward or backward of any case (masked, cross-attention and per-sequence
    budgets included) reads a tensor's values on the host (``runner.HostReads``): on a
    GPU such a read waits for the device, and a CUDA graph's capture refuses it, so each
    of these calls can be captured (``mra_compile.cuda_graphs``, which takes masked calls
    too: their masks' values are checked before, as bool needs no check)."""
    reads = {f"{case} {phase}": result[phase]["host_reads"]
             for case, result in emulation["results"].items()
             for phase in ("forward", "backward") if result.get(phase, {}).get("host_reads")}
    assert not reads, reads


def test_host_reads_are_found():
    """``runner.HostReads`` sees the op's reads of a tensor's values on the host (here the
    CPU's exact work plan, which reads the selection with numpy), and not the caller's."""
    import torch
    from cuda_emulation.runner import HostReads

    from mra_compile import plan

    with HostReads() as reads:
        plan.make_plan(torch.tensor([[0, 1, 5, 16]]), 4, 4, 1, 1, exact=True)
        assert bool(torch.ones(()))  # (the test's own read)
    assert reads.where and all("plan.py" in where for where in reads.where), reads.where


@pytest.mark.parametrize("case", list(CASES))
def test_backward(emulation, case):
    result = _phase(emulation, case, "backward")
    assert not result["findings"], f"backward of {case}:\n{_findings(result['findings'])}"
    assert result["finite"], f"backward of {case}: non-finite gradients"
    dtype = CASES[case]["dtype"]
    worst = max(result["errors"].values())
    assert worst <= BACKWARD_RTOL[dtype], (
        f"backward of {case}: gradient errors {result['errors']} > {BACKWARD_RTOL[dtype]:g}")
    if case in PEAKY:
        own = result["own_errors"]
        assert max(own.values()) <= BACKWARD_RTOL[dtype], (
            f"backward of {case}: errors over each gradient's own size {own} > "
            f"{BACKWARD_RTOL[dtype]:g}")


# ----------------------------------------------------------------------------- tuning variants

# What a GPU's tuning run chooses among (``mra-compile build --tuning-variants
# bfloat16:64``, bench/gpu_tune.py): every legal point of the four tunable kernels'
# spaces (schedules/cuda.py: SPACES, 16-24 each). Configuration i takes point i of each
# kernel (cycling through the shorter spaces), so the configurations run every variant of
# the library, forward and backward.
def _tuning_configs() -> list[dict]:
    from mra_compile import aot, targets
    from mra_compile.schedules import cuda

    target = targets.get(f"cuda-{ARCH}")
    points = {op: aot.space_points(op, target) for op in cuda.SPACES}
    count = max(len(p) for p in points.values())
    return [{op: p[i % len(p)] for op, p in points.items()} for i in range(count)]


TUNING_CASES = {f"config{i:02d}-{mode}": {**_case(64, "bfloat16", mode, masked), "knobs": config,
                                          "inference": True}  # (both hires variants)
                for i, config in enumerate(_tuning_configs())
                for mode, masked in (("full", False), ("sparse", True))}



def _rows_of_8_blocks() -> dict:
    """hires_rows with a row unit of 8 blocks where rows select 8 (N = 260: 9 key blocks,
    the last partial): every slot of the unit filled, no overflow unit (the tuning cases'
    N = 100 has 4 blocks a row at most)."""
    from mra_compile.schedules import cuda

    knobs = {op: dict(cuda.KNOBS[op]) for op in cuda.SPACES}
    knobs["hires_rows"]["row_unit_blocks"] = 8
    return {**_case(64, "bfloat16", "full", False), "N": 260, "num_blocks": 8 * 9,
            "knobs": knobs, "inference": True}


TUNING_CASES["rows-of-8-blocks-full"] = _rows_of_8_blocks()
# Grouped-query heads (the library's grouped variants, default knobs): 4 query heads on 2
# key/value heads, so that bwd_finish sums dk, dv over the query heads of a key/value head
# whose rows have different numbers of units (each loop bounded by its own row's count).
TUNING_CASES.update({f"grouped-heads-{mode}": {**_case(64, "bfloat16", mode, masked), "H": 4,
                                               "Hkv": 2, "inference": True}
                     for mode, masked in (("full", False), ("sparse", True))})


@pytest.fixture(scope="module")
def tuning_emulation(tuning_library, cuda_libraries):
    """The tuning variants of bf16, D = 64 (and the rest of that library), emulated (in the
    background, like ``emulation``)."""
    return cuda_libraries.emulated("tuning_emulation")


EMULATION_RUNS.update(emulation=_emulation_run(CASES),
                      tuning_emulation=_emulation_run(TUNING_CASES))


def test_every_tuning_variant_runs_and_none_spills(tuning_emulation):
    symbols = {re.sub(r"_kernel(_\d+)?$", "", n) for n in tuning_emulation["launched"]}
    variants = {e["symbol"]: e for e in tuning_emulation["manifest"]["kernels"]
                if e["op"] in {"hires_rows", "hires_units", "bwd_dq_units", "bwd_dkdv_units"}
                and e["static"].get("io") == "bfloat16" and not e["static"].get("gqa")}
    # hires_rows in both modes; both hires kernels also with P split (``split_pv``: the
    # training forward's)
    assert len(variants) == 24 * 2 * 2 + 16 * 2 + 16 * 2
    assert set(variants) <= symbols
    report = tuning_emulation["report"]
    for name, stats in report.items():
        entry = variants.get(re.sub(r"_kernel(_\d+)?$", "", name))
        if entry is not None:
            assert stats["spill_stores"] == 0 and stats["stack_frame"] == 0, (entry, stats)
            # P split in two pays only on tensor cores (schedules/cuda.py: _split_threads)
            if entry["static"].get("split_pv"):
                assert stats["mma"], (entry, stats)


@pytest.mark.parametrize("case", list(TUNING_CASES))
def test_tuning_variant(tuning_emulation, case):
    for phase in ("forward", "backward"):
        result = _phase(tuning_emulation, case, phase)
        assert not result["findings"], f"{phase} of {case}:\n{_findings(result['findings'])}"
        assert result["finite"], f"{phase} of {case}: non-finite values"
    forward = tuning_emulation["results"][case]["forward"]
    assert forward["error"] <= FORWARD_RTOL["bfloat16"], forward["error"]
    assert forward["inference_error"] <= FORWARD_RTOL["bfloat16"], forward["inference_error"]
    backward = tuning_emulation["results"][case]["backward"]
    assert max(backward["errors"].values()) <= BACKWARD_RTOL["bfloat16"], backward["errors"]


# ----------------------------------------------------------------------------- the checks


def _floats(n, **kw):
    return {"bytes": 4 * n, **kw}


def _halves(seed):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((16, 16)).astype(np.float16)


A, B = _halves(0), _halves(1)
SCHEDULES = ("reversed", "random")  # emulator.VARIANTS
ZEROED = "zero-init"
# kernel of broken_kernels.cu: launch, and what must happen: the kinds of report of the
# first variant (threads in order), variants whose outputs must differ from its (a
# correct kernel: none may), the launch's CUDA error
BROKEN = {
    "race_shared": (dict(grid=[1, 1, 1], block=[64, 1, 1], smem=256, args=[_floats(64)]),
                    {"reports": {"race", "uninit"}, "differs": SCHEDULES}),
    "race_warp": (dict(grid=[1, 1, 1], block=[32, 1, 1], smem=128, args=[_floats(1)]),
                  {"reports": {"race", "uninit"}, "differs": ("reversed",)}),
    "race_global": (dict(grid=[2, 1, 1], block=[32, 1, 1], args=[_floats(1)]),
                    {"reports": {"race"}, "differs": SCHEDULES}),
    "oob_global": (dict(grid=[1, 1, 1], block=[64, 1, 1], args=[_floats(32), {"int": 32}]),
                   {"reports": {"oob"}, "error": "CUDA_ERROR_ILLEGAL_ADDRESS"}),
    "oob_shared": (dict(grid=[1, 1, 1], block=[64, 1, 1], smem=256, args=[_floats(64)]),
                   {"reports": {"oob", "uninit"}, "error": "CUDA_ERROR_ILLEGAL_ADDRESS"}),
    "uninit_shared": (dict(grid=[1, 1, 1], block=[64, 1, 1], smem=256, args=[_floats(64)]),
                      {"reports": {"uninit"}, "differs": (ZEROED,)}),
    "uninit_register": (dict(grid=[2, 1, 1], block=[32, 1, 1], args=[_floats(64)]),
                        {"reports": set(), "differs": (ZEROED,)}),
    "uninit_global": (dict(grid=[1, 1, 1], block=[64, 1, 1],
                           args=[_floats(64), _floats(64, init=False)]),
                      {"reports": {"uninit"}, "differs": (ZEROED,)}),
    "misaligned_uint4": (dict(grid=[1, 1, 1], block=[32, 1, 1],
                              args=[{"bytes": 512}, {"bytes": 528}]),
                         {"reports": {"misaligned"}, "error": "CUDA_ERROR_MISALIGNED_ADDRESS"}),
    "misaligned_wmma": (dict(grid=[1, 1, 1], block=[32, 1, 1], smem=1024, args=[_floats(256)]),
                        {"reports": {"misaligned"}, "error": "CUDA_ERROR_MISALIGNED_ADDRESS"}),
    "divergent_barrier": (dict(grid=[1, 1, 1], block=[64, 1, 1], args=[_floats(64)]),
                          {"reports": {"barrier"}}),
    "race_static_shared": (dict(grid=[1, 1, 1], block=[64, 1, 1], args=[_floats(64)]),
                           {"reports": {"race", "uninit"}, "differs": SCHEDULES}),
    "oob_static_shared": (dict(grid=[1, 1, 1], block=[64, 1, 1], args=[_floats(64)]),
                          {"reports": {"oob", "uninit"}, "error": "CUDA_ERROR_ILLEGAL_ADDRESS"}),
    # correct twins: nothing reported, the same outputs in every variant
    "static_shared_fixed": (dict(grid=[1, 1, 1], block=[64, 1, 1], smem=256,
                                 args=[_floats(64)]),
                            {"reports": set(),
                             "out": [3.0 * ((i + 1) % 64) + 1.0 for i in range(64)]}),
    "race_shared_fixed": (dict(grid=[1, 1, 1], block=[64, 1, 1], smem=256, args=[_floats(64)]),
                          {"reports": set(), "out": [float((i + 1) % 64) for i in range(64)]}),
    "race_warp_fixed": (dict(grid=[1, 1, 1], block=[32, 1, 1], smem=128, args=[_floats(1)]),
                        {"reports": set(), "out": [528.0]}),
    "wmma_matmul": (dict(grid=[1, 1, 1], block=[32, 2, 1], smem=1024,
                         args=[_floats(256), {"bytes": 512, "data": list(A.tobytes())},
                               {"bytes": 512, "data": list(B.tobytes())}]),
                    {"reports": set(), "out": (A.astype("float32") @ B.astype("float32")).ravel()}),
}


@pytest.fixture(scope="module")
def broken(fakes, tmp_path_factory):
    """broken_kernels.cu: its nvcc cubin is the module image, its g++ build runs."""
    workdir = tmp_path_factory.mktemp("broken_kernels")
    source = HERE / "cuda_emulation" / "broken_kernels.cu"
    cubin = workdir / "broken_kernels.cubin"
    proc = subprocess.run(["nvcc", "-cubin", f"-arch={ARCH}", "-o", str(cubin), str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    libs = emulator.build_emulation(source, workdir)
    spec = {"fakes": fakes, "libs": libs, "image": str(cubin),
            "kernels": [{"name": name, **launch} for name, (launch, _) in BROKEN.items()]}
    out = _wait(_run(spec, workdir, "broken"), workdir, "broken", 300)
    return {k["name"]: k for k in out["kernels"]}


@pytest.mark.parametrize("kernel", list(BROKEN))
def test_each_check_fires(broken, kernel):
    import numpy as np

    _, expected = BROKEN[kernel]
    result = broken[kernel]
    assert "error" not in result, result["error"]
    first = result["runs"][0]
    kinds = {r["kind"] for r in first["reports"]}
    assert kinds == expected["reports"], first["reports"]
    assert all(r["kernel"] == kernel for r in first["reports"])  # reports name the kernel
    if "differs" in expected:
        assert set(expected["differs"]) <= set(result["differs"]), result["differs"]
    elif not expected["reports"]:
        assert not result["differs"], result["differs"]
    assert first["error"].startswith(expected.get("error", "CUDA_SUCCESS")), first["error"]
    if "out" in expected:
        np.testing.assert_allclose(result["floats"][0], expected["out"], rtol=1e-6, atol=1e-5)
