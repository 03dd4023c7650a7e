"""The warp-wide 16x16x16 tensor-core operations (CUDA wmma) that ``schedules/cuda.py``
tensorizes its fp16/bf16 products into, as TVM tensor intrinsics: zero an fp32
accumulator, load an A or B operand from shared memory, multiply-accumulate, store the
accumulator to shared or global memory.

They are defined here rather than imported from ``tvm.s_tir.tensor_intrin``: importing
that package parses every intrinsic TVM has for every target (x86, Arm, ROCm, Hexagon,
...): an sm_80 build for one head dim took 46 s with it, 18 s with these (2 cores).

Each intrinsic is a pair of PrimFuncs: the computation on 16x16 buffers (what
``tensorize`` matches a loop nest against) and its replacement, one ``tvm_*_matrix_sync``
call per warp. A fragment is addressed by its index among the 16x16 tiles of its buffer
(``_fragment``); shared and global operands by pointer and row stride.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

TILE = 16  # m = n = k of every wmma operation here
ACCUMULATOR = "wmma.accumulator"
_REGISTERED: set[str] = set()  # the intrinsics registered so far


def _fragment(buffer, row_stride):
    """Index of the 16x16 tile a fragment buffer view starts at, among its buffer's tiles
    (row-major, ``row_stride // 16`` tiles per row)."""
    tile_row = buffer.elem_offset // row_stride // TILE
    tile_col = buffer.elem_offset % row_stride // TILE
    return tile_row * (row_stride // TILE) + tile_col


def _view(handle, dtype, scope, strides=None):
    """A 16x16 view of ``handle`` in ``scope``, at any 16-aligned offset."""
    return T.match_buffer(handle, (TILE, TILE), dtype, align=64, offset_factor=TILE,
                          scope=scope, strides=strides)


def _copy(dtype, src_scope, dst_scope, call, transposed=False):
    """(computation, replacement) of copying one 16x16 tile from ``src_scope`` to
    ``dst_scope``; ``call(src, dst, src_stride, dst_stride)`` makes the replacement.
    ``transposed``: the tile lands transposed (``dst[j, i] = src[i, j]``, iterated in the
    source's order, as ``cache_read`` makes the copy)."""

    @T.prim_func(s_tir=True)
    def computation(a: T.handle, c: T.handle) -> None:
        src = _view(a, dtype, src_scope)
        dst = _view(c, dtype, dst_scope)
        with T.sblock("root"):
            T.reads(src[0:TILE, 0:TILE])
            T.writes(dst[0:TILE, 0:TILE])
            for i, j in T.grid(TILE, TILE):
                with T.sblock("copy"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    if transposed:  # (a Python constant: resolved when parsed)
                        dst[vj, vi] = src[vi, vj]
                    else:
                        dst[vi, vj] = src[vi, vj]

    @T.prim_func(s_tir=True)
    def replacement(a: T.handle, c: T.handle) -> None:
        src_stride = T.int32()
        dst_stride = T.int32()
        src = _view(a, dtype, src_scope, [src_stride, 1])
        dst = _view(c, dtype, dst_scope, [dst_stride, 1])
        with T.sblock("root"):
            T.reads(src[0:TILE, 0:TILE])
            T.writes(dst[0:TILE, 0:TILE])
            T.evaluate(call(src, dst, src_stride, dst_stride))

    return computation, replacement


def _load(dtype, operand, shared):
    """``shared`` memory -> a row-major ``operand`` ("a" or "b") fragment."""

    def call(src, dst, src_stride, dst_stride):
        return T.tvm_load_matrix_sync(dst.data, TILE, TILE, TILE, _fragment(dst, dst_stride),
                                      src.access_ptr("r", ptr_type=dtype), src_stride,
                                      "row_major", dtype="void")

    return _copy(dtype, shared, f"wmma.matrix_{operand}", call)


def _load_transposed(dtype, shared):
    """``shared`` memory holding the tile transposed ([k, m]) -> a matrix_a fragment,
    loaded column-major: the operand needs no transposing copy of its own."""

    def call(src, dst, src_stride, dst_stride):
        return T.tvm_load_matrix_sync(dst.data, TILE, TILE, TILE, _fragment(dst, dst_stride),
                                      src.access_ptr("r", ptr_type=dtype), src_stride,
                                      "col_major", dtype="void")

    return _copy(dtype, shared, "wmma.matrix_a", call, transposed=True)


def _store(scope):
    """An fp32 accumulator -> ``scope`` (row-major)."""

    def call(src, dst, src_stride, dst_stride):
        return T.tvm_store_matrix_sync(src.data, TILE, TILE, TILE, _fragment(src, src_stride),
                                       dst.access_ptr("w", ptr_type="float32"), dst_stride,
                                       "row_major", dtype="void")

    return _copy("float32", ACCUMULATOR, scope, call)


def _fill():
    """An fp32 accumulator set to 0."""

    @T.prim_func(s_tir=True)
    def computation(c: T.handle) -> None:
        acc = _view(c, "float32", ACCUMULATOR)
        with T.sblock("root"):
            T.reads()
            T.writes(acc[0:TILE, 0:TILE])
            for i, j in T.grid(TILE, TILE):
                with T.sblock("fill"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    acc[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def replacement(c: T.handle) -> None:
        stride = T.int32()
        acc = _view(c, "float32", ACCUMULATOR, [stride, 1])
        with T.sblock("root"):
            T.reads()
            T.writes(acc[0:TILE, 0:TILE])
            T.evaluate(T.tvm_fill_fragment(acc.data, TILE, TILE, TILE, _fragment(acc, stride),
                                           T.float32(0), dtype="void"))

    return computation, replacement


def _multiply_accumulate(dtype):
    """acc[i, j] += a[i, k] b[k, j] over one tile: ``dtype`` operands, fp32 accumulator."""

    @T.prim_func(s_tir=True)
    def computation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = _view(a, dtype, "wmma.matrix_a")
        B = _view(b, dtype, "wmma.matrix_b")
        acc = _view(c, "float32", ACCUMULATOR)
        with T.sblock("root"):
            T.reads(acc[0:TILE, 0:TILE], A[0:TILE, 0:TILE], B[0:TILE, 0:TILE])
            T.writes(acc[0:TILE, 0:TILE])
            for i, j, k in T.grid(TILE, TILE, TILE):
                with T.sblock("mma"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    acc[vi, vj] = acc[vi, vj] + (T.Cast("float32", A[vi, vk])
                                                 * T.Cast("float32", B[vk, vj]))

    @T.prim_func(s_tir=True)
    def replacement(a: T.handle, b: T.handle, c: T.handle) -> None:
        a_stride = T.int32()
        b_stride = T.int32()
        c_stride = T.int32()
        A = _view(a, dtype, "wmma.matrix_a", [a_stride, 1])
        B = _view(b, dtype, "wmma.matrix_b", [b_stride, 1])
        acc = _view(c, "float32", ACCUMULATOR, [c_stride, 1])
        with T.sblock("root"):
            T.reads(acc[0:TILE, 0:TILE], A[0:TILE, 0:TILE], B[0:TILE, 0:TILE])
            T.writes(acc[0:TILE, 0:TILE])
            T.evaluate(T.tvm_mma_sync(
                acc.data, _fragment(acc, c_stride), A.data, _fragment(A, a_stride),
                B.data, _fragment(B, b_stride), acc.data, _fragment(acc, c_stride),
                dtype="void"))

    return computation, replacement


def _registered(name: str, make) -> str:
    """``name``, with the (computation, replacement) pair ``make()`` registered under it
    the first time it is asked for."""
    if name not in _REGISTERED:
        TensorIntrin.register(name, *make(), override=True)
        _REGISTERED.add(name)
    return name


def intrinsics(io: str, shared: str) -> dict[str, str]:
    """Names of the registered intrinsics for ``io`` ("float16" or "bfloat16") operands
    staged in the ``shared`` memory scope ("shared" or "shared.dyn"): fill, load_a,
    load_b, load_a_transposed, sync, store_shared, store_global. Each is named by what it depends on and
    registered once."""
    if io not in ("float16", "bfloat16"):
        raise ValueError(f"wmma operands are float16 or bfloat16, not {io!r}")
    s = shared.replace(".", "_")
    return {
        "fill": _registered("mra_wmma_fill_f32", _fill),
        "load_a": _registered(f"mra_wmma_load_a_{io}_{s}", lambda: _load(io, "a", shared)),
        "load_b": _registered(f"mra_wmma_load_b_{io}_{s}", lambda: _load(io, "b", shared)),
        "load_a_transposed": _registered(f"mra_wmma_load_at_{io}_{s}",
                                         lambda: _load_transposed(io, shared)),
        "sync": _registered(f"mra_wmma_sync_{io}_f32", lambda: _multiply_accumulate(io)),
        "store_shared": _registered(f"mra_wmma_store_f32_{s}", lambda: _store(shared)),
        "store_global": _registered("mra_wmma_store_f32_global", lambda: _store("global")),
    }
