"""The transpose of a unit's queries (``q_t`` [D, b] from ``q_s`` [b, D]) out of vector
shuffles, as a tensor intrinsic for the CPU schedules.

Written plainly, ``q_t[d, t] = q_s[t, d]`` with t in vector lanes is a strided gather:
LLVM builds each vector one lane at a time (``vinsertps``), 11% of ``hires_rows`` at
N = 4096. Here each 16 x 16 tile is read as 16 row vectors and transposed in registers
by four rounds of two-input shuffles (round k swaps bit k of the row and the lane
index), then stored as 16 column vectors: LLVM lowers each shuffle to one permute
(``vpermt2ps`` on AVX-512; a few instructions on narrower vector units), so the
intrinsic is plain TIR and runs on any LLVM target.
"""
from __future__ import annotations

import functools

TILE = 16  # lanes of the tile's vectors (one AVX-512 vector of float32)


def fits(b: int, D: int) -> bool:
    """Whether a [b, D] block tiles into 16 x 16 (else the plain gather is used)."""
    return b % TILE == 0 and D % TILE == 0


def _tile(S, Q, r0: int, c0: int, dtype: str) -> list:
    """Statements ``Q[c0 + j, r0 + i] = S[r0 + i, c0 + j]`` for i, j < 16."""
    from tvm import tirx

    vector = f"{dtype}x{TILE}"
    stmts = []

    def bind(value, name):
        var = tirx.Var(name, vector)
        stmts.append(tirx.Bind(var, value))
        return var

    x = [bind(tirx.BufferLoad(S, [r0 + i, tirx.Ramp(c0, 1, TILE)]), f"row{i}")
         for i in range(TILE)]
    step = 1
    while step < TILE:  # swap bit log2(step) of the row index and of the lane index
        low = [lane if not lane & step else TILE + lane - step for lane in range(TILE)]
        high = [lane + step if not lane & step else TILE + lane for lane in range(TILE)]
        y = list(x)
        for i in range(TILE):
            if i & step:
                continue
            pair = [x[i], x[i + step]]
            y[i] = bind(tirx.Shuffle(pair, [tirx.IntImm("int32", j) for j in low]),
                        f"s{step}_{i}")
            y[i + step] = bind(tirx.Shuffle(pair, [tirx.IntImm("int32", j) for j in high]),
                               f"s{step}_{i + step}")
        x, step = y, step * 2
    stmts += [tirx.BufferStore(Q, x[j], [c0 + j, tirx.Ramp(r0, 1, TILE)]) for j in range(TILE)]
    return stmts


@functools.cache
def intrinsic(b: int, D: int, dtype: str) -> str:
    """The name of the ``[D, b] = [b, D]^T`` intrinsic (registered once). ValueError
    unless ``fits(b, D)``: its 16 x 16 tiles would read and write past the block.
    ``q_s`` may have any row stride; ``q_t`` is contiguous."""
    from tvm import tirx
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir import stmt as s_stmt
    from tvm.script import tirx as T

    if not fits(b, D):
        raise ValueError(f"the shuffle transpose needs b and D multiples of {TILE}, "
                         f"got b={b}, D={D}")

    @T.prim_func(s_tir=True)
    def desc(s: T.handle, q: T.handle):
        ss = T.int32()
        S = T.match_buffer(s, (b, D), dtype, strides=[ss, 1], offset_factor=1)
        Q = T.match_buffer(q, (D, b), dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(S[0:b, 0:D])
            T.writes(Q[0:D, 0:b])
            for d, t in T.grid(D, b):
                with T.sblock("transpose"):
                    vd, vt = T.axis.remap("SS", [d, t])
                    Q[vd, vt] = S[vt, vd]

    # TVMScript has no spelling for the shuffles' straight-line code: the implementation
    # is the description with its root block's loops replaced by it, on the same buffers.
    realize = desc.body
    root = realize.block
    S, Q = root.reads[0].source, root.writes[0].source
    body = tirx.SeqStmt([stmt for r0 in range(0, b, TILE) for c0 in range(0, D, TILE)
                         for stmt in _tile(S, Q, r0, c0, dtype)])
    block = s_stmt.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body,
                          root.init, root.alloc_buffers, root.match_buffers, root.annotations)
    impl = desc.with_body(s_stmt.SBlockRealize(realize.iter_values, realize.predicate, block))
    name = f"mra_transpose_b{b}_d{D}_{dtype}"
    TensorIntrin.register(name, desc, impl)
    return name
