"""bf16 block products on AVX-512-BF16 CPUs: tensor intrinsics over the C micro-kernels of
``cpu_bf16.c``.

TVM 0.27 cannot emit ``vdpbf16ps`` (its bf16 legalisation rewrites the operands before
LLVM sees them), so the two 32 x 32 x D block products of a unit, ``dots`` (q k^T) and
``unit_out`` (P v), are tensorized into calls of C functions compiled with the system C
compiler and linked into the kernel library (``objects()``); so is the move of the
unit's queries into pairs of dims (``q_t``: 32-bit gathers, which LLVM does not make of
TVM's 16-bit loads).

bf16 values are int16 buffers holding their bits (``operators.bf16_widen`` reads them);
each intrinsic's description is the operator's own stage on one key block (P V reads the
probabilities in float32, key-major as the kernel computes them, and rounds them itself:
``prob_io`` is inlined into it). Each also
reads the block's index (the key block's position comes from ``unit_cols``/``row_cols``):
that read is in the description so that the two match.
"""
from __future__ import annotations

import functools
from pathlib import Path

from mra_compile.schedules import cpu_stores, extern_calls

SOURCE = Path(__file__).with_name("cpu_bf16.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16")
BLOCK = 32  # the micro-kernels' block edge


def objects() -> list[str]:
    """The micro-kernels as an object file to link into a kernel library (built once into
    the kernel cache)."""
    return cpu_stores.c_object(
        SOURCE, FLAGS, "avx512_bf16",
        "the bf16 micro-kernels need a C compiler that knows -mavx512bf16 (gcc 10+, clang "
        "9+). Set MRA_COMPILE_CPU_BF16=0 to compute bf16 inputs in float32 instead.")


def intrinsics(D: int, heads_last: bool = False) -> tuple[str, str, str]:
    """The names of the q k^T, P v and query-pairing intrinsics for head dim ``D``
    (registered once). ``heads_last``: k and v are [B, N, H, D] inputs, whose key
    blocks are [1, b, 1, D] regions (``_heads_last_qk``)."""
    qk, pairs = _intrinsics(D)
    if heads_last:
        return _heads_last_qk(D), _pv_intrinsic(D, rounded=True, heads_last=True), pairs
    return qk, _pv_intrinsic(D, rounded=True), pairs


@functools.cache
def _intrinsics(D: int) -> tuple[str, str]:
    """The q k^T and query-pairing intrinsics for head dim ``D`` (registered once)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    from mra_compile.operators import BF16_BITS as I16
    from mra_compile.operators import bf16_widen as widen

    b, F32 = BLOCK, "float32"

    @T.prim_func(s_tir=True)
    def qk_desc(a: T.handle, i: T.handle, q: T.handle, c: T.handle):
        sa, sc = T.int32(), T.int32()
        A = T.match_buffer(a, (b, D), I16, strides=[sa, 1], offset_factor=1)
        Ix = T.match_buffer(i, (1,), "int32", offset_factor=1)
        Q = T.match_buffer(q, (D // 2, b, 2), I16, offset_factor=1)
        C = T.match_buffer(c, (b, b), F32, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):  # (the sum with its init: C is written, not read)
            T.reads(A[0:b, 0:D], Ix[0:1], Q[0:D // 2, 0:b, 0:2])
            T.writes(C[0:b, 0:b])
            for w, t, p, e in T.grid(b, b, D // 2, 2):
                with T.sblock("update"):
                    vw, vt, vp, ve = T.axis.remap("SSRR", [w, t, p, e])
                    T.reads(C[vw, vt], A[vw, vp * 2 + ve], Ix[0], Q[vp, vt, ve])
                    T.writes(C[vw, vt])
                    with T.init():
                        C[vw, vt] = T.float32(0)
                    C[vw, vt] = C[vw, vt] + widen(A[vw, vp * 2 + ve]) * widen(Q[vp, vt, ve])

    @T.prim_func(s_tir=True)
    def pairs_desc(s: T.handle, q: T.handle):
        ss = T.int32()
        S = T.match_buffer(s, (b, D), I16, strides=[ss, 1], offset_factor=1)
        Q = T.match_buffer(q, (D // 2, b, 2), I16, offset_factor=1)
        with T.sblock("root"):
            T.reads(S[0:b, 0:D])
            T.writes(Q[0:D // 2, 0:b, 0:2])
            for p, t, e in T.grid(D // 2, b, 2):
                with T.sblock("pair"):
                    vp, vt, ve = T.axis.remap("SSS", [p, t, e])
                    Q[vp, vt, ve] = S[vt, vp * 2 + ve]

    def pairs_call(reads, writes):
        (S,), (Q,) = reads, writes
        return "mra_bf16_pairs", S.access_ptr("r"), S.strides[0], Q.access_ptr("w"), D

    names = (f"mra_bf16_qk_d{D}", f"mra_bf16_pairs_d{D}")
    for name, desc, call in zip(names, (qk_desc, pairs_desc), (_qk_call(D, 0), pairs_call)):
        TensorIntrin.register(name, desc, extern_calls.called(desc, call))
    return names


def _qk_call(D: int, row_dim: int):
    """The call of ``mra_bf16_qk`` for a q k^T description whose key block's rows are
    its dimension ``row_dim`` (``extern_calls.called``)."""
    def call(reads, writes):
        A, _, Q = reads
        (C,) = writes
        return ("mra_bf16_qk", A.access_ptr("r"), A.strides[row_dim], Q.access_ptr("r"),
                C.access_ptr("w"), C.strides[0], D)
    return call


@functools.cache
def _heads_last_qk(D: int) -> str:
    """The q k^T intrinsic whose key block is a [1, b, 1, D] region of a [B, N, H, D]
    input (tensorize matches regions dimension by dimension): the same call, the row
    stride that of N."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    from mra_compile.operators import BF16_BITS as I16
    from mra_compile.operators import bf16_widen as widen

    b = BLOCK

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, i: T.handle, q: T.handle, c: T.handle):
        s0, sa, s2, sc = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (1, b, 1, D), I16, strides=[s0, sa, s2, 1], offset_factor=1)
        Ix = T.match_buffer(i, (1,), "int32", offset_factor=1)
        Q = T.match_buffer(q, (D // 2, b, 2), I16, offset_factor=1)
        C = T.match_buffer(c, (b, b), "float32", strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:1, 0:b, 0:1, 0:D], Ix[0:1], Q[0:D // 2, 0:b, 0:2])
            T.writes(C[0:b, 0:b])
            for w, t, p, e in T.grid(b, b, D // 2, 2):
                with T.sblock("update"):
                    vw, vt, vp, ve = T.axis.remap("SSRR", [w, t, p, e])
                    T.reads(C[vw, vt], A[0, vw, 0, vp * 2 + ve], Ix[0], Q[vp, vt, ve])
                    T.writes(C[vw, vt])
                    with T.init():
                        C[vw, vt] = T.float32(0)
                    C[vw, vt] = C[vw, vt] + widen(A[0, vw, 0, vp * 2 + ve]) * widen(Q[vp, vt, ve])

    name = f"mra_bf16_qk_d{D}_heads_last"  # (A's row stride: that of its second dimension)
    TensorIntrin.register(name, desc, extern_calls.called(desc, _qk_call(D, 1)))
    return name


def float32_pv_intrinsic(D: int) -> str:
    """The name of the P v intrinsic that keeps P in float32 (float32 FMAs over the
    widened bf16 v: ``mra_bf16_pv_f32``) for head dim ``D`` (registered once)."""
    return _pv_intrinsic(D, rounded=False)


def gathered_pv_intrinsic(D: int) -> str:
    """The P v intrinsic (P rounded) for a P that is itself read through an index: the
    backward's dq from stored dS (``operators.bwd_dq_ds_units``: the block reads the key
    block's index, the dS block, the dS block's index, k, in that order)."""
    return _pv_intrinsic(D, rounded=True, gathered=True)


@functools.cache
def _pv_intrinsic(D: int, rounded: bool, gathered: bool = False,
                  heads_last: bool = False) -> str:
    """The P v intrinsic of one key block for head dim ``D`` (registered once): P, the
    float32 probabilities key-major, rounded to bf16 in the call (``mra_bf16_pv``) or not
    (``rounded=False``: ``mra_bf16_pv_f32``); v as bf16 bits; float32 sums. ``gathered``:
    the description reads a second index after P (``gathered_pv_intrinsic``);
    ``heads_last``: v's block a [1, b, 1, D] region of a [B, N, H, D] input."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    from mra_compile.operators import BF16_BITS as I16
    from mra_compile.operators import bf16_narrow as narrow
    from mra_compile.operators import bf16_widen as widen

    b, F32 = BLOCK, "float32"
    extern = "mra_bf16_pv" if rounded else "mra_bf16_pv_f32"

    def prob(p):  # P as the call multiplies it
        return widen(narrow(p)) if rounded else p

    @T.prim_func(s_tir=True)
    def desc(p: T.handle, v: T.handle, i: T.handle, c: T.handle):
        sp, sv, sc = T.int32(), T.int32(), T.int32()
        P = T.match_buffer(p, (b, b), F32, strides=[sp, 1], offset_factor=1)
        V = T.match_buffer(v, (b, D), I16, strides=[sv, 1], offset_factor=1)
        Ix = T.match_buffer(i, (1,), "int32", offset_factor=1)
        C = T.match_buffer(c, (b, D), F32, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:b, 0:D], Ix[0:1], P[0:b, 0:b], V[0:b, 0:D])
            T.writes(C[0:b, 0:D])
            for t, d, w in T.grid(b, D, b):
                with T.sblock("update"):
                    vt, vd, vw = T.axis.remap("SSR", [t, d, w])
                    T.reads(C[vt, vd], Ix[0], P[vw, vt], V[vw, vd])
                    T.writes(C[vt, vd])
                    C[vt, vd] = C[vt, vd] + prob(P[vw, vt]) * widen(V[vw, vd])

    @T.prim_func(s_tir=True)
    def gathered_desc(p: T.handle, v: T.handle, i: T.handle, j: T.handle, c: T.handle):
        sp, sv, sc = T.int32(), T.int32(), T.int32()
        P = T.match_buffer(p, (b, b), F32, strides=[sp, 1], offset_factor=1)
        V = T.match_buffer(v, (b, D), I16, strides=[sv, 1], offset_factor=1)
        Ix = T.match_buffer(i, (1,), "int32", offset_factor=1)
        Jx = T.match_buffer(j, (1,), "int32", offset_factor=1)
        C = T.match_buffer(c, (b, D), F32, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:b, 0:D], Ix[0:1], P[0:b, 0:b], Jx[0:1], V[0:b, 0:D])
            T.writes(C[0:b, 0:D])
            for t, d, w in T.grid(b, D, b):
                with T.sblock("update"):
                    vt, vd, vw = T.axis.remap("SSR", [t, d, w])
                    T.reads(C[vt, vd], Ix[0], P[vw, vt], Jx[0], V[vw, vd])
                    T.writes(C[vt, vd])
                    C[vt, vd] = C[vt, vd] + prob(P[vw, vt]) * widen(V[vw, vd])

    @T.prim_func(s_tir=True)
    def heads_last_desc(p: T.handle, v: T.handle, i: T.handle, c: T.handle):
        sp, s0, sv, s2, sc = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        P = T.match_buffer(p, (b, b), F32, strides=[sp, 1], offset_factor=1)
        V = T.match_buffer(v, (1, b, 1, D), I16, strides=[s0, sv, s2, 1], offset_factor=1)
        Ix = T.match_buffer(i, (1,), "int32", offset_factor=1)
        C = T.match_buffer(c, (b, D), F32, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:b, 0:D], Ix[0:1], P[0:b, 0:b], V[0:1, 0:b, 0:1, 0:D])
            T.writes(C[0:b, 0:D])
            for t, d, w in T.grid(b, D, b):
                with T.sblock("update"):
                    vt, vd, vw = T.axis.remap("SSR", [t, d, w])
                    T.reads(C[vt, vd], Ix[0], P[vw, vt], V[0, vw, 0, vd])
                    T.writes(C[vt, vd])
                    C[vt, vd] = C[vt, vd] + prob(P[vw, vt]) * widen(V[0, vw, 0, vd])

    def call(reads, writes):  # (C, the index, P, [the dS block's index,] V: the same
        # buffers as the description's; V's row stride that of its key dimension)
        C, P, V = reads[0], reads[2], reads[-1]
        return (extern, P.access_ptr("r"), P.strides[0], V.access_ptr("r"),
                V.strides[1 if heads_last else 0], C.access_ptr("rw"), C.strides[0], D)

    chosen = heads_last_desc if heads_last else gathered_desc if gathered else desc
    name = f"{extern}_d{D}" + ("_gathered" if gathered else "") + ("_heads_last" if heads_last else "")
    TensorIntrin.register(name, chosen, extern_calls.called(chosen, call))
    return name
