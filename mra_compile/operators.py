"""MRA-2 stages as TVM tensor-expression operators.

Every public function builds one kernel's stages and returns its ordered argument list
for ``te.create_prim_func`` (inputs, outputs, scalars: the order ``mra_compile.kernels``
declares). Shapes that vary between calls
(rows ``R = B*H``, padded sequence ``N``, number of work units ``U``...) are
``te.var`` so one compiled kernel serves every call; the block edge ``b`` and the
(padded) head dim ``D`` are compile-time constants.

Layout conventions (all row-major, float32 unless stated):
  q            [R, N, D]   N a multiple of b, D a multiple of the vector width
  k, v         [Rkv, Nk, D] Nk a multiple of b (Nk = N but for cross-attention)
  mask         [Bm, Nk]    the keys': 1 real / 0 padding; row r belongs to batch r // heads
  qmask        [Bm, N]     the queries' (the same tensor as mask for self-attention)
  counts       [Bm, nk]    real keys per block (b everywhere without a mask)
  inv_counts   [Bm, nk]    1/(c + 1e-6) with a mask, 1/b without (docs/spec.md, step 2)
  q_counts, q_inv_counts   [Bm, n]: the same for the query blocks
  logits       [R, n, nk]  n = N / b query blocks, nk = Nk / b key blocks

Cross-attention (docs/spec.md, "Extensions") pads each side to whole blocks of its own
(``mra_compile.inputs.prepare``): the grid is the spec's nq x nk.

This module imports TVM: import it lazily (``mra_compile.kernels.Kernel.builder`` does).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm import te, tirx

F32 = "float32"  # the default; every operator takes ``dtype`` ("float32" or "float64")
I32 = "int32"
NEG_BIG = -3.0e38  # identity for running maxima; finite so exp() of differences stays defined
LANES = 16  # partial maxima or sums of a long reduction (``_lane_max``, ``_lane_sum``)


def _exp(x, cap=None):
    """exp(x) for a float expression, written out so that LLVM vectorises it.

    ``cap`` (``EXP_CAP`` or -``EXP_CAP``, per key: ``_unit_attention``'s ``key_cap``):
    the upper clamp in place of 88; -``EXP_CAP`` clamps every argument, NaN included,
    to -88, whose exp is exactly 0 (below). float64: exp(x) where ``cap`` > 0, else 0.

    (llvm's expf is a scalar libm call per lane.) float32: range reduction
    x = k ln2 + r with |r| <= ln2/2, a degree-5 polynomial for exp(r) and 2^k built in
    the exponent bits. The polynomial is fitted for least maximum relative error on that
    interval with its constant term 1 (exp(0) is exactly 1: a row's largest logit gets
    weight 1): 1.6e-7 largest relative error of the whole float32 exp on [-87, 0]
    (measured on 4M points; the degree-7 Taylor polynomial it replaced: 9e-8, for two
    more FMAs on every probability). Inputs below -87.7 give exactly 0 (clamped at -88:
    k = -127, whose 2^k has exponent bits 0), so the -1e4 penalties (docs/spec.md) remove
    a term as exp(-1e4) = 0 does: a row whose every term is penalised has the spec's
    output 0, not v scaled by 1e-38 / 1e-6 (a clamp at ln(FLT_MIN) = -87.3 left 2^-126
    there). Inputs above 88 saturate (never
    reached: arguments here are <= 0 after subtracting a maximum, up to rounding).
    float64 (tests, gradcheck) uses the exact libm exp.
    """
    if str(x.ty) == "float64":
        if cap is None:
            return te.exp(x)
        return te.if_then_else(cap > 0, te.exp(x), tirx.const(0.0, "float64"))
    xv, tv, kv, rv = (tirx.Var(name, F32) for name in ("exp_x", "exp_t", "exp_k", "exp_r"))
    upper = tirx.const(EXP_CAP, F32) if cap is None else cap
    clamped = te.max(te.min(x, upper), tirx.const(-EXP_CAP, F32))
    # k = x / ln2 rounded to the nearest integer by adding EXP_SHIFTER: the sum lies in
    # [2^23, 2^24), where float32 holds integers only, so t = EXP_SHIFTER + k exactly, k
    # is t - EXP_SHIFTER, and t's low bits are k + 127: shifted into the exponent field
    # they are 2^k (the shifter's own bits leave the 32-bit word). Three instructions
    # where floor, convert, add and shift took five (the exp is most of a unit's
    # element-wise work).
    t = xv * tirx.const(LOG2_E, F32) + tirx.const(EXP_SHIFTER, F32)
    k = tv - tirx.const(EXP_SHIFTER, F32)
    # ln2 split in a high part exact in float32 and a small correction.
    r = xv - kv * tirx.const(0.693359375, F32) + kv * tirx.const(2.12194440e-4, F32)
    return tirx.Let(xv, clamped, tirx.Let(tv, t, tirx.Let(kv, k, tirx.Let(
        rv, r, _polynomial(EXP_POLY, rv) * _two_to(tv)))))


def _polynomial(coefficients, x):
    """sum_i coefficients[i] x^i (float32, Horner)."""
    value = tirx.const(coefficients[-1], F32)
    for c in reversed(coefficients[:-1]):
        value = value * x + tirx.const(c, F32)
    return value


def _two_to(t):
    """2^k for ``t`` = EXP_SHIFTER + k (k integral, -127 <= k <= 127): its low bits
    shifted into the exponent field (k = -127 gives exponent bits 0: exactly 0)."""
    return tirx.reinterpret(F32, tirx.reinterpret(I32, t) << 23)


def exp2_rounded(y, cap=None):
    """2^y (float32) for probabilities that are rounded to bf16 next (the CPU micro-kernels'
    P V, ``MICRO[0]``): the caller passes y = x log2(e), its factor folded into its own
    multiply (q k^T's scale), so the range reduction is two adds: k = y rounded (as in
    ``_exp``), f = y - k exactly, |f| <= 1/2, and 2^f by a degree-3 polynomial
    (``EXP2_POLY_BF16``). 1.0e-4 largest relative error (y's own rounding included,
    2^-24 |y|), against 2^-9 of rounding to bf16 after it: 6 multiplies and FMAs a
    vector where ``_exp`` takes 10. bf16 hires_rows 0.98x the time with ``_exp``'s
    degree 3, 0.97x with this (N = 8192, sparse; Zen 4, in-process A/B); the loop is not
    bound by the FMAs alone: evaluating the polynomial in two halves to shorten each
    vector's chain of dependent operations gained nothing (1.005x). The same clamp:
    finite for any argument, exactly 0 at -127 (e^-88). ``cap`` as ``_exp``'s, in units
    of y: ``EXP2_CAP`` or -``EXP2_CAP`` (exactly 0 for any argument)."""
    yv, tv = (tirx.Var(name, F32) for name in ("exp2_y", "exp2_t"))
    upper = tirx.const(EXP2_CAP, F32) if cap is None else cap
    clamped = te.max(te.min(y, upper), tirx.const(-EXP2_CAP, F32))
    t = yv + tirx.const(EXP_SHIFTER, F32)
    f = yv - (tv - tirx.const(EXP_SHIFTER, F32))
    return tirx.Let(yv, clamped, tirx.Let(tv, t, _polynomial(EXP2_POLY_BF16, f) * _two_to(tv)))


def rounded_probability(dot, unit_max, cap, scale, dt: str = F32):
    """The bf16 units' probability (``MICRO[0]``: rounded to bf16 next) of a key's logit
    ``dot`` * ``scale`` against the query's maximum ``unit_max`` (``exp2_rounded``, the
    factor log2(e) folded into the scale), capped per key by ``cap``. The operator's stage
    and the description of the C call that computes it in place (``schedules/cpu_bf16.py``,
    ``exp_pv_slots``) are both this expression."""
    log2e = tirx.const(LOG2_E, dt)
    return exp2_rounded(dot * (scale * log2e) - unit_max * log2e, cap)


# The exps' clamps (``_exp``: e^x for x in [-88, 88], exactly 0 at -88; ``exp2_rounded``:
# 2^y for y in [-127, 127], exactly 0 at -127).
EXP_CAP = 88.0
EXP2_CAP = 127.0

# 1.5 * 2^23 + 127: adding it rounds a float32 of magnitude < 2^22 to an integer and
# leaves that integer + 127 in the low bits (``_exp``).
EXP_SHIFTER = 12582912.0 + 127.0


# exp(r) ~ sum_i EXP_POLY[i] r^i on |r| <= ln2/2 (float32 values; see ``_exp``).
EXP_POLY = (1.0, 0.9999997019767761, 0.4999915063381195, 0.1666763573884964,
            0.04189793020486832, 0.008290315046906471)

# 2^f ~ sum_i EXP2_POLY_BF16[i] f^i on |f| <= 1/2, fitted likewise (``exp2_rounded``).
EXP2_POLY_BF16 = (1.0, 0.6932829022407532, 0.2422105371952057, 0.05500870570540428)
LOG2_E = 1.4426950408889634


BF16_BITS = "int16"  # bf16 q, k, v held as their bits: the CPU's bf16 micro-kernels


def bf16_widen(x):
    """The float32 value of a bf16 held as its 16 bits (an int16 expression): exact."""
    return tirx.reinterpret(F32, x.astype(I32) << 16)


def bf16_narrow(x):
    """The bits (int16) of float32 ``x`` rounded to the nearest bf16, ties to even (as
    torch converts)."""
    bits = tirx.reinterpret("uint32", x)
    rounded = bits + tirx.const(0x7FFF, "uint32") + ((bits >> 16) & tirx.const(1, "uint32"))
    return (rounded >> 16).astype("uint16").astype(BF16_BITS)


def _widen(x, dt: str):
    """A q, k, v (I/O) value in the compute dtype ``dt``."""
    return bf16_widen(x) if x.dtype == BF16_BITS else x.astype(dt)


def _narrow(x, io: str):
    """A compute-dtype value in the I/O dtype ``io``."""
    return bf16_narrow(x) if io == BF16_BITS else x.astype(io)


# The CPU micro-kernels (schedules/cpu_bf16.py) a kernel variant may call: bf16 block
# products; or (the float32 output of a bf16 result, which the backward reads;
# hires_units and hires_rows only) bf16 q k^T with P v in float32 FMAs, P not rounded.
MICRO = ("avx512_bf16", "avx512_bf16_fp32_pv")


def _io(io: str | None, dt: str, micro: str | None, widened: bool = False) -> str:
    """The storage dtype of q, k, v: ``io`` (None: the compute dtype), or bf16 bits for the
    CPU micro-kernels (``micro``: one of ``MICRO``) and for bf16 widened as it is read on
    the CPU (``widened``)."""
    if micro is not None:
        if micro not in MICRO or io != "bfloat16":
            raise ValueError(f"micro-kernels {micro!r} take bfloat16 q, k, v, not {io}")
        return BF16_BITS
    if widened and io == "bfloat16":
        return BF16_BITS
    return io or dt


def _masked_row(x, factor, io: str):
    """A query's (or the backward's fixed block's) q or k value ``x`` masked by its token's
    0/1 ``factor``: selected as it is, unscaled: the logits take the scale after the
    product q k^T, in every dtype (the forward's and the backward's units agree), as
    SDPA and the reference do. Stored narrower than the compute dtype (bf16, fp16),
    ``scale * q`` would be rounded to that dtype again; in float32 either order is as
    accurate on average, but scaling q first differs from the reference by a rounding
    (fuzz seed 9507, scale 3.5: 1.08e-5 against the reference's own float32 6.1e-6)."""
    return te.if_then_else(factor > 0.5, x, tirx.const(0, io))


def _only(factor, e, rest=lambda e: e):
    """``rest(e)`` (default: e) where the 0/1 ``factor`` is 1, exactly 0 where it is 0 (``e``: an
    ``_exp``; the backward's P and dS: the forward's units cap the exp instead,
    ``_unit_attention``'s ``key_cap``). float32: ``rest(e * factor)``,
    no branch: ``_exp`` is finite whatever its argument, so ``e * 0`` is an exact 0 and
    every later factor (finite: the inputs' padding is replaced by selection) keeps it 0;
    a selection had cost a branch per key in the forward's loops and, in the backward,
    had LLVM load the per-token operands under a mask, as gathers (15% of
    ``bwd_dkdv_units``). float64's exact exp can overflow: selected."""
    if str(e.ty) == F32:
        return rest(e * factor)
    return te.if_then_else(factor > 0.5, rest(e), tirx.const(0.0, str(e.ty)))


def _read(x, row, token, d):
    """Element d of token ``token`` of row ``row`` (b H + h) of an input: ``x[row, token,
    d]``, or ``x[b, token, h, d]`` where ``x`` is [B, N, H, D] (``_inputs``' heads_last)."""
    if len(x.shape) == 4:
        heads = x.shape[2]
        return x[row // heads, token, row % heads, d]
    return x[row, token, d]


def _kv_row(r, group):
    """The key/value row of query row r: ``r // group`` in the grouped-query variant
    (``group`` a var), r itself otherwise (``group`` None: no division in the indexing,
    which costs registers: a spill in hires_units on sm_90). Rows are never negative, so
    a truncating division (C's ``/``) serves."""
    return r if group is None else tirx.truncdiv(r, group)


def _params(*args) -> list:
    """A kernel's parameters: ``group`` is None (absent) outside the grouped-query variant."""
    return [a for a in args if a is not None]


def _vars(*names):
    return [te.var(name, dtype=I32) for name in names]


def pool_and_logits(b: int, D: int, dtype: str = "float32", io: str | None = None,
                    scratch: bool = False, gqa: bool = False, micro: str | None = None,
                    full: bool = True, heads_last: bool = False, widened: bool = False):
    """Step 2: block means and low-resolution logits.

    in : q [R, N, D]; k, v [R / group, Nk, D]; mask [Bm, Nk], qmask [Bm, N]; counts,
         inv_counts [Bm, nk]; q_counts, q_inv_counts [Bm, n]; heads, group, scale
    out: qp [R, n, D], kp, vp [R, nk, D] (block averages of the masked tokens);
         logits [R, n, nk] (L with the -1e4 compat penalty); rowmax [R, n] (R before it)
    ``full=False`` ("sparse" mode, no low-resolution output): neither v nor vp (pooling
    v was a third of the kernel's memory traffic).
    ``io``: the dtype of q, k, v when it differs from the compute dtype (CUDA fp16/bf16;
    the CPU's fp16, ``widened``: the block sums widen every value as they read it anyway,
    so the variant is the same).
    ``scratch``: raw_logits [R, n, nk] and real_max [R, n] are arguments too (the last).
    ``micro``: q, k, v are bf16 bits (``_io``). ``heads_last``: q, k, v [B, N, H, D]
    (``_inputs``).
    """
    dt = dtype
    io = _io(io, dt, micro, widened)
    R, N, Nk, heads, group, scale, q, k, v, mask, qmask = _inputs(D, dt, io, gqa, heads_last)
    n, nk = N // b, Nk // b
    Bm = mask.shape[0]
    counts, inv_counts = (te.placeholder((Bm, nk), dt, name) for name in ("counts", "inv_counts"))
    q_counts, q_inv_counts = (te.placeholder((Bm, n), dt, name)
                              for name in ("q_counts", "q_inv_counts"))

    def pooled(x, name, kv=False):
        side, inv = (mask, inv_counts) if kv else (qmask, q_inv_counts)
        blocks = nk if kv else n
        t = te.reduce_axis((0, b), "t")
        if len(x.shape) == 4:  # [B, N, H, D] (``heads_last``): sums in the inputs' order,
            # [B, n, H, D], so that a block of every head is one contiguous slab
            Hq = q.shape[2]  # (the mask row of sequence s is that of its query rows)
            s = te.compute(
                (x.shape[0], blocks, x.shape[2], D),
                lambda s_, i, h, d: te.sum(_widen(x[s_, i * b + t, h, d], dt)
                                           * side[s_ * Hq // heads, i * b + t], axis=t),
                name=name + "_sum",
            )

            def summed(r, i, d):  # (k, v: head h of the query rows' group)
                h = r % Hq if not kv or group is None else r % Hq // group
                return s[r // Hq, i, h, d]
        else:
            s = te.compute(
                (R, blocks, D),
                lambda r, i, d: te.sum(
                    _widen(x[_kv_row(r, group) if kv else r, i * b + t, d], dt)
                    * side[r // heads, i * b + t], axis=t),
                name=name + "_sum",
            )

            def summed(r, i, d):
                return s[r, i, d]
        return te.compute(
            (R, blocks, D), lambda r, i, d: summed(r, i, d) * inv[r // heads, i], name=name
        )

    # k̂, v̂ per query row (a few n x D per row): the low-resolution kernels stay per row.
    qp, kp = pooled(q, "qp"), pooled(k, "kp", kv=True)
    dd = te.reduce_axis((0, D), "dd")
    raw = te.compute(
        (R, n, nk),
        lambda r, i, j: te.sum(qp[r, i, dd] * kp[r, j, dd], axis=dd),
        name="raw_logits",
    )

    # R of docs/spec.md, step 2: over the key blocks holding a real token, 0 without one.
    def real_logit(r, i, j):  # (a select, both sides in bounds: vectors on the CPU)
        return tirx.Select(counts[r // heads, j] > 0.5, raw[r, i, j] * scale,
                           tirx.const(NEG_BIG, dt))

    if scratch:  # (one reduction: no intermediate beyond the scratch arguments)
        jj = te.reduce_axis((0, nk), "jj")
        real_max = te.compute((R, n), lambda r, i: te.max(real_logit(r, i, jj), axis=jj),
                              name="real_max")
    else:
        real_max = _lane_max(real_logit, R, n, nk, "real_max")
    rowmax = te.compute(
        (R, n),
        lambda r, i: te.if_then_else(real_max[r, i] > NEG_BIG / 2, real_max[r, i],
                                     tirx.const(0.0, dt)),
        name="rowmax",
    )
    logits = te.compute(
        (R, n, nk),
        lambda r, i, j: raw[r, i, j] * scale
        - te.if_then_else(
            q_counts[r // heads, i] * counts[r // heads, j] < 0.5,
            tirx.const(1e4, dt),
            tirx.const(0.0, dt),
        ),
        name="logits",
    )
    values = [v] if full else []
    vp = [pooled(v, "vp", kv=True)] if full else []
    params = _params(q, k, *values, mask, qmask, counts, inv_counts, q_counts, q_inv_counts,
                     qp, kp, *vp, logits, rowmax, heads, group, scale)
    return params + ([raw, real_max] if scratch else [])


def _lane_max(value, R, n, nk, name: str):
    """[R, n] = max over j < nk of ``value(r, i, j)``, as ``LANES`` partial maxima over the
    whole chunks of ``LANES`` consecutive j (``name``_lanes [R, n, LANES]: each lane reads
    one j per chunk, so the lanes of a chunk are contiguous, a vector on the CPU), one
    over the last nk mod ``LANES`` (``name``_tail) and the maximum of those. The same value
    as one reduction (max is exact in any order); a single running maximum is a chain
    of dependent scalar steps that LLVM may not reorder into vectors (a fifth of
    ``pool_and_logits`` in bf16 at N = 8192)."""
    whole = nk // LANES
    jo = te.reduce_axis((0, whole), "jo")
    lanes = te.compute(
        (R, n, LANES), lambda r, i, lane: te.max(value(r, i, jo * LANES + lane), axis=jo),
        name=name + "_lanes")
    jt = te.reduce_axis((0, nk - whole * LANES), "jt")
    tail = te.compute(
        (R, n), lambda r, i: te.max(value(r, i, whole * LANES + jt), axis=jt),
        name=name + "_tail")
    lane = te.reduce_axis((0, LANES), "lane")
    return te.compute(
        (R, n), lambda r, i: te.max(tirx.max(lanes[r, i, lane], tail[r, i]), axis=lane),
        name=name)


def _lane_sum(x, name: str):
    """[R, n] = sum over the last axis of ``x`` [R, n, w] (w a multiple of ``LANES``: the
    zero-padded rows of ``_low_res_weights``), as ``LANES`` partial sums over its chunks
    (``name``_lanes [R, n, LANES], vectors on the CPU), then their sum: one running sum
    is a chain of dependent scalar adds (~3 cycles each), which LLVM may not reorder."""
    R, n, width = x.shape
    chunk = te.reduce_axis((0, width // LANES), "chunk")
    lanes = te.compute(
        (R, n, LANES), lambda r, i, lane: te.sum(x[r, i, chunk * LANES + lane], axis=chunk),
        name=name + "_lanes")
    lane = te.reduce_axis((0, LANES), "lane")
    return te.compute((R, n), lambda r, i: te.sum(lanes[r, i, lane], axis=lane), name=name)


def _low_res_weights(logits, rowmax, hmask, counts, heads, scratch: bool):
    """W [R, n, nk'] = exp(L - R_i - 1e4 Hmask) c_j (zero past nk), for ``lowres_out`` and
    ``bwd_lowres``. nk' = nk for the ``scratch`` variant (an argument); otherwise each row
    is padded to a multiple of 16 with zeros, so that the CPU computes its exps in whole
    vectors with no guard."""
    R, _, nk = logits.shape
    width = nk if scratch else (nk + 15) // 16 * 16

    def weight_at(r, i, j, jj):  # W[r, i, j], reading key block jj (j itself, or in bounds)
        # Times c_j by selection: an empty key block adds nothing, even where R (over
        # real blocks) lies below its penalised logit (exp would overflow there). A
        # select, both sides evaluated: the padding reads the last block (in bounds).
        c = counts[r // heads, jj]
        return tirx.Select(
            tirx.all(j < nk, c > 0.5),
            _exp(logits[r, i, jj] - rowmax[r, i] - hmask[r, i, jj] * 1e4) * c,
            tirx.const(0.0, logits.dtype))

    def weight_of(r, i, j):
        if scratch:
            return weight_at(r, i, j, te.min(j, nk - 1))
        # The padded row's whole groups of 16 read their blocks as they are, only the last
        # group, past nk, the clamped index: a condition the same for 16 lanes, which the
        # CPU's vectors take as one branch. (Clamped throughout, the index is not
        # contiguous for the vectoriser: every lane was a scalar load, and lowres_out took
        # 1.8x the time at N = 8192.)
        return te.if_then_else(j // 16 < nk // 16, weight_at(r, i, j, j),
                               weight_at(r, i, j, te.min(j, nk - 1)))

    return te.compute((R, logits.shape[1], width), weight_of, name="weight")


def lowres_out(b: int, D: int, dtype: str = "float32", scratch: bool = False):
    """Step 5 ("full"), the low-resolution part, one value per query block.

    in : logits [R, n, nk]; rowmax [R, n]; hmask [R, n, nk] (1.0 where covered by the
         high resolution); counts [Bm, nk]; vp [R, nk, D]; heads
    out: o_lo [R, n, D] = sum_j W v̂_j; z_lo [R, n] = sum_j W,
         W[i, j] = exp(L - R_i - 1e4*Hmask) * c_j
    ``scratch``: weight [R, n, nk] is an argument too (the last).
    """
    dt = dtype
    R, n, nk, Bm, heads = _vars("R", "n", "nk", "Bm", "heads")
    logits = te.placeholder((R, n, nk), dt, "logits")
    rowmax = te.placeholder((R, n), dt, "rowmax")
    hmask = te.placeholder((R, n, nk), dt, "hmask")
    counts = te.placeholder((Bm, nk), dt, "counts")
    vp = te.placeholder((R, nk, D), dt, "vp")
    weight = _low_res_weights(logits, rowmax, hmask, counts, heads, scratch)
    j1 = te.reduce_axis((0, nk), "j1")
    o_lo = te.compute(
        (R, n, D), lambda r, i, d: te.sum(weight[r, i, j1] * vp[r, j1, d], axis=j1), name="o_lo"
    )
    if scratch:  # (one reduction: no intermediate beyond the scratch arguments)
        j2 = te.reduce_axis((0, nk), "j2")
        z_lo = te.compute((R, n), lambda r, i: te.sum(weight[r, i, j2], axis=j2), name="z_lo")
    else:
        z_lo = _lane_sum(weight, "z_lo")
    return [logits, rowmax, hmask, counts, vp, o_lo, z_lo, heads] + ([weight] if scratch else [])


def _unit_attention(q, k, v, mask, qmask, heads, group, scale, domain, query_block, key_block,
                    C, b, D, dt, micro=None, split_pv=False, widened=False):
    """Step 4 on one query block against C key blocks, for every point of ``domain``.

    ``query_block(r, u)`` and ``key_block(r, u, c)`` give block indices (-1 = empty
    slot). Returns (unit_max [*domain, b], unit_out [*domain, b, D] = sum P v,
    unit_sum [*domain, b] = sum P), P = exp(A - unit_max - 1e4 (1 - mask_s)): the unit's
    own stabiliser; merging units to a common one (flash-decoding style) gives the
    spec's m_t.

    ``micro`` ("avx512_bf16": q, k, v are bf16 bits): the queries are masked into ``q_s``
    [b, D] unscaled (the scale goes to the logits) and moved into pairs of dims (``q_t``
    [D/2, b, 2], the operand layout of ``vdpbf16ps``), and P is rounded to bf16 for P V
    (not with "avx512_bf16_fp32_pv": float32 P V); the block products and the pairing
    are the CPU micro-kernels' (tensorized).

    q, k, v may be stored in a narrower dtype than the compute dtype ``dt`` (fp16/bf16
    on CUDA): the gathered blocks ``k_g``, ``v_g``, ``q_t`` and the probabilities of P V
    (``prob_io``) keep that dtype (tensor-core operands), every sum is in ``dt``. The
    CPU schedules inline the gathers, reading k and v in place.

    ``split_pv`` (q, k, v in fp16/bf16, ``io``): P v from P in two parts of that dtype,
    P_hi = P rounded and P_lo = (P - P_hi) rounded, whose sum is P to ~2^-17 of it (bf16;
    the float32 output a half-precision result's backward reads, on tensor cores). One
    product over 2W keys: ``prob_io`` [b, 2W] holds P_hi then P_lo, ``v_g`` [2W, D] each
    value row twice.

    ``widened`` (q, k, v in fp16 or bf16, ``io``, on the CPU: ``Target.widens``): every value of
    q, k, v is widened to ``dt`` as it is read (exact) and every product and P stay in
    ``dt``: the float32 kernels' arithmetic on the inputs where they lie, with no float32
    copies of them (``split_pv`` then splits nothing: P is in ``dt`` already).
    """
    W = C * b  # key tokens per unit
    io = q.dtype
    split_pv = split_pv and not widened
    Wv = 2 * W if split_pv else W  # P v's reduction
    q_io = dt if widened else io  # (the gathered queries: widened once, where they are)

    def valid(r, u, w):
        return key_block(r, u, w // b) >= 0

    def key_token(r, u, w):
        # Clamped so that no index read can leave the tensor (TVM does not bounds-check).
        return te.max(key_block(r, u, w // b), 0) * b + w % b

    def query_token(r, u, t):
        return te.max(query_block(r, u), 0) * b + t

    # Per-key cap of the exps' argument (``_exp``, ``exp2_rounded``): their upper clamp for
    # a real key of a filled slot, minus it (an exact 0) for the others (the mask is 0 or
    # 1; a key counts as real where it is above 0.5). The zeros of a selection without a
    # branch per key, and without the multiply by a 0/1 factor it replaced (one of ~11
    # vector operations of each exp: hires_rows 0.985x the time in bf16, 0.991-1.003x in
    # float32, N = 8192; Zen 4, in-process A/B).
    cap = EXP2_CAP if micro == MICRO[0] else EXP_CAP
    key_cap = te.compute(
        (*domain, W),
        lambda r, u, w: te.if_then_else(
            tirx.all(valid(r, u, w), mask[r // heads, key_token(r, u, w)] > 0.5),
            tirx.const(cap, dt), tirx.const(-cap, dt)),
        name="key_cap",
    )
    # Keys and values are read in place (each key block is a contiguous [b, D] slab);
    # the queries are gathered transposed ([D, b]): logits are laid out [key, query] so
    # that every reduction over keys (max, sum, P V) runs with the queries in vector lanes.
    # The queries are first masked in place (``q_s`` [b, D], rows of q: vectors on the CPU,
    # inlined on CUDA), then moved: transposed (``q_t`` [D, b]), or for ``micro`` into
    # pairs of dims by a micro-kernel. They stay unscaled: the logits take the scale
    # (``_masked_row``), and the backward's units compute the same logits.
    q_s = te.compute(
        (*domain, b, D),
        lambda r, u, t, d: _masked_row(
            _widen(_read(q, r, query_token(r, u, t), d), dt) if widened
            else _read(q, r, query_token(r, u, t), d),
            qmask[r // heads, query_token(r, u, t)], q_io),
        name="q_s")
    if micro:
        q_t = te.compute((*domain, D // 2, b, 2),
                         lambda r, u, p, t, e: q_s[r, u, t, 2 * p + e], name="q_t")
    else:
        q_t = te.compute((*domain, D, b), lambda r, u, d, t: q_s[r, u, t, d], name="q_t")
    # Row r reads the key/value head it shares with its group (grouped-query heads).
    k_g = te.compute((*domain, W, D),
                     lambda r, u, w, d: _read(k, _kv_row(r, group), key_token(r, u, w), d),
                     name="k_g")
    v_g = te.compute((*domain, Wv, D),
                     lambda r, u, w, d: _read(v, _kv_row(r, group),
                                              key_token(r, u, w % W if split_pv else w), d),
                     name="v_g")
    if micro:  # dims in pairs: the reduction of vdpbf16ps
        p0, e0 = te.reduce_axis((0, D // 2), "p0"), te.reduce_axis((0, 2), "e0")
        dots = te.compute(
            (*domain, W, b),
            lambda r, u, w, t: te.sum(_widen(k_g[r, u, w, 2 * p0 + e0], dt)
                                      * _widen(q_t[r, u, p0, t, e0], dt), axis=[p0, e0]),
            name="dots",
        )
    else:
        d0 = te.reduce_axis((0, D), "d0")
        dots = te.compute(
            (*domain, W, b),
            lambda r, u, w, t: te.sum(_widen(k_g[r, u, w, d0], dt) * _widen(q_t[r, u, d0, t], dt),
                                      axis=d0),
            name="dots",
        )
    # A = scale * q . k over the real keys of filled slots (docs/spec.md, step 4: m_t ranges
    # over real keys only); padding keys and empty slots take no part, by selection.
    def scaled(r, u, w, t):
        return dots[r, u, w, t] * scale

    logit = te.compute(
        (*domain, W, b),
        lambda r, u, w, t: te.if_then_else(
            key_cap[r, u, w] > 0, scaled(r, u, w, t), tirx.const(NEG_BIG, dt)),
        name="logit",
    )
    w0 = te.reduce_axis((0, W), "w0")
    unit_max = te.compute(
        (*domain, b), lambda r, u, t: te.max(logit[r, u, w0, t], axis=w0), name="unit_max"
    )
    # P, 0 for the other keys: in float32 an exp clamped to [-cap, key_cap], whatever its
    # argument, inf and NaN included (the clamps' comparisons send NaN to a bound), so
    # exactly 0 where key_cap is -cap. (float64's exact exp: selected.)
    def prob_of(r, u, w, t):
        if micro == MICRO[0]:  # (scaled after: the factor log2(e) joins the scale)
            return rounded_probability(dots[r, u, w, t], unit_max[r, u, t], key_cap[r, u, w],
                                       scale, dt)
        return _exp(scaled(r, u, w, t) - unit_max[r, u, t], key_cap[r, u, w])

    prob = te.compute((*domain, W, b), prob_of, name="prob")
    # [query, key]: P V is then a plain row-major product (a tensor-core operand on CUDA).
    # (P v in float32 for micro "avx512_bf16_fp32_pv": P as it is)
    p_io = dt if micro == MICRO[1] or widened else io

    def prob_part(r, u, t, w):
        if not split_pv:
            return _narrow(prob[r, u, w, t], p_io)
        p = prob[r, u, w % W, t]
        hi = p.astype(io)  # (q, k, v in fp16/bf16 as they are: CUDA, no micro-kernels)
        return te.if_then_else(w < W, hi, (p - hi.astype(dt)).astype(io))

    prob_io = te.compute((*domain, b, Wv), prob_part, name="prob_io")
    w1 = te.reduce_axis((0, Wv), "w1")
    unit_out = te.compute(
        (*domain, b, D),
        lambda r, u, t, d: te.sum(_widen(prob_io[r, u, t, w1], dt) * _widen(v_g[r, u, w1, d], dt),
                                  axis=w1),
        name="unit_out",
    )
    w2 = te.reduce_axis((0, W), "w2")
    unit_sum = te.compute(
        (*domain, b), lambda r, u, t: te.sum(prob[r, u, w2, t], axis=w2), name="unit_sum"
    )
    return unit_max, unit_out, unit_sum


def _rounded_output(shape, value, out_io: str):
    """``out`` [R, n, b, D]: ``value`` in the output dtype ``out_io``. bf16 bits (the CPU
    micro-kernels) are rounded in a stage of their own from ``out_f32``, so that the
    schedule can round and store a block row in one call (``vcvtneps2bf16``)."""
    if out_io != BF16_BITS:
        return te.compute(shape, lambda *p: _narrow(value(*p), out_io), name="out")
    exact = te.compute(shape, value, name="out_f32")
    return te.compute(shape, lambda *p: _narrow(exact(*p), out_io), name="out")


def _inputs(D, dt, io=None, gqa=False, heads_last=False):
    """q [R, N, D]; k, v [Rkv, Nk, D] (query row r reads key/value row r // group:
    grouped-query heads, Rkv = R / group); mask [Bm, Nk], qmask [Bm, N] (the keys' and
    the queries'; row r: mask row r // heads). Nk != N is cross-attention, each side
    padded to whole blocks of its own. ``heads_last``: q [B, N, H, D], k, v
    [B, Nk, Hkv, D] instead (row r = b H + h; ``_read``), and R = B H the rows of the
    outputs (a product, so that an output can be laid out as [B, .., H, ..] by its
    schedule: ``schedules/cpu.py``, ``_heads_last_output``).
    Returns R, N, Nk, heads, group, scale, q, k, v, mask, qmask."""
    R, Rkv, N, Nk, Bm, heads, group = _vars("R", "Rkv", "N", "Nk", "Bm", "heads", "group")
    if not gqa:
        Rkv, group = R, None
    scale = te.var("scale", dtype=dt)
    if heads_last:
        B, H, Hkv = _vars("B", "H", "Hkv")
        R = B * H
        q_shape: tuple = (B, N, H, D)
        kv_shape: tuple = (B, Nk, Hkv if gqa else H, D)
    else:
        q_shape, kv_shape = (R, N, D), (Rkv, Nk, D)
    q = te.placeholder(q_shape, io or dt, "q")
    k = te.placeholder(kv_shape, io or dt, "k")
    v = te.placeholder(kv_shape, io or dt, "v")
    mask = te.placeholder((Bm, Nk), dt, "mask")
    qmask = te.placeholder((Bm, N), dt, "qmask")
    return R, N, Nk, heads, group, scale, q, k, v, mask, qmask


def hires_units(b: int, D: int, blocks_per_unit: int, dtype: str = "float32",
                io: str | None = None, gqa: bool = False, micro: str | None = None,
                split_pv: bool = False, heads_last: bool = False, widened: bool = False):
    """Step 4 on overflow units: up to C more selected blocks of one block row each.

    Unit u of row r covers query block ``unit_row[r, u]`` and key blocks
    ``unit_cols[r, u, :]`` (-1 = empty slot); ``hires_rows`` merges them into their row.

    in : q [R, N, D]; k, v [R / group, Nk, D]; mask [Bm, Nk], qmask [Bm, N];
         unit_row [R, U] i32; unit_cols [R, U, C] i32; heads, group, scale
    out: unit_max [R, U, b]; unit_out [R, U, b, D]; unit_sum [R, U, b]
    """
    C = blocks_per_unit
    R, _, _, heads, group, scale, q, k, v, mask, qmask = _inputs(D, dtype, _io(io, dtype, micro, widened),
                                                                 gqa, heads_last)
    U = te.var("U", dtype=I32)
    unit_row = te.placeholder((R, U), I32, "unit_row")
    unit_cols = te.placeholder((R, U, C), I32, "unit_cols")
    unit_max, unit_out, unit_sum = _unit_attention(
        q, k, v, mask, qmask, heads, group, scale, (R, U),
        lambda r, u: unit_row[r, u], lambda r, u, c: unit_cols[r, u, c], C, b, D, dtype, micro,
        split_pv, widened,
    )
    return _params(q, k, v, mask, qmask, unit_row, unit_cols, unit_max, unit_out, unit_sum, heads,
                   group, scale)


def hires_rows(b: int, D: int, row_unit_blocks: int, full: bool, dtype: str = "float32",
               io: str | None = None, gqa: bool = False, micro: str | None = None,
               split_pv: bool = False, heads_last: bool = False, widened: bool = False):
    """Step 4 for every query block row, merged with its overflow units, then steps 5-6.

    Block row i of row r computes its first ``row_unit_blocks`` selected key blocks
    ``row_cols[r, i, :]`` (-1 = empty) itself; the rest came from ``hires_units`` as the
    overflow units ``ov_start[r, i] + w``, ``w < ov_units[r, i] <= ucap``. All share the
    row's maximum m_t (-1e5 without blocks); "full" adds the low-resolution part at the
    larger of m_t and R_i, then everything is normalised and masked.

    in : q [R, N, D]; k, v [R / group, Nk, D]; mask [Bm, Nk], qmask [Bm, N];
         row_cols [R, n, Cr] i32 (n = N / b, the query blocks);
         ov_max [R, U, b]; ov_out [R, U, b, D]; ov_sum [R, U, b]; ov_start, ov_units [R, n] i32;
         full mode: o_lo [R, n, D], z_lo [R, n], rowmax [R, n]; heads, group, scale, ucap
    out: out [R, n, b, D] (the memory of [R, N, D]), in ``io`` (the dtype of q, k, v; in
         float32 with micro "avx512_bf16_fp32_pv" and with ``split_pv``).
    ``heads_last``: q, k, v [B, N, H, D] (``_inputs``); the output [R, n, b, D] as
    before, which the CPU schedule lays out as [B, N, H, D] (``schedules/cpu.py``,
    ``_heads_last_output``). ``widened``: fp16/bf16 q, k, v widened as they are read
    (``_unit_attention``); with ``split_pv`` only the output's dtype changes (float32).
    """
    dt = dtype
    io = _io(io, dt, micro, widened)
    C = row_unit_blocks
    R, N, _, heads, group, scale, q, k, v, mask, qmask = _inputs(D, dtype, io, gqa, heads_last)
    n = N // b
    U, ucap = _vars("U", "ucap")
    row_cols = te.placeholder((R, n, C), I32, "row_cols")
    ov_max = te.placeholder((R, U, b), dt, "ov_max")
    ov_out = te.placeholder((R, U, b, D), dt, "ov_out")
    ov_sum = te.placeholder((R, U, b), dt, "ov_sum")
    ov_start = te.placeholder((R, n), I32, "ov_start")
    ov_units = te.placeholder((R, n), I32, "ov_units")
    own_max, own_out, own_sum = _unit_attention(
        q, k, v, mask, qmask, heads, group, scale, (R, n),
        lambda r, i: i, lambda r, i, c: row_cols[r, i, c], C, b, D, dtype, micro, split_pv,
        widened,
    )

    def unit(r, i, w):
        return te.max(te.min(ov_start[r, i] + w, U - 1), 0)  # clamped: no stray reads

    w0 = te.reduce_axis((0, ucap), "w0")
    ov_stab = te.compute(
        (R, n, b),
        lambda r, i, t: te.max(
            te.if_then_else(w0 < ov_units[r, i], ov_max[r, unit(r, i, w0), t],
                            tirx.const(NEG_BIG, dt)),
            axis=w0,
        ),
        name="ov_stab",
    )
    # m_t of docs/spec.md, step 4: -1e5 when no real key lies in the selected blocks (both
    # maxima are then NEG_BIG: padding keys and empty slots take no part).
    row_best = te.compute(
        (R, n, b), lambda r, i, t: te.max(own_max[r, i, t], ov_stab[r, i, t]), name="row_best"
    )
    row_max = te.compute(
        (R, n, b),
        lambda r, i, t: te.if_then_else(
            row_best[r, i, t] > NEG_BIG / 2, row_best[r, i, t], tirx.const(-1e5, dt)
        ),
        name="row_max",
    )
    ov_scale = te.compute(
        (R, n, b, ucap),
        lambda r, i, t, w: te.if_then_else(
            w < ov_units[r, i],
            _exp(ov_max[r, unit(r, i, w), t] - row_max[r, i, t]),
            tirx.const(0.0, dt),
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
        # (ov_o selected only where the row has overflow units: the CPU schedule leaves it
        # unwritten elsewhere, where zeroing it had been a [b, D] memset per block row)
        return own_out[r, i, t, d] * own_scale[r, i, t] + te.if_then_else(
            ov_units[r, i] > 0, ov_o[r, i, t, d], tirx.const(0.0, dt))

    def token_mask(r, i, t):  # the query's
        return qmask[r // heads, i * b + t]

    params = [q, k, v, mask, qmask, row_cols, ov_max, ov_out, ov_sum, ov_start, ov_units]
    # (the float32 output of a half-precision result: ``split_pv``, micro-kernels' fp32 P v)
    out_io = dt if micro == MICRO[1] or split_pv else io
    if full:
        o_lo = te.placeholder((R, n, D), dt, "o_lo")
        z_lo = te.placeholder((R, n), dt, "z_lo")
        rowmax = te.placeholder((R, n), dt, "rowmax")
        params += [o_lo, z_lo, rowmax]
        # Both parts share the larger stabiliser: scale the part with the smaller one.
        delta = te.compute(
            (R, n, b),
            lambda r, i, t: (rowmax[r, i] - row_max[r, i, t]) * token_mask(r, i, t),
            name="delta",
        )
        hi_scale = te.compute(
            (R, n, b),
            lambda *p: te.if_then_else(delta(*p) > 0, _exp(-delta(*p)), tirx.const(1.0, dt)),
            name="hi_scale",
        )
        lo_scale = te.compute(
            (R, n, b),
            lambda *p: te.if_then_else(delta(*p) > 0, tirx.const(1.0, dt), _exp(delta(*p))),
            name="lo_scale",
        )
        inv_norm = te.compute(
            (R, n, b),
            lambda r, i, t: token_mask(r, i, t)
            / (
                z_hi[r, i, t] * hi_scale[r, i, t]
                + z_lo[r, i] * lo_scale[r, i, t]
                + tirx.const(1e-6, dt)
            ),
            name="inv_norm",
        )
        out = _rounded_output(
            (R, n, b, D),
            lambda r, i, t, d: (o_hi(r, i, t, d) * hi_scale[r, i, t]
                                + o_lo[r, i, d] * lo_scale[r, i, t]) * inv_norm[r, i, t],
            out_io)
    else:
        inv_norm = te.compute(
            (R, n, b),
            lambda r, i, t: token_mask(r, i, t) / (z_hi[r, i, t] + tirx.const(1e-6, dt)),
            name="inv_norm",
        )
        out = _rounded_output(
            (R, n, b, D), lambda r, i, t, d: o_hi(r, i, t, d) * inv_norm[r, i, t], out_io)
    # What the backward needs, one value per token (the stabilisers are constants there):
    # P = exp(A - stab - pen) mask_s is the final high-resolution weight, lo_w scales the
    # low-resolution weights, and inv_z = mask_t / Z_t.
    if full:
        stab = te.compute(
            (R, n, b), lambda *p: row_max(*p) + te.max(delta(*p), tirx.const(0.0, dt)),
            name="stab",
        )
        lo_w = te.compute((R, n, b), lambda *p: lo_scale(*p), name="lo_w")
    else:
        stab = te.compute((R, n, b), lambda *p: row_max(*p), name="stab")
        lo_w = te.compute((R, n, b), lambda *p: tirx.const(0.0, dt), name="lo_w")
    inv_z = te.compute((R, n, b), lambda *p: inv_norm(*p), name="inv_z")
    return _params(*params, out, stab, lo_w, inv_z, heads, group, scale, ucap)


# ---------------------------------------------------------------------------------------
# Backward. The selection and the stabilisers are constants (docs/spec.md, "Properties").
# With g_t = dO_t mask_t / Z_t and D_t = g_t . out_t, for a selected pair (t, s):
#   P_ts = exp(A_ts - stab_t - 1e4 (1 - m_s)) m_s,   dS_ts = P_ts (g_t . v_s - D_t),
#   dq_t += scale m_t sum_s dS_ts k_s,  dk_s += scale m_s sum_t dS_ts m_t q_t,
#   dv_s += sum_t P_ts g_t;
# and the low-resolution part ("full") flows through the block averages. The block
# products take dO_t itself (masked by selection: exact in any dtype), and inv_z_t =
# mask_t / Z_t goes with P: dS_ts = (P_ts inv_z_t) (dO_t . v_s - dO_t . out_t) and
# dv_s += sum_t (P_ts inv_z_t) dO_t. (g rounded to a half-precision operand had put its
# rounding, 2^-9 relative per entry, into every g . v_s - D_t: bf16 dq off by 1.1% of
# the largest gradient at scale 2, D = 128.)
# ---------------------------------------------------------------------------------------


def bwd_prep(b: int, D: int, dtype: str = "float32", io: str | None = None,
             micro: str | None = None):
    """Per-token backward inputs.

    in : dout, out [R, n, b, D] (the memory of [R, N, D]); inv_z, lo_w [R, n, b]
    out: g [R, n, b, D] = dout where inv_z > 0 (a real query), else 0: the block products'
         operand, exact in the storage dtype (the units put inv_z with P);
         dsum [R, n, b] = sum_d g out (D_t / inv_z_t); ga [R, n, D] = sum_t lo_w inv_z g;
         da [R, n] = sum_t lo_w inv_z dsum (the low-resolution part's per-block sums of g
         and D_t; zero in "sparse" mode where lo_w = 0)
    ``micro`` ("avx512_bf16"): g is bf16 bits (``_io``), dout in the compute dtype, rounded
    as it is read (exactly: the gradient of a bf16 result, widened by autograd to the
    training forward's float32 output, holds bf16 values); otherwise both are in the
    compute dtype (``io``, the products' operand dtype, takes dout's values exactly: dout
    comes in it).
    """
    dt = dtype
    store = _io(io, dt, micro) if micro else dt
    R, n = _vars("R", "n")
    dout = te.placeholder((R, n, b, D), dt, "dout")
    out = te.placeholder((R, n, b, D), dt, "out")
    inv_z = te.placeholder((R, n, b), dt, "inv_z")
    lo_w = te.placeholder((R, n, b), dt, "lo_w")

    # Selected, not multiplied: a padded query's dout may hold anything.
    g = te.compute((R, n, b, D),
                   lambda r, i, t, d: te.if_then_else(
                       inv_z[r, i, t] > 0.0,
                       dout[r, i, t, d] if store == dt else _narrow(dout[r, i, t, d], store),
                       tirx.const(0, store)),
                   name="g")
    d0 = te.reduce_axis((0, D), "d0")
    dsum = te.compute(
        (R, n, b),
        lambda r, i, t: te.sum(_widen(g[r, i, t, d0], dt) * out[r, i, t, d0], axis=d0),
        name="dsum",
    )
    t1 = te.reduce_axis((0, b), "t1")
    ga = te.compute(
        (R, n, D),
        lambda r, i, d: te.sum(lo_w[r, i, t1] * inv_z[r, i, t1] * _widen(g[r, i, t1, d], dt),
                               axis=t1), name="ga"
    )
    t2 = te.reduce_axis((0, b), "t2")
    da = te.compute(
        (R, n), lambda r, i: te.sum(lo_w[r, i, t2] * inv_z[r, i, t2] * dsum[r, i, t2], axis=t2),
        name="da"
    )
    return [dout, out, inv_z, lo_w, g, dsum, ga, da]


@dataclass
class _BwdUnit:
    """The shared part of a backward unit kernel (see ``_bwd_unit``)."""

    inputs: list  # q, k, v, mask, qmask, fixed, slots, stab, g, dsum, inv_z: the first ones
    R: Any
    U: Any
    W: int
    heads: Any
    group: Any
    scale: Any
    mask: Any
    qmask: Any
    stab: Any
    dsum: Any
    inv_z: Any  # [R, N]: mask_t / Z_t, the factor of a query's P
    io: str  # the products' operand dtype: q, k, v's (bf16 bits with micro-kernels; the
    # compute dtype where they are widened as they are read)
    valid: Callable  # (r, u, w) -> whether slot token w is in a block
    slot_tok: Callable  # (r, u, w) -> the slot token's position in the sequence
    fixed_tok: Callable  # (r, u, t) -> the fixed block's token t's position
    factor: Any  # [R, U, W]: the slot token's mask, 0 for empty slots
    fixed_mask: Any  # [R, U, b] the fixed (key) block's mask (by key), else None
    x_g: Any  # the slot rows of the first product (k_g / q_g)
    y_g: Any  # the slot rows of the second product (v_g / g_g)
    logit: Callable  # (r, u, w, t) -> the scaled logit from ``dots`` [R, U, W, b]
    dp: Any  # [R, U, W, b]


def _bwd_unit(b: int, D: int, C: int, dt: str, io: str, by_key: bool, gqa: bool,
              micro: str | None = None, widened: bool = False) -> _BwdUnit:
    """What the backward's two unit kernels share: inputs, a unit's blocks, and the
    two [W, b] products of a unit (W = C b slot tokens x b fixed tokens).

    A unit pairs one *fixed* block with C *slot* blocks (-1: empty). ``by_key=False``
    (``bwd_dq_units``): the fixed block is a query block (``unit_row``), the slots are key
    blocks (``unit_cols``); ``dots`` = k q^T scale m_q, ``dp`` = v g^T. ``by_key=True``
    (``bwd_dkdv_units``): the fixed block is a key block (``unit_col``), the slots are
    query blocks (``unit_rows``); ``dots`` = q k^T scale m_k, ``dp`` = g v^T. Either way
    dots[w, t] is the logit of (slot token w, fixed token t) without the slot token's
    mask, which ``factor`` (``key_factor`` / ``query_factor``: the slot token's mask, 0
    for empty slots) supplies. The fixed block is gathered transposed (``q_t``, ``g_t`` /
    ``k_t``, ``v_t``), the slots as rows (``k_g``, ``v_g`` / ``q_g``, ``g_g``), all in
    ``io`` (tensor-core operands on CUDA), sums in ``dt``.

    ``micro`` ("avx512_bf16": q, k, v and g are bf16 bits): the fixed block is first
    masked as rows (``q_s``, ``g_s`` / ``k_s``, ``v_s`` [b, D], unscaled: the scale goes
    to the logits, as in the forward's units) and then moved into pairs of dims (``q_t``
    ... [D/2, b, 2], the operand layout of ``vdpbf16ps``); the products are the CPU
    micro-kernels' (tensorized).

    ``widened`` (fp16/bf16 q, k, v on the CPU: ``Target.widens``): they are widened to ``dt``
    as they are read, and every operand, P and dS stay in ``dt`` (the float32 kernels'
    arithmetic).
    """
    stored = _io(io, dt, micro, widened)
    R, N, _, heads, group, scale, q, k, v, mask, qmask = _inputs(D, dt, stored, gqa)
    io = dt if widened else stored  # (the operands' dtype)
    stab = te.placeholder((R, N), dt, "stab")
    g = te.placeholder((R, N, D), io if micro else dt, "g")
    dsum = te.placeholder((R, N), dt, "dsum")
    inv_z = te.placeholder((R, N), dt, "inv_z")
    U = te.var("U", dtype=I32)
    fixed = te.placeholder((R, U), I32, "unit_col" if by_key else "unit_row")
    slots = te.placeholder((R, U, C), I32, "unit_rows" if by_key else "unit_cols")
    W = C * b

    def valid(r, u, w):
        return slots[r, u, w // b] >= 0

    def slot_tok(r, u, w):  # clamped: no index read can leave the tensor
        return te.max(slots[r, u, w // b], 0) * b + w % b

    def fixed_tok(r, u, t):
        return te.max(fixed[r, u], 0) * b + t

    # The slots are query blocks by key (their mask: qmask), key blocks otherwise.
    slot_mask, fixed_side = (qmask, mask) if by_key else (mask, qmask)
    factor = te.compute(
        (R, U, W),
        lambda r, u, w: te.if_then_else(valid(r, u, w), slot_mask[r // heads, slot_tok(r, u, w)],
                                        0.0),
        name="query_factor" if by_key else "key_factor",
    )
    def own(r):
        return r

    def shared(r):  # the key/value row of query row r (grouped-query heads)
        return _kv_row(r, group)

    if by_key:
        fixed_mask = te.compute((R, U, b),
                                lambda r, u, s: fixed_side[r // heads, fixed_tok(r, u, s)],
                                name="key_mask")
        x, y, x_slot, y_slot = k, v, q, g  # dots = q k^T, dp = g v^T
        fixed_row, slot_row = shared, own
        names = ("k", "v", "q_g", "g_g")
    else:
        fixed_mask = None
        x, y, x_slot, y_slot = q, g, k, v  # dots = k q^T, dp = v g^T
        fixed_row, slot_row = own, shared
        names = ("q", "g", "k_g", "v_g")

    def fixed_factor(r, u, t):
        if fixed_mask is not None:
            return fixed_mask[r, u, t]
        return fixed_side[r // heads, fixed_tok(r, u, t)]

    def operand(x):  # (a value of q, k, v or g in the operands' dtype)
        return _widen(x, dt) if widened else x.astype(io)

    x_g = te.compute((R, U, W, D),
                     lambda r, u, w, d: operand(x_slot[slot_row(r), slot_tok(r, u, w), d]),
                     name=names[2])
    y_g = te.compute((R, U, W, D),
                     lambda r, u, w, d: operand(y_slot[slot_row(r), slot_tok(r, u, w), d]),
                     name=names[3])
    # The fixed block as rows first (``x_s``: masked; ``y_s``), then moved: transposed
    # (``x_t`` [D, b]; the CPU's shuffle transpose, a plain strided gather was 7% of
    # ``bwd_dkdv_units``), or for ``micro`` into pairs of dims. CUDA inlines the rows.
    x_s = te.compute(
        (R, U, b, D),
        lambda r, u, t, d: _masked_row(
            operand(x[fixed_row(r), fixed_tok(r, u, t), d]) if widened
            else x[fixed_row(r), fixed_tok(r, u, t), d], fixed_factor(r, u, t), io),
        name=names[0] + "_s")
    y_s = te.compute((R, U, b, D),
                     lambda r, u, t, d: operand(y[fixed_row(r), fixed_tok(r, u, t), d]),
                     name=names[1] + "_s")
    if micro:
        def pairs(rows, name):
            return te.compute((R, U, D // 2, b, 2),
                              lambda r, u, p_, t, e: rows[r, u, t, 2 * p_ + e], name=name)

        x_t, y_t = pairs(x_s, names[0] + "_t"), pairs(y_s, names[1] + "_t")

        def product(rows, pairs, name, i):  # dims in pairs: the reduction of vdpbf16ps
            p0, e0 = te.reduce_axis((0, D // 2), f"p{i}"), te.reduce_axis((0, 2), f"e{i}")
            return te.compute(
                (R, U, W, b),
                lambda r, u, w, t: te.sum(_widen(rows[r, u, w, 2 * p0 + e0], dt)
                                          * _widen(pairs[r, u, p0, t, e0], dt), axis=[p0, e0]),
                name=name)
    else:
        def transposed(rows, name):
            return te.compute((R, U, D, b), lambda r, u, d, t: rows[r, u, t, d], name=name)

        x_t, y_t = transposed(x_s, names[0] + "_t"), transposed(y_s, names[1] + "_t")

        def product(rows, cols, name, i):
            d_ = te.reduce_axis((0, D), f"d{i}")
            return te.compute(
                (R, U, W, b),
                lambda r, u, w, t: te.sum(rows[r, u, w, d_].astype(dt) * cols[r, u, d_, t].astype(dt),
                                          axis=d_),
                name=name)
    dots = product(x_g, x_t, "dots", 0)
    dp = product(y_g, y_t, "dp", 1)

    def logit(r, u, w, t):
        return dots[r, u, w, t] * scale

    inputs = [q, k, v, mask, qmask, fixed, slots, stab, g, dsum, inv_z]
    return _BwdUnit(inputs=inputs, R=R, U=U, W=W, heads=heads, group=group, scale=scale,
                    mask=mask, qmask=qmask, stab=stab, dsum=dsum, inv_z=inv_z, io=io,
                    valid=valid,
                    slot_tok=slot_tok, fixed_tok=fixed_tok, factor=factor,
                    fixed_mask=fixed_mask, x_g=x_g, y_g=y_g, logit=logit, dp=dp)


def _slot_product(probs, rows, dt: str, io: str, name: str, axis: str, by_key: bool):
    """sum_w probs[r, u, w, t] rows[r, u, w, d] -> [R, U, b, D]: the probabilities (or dS)
    [R, U, W, b] in ``io`` (rounded once), the slot rows as they are. ``axis``: the
    reduction's name; ``by_key``: the fixed tokens are keys (named s, else t)."""
    R, U, W, b = probs.shape
    D = rows.shape[-1]
    w1 = te.reduce_axis((0, W), axis)
    if by_key:
        probs_t = te.compute((R, U, b, W), lambda r, u, s, w: _narrow(probs[r, u, w, s], io),
                             name=probs.op.name + "_t")
        return te.compute(
            (R, U, b, D),
            lambda r, u, s, d: te.sum(_widen(probs_t[r, u, s, w1], dt)
                                      * _widen(rows[r, u, w1, d], dt), axis=w1),
            name=name)
    probs_t = te.compute((R, U, b, W), lambda r, u, t, w: _narrow(probs[r, u, w, t], io),
                         name=probs.op.name + "_t")
    return te.compute(
        (R, U, b, D),
        lambda r, u, t, d: te.sum(_widen(probs_t[r, u, t, w1], dt)
                                  * _widen(rows[r, u, w1, d], dt), axis=w1),
        name=name)


def bwd_dq_units(b: int, D: int, blocks_per_unit: int, dtype: str = "float32",
                 io: str | None = None, gqa: bool = False, micro: str | None = None):
    """dq of the high-resolution part, per unit (one query block x C key blocks).

    in : q [R, N, D]; k, v [R / group, Nk, D] (``io`` dtype); mask [Bm, Nk], qmask
         [Bm, N]; unit_row [R, U]; unit_cols [R, U, C] i32; stab [R, N]; g [R, N, D]
         (dO, ``bwd_prep``); dsum, inv_z [R, N]; heads, group, scale
    out: dq_unit [R, U, b, D] (summed over a block row's units by ``bwd_finish``)

    Like the forward's units, the three products read gathered operands in ``io``
    (``k_g``, ``v_g``, ``q_t``, ``g_t``, ``ds_t``: tensor-core tiles on CUDA for fp16/bf16)
    and sum in ``dtype``; the CPU schedules inline the gathers. ``micro``: bf16 q, k, v
    and g (bits) on the CPU's micro-kernels, dS rounded to bf16 for dS k. See ``_bwd_unit``.
    """
    dt = dtype
    p = _bwd_unit(b, D, blocks_per_unit, dt, io or dt, by_key=False, gqa=gqa, micro=micro)
    R, U, W, heads, scale, qmask = p.R, p.U, p.W, p.heads, p.scale, p.qmask
    qtok, kf, dp = p.fixed_tok, p.factor, p.dp
    stab, dsum = p.stab, p.dsum
    # Only real keys of filled slots take part (their factor: 1, else 0; see ``_only``).
    ds = te.compute(
        (R, U, W, b),
        lambda r, u, w, t: _only(
            kf[r, u, w], _exp(p.logit(r, u, w, t) - stab[r, qtok(r, u, t)]),
            lambda e: e * p.inv_z[r, qtok(r, u, t)] * (dp[r, u, w, t] - dsum[r, qtok(r, u, t)])
            * (qmask[r // heads, qtok(r, u, t)] * scale)),  # dA/dq's factor, folded in
        name="ds",
    )
    dq_unit = _slot_product(ds, p.x_g, dt, p.io, "dq_unit", "w1", by_key=False)
    return _params(*p.inputs, dq_unit, heads, p.group, scale)


def bwd_dkdv_units(b: int, D: int, blocks_per_unit: int, dtype: str = "float32",
                   io: str | None = None, gqa: bool = False, micro: str | None = None,
                   keep_ds: bool = False, widened: bool = False):
    """dk and dv of the high-resolution part, per unit (one key block x C query blocks).

    in : q [R, N, D]; k, v [R / group, Nk, D] (``io`` dtype); mask [Bm, Nk], qmask
         [Bm, N]; unit_col [R, U] (the key block); unit_rows [R, U, C] i32 (query
         blocks, -1 empty); stab [R, N]; g [R, N, D] (dO, ``bwd_prep``); dsum, inv_z
         [R, N]; heads, group, scale
    out: dk_unit, dv_unit [R, U, b, D] (summed per key block by ``bwd_finish``)

    The four products read gathered ``io`` operands (``q_g``, ``g_g``, ``k_t``, ``v_t``,
    ``prob_t``, ``ds_t``), as in ``bwd_dq_units``. ``micro``: bf16 products, P and dS
    rounded to bf16 for P^T g and dS^T q. See ``_bwd_unit``.

    ``widened``: fp16/bf16 q, k, v widened as they are read (``_bwd_unit``).

    ``keep_ds`` (``bwd_dkdv_ds_units``): dS is an output too, ``ds_blocks`` [R, U, C, b, b]
    with ``ds_blocks[r, u, c, s, t]`` = dS of (query t of slot c, key s): each block
    key-major, as ``bwd_dq_ds_units`` reads it.
    """
    dt = dtype
    C = blocks_per_unit
    p = _bwd_unit(b, D, C, dt, io or dt, by_key=True, gqa=gqa, micro=micro, widened=widened)
    R, U, W, scale = p.R, p.U, p.W, p.scale
    qtok, qf, key_mask = p.slot_tok, p.factor, p.fixed_mask
    dp, stab, dsum = p.dp, p.stab, p.dsum
    prob = te.compute(
        (R, U, W, b),
        # Real queries of filled slots against real keys only (their factors; ``_only``).
        lambda r, u, w, s: _only(
            qf[r, u, w] * key_mask[r, u, s], _exp(p.logit(r, u, w, s) - stab[r, qtok(r, u, w)]),
            lambda e: e * p.inv_z[r, qtok(r, u, w)]),
        name="prob",
    )  # P inv_z: dv = sum_w P inv_z dO, and dS = P inv_z (dO . v - dO . out)
    ds = te.compute(
        (R, U, W, b),
        lambda r, u, w, s: prob[r, u, w, s] * (dp[r, u, w, s] - dsum[r, qtok(r, u, w)])
        * (qf[r, u, w] * scale),  # dA/dk's factor, folded in
        name="ds",
    )
    dv_unit = _slot_product(prob, p.y_g, dt, p.io, "dv_unit", "w1", by_key=True)
    dk_unit = _slot_product(ds, p.x_g, dt, p.io, "dk_unit", "w2", by_key=True)
    if not keep_ds:
        return _params(*p.inputs, dk_unit, dv_unit, p.heads, p.group, scale)
    ds_blocks = te.compute((R, U, C, b, b), lambda r, u, c, s, t: ds[r, u, c * b + t, s],
                           name="ds_blocks")
    return _params(*p.inputs, dk_unit, dv_unit, ds_blocks, p.heads, p.group, scale)


def bwd_dkdv_ds_units(b: int, D: int, blocks_per_unit: int, dtype: str = "float32",
                      io: str | None = None, gqa: bool = False, micro: str | None = None,
                      widened: bool = False):
    """``bwd_dkdv_units`` that also writes dS (``ds_blocks``), for ``bwd_dq_ds_units``."""
    return bwd_dkdv_units(b, D, blocks_per_unit, dtype, io, gqa, micro, keep_ds=True,
                          widened=widened)


def bwd_dq_ds_units(b: int, D: int, blocks_per_unit: int, dtype: str = "float32",
                    io: str | None = None, gqa: bool = False, micro: str | None = None,
                    widened: bool = False):
    """dq of the high-resolution part per unit (one query block x C key blocks), from the
    dS that ``bwd_dkdv_ds_units`` wrote: one block product per slot, where
    ``bwd_dq_units`` computes the logits, exp and g v^T again (three products).

    in : k [Rkv, N, D] (``io`` dtype); unit_cols [R, U, C] i32 (key blocks, -1 empty);
         ds_at [R, U, C] i32 (each block's dS in ``ds_blocks``, -1 empty);
         ds_blocks [R, S, b, b] (key-major: [key s, query t]); group
    out: dq_unit [R, U, b, D] = sum over slots of dS^T k (summed by ``bwd_finish``)

    dS carries every factor already (the 0/1 masks, 1/Z, the scale). ``micro``: bf16 k
    (bits) on the CPU's P v micro-kernel, dS rounded to bf16 in it. ``widened``: fp16/bf16 k
    widened as it is read, dS as it is (float32).
    """
    dt = dtype
    C = blocks_per_unit
    io = _io(io or dt, dt, micro, widened)
    R, Rkv, N, group, U, S = _vars("R", "Rkv", "N", "group", "U", "S")
    if not gqa:
        Rkv, group = R, None
    k = te.placeholder((Rkv, N, D), io, "k")
    unit_cols = te.placeholder((R, U, C), I32, "unit_cols")
    ds_at = te.placeholder((R, U, C), I32, "ds_at")
    ds_blocks = te.placeholder((R, S, b, b), dt, "ds_blocks")
    W = C * b
    def k_at(r, u, w, d):  # (clamped: no index read can leave the tensors; empty slots skipped)
        x = k[_kv_row(r, group), te.max(unit_cols[r, u, w // b], 0) * b + w % b, d]
        return _widen(x, dt) if widened else x

    k_g = te.compute((R, U, W, D), k_at, name="k_g")
    ds_g = te.compute((R, U, W, b),
                      lambda r, u, w, t: ds_blocks[r, te.max(ds_at[r, u, w // b], 0), w % b, t],
                      name="ds_g")
    dq_unit = _slot_product(ds_g, k_g, dt, dt if widened else io, "dq_unit", "w1", by_key=False)
    return _params(k, unit_cols, ds_at, ds_blocks, dq_unit, group)


def bwd_lowres(b: int, D: int, dtype: str = "float32", scratch: bool = False):
    """The low-resolution part's gradient, on the block averages ("full" mode).

    W0 = exp(L - R - 1e4 Hmask) c_j (the forward's weights before the per-token scale
    lo_w, folded into ga and da): dL = W0 (ga v̂^T - da), L = scale q̂ k̂^T.

    in : logits, hmask [R, n, nk]; rowmax [R, n]; counts [Bm, nk]; qp, ga [R, n, D];
         kp, vp [R, nk, D]; da [R, n]; heads, scale
    out: dqp [R, n, D]; dkp, dvp [R, nk, D]
    ``scratch``: weight, gv, dlog [R, n, nk] are arguments too (the last).
    """
    dt = dtype
    R, n, nk, Bm, heads = _vars("R", "n", "nk", "Bm", "heads")
    scale = te.var("scale", dtype=dt)
    logits = te.placeholder((R, n, nk), dt, "logits")
    hmask = te.placeholder((R, n, nk), dt, "hmask")
    rowmax = te.placeholder((R, n), dt, "rowmax")
    counts = te.placeholder((Bm, nk), dt, "counts")
    qp, ga = (te.placeholder((R, n, D), dt, name) for name in ("qp", "ga"))
    kp, vp = (te.placeholder((R, nk, D), dt, name) for name in ("kp", "vp"))
    da = te.placeholder((R, n), dt, "da")
    weight = _low_res_weights(logits, rowmax, hmask, counts, heads, scratch)
    d0 = te.reduce_axis((0, D), "d0")
    gv = te.compute(
        (R, n, nk), lambda r, i, j: te.sum(ga[r, i, d0] * vp[r, j, d0], axis=d0), name="gv"
    )
    dlog = te.compute(  # dL, times scale (L = scale q̂ k̂^T)
        (R, n, nk), lambda r, i, j: weight[r, i, j] * (gv[r, i, j] - da[r, i]) * scale,
        name="dlog",
    )
    j1 = te.reduce_axis((0, nk), "j1")
    dqp = te.compute(
        (R, n, D), lambda r, i, d: te.sum(dlog[r, i, j1] * kp[r, j1, d], axis=j1), name="dqp"
    )
    i1 = te.reduce_axis((0, n), "i1")
    dkp = te.compute(
        (R, nk, D), lambda r, j, d: te.sum(dlog[r, i1, j] * qp[r, i1, d], axis=i1), name="dkp"
    )
    i2 = te.reduce_axis((0, n), "i2")
    dvp = te.compute(
        (R, nk, D), lambda r, j, d: te.sum(weight[r, i2, j] * ga[r, i2, d], axis=i2), name="dvp"
    )
    return ([logits, hmask, rowmax, counts, qp, kp, vp, ga, da, dqp, dkp, dvp, heads, scale]
            + ([weight, gv, dlog] if scratch else []))


def bwd_finish(b: int, D: int, dtype: str = "float32", io: str | None = None,
               micro: str | None = None, gqa: bool = False):
    """Sum the unit partials per block and add the block averages' gradient.

    in : dq_unit [R, Uq, b, D]; q_start, q_units [R, n] (units of each query block);
         dk_unit, dv_unit [R, Uk, b, D]; k_start, k_units [R, nk] (units of each key block);
         dqp [R, n, D]; dkp, dvp [Rk, nk, D]; q_inv_counts [Bm, n]; inv_counts [Bm, nk];
         qmask [Bm, N]; mask [Bm, Nk]; heads, ucap_q, ucap_k (and ``gqa``: group)
    out: dq [R, n, b, D], dk, dv [Rk, nk, b, D] (the memory of [R, N, D], [Rk, Nk, D]): in
         the compute dtype, or with ``micro`` as bf16 bits, rounded to the nearest (the
         gradients of bf16 q, k, v)
    Rk = R, or with ``gqa`` (grouped-query heads) R / group: the key/value row rk sums the
    units of the query rows rk * group ... rk * group + group - 1 that share it, and
    dkp, dvp come summed over them (the caller's: n x D per row).
    """
    dt = dtype
    store = _io(io, dt, micro) if micro else dt
    R, N, Nk, Bm, heads, Uq, Uk, ucap_q, ucap_k = _vars("R", "N", "Nk", "Bm", "heads", "Uq",
                                                         "Uk", "ucap_q", "ucap_k")
    Rk, group = _vars("Rk", "group") if gqa else (R, None)
    n, nk = N // b, Nk // b
    dq_unit = te.placeholder((R, Uq, b, D), dt, "dq_unit")
    dk_unit = te.placeholder((R, Uk, b, D), dt, "dk_unit")
    dv_unit = te.placeholder((R, Uk, b, D), dt, "dv_unit")
    q_start, q_units = (te.placeholder((R, n), I32, name) for name in ("q_start", "q_units"))
    k_start, k_units = (te.placeholder((R, nk), I32, name) for name in ("k_start", "k_units"))
    dqp = te.placeholder((R, n, D), dt, "dqp")
    dkp, dvp = (te.placeholder((Rk, nk, D), dt, name) for name in ("dkp", "dvp"))
    inv_counts = te.placeholder((Bm, nk), dt, "inv_counts")
    q_inv_counts = te.placeholder((Bm, n), dt, "q_inv_counts")
    mask = te.placeholder((Bm, Nk), dt, "mask")
    qmask = te.placeholder((Bm, N), dt, "qmask")

    def gathered(name, units, start, count, cap, pooled, inv, side, rows, grouped):
        blocks = count.shape[1]
        w = te.reduce_axis((0, cap), "w_" + name)

        def unit_part(r, i, t, d):
            return te.if_then_else(
                w < count[r, i],
                units[r, te.max(te.min(start[r, i] + w, units.shape[1] - 1), 0), t, d],
                tirx.const(0.0, dt))

        if grouped:  # the query rows of key/value row r: r * group + g
            g = te.reduce_axis((0, group), "g_" + name)
            total = te.compute(
                (rows, blocks, b, D),
                lambda r, i, t, d: te.sum(unit_part(r * group + g, i, t, d), axis=[g, w]),
                name=name + "_sum")
        else:
            total = te.compute((rows, blocks, b, D),
                               lambda r, i, t, d: te.sum(unit_part(r, i, t, d), axis=w),
                               name=name + "_sum")

        def value(r, i, t, d):
            s = r * group // heads if grouped else r // heads  # the row's sequence
            x = total[r, i, t, d] + pooled[r, i, d] * inv[s, i] * side[s, i * b + t]
            return x if store == dt else _narrow(x, store)

        return te.compute((rows, blocks, b, D), value, name=name)

    dq = gathered("dq", dq_unit, q_start, q_units, ucap_q, dqp, q_inv_counts, qmask, R, False)
    dk = gathered("dk", dk_unit, k_start, k_units, ucap_k, dkp, inv_counts, mask, Rk, gqa)
    dv = gathered("dv", dv_unit, k_start, k_units, ucap_k, dvp, inv_counts, mask, Rk, gqa)
    return _params(dq_unit, q_start, q_units, dk_unit, dv_unit, k_start, k_units, dqp, dkp,
                   dvp, inv_counts, q_inv_counts, mask, qmask, dq, dk, dv, heads, group,
                   ucap_q, ucap_k)
