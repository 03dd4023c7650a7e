"""Hand-written CPU (LLVM) schedules, one named function per operator.

Each function takes an ``s_tir.Schedule`` of the operator's PrimFunc and its knobs
as keyword arguments; ``KNOBS[op]`` holds the defaults. Defaults suit x86-64 with
AVX-512 (vec=16 floats) and still run well with AVX2 (the vector is split in two).
"""
from __future__ import annotations


def _keys_outer(sch, name, vec):
    """A [.., t] = reduce_w X[.., w, t] stage: w outside, the queries t in vector lanes."""
    t, w = sch.get_loops(sch.get_sblock(name))[-2:]
    sch.reorder(w, t)
    sch.vectorize(sch.split(t, [None, vec])[1])
    return w


def hires_units(sch, *, vec=16, qk_rows=8, pv_rows=4, unroll=True, blocks_per_unit=1):
    """Per work unit (one query block x C key blocks), everything stays in L1.

    ``blocks_per_unit`` (C) is an operator knob (the unit size the plan packs): more
    blocks per unit amortise the query block, fewer waste less on short block rows.
    Parallel over (row, unit). Inside: gather the queries transposed;
    the logits [W, b] as a register tile of ``qk_rows`` keys x b queries; max, exp and
    sum with the queries in vector lanes; P V as a tile of ``pv_rows`` queries x D.
    """
    # The three outputs share one (row, unit) loop, so what they read can live under it.
    outputs = ("unit_max", "unit_out", "unit_sum")
    ru = sch.merge(*(sch.fuse(*sch.get_loops(sch.get_sblock(name))[:2]) for name in outputs))
    sch.parallel(ru)
    sch.compute_inline(sch.get_sblock("logit"))
    for name in ("prob", "dots", "q_t", "key_factor"):
        sch.compute_at(sch.get_sblock(name), ru)

    # P V: sum_w P[w, t] v[w, d] -> [b, D]; pv_rows x D accumulators.
    out = sch.get_sblock("unit_out")
    t, d, w = sch.get_loops(out)[1:]
    t_o, t_i = sch.split(t, [None, pv_rows])
    d_o, d_i = sch.split(d, [None, vec])
    sch.reorder(t_o, w, t_i, d_o, d_i)
    sch.vectorize(d_i)
    if unroll:
        sch.unroll(d_o)
        sch.unroll(t_i)
    out_w = w

    # Logits: sum_d k[w, d] q^T[d, t] -> [W, b]; qk_rows x b accumulators.
    dots = sch.get_sblock("dots")
    w, t, d = sch.get_loops(dots)[1:]
    w_o, w_i = sch.split(w, [None, qk_rows])
    t_o, t_i = sch.split(t, [None, vec])
    sch.reorder(w_o, d, w_i, t_o, t_i)
    sch.vectorize(t_i)
    if unroll:
        sch.unroll(t_o)
        sch.unroll(w_i)
    key_loops = {name: _keys_outer(sch, name, vec) for name in ("unit_max", "unit_sum")}

    # Reductions are split into init and update last (loop moves need them whole).
    sch.decompose_reduction(dots, d)
    sch.decompose_reduction(out, out_w)
    for name, loop in key_loops.items():
        sch.decompose_reduction(sch.get_sblock(name), loop)
    # Elementwise stages: vectorise the innermost axis.
    for name in ("prob", "q_t"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.vectorize(sch.split(loops[-1], [None, vec])[1])
    return sch


def pool_and_logits(sch, *, vec=16):
    """Parallel over rows: pool q, k, v of one row, then its n x n logits.

    The logits of a row need every pooled key of that row, so a row (not a block)
    is the unit of parallel work; pooling reads each input once.
    """
    outputs = ("qp", "kp", "vp", "logits", "rowmax")
    r = sch.merge(*(sch.get_loops(sch.get_sblock(name))[0] for name in outputs))
    sch.parallel(r)
    sch.compute_at(sch.get_sblock("raw_logits"), r)
    for name in ("qp", "kp", "vp"):
        blk = sch.get_sblock(name + "_sum")
        sch.compute_at(blk, sch.get_loops(sch.get_sblock(name))[1])
        i, d, t = sch.get_loops(blk)[-3:]
        sch.reorder(t, d)
        sch.vectorize(sch.split(d, [None, vec])[1])
        sch.decompose_reduction(blk, t)
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])[1])
    # Block logits: a small q̂ k̂^T, the key axis vectorised after a transpose-free
    # reduction order (d outer, j inner).
    raw = sch.get_sblock("raw_logits")
    i, j, d = sch.get_loops(raw)[-3:]
    sch.reorder(i, d, j)
    sch.decompose_reduction(raw, d)
    return sch


def lowres_out(sch, *, vec=16):
    """Parallel over (row, query block): weights of the block row, then W v̂ and sum W."""
    outputs = ("o_lo", "z_lo")
    ri = sch.merge(*(sch.fuse(*sch.get_loops(sch.get_sblock(name))[:2]) for name in outputs))
    sch.parallel(ri)
    sch.compute_at(sch.get_sblock("weight"), ri)
    out = sch.get_sblock("o_lo")
    d, j = sch.get_loops(out)[-2:]
    sch.reorder(j, d)
    sch.vectorize(sch.split(d, [None, vec])[1])
    sch.decompose_reduction(out, j)
    return sch


def combine(sch, *, vec=16, full=True):
    """Parallel over (row, query block): merge the block row's units, add the
    low-resolution part, normalise."""
    out = sch.get_sblock("out")
    r, i, t, d = sch.get_loops(out)
    ri = sch.fuse(r, i)
    sch.parallel(ri)
    sch.vectorize(sch.split(d, [None, vec])[1])
    elementwise = ("inv_norm", "hi_scale", "lo_scale", "delta") if full else ("inv_norm",)
    for name in elementwise:
        sch.compute_at(sch.get_sblock(name), ri)
    for name in ("o_hi", "z_hi", "rescale", "row_max", "stab"):
        sch.compute_at(sch.get_sblock(name), ri)
    o_hi = sch.get_sblock("o_hi")
    t, dd, w = sch.get_loops(o_hi)[-3:]
    sch.reorder(t, w, dd)
    sch.vectorize(sch.split(dd, [None, vec])[1])
    sch.decompose_reduction(o_hi, w)
    return sch


# Knobs that shape the operator itself (passed to mra_compile.operators), not only its loops.
OPERATOR_KNOBS = {"hires_units": ("blocks_per_unit",)}

KNOBS = {
    "pool_and_logits": dict(vec=16),
    "lowres_out": dict(vec=16),
    "hires_units": dict(vec=16, qk_rows=4, pv_rows=4, unroll=True, blocks_per_unit=2),
    "combine": dict(vec=16),
}
