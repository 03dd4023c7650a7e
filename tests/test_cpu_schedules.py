"""Structure of the CPU schedules that correctness tests cannot see: the work of empty
slots and missing unit partials is skipped, not merely multiplied by zero (their
results are checked against the reference in test_op, test_backward and test_tuning)."""
import re

import pytest

from mra_compile import build, knob_policy
from mra_compile.schedules.cpu import TILE_SCOPE

# op -> (static, the index whose entries guard the skipped loops, how many such loops)
GUARDED = {
    # logits tiles, key factors, max, exp, sum P, and P V per slot
    "hires_units": ({"b": 32, "D": 64}, "unit_cols", 6),
    "hires_rows": ({"b": 32, "D": 64, "full": True}, "row_cols", 6),
    # dS k per slot
    "bwd_dq_ds_units": ({"b": 32, "D": 64}, "ds_at", 1),
    # dots and dP tiles, P and dS, P^T g, dS^T q, and dS written out per slot
    "bwd_dkdv_ds_units": ({"b": 32, "D": 64}, "unit_rows", 7),
    # one [b, D] partial per unit, for dq, dk and dv
    "bwd_finish": ({"b": 32, "D": 64}, r"[qk]_units", 3),
    # grouped heads: dk, dv sum the units of each query row of the group, each guarded
    "bwd_finish-grouped": ({"b": 32, "D": 64, "gqa": True}, r"[qk]_units", 3),
}


def _guards(op, static, index):
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    # (not the prefetches' tests of the next unit's slots or of tiles ahead: their
    # subscripts add an offset to a loop variable, "(v + 1)", "[.., v + 1]")
    return [line.strip() for line in script.splitlines()
            if re.match(rf"\s*if .*\b{index}\[", line) and "pf_slot" not in line
            and not re.match(r"\s*if \w+ \+ 1 < ", line)
            and not re.search(r"\(\w+ \+ \d+\)|\w+ \+ \d+\]", line)]


@pytest.mark.parametrize("op", sorted(GUARDED))
def test_empty_work_is_skipped(op):
    static, index, count = GUARDED[op]
    op = op.removesuffix("-grouped")
    guards = _guards(op, static, index)
    assert len(guards) == count, guards
    if op != "bwd_finish":  # slot guards test the slot's block index
        assert all(g.endswith(">= 0:") for g in guards), guards


def test_hires_rows_merges_only_the_units_a_row_has():
    """The merge of a block row's overflow units (max, scales, sum, output) runs over the
    row's own ``ov_units``, not the largest count of any row (``ucap``): one guarded unit
    loop per stage; and the merged output's zeros are written only where the row has a
    unit (the output selects it there only)."""
    guards = _guards("hires_rows", {"b": 32, "D": 64, "full": True}, "ov_units")
    units = [g for g in guards if re.fullmatch(r"if \w+ < ov_units\[.*\]:", g)]
    assert len(units) == 4, guards
    assert [g for g in guards if g not in units] == [
        "if ov_units[ax0_ax1_fused_m // (N // 32), ax0_ax1_fused_m % (N // 32)] > 0:"], guards


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_rows_with_different_overflow_units_match_the_reference(mode):
    """Block rows with none, one or several overflow units beside each other (the units a
    row lacks are skipped, ``_skip_missing_units``): float32 within 1e-5."""
    import torch
    from conftest import RTOL_FP32, as64, make_qkv, rel_err

    import mra_compile
    from mra_compile.forward import mra_forward
    from mra_compile.options import Options
    from mra_compile.reference import mra2_reference

    q, k, v = make_qkv(5, 1, 2, 520, 64)  # 17 block rows, 10 selected blocks per row
    kw = dict(block_per_row=10, approx_mode=mode)
    # Row units of 8 blocks (not the AVX-512 default, 12), overflow units of 3.
    knobs = {"hires_rows": {"row_unit_blocks": 8}, "hires_units": {"blocks_per_unit": 3}}
    with build.trace_kernel_calls() as calls, torch.no_grad():
        out = mra_forward(q, k, v, None, Options(**kw), knobs=knobs)
    rows = next(c for c in calls if c["op"] == "hires_rows")
    names = build.kernels.get("hires_rows").arg_names(rows["static"])
    counts = torch.from_dlpack(rows["args"][names.index("ov_units")])
    assert {0, 1, 3} <= set(counts.flatten().tolist())  # (Cr = 8, 3 blocks per unit)
    sel = mra_compile.block_selection(q, k, v, **kw)
    ref = mra2_reference(as64(q), as64(k), as64(v), selection=sel, **kw)
    assert rel_err(out, ref) <= RTOL_FP32


@pytest.mark.parametrize("vec,rows,cols", [(16, 8, 32), (8, 4, 16)])
def test_pool_logits_are_register_tiles_over_padded_copies(vec, rows, cols):
    """q̂ k̂^T: k̂ [R, n, D] copied as [R, D, n'] and q̂ as [R, n'', D], zero-padded to the
    tile (8 x 32 with AVX-512, 4 x 16 with AVX2: half the vector registers), so that the
    tiles' loops carry no guard; the keys are the vector lanes. The copy of k̂ is written
    along its rows."""
    script = build.scheduled_func("pool_and_logits", {"b": 32, "D": 64, "full": True},
                                  {"vec": vec}).script()
    assert re.search(r"kp_pad\[v\w+, v\w+, v\w+\] = T.if_then_else\(v\w+ < Nk // 32, kp\[",
                     script)
    assert "qp_pad[v_r, v_i, v_dd] * kp_pad[v_r, v_dd, v_j]" in script
    tile = script[script.index('T.sblock("raw_logits_update")') - 400:]
    assert f"T.vectorized({cols})" in tile[:400] and f"T.unroll({rows})" in tile[:400]
    update = tile[400:tile.index(f"raw_logits_pad_{TILE_SCOPE}[v_r, v_i, v_j] =")]
    assert "T.where" not in update
    # The copy of k̂ runs along the rows it writes (keys innermost), not the rows it reads
    # (a scatter per vector of d).
    copy = script[:script.index('T.sblock("kp_pad")')].splitlines()[-3:]
    assert re.match(r"\s*for i2, i1_0 in T.grid\(64, ", copy[0]), copy
    assert f"T.vectorized({vec})" in copy[1], copy


@pytest.mark.usefixtures("avx512_defaults")  # (the AVX-512 defaults' structure)
@pytest.mark.parametrize("full", [True, False])
def test_pool_row_maxima_run_in_vector_lanes(full):
    """R (the real-key row maximum of the block logits) as 16 partial maxima over whole
    chunks of 16 key blocks, in one vector (a single running maximum was a chain of
    dependent scalar steps: a fifth of the bf16 kernel at N = 8192), then the tail and
    the lanes as scalars; the inits of both partial reductions sit outside their loops
    (either may be empty: n < 16, or n a multiple of 16)."""
    script = build.scheduled_func("pool_and_logits", {"b": 32, "D": 64, "full": full},
                                  knob_policy.resolve_knobs("pool_and_logits", None)).script()
    update = _loops_above(script, "real_max_lanes_update")
    # (the chunks' loop outside, the lanes inside in a vector)
    assert re.search(r"for \w+, \w+ in T.grid\(Nk // 512, 1\):\n\s*for \w+ in T.vectorized\(16\):",
                     update), update
    assert "with T.init()" not in script[script.index('T.sblock("real_max_lanes_update")'):
                                         script.index('T.sblock("real_max")')]
    assert 'T.sblock("real_max_tail_init")' in script
    assert 'T.sblock("real_max_lanes_init")' in script


@pytest.mark.parametrize("blocks", [5, 16, 37])
def test_pool_row_maxima_are_over_real_key_blocks(blocks):
    """rowmax of ``pool_and_logits`` (R, docs/spec.md step 2) is, bit for bit, the
    largest logit of a real query block's row over the key blocks that hold a real
    token, and 0 where no key block does, for n below 16 (no whole chunk), a multiple of
    16 (no tail) and both; two of the keys' blocks empty, the second batch's keys all
    padding."""
    import torch
    from conftest import make_qkv

    from mra_compile.forward import mra_forward
    from mra_compile.options import Options

    N = 32 * blocks
    q, k, v = make_qkv(11, 2, 3, N, 64)
    mask = torch.ones(2, N)
    mask[0, 32:64] = 0  # key block 1 empty
    mask[0, N - 32:] = 0  # the last one too
    mask[0, 70] = 0  # a partly padded block stays real
    mask[1] = 0
    query_mask = torch.ones(2, N)
    with build.trace_kernel_calls() as calls, torch.no_grad():
        mra_forward(q, k, v, mask, Options(block_per_row=2, approx_mode="sparse"),
                    query_mask=query_mask)
    call = next(c for c in calls if c["op"] == "pool_and_logits")
    args = dict(zip(build.kernels.get("pool_and_logits").arg_names(call["static"]),
                    call["args"]))
    logits, rowmax, counts, q_counts = (torch.from_dlpack(args[name]) for name in
                                        ("logits", "rowmax", "counts", "q_counts"))
    heads, checked = 3, 0
    for r in range(logits.shape[0]):
        real_keys = counts[r // heads] > 0.5
        for i in range(blocks):
            if q_counts[r // heads, i] <= 0.5:
                continue
            row = logits[r, i][real_keys]
            want = row.max() if row.numel() else torch.tensor(0.0)
            assert rowmax[r, i] == want, (r, i, rowmax[r, i], want)
            checked += 1
    assert checked == 2 * heads * blocks

# A [b, D] register tile at D = 64 in bands: 4 bands of 16 dims, then 8 tiles of 4
# tokens; each tile 4 x 2 vectors of 8 (the loops above its initialisation).
BANDED_4_BY_2 = (r"for \w+, \w+ in T.grid\(4, 8\):\n.*T.unroll\(4\):\n.*T.unroll\(2\):\n"
                 r".*T.vectorized\(8\):")


def _loops_above(script, block):
    """The five lines above the block ``block`` of a scheduled kernel's script."""
    return "\n".join(script[:script.index(f'T.sblock("{block}")')].splitlines()[-5:])


@pytest.mark.parametrize("op,static", [("hires_units", {"b": 32, "D": 64}),
                                       ("hires_rows", {"b": 32, "D": 64, "full": True})])
def test_p_v_runs_in_bands_of_the_head_dim(op, static):
    """pv_cols: P V in tiles of pv_rows queries x pv_cols vectors, the bands of D outermost
    (d_0), so that a band of the unit's v rows (pv_cols * vec dims) stays in L1 while every
    query tile (t_0) reads it; all of D in one tile where pv_cols covers it."""
    knobs = knob_policy.resolve_knobs(op, {"vec": 8, "qk_rows": 2, "pv_rows": 4, "pv_cols": 2})

    def tile_loops(pv_cols):  # the loops above the accumulator tile's initialisation
        script = build.scheduled_func(op, static, {**knobs, "pv_cols": pv_cols}).script()
        return _loops_above(script, "unit_out_init")

    banded = tile_loops(2)
    assert re.search(BANDED_4_BY_2, banded), banded
    whole = tile_loops(8)
    assert re.search(r"for \w+ in range\(8\):\n.*T.unroll\(4\):\n.*T.unroll\(8\):", whole), whole


@pytest.mark.parametrize("b,D,dtype", [(16, 16, "float32"), (32, 64, "float32"),
                                       (64, 48, "float32"), (32, 128, "float64")])
def test_shuffle_transpose_is_a_transpose(b, D, dtype):
    """schedules/cpu_transpose.py: the tensorized q_t of a unit, on its own (a strided
    source: the intrinsic takes any row stride)."""
    import torch
    from tvm import s_tir, te

    from mra_compile import targets
    from mra_compile.schedules import cpu_transpose

    U = te.var("U")
    src = te.placeholder((U, b, D + 16), dtype, "src")
    q_t = te.compute((U, D, b), lambda u, d, t: src[u, t, d], name="q_t")
    sch = s_tir.Schedule(te.create_prim_func([src, q_t]))
    sch.tensorize(sch.get_loops(sch.get_sblock("q_t"))[-2],
                  cpu_transpose.intrinsic(b, D, dtype))
    lib = build.compile_module({"main": sch.mod["main"]}, targets.get(None), log=False)
    x = torch.randn(5, b, D + 16, dtype=getattr(torch, dtype))
    out = torch.empty(5, D, b, dtype=x.dtype)
    lib["main"](x, out)
    assert torch.equal(out, x[:, :, :D].transpose(1, 2))


@pytest.mark.parametrize("op,static", [
    ("hires_units", {"b": 32, "D": 64}), ("hires_rows", {"b": 32, "D": 48, "full": False}),
    ("hires_rows", {"b": 32, "D": 64, "full": True, "dtype": "float64"})])
def test_unit_queries_are_transposed_in_registers(op, static):
    """The unit's queries: masked and scaled as rows (q_s), then transposed by the shuffle
    intrinsic, not gathered a lane at a time; b = 8 keeps the plain gather."""
    knobs = knob_policy.resolve_knobs(op, None)
    script = build.scheduled_func(op, static, knobs).script()
    assert "T.Shuffle(" in script and "q_s[" in script
    small = build.scheduled_func(op, {**static, "b": 8}, knobs).script()
    assert "T.Shuffle(" not in small


@pytest.mark.usefixtures("avx512_defaults")  # (the AVX-512 defaults' structure)
@pytest.mark.parametrize("op,static,index", [
    ("hires_units", {"b": 32, "D": 64}, "unit_cols"),
    ("hires_rows", {"b": 32, "D": 64, "full": True}, "row_cols"),
    ("hires_rows", {"b": 32, "D": 48, "full": False, "gqa": True}, "row_cols")])
def test_units_request_the_next_units_key_and_value_blocks(op, static, index):
    """Each unit prefetches (into L2) the k and v blocks of the unit after it, for its
    filled slots only, and not past the last unit: slot c a few rows at a time from the
    logits tiles of its own slot c, up front only the slots it has empty; hires_rows,
    whose unit u is query block u, the next block of queries too (of the query row
    itself), a few rows from each of the first logits tiles (none up front). Each
    logits tile also asks for its own unit's key rows two tiles ahead into L1 (filled
    slots only, not past the unit's last)."""
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    lines = [line.strip() for line in script.splitlines()]
    assert any(re.match(r"if \w+ \+ 1 < ", line) for line in lines), script[:3000]
    slot = [line for line in lines if "pf_slot" in line and line.startswith("if ")]
    assert slot and re.search(rf"{index}\[\(\w+ \+ 1\) // .*\] >= 0", slot[0]), slot
    assert re.search(rf"and {index}\[[^\]]*pf_slot\] < 0", slot[0]), slot
    spread = [i for i, line in enumerate(lines) if "llvm.prefetch" in line and "_spread" in line]
    assert {re.search(r"T.address_of\((\w+)\[", lines[i]).group(1) for i in spread} == {"k", "v"}
    assert all(re.search(r", 0, 2, 1\)$", lines[i]) for i in spread), lines[spread[0]]  # L2
    # the next unit's slot (tested within the test that there is a next unit: the index
    # is not read past its last row)
    ask = next(i for i in range(spread[0], 0, -1) if lines[i].startswith("if "))
    assert re.match(rf"if {index}\[\(\w+ \+ 1\) //.*\] >= 0:$", lines[ask]), lines[ask]
    assert re.match(r"if \w+ \+ 1 < [^:]*:$", lines[ask - 1]), lines[ask - 1]
    # this unit's key rows two logits tiles ahead, into L1 (locality 3), within the unit
    near = [i for i, line in enumerate(lines) if "llvm.prefetch" in line and "_near" in line]
    assert {re.search(r"T.address_of\((\w+)\[", lines[i]).group(1) for i in near} == {"k"}
    assert all(re.search(r", 0, 3, 1\)$", lines[i]) for i in near), lines[near[0]]
    at = next(i for i in range(near[0], 0, -1) if lines[i].startswith("if "))
    assert re.match(rf"if {index}\[\w+ //.*\(\w+ \+ 2\) \* 4 // 32\] >= 0:$", lines[at]), lines[at]
    assert re.match(r"if \(\w+ \+ 2\) \* 4 < \d+:$", lines[at - 1]), lines[at - 1]
    assert near[-1] < ask - 1
    # the current unit's slot guard of the logits tile (hires_rows: above the queries' ask)
    at = next(i for i in range(at - 2, 0, -1) if lines[i].startswith("if "))
    guard = lines[at]
    if op == "hires_rows":  # the next queries, 4 rows per tile of the first slot's
        assert re.match(r"if \w+ \+ 1 < .* and \w+ \* 4 < 32:$", guard), guard
        assert all(at < i < near[0] for i, line in enumerate(lines)
                   if "llvm.prefetch" in line and "T.address_of(q[" in line), lines[at:ask]
        guard = lines[at - 1]
    assert guard.startswith(f"if {index}[") and guard.endswith("] >= 0:") and "+ 1" not in guard
    prefetches = [line for line in lines if "llvm.prefetch" in line]
    buffers = {re.search(r"T.address_of\((\w+)\[", p).group(1): p for p in prefetches}
    assert set(buffers) == ({"q", "k", "v"} if op == "hires_rows" else {"k", "v"}), prefetches
    if op == "hires_rows":  # block (u + 1) % n of row (u + 1) // n
        assert re.search(r"q\[\((\w+) \+ 1\) // \(N // 32\), \(\1 \+ 1\) % \(N // 32\) \* 32",
                         buffers["q"]), buffers["q"]
    if static.get("gqa"):  # the key/value row of the next unit's query row
        assert all("// group" in buffers[x] for x in "kv"), prefetches
        assert "// group" not in buffers.get("q", "")


@pytest.mark.parametrize("op,static,index", [
    ("hires_units", {"b": 32, "D": 64}, "unit_cols"),
    ("hires_rows", {"b": 32, "D": 64, "full": False}, "row_cols"),
    ("hires_rows", {"b": 32, "D": 48, "full": True, "gqa": True}, "row_cols")])
def test_value_tiles_request_the_next_slots_rows(op, static, index):
    """Each query tile of P V asks for its share of the next slot's value rows into L1
    (locality 3): only where the unit has a next slot and it is filled, v only, of the
    unit's own key/value row (grouped heads: its group's)."""
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    lines = [line.strip() for line in script.splitlines()]
    asks = [i for i, line in enumerate(lines) if "llvm.prefetch" in line and "pf_token_pv" in line]
    assert asks, script[:2000]
    assert all(re.search(r"T.address_of\(v\[", lines[i]) for i in asks), lines[asks[0]]
    assert all(re.search(r", 0, 3, 1\)$", lines[i]) for i in asks), lines[asks[0]]
    assert all(("// group" in lines[i]) == bool(static.get("gqa")) for i in asks)
    at = next(i for i in range(asks[0], 0, -1) if lines[i].startswith("if "))
    slot = re.match(rf"if {index}\[.*, (\w+) \+ 1\] >= 0:$", lines[at])
    assert slot, lines[at]
    assert re.match(rf"if {slot.group(1)} \+ 1 < \d+:$", lines[at - 1]), lines[at - 1]
    # under the query-tile loop of P V, which is under the slot's own guard
    loop = next(i for i in range(at, 0, -1) if lines[i].startswith("for "))
    guard = next(i for i in range(loop, 0, -1) if lines[i].startswith("if "))
    assert lines[guard] == f"if {index}[" + lines[at][len(f"if {index}["):].replace(
        f"{slot.group(1)} + 1]", f"{slot.group(1)} * 32 // 32]"), (lines[guard], lines[at])


BF16 = {"b": 32, "D": 64, "io": "bfloat16", "micro": "avx512_bf16"}


@pytest.mark.parametrize("op,static,inputs,shared", [
    ("bwd_dkdv_ds_units", BF16, {"q", "g"}, False),
    ("bwd_dkdv_ds_units", {**BF16, "gqa": True}, {"q", "g"}, False)])
def test_bf16_backward_units_request_the_next_units_slot_blocks(op, static, inputs, shared):
    """The bf16 backward's units prefetch the next unit's slot blocks: query and g blocks
    by key block (their own row, grouped heads or not), a slot token's rows at a time from
    the exps' loop. (Scheduling only: no AVX-512-BF16 needed.)"""
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    prefetches = [line.strip() for line in script.splitlines() if "llvm.prefetch" in line]
    assert {re.search(r"T.address_of\((\w+)\[", p).group(1) for p in prefetches} == inputs
    assert all(("// group" in p) == shared for p in prefetches), prefetches
    # a slot token's rows at a time from the exps (P), after the first logits' call
    lines = [line.strip() for line in script.splitlines()]
    spread = [i for i, line in enumerate(lines) if "llvm.prefetch" in line and "_spread" in line]
    assert spread and "for pf_token_spread in range(1):" in lines[spread[0] - 2:spread[0]]
    calls = [i for i, line in enumerate(lines) if '"mra_bf16_qk"' in line]
    assert calls[0] < spread[0], (calls, spread)
    after = next(line for line in lines[spread[-1]:] if line.startswith("with T.sblock("))
    assert after == 'with T.sblock("prob"):', after


@pytest.mark.parametrize("op,static,index", [
    ("hires_rows", {**BF16, "full": False}, "row_cols"),
    ("hires_units", BF16, "unit_cols"),
    ("hires_rows", {**BF16, "full": True, "gqa": True}, "row_cols")])
def test_bf16_units_hand_the_next_units_rows_to_their_exp_and_p_v_call(op, static, index):
    """bf16 units compute their exps, sums and P v in one call (``mra_bf16_exp_pv_slots``,
    in place of the stages ``prob``, ``unit_sum`` and ``unit_out``, whose loops and
    ``prob``'s buffer are gone), which asks for the next unit's k and v rows as its
    products go (hires_rows: and its queries): the call gets the next unit's slots and
    the addresses of its k, v (grouped heads: their shared row) and q rows, each in
    bounds for the last unit too, and what to ask for (1: k and v where there is a next
    unit; 3: the queries too). Up front only the slots the unit has empty are asked for;
    each logits call asks only for its own unit's next key block, into L1."""
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    lines = [line.strip() for line in script.splitlines()]
    assert not any(f'T.sblock("{name}' in line for line in lines
                   for name in ("prob", "unit_sum", "unit_out")), script
    assert not any("prob = T.sblock_alloc_buffer" in line for line in lines)
    qk = [i for i, line in enumerate(lines) if '"mra_bf16_qk"' in line]
    calls = [i for i, line in enumerate(lines) if '"mra_bf16_exp_pv_slots"' in line]
    near = [i for i, line in enumerate(lines) if "llvm.prefetch" in line and "_near" in line]
    assert len(qk) == 1 and len(calls) == 1 and near and near[-1] < qk[0] < calls[0]
    assert not any("_spread" in line for line in lines)
    call = lines[calls[0]]
    unit = re.search(rf'T.Cast\("int32", (\w+) \+ 1 < .*?\)( \* 3)?, T.address_of\({index}\[', call)
    assert unit and bool(unit.group(2)) == (op == "hires_rows"), call
    last = f"T.min({unit.group(1)} + 1, "
    asks = re.findall(r"T.address_of\((\w+)\[([^\]]*)\]\)", call.split("T.address_of(S[0]), ")[1])
    assert [name for name, _ in asks] == [index, "k", "v", "q" if op == "hires_rows" else "k"]
    assert all(last in at for _, at in asks), asks
    assert all(("// group" in at) == bool(static.get("gqa")) for name, at in asks[1:3])
    slot = [line for line in lines if "pf_slot" in line and line.startswith("if ")]
    assert slot and re.search(rf"and {index}\[[^\]]*pf_slot\] < 0", slot[0]), slot
    assert not any("pf_token_q" in line for line in lines)


@pytest.mark.parametrize("static", [{"b": 32, "D": 64}, {"b": 32, "D": 48, "gqa": True}])
def test_float32_backward_units_spread_the_next_units_requests(static):
    """The float32 dk/dv units ask for the next unit's query and g rows (into L2), a
    logits tile's rows at a time from the tiles of the same slot, under that slot's guard
    (up front only the slots the unit has empty); their own rows, not a group's."""
    op = "bwd_dkdv_ds_units"
    knobs = knob_policy.resolve_knobs(op, None)
    script = build.scheduled_func(op, static, knobs).script()
    lines = [line.strip() for line in script.splitlines()]
    spread = [i for i, line in enumerate(lines) if "llvm.prefetch" in line and "_spread" in line]
    assert spread, script[:3000]
    assert {re.search(r"T.address_of\((\w+)\[", lines[i]).group(1) for i in spread} == {"q", "g"}
    assert all(lines[i].endswith(", 0, 2, 1)") and "// group" not in lines[i] for i in spread)
    assert f"for pf_token_spread in range({knobs['rows']}):" in lines[spread[0] - 2:spread[0]]
    ask = next(i for i in range(spread[0], 0, -1) if lines[i].startswith("if "))
    tile = re.match(r"if unit_rows\[\(\w+ \+ 1\) //.*, (\w+) \* (\d+) // 32\] >= 0:$", lines[ask])
    assert tile and int(tile.group(2)) == knobs["rows"], lines[ask]
    loop = max(i for i in range(ask) if lines[i].startswith(f"for {tile.group(1)} in range("))
    assert lines[loop + 1].startswith("if unit_rows[") and "+ 1" not in lines[loop + 1]
    slot = [line for line in lines if "pf_slot" in line and line.startswith("if ")]
    assert slot and re.search(r"and unit_rows\[[^\]]*pf_slot\] < 0", slot[0]), slot


@pytest.mark.parametrize("op,static,blocks", [
    ("hires_rows", {**BF16, "full": False}, ("dots",)),
    ("hires_units", BF16, ("dots",)),
    ("bwd_dkdv_ds_units", BF16, ("dots", "dp"))])
def test_bf16_logits_are_written_by_the_micro_kernel_alone(op, static, blocks):
    """The q k^T micro-kernel writes its whole block (its intrinsic is the sum with its
    init): no zero fill of the block before the call, and the call writes, not reads."""
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    calls = [line for line in script.splitlines() if '"mra_bf16_qk"' in line]
    assert len(calls) == len(blocks), calls
    for name in blocks:
        assert f'T.sblock("{name}_o")' in script
        assert f'T.sblock("{name}_init")' not in script, name
        assert "T.init()" not in script[script.index(f'T.sblock("{name}_o")'):][:3000]
    # the output: the address of the block's first logit (extern_calls.pointer)
    assert all("T.address_of(C[0, 0])" in line for line in calls), calls


@pytest.mark.usefixtures("avx512_defaults")  # (the AVX-512 defaults' structure)
@pytest.mark.parametrize("static", [{"b": 32, "D": 64}, {"b": 32, "D": 48, "gqa": True},
                                    {"b": 32, "D": 64, "io": "bfloat16", "micro": "avx512_bf16"}])
def test_dq_units_request_the_next_units_blocks(static):
    """Each filled slot of a dq unit asks for the same slot's dS block and key block of
    the next unit into L1: every row of both, not past the last unit, only where the next
    unit's slot is filled; the key row of the next unit's query row (its group's with
    grouped-query heads). float32: a query tile's share of the rows from each of the
    slot's tiles (4 rows of each block a tile of 4 queries); bf16 (one micro-kernel call
    a slot): all 32 as the slot starts."""
    knobs = knob_policy.resolve_knobs("bwd_dq_ds_units", None)
    script = build.scheduled_func("bwd_dq_ds_units", static, knobs).script()
    lines = [line.strip() for line in script.splitlines()]
    asks = [i for i, line in enumerate(lines) if "llvm.prefetch" in line]
    assert {re.search(r"T.address_of\((\w+)\[", lines[i]).group(1) for i in asks} == {"ds_blocks", "k"}
    assert all(lines[i].endswith(", 0, 3, 1)") for i in asks)  # L1
    first = min(asks)
    micro = "micro" in static
    per = 32 if micro else knobs["out_rows"]
    assert lines[first - 2] == f"for pf_token_dq in range({per}):"
    assert re.match(r"if ds_at\[\((\w+) \+ 1\) // U, \(\1 \+ 1\) % U, w1_0\] >= 0:", lines[first - 3])
    assert re.match(r"if \w+ \+ 1 < R_1 \* U:", lines[first - 4])
    if not micro:  # under the slot's tile loop; each tile its own rows
        tile = re.match(r"for (\w+) in range\((\d+)\):", lines[first - 5])
        assert tile and int(tile.group(2)) * per == 32, lines[first - 5]
        assert all(f"{tile.group(1)} * {per} + pf_token_dq" in lines[i] for i in asks)
        first -= 1
    assert re.match(r"if ds_at\[\w+ // U, \w+ % U, w1_0\] >= 0:", lines[first - 5])  # this slot's guard
    key = next(lines[i] for i in asks if "T.address_of(k[" in lines[i])
    assert ("// U // group," in key) == bool(static.get("gqa")), key


def test_the_shuffle_transpose_refuses_blocks_it_would_overrun():
    """Its 16 x 16 tiles would read and write past an 8 x 8 block (TVM checks no bounds):
    the schedules use a plain gather there (``block_size=8``), and the intrinsic refuses."""
    from mra_compile.schedules import cpu_transpose

    assert cpu_transpose.fits(32, 64) and not cpu_transpose.fits(8, 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        cpu_transpose.intrinsic(8, 8, "float32")
    knobs = knob_policy.resolve_knobs("bwd_dkdv_ds_units", None)
    shuffles = {b: build.scheduled_func("bwd_dkdv_ds_units", {"b": b, "D": D}, knobs)
                .script().count("T.Shuffle") for b, D in ((32, 64), (8, 16))}
    assert shuffles[32] > 0 and shuffles[8] == 0, shuffles


@pytest.mark.parametrize("op,static", [("lowres_out", {"b": 32, "D": 64}),
                                       ("bwd_lowres", {"b": 32, "D": 64})])
def test_low_resolution_weights_are_vectors(op, static):
    """The n x nk weights' exps (nk symbolic: the key blocks) run in whole vectors over
    rows padded to 16, with no guard (they were scalar: 60% of lowres_out on an AVX2 CPU),
    and read their operands contiguously except in the group past nk (each lane a scalar
    load had taken lowres_out 1.8x the time at N = 8192)."""
    script = build.scheduled_func(op, static, knob_policy.resolve_knobs(op, None)).script()
    block = script.index('T.sblock("weight")')
    loops = script[:block].splitlines()[-3:]
    assert "T.vectorized(" in loops[-2], loops
    body = script[block:script.index("T.writes(weight", block)]
    assert "T.where" not in body, body
    # Whole groups of 16 read their blocks as they are (contiguous: vector loads), only
    # the group past nk the clamped index, under a condition the same for all 16 lanes.
    value = script[script.index("weight[v_r, v_i, v_j] = ", block):].splitlines()[0]
    branch = re.search(r"T.if_then_else\(v_j // 16 < nk // 16, (.*)", value)
    assert branch, value
    direct, clamped = branch.group(1).split("T.min(v_j, nk - 1)", 1)
    for name in ("logits[v_r, v_i, v_j]", "hmask[v_r, v_i, v_j]", "counts[v_r // heads, v_j]"):
        assert name in direct, (name, direct)
    assert "logits[v_r, v_i, T.min(v_j, nk - 1)]" in value


@pytest.mark.usefixtures("avx512_defaults")  # (the AVX-512 defaults' structure)
@pytest.mark.parametrize("D,band", [(64, 4), (128, 4), (48, 3)])
def test_low_resolution_product_is_register_tiles_of_query_blocks(D, band):
    """W v̂ (lowres_out): 4 query blocks x ``band`` vectors of dims per register tile over a
    copy of W padded to whole tiles (no guard in the product), the head's rows in
    parallel; sum W as vector lanes (a running scalar sum beside the 4 FMA chains of one
    query block had bound the kernel: 1.5x the time)."""
    script = build.scheduled_func("lowres_out", {"b": 32, "D": D},
                                  knob_policy.resolve_knobs("lowres_out", None)).script()
    assert re.search(r"for r_m in T.parallel\(R_1\)", script)
    tile = _loops_above(script, "o_lo_update")
    assert re.search(rf"T.unroll\(4\):\n.*T.unroll\({band}\):\n.*T.vectorized\(16\):", tile), tile
    written = script.index(f"o_lo_pad_{TILE_SCOPE}[v_r, v_i, v_d] =")
    update = script[script.index('T.sblock("o_lo_update")'):written]
    assert "T.where" not in update
    lanes = _loops_above(script, "z_lo_lanes_update")
    assert "T.vectorized(16)" in lanes.splitlines()[-2], lanes


@pytest.mark.usefixtures("avx512_defaults")  # (the AVX-512 defaults' structure)
@pytest.mark.parametrize("output", ["dqp", "dkp", "dvp"])
def test_low_resolution_gradients_are_register_tiles(output):
    """bwd_lowres: ga v̂^T as the block logits' 8 x 32 tiles over padded copies (as in
    pool_and_logits), and dq̂, dk̂, dv̂ as lowres_out's W v̂ (4 rows x 4 vectors, no guard
    in the product): row by row they took 2.7x the time at N = 8192."""
    script = build.scheduled_func("bwd_lowres", {"b": 32, "D": 64},
                                  knob_policy.resolve_knobs("bwd_lowres", None)).script()
    logits = _loops_above(script, "gv_update")
    assert "T.unroll(8)" in logits and "T.vectorized(32)" in logits, logits
    tile = _loops_above(script, f"{output}_update")
    assert re.search(r"T.unroll\(4\):\n.*T.unroll\(4\):\n.*T.vectorized\(16\):", tile), tile
    update = script[script.index(f'T.sblock("{output}_update")'):]
    update = update[:update.index(f"{output}_pad_{TILE_SCOPE}[v_r, v_")]
    assert "T.where" not in update


@pytest.mark.usefixtures("avx512_defaults")  # (the AVX-512 defaults' structure)
@pytest.mark.parametrize("static", [{"b": 32, "D": 64},
                                    {"b": 32, "D": 64, "io": "bfloat16", "micro": "avx512_bf16"}])
def test_backward_token_dots_run_in_vector_lanes(static):
    """bwd_prep's g . out per token as 16 lanes of partial sums over D (then their sum):
    one running scalar sum per token was a chain of 64 dependent FMAs."""
    script = build.scheduled_func("bwd_prep", static,
                                  knob_policy.resolve_knobs("bwd_prep", None)).script()
    lanes = _loops_above(script, "dsum_rf_update")
    assert re.search(r"for \w+ in range\(4\):\n\s*for \w+ in T.vectorized\(16\):", lanes), lanes


@pytest.mark.parametrize("op,output", [("bwd_dkdv_ds_units", "dk_unit"),
                                       ("bwd_dq_ds_units", "dq_unit")])
def test_backward_outputs_run_in_bands_of_the_head_dim(op, output):
    """out_rows x out_cols: the backward's [b, D] outputs in tiles of out_rows tokens x
    out_cols vectors, the bands of D outermost (AVX2's default 4 x 2: 8 accumulators;
    all of D at out_rows=2 kept 16 of AVX2's 16 registers and spilled)."""
    knobs = knob_policy.resolve_knobs(op, {"vec": 8, "rows": 2, "out_rows": 4, "out_cols": 2})
    script = build.scheduled_func(op, {"b": 32, "D": 64}, knobs).script()
    tile = _loops_above(script, f"{output}_init")
    assert re.search(BANDED_4_BY_2, tile), tile


@pytest.mark.parametrize("D", [40, 64])
def test_backward_output_tiles_change_no_bit(D):
    """Bands of D split a spatial axis only: dq, dk, dv bit for bit the same with the
    outputs in bands (4 tokens x 2 vectors) as in whole rows (2 tokens x all of D), and
    within float32 tolerance of the float64 reference's gradients."""
    import torch
    from conftest import as64

    import mra_compile
    from mra_compile import backward, forward
    from mra_compile.options import Options
    from mra_compile.reference import mra2_reference

    g = torch.Generator().manual_seed(D)
    q, k, v, grad = (torch.randn(1, 2, 200, D, generator=g) for _ in range(4))
    opts = Options(30, "full", 32)
    out, saved = forward.mra_forward(q, k, v, None, opts, save=True)
    units = ("bwd_dkdv_ds_units", "bwd_dq_ds_units")
    grads = {tile: backward.mra_backward(grad, q, k, v, None, out, saved, opts,
                                         {op: {"vec": 8, "out_rows": tile[0],
                                               "out_cols": tile[1]} for op in units})
             for tile in ((4, 2), (2, 8))}
    for banded, whole in zip(grads[(4, 2)], grads[(2, 8)]):
        assert torch.equal(banded, whole)
    sel = mra_compile.block_selection(q, k, v, num_blocks=30)
    refs = [as64(x).requires_grad_() for x in (q, k, v)]
    mra2_reference(*refs, num_blocks=30, selection=sel).backward(as64(grad))
    scale = max(x.grad.abs().max().item() for x in refs)
    for mine, ref in zip(grads[(4, 2)], refs):
        assert ((mine.double() - ref.grad).abs().max() / scale).item() <= 1e-5


def test_dq_tests_each_slot_once_per_unit():
    """bwd_dq_ds_units: the slot loop outside the register tiles (``_slots_outside_tiles``),
    so a slot's test (and its block's address: a floor division by the symbolic unit
    count) runs once per unit, not once per tile."""
    knobs = knob_policy.resolve_knobs("bwd_dq_ds_units", {"vec": 8, "out_rows": 4, "out_cols": 2})
    lines = build.scheduled_func("bwd_dq_ds_units", {"b": 32, "D": 64}, knobs).script().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if "T.parallel" in line) + 1:]
    guard = next(i for i, line in enumerate(body) if re.match(r"\s*if ds_at\[", line))
    depth = len(body[0]) - len(body[0].lstrip())  # the parallel loop's body

    def indent(line):
        return len(line) - len(line.lstrip())
    slot_loop = body[guard - 1]
    assert re.match(r"\s*for \w+ in range\(6\):", slot_loop) and indent(slot_loop) == depth
    # under the guard: the bands of D and the query tiles (each band's tiles ask for their
    # share of the next unit's rows: test_dq_units_request_...), then the slot's keys
    tiles = body[guard + 1]
    assert re.match(r"\s*for \w+, \w+ in T.grid\(4, 8\):", tiles), tiles
    assert indent(tiles) == indent(body[guard]) + 4
    ask = body[guard + 2]
    assert re.match(r"\s*if \w+ \+ 1 < R_1 \* U:$", ask), ask
    keys = next(line for line in body[guard + 3:] if indent(line) == indent(ask))
    assert re.match(r"\s*for \w+ in range\(32\):", keys), keys


@pytest.mark.parametrize("full", [True, False])
def test_float32_output_is_stored_by_one_call_a_block_row(full):
    # hires_rows computes a block row's output in a scratch block, then one call stores it
    # (non-temporal stores: schedules/cpu_stores.c); no other kernel calls it.
    script = build.scheduled_func("hires_rows", {"b": 32, "D": 64, "full": full},
                                  knob_policy.resolve_knobs("hires_rows", None)).script()
    calls = [line for line in script.splitlines() if "mra_store_rows_f32" in line]
    assert len(calls) == 1, calls
    assert re.search(r"O = T.match_buffer\(out\[", script)  # (the call's dst: the output)
    units = build.scheduled_func("hires_units", {"b": 32, "D": 64},
                                 knob_policy.resolve_knobs("hires_units", None)).script()
    assert "mra_store_rows_f32" not in units


@pytest.mark.parametrize("offset", [0, 1])  # (1: a dst not 64-byte aligned, a plain copy)
def test_the_float32_output_store_copies_every_bit(tmp_path, offset):
    import ctypes

    import torch
    from conftest import c_function

    from mra_compile.schedules import cpu_stores

    store = c_function(tmp_path, cpu_stores.SOURCE, cpu_stores.FLAGS, "mra_store_rows_f32")
    rows, D, lds, ldd = 5, 48, 56, 64
    src = torch.randn(rows, lds, generator=torch.Generator().manual_seed(0))
    src.view(torch.int32)[0, :3] = torch.tensor([0x7FC01234, -0x800000, 0x1], dtype=torch.int32)
    dst = torch.zeros(offset + rows * ldd * 2)  # (the tail: never written)
    store(ctypes.c_void_p(src.data_ptr()), lds, ctypes.c_void_p(dst.data_ptr() + 4 * offset),
          ldd, rows, D)
    got = dst[offset:offset + rows * ldd].view(rows, ldd)
    assert torch.equal(got[:, :D].view(torch.int32), src[:, :D].view(torch.int32))
    assert not got[:, D:].any() and not dst[offset + rows * ldd:].any()
