"""Inference calls replayed from the launches kept per call signature
(``mra_compile.launch_cache``): the same output as the usual path, bit for bit, whatever
the inputs' values, the selection's overflow and the workspace do between calls."""
import threading

import pytest
import torch
from conftest import RTOL_FP32, as64, make_qkv, padding_mask
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import build, inputs, launch_cache, memory
from mra_compile.reference import mra2_reference
from mra_compile.targets import cpu

op = torch.ops.mra.attention


def usual(*args, **kwargs):
    """The op's output the usual way: nothing is planned or replayed while kernel calls
    are traced."""
    with build.trace_kernel_calls():
        return op(*args, **kwargs)


def plans() -> dict:
    """This thread's plans: signature -> plan (None: goes the usual way)."""
    return memory.WORKSPACE.plans


def check(q, k, v, **kw):
    """The op (planned where it can be) against the usual path and the float64 oracle on
    the op's blocks; returns the op's output."""
    out = op(q, k, v, None, **kw)
    assert torch.equal(out, usual(q, k, v, None, **kw))
    sel = mra_compile.block_selection(q, k, v, None, **kw)
    ref = mra2_reference(as64(q), as64(k), as64(v), None, selection=sel, **kw)
    err = ((out.double() - ref).abs().amax((-1, -2)) / ref.abs().amax((-1, -2))).max()
    assert err <= RTOL_FP32
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.sampled_from([32, 96, 256, 300]), D=st.sampled_from([16, 40, 64]),
       mode=st.sampled_from(["full", "sparse"]), per_row=st.integers(1, 6),
       calls=st.integers(2, 4))
def test_replayed_calls_match_the_usual_path(seed, B, H, N, D, mode, per_row, calls):
    """Calls of one signature with new values each time: each output is the usual path's,
    bit for bit, and within the oracle's tolerance; whole blocks and head dims of a
    multiple of 16 are replayed where the selection kernel picks the blocks (fewer than
    all); the rest go the usual way."""
    n = -(-N // 32)
    kw = dict(num_blocks=per_row * n, approx_mode=mode)
    outs = []
    for i in range(calls):
        q, k, v = make_qkv(seed + i, B, H, N, D)
        outs.append((check(q, k, v, **kw), (q, k, v)))
    for out, qkv in outs:  # (each result its own memory: later calls did not change it)
        assert torch.equal(out, usual(*qkv, None, **kw))
    planned = [p for p in plans().values() if p is not None]
    if N % 32 == 0 and D % 16 == 0 and per_row < n:
        assert planned
    assert len(plans()) <= 16


@pytest.mark.parametrize("N, D, dtype", [(300, 64, torch.float32), (256, 40, torch.float32),
                                         (256, 64, torch.float16), (1000, 48, torch.bfloat16)])
def test_inputs_read_through_a_copy_replay_too(N, D, dtype, monkeypatch):
    """A partial last block, a head dim padded to 16, float16 computed on float32 copies
    (as without F16C): the kernels read copies of q, k, v and write a padded output,
    which each replay makes and copies out again; the same bits as the usual path, from
    C and from Python."""
    monkeypatch.setenv(cpu.WIDEN_ENV, "0")
    mra_compile.clear_workspace()
    kw = dict(num_blocks=3 * -(-N // 32), approx_mode="sparse")
    for i in range(3):
        q, k, v = (x.to(dtype) for x in make_qkv(30 + i, 2, 3, N, D))
        assert torch.equal(op(q, k, v, None, **kw), usual(q, k, v, None, **kw))
    (plan,) = [p for p in plans().values() if p is not None]
    assert set(plan.copies) == {"q", "k", "v"} and plan.out_copy is not None
    assert plan.native


@pytest.mark.parametrize("dtype, in_place", [(torch.float32, "1"), (torch.float32, "0"),
                                             (torch.bfloat16, "1")])
def test_transposed_and_unaligned_inputs_replay(monkeypatch, dtype, in_place):
    """The views attention layers pass ([B, N, H, D] transposed to [B, H, N, D]): the
    kernels read them in place (their heads-last variant; bf16 where the CPU has its
    micro-kernels), unless ``MRA_COMPILE_HEADS_LAST=0``: then through copies each replay
    makes again, as for an input off the kernels' alignment. The same bits as the
    usual path, in its layout (where the kernels read the inputs in place, they write the
    output as [B, N, H, D] too); each layout keeps a plan of its own."""
    monkeypatch.setenv(inputs.HEADS_LAST_ENV, in_place)
    mra_compile.clear_workspace()
    B, H, N, D = 2, 3, 256, 64
    kw = dict(num_blocks=3 * N // 32, approx_mode="full")

    def layer_views(seed):  # (heads split off the hidden dim, as attention layers do)
        return tuple(x.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
                     for x in make_qkv(seed, B, H, N, D))

    def unaligned(x):  # (a contiguous tensor 4 elements into its storage)
        flat = torch.empty(x.numel() + 4, dtype=x.dtype)[4:]
        return flat.view(x.shape).copy_(x)

    for i in range(3):
        q, k, v = layer_views(40 + i)
        assert not q.is_contiguous()
        replayed, expected = op(q, k, v, None, **kw), usual(q, k, v, None, **kw)
        assert torch.equal(replayed, expected) and replayed.stride() == expected.stride()
        assert replayed.transpose(1, 2).is_contiguous() == (in_place == "1" and (
            dtype == torch.float32 or cpu.bf16_products()))
        qc, kc, vc = (x.contiguous() for x in (q, k, v))
        qa = unaligned(qc)
        assert torch.equal(op(qa, kc, vc, None, **kw), usual(qa, kc, vc, None, **kw))
        assert torch.equal(op(qc, kc, vc, None, **kw), usual(qc, kc, vc, None, **kw))
    made = {(tuple(sorted(p.copies)), tuple(sorted(p.transposed)))
            for p in plans().values() if p is not None}
    qkv = ("k", "q", "v")
    layer = in_place == "1" and (dtype == torch.float32 or cpu.bf16_products())
    views = ((), ("k", "out", "q", "v")) if layer else (qkv, ())
    if dtype == torch.bfloat16 and not cpu.bf16_products():
        # (bf16 computed in float32: every layout's q, k, v are converted copies)
        assert made == {(qkv, ())}
    else:
        assert made == {((), ()), (("q",), ()), views}
    assert all(p.native for p in plans().values() if p is not None)


MASK_KINDS = ["float", "bool", "additive", "bool4d", "int64", "uint8", "float64", "strided"]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.sampled_from([256, 300]),
       mode=st.sampled_from(["full", "sparse"]), budget=st.sampled_from(["per_row", "total"]),
       kind=st.sampled_from(MASK_KINDS),
       lengths=st.lists(st.lists(st.integers(1, 300), min_size=2, max_size=2), min_size=3,
                        max_size=3))
def test_masked_calls_replay_with_their_own_mask(seed, N, mode, budget, kind, lengths):
    """Calls with a key padding mask (different sequence lengths each call, the same
    shapes): each replay writes the call's mask, its block counts and its per-sequence
    budgets again, and gives the usual path's bits, within the oracle's tolerance."""
    mra_compile.clear_workspace()
    n = -(-N // 32)
    kw = dict(approx_mode=mode, **({"block_per_row": 3} if budget == "per_row"
                                   else {"num_blocks": 3 * n}))
    # Twice through the calls (as in test_cross_attention_replays_with_its_own_masks: a
    # call needing more scratch than any before it drops the plans and is not recorded).
    for i, call_lengths in [*enumerate(lengths), *enumerate(lengths)]:
        q, k, v = make_qkv(seed + i, 2, 3, N, 64)
        real = [min(x, N) for x in call_lengths]
        mask = padding_mask(real, N, kind)
        out = op(q, k, v, mask, **kw)
        assert torch.equal(out, usual(q, k, v, mask, **kw))
        sel = mra_compile.block_selection(q, k, v, mask, **kw)
        ref = mra2_reference(as64(q), as64(k), as64(v), as64(padding_mask(real, N, "float")),
                             selection=sel, **kw)
        err = ((out.double() - ref).abs().amax((-1, -2))
               / ref.abs().amax((-1, -2)).clamp_min(1e-30)).max()
        assert err <= RTOL_FP32
    (plan,) = [p for p in plans().values() if p is not None]
    assert plan.masks is not None and (plan.masks.budget is not None) == (budget == "per_row")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.sampled_from([70, 256]),
       Nk=st.sampled_from([100, 256, 300]), mode=st.sampled_from(["full", "sparse"]),
       budget=st.sampled_from(["per_row", "total"]),
       sides=st.sampled_from(["keys", "queries", "both", "none"]),
       heads_last=st.booleans(),
       lengths=st.lists(st.lists(st.integers(1, 300), min_size=4, max_size=4), min_size=3,
                        max_size=3))
# (the last call needs more scratch than the others: no plan left after one pass; a
# call after it does, but is recorded, never replayed)
@example(seed=0, N=256, Nk=300, mode="full", budget="total", sides="queries", heads_last=False,
         lengths=[[1, 1, 97, 97], [1, 1, 97, 71], [1, 1, 1, 1]])
@example(seed=0, N=70, Nk=300, mode="full", budget="total", sides="queries", heads_last=False,
         lengths=[[1, 1, 66, 70], [1, 1, 1, 1], [1, 1, 1, 1]])
def test_cross_attention_replays_with_its_own_masks(seed, N, Nk, mode, budget, sides,
                                                     heads_last, lengths):
    """Cross-attention (keys of their own length, a query mask, a key mask, both or none;
    contiguous inputs or an attention layer's transposed views) replays like
    self-attention: each replay writes its own masks, block counts and budgets; the usual
    path's bits, within the oracle's tolerance."""
    if sides == "none" and N == Nk:
        Nk += 44  # (no mask and one length: self-attention)
    mra_compile.clear_workspace()
    n = -(-max(N, Nk) // 32)
    kw = dict(approx_mode=mode, **({"block_per_row": 2} if budget == "per_row"
                                   else {"num_blocks": 2 * n}))  # (fewer than nq * nk)
    # Twice through the calls: a call whose masks need more scratch than any before it
    # (fewer real query blocks share a total budget: more blocks a row) drops the plans
    # and is not recorded (``memory.Workspace.dropped``); the second pass needs no more,
    # so it replays whatever the first could not.
    for i, call in [*enumerate(lengths), *enumerate(lengths)]:
        q, _, _ = make_qkv(seed + i, 2, 3, N, 64)
        _, k, v = make_qkv(seed + 7 * i + 1, 2, 3, Nk, 64)
        if heads_last:  # (views of [B, N, H, D] tensors)
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        keys = [min(x, Nk) for x in call[:2]]
        queries = [min(x, N) for x in call[2:]]
        mask = None if sides in ("queries", "none") else padding_mask(keys, Nk, "bool")
        query_mask = None if sides in ("keys", "none") else padding_mask(queries, N, "float")
        out = op(q, k, v, mask, query_mask=query_mask, **kw)
        assert torch.equal(out, usual(q, k, v, mask, query_mask=query_mask, **kw))
        sel = mra_compile.block_selection(q, k, v, mask, query_mask=query_mask, **kw)
        ref = mra2_reference(as64(q), as64(k), as64(v), None if mask is None else as64(mask),
                             query_mask=None if query_mask is None else as64(query_mask),
                             selection=sel, **kw)
        err = ((out.double() - ref).abs().amax((-1, -2))
               / ref.abs().amax((-1, -2)).clamp_min(1e-30)).max()
        assert err <= RTOL_FP32
    (plan,) = [p for p in plans().values() if p is not None]
    if sides == "none":
        assert plan.masks is None
    else:
        named = {"keys": ["mask"], "queries": ["query_mask"], "both": ["mask", "query_mask"]}
        assert [side.given for side in plan.masks.sides] == named[sides]
        assert plan.masks.native


def test_cross_attention_replays_check_each_side_s_padding():
    """NaN in a padded query of q, or in a padded key of k or v, sends a replayed
    cross-attention call the usual way (which zeroes it in a copy): the clean call's
    output. NaN in q at a padded key's position is in a real query: not the padding."""
    mra_compile.clear_workspace()
    q, _, _ = make_qkv(51, 2, 2, 128, 32)
    _, k, v = make_qkv(52, 2, 2, 200, 32)
    mask = padding_mask([200, 60], 200, "float")
    query_mask = padding_mask([128, 90], 128, "float")
    kw = dict(query_mask=query_mask, block_per_row=2)
    for _ in range(2):
        want = op(q, k, v, mask, **kw)
    (plan,) = [p for p in plans().values() if p is not None]
    assert plan.masks.native
    for j, token, goes in ((0, 100, True), (1, 160, True), (2, 199, True), (0, 70, False),
                           (1, 20, False)):
        dirty = [x.clone() for x in (q, k, v)]
        dirty[j][1, 0, token, 3] = float("nan")
        assert (plan.masks.native.run(*dirty, {"mask": mask, "query_mask": query_mask})
                == 1) == goes, (j, token)
        if goes:
            assert torch.equal(op(*dirty, mask, **kw), want)


def test_masked_replays_check_the_mask_and_the_padding():
    """A replayed masked call still refuses a mask value other than 0 and 1, and a call
    whose padded tokens hold NaN (which the usual path zeroes in a copy) goes the usual
    way: the same output as a clean call."""
    mra_compile.clear_workspace()
    q, k, v = make_qkv(50, 2, 2, 256, 32)
    mask = padding_mask([256, 100], 256, "float")
    for _ in range(2):
        want = op(q, k, v, mask, block_per_row=2)
    assert [p for p in plans().values() if p is not None]
    with pytest.raises(ValueError, match="mask must contain only 0"):
        op(q, k, v, mask * 2, block_per_row=2)
    dirty = [x.clone() for x in (q, k, v)]
    for x in dirty:
        x[1, :, 100:] = float("nan")
    assert torch.equal(op(*dirty, mask, block_per_row=2), want)


def _masked_plan(q, k, v, mask, **kw):
    """The plan of a masked call, recorded (and replayed once) with these inputs."""
    mra_compile.clear_workspace()
    for _ in range(2):
        assert torch.equal(op(q, k, v, mask, **kw), usual(q, k, v, mask, **kw))
    (plan,) = [p for p in plans().values() if p is not None]
    assert plan.masks is not None
    return plan


def _scratch(masks) -> list:
    """What a refresh writes: each side's mask, block counts and inverses, the budgets."""
    written = [x for side in masks.sides for x in (side.maskf, side.counts, side.inv_counts)]
    return [x.clone() for x in (*written, masks.budget) if x is not None]


def _poison(masks) -> None:
    for side in masks.sides:
        for x in (side.maskf, side.counts, side.inv_counts):
            x.fill_(-7)
    if masks.budget is not None:
        masks.budget.fill_(-7)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.sampled_from([96, 256, 300]),
       Nk=st.sampled_from([None, 70, 300]), sides=st.sampled_from(["keys", "queries", "both"]),
       H=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                    torch.float16, torch.float64]),
       kind=st.sampled_from(MASK_KINDS), budget=st.sampled_from(["per_row", "total"]),
       lengths=st.lists(st.lists(st.integers(0, 300), min_size=4, max_size=4), min_size=2,
                        max_size=4))
def test_the_c_refresh_writes_what_the_torch_steps_write(seed, N, Nk, sides, H, dtype, kind,
                                                          budget, lengths):
    """``native_replay.NativeMasks`` (one C call) against ``_Masks.refresh``'s torch steps:
    the same masks, block counts, inverses and per-sequence budgets, bit for bit, for
    every mask form and input dtype, sequences from empty to unpadded; self-attention
    (one mask) and cross-attention (keys of their own length ``Nk``, a key mask, a query
    mask or both)."""
    cross = Nk is not None or sides != "keys"
    Nk = N if Nk is None else Nk
    q, _, _ = make_qkv(seed, 2, H, N, 32, dtype=dtype)
    _, k, v = make_qkv(seed + 1, 2, H, Nk, 32, dtype=dtype)
    n = -(-max(N, Nk) // 32)
    kw = {"block_per_row": 2} if budget == "per_row" else {"num_blocks": 2 * n}

    def masks_of(lengths, least):
        keys = padding_mask([max(least, min(x, Nk)) for x in lengths[:2]], Nk, kind)
        # (a query mask is [B, Nq]: no SDPA form)
        queries = padding_mask([max(least, min(x, N)) for x in lengths[2:]], N,
                               "bool" if kind in ("additive", "bool4d") else kind)
        if not cross:
            return {"mask": keys, "query_mask": None}
        return {"mask": None if sides == "queries" else keys,
                "query_mask": None if sides == "keys" else queries}

    first = masks_of(lengths[0], 1)
    masks = _masked_plan(q, k, v, first["mask"], query_mask=first["query_mask"], **kw).masks
    assert masks.native, "the C refresh should read these masks and these inputs"
    for call in lengths[1:]:
        given = masks_of(call, 0)
        _poison(masks)
        assert masks.native.run(q, k, v, given) == 0
        from_c = _scratch(masks)
        _poison(masks)
        native, masks.native = masks.native, False
        try:
            assert masks.refresh(q, k, v, given)
        finally:
            masks.native = native
        for a, b in zip(from_c, _scratch(masks)):
            assert a.dtype == b.dtype and torch.equal(a, b)


def _every_other(t):
    """``t``'s values as every other element of the last dim of a wider tensor whose other
    elements are NaN (a view no run of memory holds alone)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "heads_last", "every_other"])
def test_the_c_refresh_sends_non_finite_padding_the_usual_way(dtype, layout):
    """A NaN or an infinity in a padded token of q, k or v, or in a real token between two
    padded ones, sends the call the usual way (which zeroes the padding in a copy); one
    in a real token before the padding does not (it reaches the output in both). Inputs
    contiguous, an attention layer's views, or every other element of a wider tensor
    (whose NaN between them is not the input's)."""
    B, H, N, D = 2, 3, 256, 32
    x = [t.to(dtype) for t in make_qkv(60, B, N, H, D)]  # (as [B, N, H, D])
    if layout == "heads_last":
        x = [t.transpose(1, 2) for t in x]
    else:
        x = [t.transpose(1, 2).contiguous() for t in x]
    if layout == "every_other":
        x = [_every_other(t) for t in x]
    real = torch.ones(B, N)
    real[1, 150:200] = 0
    real[1, 230:] = 0
    plan = _masked_plan(*x, real, block_per_row=2)
    native = plan.masks.native
    assert native
    assert native.run(*x, {"mask": real}) == 0
    for j in range(3):
        for value in (float("nan"), float("inf"), float("-inf")):
            for token, goes in ((160, 1), (210, 1), (255, 1), (100, 0), (40, 0)):
                dirty = [t.clone() if i == j else t for i, t in enumerate(x)]
                if layout == "heads_last":
                    dirty[j] = dirty[j].transpose(1, 2).contiguous().transpose(1, 2)
                if layout == "every_other":
                    dirty[j] = _every_other(dirty[j])
                dirty[j][1, H - 1, token, D - 1] = value
                assert native.run(*dirty, {"mask": real}) == goes, (j, value, token)
                if token < 150:  # (the other sequence's real tokens)
                    dirty[j][1, H - 1, token, D - 1] = 0
                    dirty[j][0, H - 1, 250, D - 1] = value
                    assert native.run(*dirty, {"mask": real}) == 0


@pytest.mark.parametrize("kind,bad,message", [
    ("float", 2.0, "mask must contain only 0"), ("float", float("nan"), "mask must contain"),
    ("int64", 3, "mask must contain only 0"), ("uint8", 255, "mask must contain only 0"),
    ("additive", 1.0, "additive"), ("additive", -1e4, "additive")])
def test_the_c_refresh_refuses_what_the_usual_path_refuses(kind, bad, message):
    """A replayed call whose mask holds a value the usual path refuses raises its error."""
    q, k, v = make_qkv(61, 2, 2, 256, 32)
    mask = padding_mask([256, 100], 256, kind)
    _masked_plan(q, k, v, mask, block_per_row=2)
    wrong = mask.clone()
    wrong.view(2, -1)[1, 120] = bad
    for call in (op, usual):
        with pytest.raises(ValueError, match=message):
            call(q, k, v, wrong, block_per_row=2)


def test_the_overflow_count_picks_the_tail():
    """One signature, inputs whose selection has overflow units (a row beyond its row
    unit's blocks) and inputs with none, in turn: each call is the usual path's."""
    mra_compile.clear_workspace()
    flat = make_qkv(3, 1, 2, 1024, 64)
    flat[0][:, :, :32] *= 0.01  # (query block 0's row: flat scores, many blocks)
    spread = make_qkv(4, 1, 2, 1024, 64)
    kw = dict(num_blocks=600, approx_mode="sparse")
    sel, _ = mra_compile.block_selection(*flat, None, **kw)
    assert sel[:, :, 0].sum(-1).max() > 16  # (beyond any row unit: overflow units)
    first = {}
    for name, x in [("flat", flat), ("spread", spread), ("flat", flat), ("spread", spread)]:
        out = check(*x, **kw)
        if name in first:
            assert torch.equal(out, first[name])
        first[name] = out
    (plan,) = [p for p in plans().values() if p is not None]
    assert len(plan.tails) >= 2


def test_plans_go_with_the_workspace(monkeypatch):
    """Plans hold views of the thread's scratch: they go when it is cleared or a buffer
    is replaced, and a limit on kept scratch (or other environment that picks kernels and
    limits) is part of the signature."""
    small, large = make_qkv(5, 1, 2, 128, 32), make_qkv(6, 2, 2, 512, 64)
    want = usual(*small, None, 12)
    for _ in range(2):
        assert torch.equal(op(*small, None, 12), want)
    assert plans()
    mra_compile.clear_workspace()
    assert not plans() and memory.WORKSPACE.kept_bytes() == 0
    assert torch.equal(op(*small, None, 12), want)
    op(*large, None, 40)  # (larger scratch: the small call's buffers are replaced)
    assert torch.equal(op(*small, None, 12), want)
    before = len(plans())
    monkeypatch.setenv(memory.WORKSPACE_ENV, "512")
    assert torch.equal(op(*small, None, 12), want)
    assert len(plans()) == before + 1
    monkeypatch.setenv(memory.WORKSPACE_ENV, "0")  # (nothing kept: nothing planned)
    mra_compile.clear_workspace()
    for _ in range(2):
        assert torch.equal(op(*small, None, 12), want)
    assert not any(plans().values())
    mra_compile.clear_workspace()


def test_calls_that_are_not_replayed(monkeypatch):
    """A gradient to compute, or the cache switched off (``MRA_COMPILE_LAUNCH_CACHE=0``):
    the usual path."""
    q, k, v = make_qkv(7, 1, 2, 256, 32)
    mra_compile.clear_workspace()
    monkeypatch.setenv(launch_cache.ENV, "0")
    for _ in range(2):
        op(q, k, v, None, 16)
    monkeypatch.delenv(launch_cache.ENV)
    out = op(q.requires_grad_(), k, v, None, 16)
    out.sum().backward()
    assert not any(plans().values())
    with torch.no_grad():
        op(q, k, v, None, 16)
    assert any(plans().values())


def test_threads_keep_their_own_plans():
    """Threads calling the same signatures at once: every output is the serial one."""
    inputs = [make_qkv(20 + i, 1, 2, 256, 64) for i in range(4)]
    serial = [usual(*x, None, 20) for x in inputs]
    errors, results = [], {}

    def work(t):
        try:
            for r in range(6):
                i = (t + r) % len(inputs)
                results[t, r] = (i, op(*inputs[i], None, 20))
        except Exception as e:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(results) == 18
    for i, out in results.values():
        assert torch.equal(out, serial[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_replay_the_usual_path(dtype):
    q, k, v = (x.to(dtype) for x in make_qkv(9, 1, 2, 256, 64))
    want = usual(q, k, v, None, 24, "full")
    for _ in range(3):
        assert torch.equal(op(q, k, v, None, 24, "full"), want)


def _native_plans() -> list:
    return [p.native for p in plans().values() if p is not None and p.native]


def test_replays_run_from_c_as_from_python(monkeypatch):
    """The replay from C (``native_replay``, the default) against the replay from Python
    (``MRA_COMPILE_NATIVE_REPLAY=0``) and the usual path, with the selection switching
    between counts of overflow units (tails) and between float32 and bf16 bits."""
    from mra_compile import native_replay

    assert native_replay.enabled(), native_replay.status()
    flat = make_qkv(3, 1, 2, 1024, 64)
    flat[0][:, :, :32] *= 0.01  # (overflow units, as above)
    spread = make_qkv(4, 1, 2, 1024, 64)
    kw = dict(num_blocks=600, approx_mode="sparse")
    for dtype in (torch.float32, torch.bfloat16):
        mra_compile.clear_workspace()
        cases = [tuple(x.to(dtype) for x in qkv) for qkv in (flat, spread)]
        want = [usual(*qkv, None, **kw) for qkv in cases]
        for switch in ("1", "0", "1"):
            monkeypatch.setenv(native_replay.ENV, switch)
            for _ in range(3):
                for qkv, w in zip(cases, want):
                    assert torch.equal(op(*qkv, None, **kw), w)
        assert len(_native_plans()) == 1  # (one signature from C, one from Python)
        assert sum(1 for p in plans().values() if p is not None and p.native is False) == 1


def test_a_failing_launch_from_c_replays_from_python(monkeypatch):
    """A launch that fails in the C replay (here: an argument of the wrong type, which
    the kernel rejects) leaves the call to the Python replay: the usual output."""
    from mra_compile import native_replay

    mra_compile.clear_workspace()
    q, k, v = make_qkv(11, 1, 2, 512, 64)
    want = usual(q, k, v, None, 40)
    for _ in range(2):
        assert torch.equal(op(q, k, v, None, 40), want)
    (native,) = _native_plans()
    native.plan.head[0].args[0] = native_replay.AnyValue(1, 0, 7)  # (an int where q goes)
    assert native.run(q, k, v, torch.empty_like(q)) == -1
    assert torch.equal(op(q, k, v, None, 40), want)


def test_without_the_c_library_replays_run_from_python(monkeypatch):
    """No C compiler (or the library failed to load): plans replay from Python."""
    from mra_compile import native_replay

    monkeypatch.setattr(native_replay, "_library", lambda: {"error": "no C compiler (test)"})
    mra_compile.clear_workspace()
    q, k, v = make_qkv(12, 1, 2, 256, 64)
    want = usual(q, k, v, None, 20)
    for _ in range(3):
        assert torch.equal(op(q, k, v, None, 20), want)
    assert not _native_plans() and any(plans().values())
    mra_compile.clear_workspace()
