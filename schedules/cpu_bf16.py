"""bf16 block products on AVX-512-BF16 CPUs: tensor intrinsics over the C micro-kernels of
``cpu_bf16.c`` (which run their q k^T and P v on AMX tiles where the CPU has AMX-BF16,
deciding that themselves once a process: the kernels are the same either way).

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
that read is in the description so that the two match. The forward's exps, their sums
and P v are one call for all of a unit's key blocks instead (``exp_pv_slots``: its value
rows gathered through the slot table inside the description, which tensorize cannot
match; the schedule puts the call in place itself, checking the regions).
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


def intrinsics(D: int, heads_last: bool = False) -> tuple[str, str]:
    """The names of the q k^T and query-pairing intrinsics for head dim ``D`` (registered
    once). ``heads_last``: k is a [B, N, H, D] input, whose key blocks are [1, b, 1, D]
    regions (``_heads_last_qk``). (The forward's P v is ``exp_pv_slots``, the backward's
    ``block_pv_intrinsic``.)"""
    D = int(D)  # (an IntImm or an int: one cache entry, one registration)
    qk, pairs = _intrinsics(D)
    return _heads_last_qk(D) if heads_last else qk, pairs


def block_pv_intrinsic(D: int) -> str:
    """P v of one key block with P rounded to bf16 in the call (``mra_bf16_pv``, adding
    to its output): the backward's products."""
    return _pv_intrinsic(int(D), rounded=True)


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
        return "mra_bf16_pairs", extern_calls.pointer(S), S.strides[0], extern_calls.pointer(Q), D

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
        return ("mra_bf16_qk", extern_calls.pointer(A), A.strides[row_dim], extern_calls.pointer(Q),
                extern_calls.pointer(C), C.strides[0], D)
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


def exp_pv_slots(D: int, C: int, tokens, scale, heads_last: bool = False, asks=()):
    """A whole unit's exps, their sums and P v (the operator's stages ``prob``,
    ``unit_sum`` and ``unit_out`` of ``MICRO[0]``, P rounded for P v) for head dim ``D``
    and ``C`` key-block slots, as one call of ``mra_bf16_exp_pv_slots``, which skips the
    empty slots and computes each slot's probabilities from its logits as it pairs them
    for the products: they never go to memory in float32, and the sums ride along (the
    same operations in the same order: the same bits). ``schedules/cpu.py``'s
    ``_exp_pv_in_one_call`` puts the call in place of the three stages. The description
    is the three stages over the W = C b keys, the value rows gathered through the slot
    table (``operators._unit_attention``'s ``key_token``: the block index clamped at 0),
    with their inits: the call writes every value; it reads all ``tokens`` rows of v
    (the kernel's own length variable). Not a registered intrinsic: tensorize compares
    the rows' index against the block's as plain expressions, and the two read their slot
    tables through different buffers. ``heads_last``: v a [B, N, H, D] input, its rows a
    [1, N, 1, D] region. ``scale``: the kernel's (the logits' factor); ``asks``: the
    call's last arguments, what it asks for of the next unit (the kernel's expressions:
    ``schedules/cpu.py``'s ``_next_unit_rows``)."""
    from tvm import ir, tirx
    from tvm.script import tirx as T

    from mra_compile.operators import BF16_BITS as I16
    from mra_compile.operators import EXP2_CAP, EXP2_POLY_BF16, EXP_SHIFTER, LOG2_E
    from mra_compile.operators import bf16_narrow as narrow
    from mra_compile.operators import bf16_widen as widen
    from mra_compile.operators import rounded_probability as probability

    b, F32 = BLOCK, "float32"
    W = C * b
    log2e = tirx.const(LOG2_E, F32)
    # v [N, D], or [B, N, H, D] (heads_last: its rows a [1, N, 1, D] region)
    v_shape = (1, tokens, 1, D) if heads_last else (tokens, D)
    v_strides = [tirx.Var(f"sv{i}", "int32") for i in range(len(v_shape) - 1)] + [1]

    def v_at(V, row, d):
        return V[0, row, 0, d] if heads_last else V[row, d]

    def whole(V):
        return tirx.BufferRegion(V, [ir.Range.from_min_extent(0, e) for e in V.shape])

    @T.prim_func(s_tir=True, check_well_formed=False)  # (tokens, scale: the kernel's own)
    def desc(x: T.handle, i: T.handle, m: T.handle, k: T.handle, v: T.handle, s: T.handle,
             c: T.handle):
        sx, sc = T.int32(), T.int32()
        X = T.match_buffer(x, (W, b), F32, strides=[sx, 1], offset_factor=1)
        Ix = T.match_buffer(i, (C,), "int32", offset_factor=1)
        M = T.match_buffer(m, (b,), F32, offset_factor=1)
        K = T.match_buffer(k, (W,), F32, offset_factor=1)
        V = T.match_buffer(v, v_shape, I16, strides=v_strides, offset_factor=1)
        S = T.match_buffer(s, (b,), F32, offset_factor=1)
        O = T.match_buffer(c, (b, D), F32, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(X[0:W, 0:b], Ix[0:C], M[0:b], K[0:W], whole(V))
            T.writes(S[0:b], O[0:b, 0:D])
            P = T.sblock_alloc_buffer((W, b), F32)
            for w, t in T.grid(W, b):
                with T.sblock("prob"):
                    vw, vt = T.axis.remap("SS", [w, t])
                    P[vw, vt] = probability(X[vw, vt], M[vt], K[vw], scale)
            for t, w in T.grid(b, W):
                with T.sblock("unit_sum"):
                    vt, vw = T.axis.remap("SR", [t, w])
                    with T.init():
                        S[vt] = T.float32(0)
                    S[vt] = S[vt] + T.if_then_else(Ix[vw // b] >= 0, P[vw, vt], T.float32(0))
            for t, d, w in T.grid(b, D, W):
                with T.sblock("unit_out"):
                    vt, vd, vw = T.axis.remap("SSR", [t, d, w])
                    with T.init():
                        O[vt, vd] = T.float32(0)
                    O[vt, vd] = O[vt, vd] + widen(narrow(P[vw, vt])) * widen(
                        v_at(V, T.max(Ix[vw // b], 0) * b + vw % b, vd))

    def call(reads, writes):  # (the logits, the index, the maxima, the caps, V)
        X, Ix, M, K, V = reads
        S, O = writes
        poly = [tirx.const(p, F32) for p in EXP2_POLY_BF16[1:]]
        return ("mra_bf16_exp_pv_slots", extern_calls.pointer(X), X.strides[0],
                extern_calls.pointer(M), extern_calls.pointer(K), scale * log2e, log2e,
                tirx.const(EXP2_CAP, F32), *poly, tirx.const(EXP_SHIFTER, F32),
                extern_calls.pointer(V), V.strides[1 if heads_last else 0],
                extern_calls.pointer(Ix), C, extern_calls.pointer(O), O.strides[0],
                extern_calls.pointer(S), D, *asks)

    return extern_calls.called(desc, call)


def float32_pv_intrinsic(D: int) -> str:
    """The name of the P v intrinsic that keeps P in float32 (float32 FMAs over the
    widened bf16 v: ``mra_bf16_pv_f32``) for head dim ``D`` (registered once)."""
    return _pv_intrinsic(int(D), rounded=False)


def gathered_pv_intrinsic(D: int) -> str:
    """The P v intrinsic (P rounded) for a P that is itself read through an index: the
    backward's dq from stored dS (``operators.bwd_dq_ds_units``: the block reads the key
    block's index, the dS block, the dS block's index, k, in that order)."""
    return _pv_intrinsic(int(D), rounded=True, gathered=True)


@functools.cache
def _pv_intrinsic(D: int, rounded: bool, gathered: bool = False) -> str:
    """The P v intrinsic of one key block for head dim ``D`` (registered once): P, the
    float32 probabilities key-major, rounded to bf16 in the call (``mra_bf16_pv``) or not
    (``rounded=False``: ``mra_bf16_pv_f32``); v as bf16 bits; float32 sums. ``gathered``:
    the description reads a second index after P (``gathered_pv_intrinsic``)."""
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

    def call(reads, writes):  # (C, the index, P, [the dS block's index,] V: the same
        # buffers as the description's)
        C, P, V = reads[0], reads[2], reads[-1]
        return (extern, extern_calls.pointer(P), P.strides[0], extern_calls.pointer(V), V.strides[0],
                extern_calls.pointer(C), C.strides[0], D)

    chosen = gathered_desc if gathered else desc
    name = f"{extern}_d{D}" + ("_gathered" if gathered else "")
    TensorIntrin.register(name, chosen, extern_calls.called(chosen, call))
    return name
