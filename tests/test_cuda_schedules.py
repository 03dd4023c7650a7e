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
    """The CUDA source of a scheduled PrimFunc (compiled as the kernels are: nvcc, sm_80)."""
    from mra_compile import build

    executable = build.compile_module({"main": sch.mod["main"]}, "cuda-sm_80", log=False)
    return executable.mod.imports[0].inspect_source()


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


def _global_allocations(func) -> list[str]:
    """Buffers a scheduled PrimFunc allocates in global memory (TVM's workspace)."""
    allocated = re.findall(r"(\w+) = T\.(?:sblock_)?alloc_buffer\(([^\n]*)", func.script())
    return [name for name, rest in allocated if "scope=" not in rest]


def test_no_kernel_keeps_global_memory_of_its_own():
    """Issue 15, item 5: raw_logits, real_max (pool_and_logits), weight (lowres_out) and
    weight, gv, dlog (bwd_lowres) lived in TVM's CUDA workspace pool, which takes them
    back when the kernels are queued, not when they finish: another stream, or a CUDA
    graph replaying, could get the same memory while they run. They are now arguments
    (``Kernel.scratch``), allocated by torch on the current stream."""
    from mra_compile import aot, build, knob_policy, targets

    target = targets.get("cuda-sm_80")
    found = {}
    for op, static in aot.variants([32], [64, 128], ("float32", "float16", "bfloat16"),
                                   target.scratch_args, target=target):
        func = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None, target=target),
                                    target)
        if _global_allocations(func):
            found[op, str(static)] = _global_allocations(func)
    assert not found


@needs_nvcc
@pytest.mark.parametrize("op, index", [("hires_units", "unit_row"), ("bwd_dq_units", "unit_row"),
                                       ("bwd_dkdv_units", "unit_col")])
def test_padding_units_return_at_once(op, index):
    """Issue 15, item 4: a CUDA plan is sized from the shapes (no host synchronisation),
    so at N = 16384 hires_units ran 2,296 units for ~1,536 real ones, each doing the full
    work. A padding unit (index -1) now leaves before its first stage."""
    from mra_compile import build, kernels, knob_policy, targets

    target = targets.get("cuda-sm_80")
    static = kernels.get(op).static(32, 64, "float32", None, None, True)
    func = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None, target=target),
                                target)
    source = build.compile_module({"main": func}, target, log=False).mod.imports[0].inspect_source()
    body = source[source.index('extern "C" __global__'):]
    body = body[body.index(") {") + 3:]  # the definition's body
    first = re.search(rf"if \({index}_ptr\[[^\]]*\] < 0\) \{{\s*return;\s*\}}", body)
    assert first, body[:1500]
    before = body[:first.start()]  # declarations only: no load, no barrier
    assert "__syncthreads" not in before and not re.search(r"_ptr\[\(", before), before


@needs_nvcc
@pytest.mark.parametrize("op, count, cap, gqa", [("hires_rows", "ov_units", "ucap", False),
                                                 ("bwd_finish", "q_units", "ucap_q", False),
                                                 ("bwd_finish", "k_units", "ucap_k", False),
                                                 ("bwd_finish", "k_units", "ucap_k", True)])
def test_unit_merges_run_as_many_steps_as_the_row_has_units(op, count, cap, gqa):
    """Issue 15, item 4: the loops over a row's overflow units ran to the shape bound
    ``ucap`` (255 at N = 16384; rows need 3 or 4), ~18 x ucap steps per thread in
    hires_rows. Each now stops at the row's own count (at least one step). With grouped
    heads, bwd_finish's dk, dv sum the units of each query row of a key/value row's group:
    each loop stops at that query row's count (the loop over the group around it)."""
    from mra_compile import build, kernels, knob_policy, targets

    target = targets.get("cuda-sm_80")
    static = kernels.get(op).static(32, 64, "float32", None, True if op == "hires_rows" else None,
                                    True, gqa)
    assert bool(static.get("gqa")) == gqa
    func = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None, target=target),
                                target)
    source = build.compile_module({"main": func}, target, log=False).mod.imports[0].inspect_source()
    loops = re.findall(rf"for \(int \w+ = 0; \w+ < ([^;]*\b{cap}\b[^;]*);", source)
    assert loops and all(f"max(min({cap}, {count}_ptr[" in bound for bound in loops), loops
    if gqa:  # (the query row: the key/value row times group, plus the group loop's index)
        assert all(re.search(r"\* group\) \+ \w+\)", bound) for bound in loops), loops


def test_half_precision_training_has_its_float32_output_kernels():
    """The fp16/bf16 backward reads D_t = g . out from the training forward's output in
    float32 (from the rounded output D_t cancelled against g . v where the softmax is
    peaky: dq, dk 126-143% off in tests/test_cuda_emulation.py's peaky cases), which
    hires_units and hires_rows compute from P split in two (``split_pv``): a library
    built for bf16 alone holds those variants, and ``bwd_prep``'s variant of the I/O
    dtype."""
    from mra_compile import aot, targets

    target = targets.get("cuda-sm_90")
    built = {(op, tuple(sorted(static.items()))) for op, static in aot.variants(
        [32], [64], ("bfloat16",), target.scratch_args, target=target)}
    for op in ("hires_units", "hires_rows"):
        for full in ((True, False) if op == "hires_rows" else (None,)):
            split = {"b": 32, "D": 64, "io": "bfloat16", "split_pv": True,
                     **({} if full is None else {"full": full})}
            assert (op, tuple(sorted(split.items()))) in built, (op, full)
    assert ("bwd_prep", (("D", 64), ("b", 32), ("io", "bfloat16"))) in built


def test_logits_are_scaled_after_the_product():
    """Every dtype: the forward's and the backward's units take q k^T of the masked,
    unscaled inputs and scale the product (fp16/bf16: scale * q rounded to fp16/bf16 again
    gave the backward's units logits other than the forward's stabilisers, dv 1.4% off in
    the peaky cases; float32: as SDPA and the reference, ``operators._masked_row``)."""
    from mra_compile import build, knob_policy, targets

    target = targets.get("cuda-sm_90")
    for op in ("hires_units", "bwd_dq_units", "bwd_dkdv_units"):
        for io in ("float16", "bfloat16", None):
            static = {"b": 32, "D": 64, **({"io": io} if io else {})}
            script = build.scheduled_func(
                op, static, knob_policy.resolve_knobs(op, None, target=target), target).script()
            assert re.search(r"dots\w*\[[^\]]*\] \* scale\b", script), (op, io)


@needs_nvcc
@pytest.mark.parametrize("op, products", [("pool_and_logits", ("raw_logits",)),
                                          ("lowres_out", ("o_lo",)),
                                          ("bwd_lowres", ("gv", "dqp", "dkp", "dvp"))])
@pytest.mark.parametrize("D", [64, 100])
def test_low_resolution_products_run_in_shared_tiles(op, products, D):
    """The n x n products of the low resolution ran one output per thread, each thread
    reading operand rows at a stride of D from global memory: the logits took 1.4 ms on
    an H200 at N = 16384, B*H = 16, bwd_lowres 2.9 ms (bench/results/gpu_h200.md). Each
    now stages 32 x 32 tiles of both operands in (dynamic) shared memory, rows padded to
    33 words against bank conflicts, and writes its output from registers."""
    from mra_compile import build, kernels, knob_policy, targets

    target = targets.get("cuda-sm_80")
    static = kernels.get(op).static(32, D, "float32", None, True if op == "pool_and_logits"
                                    else None, True)
    func = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None, target=target),
                                target)
    source = build.compile_module({"main": func}, target, log=False).mod.imports[0].inspect_source()
    bodies = re.split(r'extern "C" __global__', source)[1:]
    for name in products:
        writers = [b for b in bodies if re.search(rf"\b{name}_ptr\[[^\]]*\] =", b)]
        assert len(writers) == 1, name
        body = writers[0]
        staged = re.findall(r"buf_dyn_shmem_ptr\)\[([^\]]*)\] = ", body)
        assert len(staged) == 2, (name, staged)  # (both operands' tiles stored, ...)
        assert all("* 33)" in index for index in staged), (name, staged)  # (padded rows)
        assert "__syncthreads" in body, name


def _barriers_per_block(source: str) -> int:
    """``__syncthreads`` a thread block executes in the first kernel of ``source``: each
    one times the trip counts of the constant-bound loops around it (a loop with a
    symbolic bound counts once)."""
    start = re.search(r"__global__[^;{]*\{", source).start()  # (past the declarations)
    end = source.find("__global__", start + 1)
    kernel = source[start:end if end > 0 else len(source)]
    total, trips = 0, []
    for m in re.finditer(r"for \(int \w+ = 0; \w+ < (\d+); \+\+\w+\) \{|\{|\}|__syncthreads\(\)",
                         kernel):
        if m.group(0).startswith("for"):
            trips.append(int(m.group(1)))
        elif m.group(0) == "{":
            trips.append(1)
        elif m.group(0) == "}":
            trips.pop()
        else:
            count = 1
            for n in trips:
                count *= n
            total += count
    return total


@needs_nvcc
@pytest.mark.parametrize("op, io, most", [("hires_units", "bfloat16", 10),
                                          ("hires_rows", "bfloat16", 15),
                                          ("hires_rows", None, 46),
                                          ("bwd_dq_units", "bfloat16", 11),
                                          ("bwd_dkdv_units", "bfloat16", 15)])
def test_element_wise_unit_stages_have_no_barrier_per_iteration(op, io, most):
    """TVM's barrier planner sees every ``shared.dyn`` buffer as one and lets two accesses
    of a loop pass only where their indices are the same expression of the thread index.
    TIR's common subexpressions (naming the indices before the planner runs) and the
    transposing copy into P v's operand (another index read than written) had put a
    barrier in every iteration of such loops: 55 a unit of hires_units and 103 of
    hires_rows in bf16 (87 of hires_rows in float32) at D = 64, against 40, 78 (77)
    with ``cuda.PASS_CONFIG`` and (fp16/bf16) P v's operand stored key-major and loaded
    column-major; the backward's units, whose P and dS were such copies too: 41 (dq) and
    91 (dk, dv) against 26 and 61. Then the per-token values that element-wise loops read
    at another index (the keys' factors, the rows' maxima, sums and scales) in static
    shared memory, buffers of their own (``cuda._apart``): hires_units 40 -> 10,
    hires_rows 78 -> 15 (float32 77 -> 46), bwd_dq_units 26 -> 11, bwd_dkdv_units 61 -> 15."""
    from mra_compile import build, kernels, knob_policy, targets

    target = targets.get("cuda-sm_80")
    full = True if op == "hires_rows" else None
    static = kernels.get(op).static(32, 64, "float32", io, full, True)
    func = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None, target=target),
                                target)
    source = build.compile_module({"main": func}, target, log=False).mod.imports[0].inspect_source()
    assert 0 < _barriers_per_block(source) <= most, _barriers_per_block(source)


def _dynamic_shared_bytes(op: str, static: dict, knobs: dict) -> int:
    """The dynamic shared memory of ``op``'s CUDA kernel (sm_80), as TVM allocates it: the
    merged ``shared.dyn`` buffer after the pass that merges them."""
    from mra_compile import build, targets

    target = targets.get("cuda-sm_80")
    func = build.scheduled_func(op, static, knobs, target)
    seen = []

    @tvm.ir.instrument.pass_instrument
    class Merged:
        def run_after_pass(self, mod, info):
            if info.name.endswith("MergeSharedMemoryAllocations"):
                seen.append(mod.script())

    target.prepare_compiler()
    with tvm.transform.PassContext(config=cuda.PASS_CONFIG, instruments=[Merged()]), \
            target.tvm_target() as tgt:
        tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt)
    sizes = [int(n) for script in seen[-1:] for n in
             re.findall(r'alloc_buffer\(\((\d+),\), "uint8", scope="shared.dyn"\)', script)]
    assert len(sizes) == 1, sizes
    return sizes[0]


@pytest.mark.parametrize("io, D", [("bfloat16", 64), (None, 64), ("float16", 48),
                                   ("bfloat16", 128), (None, 128)])
def test_a_row_unit_of_8_blocks_is_legal_where_its_shared_memory_fits_sm80(io, D):
    """``cuda.constraints`` allows hires_rows 8 blocks in its row unit for block size 32
    and head dims up to 64 (``ROW_UNIT_8_MAX_HEAD_DIM``), whatever the dtype: there its
    dynamic shared memory, with the kernel's static arrays (under 2 KB), is within the
    163 KB (166912 bytes) a thread block may have on sm_80 (112 KB in bf16, 136 KB in
    float32 at D = 64); at D = 128 it is not (176 KB, 208 KB). (Between the two the limit
    is conservative: bf16 at D = 80 and 96 would fit, 128 and 144 KB.)"""
    from mra_compile import kernels, knob_policy, targets

    knobs = {**knob_policy.resolve_knobs("hires_rows", None, target=targets.get("cuda-sm_80")),
             "row_unit_blocks": 8}
    allowed = cuda.constraints("hires_rows", knobs, (D, 32))
    assert allowed == (D <= 64)
    for full in (True, False):
        static = kernels.get("hires_rows").static(32, D, "float32", io, full, True)
        dynamic = _dynamic_shared_bytes("hires_rows", static, knobs)
        assert (dynamic + 2048 <= 166912) == allowed, (io, D, full, dynamic)
