"""Hand-written CPU (LLVM) schedules, one named function per operator.

Each function takes an ``s_tir.Schedule`` of the operator's PrimFunc and its knobs
as keyword arguments; ``default_knobs(op, vec)`` gives the defaults: ``KNOBS[op]``, which
suit x86-64 with AVX-512 (vec=16 floats, 32 vector registers), with smaller register
tiles for AVX2 (vec=8, 16 registers: ``NARROW_KNOBS``).
"""
from __future__ import annotations

from mra_compile import host
from mra_compile.schedules import cpu_bf16, cpu_stores, cpu_transpose

# The schedules that take ``micro``: the micro-kernels of the variant (None, or
# "avx512_bf16": bf16 q, k, v and the block products of schedules/cpu_bf16.py, or
# "avx512_bf16_fp32_pv": the same with P v in float32, operators.MICRO).
MICRO = ("pool_and_logits", "hires_units", "hires_rows", "bwd_prep", "bwd_dkdv_ds_units",
         "bwd_dq_ds_units")


def _keys_outer(sch, name, vec):
    """A [.., t] = reduce_w X[.., w, t] stage: w outside, the queries t in vector lanes."""
    t, w = sch.get_loops(sch.get_sblock(name))[-2:]
    sch.reorder(w, t)
    sch.vectorize(sch.split(t, [None, vec])[1])
    return w


def _guard(sch, loop, cond) -> None:
    """Run the body of ``loop`` only where ``cond`` holds (a schedule step that
    ``s_tir.Schedule`` lacks: an ``if`` between a loop and its body, put in place through
    the schedule state). Applied last: later primitives could not see through it."""
    from tvm import tirx

    sref = sch.get_sref(loop)
    f = sref.stmt
    body = tirx.IfThenElse(cond, f.body, None)
    sch.state.replace(sref, tirx.For(f.loop_var, f.min, f.extent, f.kind, body,
                                     f.thread_binding, f.annotations))


def _input(block, name: str):
    """The buffer ``name`` that ``block`` (an ``SBlock``) reads: the indices guards test."""
    return next(r.source for r in block.reads if getattr(r.source, "name", None) == name)


def _skip_empty_slots(sch, loop, slots: str, loops: dict, per_token: str) -> None:
    """Skip the work of a unit's empty block slots (index -1 in input ``slots``,
    [R, units, C]): a row's own unit, or an overflow unit, often has fewer blocks than
    slots, and padding units have none.

    ``loop``: the fused (row, unit) loop. ``loops``: {loop: tokens per iteration} of loops
    over the unit's slot tokens (a slot is b consecutive tokens) whose whole bodies may be
    skipped. Their results for empty slots are then never written: what reads them
    selects by the slot's validity, or is itself guarded here. ``per_token``: the unit's
    per-token stage that reads ``slots`` and spans the C * b slot tokens (the forward's
    ``key_cap``, the backward's factor)."""
    index, units, C, b = _slot_table(sch, slots, per_token)
    unit = sch.get(loop).loop_var  # the fused (row, unit) loop: row-major
    for slot_loop, tokens in loops.items():
        first = sch.get(slot_loop).loop_var * tokens
        _guard(sch, slot_loop, index[unit // units, unit % units, first // b] >= 0)


def _slot_table(sch, slots: str, per_token: str):
    """(index, units, C, b): input ``slots`` [R, units, C] (each unit's key block per
    slot, -1 where empty) as the unit's ``per_token`` stage reads it
    (``_skip_empty_slots``), and the tokens of a slot (that stage spans the C * b slot
    tokens)."""
    block = sch.get(sch.get_sblock(per_token))
    index = _input(block, slots)
    units, C = index.shape[1], index.shape[2]
    return index, units, C, block.iter_vars[-1].dom.extent // C


def _param(sch, name: str):
    """The kernel's scalar parameter ``name`` (a Var), or None where it has none."""
    return next((p for p in sch.mod["main"].params if p.name == name), None)


def _kv_row(sch, row, shared: bool = True):
    """The row of the key/value inputs that query row ``row`` reads: ``row // group``
    where the kernel takes grouped-query heads (a ``group`` parameter) and ``shared``."""
    group = _param(sch, "group")
    return row if group is None or not shared else row // group


def _row_requests(bufs, buf_row, block, b, first, count, level: int, tag: str = ""):
    """Prefetch requests (``llvm.prefetch``: read, data; ``level`` 2 into L2, 3 into L1)
    for every 64-byte line of tokens ``first .. first + count`` of key block ``block``
    (``b`` tokens a block) at row ``buf_row`` of each of ``bufs`` ([rows, N, D], one
    dtype and D); ``tag`` names the loop variables."""
    from tvm import tirx

    token = tirx.Var("pf_token" + tag, "int32")
    lines = _line_requests(bufs, lambda at: (buf_row, block * b + (first + token), at), level,
                           tag)
    return tirx.For(token, 0, count, tirx.ForKind.SERIAL, lines)


def _line_requests(bufs, index, level: int, tag: str):
    """Prefetch requests (read, data; ``level`` as in ``_row_requests``) for every 64-byte
    line of one row of each of ``bufs`` (one dtype, one last dim): ``index(at)`` is the
    subscript of the row's element ``at``; ``tag`` names the line loop's variable."""
    from tvm import tirx

    per_line = 64 // (_bits(bufs[0].dtype) // 8)  # elements of a 64-byte cache line
    line = tirx.Var("pf_line" + tag, "int32")
    asks = [tirx.Evaluate(tirx.call_llvm_intrin(
        "void", "llvm.prefetch.p0", tirx.address_of(buf[_subscript(buf, index(line * per_line))]),
        tirx.IntImm("int32", 0), tirx.IntImm("int32", level), tirx.IntImm("int32", 1)))
        for buf in bufs]
    return tirx.For(line, 0, -(-int(bufs[0].shape[-1]) // per_line), tirx.ForKind.UNROLLED,
                    _seq(asks))


def _subscript(buf, index):
    """``index`` (row, token, element) of an input as ``buf``'s subscript: the same, or
    (row // H, token, row % H, element) where ``buf`` is [B, N, H, D] (an input read
    where an attention layer's heads lie: ``operators._read``)."""
    if len(buf.shape) == 4 and len(index) == 3:
        row, token, at = index
        return (row // buf.shape[2], token, row % buf.shape[2], at)
    return index


def _ask_first(sch, loop, ask) -> None:
    """Put statement ``ask`` at the start of ``loop``'s body (inside the body's guard,
    where there is one: ``_skip_empty_slots``)."""
    from tvm import tirx

    sref = sch.get_sref(loop)
    g = sref.stmt
    body = g.body
    if isinstance(body, tirx.IfThenElse):
        body = tirx.IfThenElse(body.condition, tirx.SeqStmt([ask, body.then_case]),
                               body.else_case)
    else:
        body = tirx.SeqStmt([ask, body])
    sch.state.replace(sref, tirx.For(g.loop_var, g.min, g.extent, g.kind, body,
                                     g.thread_binding, g.annotations))


# Rows of the next unit's queries asked for per iteration of a spread prefetch loop
# (``_prefetch_next_unit``).
QUERY_ROWS_PER_TILE = 8
# Tiles ahead of the logits' register tile whose key rows it asks into L1 (``near`` of
# ``_prefetch_next_unit``).
L1_TILES_AHEAD = 2


def _prefetch_next_unit(sch, loop, slots: str, kv, per_token: str,
                        shared: bool = True, queries=None, spread=None, near=None) -> None:
    """Ask for the key and value blocks of the next unit (its slots in input ``slots``,
    [R, units, C]) to be brought into L2 (``llvm.prefetch``) while this one computes.

    A unit reads C key blocks and C value blocks that the selection scattered over the
    row's keys: at N = 8192 they come from DRAM (k, v of B*H = 12 rows are 48 MB in
    fp32), one block after the other as the unit needs them, and hires_rows waited for
    them 3.5 of its 14.5 ms. Requested all at once they come in parallel: fp32
    hires_rows 12.6-13.0 ms. (Asking at the unit's own start, or two or three units
    ahead, measured the same.) ``loop``: the fused (row, unit) loop, row-major; ``kv``:
    the k and v buffers (or any two [rows, N, D] inputs the slots index: the backward's
    units), read at row r // group unless ``shared`` is False.

    ``spread`` "call": the unit's call asks for the next unit's rows of the slots it has
    filled itself (``_next_unit_rows``), and its queries; only the rest is asked for here.
    ``spread`` (loop, tokens, first): a loop over the current unit's slot tokens, guarded
    per slot by ``_skip_empty_slots``, whose iteration starts at unit token ``first`` (an
    expression of its loop variables) and covers ``tokens``: the next unit's slot c is
    asked for ``tokens`` rows at a time from the iterations on the current unit's slot
    c, and up front only the slots the current unit has empty. One burst of ~1000
    requests at the unit's start (all of its blocks) holds the core's miss buffers while
    the unit's first products wait behind it; spread over the logits tiles, fp32
    hires_rows took 21.96 against 23.40 ms at N = 8192 (Zen 4, one process,
    alternating). The bf16 units' call spreads them over its P v tiles instead (``spread``
    "call"; ``cpu_bf16.c``, ``ask_row``): over the micro-kernel's logits calls (a slot's
    128 lines of k and v in one burst before each call) bf16 hires_rows had taken
    1.06-1.08x the time of two rows a pair of keys over the exps in sparse mode,
    1.04-1.05x in full mode, at N = 4096 and 8192 (Zen 5, in-process A/B); float32, whose
    logits tiles are four keys, 0.95x over its tiles than over the exps.

    ``queries``: the q buffer where unit u of a row is its query block u (``hires_rows``):
    the next block of queries too. The queries of consecutive units are consecutive, but
    each block of them (4 KB in bf16 at D = 64) starts a page the hardware prefetcher
    does not enter: hires_rows 2-3% faster in bf16, 1.6% in float32 (N = 8192). With
    ``spread``, they are asked for ``QUERY_ROWS_PER_TILE`` rows (at most ``tokens``) per
    iteration of the spread loop, from its first: up front, the float32 block's 128
    requests delayed the unit's own first reads (the masked copy of its queries took ~7%
    of hires_rows' samples); spread, float32 hires_rows took 0.95-0.98x the time (N = 1024
    to 8192, Zen 5, in-process A/B; bf16 the same).

    ``near`` (loop, tokens, ahead): each iteration of a loop over the current unit's key
    tiles (``tokens`` keys each, guarded per slot) also asks for the key rows of the tile
    ``ahead`` iterations on, into L1. The key rows come from L2 where the logits read
    them, as broadcasts of one key's value at a time, 4 rows of 256 bytes per tile of the
    logits (``qk_rows``): the tile loop took ~1.4x the time of P V for the same flops. Two
    tiles ahead: fp32 hires_rows 0.95-0.97x the time at N = 8192 (1, 3, 4 ahead:
    0.96-0.97x; Zen 5, in-process A/B). The bf16 micro-kernels take a whole key block per
    iteration: ``_unit`` asks for the next one (``mra_bf16_qk`` asks for each next tile
    itself): bf16 hires_rows 0.98x the time of the micro-kernels' requests alone (N =
    4096 and 8192; two blocks ahead 0.99x).
    Applied last (like ``_guard``)."""
    from tvm import tirx

    index, units, C, b = _slot_table(sch, slots, per_token)
    k, v = kv
    loop_var = sch.get(loop).loop_var
    nxt = loop_var + 1
    row = nxt // units
    kv_row = _kv_row(sch, row, shared)

    def rows(block, first, count, bufs, buf_row=kv_row, tag="", level=2):
        return _row_requests(bufs, buf_row, block, b, first, count, level, tag)

    there = nxt < sch.get(loop).min + sch.get(loop).extent
    asks: list = []  # (loop, statements asked at the start of its body, in order)
    if near is not None:  # this unit's keys ``ahead`` tiles on, into L1 (locality 3)
        near_loop, tile, ahead = near
        at = (sch.get(near_loop).loop_var + ahead) * tile
        own = index[loop_var // units, loop_var % units, at // b]
        own_row = _kv_row(sch, loop_var // units, shared)
        asks.append((near_loop, [tirx.IfThenElse(at < C * b, tirx.IfThenElse(
            own >= 0, rows(own, at % b, tile, (k,), own_row, "_near", 3), None), None)]))
    slot = tirx.Var("pf_slot", "int32")
    wanted = index[row, nxt % units, slot] >= 0
    if spread is not None:  # (the slots this unit fills are asked for as it goes)
        wanted = tirx.all(wanted, index[loop_var // units, loop_var % units, slot] < 0)
    if isinstance(spread, tuple):
        spread_loop, tokens, first = spread
        block_index = index[row, nxt % units, first // b]
        ask = tirx.IfThenElse(there, tirx.IfThenElse(
            block_index >= 0, rows(block_index, first % b, tokens, (k, v), tag="_spread"), None),
            None)
        if asks and sch.get(asks[0][0]).same_as(sch.get(spread_loop)):
            spread_loop, stmts = asks.pop()
            stmts.append(ask)
        else:
            stmts = [ask]
        if queries is not None:
            per_tile = min(tokens, QUERY_ROWS_PER_TILE)
            q_first = first if per_tile == tokens else first // tokens * per_tile
            stmts.insert(0, tirx.IfThenElse(tirx.all(there, q_first < b), rows(
                nxt % units, q_first, per_tile, (queries,), row, "_q"), None))
        asks.append((spread_loop, stmts))
    for ask_loop, stmts in asks:
        _ask_first(sch, ask_loop, _seq(stmts))
    each_slot = tirx.For(slot, 0, C, tirx.ForKind.SERIAL, tirx.IfThenElse(
        wanted, rows(index[row, nxt % units, slot], 0, b, (k, v)), None))
    if queries is not None and spread is None:
        each_slot = tirx.SeqStmt([rows(nxt % units, 0, b, (queries,), row, "_q"), each_slot])
    sref = sch.get_sref(loop)
    f = sref.stmt
    sch.state.replace(sref, tirx.For(f.loop_var, f.min, f.extent, f.kind,
                                     tirx.SeqStmt([tirx.IfThenElse(there, each_slot, None), f.body]),
                                     f.thread_binding, f.annotations))


def _seq(stmts):
    """The statements in order (a SeqStmt of one is not allowed: the statement itself)."""
    from tvm import tirx

    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _bits(dtype) -> int:
    """Bits of a TVM dtype (a ``DataType`` or its string)."""
    from tvm import DataType

    return DataType(str(dtype)).bits


# The storage scope of the register tiles' accumulators (``cache_write``). In "global"
# scope a small buffer allocated inside a kernel's parallel loop becomes a stack array,
# which LLVM promotes to registers whole; in "local" TVM allocates it from the kernel
# workspace (a call), and LLVM kept the registers but also stored every finished tile
# there and zeroed it before the next: 8 extra vector stores a tile of the float32 logits
# (2 keys x 32 queries, 256 FMAs). The same bits; the time against "local" (Zen 4,
# in-process A/B, 21-41 rounds): float32 hires_rows 0.968-0.991x at N = 8192, sparse,
# 0.993x at 4096, full; pool_and_logits 0.97x in bf16, 1.00x in float32; the backward's
# bwd_dkdv_ds_units 0.98-0.99x, bwd_dq_ds_units 0.99x (1.02x in a first run of 21).
# Not where StorageRewrite merges the tile into a later buffer within 16x its size: the
# float32 logits' 4-key tile (512 bytes) at D = 64 becomes part of unit_out's 8 KB, from
# the workspace again, stored and zeroed there as in "local" (the 2-key tile is not).
TILE_SCOPE = "global"


def _register_tile(sch, name, *, vec, rows, unroll, slot=None, cols=None):
    """A [.., x, y] = sum_z stage as register tiles: ``rows`` consecutive x times all of
    y (in vectors of ``vec``), accumulated in a constant-size tile of scope
    ``TILE_SCOPE`` (LLVM keeps it in registers) and written back once; loop order (x_o,
    z, x_i, y).

    ``slot``: split z into (z_o, z_i) of ``slot`` each, loop order (x_o, z_o, z_i, x_i, y),
    so that a slot's work can be skipped whole. ``cols``: tiles of ``cols`` vectors of y
    instead of all of y, the column tiles outermost (y_c, x_o, ...): each pass then reads
    a narrow band of the z rows, which stays in L1 while every x tile reuses it (where
    ``cols`` vectors do not divide y, all of y). Returns (x_o, the outer reduction loop)."""
    blk = sch.get_sblock(name)
    x, y, z = sch.get_loops(blk)[-3:]
    y_c, y = _bands(sch, y, cols, vec)
    x_o, x_i = sch.split(x, [None, rows])
    if slot is None:
        z_outer = z
        order = [x_o, z, x_i, y]
    else:
        z_outer, z = sch.split(z, [None, slot])
        order = [x_o, z_outer, z, x_i, y]
    sch.reorder(*([y_c] if y_c is not None else []), *order)
    acc = sch.cache_write(blk, 0, TILE_SCOPE)
    sch.reverse_compute_at(acc, x_o)
    y_o, y_i = sch.split(y, [None, vec])
    sch.vectorize(y_i)
    if unroll:
        sch.unroll(y_o)
        sch.unroll(x_i)
    sch.vectorize(sch.split(sch.get_loops(acc)[-1], [None, vec])[1])
    return x_o, z_outer


def _bands(sch, y, cols, vec):
    """(y_c, y_i): loop ``y`` in bands of ``cols`` vectors of ``vec``, or (None, y) where
    ``cols`` is None, does not divide it or covers it."""
    width = sch.get(y).extent
    if cols is not None and width % (cols * vec) == 0 and width > cols * vec:
        return tuple(sch.split(y, [None, cols * vec]))
    return None, y


def _unit(sch, loop, *, vec, qk_rows, pv_rows, pv_cols, unroll, outputs_placed=True, slots,
          micro=None, prefetch_queries=False):
    """Schedule the stages of ``operators._unit_attention`` under ``loop`` (one unit per
    iteration), everything in L1: the queries masked as rows, then transposed
    in registers (``schedules/cpu_transpose.py``); logits [W, b] as a register tile of
    ``qk_rows`` keys x b queries; max, exp and sum with the queries in vector lanes; P V
    as tiles of ``pv_rows`` queries x ``pv_cols`` vectors of D (``_register_tile``).
    ``outputs_placed``: whether unit_max already sits under ``loop`` (it does when it is
    a kernel output). Empty key-block slots (-1 in input ``slots``) are skipped
    (``_skip_empty_slots``); the next unit's key and value blocks are prefetched
    (``_prefetch_next_unit``).
    ``micro`` ("avx512_bf16"): both block products are the bf16 micro-kernels instead
    (``_micro_products``: q k^T one call per key block; the exps, their sums and P V one
    for the unit, which asks for the next unit's rows as it goes).
    ``prefetch_queries``: unit u of a row is its query block u (``hires_rows``): prefetch
    the next one's queries too."""
    # The gathers (CUDA's shared-memory tiles) are read in place here: key and value
    # blocks are contiguous [b, D] slabs already.
    kv = tuple(_input(sch.get(sch.get_sblock(g)), x) for g, x in (("k_g", "k"), ("v_g", "v")))
    for name in ("logit", "k_g", "v_g", "prob_io"):
        sch.compute_inline(sch.get_sblock(name))
    queries = ("q_t", "q_s")
    stages: tuple[str, ...] = ("prob", "dots", *queries, "key_cap")
    if not outputs_placed:
        stages = ("prob", "unit_max", "dots", *queries, "key_cap")
    for name in stages:
        sch.compute_at(sch.get_sblock(name), loop)

    b = sch.get(sch.get_loops(sch.get_sblock("unit_out"))[-3]).extent  # queries: one block
    # bf16 products with P rounded: the exps, their sums and P v are one call
    # (``_micro_products``), which also asks for the next unit's rows
    fused = micro == "avx512_bf16"
    q = _input(sch.get(sch.get_sblock("q_s")), "q") if prefetch_queries else None
    if micro:
        asks = _next_unit_rows(sch, loop, slots, kv, q) if fused else None
        w_o, slot = _micro_products(sch, vec, b, micro, slots, loop, asks)
        w_tokens = b
    else:
        # P V: sum_w P[w, t] v[w, d] -> [b, D], keys as (slot, key of the block).
        slot, pv_tile = _slots_outside_tiles(sch, "unit_out", vec=vec, rows=pv_rows,
                                             cols=pv_cols, slot=b, unroll=unroll)
        # Logits: sum_d k[w, d] q^T[d, t] -> [W, b].
        w_o, d_ = _register_tile(sch, "dots", vec=vec, rows=qk_rows, unroll=unroll)
        w_tokens = qk_rows
    # Max, exp and sum run per key block (slot), so that an empty slot is skipped whole:
    # one test per b keys, and no max over keys that are not there.
    key_loops = {name: sch.split(_keys_outer(sch, name, vec), [None, b])[0]
                 for name in ("unit_max",) + (() if fused else ("unit_sum",))}
    skipped = {w_o: w_tokens, key_loops["unit_max"]: b}
    if not fused:
        loops = sch.get_loops(sch.get_sblock("prob"))
        prob_slot, prob_key = sch.split(loops[-2], [None, b])
        t_o, t_i = sch.split(loops[-1], [None, vec])
        sch.vectorize(t_i)
        # Two keys' exps interleaved (each a chain of ~20 dependent operations; b queries
        # are only b / vec chains): the out-of-order window then overlaps them.
        key_pair, key_i = sch.split(prob_key, [None, 2])
        sch.reorder(key_i, t_o)
        sch.unroll(key_i)
        sch.unroll(t_o)
        skipped.update({prob_slot: b, key_loops["unit_sum"]: b})
    # The keys' caps: b contiguous values per filled slot, in vectors.
    cap_slot, cap_key = sch.split(sch.get_loops(sch.get_sblock("key_cap"))[-1], [None, b])
    sch.vectorize(sch.split(cap_key, [None, vec])[1])
    skipped[cap_slot] = b
    # q_s [b, D] in vectors; then q_t: [D/2, b, 2] by the micro-kernel, or [D, b] by the
    # shuffle transpose (a plain strided gather where b or D is not a multiple of 16).
    if micro:
        q_d = sch.get_loops(sch.get_sblock("q_s"))[-1]
        sch.vectorize(sch.split(q_d, [None, vec])[1])
    else:
        _rows_then_transposed(sch, "q", vec, b)
    # Reductions are split into init and update last (loop moves need them whole).
    if not micro:
        sch.decompose_reduction(sch.get_sblock("dots"), d_)
    for name, loop_ in key_loops.items():
        sch.decompose_reduction(sch.get_sblock(name), loop_)
    if slot is not None:  # (None: P v is one call for all slots, ``_micro_products``)
        skipped[slot] = b
    _skip_empty_slots(sch, loop, slots, skipped, "key_cap")
    if not micro:
        _prefetch_next_slot(sch, loop, slot, pv_tile, slots, kv[1])
    spread: str | tuple
    if fused:  # (the call asks for the next unit's rows as its products go)
        spread = "call"
    elif micro:  # the next unit's rows two keys at a time from the exps (``_prefetch_next_unit``)
        spread = (key_pair, 2, sch.get(prob_slot).loop_var * b + sch.get(key_pair).loop_var * 2)
    else:
        spread = (w_o, w_tokens, sch.get(w_o).loop_var * w_tokens)
    _prefetch_next_unit(sch, loop, slots, kv, "key_cap", queries=q, spread=spread,
                        near=(w_o, w_tokens, 1 if micro else L1_TILES_AHEAD))


def _next_unit_rows(sch, loop, slots: str, kv, queries) -> tuple:
    """The arguments by which ``mra_bf16_exp_pv_slots`` asks for the next unit's rows
    (``cpu_bf16.exp_pv_slots``' ``asks``; ``loop``, ``slots``, ``kv``, ``queries`` as
    ``_prefetch_next_unit``'s): what to ask for (1: the next unit's key and value rows,
    where there is a next unit; 2: its queries, where ``queries``), the next unit's
    slots, the addresses of k and v at its key/value row, of its first query row, and
    their stride (addresses in bounds either way)."""
    from tvm import tirx

    index, units, C, b = _slot_table(sch, slots, "key_cap")
    f = sch.get(loop)
    there = f.loop_var + 1 < f.min + f.extent
    nxt = tirx.min(f.loop_var + 1, f.min + f.extent - 1)  # (in bounds either way)
    row = nxt // units

    def address(buf, index_):
        return tirx.address_of(tirx.BufferLoad(buf, list(_subscript(buf, index_))))

    k, v = kv
    kv_row = _kv_row(sch, row)
    asks = [address(index, (row, nxt % units, 0)), address(k, (kv_row, 0, 0)),
            address(v, (kv_row, 0, 0))]
    if queries is None:
        return (there.astype("int32"), *asks, asks[1], 0)
    stride = queries.shape[-1] * (queries.shape[2] if len(queries.shape) == 4 else 1)
    return (there.astype("int32") * 3, *asks, address(queries, (row, (nxt % units) * b, 0)), stride)


def _tile_share(sch, tile_loop, b):
    """(first row, row count) of a b-row block that one iteration of ``tile_loop`` (a
    slot's query tiles: ``_slots_outside_tiles``) asks for: an even share per tile. With
    bands of D every band's tiles ask again: in the first band only, bwd_dq_ds_units took
    1.06-1.09x the time and float32 hires_rows 1.01x at D = 128, N = 8192 (Zen 5,
    in-process A/B)."""
    tiles = sch.get(tile_loop)
    count = b // int(tiles.extent)
    return tiles.loop_var * count, count


def _prefetch_next_slot(sch, loop, slot_loop, tile_loop, slots: str, buf) -> None:
    """Ask for the next slot's block of ``buf`` (P V's values) into L1 while this slot's
    product runs, its rows spread evenly over the iterations of ``tile_loop`` (P V's
    query tiles, under ``slot_loop``). ``loop``: the fused (row, unit) loop; the next
    slot is slot + 1 of the unit, if there is one and it is filled.

    The values of a unit's slots come from L2 at best (the previous unit asked for them,
    ``_prefetch_next_unit``), and the first query tile of each slot waited for them:
    float32 hires_rows 0.95-0.96x the time at N = 4096 and 8192 (1.00x at 1024, where
    they are in L2 anyway; into L2 instead: 0.96x; Zen 5, in-process A/B). The bf16
    micro-kernel (one call a slot, no tiles) gained nothing from the block asked for
    before the call (0.99x without), so ``_unit`` asks in float32 only.
    Applied last (like ``_guard``)."""
    from tvm import tirx

    index, units, C, b = _slot_table(sch, slots, "key_cap")
    unit = sch.get(loop).loop_var
    nxt_slot = sch.get(slot_loop).loop_var + 1
    nxt = index[unit // units, unit % units, nxt_slot]
    first, per = _tile_share(sch, tile_loop, b)
    request = _row_requests((buf,), _kv_row(sch, unit // units), nxt, b, first, per, 3, "_pv")
    # (nested: the index is not read past the unit's last slot)
    _ask_first(sch, tile_loop, tirx.IfThenElse(nxt_slot < C, tirx.IfThenElse(
        nxt >= 0, request, None), None))


def _rows_then_transposed(sch, x, vec, b):
    """``{x}_s`` [b, D] (a block's rows, masked) in vectors, then ``{x}_t`` [D, b] by
    ``_transposed``."""
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(f"{x}_s"))[-1], [None, vec])[1])
    _transposed(sch, f"{x}_t", vec, b)


def _transposed(sch, name, vec, b):
    """A stage ``name`` [.., D, b] = [b, D]^T (its last two loops) by the shuffle transpose
    (``cpu_transpose``), or a plain strided gather, built a lane at a time, where b or D
    is not a multiple of 16 (the intrinsic's tiles would overrun the block)."""
    d, t = sch.get_loops(sch.get_sblock(name))[-2:]
    tile = int(b), int(sch.get(d).extent)
    if cpu_transpose.fits(*tile):
        dtype = str(sch.get(sch.get_sblock(name)).writes[0].source.dtype)
        sch.tensorize(d, cpu_transpose.intrinsic(*tile, dtype))
    else:
        sch.vectorize(sch.split(t, [None, vec])[1])


def _micro_products(sch, vec, b, micro, slots, loop, asks):
    """The unit's block products as calls of the bf16 micro-kernels
    (``schedules/cpu_bf16.py``): logits [W, b] one call per key block (slot); the exps,
    their sums and P V [b, D] one call for all the unit's slots (``slots``: the input
    holding their key blocks; ``_exp_pv_in_one_call`` under ``loop``, the unit loop,
    asking for the next unit's rows by ``asks``, ``_next_unit_rows``), or with ``micro``
    "avx512_bf16_fp32_pv" (P V in float32) P V one call per slot onto zeros. Returns the
    slot loops (logits; P V's, or None where it is one call)."""
    D = sch.get(sch.get_loops(sch.get_sblock("unit_out"))[-2]).extent
    # (k, v [B, N, H, D]: their blocks are [1, b, 1, D] regions, ``operators._read``)
    heads_last = len(_input(sch.get(sch.get_sblock("dots")), "k").shape) == 4
    qk, pairs = cpu_bf16.intrinsics(D, heads_last)
    sch.tensorize(sch.get_loops(sch.get_sblock("q_t"))[-3], pairs)
    logits = _slot_logits(sch, "dots", b, qk)
    if micro == "avx512_bf16_fp32_pv":  # (P v in float32 FMAs, P not rounded)
        return logits, _slot_product(sch, "unit_out", vec, b, cpu_bf16.float32_pv_intrinsic(D))
    # The exps, their sums and P v of all the unit's slots in one call, which skips the
    # empty ones itself: each tile's sums stay in registers over the unit's blocks (bf16
    # hires_rows 0.97x the time at N = 8192, sparse, against one call a slot; Zen 4,
    # in-process A/B), and P is made where the products pair it (``cpu_bf16.c``).
    t = sch.get_loops(sch.get_sblock("unit_out"))[-3]
    W = sch.get(sch.get_loops(sch.get_sblock("unit_out"))[-1]).extent
    v = _input(sch.get(sch.get_sblock("unit_out")), "v")
    token_dim = -3 if heads_last else -2
    sch.blockize(t)
    scale = _param(sch, "scale")
    _exp_pv_in_one_call(sch, loop, cpu_bf16.exp_pv_slots(
        D, int(W) // b, v.shape[token_dim], scale, heads_last, asks), slots,
        {"v": (token_dim, -1), slots: (-1,)})
    return logits, None


def _called_block(block, impl, names: tuple[str, ...], whole: dict[str, tuple[int, ...]]):
    """``block`` (an ``SBlock``) with its body the call of ``impl``
    (``extern_calls.called``: a description's root block, its loops one extern call),
    its buffers bound to ``block``'s regions in the order both read and write them (as
    tensorize binds them), for a description tensorize cannot match: one whose rows are
    gathered through an index read inside the block (``cpu_bf16.exp_pv_slots``), which its
    comparison of regions does not follow. So the regions are checked here: the buffers
    ``names`` in that order; and each ``{name: dims}`` of ``whole`` is bound whole in
    those dimensions (the call offsets into them itself), its region widened where the
    block's is narrower: a unit of one slot reads one block of v, which TVM bounds to
    that block (``hires_units`` with ``blocks_per_unit=1``, which the tuning records of
    some CPUs pick), where the call, given that block, would offset into it again. The
    init goes: the call writes every value."""
    from tvm import ir, tirx
    from tvm.s_tir import stmt as s_stmt

    root = impl.body.block
    params = [r.source for r in (*root.reads, *root.writes)]
    regions = [*block.reads, *block.writes]
    got = tuple(getattr(r.source, "name", None) for r in regions)
    if got != names or not all(len(p.shape) <= len(r.region) for p, r in zip(params, regions)):
        raise RuntimeError(f"{block.name_hint}: regions {[str(r) for r in regions]} are not "
                           f"what the call of {names} takes")

    def bound(r):
        dims = {d % len(r.region) for d in whole.get(r.source.name, ())}
        if not dims:
            return r
        return tirx.BufferRegion(r.source, [
            ir.Range.from_min_extent(0, r.source.shape[d]) if d in dims else span
            for d, span in enumerate(r.region)])

    reads = [bound(r) for r in block.reads]
    writes = [bound(r) for r in block.writes]
    match = [s_stmt.MatchBufferRegion(p, r) for p, r in zip(params, (*reads, *writes))]
    return s_stmt.SBlock(block.iter_vars, reads, writes, block.name_hint, root.body,
                         None, block.alloc_buffers, match, block.annotations)


def _blocks_in(stmt) -> set[str]:
    """The names of the blocks in statement ``stmt`` (loops, guards, sequences, blocks)."""
    names: set[str] = set()
    todo = [stmt]
    while todo:
        x = todo.pop()
        if x is None:
            continue
        if hasattr(x, "name_hint") and hasattr(x, "iter_vars"):
            names.add(x.name_hint)
        for field in ("seq", "body", "block", "then_case", "else_case"):
            y = getattr(x, field, None)
            if y is not None:
                todo.extend(y if field == "seq" else [y])
    return names


def _exp_pv_in_one_call(sch, loop, impl, slots: str, whole: dict) -> None:
    """Replace a unit's stages ``prob``, ``unit_sum`` and the blockized ``unit_out_o``
    (statements of ``loop``'s body) by one block: the call of ``impl``
    (``cpu_bf16.exp_pv_slots``), where ``prob`` was; ``prob``'s buffer goes too (what is
    left of it is the call's registers). Its regions: the unit's logits, ``slots``,
    maxima and caps, v (``unit_out_o``'s) as read, its sums and P v as written;
    ``whole`` as ``_called_block``'s."""
    from tvm import ir, tirx
    from tvm.s_tir import stmt as s_stmt

    pv = sch.get(sch.get_sblock("unit_out_o"))
    prob = sch.get(sch.get_sblock("prob"))
    sums = sch.get(sch.get_sblock("unit_sum"))
    r, u = (iv.var for iv in pv.iter_vars[:2])

    def unit_region(buf):  # [r, u, everything]
        return tirx.BufferRegion(buf, [ir.Range.from_min_extent(r, 1), ir.Range.from_min_extent(u, 1)]
                                 + [ir.Range.from_min_extent(0, e) for e in buf.shape[2:]])

    read = {x.source.name: x.source for x in prob.reads}
    index, values = (x for x in pv.reads if x.source.name != "prob")
    reads = [unit_region(read["dots"]), index, unit_region(read["unit_max"]),
             unit_region(read["key_cap"]), values]
    writes = [unit_region(sums.writes[0].source), *pv.writes]
    staged = s_stmt.SBlock(pv.iter_vars, reads, writes, "exp_pv", pv.body, None,
                           pv.alloc_buffers, pv.match_buffers, pv.annotations)
    new = _called_block(staged, impl, ("dots", slots, "unit_max", "key_cap", "v", "unit_sum",
                                       "unit_out"), whole)
    f = sch.get(loop)
    stmts = list(f.body.seq)
    found = {name: [i for i, x in enumerate(stmts) if name in _blocks_in(x)]
             for name in ("prob", "unit_sum", "unit_out_o")}
    if any(len(at) != 1 for at in found.values()):
        raise RuntimeError(f"the unit's loop holds prob, unit_sum and unit_out_o at {found}, "
                           "not one statement each")
    where = {name: at[0] for name, at in found.items()}
    realize = stmts[where["unit_out_o"]]
    call = s_stmt.SBlockRealize(realize.iter_values, realize.predicate, new)
    body = [call if i == where["prob"] else x for i, x in enumerate(stmts)
            if i not in (where["unit_sum"], where["unit_out_o"])]
    sch.state.replace(sch.get_sref(loop), tirx.For(f.loop_var, f.min, f.extent, f.kind, _seq(body),
                                                   f.thread_binding, f.annotations), {pv: new})
    root_sref = sch.get_sref(sch.get_sblock("root"))
    root = root_sref.stmt
    kept = [x for x in root.alloc_buffers if x.name != "prob"]
    new_root = s_stmt.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, root.body,
                             root.init, kept, root.match_buffers, root.annotations)
    sch.state.replace(root_sref, new_root, {root: new_root})


def _slot_logits(sch, name, b, intrin):
    """A [W, b] = sum over pairs of dims stage (loops w, t, p, e) as one ``intrin`` call
    (q k^T) per slot of b tokens; returns the slot loop.

    The intrinsic's description is the whole sum, its init included, and its call writes
    every value of the block: the init that tensorize leaves on the block (a 4 KB zero
    fill before each call, which LLVM makes a memset) is dropped (bf16 hires_rows 0.98x
    the time at N = 4096 and 8192, Zen 5, in-process A/B)."""
    from tvm.s_tir import stmt as s_stmt

    w_o, w_i = sch.split(sch.get_loops(sch.get_sblock(name))[-4], [None, b])
    sch.tensorize(w_i, intrin)
    sref = sch.get_sref(sch.get_sblock(f"{name}_o"))
    old = sref.stmt
    new = s_stmt.SBlock(old.iter_vars, old.reads, old.writes, old.name_hint, old.body, None,
                        old.alloc_buffers, old.match_buffers, old.annotations)
    sch.state.replace(sref, new, {old: new})
    return w_o


def _slot_product(sch, name, vec, b, intrin):
    """A [b, D] = sum_w stage (loops t, d, w over W = C b) as one ``intrin`` call (P v)
    per slot of b tokens onto zeros; returns the slot loop."""
    blk = sch.get_sblock(name)
    t, d, w = sch.get_loops(blk)[-3:]
    slot, w_i = sch.split(w, [None, b])
    sch.reorder(slot, t, d, w_i)
    init = sch.decompose_reduction(blk, slot)
    sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, vec])[1])
    sch.tensorize(t, intrin)
    return slot


def hires_units(sch, *, vec, qk_rows, pv_rows, pv_cols, unroll, blocks_per_unit, micro):
    """Overflow units, parallel over (row, unit); see ``_unit``.

    ``blocks_per_unit`` (C) is an operator knob (the unit size the plan packs).
    """
    # The three outputs share one (row, unit) loop, so what they read can live under it.
    outputs = ("unit_max", "unit_out", "unit_sum")
    ru = sch.merge(*(sch.fuse(*sch.get_loops(sch.get_sblock(name))[:2]) for name in outputs))
    sch.parallel(ru)
    _unit(sch, ru, vec=vec, qk_rows=qk_rows, pv_rows=pv_rows, pv_cols=pv_cols, unroll=unroll,
          slots="unit_cols", micro=micro)
    return sch


def hires_rows(sch, *, vec, qk_rows, pv_rows, pv_cols, unroll, row_unit_blocks, full, micro):
    """Parallel over (row, query block): the block row's own unit (``_unit``), the merge
    of its overflow units, the low-resolution part and the normalisation, written once.

    ``row_unit_blocks`` (Cr) is an operator knob: key blocks computed in the row's own
    unit; the plan sends the rest to ``hires_units``.
    """
    # The output is computed into a [b, D] float32 block in L1, then stored by one call
    # a block row, with non-temporal stores (``_stored_output``): float32 by a copy of
    # it (``cache_write``), bf16 bits rounded from ``out_f32``.
    exact, store = _stored_output(sch, micro)
    heads_last = _heads_last_output(sch, exact if store is None else store)
    # The outputs (out and the per-token statistics) share one (row, block) loop.
    outputs = (sch.get(exact if store is None else store).name_hint, "stab", "lo_w", "inv_z")
    ri = sch.merge(*(sch.fuse(*sch.get_loops(sch.get_sblock(name))[:2]) for name in outputs))
    sch.parallel(ri)
    if store is not None:
        sch.compute_at(exact, ri)
    sch.vectorize(sch.split(sch.get_loops(exact)[-1], [None, vec])[1])
    # Consumers before producers, so each compute_at finds its readers under the loop.
    order: tuple[str, ...] = ("inv_norm", "hi_scale", "lo_scale", "delta") if full else ("inv_norm",)
    order += ("z_hi", "ov_z", "ov_o", "own_scale", "ov_scale", "row_max", "row_best",
              "ov_stab", "unit_sum", "unit_out")
    for name in order:
        sch.compute_at(sch.get_sblock(name), ri)
    # The per-token stages (b values per block row: stabilisers, scales, sums, the
    # statistics) in vectors too: as scalar loops, their exps cost ~3% of the kernel.
    tokens = ("row_best", "row_max", "own_scale", "z_hi", "inv_norm", "stab", "lo_w", "inv_z")
    for name in tokens + (("delta", "hi_scale", "lo_scale") if full else ()):
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])[1])
    merges = _overflow_merges(sch, vec)
    _unit(sch, ri, vec=vec, qk_rows=qk_rows, pv_rows=pv_rows, pv_cols=pv_cols, unroll=unroll,
          outputs_placed=False, slots="row_cols", micro=micro, prefetch_queries=True)
    _skip_missing_units(sch, ri, merges)
    if store is not None:
        t, d = sch.get_loops(store)[-2:]
        dtype = str(sch.get(store).writes[0].source.dtype)
        sch.tensorize(t, cpu_stores.store_intrinsic(int(sch.get(t).extent),
                                                    int(sch.get(d).extent), dtype, heads_last))
    return sch


def _heads_last_output(sch, block) -> bool:
    """Where hires_rows reads q as [B, N, H, D] (``operators._inputs``' heads_last, row
    r = b H + h), its output too: ``block``'s write of ``out`` [B H, n, b, D] laid out as
    [B, n, b, H, D], the memory of [B, N, H, D]. An attention layer transposes the op's
    [B, H, N, D] output back to [B, N, H, D] and copies it (~0.8 ms at N = 4096,
    B·H = 12, float32); the op then returns a view in that layout, and the copy is a
    no-op. Returns whether it did."""
    q = _input(sch.get(sch.get_sblock("q_s")), "q")
    if len(q.shape) != 4:
        return False
    H = q.shape[2]
    sch.transform_layout(block, ("write", 0), lambda r, i, t, d: (r // H, i, t, r % H, d))
    return True


def _stored_output(sch, micro=None):
    """hires_rows' output as (the block computing it in float32, the block storing it
    into ``out``), by the output's dtype: ``out_f32`` and ``out`` for bf16 bits (the
    operator's own stages, ``operators._rounded_output``; rounded by ``vcvtneps2bf16``
    in the call) with the bf16 ``micro``-kernels, ``out`` and None without them (bf16
    widened as read, on a CPU without the instruction: rounded by TIR's integer
    operations, ``operators.bf16_narrow``, and TVM's own stores), ``out`` and its
    ``cache_write`` copy for float32, ``out`` and None for float64 (the tests' gradient
    checks: TVM's own stores).

    Why a call: TVM 0.27 emits no non-temporal store, and the output, written once and
    not read again by the kernel, is what its stores would otherwise keep in the caches
    in place of q, k and v (25 MB at N = 8192, B·H = 12, D = 64). hires_rows 0.967x the
    time in float32, 0.986x in bf16 at N = 8192, sparse (the same bits; Zen 4,
    in-process A/B); in bf16 the same call with plain stores is 1.02x (the round trip
    through L1 costs more than the rounding saves)."""
    out = sch.get_sblock("out")
    dtype = sch.get(out).writes[0].source.dtype
    if dtype == "int16":  # (bf16 bits: operators.BF16_BITS)
        if micro is None:  # (no vcvtneps2bf16: TIR's rounding, TVM's stores)
            sch.compute_inline(sch.get_sblock("out_f32"))
            return out, None
        return sch.get_sblock("out_f32"), out
    if dtype != "float32":
        return out, None
    return out, sch.cache_write(out, 0, "global")


def _overflow_merges(sch, vec):
    """The stages over a block row's overflow units (``w < ucap``; those past the row's
    own ``ov_units`` contribute nothing) with the unit loop outermost and the tokens
    (``ov_o``: the dims) in vector lanes, so that ``_skip_missing_units`` can skip
    whole units: ucap is the largest count of any block row (5 at N = 8192 where most
    rows have none), and a skipped unit saves b exps and a [b, D] pass.
    Returns the unit loops."""
    loops = []
    for name in ("ov_stab", "ov_scale", "ov_z", "ov_o"):
        blk = sch.get_sblock(name)
        if name == "ov_o":
            t, d, w = sch.get_loops(blk)[-3:]
            sch.reorder(w, t, d)
            sch.vectorize(sch.split(d, [None, vec])[1])
        else:
            t, w = sch.get_loops(blk)[-2:]
            sch.reorder(w, t)
            sch.vectorize(sch.split(t, [None, vec])[1])
        if name != "ov_scale":  # (the reductions)
            sch.decompose_reduction(blk, w)
        loops.append(w)
    return loops


def _skip_missing_units(sch, loop, unit_loops) -> None:
    """Run each iteration of ``unit_loops`` (over a block row's overflow units, under the
    fused (row, block row) ``loop``) only for the row's own ``w < ov_units[r, i]``; what
    reads the skipped results selects by the same condition. Applied last (``_guard``)."""
    units = _input(sch.get(sch.get_sblock("ov_scale")), "ov_units")
    n = units.shape[1]
    ri = sch.get(loop).loop_var
    for w in unit_loops:
        _guard(sch, w, sch.get(w).loop_var < units[ri // n, ri % n])
    # ov_o's zeros only where a unit adds to them (the output reads it there only)
    init = sch.get_loops(sch.get_sblock("ov_o_init"))
    at = next(j for j, x in enumerate(init) if sch.get(x).same_as(sch.get(loop)))
    _guard(sch, init[at + 1], units[ri // n, ri % n] > 0)


def pool_and_logits(sch, *, vec, micro, full):
    """Parallel over rows: pool q, k, v of one row (not v in "sparse" mode: ``full``
    False), then its n x n logits. (``micro``: q, k, v are bf16 bits, widened as they are
    read; nothing to tensorize.)

    The logits of a row need every pooled key of that row, so a row (not a block)
    is the unit of parallel work; pooling reads each input once.
    """
    # q̂ k̂^T as register tiles of logits (LOGIT_TILE) over a zero-padded copy of q̂ and a
    # zero-padded, transposed one of k̂ (the tiles need no guard); the logits read
    # the padded product in place.
    _pad_logits(sch, "raw_logits", "kp_pad", vec)
    # The padded stages join the row loop whole (compute_at would shrink them to the
    # n x n that the logits read, guarding every tile).
    pooled = ("qp", "kp", "vp") if full else ("qp", "kp")
    outputs = (*pooled, "qp_pad", "kp_pad", "raw_logits", "logits", "rowmax")
    r = sch.merge(*(sch.get_loops(sch.get_sblock(name))[0] for name in outputs))
    sch.parallel(r)
    # The real-key row maxima, one query block at a time: the whole chunks in a vector of
    # partial maxima (lanes innermost), the tail and the lanes' maximum as scalars
    # (operators._lane_max).
    sch.compute_at(sch.get_sblock("real_max"), r)
    block_loop = sch.get_loops(sch.get_sblock("real_max"))[1]
    for name in ("real_max_tail", "real_max_lanes"):
        sch.compute_at(sch.get_sblock(name), block_loop)
    _lanes_in_vectors(sch, "real_max_lanes", vec)
    # (both may be empty reductions, n < 16 or n mod 16 = 0: their init must not sit in
    # a loop that does not run)
    tail = sch.get_sblock("real_max_tail")
    sch.decompose_reduction(tail, sch.get_loops(tail)[-1])
    for name in pooled:
        blk = sch.get_sblock(name + "_sum")
        if len(sch.get_loops(blk)) == 5:
            # Inputs [B, N, H, D] (``operators.pool_and_logits``): the sums [B, n, H, D] in
            # loops of their own, parallel over (sequence, block), the block's tokens
            # outermost: a contiguous [b, H, D] slab read in order. (Under the row loop,
            # one head at a time, each row crossed every page of the input: the kernel
            # 1.6x the time of the contiguous layout's at N = 4096.)
            seq, block, head, d, t = sch.get_loops(blk)
            sch.parallel(sch.fuse(seq, block))
            sch.reorder(t, head, d)
        else:
            sch.compute_at(blk, sch.get_loops(sch.get_sblock(name))[1])
            i, d, t = sch.get_loops(blk)[-3:]
            sch.reorder(t, d)
        sch.vectorize(sch.split(d, [None, vec])[1])
        sch.decompose_reduction(blk, t)
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])[1])
    _logit_tiles(sch, "raw_logits", vec)
    return sch


def _pad_logits(sch, name, second_pad, vec):
    """A per-row [n, n] = [n, D] x [n, D]^T stage ``name`` over zero-padded copies of its
    operands, padded to whole ``LOGIT_TILE`` tiles (so that the tiles need no guard);
    the second copy (block ``second_pad``) transposed, [D, n'], its keys the vector
    lanes; the padded product read in place by the stage's consumers.

    The transposed copy is written along its rows (reading its source strided), in
    chunks of vec keys (TVM runs them as scalars: the padding test differs per key): in
    the source's order (d innermost) LLVM made each vector of d a vscatterdps, 14% of
    pool_and_logits' samples; this way the kernel took 0.87-0.88x the time at N = 8192
    (bf16 and sparse float32; 0.93x full float32; Zen 5, in-process A/B)."""
    rows, cols = LOGIT_TILE[min(vec, 16)]
    sch.pad_einsum(sch.get_sblock(name), [1, rows, cols, 1])
    sch.compute_inline(sch.get_sblock(name + "_pad"))  # (the copy back to [n, n])
    copy = sch.get_sblock(second_pad)
    sch.transform_layout(copy, ("write", 0), lambda r_, j_, d_: (r_, d_, j_))
    j, d = sch.get_loops(copy)[-2:]
    sch.reorder(d, j)
    sch.vectorize(sch.split(j, [None, vec])[1])


def _logit_tiles(sch, name, vec):
    """The padded product of ``_pad_logits`` as ``LOGIT_TILE`` register tiles (rows x
    vector lanes of columns), accumulated over D in registers."""
    rows, cols = LOGIT_TILE[min(vec, 16)]
    blk = sch.get_sblock(name)
    i, j, d = sch.get_loops(blk)[-3:]
    i_o, i_i = sch.split(i, [None, rows])
    j_o, j_i = sch.split(j, [None, cols])
    sch.reorder(i_o, j_o, d, i_i, j_i)
    tile = sch.cache_write(blk, 0, TILE_SCOPE)
    sch.reverse_compute_at(tile, j_o)
    sch.unroll(i_i)
    sch.vectorize(j_i)
    sch.vectorize(sch.get_loops(tile)[-1])
    sch.decompose_reduction(blk, d)


# The low-resolution logits' register tile (rows, columns) by vector width: 16 of the 32
# AVX-512 registers, 8 of AVX2's 16 (8 x 32 there took 32 and spilled on every FMA:
# a quarter of pool_and_logits at N = 8192 on Zen 3).
LOGIT_TILE = {16: (8, 32), 8: (4, 16)}


# The low-resolution products' register tiles (lowres_out's W v̂, bwd_lowres' dq̂, dk̂,
# dv̂): rows by vector width, each row up to LOWRES_BAND vectors of the head dim: 4 x 4 =
# 16 of the 32 AVX-512 registers (8 rows, 32, spilled: 1.45x the time of 4); one row
# with AVX2's 16.
LOWRES_ROWS = {16: 4, 8: 1}
LOWRES_BAND = 4


def lowres_out(sch, *, vec):
    """Parallel over rows: the weights W [n, n'] of a row, then W v̂ as register tiles of
    query blocks over a copy of W padded to whole tiles, and sum W in vector lanes
    (``operators._lane_sum``).

    W v̂ a query block at a time (its 4 vectors of dims as the only accumulators, one
    dependent FMA chain each, and sum W a chain of scalar adds beside them) took 1.5x the
    time: lowres_out 0.65x at N = 8192 (float32, Zen 5, in-process A/B)."""
    rows = LOWRES_ROWS[min(vec, 16)]
    copies = _pad_rows(sch, "o_lo", rows, "weight_pad")
    sch.compute_at(sch.get_sblock("z_lo_lanes"), sch.get_loops(sch.get_sblock("z_lo"))[1])
    r = sch.merge(*(sch.get_loops(sch.get_sblock(name))[0]
                    for name in ("weight", "o_lo", *copies, "z_lo")))
    sch.parallel(r)
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("weight"))[-1], [None, vec])[1])
    _lanes_in_vectors(sch, "z_lo_lanes", vec)
    _row_tiles(sch, "o_lo", vec, rows, copies)
    return sch


def _lanes_in_vectors(sch, name, vec):
    """A stage of partial reductions [.., lane] over chunks (``operators._lane_max``,
    ``_lane_sum``: loops lane, chunk) with the chunks outside and the lanes in vectors,
    its init before the chunks' loop (which may not run: an empty reduction)."""
    blk = sch.get_sblock(name)
    lane, chunk = sch.get_loops(blk)[-2:]
    sch.reorder(chunk, lane)
    sch.vectorize(sch.split(lane, [None, vec])[1])
    sch.decompose_reduction(blk, chunk)


def _pad_rows(sch, name, rows, pad) -> tuple[str, ...]:
    """Pad the rows (axis 1, n) of a per-row [n, D] = sum_z stage ``name`` to a multiple
    of ``rows`` (``pad_einsum``), the operand padded with it read in place (``pad``, the
    padding block, inlined: its rows past n read as zeros). Returns the block that copies
    the padded result back (none where ``rows`` is 1: nothing to pad)."""
    if rows == 1:
        return ()
    sch.pad_einsum(sch.get_sblock(name), [1, rows, 1, 1])
    sch.compute_inline(sch.get_sblock(pad))
    return (name + "_pad",)


def _row_tiles(sch, name, vec, rows, copies):
    """A per-row [n, D] = sum_z stage (padded by ``_pad_rows``: ``copies`` its copy back)
    as register tiles of ``rows`` rows x up to ``LOWRES_BAND`` vectors of D, accumulated
    over z in registers."""
    blk = sch.get_sblock(name)
    i, d, z = sch.get_loops(blk)[-3:]
    vectors = int(sch.get(d).extent) // vec
    band = max(c for c in range(1, LOWRES_BAND + 1) if vectors % c == 0)
    i_o, i_i = sch.split(i, [None, rows])
    d_b, d_o, d_i = sch.split(d, [None, band, vec])
    sch.reorder(i_o, d_b, z, i_i, d_o, d_i)
    tile = sch.cache_write(blk, 0, TILE_SCOPE)
    sch.reverse_compute_at(tile, d_b)
    sch.unroll(i_i)
    sch.unroll(d_o)
    sch.vectorize(d_i)
    sch.vectorize(sch.split(sch.get_loops(tile)[-1], [None, vec])[1])
    sch.decompose_reduction(blk, z)
    for copy in copies:
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(copy))[-1], [None, vec])[1])


def select_plan(sch):
    """Nothing to do: ``mra_compile.selection_tir`` writes this kernel in TIR with its rows
    already parallel and its scans in vectors."""
    return sch


def bwd_plan(sch):
    """Nothing to do: ``mra_compile.plan_tir`` writes this kernel in TIR with its rows
    already parallel."""
    return sch


# The defaults of every knob, the only place they are set (``blocks_per_unit`` and
# ``row_unit_blocks`` also shape the operator: ``mra_compile.kernels``, ``shape_knobs``).
# P V (pv_cols) and the backward's outputs (out_cols) in bands of 4 vectors: all of D up
# to D = 64 (the same kernels as all of D), 64-dim bands at D = 128, where 4 x 8 vectors
# took all 32 registers (compiled for znver4: hires_rows 88 stack stores and 75 loads,
# hires_units 188 / 233, bwd_dkdv_ds_units 101 / 101; with bands 23 / 8, 7 / 1, 3 / 1,
# as at D = 64; not timed on an AVX-512 CPU yet).
KNOBS = {
    "pool_and_logits": dict(vec=16),
    "lowres_out": dict(vec=16),
    "hires_units": dict(vec=16, qk_rows=4, pv_rows=4, pv_cols=4, unroll=True, blocks_per_unit=3),
    # Wide row units cost little (empty slots are skipped) and leave few overflow units:
    # with 4 blocks per row on random inputs, 5.7% of the blocks beyond a row's 8, 1.3%
    # beyond 12. 12 against 8 on a Zen 5 (the whole forward, one process, alternating):
    # 0.98x at N = 512-1024 (full), 0.97-0.99x at 4096 and 8192 (full, sparse, bf16),
    # 0.98x at D = 128, 0.99x at D = 32; 16 no better than 12.
    "hires_rows": dict(vec=16, qk_rows=4, pv_rows=4, pv_cols=4, unroll=True, row_unit_blocks=12),
    "select_plan": {},
    "bwd_plan": {},
}

# AVX2 (8 float32 lanes, 16 vector registers): the tiles of KNOBS would keep 16 (logits:
# qk_rows=4 keys x 32 queries) and 32 (P V: pv_rows=4 queries x D=64) accumulators, more
# than there are registers, and the backward's rows=4 likewise; these keep 8. P V also
# goes in bands of pv_cols=2 vectors (16 dims, one cache line of each value row): with
# all of D per tile each query tile streamed the unit's whole v (4-8 blocks of 8 KB, past
# L1) from L2, and took twice the time of the logits. Measured on a 2-core Zen 3 (AVX2,
# no AVX-512), B*H=12, interleaved, hires_rows alone: D=64, N=4096: 29.0 ms (KNOBS), 21.7
# (pv_rows=1, all of D), 18.2 (these); N=8192: 57.6, 35.3, 29.4; D=128, N=2048: 18.6
# (pv_rows=1) against 14.4; D=48: 6.4 against 5.1. The backward (rows=2) 69.6 against
# 93.7 ms at N=4096, D=64 (rows=1: 77.2; at D=128 rows=1 was best by ~7%); its [b, D]
# outputs then still kept rows=2 x all of D (16 accumulators, spilled): in tiles of
# out_rows=4 x out_cols=2 vectors, bands of D outermost, the backward took 0.74x the time
# at N=4096, D=64 (94.2 -> 70.2 ms), 0.68x at D=128 (N=2048), 0.91x at D=48; 2 x 4: 0.78x,
# 8 x 1: 0.88x (backward alone, interleaved, bit-identical gradients).
NARROW_KNOBS = {
    "hires_units": dict(qk_rows=2, pv_rows=4, pv_cols=2),
    # (row_unit_blocks: as measured on the AVX2 host; 12 was timed on AVX-512 only)
    "hires_rows": dict(qk_rows=2, pv_rows=4, pv_cols=2, row_unit_blocks=8),
    "bwd_dkdv_ds_units": dict(rows=2, out_rows=4, out_cols=2),
    "bwd_dq_ds_units": dict(rows=2, out_rows=4, out_cols=2),
}


def default_knobs(op: str, vec: int) -> dict:
    """The default knobs of ``op`` on a CPU of ``vec`` float32 lanes (16: AVX-512, 8: AVX2):
    ``KNOBS[op]`` with that ``vec``, and ``NARROW_KNOBS[op]`` below 16 lanes."""
    knobs = dict(KNOBS[op])
    if "vec" in knobs:
        knobs["vec"] = vec
    if vec < 16:
        knobs.update(NARROW_KNOBS.get(op, {}))
    return knobs


# ---------------------------------------------------------------------------------------
# Backward. Simpler schedules: parallel over the natural unit of work, every stage of a
# unit under it (in L1), each reduction with its innermost spatial axis in vector lanes.
# ---------------------------------------------------------------------------------------


def _merged_parallel(sch, outputs, depth):
    """One parallel loop over the first ``depth`` (fused) axes of all ``outputs``."""
    loops = [sch.fuse(*sch.get_loops(sch.get_sblock(name))[:depth]) for name in outputs]
    loop = sch.merge(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(loop)
    return loop


def bwd_prep(sch, *, vec, micro):
    """Parallel over (row, query block): g, its dot with out, the per-block sums.
    (``micro``: dout and g are bf16 bits, converted as they are read and written.)

    A token's dot g . out over D runs in vec lanes of partial sums (``rfactor``), then
    their sum: as one running sum, a chain of D dependent scalar FMAs per token, it had
    taken most of the kernel."""
    dsum = sch.get_sblock("dsum")
    d = sch.get_loops(dsum)[-1]
    partial = None
    if int(sch.get(d).extent) > vec:  # (D = vec: one vector, nothing to gain)
        partial = sch.rfactor(sch.split(d, [None, vec])[1], 3)  # (before the merge)
    ri = _merged_parallel(sch, ("g", "dsum", "ga", "da"), 2)
    if partial is not None:
        sch.compute_at(partial, ri)
        lane, token, chunk = sch.get_loops(partial)[-3:]
        sch.reorder(token, chunk, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(partial, chunk)
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("g"))[-1], [None, vec])[1])
    ga = sch.get_sblock("ga")
    d, t = sch.get_loops(ga)[-2:]
    sch.reorder(t, d)
    sch.vectorize(sch.split(d, [None, vec])[1])
    return sch


def _bwd_units(sch, *, vec, rows, out_rows, out_cols, gathers, outputs, elementwise, fixed,
               slots, factor, extra=(), micro=None, slot_rows=(), shared_rows=True, kept=()):
    """The backward's unit kernels (``operators._bwd_unit``): parallel over (row, unit);
    ``dots`` and ``dp`` as [W, b] register tiles of ``rows`` slot tokens, the
    ``elementwise`` [W, b] stages (exp, dS) with the fixed block's tokens in vector lanes,
    the [b, D] ``outputs`` as register tiles of ``out_rows`` tokens x ``out_cols`` vectors
    of D over (slot, token); empty slots (-1 in input ``slots``) skipped. ``gathers``:
    CUDA's tensor-core tiles, read in place here; ``fixed``: the fixed block's two
    operands (``q``, ``g`` / ``k``, ``v``), gathered transposed; ``factor`` and ``extra``:
    the per-token factor stages. ``micro`` ("avx512_bf16"): every block product is a call
    of the bf16 micro-kernels instead, one per slot (``_micro_bwd_products``). Each unit
    prefetches the next one's slot blocks (``_prefetch_next_unit``; spread over the
    logits tiles in float32, over the exps ``prob`` in bf16) of the inputs ``slot_rows``
    ((gather stage, input) pairs; ``shared_rows``: key/value rows, shared by grouped-query
    heads). ``kept``: an elementwise [W, b] stage that is also written out, per slot
    transposed (``ds_blocks`` [C, b, b] of ``ds``), under the same loop.
    """
    rows_read = [_input(sch.get(sch.get_sblock(g)), x) for g, x in slot_rows]
    for name in gathers:
        sch.compute_inline(sch.get_sblock(name))
    ru = _merged_parallel(sch, (*outputs, *(f"{x}_blocks" for x in kept)), 2)
    staged = tuple(f"{x}_{stage}" for x in fixed for stage in ("t", "s"))
    for name in (*elementwise, "dots", "dp", *staged, factor, *extra):  # consumers first
        sch.compute_at(sch.get_sblock(name), ru)
    b = sch.get(sch.get_loops(sch.get_sblock(outputs[0]))[-3]).extent
    if micro:
        guarded = _micro_bwd_products(sch, vec, b, outputs, fixed)
        # The next unit's rows one slot token at a time from the exps (P), as the
        # forward's bf16 units ask: bwd_dkdv_ds_units 0.94-0.95x the time at N = 8192,
        # 0.96-0.98x at 4096, the same bits (bf16, Zen 5, in-process A/B, against all up
        # front).
        exps = sch.get_loops(sch.get_sblock("prob"))[-2]
        spread = (exps, 1, sch.get(exps).loop_var)
    else:
        guarded, logits = _tiled_bwd_products(sch, vec, rows, out_rows, out_cols, b, outputs,
                                              fixed)
        # The next unit's slot rows a few at a time from the logits tiles, as the
        # forward's float32 units ask (``_prefetch_next_unit``): bwd_dkdv_ds_units
        # 0.87-0.97x the time at N = 4096, 0.92-0.93x at 8192, the same bits (float32, Zen
        # 5, in-process A/B; asked for up front they had gained nothing).
        spread = (logits, rows, sch.get(logits).loop_var * rows)
    for name in elementwise:
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])[1])
        guarded[sch.get_loops(sch.get_sblock(name))[-3]] = 1
    for x in kept:  # each slot's [b, b], transposed
        guarded[sch.get_loops(sch.get_sblock(f"{x}_blocks"))[-3]] = b
        _transposed(sch, f"{x}_blocks", vec, b)
    _skip_empty_slots(sch, ru, slots, guarded, factor)
    # (bf16 up front, before the spread: at N = 8192, on the units of the time, dq's
    # 12.0-12.6 -> 11.2-11.7 ms, dk/dv's ~4%)
    _prefetch_next_unit(sch, ru, slots, rows_read, factor, shared=shared_rows,
                        spread=spread)
    return sch


def _tiled_bwd_products(sch, vec, rows, out_rows, out_cols, b, outputs, fixed):
    """A backward unit's block products as register tiles: ``dots`` and ``dp`` [W, b] of
    ``rows`` slot tokens x b, every [b, D] output of ``out_rows`` tokens x ``out_cols``
    vectors of D (in bands of D, ``_register_tile``) over its slots; the fixed block's
    operands as rows, then transposed (``_rows_then_transposed``). Returns the loops whose
    whole bodies an empty slot skips, {loop: tokens per iteration} (``_skip_empty_slots``),
    and the loop of ``dots``' tiles."""
    tiles = {name: _register_tile(sch, name, vec=vec, rows=rows, unroll=True)
             for name in ("dots", "dp")}
    out_slots = {name: _register_tile(sch, name, vec=vec, rows=out_rows, unroll=True, slot=b,
                                      cols=out_cols)[1]
                 for name in outputs}
    for x in fixed:
        _rows_then_transposed(sch, x, vec, b)
    for name, (_, reduction) in tiles.items():
        sch.decompose_reduction(sch.get_sblock(name), reduction)
    for name, slot in out_slots.items():
        sch.decompose_reduction(sch.get_sblock(name), slot)
    return ({tiles["dots"][0]: rows, tiles["dp"][0]: rows,
             **{slot: b for slot in out_slots.values()}}, tiles["dots"][0])


def _micro_bwd_products(sch, vec, b, outputs, fixed) -> dict:
    """A backward unit's block products as calls of the bf16 micro-kernels
    (``schedules/cpu_bf16.py``): the fixed block's two operands masked as rows, then put
    in pairs of dims; ``dots`` and ``dp`` [W, b] one q k^T call per slot each; every
    [b, D] output one P v call per slot (dS or P rounded to bf16 in the call). Returns
    the slot loops, {loop: tokens per iteration} (for ``_skip_empty_slots``)."""
    D = sch.get(sch.get_loops(sch.get_sblock(outputs[0]))[-2]).extent
    (qk, pairs), pv = cpu_bf16.intrinsics(D), cpu_bf16.block_pv_intrinsic(D)
    for x in fixed:
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(f"{x}_s"))[-1], [None, vec])[1])
        sch.tensorize(sch.get_loops(sch.get_sblock(f"{x}_t"))[-3], pairs)
    slots = {_slot_logits(sch, name, b, qk): b for name in ("dots", "dp")}
    slots.update((_slot_product(sch, name, vec, b, pv), b) for name in outputs)
    # The bf16 operands in a scope of their own (set last: the intrinsics match buffers
    # of the default scope). Else TVM's storage rewrite lets a float32 intermediate reuse
    # them once they are dead, and then fails to lower the micro-kernels' typed
    # pointers into them.
    for x in fixed:
        for stage in (f"{x}_s", f"{x}_t_o"):  # (the pairs: blockized by tensorize)
            sch.set_scope(sch.get_sblock(stage), 0, "local")
    return slots


def bwd_dkdv_ds_units(sch, *, vec, rows, out_rows, out_cols, blocks_per_unit, micro):
    """Parallel over (row, key-block unit): logits, P, dP, dS as [W, b], then P^T g and
    dS^T q as [b, D] tiles, and dS written out per slot (``ds_blocks``, transposed); empty
    query-block slots skipped (``_bwd_units``)."""
    return _bwd_units(sch, vec=vec, rows=rows, out_rows=out_rows, out_cols=out_cols,
                      gathers=("q_g", "g_g", "prob_t", "ds_t"),
                      outputs=("dk_unit", "dv_unit"), elementwise=("ds", "prob"),
                      fixed=("k", "v"), slots="unit_rows", factor="query_factor",
                      extra=("key_mask",), micro=micro,
                      slot_rows=(("q_g", "q"), ("g_g", "g")), shared_rows=False, kept=("ds",))


def bwd_dq_ds_units(sch, *, vec, rows, out_rows, out_cols, blocks_per_unit, micro):
    """Parallel over (row, unit): dq_unit [b, D] as a register tile of ``out_rows`` queries
    x ``out_cols`` vectors of D over the slots' dS blocks (read in place, key-major) and
    key blocks, or one P v micro-kernel call per slot (``micro``: bf16 k, dS rounded to
    bf16 in the call); empty slots skipped. (``rows``: unused, the unit kernels' knobs
    are one set.)"""
    at = _input(sch.get(sch.get_sblock("ds_g")), "ds_at")
    ds = _input(sch.get(sch.get_sblock("ds_g")), "ds_blocks")
    k, cols = (_input(sch.get(sch.get_sblock("k_g")), x) for x in ("k", "unit_cols"))
    for name in ("k_g", "ds_g", "ds_g_t"):
        sch.compute_inline(sch.get_sblock(name))
    ru = _merged_parallel(sch, ("dq_unit",), 2)
    loops = sch.get_loops(sch.get_sblock("dq_unit"))
    b = int(sch.get(loops[-3]).extent)
    tiles = None  # (the micro-kernel takes a slot in one call)
    if micro:
        D = int(sch.get(loops[-2]).extent)
        slot = _slot_product(sch, "dq_unit", vec, b, cpu_bf16.gathered_pv_intrinsic(D))
    else:
        slot, tiles = _slots_outside_tiles(sch, "dq_unit", vec=vec, rows=out_rows,
                                           cols=out_cols, slot=b)
    units = at.shape[1]
    unit = sch.get(ru).loop_var
    _guard(sch, slot, at[unit // units, unit % units, sch.get(slot).loop_var] >= 0)
    _prefetch_next_dq_slot(sch, ru, slot, at, ds, k, cols, tiles)
    return sch


def _prefetch_next_dq_slot(sch, loop, slot_loop, at, ds, k, cols, tile_loop=None) -> None:
    """Each slot of a dq unit asks for the same slot's dS block and key block of the next
    unit (``loop``: the fused (row, unit) loop) into L1: as it starts, or with
    ``tile_loop`` (the slot's query tiles, under ``slot_loop``) spread evenly over its
    tiles' iterations (``_tile_share``). The dS blocks (from
    ``bwd_dkdv_ds_units``) and key blocks a unit reads are scattered: from L3 or DRAM
    each, as the products need them. Asked for as each slot starts, bwd_dq_ds_units took
    0.85x the time at N = 8192 (float32, Zen 5, in-process A/B; 0.87x into L2); spread
    over the float32 tiles (4 rows of each block a tile, not 192 requests in one burst),
    0.74-0.75x the time of that at N = 8192 and 0.75-0.77x at 4096, the same bits (the
    bf16 micro-kernel takes the slot in one call: as it starts).
    Applied last (like ``_guard``)."""
    from tvm import tirx

    units = at.shape[1]
    nxt = sch.get(loop).loop_var + 1
    row, unit = nxt // units, nxt % units
    c = sch.get(slot_loop).loop_var
    b = int(ds.shape[2])
    first, count, where = 0, b, slot_loop
    if tile_loop is not None:
        (first, count), where = _tile_share(sch, tile_loop, b), tile_loop
    there = nxt < sch.get(loop).min + sch.get(loop).extent
    token = tirx.Var("pf_token_dq", "int32")
    block, key_block = at[row, unit, c], cols[row, unit, c]
    rows = tirx.For(token, 0, count, tirx.ForKind.SERIAL, tirx.SeqStmt([
        _line_requests((ds,), lambda at_: (row, block, first + token, at_), 3, "_ds"),
        _line_requests((k,), lambda at_: (_kv_row(sch, row), key_block * b + first + token,
                                          at_), 3, "_k")]))
    _ask_first(sch, where, tirx.IfThenElse(there, tirx.IfThenElse(block >= 0, rows, None),
                                           None))


def _slots_outside_tiles(sch, name, *, vec, rows, cols, slot, unroll=True):
    """A [.., x, y] = sum_z stage with z in slots of ``slot``, the slot loop outermost:
    (z_o, y_c, x_o, z_i, x_i, y), tiles of ``rows`` x ``cols`` vectors of y as in
    ``_register_tile`` but accumulated in the output itself (a tile's accumulators are
    loaded and stored once per slot; LLVM keeps them in registers over the slot's keys),
    zeroed first. Returns (z_o, the loop a slot's guard goes on; x_o, the tiles' loop).

    For slots whose index is a gathered one (``bwd_dq_ds_units``): under the tiles, each
    slot's test and block address (a floor division of the fused (row, unit) loop by the
    symbolic unit count, which LLVM may not hoist out of a guarded block) were
    recomputed per tile: 0.87x the time at N=4096, D=64 (15.4 -> 13.3 ms), 0.88x at
    D=128, 0.92x at D=48, 0.90x at N=8192 (AVX2 host, bit-identical results).
    For a unit's P V (``_unit``): each slot's value block (8 KB in float32 at D = 64)
    comes into L1 once and every query tile reuses it from there; with the tiles
    outermost (``_register_tile``) every tile read every slot again, ~48 KB a pass for a
    unit of 4 blocks with its probabilities, as large as L1: float32 hires_rows
    0.97-0.99x the time at N = 8192 (Zen 5, in-process A/B, bit-identical); the
    backward's dk/dv outputs the same way, 1.00-1.03x (kept in ``_register_tile``)."""
    blk = sch.get_sblock(name)
    x, y, z = sch.get_loops(blk)[-3:]
    y_c, y = _bands(sch, y, cols, vec)
    x_o, x_i = sch.split(x, [None, rows])
    z_o, z_i = sch.split(z, [None, slot])
    sch.reorder(z_o, *([y_c] if y_c is not None else []), x_o, z_i, x_i, y)
    y_o, y_i = sch.split(y, [None, vec])
    sch.vectorize(y_i)
    if unroll:
        sch.unroll(y_o)
        sch.unroll(x_i)
    sch.decompose_reduction(blk, z_o)  # (the zeroing keeps the tiles' loops, vectorized)
    return z_o, x_o


def bwd_lowres(sch, *, vec):
    """Parallel over rows: the n x n weights and dL, then four small products, each as
    register tiles over zero-padded operands.

    ``gv`` = ga v̂^T as ``pool_and_logits``' block logits (``_pad_logits``,
    ``_logit_tiles``); dq̂ = dL k̂, dk̂ = dL^T q̂ and dv̂ = W^T ga as ``lowres_out``'s W v̂
    (``_pad_rows``, ``_row_tiles``); the weights in vectors over their padded rows. With
    gv row by row over a transposed copy (loading and storing its row at every d) and
    the three others a row and 4 vectors at a time: 2.7x the time at N = 8192 (float32,
    Zen 5, in-process A/B; the same bits)."""
    rows = LOWRES_ROWS[min(vec, 16)]
    _pad_logits(sch, "gv", "vp_pad", vec)
    order: tuple[str, ...] = ("weight", "ga_pad", "vp_pad", "gv", "dlog")
    copies = {}
    for name, pad in (("dqp", "dlog_pad"), ("dkp", "dlog_pad"), ("dvp", "weight_pad")):
        # (one at a time: each names its padded operand's block the same)
        copies[name] = _pad_rows(sch, name, rows, pad)
        order += (name, *copies[name])
    r = sch.merge(*(sch.get_loops(sch.get_sblock(name))[0] for name in order))
    sch.parallel(r)
    for name in ("weight", "ga_pad"):
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])[1])
    _logit_tiles(sch, "gv", vec)
    for name, copy in copies.items():
        _row_tiles(sch, name, vec, rows, copy)
    return sch


def bwd_finish(sch, *, vec):
    """Parallel over (row, block), a loop per gradient: a block's unit partials summed
    in vec lanes (a register) under the output's loops, the pooled part added as they
    are stored.

    A block has 0 ... ucap units: each unit's partial is added under an ``if`` on the
    block's unit count, so the missing ones cost nothing (``_guard``). (Summed into a
    [b, D] block of workspace memory first and copied out with the pooled part, the three
    gradients in one loop, it took 1.5x the time: 8.4-8.8 against 5.3-5.4 ms at N = 8192,
    fp32, B * H = 12, Zen 4.)

    The grouped-query variant sums dk, dv over the query rows of a key/value row too (a
    loop over them outside the units' loop, each guarded by its own row's count)."""
    group = _param(sch, "group")
    for name, count_name in (("dq", "q_units"), ("dk", "k_units"), ("dv", "k_units")):
        ri = _merged_parallel(sch, (name,), 2)
        row_block = sch.get(ri).loop_var
        d0, d1 = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])
        sch.vectorize(d1)
        blk = sch.get_sblock(name + "_sum")
        sch.compute_at(blk, d0)
        grouped = group is not None and name != "dq"
        lanes, *g, w = sch.get_loops(blk)[-3 if grouped else -2:]
        sch.reorder(*g, w, lanes)
        sch.vectorize(lanes)
        sch.decompose_reduction(blk, g[0] if grouped else w)
        count = _input(sch.get(blk), count_name)
        n = count.shape[1]
        row = row_block // n
        if grouped:
            row = row * group + sch.get(g[0]).loop_var
        _guard(sch, w, sch.get(w).loop_var < count[row, row_block % n])
    return sch


KNOBS.update({
    "bwd_prep": dict(vec=16),
    # Units of 6 blocks: a block row or column's blocks (4 on average at 4 per row) mostly
    # in one unit, so fewer partials for bwd_finish to sum (fp32 forward+backward at
    # N = 8192: 82.7-83.6 ms against 85.5-88.3 with 3; 1024-4096 the same or better).
    "bwd_dkdv_ds_units": dict(vec=16, rows=4, out_rows=4, out_cols=4, blocks_per_unit=6),
    "bwd_dq_ds_units": dict(vec=16, rows=4, out_rows=4, out_cols=4, blocks_per_unit=6),
    "bwd_lowres": dict(vec=16),
    "bwd_finish": dict(vec=16),
})


# ---------------------------------------------------------------------------------------
# Tuning search spaces (read by mra_compile.tuning and by the tuning-record checks in
# mra_compile.records): every legal value of every knob of the forward schedules above.
# The defaults (``default_knobs(op, vec)`` at the host's vector width) are points of these spaces.
#
# What the schedules require: every split uses a None outer factor, so TVM accepts any
# inner factor (non-dividing ones get a guard); the values below divide the extents
# they split anyway (qk_rows | C*b keys of a unit, pv_rows | b queries, vec | the head
# dim padded to 16 and b; pv_cols vectors that do not divide the head dim's mean all of
# it, see _register_tile). vec=16 needs AVX-512 (16 float32 lanes).
# ---------------------------------------------------------------------------------------

_VEC = [8, 16]
_TILES: dict[str, list] = {"qk_rows": [2, 4, 8], "pv_rows": [1, 2, 4], "pv_cols": [1, 2, 4, 8],
                           "unroll": [True, False]}

SPACES: dict[str, dict[str, list]] = {
    "pool_and_logits": {"vec": _VEC},
    "lowres_out": {"vec": _VEC},
    "hires_units": {"vec": _VEC, **_TILES, "blocks_per_unit": [1, 2, 3, 4]},
    "hires_rows": {"vec": _VEC, **_TILES, "row_unit_blocks": [2, 3, 4, 6, 8, 12, 16]},
}


def _legal(value, values) -> bool:
    # Type-strict membership: True == 1 in Python, but unroll=1 is not a legal value.
    return any(type(value) is type(v) and value == v for v in values)


def constraints(op: str, knobs: dict, shape: tuple[int, int] | None = None) -> bool:
    """Whether ``knobs`` (every knob of ``op``) is a legal, sensible point of ``SPACES[op]``
    (``shape``, the head dim and block size, changes nothing here: the CUDA schedules'
    ``constraints`` use it).

    Legal: exactly the op's knobs, each one of its listed values, and ``vec`` no wider than
    this CPU's vector unit (``mra_compile.host.default_vector_width()``). Sensible: the
    logits register tile of ``_unit`` (``qk_rows`` keys x 32 queries, in vectors of
    ``vec`` lanes, block size 32 assumed) fits the vector registers (32 with AVX-512,
    16 with AVX2), so that its accumulators are not spilled on every FMA.
    """
    space = SPACES.get(op)
    if space is None or set(knobs) != set(space):
        return False
    if not all(_legal(knobs[name], values) for name, values in space.items()):
        return False
    width = host.default_vector_width()
    if knobs["vec"] > width:
        return False
    if "qk_rows" in knobs and knobs["qk_rows"] * (32 // knobs["vec"]) > (32 if width == 16 else 16):
        return False
    return True
