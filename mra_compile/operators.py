"""MRA-2 stages as TVM tensor-expression operators.

Every function returns ``(tensors, params)``: the TE tensors of one stage and the
ordered argument list for ``te.create_prim_func``. Shapes that vary between calls
(rows ``R = B*H``, padded sequence ``N``, number of work units ``U``...) are
``te.var`` so one compiled kernel serves every call; the block edge ``b`` and the
(padded) head dim ``D`` are compile-time constants.

Layout conventions (all row-major, float32 unless stated):
  q, k, v      [R, N, D]   N a multiple of b, D a multiple of the vector width
  mask         [Bm, N]     1 real / 0 padding; row r belongs to batch r // heads
  counts       [Bm, n]     real tokens per block (b everywhere without a mask)
  inv_counts   [Bm, n]     1/(c + 1e-6) with a mask, 1/b without (spec step 2)

This module imports TVM: import it lazily (``mra_compile.build`` does).
"""
from __future__ import annotations

from tvm import te, tirx

F32 = "float32"
I32 = "int32"
NEG_BIG = -3.0e38  # identity for running maxima; finite so exp() of differences stays defined


def _exp(x):
    """exp(x) for a float32 expression, written out so that LLVM vectorises it.

    (llvm's expf is a scalar libm call per lane.) Range reduction x = k ln2 + r with
    |r| <= ln2/2, a degree-7 Taylor polynomial for exp(r) (error < 2e-8 there) and
    2^k built in the exponent bits. Inputs below -87.3 give exactly 0, so the spec's
    -1e4 penalties still remove a term; inputs above 88 saturate (never reached: all
    arguments here are <= 0 after subtracting a maximum, up to rounding).
    """
    xv, kv, rv = (tirx.Var(name, F32) for name in ("exp_x", "exp_k", "exp_r"))
    clamped = te.max(te.min(x, tirx.const(88.0, F32)), tirx.const(-87.3, F32))
    k = te.floor(xv * tirx.const(1.4426950408889634, F32) + tirx.const(0.5, F32))
    # ln2 split in a high part exact in float32 and a small correction.
    r = xv - kv * tirx.const(0.693359375, F32) + kv * tirx.const(2.12194440e-4, F32)
    poly = tirx.const(1.0 / 5040.0, F32)
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        poly = poly * rv + tirx.const(c, F32)
    two_k = tirx.reinterpret(F32, (kv.astype(I32) + 127) << 23)
    return tirx.Let(xv, clamped, tirx.Let(kv, k, tirx.Let(rv, r, poly * two_k)))


def _vars(*names):
    return [te.var(name, dtype=I32) for name in names]


def pool_and_logits(b: int, D: int):
    """Step 2: block means and low-resolution logits.

    in : q, k, v [R, N, D]; mask [Bm, N]; counts, inv_counts [Bm, n]; heads, scale
    out: qp, kp, vp [R, n, D] (block averages of the masked tokens);
         logits [R, n, n] (L with the -1e4 compat penalty); rowmax [R, n] (R before it)
    """
    R, N, Bm, heads = _vars("R", "N", "Bm", "heads")
    n = N // b
    scale = te.var("scale", dtype=F32)
    q = te.placeholder((R, N, D), F32, "q")
    k = te.placeholder((R, N, D), F32, "k")
    v = te.placeholder((R, N, D), F32, "v")
    mask = te.placeholder((Bm, N), F32, "mask")
    counts = te.placeholder((Bm, n), F32, "counts")
    inv_counts = te.placeholder((Bm, n), F32, "inv_counts")

    def pooled(x, name):
        t = te.reduce_axis((0, b), "t")
        s = te.compute(
            (R, n, D),
            lambda r, i, d: te.sum(x[r, i * b + t, d] * mask[r // heads, i * b + t], axis=t),
            name=name + "_sum",
        )
        return te.compute(
            (R, n, D), lambda r, i, d: s[r, i, d] * inv_counts[r // heads, i], name=name
        )

    qp, kp, vp = pooled(q, "qp"), pooled(k, "kp"), pooled(v, "vp")
    dd = te.reduce_axis((0, D), "dd")
    raw = te.compute(
        (R, n, n),
        lambda r, i, j: te.sum(qp[r, i, dd] * kp[r, j, dd], axis=dd),
        name="raw_logits",
    )
    jj = te.reduce_axis((0, n), "jj")
    rowmax = te.compute(
        (R, n), lambda r, i: te.max(raw[r, i, jj] * scale, axis=jj), name="rowmax"
    )
    logits = te.compute(
        (R, n, n),
        lambda r, i, j: raw[r, i, j] * scale
        - te.if_then_else(
            counts[r // heads, i] * counts[r // heads, j] < 0.5,
            tirx.const(1e4, F32),
            tirx.const(0.0, F32),
        ),
        name="logits",
    )
    params = [q, k, v, mask, counts, inv_counts, qp, kp, vp, logits, rowmax, heads, scale]
    return params


def lowres_out(b: int, D: int):
    """Step 5 ("full"), the low-resolution part, one value per query block.

    in : logits [R, n, n]; rowmax [R, n]; hmask [R, n, n] (1.0 where covered by the
         high resolution); counts [Bm, n]; vp [R, n, D]; heads
    out: o_lo [R, n, D] = sum_j W v̂_j; z_lo [R, n] = sum_j W,
         W[i, j] = exp(L - R_i - 1e4*Hmask) * c_j
    """
    R, n, Bm, heads = _vars("R", "n", "Bm", "heads")
    logits = te.placeholder((R, n, n), F32, "logits")
    rowmax = te.placeholder((R, n), F32, "rowmax")
    hmask = te.placeholder((R, n, n), F32, "hmask")
    counts = te.placeholder((Bm, n), F32, "counts")
    vp = te.placeholder((R, n, D), F32, "vp")
    weight = te.compute(
        (R, n, n),
        lambda r, i, j: _exp(logits[r, i, j] - rowmax[r, i] - hmask[r, i, j] * 1e4)
        * counts[r // heads, j],
        name="weight",
    )
    j1 = te.reduce_axis((0, n), "j1")
    o_lo = te.compute(
        (R, n, D), lambda r, i, d: te.sum(weight[r, i, j1] * vp[r, j1, d], axis=j1), name="o_lo"
    )
    j2 = te.reduce_axis((0, n), "j2")
    z_lo = te.compute((R, n), lambda r, i: te.sum(weight[r, i, j2], axis=j2), name="z_lo")
    return [logits, rowmax, hmask, counts, vp, o_lo, z_lo, heads]


def _unit_attention(q, k, v, mask, heads, scale, domain, query_block, key_block, C, b, D):
    """Step 4 on one query block against C key blocks, for every point of ``domain``.

    ``query_block(r, u)`` and ``key_block(r, u, c)`` give block indices (-1 = empty
    slot). Returns (unit_max [*domain, b], unit_out [*domain, b, D] = sum P v,
    unit_sum [*domain, b] = sum P), P = exp(A - unit_max - 1e4 (1 - mask_s)): the unit's
    own stabiliser; merging units to a common one (flash-decoding style) gives the
    spec's m_t.
    """
    W = C * b  # key tokens per unit

    def valid(r, u, w):
        return key_block(r, u, w // b) >= 0

    def key_token(r, u, w):
        # Clamped so that no index read can leave the tensor (TVM does not bounds-check).
        return te.max(key_block(r, u, w // b), 0) * b + w % b

    def query_token(r, u, t):
        return te.max(query_block(r, u), 0) * b + t

    # Per-key factor: the key's mask value, 0 for empty slots.
    key_factor = te.compute(
        (*domain, W),
        lambda r, u, w: te.if_then_else(valid(r, u, w), mask[r // heads, key_token(r, u, w)], 0.0),
        name="key_factor",
    )
    # Keys and values are read in place (each key block is a contiguous [b, D] slab);
    # the queries are gathered transposed ([D, b]): logits are laid out [key, query] so
    # that every reduction over keys (max, sum, P V) runs with the queries in vector lanes.
    q_t = te.compute(
        (*domain, D, b),
        lambda r, u, d, t: q[r, query_token(r, u, t), d]
        * mask[r // heads, query_token(r, u, t)]
        * scale,
        name="q_t",
    )
    d0 = te.reduce_axis((0, D), "d0")
    dots = te.compute(
        (*domain, W, b),
        lambda r, u, w, t: te.sum(k[r, key_token(r, u, w), d0] * q_t[r, u, d0, t], axis=d0),
        name="dots",
    )
    # A = scale * (q m_t) . (k m_s); empty slots take no part in the max.
    logit = te.compute(
        (*domain, W, b),
        lambda r, u, w, t: te.if_then_else(
            valid(r, u, w), dots[r, u, w, t] * key_factor[r, u, w], tirx.const(NEG_BIG, F32)
        ),
        name="logit",
    )
    w0 = te.reduce_axis((0, W), "w0")
    unit_max = te.compute(
        (*domain, b), lambda r, u, t: te.max(logit[r, u, w0, t], axis=w0), name="unit_max"
    )
    prob = te.compute(
        (*domain, W, b),
        lambda r, u, w, t: te.if_then_else(
            valid(r, u, w),
            # (times the key's mask: the spec's v_s * mask_s, applied to P instead of v)
            _exp(logit[r, u, w, t] - unit_max[r, u, t] - (1.0 - key_factor[r, u, w]) * 1e4)
            * key_factor[r, u, w],
            tirx.const(0.0, F32),
        ),
        name="prob",
    )
    w1 = te.reduce_axis((0, W), "w1")
    unit_out = te.compute(
        (*domain, b, D),
        lambda r, u, t, d: te.sum(prob[r, u, w1, t] * v[r, key_token(r, u, w1), d], axis=w1),
        name="unit_out",
    )
    w2 = te.reduce_axis((0, W), "w2")
    unit_sum = te.compute(
        (*domain, b), lambda r, u, t: te.sum(prob[r, u, w2, t], axis=w2), name="unit_sum"
    )
    return unit_max, unit_out, unit_sum


def _inputs(D):
    R, N, Bm, heads = _vars("R", "N", "Bm", "heads")
    scale = te.var("scale", dtype=F32)
    q = te.placeholder((R, N, D), F32, "q")
    k = te.placeholder((R, N, D), F32, "k")
    v = te.placeholder((R, N, D), F32, "v")
    mask = te.placeholder((Bm, N), F32, "mask")
    return R, N, heads, scale, q, k, v, mask


def hires_units(b: int, D: int, blocks_per_unit: int):
    """Step 4 on overflow units: up to C more selected blocks of one block row each.

    Unit u of row r covers query block ``unit_row[r, u]`` and key blocks
    ``unit_cols[r, u, :]`` (-1 = empty slot); ``hires_rows`` merges them into their row.

    in : q, k, v [R, N, D]; mask [Bm, N]; unit_row [R, U] i32; unit_cols [R, U, C] i32;
         heads, scale
    out: unit_max [R, U, b]; unit_out [R, U, b, D]; unit_sum [R, U, b]
    """
    C = blocks_per_unit
    R, N, heads, scale, q, k, v, mask = _inputs(D)
    U = te.var("U", dtype=I32)
    unit_row = te.placeholder((R, U), I32, "unit_row")
    unit_cols = te.placeholder((R, U, C), I32, "unit_cols")
    unit_max, unit_out, unit_sum = _unit_attention(
        q, k, v, mask, heads, scale, (R, U),
        lambda r, u: unit_row[r, u], lambda r, u, c: unit_cols[r, u, c], C, b, D,
    )
    return [q, k, v, mask, unit_row, unit_cols, unit_max, unit_out, unit_sum, heads, scale]


def hires_rows(b: int, D: int, blocks_per_row: int, full: bool):
    """Step 4 for every query block row, merged with its overflow units, then steps 5-6.

    Block row i of row r computes its first ``blocks_per_row`` selected key blocks
    ``row_cols[r, i, :]`` (-1 = empty) itself; the rest came from ``hires_units`` as the
    overflow units ``ov_start[r, i] + w``, ``w < ov_units[r, i] <= ucap``. All share the
    row's maximum m_t (-1e5 without blocks); "full" adds the low-resolution part at the
    larger of m_t and R_i, then everything is normalised and masked.

    in : q, k, v [R, N, D]; mask [Bm, N]; row_cols [R, n, Cr] i32;
         ov_max [R, U, b]; ov_out [R, U, b, D]; ov_sum [R, U, b]; ov_start, ov_units [R, n] i32;
         full mode: o_lo [R, n, D], z_lo [R, n], rowmax [R, n]; heads, scale, ucap
    out: out [R, n, b, D] (the memory of [R, N, D])
    """
    C = blocks_per_row
    R, N, heads, scale, q, k, v, mask = _inputs(D)
    n = N // b
    U, ucap = _vars("U", "ucap")
    row_cols = te.placeholder((R, n, C), I32, "row_cols")
    ov_max = te.placeholder((R, U, b), F32, "ov_max")
    ov_out = te.placeholder((R, U, b, D), F32, "ov_out")
    ov_sum = te.placeholder((R, U, b), F32, "ov_sum")
    ov_start = te.placeholder((R, n), I32, "ov_start")
    ov_units = te.placeholder((R, n), I32, "ov_units")
    own_max, own_out, own_sum = _unit_attention(
        q, k, v, mask, heads, scale, (R, n),
        lambda r, i: i, lambda r, i, c: row_cols[r, i, c], C, b, D,
    )

    def unit(r, i, w):
        return te.max(te.min(ov_start[r, i] + w, U - 1), 0)  # clamped: no stray reads

    w0 = te.reduce_axis((0, ucap), "w0")
    ov_stab = te.compute(
        (R, n, b),
        lambda r, i, t: te.max(
            te.if_then_else(w0 < ov_units[r, i], ov_max[r, unit(r, i, w0), t],
                            tirx.const(NEG_BIG, F32)),
            axis=w0,
        ),
        name="ov_stab",
    )
    # m_t of the spec: -1e5 for a block row without selected blocks.
    row_max = te.compute(
        (R, n, b),
        lambda r, i, t: te.if_then_else(
            tirx.Or(row_cols[r, i, 0] >= 0, ov_units[r, i] > 0),
            te.max(own_max[r, i, t], ov_stab[r, i, t]),
            tirx.const(-1e5, F32),
        ),
        name="row_max",
    )
    ov_scale = te.compute(
        (R, n, b, ucap),
        lambda r, i, t, w: te.if_then_else(
            w < ov_units[r, i],
            _exp(ov_max[r, unit(r, i, w), t] - row_max[r, i, t]),
            tirx.const(0.0, F32),
        ),
        name="ov_scale",
    )
    own_scale = te.compute(
        (R, n, b), lambda r, i, t: _exp(own_max[r, i, t] - row_max[r, i, t]), name="own_scale"
    )
    w1 = te.reduce_axis((0, ucap), "w1")
    ov_o = te.compute(
        (R, n, b, D),
        # Selected, not multiplied: slots past ov_units may hold anything, NaN included.
        lambda r, i, t, d: te.sum(
            te.if_then_else(
                w1 < ov_units[r, i], ov_scale[r, i, t, w1] * ov_out[r, unit(r, i, w1), t, d], 0.0
            ),
            axis=w1,
        ),
        name="ov_o",
    )
    w2 = te.reduce_axis((0, ucap), "w2")
    ov_z = te.compute(
        (R, n, b),
        lambda r, i, t: te.sum(
            te.if_then_else(
                w2 < ov_units[r, i], ov_scale[r, i, t, w2] * ov_sum[r, unit(r, i, w2), t], 0.0
            ),
            axis=w2,
        ),
        name="ov_z",
    )
    z_hi = te.compute(
        (R, n, b),
        lambda r, i, t: own_sum[r, i, t] * own_scale[r, i, t] + ov_z[r, i, t],
        name="z_hi",
    )

    def o_hi(r, i, t, d):
        return own_out[r, i, t, d] * own_scale[r, i, t] + ov_o[r, i, t, d]

    def token_mask(r, i, t):
        return mask[r // heads, i * b + t]

    params = [q, k, v, mask, row_cols, ov_max, ov_out, ov_sum, ov_start, ov_units]
    if full:
        o_lo = te.placeholder((R, n, D), F32, "o_lo")
        z_lo = te.placeholder((R, n), F32, "z_lo")
        rowmax = te.placeholder((R, n), F32, "rowmax")
        params += [o_lo, z_lo, rowmax]
        # Both parts share the larger stabiliser: scale the part with the smaller one.
        delta = te.compute(
            (R, n, b),
            lambda r, i, t: (rowmax[r, i] - row_max[r, i, t]) * token_mask(r, i, t),
            name="delta",
        )
        hi_scale = te.compute(
            (R, n, b),
            lambda *p: te.if_then_else(delta(*p) > 0, _exp(-delta(*p)), tirx.const(1.0, F32)),
            name="hi_scale",
        )
        lo_scale = te.compute(
            (R, n, b),
            lambda *p: te.if_then_else(delta(*p) > 0, tirx.const(1.0, F32), _exp(delta(*p))),
            name="lo_scale",
        )
        inv_norm = te.compute(
            (R, n, b),
            lambda r, i, t: token_mask(r, i, t)
            / (
                z_hi[r, i, t] * hi_scale[r, i, t]
                + z_lo[r, i] * lo_scale[r, i, t]
                + tirx.const(1e-6, F32)
            ),
            name="inv_norm",
        )
        out = te.compute(
            (R, n, b, D),
            lambda r, i, t, d: (
                o_hi(r, i, t, d) * hi_scale[r, i, t] + o_lo[r, i, d] * lo_scale[r, i, t]
            )
            * inv_norm[r, i, t],
            name="out",
        )
    else:
        inv_norm = te.compute(
            (R, n, b),
            lambda r, i, t: token_mask(r, i, t) / (z_hi[r, i, t] + tirx.const(1e-6, F32)),
            name="inv_norm",
        )
        out = te.compute(
            (R, n, b, D), lambda r, i, t, d: o_hi(r, i, t, d) * inv_norm[r, i, t], name="out"
        )
    return params + [out, heads, scale, ucap]
