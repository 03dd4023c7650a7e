"""Hand-written CUDA schedules, one named function per operator.

Each function takes an ``s_tir.Schedule`` of the operator's PrimFunc and its knobs as
keyword arguments (``KNOBS[op]`` holds the defaults), like ``schedules/cpu.py``.

Two shapes of kernel:
- *per-unit* kernels (the high-resolution work, the per-block backward stages): one
  thread block per unit of work (a (row, block) pair), every intermediate of the unit
  staged in shared memory (``shared.dyn``: one dynamic allocation, reused between stages
  whose lifetimes do not overlap), every stage's spatial loops spread over the block's
  ``threads`` threads, reductions accumulated in registers;
- *grid* kernels (the small low-resolution stages): each stage its own kernel, one thread
  per output element.

The gathered key and value blocks of a unit (``k_g``, ``v_g``) are staged in shared
memory chunk by chunk, with 16-byte vector loads. fp16/bf16 variants run the two products
of a unit (q k^T and P V) on tensor cores through wmma intrinsics (``cuda_wmma``),
accumulating in fp32 (``_tensor_core_unit``).
"""
from __future__ import annotations

SHARED = "shared.dyn"

# Lowering options (``build.compile_module``). TVM's barrier planner (ThreadSync) treats
# every ``shared.dyn`` buffer as one and lets two accesses in a loop go without a barrier
# only where their indices are the same expression *using the thread index*; TIR's common
# subexpression elimination runs first and names such indices (``cse_v19 = f * 128 +
# threadIdx.y * 32 + threadIdx.x``), which hides the thread index from it: element-wise
# stage loops then got a barrier per iteration (16 a stage). nvcc eliminates the common
# subexpressions itself (registers and spills unchanged). (Also tried: StorageRewrite
# off, which made the float32 sparse hires_rows wrong in the emulation for D != 64, no
# race reported; the unit's per-key factor inlined into the logits and the exps, but
# with StorageRewrite on hires_units fp16/bf16 at D = 128 then failed to lower:
# "tvm_access_ptr element type must match". The per-token values those loops read at
# another index live in static shared memory instead: ``_apart``.)
PASS_CONFIG = {"tirx.disable_cse_tir": True}


def _name(sch, block) -> str:
    return sch.get(block).name_hint


def _reduce_count(sch, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == 2)


WARP = 32


def _thread_bind(sch, block, loops, threads, vector=1):
    """Spread ``loops`` (consecutive spatial loops of ``block``, or none) over the block's
    threads: ``threads // 32`` warps (threadIdx.y) of 32 lanes (threadIdx.x).

    Every stage of a kernel binds the same extents (non-dividing ones are guarded), so
    thread extents agree, no two threads ever write one element, and the tensor-core
    stages can give whole warps one tile each. ``vector`` > 1: each thread moves that
    many consecutive elements with one vector instruction (the innermost extent must be
    a multiple of it)."""
    if not loops:
        loops = [sch.add_unit_loop(block)]
    if vector > 1:
        # Lanes along the innermost (contiguous) axis only: each vector is one row's
        # consecutive elements, so its gather index is the same for every lane.
        outer, vec = sch.split(loops[-1], [None, vector])
        loops = [*loops[:-1], outer]
        sch.vectorize(vec)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, ty, tx = sch.split(fused, [None, threads // WARP, WARP])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    return tx


def _itemsize(sch, name) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[
        str(sch.get(sch.get_sblock(name)).writes[0].source.dtype)]


def _spatial_loops_under(sch, block, anchor_depth):
    """The spatial loops of ``block`` below its first ``anchor_depth`` loops."""
    loops = sch.get_loops(block)[anchor_depth:]
    n_red = _reduce_count(sch, block)
    return list(loops[: len(loops) - n_red]) if n_red else list(loops)


def grid(sch, name, threads):
    """One thread per output element of stage ``name``: its own kernel. A reduction
    accumulates in a register and stores once, not updating its global output at every
    step (8-14% of the logits' and W v̂'s time on an H200 when they were grid kernels:
    their loads bound them, bench/results/gpu_h200.md)."""
    block = sch.get_sblock(name)
    loops = _spatial_loops_under(sch, block, 0)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if _reduce_count(sch, block):
        sch.reverse_compute_at(sch.cache_write(block, 0, "local"), tx)


TILE = 32  # the output tile side and the reduction chunk of ``tiled_product``


def tiled_product(sch, name, threads):
    """A thread block per ``TILE`` x ``TILE`` output tile of stage ``name``, an [R, I, J]
    product summed over one axis (``sum_k A[..] * B[..]``: the low-resolution logits,
    outputs and their gradients). Each reduction chunk of both operands is staged in
    shared memory by all threads (coalesced), each thread sums ``TILE**2 / threads``
    outputs of one column in registers. One thread per output, reading its operand rows
    at a stride of D from global memory, took the logits 1.4 ms on an H200 at N = 16384,
    B*H = 16 (0.4 TFLOP/s; bench/results/gpu_h200.md).

    The loops are first padded to whole tiles (``pad_einsum``: zero operands beyond the
    extents, so the sums are unchanged), which keeps the staged tiles a constant size
    (a tile of a symbolic extent cannot be allocated); the padding is staged, never
    stored: the result is written straight to the output, under its bounds."""
    block = sch.get_sblock(name)
    sch.pad_einsum(block, [1, TILE, TILE, TILE])
    block = sch.get_sblock(name)
    staged = sch.get_producers(block)
    r, i, j, k = sch.get_loops(block)
    i_out, i_in = sch.split(i, [None, TILE])
    j_out, j_in = sch.split(j, [None, TILE])
    k_out, k_in = sch.split(k, [None, TILE])
    warps = threads // WARP
    ty, each = sch.split(i_in, [warps, None])
    sch.reorder(r, i_out, j_out, ty, j_in, k_out, k_in, each)
    # (Row and tile row on blockIdx.x, tile column on blockIdx.y: fewer divisions by
    # symbolic extents in every index than with one fused axis.)
    sch.bind(sch.fuse(r, i_out), "blockIdx.x")
    sch.bind(j_out, "blockIdx.y")
    sch.bind(ty, "threadIdx.y")
    sch.bind(j_in, "threadIdx.x")
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, j_in)
    for unpad in sch.get_consumers(acc):  # (the copy out of the padded result: inlined)
        sch.reverse_compute_inline(unpad)
    sch.decompose_reduction(block, k_out)  # (the zeroing once, before the chunks)
    for operand in staged:
        # (Shared before compute_at: the tile is then all the threads' region, not one's.)
        sch.set_scope(operand, 0, SHARED)
        sch.compute_at(operand, k_out)
        # Rows one word longer than the tile: lanes reading down a column hit 32 banks.
        sch.storage_align(operand, 0, axis=len(sch.get(operand).writes[0].region) - 2,
                          factor=TILE, offset=1)
        loops = sch.get_loops(operand)[5:]  # (below the two tile loops, ty, j_in, k_out)
        _, fy, fx = sch.split(sch.fuse(*loops), [None, warps, WARP])
        sch.bind(fy, "threadIdx.y")
        sch.bind(fx, "threadIdx.x")


def per_unit(sch, outputs, depth, threads, custom=None, copies=(), vector_bytes=16):
    """One thread block per point of the first ``depth`` axes of ``outputs`` (merged).

    Every other computed stage is moved under that loop (consumers first), its buffer put
    in shared memory, and its spatial loops spread over ``threads`` threads. ``custom(sch)``, run once the
    stages are in place, schedules some stages itself and returns their names.
    ``copies``: gathers of contiguous rows (the key and value blocks), loaded with
    ``vector_bytes``-wide (coalesced 16-byte) accesses. Returns the block loop."""
    # Rows on blockIdx.x, the unit within its row on blockIdx.y (up to 65535): not fused,
    # so that every index stays affine in the loops (tensorize requires it).
    unit = None
    for level, axis in zip(range(depth), ("blockIdx.x", "blockIdx.y", "blockIdx.z")):
        loops = [sch.get_loops(sch.get_sblock(n))[level] for n in outputs]
        unit = sch.merge(*loops) if len(loops) > 1 else loops[0]
        sch.bind(unit, axis)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    names = [_name(sch, b) for b in blocks]
    inner = [n for n in names if n not in outputs]
    _check_independent(sch, outputs)
    for n in reversed(inner):
        sch.compute_at(sch.get_sblock(n), unit)
        sch.set_scope(sch.get_sblock(n), 0, SHARED)
    special = custom(sch) if custom is not None else ()
    for n in inner + list(outputs):
        if n in special:
            continue
        block = sch.get_sblock(n)
        vector = max(_gather_bytes(sch, vector_bytes) // _itemsize(sch, n), 1) if n in copies else 1
        loops = _spatial_loops_under(sch, block, depth)
        scalar = not loops
        thread = _thread_bind(sch, block, loops, threads, vector)
        if _reduce_count(sch, block) and not scalar:
            # Accumulate in a register, store once: a reduction updating shared memory
            # in place would need a barrier per step (and cannot have one under a guard).
            # Not for one value per unit: the register's store would land outside the
            # thread guard, every thread storing its own (uninitialised) register.
            sch.reverse_compute_at(sch.cache_write(block, 0, "local"), thread)
    return unit


def _gather_bytes(sch, vector_bytes):
    """The gathers' vector width: ``vector_bytes``, at most 8 in the grouped-query
    variants (a ``group`` parameter: k, v row r // group). With 16-byte gathers ptxas
    (13.0, sm_90) spilled 4-12 bytes there (hires_units D128 fp16, hires_rows D128 fp32,
    bwd_dq_units D48), with 8-byte ones nowhere (tests/test_cuda_build.py)."""
    grouped = any(p.name == "group" for p in sch.mod["main"].params)
    return min(vector_bytes, 8) if grouped else vector_bytes


def _check_independent(sch, outputs):
    """Outputs of one per-unit kernel live in global memory with no barrier between
    them: one that reads another would read other threads' values before they are
    written. Such stages go to separate kernels (``grid``)."""
    written = {str(sch.get(sch.get_sblock(n)).writes[0].source.name): n for n in outputs}
    for n in outputs:
        for region in sch.get(sch.get_sblock(n)).reads:
            source = written.get(str(region.source.name))
            if source is not None and source != n:
                raise ValueError(f"per_unit: output {n!r} reads output {source!r}; "
                                 "schedule them as separate kernels")


def _reads(sch, name):
    """The input buffer ``name``, from a stage that reads it."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        for region in sch.get(block).reads:
            if str(region.source.name) == name:
                return region.source
    raise ValueError(f"no stage reads {name!r}")


def skip_padding_units(sch, index: str):
    """A unit whose block index ``index`` [R, U] is -1 (the padding units a plan sized
    from the shapes has: ``plan.plan_bounds``) skips every stage's work.
    Nothing reads a padding unit's outputs (the plan points only at real units). The
    condition is the same for every thread of a block, so its barriers stay uniform.
    Applied last: later primitives could not see through the ``if``."""
    from tvm import tirx

    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    row, unit = sch.get_loops(blocks[0])[:2]  # blockIdx.x, blockIdx.y (per_unit)
    buf = _reads(sch, index)
    sref = sch.get_sref(unit)
    f = sref.stmt
    padding = tirx.BufferLoad(buf, [sch.get(row).loop_var, f.loop_var]) < 0
    # An early return, not an if around the stages: TVM puts no barrier inside a
    # condition, and the return needs none (the whole thread block leaves).
    leave = tirx.IfThenElse(padding, tirx.Return(tirx.const(0, "int32")), None)
    sch.state.replace(sref, tirx.For(f.loop_var, f.min, f.extent, f.kind,
                                     tirx.SeqStmt([leave, f.body]), f.thread_binding,
                                     f.annotations))


def _param(sch, name: str):
    """The kernel's scalar parameter ``name`` (a Var)."""
    return next(p for p in sch.mod["main"].params if p.name == name)


def bound_reductions(sch, stages, count: str, cap: str):
    """Reductions of ``stages`` over a row's units (extent the shape bound ``cap``: 255
    at N = 16384 when rows need 3 or 4) run ``count[r, i]`` steps (at least one, for
    the accumulator's initial value); the stages select by ``w < count[r, i]`` already,
    so the result is the same. Applied last, like ``skip_padding_units``."""
    from tvm import tirx

    buf = _reads(sch, count)
    for name in stages:
        block = sch.get_sblock(name)
        for loop in sch.get_loops(block):
            f = sch.get(loop)
            if not (isinstance(f.extent, tirx.Var) and f.extent.name == cap):
                continue
            realize = f.body
            while not hasattr(realize, "iter_values"):  # through a thread guard's if
                realize = realize.then_case if hasattr(realize, "then_case") else realize.body
            r, i = realize.iter_values[:2]  # the stage's (row, query block) iterators
            for var, value in zip(realize.block.iter_vars, realize.iter_values):
                if var.var.name.removeprefix("v_").startswith("g_"):  # grouped: row r group + g
                    r = r * _param(sch, "group") + value
            steps = tirx.max(tirx.min(f.extent, tirx.BufferLoad(buf, [r, i])), 1)
            sch.state.replace(sch.get_sref(loop), tirx.For(
                f.loop_var, f.min, steps, f.kind, f.body, f.thread_binding, f.annotations))


def _has_root(sch) -> bool:
    return _block_or_none(sch, "root") is not None


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


def pool_and_logits(sch, *, threads, full):
    """Block means per (row, block) in registers (no v̂ in "sparse" mode); logits, their
    row maxima as grids."""
    for name in ("qp", "kp", "vp") if full else ("qp", "kp"):
        blk = sch.get_sblock(name + "_sum")
        out = sch.get_sblock(name)
        grid(sch, name, threads)
        sch.compute_at(blk, sch.get_loops(out)[-1])
        sch.set_scope(blk, 0, "local")
    tiled_product(sch, "raw_logits", threads)
    for name in ("logits", "real_max", "rowmax"):
        grid(sch, name, threads)
    return sch


def lowres_out(sch, *, threads):
    """Weights as a grid kernel; W v̂ in tiles; sum W one thread per output."""
    grid(sch, "weight", threads)
    tiled_product(sch, "o_lo", threads)
    grid(sch, "z_lo", threads)
    return sch


def _wmma_matmul(sch, name, a_index, b_index, warps, io, a_transposed=False):
    """Tensor-core schedule of a [M, N] = sum_k A[M, k] B[k, N] stage under a unit loop.

    A and B (fp16/bf16, in shared memory) are loaded 16x16 fragment by fragment, each
    warp owns output tiles of 16x16 fp32 accumulators, stored back once.
    ``a_transposed``: A is stored [k, M] (read A[k, m]), loaded column-major."""
    from mra_compile.schedules import cuda_wmma  # (TVM's compiler: only when building)

    tc = cuda_wmma.intrinsics(io, SHARED)
    block = sch.get_sblock(name)
    m, n, k = sch.get_loops(block)[-3:]
    extents = [int(sch.get(loop).extent) for loop in (m, n, k)]
    if any(e % 16 for e in extents) or not any((e // 16) % warps == 0 for e in extents[:2]):
        return False  # no whole 16x16 tiles for every warp: CUDA cores (see per_unit)
    scope = sch.get(block).writes[0].source.scope()
    acc = sch.cache_write(block, 0, "wmma.accumulator")
    m_o, m_i = sch.split(m, [None, 16])
    n_o, n_i = sch.split(n, [None, 16])
    k_o, k_i = sch.split(k, [None, 16])
    sch.reorder(m_o, n_o, k_o, m_i, n_i, k_i)
    # Warps split the tile rows (or columns): one plain split keeps the indices affine,
    # which tensorize needs (a fused tile index does not).
    if (extents[0] // 16) % warps == 0:
        _, warp = sch.split(m_o, [None, warps])
    else:
        _, warp = sch.split(n_o, [None, warps])
    sch.bind(warp, "threadIdx.y")
    loops = sch.get_loops(block)
    tile = loops[[sch.get(loop).same_as(sch.get(k_o)) for loop in loops].index(True) - 1]
    sch.reverse_compute_at(acc, tile)  # each warp stores the tile it computed
    # (only for this stage: an operand may feed two products, as k_g does in dq)
    frag_a = sch.cache_read(block, a_index, "wmma.matrix_a", consumer_blocks=[block])
    if a_transposed:  # the fragment [m, k] all the same: its copy reads the tile transposed
        sch.transform_layout(frag_a, ("write", 0), _swap_last_two(_ndim(sch, frag_a)))
    frag_b = sch.cache_read(block, b_index, "wmma.matrix_b", consumer_blocks=[block])
    for frag in (frag_a, frag_b):
        sch.compute_at(frag, k_o)
    init = sch.decompose_reduction(block, k_o)
    # Tensorize: each stage's innermost 16x16 (x16) tile becomes one warp-wide intrinsic.
    sch.tensorize(sch.get_loops(init)[-2], tc["fill"])
    sch.tensorize(m_i, tc["sync"])
    load_a = tc["load_a_transposed"] if a_transposed else tc["load_a"]
    for frag, intrin in ((frag_a, load_a), (frag_b, tc["load_b"])):
        sch.tensorize(sch.get_loops(frag)[-2], intrin)
    acc_loops = sch.get_loops(acc)[-2:]
    a_o, a_i = sch.split(acc_loops[0], [None, 16])
    b_o, b_i = sch.split(acc_loops[1], [None, 16])
    sch.reorder(a_o, b_o, a_i, b_i)
    store = tc["store_global"] if scope == "global" else tc["store_shared"]
    sch.tensorize(a_i, store)
    return True


def _tensor_cores(threads, io, products, a_transposed=()):
    """``custom`` for ``per_unit``: the unit's ``products`` (stages [M, N] = sum_k A B with
    A, B its first two reads) on tensor cores, where their shapes split into 16x16 tiles
    for every warp (else they stay on CUDA cores); those in ``a_transposed`` read A
    stored [k, M]."""
    warps = threads // WARP

    def schedule(sch):
        return [name for name in products
                if _wmma_matmul(sch, name, 0, 1, warps, io, name in a_transposed)]

    return schedule


# A unit's products, as [M, N] = sum_k A[M, k] B[k, N] (A, B: the stage's first two reads).
FORWARD_PRODUCTS = ("dots", "unit_out")  # k_g q_t, prob_io v_g
DQ_PRODUCTS = ("dots", "dp", "dq_unit")  # k_g q_t, v_g g_t, ds_t k_g
DKDV_PRODUCTS = ("dots", "dp", "dv_unit", "dk_unit")  # q_g k_t, g_g v_t, prob_t g_g, ds_t q_g


def _io(sch, gather="k_g") -> str:
    """The dtype of q, k, v in the PrimFunc (float16/bfloat16 kernels use tensor cores)."""
    return str(sch.get(sch.get_sblock(gather)).writes[0].source.dtype)


def _cuda_core_threads(sch, threads, gather="k_g"):
    """fp32/fp64 units (CUDA cores) take at least 256 threads: at 128, ptxas spilled
    4-16 bytes in some of them (hires_rows D=128 on sm_90, bwd_dq_units on sm_80) although
    they use ~40-80 registers. fp16/bf16 keep ``threads``: 4 warps tile the products."""
    return threads if _io(sch, gather) in HALF else max(threads, 256)


def _custom(sch, threads, tensor_cores, products, gather="k_g", a_transposed=()):
    io = _io(sch, gather)
    return (_tensor_cores(threads, io, products, a_transposed)
            if tensor_cores and io in HALF else None)


def _probabilities_key_major(sch, tensor_cores, operands=(("prob_io", "unit_out"),),
                             gather="k_g"):
    """P v's operand P (``prob_io``, [b, W]) stored [W, b] like the probabilities it is
    rounded from, element for element in their order (queries on the lanes), and loaded
    column-major by the product: no transposing copy, which read a 32-way bank-conflicted
    column of the probabilities per store and, reading another index than it wrote, had
    a barrier per iteration (``PASS_CONFIG``). For fp16/bf16 with ``tensor_cores``;
    returns the products that read it so (for ``_custom``). (Where P v ends up on CUDA
    cores all the same, e.g. 8 warps, it reads the same values in the other order.)
    ``operands``: (the rounded copy, its product) pairs: the backward's P and dS
    (``operators._slot_product``'s ``prob_t``, ``ds_t``) the same way."""
    if not (tensor_cores and _io(sch, gather) in HALF):
        return ()
    for stage, _ in operands:
        block = sch.get_sblock(stage)
        sch.transform_block_layout(block, _swap_last_two(len(sch.get(block).iter_vars)))
        sch.transform_layout(block, ("write", 0), _swap_last_two(_ndim(sch, block)))
    return tuple(product for _, product in operands)


def _apart(sch, names):
    """The unit's per-token stages ``names`` (one value per key or per query: [W] or [b]
    a unit) in static shared memory, each a buffer of its own; those the kernel does not
    have (``full`` only, inlined, or in global memory) are left out. The barrier planner
    sees every ``shared.dyn`` buffer as one: an element-wise loop that read such a value
    (at another index than it reads and writes its elements at) got a barrier in every
    iteration. Written before those loops, the values need none there."""
    for name in names:
        # (a reduction accumulates in a register: its copy into shared memory writes it)
        for writer in (name, f"{name}_{SHARED}_local"):
            block = _block_or_none(sch, writer)
            if block is not None and sch.get(block).writes[0].source.scope() == SHARED:
                sch.set_scope(block, 0, "shared")


def _block_or_none(sch, name):
    """The block ``name``, or None where the function has none of that name."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (TVM raises its own error type for a missing block)
        return None


# hires_rows' per-query stages ([b] a unit; ``operators.hires_rows``).
HIRES_ROWS_TOKENS = ("unit_max", "unit_sum", "ov_stab", "row_best", "row_max", "own_scale",
                     "ov_z", "z_hi", "delta", "hi_scale", "lo_scale", "inv_norm")


def _ndim(sch, block) -> int:
    """Dimensions of the buffer ``block`` writes."""
    return len(sch.get(block).writes[0].source.shape)


def _swap_last_two(ndim: int):
    """The index map of ``ndim`` axes that swaps the last two."""
    from tvm.tirx import IndexMap

    return IndexMap.from_func(lambda *i: (*i[:-2], i[-1], i[-2]), ndim=ndim)


# The schedules that take ``split_pv``: whether P v takes P in two half-precision parts
# (``operators._unit_attention``; the training forward's float32 output).
SPLIT_PV = ("hires_units", "hires_rows")


def _split_threads(threads, split_pv):
    """At most 4 warps for the P-split variants: their products must stay on tensor cores
    (with 8 warps the 32-row products have no whole tile per warp), where the split costs
    one more tensor-core pass; on CUDA cores it doubled P v's work and hires_units spilled
    88 bytes (sm_80, D = 64, 2 blocks per unit, 256 threads)."""
    return min(threads, 4 * WARP) if split_pv else threads


def hires_units(sch, *, threads, blocks_per_unit, tensor_cores, vector_bytes, split_pv):
    """One thread block per overflow unit; see ``per_unit``. fp16/bf16: the unit's two
    products on tensor cores (``tensor_cores``)."""
    sch.compute_inline(sch.get_sblock("q_s"))  # (read straight into q_t's shared tile)
    threads = _split_threads(_cuda_core_threads(sch, threads), split_pv)
    custom = _custom(sch, threads, tensor_cores, FORWARD_PRODUCTS,
                     a_transposed=_probabilities_key_major(sch, tensor_cores))
    per_unit(sch, ("unit_max", "unit_out", "unit_sum"), 2, threads, custom=custom,
             copies=("k_g", "v_g"), vector_bytes=vector_bytes)
    _apart(sch, ("key_cap",))
    skip_padding_units(sch, "unit_row")
    return sch


HALF = ("float16", "bfloat16")


def hires_rows(sch, *, threads, row_unit_blocks, tensor_cores, vector_bytes,
               full, split_pv):
    """One thread block per (row, query block): its own unit, the merge of its overflow
    units, the low-resolution part and the normalisation, the output written once."""
    # [b, ucap] has a symbolic extent: recompute the merge factors where they are used.
    sch.compute_inline(sch.get_sblock("ov_scale"))
    sch.compute_inline(sch.get_sblock("q_s"))  # (read straight into q_t's shared tile)
    threads = _split_threads(_cuda_core_threads(sch, threads), split_pv)
    head_dim = int(sch.get(sch.get_loops(sch.get_sblock("k_g"))[-1]).extent)
    if _io(sch) in HALF and head_dim >= 128:
        vector_bytes = min(vector_bytes, 8)  # 16-byte gathers: ptxas spilled 4 B (sm_90)
    custom = _custom(sch, threads, tensor_cores, FORWARD_PRODUCTS,
                     a_transposed=_probabilities_key_major(sch, tensor_cores))
    per_unit(sch, ("out", "stab", "lo_w", "inv_z"), 2, threads, custom=custom,
             copies=("k_g", "v_g"), vector_bytes=vector_bytes)
    _apart(sch, ("key_cap",) + HIRES_ROWS_TOKENS)
    bound_reductions(sch, ("ov_stab", "ov_z", "ov_o"), "ov_units", "ucap")
    return sch


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


def bwd_prep(sch, *, threads):
    """Four grid kernels, in order: g; dsum and ga, which read g; da, which reads dsum.

    Each stage reads what other threads of the stage before wrote. In one kernel that
    needs a barrier between stages, and ``per_unit`` puts none between outputs in global
    memory (the first CUDA run would have read stale g and dsum): a kernel boundary is
    the barrier here. The stages are small (one pass over dout and out)."""
    for name in ("g", "dsum", "ga", "da"):
        grid(sch, name, threads)
    return sch


def _backward_products(sch, products, output, blocks_per_unit):
    """The backward's tensor-core products. TVM 0.27 fails to lower the [b, D] products
    whose B operand is also another product's A (k_g in dq; q_g, g_g in dk, dv) at
    D >= 128, and at D = 64 with 1 or 4 blocks per unit: "tvm_access_ptr element type
    must match the source buffer". Those stay on CUDA cores there (D = 64 with 2 blocks
    per unit, the default, has every product on tensor cores). (Fragment loads and stores
    given the address of a load instead, as the CPU's micro-kernel calls take their
    operands, ``extern_calls.pointer``: that check passes, and TVM's tensor-core pass
    then fails on "fragment k_g_shared.dyn_wmma.matrix_a must be filled or loaded
    before use"; 2026-12-07, D = 128.)"""
    head_dim = int(sch.get(sch.get_loops(sch.get_sblock(output))[-2]).extent)  # (t, d, w)
    if head_dim < 128 and blocks_per_unit == 2:
        return products
    return tuple(p for p in products if p in ("dots", "dp"))


def bwd_dq_units(sch, *, threads, blocks_per_unit, tensor_cores, vector_bytes):
    """One thread block per query-block unit; fp16/bf16: its three products on tensor
    cores."""
    for name in ("q_s", "g_s"):  # (read straight into the transposed shared tiles)
        sch.compute_inline(sch.get_sblock(name))
    threads = _cuda_core_threads(sch, threads)
    custom = _custom(sch, threads, tensor_cores, _backward_products(sch, DQ_PRODUCTS, "dq_unit",
                                                                blocks_per_unit),
                     a_transposed=_probabilities_key_major(sch, tensor_cores,
                                                           (("ds_t", "dq_unit"),)))
    per_unit(sch, ("dq_unit",), 2, threads, custom=custom, copies=("k_g", "v_g"),
             vector_bytes=vector_bytes)
    _apart(sch, ("key_factor",))
    skip_padding_units(sch, "unit_row")
    return sch


def bwd_dkdv_units(sch, *, threads, blocks_per_unit, tensor_cores,
                   vector_bytes):
    """One thread block per key-block unit; fp16/bf16: its four products on tensor
    cores."""
    for name in ("k_s", "v_s"):  # (read straight into the transposed shared tiles)
        sch.compute_inline(sch.get_sblock(name))
    custom = _custom(sch, threads, tensor_cores,
                     _backward_products(sch, DKDV_PRODUCTS, "dk_unit", blocks_per_unit),
                     gather="q_g",
                     a_transposed=_probabilities_key_major(
                         sch, tensor_cores, (("prob_t", "dv_unit"), ("ds_t", "dk_unit")),
                         gather="q_g"))
    per_unit(sch, ("dk_unit", "dv_unit"), 2, threads, custom=custom, copies=("q_g", "g_g"),
             vector_bytes=vector_bytes)
    _apart(sch, ("query_factor", "key_mask"))
    skip_padding_units(sch, "unit_col")
    return sch


def bwd_lowres(sch, *, threads):
    """Grid kernels over the n x n weights and dL; the four products in tiles."""
    for name in ("weight", "dlog"):
        grid(sch, name, threads)
    for name in ("gv", "dqp", "dkp", "dvp"):
        tiled_product(sch, name, threads)
    return sch


def bwd_finish(sch, *, threads):
    """One thread per output element; the unit partials summed in registers."""
    for name in ("dq", "dk", "dv"):
        grid(sch, name, threads)
        blk = sch.get_sblock(name + "_sum")
        sch.compute_at(blk, sch.get_loops(sch.get_sblock(name))[-1])
        sch.set_scope(blk, 0, "local")
    bound_reductions(sch, ("dq_sum",), "q_units", "ucap_q")
    bound_reductions(sch, ("dk_sum", "dv_sum"), "k_units", "ucap_k")
    return sch


# The defaults of every knob, the only place they are set.
KNOBS = {
    "pool_and_logits": dict(threads=256),
    "lowres_out": dict(threads=256),
    "hires_units": dict(threads=128, blocks_per_unit=2, tensor_cores=True, vector_bytes=16),
    "hires_rows": dict(threads=128, row_unit_blocks=2, tensor_cores=True, vector_bytes=16),
    "bwd_prep": dict(threads=128),
    "bwd_dq_units": dict(threads=128, blocks_per_unit=2, tensor_cores=True, vector_bytes=16),
    "bwd_dkdv_units": dict(threads=128, blocks_per_unit=2, tensor_cores=True, vector_bytes=16),
    "bwd_lowres": dict(threads=256),
    "bwd_finish": dict(threads=128),
}


# ---------------------------------------------------------------------------------------
# Tuning. The knobs of the hot per-unit kernels a GPU run may tune (``bench/gpu_check.py``
# times the variants an ahead-of-time library was built with, ``mra-compile build
# --tuning-variants``; the winners become tuning records, ``mra_compile.records``).
# threads: 2-8 warps (fp32 units take at least 256 anyway, ``_cuda_core_threads``; at 256
# the 32 x 32 half products have no whole tile per warp and stay on CUDA cores); blocks
# per unit: what one thread block stages in shared memory (1-4 blocks of k and v, at most
# ~100 KB at D = 128 in fp16/bf16); vector_bytes: the width of the gathers' loads.
# hires_rows' row unit also takes 8 blocks: a row's whole budget at 8 blocks per row (the
# must-show configuration of bench/gpu_check.py), so that no block goes to an overflow
# unit (hires_units: no unit outputs written to global memory and merged back), one
# thread block per (row, query block) as the design notes of bench/results/gpu_h200.md
# ask; ``constraints`` keeps it where its shared memory fits.
# tensor_cores stays on: the CUDA-core half products are what the tensor cores replace.
# ---------------------------------------------------------------------------------------

_UNIT_SPACE: dict[str, list] = {"threads": [64, 128, 256], "blocks_per_unit": [1, 2, 4],
                                "tensor_cores": [True], "vector_bytes": [8, 16]}
SPACES: dict[str, dict[str, list]] = {
    "hires_units": dict(_UNIT_SPACE),
    "hires_rows": {"threads": [64, 128, 256], "row_unit_blocks": [1, 2, 4, 8],
                   "tensor_cores": [True], "vector_bytes": [8, 16]},
    "bwd_dq_units": dict(_UNIT_SPACE),
    "bwd_dkdv_units": dict(_UNIT_SPACE),
}


# The dynamic shared memory of hires_rows with 8 blocks in its row unit (bytes, as TVM
# 0.27 allocates it, measured from the lowered kernels; full and sparse alike): 112 KB
# in bf16 at D = 64, 136 KB in float32; 176 and 208 KB at D = 128, over the 163 KB a
# thread block may have on sm_80 (sm_90: 227 KB). So 8 blocks only for block size 32 and
# head dims up to 64 (``ROW_UNIT_8_MAX_HEAD_DIM``), whatever the dtype (conservative in
# between: bf16 at D = 96 takes 144 KB). tests/test_cuda_schedules.py measures them.
ROW_UNIT_8_MAX_HEAD_DIM = 64


def constraints(op: str, knobs: dict, shape: tuple[int, int] | None = None) -> bool:
    """Whether ``knobs`` (every knob of ``op``) is a legal point of ``SPACES[op]``: exactly
    its knobs, each one of its listed values (type-strict: ``True`` is not ``1``), and not
    256 threads with 4 blocks per unit, where the two resident blocks of 256 threads that
    nvcc compiles for (``cuda_toolchain``: 128 registers a thread) spilled 80-172 bytes on
    sm_80 (hires_units, bwd_dq_units, bwd_dkdv_units; D = 64, bf16). For a ``shape`` (the
    head dim padded to 16, the block size), also that the kernel's shared memory fits
    every GPU the library targets (hires_rows' 8-block row unit, above); None: the knobs
    alone."""
    space = SPACES.get(op)
    if space is None or set(knobs) != set(space):
        return False
    if not all(any(type(knobs[k]) is type(v) and knobs[k] == v for v in values)
               for k, values in space.items()):
        return False
    if knobs["threads"] == 256 and knobs.get("blocks_per_unit") == 4:
        return False
    if shape is not None and knobs.get("row_unit_blocks") == 8:
        head_dim, block = shape
        return block == 32 and head_dim <= ROW_UNIT_8_MAX_HEAD_DIM
    return True
