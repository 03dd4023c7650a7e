"""Rules of the CUDA schedules (schedules/cuda.py) checked on small operators, from the
generated CUDA source (TVM's code generator only: no nvcc, no GPU).

``bwd_prep`` once broke both: its four outputs shared one per-unit kernel although three
read another's values from other threads with no barrier between them, and its
one-value-per-unit output ``da`` was stored by every thread from a register only thread
0 had set (tests/test_cuda_emulation.py shows the backward right now)."""
import os
import re
import shutil

import pytest

from mra_compile import operators

tvm = pytest.importorskip("tvm")
from tvm import s_tir, te  # noqa: E402

from schedules import cuda  # noqa: E402

# CI sets MRA_COMPILE_REQUIRE_NVCC=1: there a missing nvcc fails these tests, never skips them.
needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("MRA_COMPILE_REQUIRE_NVCC"),
    reason="needs nvcc on the PATH")


def _source(sch) -> str:
    """The CUDA source of a scheduled PrimFunc (compiling it runs nvcc)."""
    return tvm.compile(sch.mod, target="cuda").mod.imports[0].inspect_source()


def test_per_unit_refuses_outputs_that_read_each_other():
    sch = s_tir.Schedule(te.create_prim_func(operators.bwd_prep(32, 64, "float32")))
    with pytest.raises(ValueError, match="'dsum' reads output 'g'"):
        cuda.per_unit(sch, ("g", "dsum", "ga", "da"), 2, 128)


@needs_nvcc
def test_one_value_per_unit_is_stored_by_one_thread():
    R, n = te.var("R"), te.var("n")
    x = te.placeholder((R, n, 32), "float32", "x")
    y = te.compute((R, n, 32), lambda r, i, t: x[r, i, t] * 2, name="y")
    t = te.reduce_axis((0, 32), "t")
    s = te.compute((R, n), lambda r, i: te.sum(y[r, i, t], axis=t), name="s")
    sch = s_tir.Schedule(te.create_prim_func([x, s]))
    cuda.per_unit(sch, ("s",), 2, 128)
    body = _source(sch)
    body = body[body.index("__syncthreads();"):]
    guard = body.index("< 1) {")
    stores = [m.start() for m in re.finditer(r"s_ptr\[[^\]]*\] =", body)]
    assert stores and all(pos > guard for pos in stores), body
    assert body.count("{") == body.count("}") - 1  # every store inside the guard's braces
    assert "s_local" not in body  # no register whose store could escape the guard


@needs_nvcc
def test_bwd_prep_is_one_kernel_per_stage():
    sch = s_tir.Schedule(te.create_prim_func(operators.bwd_prep(32, 64, "float32")))
    cuda.bwd_prep(sch, **cuda.KNOBS["bwd_prep"])
    source = _source(sch)
    definitions = re.findall(r"__global__ void[^;{]*\{", source)
    assert len(definitions) == 4, definitions
