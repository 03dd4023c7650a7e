"""Cross-attention (issue 12, docs/spec.md "Extensions"): keys and values of their own
length Nk, the key padding in ``mask`` ([B, Nk]) and the queries' in ``query_mask``
([B, Nq]); against the float64 reference and ``scaled_dot_product_attention``."""
import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL_FP32, as64, n_blocks, padded_mask, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile.reference import mra2_reference

MODES = st.sampled_from(["full", "sparse"])
SCALES = st.one_of(st.none(), st.sampled_from([0.05, 0.3, 2.5]))
FORWARD_RTOL = {torch.float32: RTOL_FP32, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BACKWARD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _grads(fn, *xs, grad_out):
    """(out, [grads]) of ``fn`` on leaves copied from ``xs``."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _qkv(g, B, H, Hkv, Nq, Nk, D, dtype=torch.float32):
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _key_mask(keep, form):
    """keep [B, Nk] bool as the op takes it: 2-d float, SDPA bool or additive."""
    B, Nk = keep.shape
    return {"2d": keep.float(), "bool": keep[:, None, None, :],
            "additive": torch.zeros(B, 1, 1, Nk).masked_fill(~keep[:, None, None, :],
                                                             float("-inf"))}[form]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), Hkv=st.integers(1, 2),
       group=st.sampled_from([1, 2]), Nq=st.integers(1, 140), Nk=st.integers(1, 140),
       D=st.sampled_from([8, 24]), mode=MODES, scale=SCALES,
       form=st.sampled_from([None, "2d", "bool", "additive"]), query_masked=st.booleans(),
       budget=st.sampled_from(["block_per_row", "num_blocks"]), first=st.integers(0, 2),
       diagonal=st.integers(0, 2),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), data=st.data())
def test_every_argument_together_matches_the_reference(seed, B, Hkv, group, Nq, Nk, D, mode,
                                                       scale, form, query_masked, budget, first,
                                                       diagonal, dtype, data):
    """Nq != Nk (mostly), scale, grouped heads, key and query padding, either budget,
    priors, both modes, each dtype: outputs and gradients against the float64 reference
    with the op's own selection."""
    H = Hkv * group
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(g, B, H, Hkv, Nq, Nk, D, dtype)
    keep = padded_mask(Nk, [data.draw(st.integers(1, Nk)) for _ in range(B)]).bool()
    mask = None if form is None else _key_mask(keep, form)
    query_mask = None
    if query_masked:
        query_mask = padded_mask(Nq, [data.draw(st.integers(1, Nq)) for _ in range(B)])
    kw = dict(approx_mode=mode, scale=scale, enable_gqa=True,
              initial_prior_first_n_blocks=first, initial_prior_diagonal_n_blocks=diagonal)
    if budget == "block_per_row":
        kw["block_per_row"] = data.draw(st.integers(1, 3))
    else:
        kw["num_blocks"] = data.draw(st.integers(1, n_blocks(Nq) * n_blocks(Nk) + 2))
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    out, grads = _grads(lambda *x: mra_compile.mra_attention(*x, mask, query_mask=query_mask,
                                                             **kw), q, k, v, grad_out=grad_out)
    assert out.shape == q.shape and out.dtype == dtype
    assert [x.shape for x in grads] == [q.shape, k.shape, v.shape]
    sel = mra_compile.block_selection(q, k, v, mask, query_mask=query_mask, **kw)
    assert sel[0].shape == (B, H, n_blocks(Nq), n_blocks(Nk))
    ref, ref_grads = _grads(
        lambda *x: mra2_reference(*x, None if mask is None else keep.double(),
                                  query_mask=as64(query_mask), selection=sel, **kw),
        *(as64(x) for x in (q, k, v)), grad_out=grad_out)
    assert rel_err(out, ref) <= FORWARD_RTOL[dtype]
    size = max(x.abs().max().item() for x in ref_grads) or 1.0
    for a, r in zip(grads, ref_grads):
        assert (a.double() - r).abs().max().item() / size <= BACKWARD_RTOL[dtype]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_selection_is_the_references_top_k_over_the_nq_by_nk_grid(seed, mode):
    """Without ties, the op selects exactly the reference's blocks of the nq x nk grid:
    the extra blocks of the shorter side (padding to one length inside) never take a real
    block's place. Ties: every real block row has one score S = 0 (its maximum), so the
    budget starts above the number of block rows; and it stays within the blocks with a
    real query and key (the rest tie at the -1e4 penalty). No priors."""
    g = torch.Generator().manual_seed(seed)
    Nq, Nk = [(70, 200), (200, 70), (33, 97), (130, 64), (64, 64), (5, 150)][seed]
    q, k, v = _qkv(g, 2, 2, 2, Nq, Nk, 16)
    key_lengths, query_lengths = [Nk, max(1, Nk - 20)], [max(1, Nq - 9), Nq]
    mask = padded_mask(Nk, key_lengths)
    query_mask = padded_mask(Nq, query_lengths)
    rows = n_blocks(Nq)
    real = min(n_blocks(a) * n_blocks(c) for a, c in zip(query_lengths, key_lengths))
    assert real > rows + 1
    for num_blocks in (rows + 1, (rows + 1 + real) // 2, real):
        kw = dict(num_blocks=num_blocks, approx_mode=mode)
        sel, high = mra_compile.block_selection(q, k, v, mask, query_mask=query_mask, **kw)
        _, (ref_sel, ref_high) = mra2_reference(*(as64(x) for x in (q, k, v, mask)),
                                                query_mask=as64(query_mask),
                                                return_selection=True, **kw)
        assert torch.equal(sel, ref_sel)
        assert torch.equal(high, ref_high)


@pytest.mark.parametrize("Nq, Nk", [(40, 100), (100, 40), (64, 96), (1, 70), (70, 1)])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_all_blocks_full_mode_is_sdpa(Nq, Nk, Hkv):
    """Every block kept, full mode: SDPA with the same scale, the key padding as a
    boolean mask and grouped heads expanded (fp32 within 1e-5); padded queries are 0.
    Logits of moderate size (std 0.4): the match is exact up to the 1e-6 terms, which
    weigh e^(R - m_t) where a block's mean logit R exceeds a query's maximum m_t (spec,
    "Properties"; with Nk = 1, R - m_t is the query's distance from its block's mean)."""
    g = torch.Generator().manual_seed(Nq * Nk + Hkv)
    q, k, v = _qkv(g, 2, 4, Hkv, Nq, Nk, 16)
    q = q * 0.5
    keep = padded_mask(Nk, [Nk, max(1, Nk // 2)], torch.bool)
    query_mask = padded_mask(Nq, [Nq, max(1, Nq - 7)])
    out = mra_compile.mra_attention(q, k, v, keep, num_blocks=n_blocks(Nq) * n_blocks(Nk),
                                    scale=0.2, enable_gqa=True, query_mask=query_mask)
    ref = F.scaled_dot_product_attention(*(x.double() for x in (q, k, v)),
                                         attn_mask=keep[:, None, None, :], scale=0.2,
                                         enable_gqa=True)
    assert rel_err(out, ref * query_mask[:, None, :, None]) <= RTOL_FP32
    # The same through the op's schema (query_mask its last argument).
    again = torch.ops.mra.attention(q, k, v, keep, n_blocks(Nq) * n_blocks(Nk), scale=0.2,
                                    enable_gqa=True, query_mask=query_mask)
    assert torch.equal(again, out)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_gradcheck_float64(mode):
    g = torch.Generator().manual_seed(7)
    q, k, v = (x.double().requires_grad_() for x in _qkv(g, 1, 2, 2, 40, 72, 8))
    mask = padded_mask(72, [60], torch.float64)
    query_mask = padded_mask(40, [35], torch.float64)

    def fn(q, k, v):
        return mra_compile.mra_attention(q, k, v, mask, num_blocks=4, approx_mode=mode,
                                         query_mask=query_mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), Hkv=st.integers(1, 2), group=st.sampled_from([2, 4]),
       Nq=st.integers(1, 120), Nk=st.integers(1, 120), mode=MODES, bpr=st.integers(1, 4))
def test_gqa_equals_the_op_on_expanded_heads(seed, Hkv, group, Nq, Nk, mode, bpr):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(g, 2, Hkv * group, Hkv, Nq, Nk, 16)
    mask = padded_mask(Nk, [Nk, max(1, Nk // 3)])
    query_mask = padded_mask(Nq, [max(1, Nq // 2), Nq])
    kw = dict(block_per_row=bpr, approx_mode=mode, query_mask=query_mask)
    grad_out = torch.randn(q.shape, generator=g)
    out, grads = _grads(lambda *x: mra_compile.mra_attention(*x, mask, enable_gqa=True, **kw),
                        q, k, v, grad_out=grad_out)
    want, want_grads = _grads(
        lambda x, y, z: mra_compile.mra_attention(x, y.repeat_interleave(group, 1),
                                                  z.repeat_interleave(group, 1), mask, **kw),
        q, k, v, grad_out=grad_out)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    for a, w in zip(grads, want_grads):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-6 * max(1.0, w.abs().max().item()))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), Nq=st.integers(2, 130), Nk=st.integers(2, 130),
       mode=MODES, data=st.data())
def test_nan_in_padded_positions_changes_no_real_output(seed, Nq, Nk, mode, data):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(g, 2, 2, 2, Nq, Nk, 16)
    mask = padded_mask(Nk, [Nk, data.draw(st.integers(1, Nk - 1))])
    query_mask = padded_mask(Nq, [data.draw(st.integers(1, Nq - 1)), Nq])
    kw = dict(num_blocks=data.draw(st.integers(1, n_blocks(Nq) * n_blocks(Nk))),
              approx_mode=mode, query_mask=query_mask)
    clean, clean_grads = _grads(lambda *x: mra_compile.mra_attention(*x, mask, **kw), q, k, v,
                                grad_out=torch.ones(q.shape))
    qn = q.masked_fill(query_mask[:, None, :, None] == 0, float("nan"))
    kn, vn = (x.masked_fill(mask[:, None, :, None] == 0, float("nan")) for x in (k, v))
    dirty, dirty_grads = _grads(lambda *x: mra_compile.mra_attention(*x, mask, **kw),
                                qn, kn, vn, grad_out=torch.ones(q.shape))
    assert torch.equal(dirty, clean)
    assert (dirty[query_mask[:, None, :, None].expand_as(dirty) == 0] == 0).all()
    for a, w in zip(dirty_grads, clean_grads):
        assert torch.equal(a, w)
    assert (clean_grads[0][query_mask[:, None, :, None].expand_as(q) == 0] == 0).all()
    assert (clean_grads[1][mask[:, None, :, None].expand_as(k) == 0] == 0).all()


def test_a_per_query_shift_changes_nothing_with_all_blocks():
    """Every logit of query t shifted by -40 (an extra head dim: q_t gets -40 / scale, every
    key 1): softmax ignores it, and so does the op with all blocks kept (fp32, 1e-5)."""
    g = torch.Generator().manual_seed(3)
    Nq, Nk, D = 50, 90, 16
    q, k, v = _qkv(g, 2, 2, 2, Nq, Nk, D)
    mask = padded_mask(Nk, [Nk, 61])
    query_mask = padded_mask(Nq, [41, Nq])
    scale = 1 / D ** 0.5
    kw = dict(num_blocks=n_blocks(Nq) * n_blocks(Nk), scale=scale, query_mask=query_mask)
    plain = mra_compile.mra_attention(F.pad(q, (0, 1)), F.pad(k, (0, 1)), F.pad(v, (0, 1)),
                                      mask, **kw)
    shifted = mra_compile.mra_attention(F.pad(q, (0, 1), value=-40 / scale),
                                        F.pad(k, (0, 1), value=1.0), F.pad(v, (0, 1)), mask, **kw)
    assert rel_err(shifted, plain) <= RTOL_FP32


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), Nq=st.integers(1, 120), Nk=st.integers(1, 120),
       extra_q=st.integers(1, 100), extra_k=st.integers(1, 100), bpr=st.integers(1, 4),
       mode=MODES)
def test_block_per_row_a_pair_alone_equals_it_in_a_padded_batch(seed, Nq, Nk, extra_q, extra_k,
                                                                 bpr, mode):
    """docs/spec.md, "Per-sequence budget": the budget counts the sequence's real queries,
    so padding either side of the batch (NaN there) changes nothing."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(g, 1, 2, 2, Nq, Nk, 16)
    kw = dict(block_per_row=bpr, approx_mode=mode)
    alone = mra_compile.mra_attention(q, k, v, **kw)
    Mq, Mk = Nq + extra_q, Nk + extra_k
    qb = torch.cat([F.pad(q, (0, 0, 0, extra_q), value=float("nan")),
                    torch.randn(1, 2, Mq, 16, generator=g)])
    kb, vb = (torch.cat([F.pad(x, (0, 0, 0, extra_k), value=float("nan")),
                         torch.randn(1, 2, Mk, 16, generator=g)]) for x in (k, v))
    batched = mra_compile.mra_attention(qb, kb, vb, padded_mask(Mk, [Nk, Mk]),
                                        query_mask=padded_mask(Mq, [Nq, Mq]), **kw)
    torch.testing.assert_close(batched[:1, :, :Nq], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_self_attention_with_its_own_query_mask(mode):
    """Nq == Nk with a query mask other than the key mask: each side's padding is its own."""
    g = torch.Generator().manual_seed(11)
    q, k, v = _qkv(g, 2, 2, 2, 100, 100, 16)
    mask, query_mask = padded_mask(100, [100, 70]), padded_mask(100, [60, 100])
    kw = dict(num_blocks=6, approx_mode=mode)
    sel = mra_compile.block_selection(q, k, v, mask, query_mask=query_mask, **kw)
    out = mra_compile.mra_attention(q, k, v, mask, query_mask=query_mask, **kw)
    ref = mra2_reference(*(as64(x) for x in (q, k, v, mask)), query_mask=as64(query_mask),
                         selection=sel, **kw)
    assert rel_err(out, ref) <= RTOL_FP32
    # The same mask on both sides is self-attention with one mask.
    same = mra_compile.mra_attention(q, k, v, mask, query_mask=mask, **kw)
    assert torch.allclose(same, mra_compile.mra_attention(q, k, v, mask, **kw), atol=1e-6)


def test_compiles_fullgraph():
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(g, 2, 2, 2, 48, 100, 16)
    mask, query_mask = padded_mask(100, [100, 64]), padded_mask(48, [48, 30])

    def fn(q, k, v):
        return mra_compile.mra_attention(q, k, v, mask, block_per_row=2, query_mask=query_mask)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=0, atol=0)


def test_bad_cross_attention_inputs_name_the_argument():
    q, k, v = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 70, 8), torch.randn(2, 2, 70, 8)
    with pytest.raises(ValueError, match=r"v must have shape \[B, H, Nk, D\]"):
        mra_compile.mra_attention(q, k, torch.randn(2, 2, 69, 8))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, Nk\] = \[2, 70\]"):
        mra_compile.mra_attention(q, k, v, torch.ones(2, 40))
    with pytest.raises(ValueError, match=r"query_mask must have shape \[B, Nq\] = \[2, 40\]"):
        mra_compile.mra_attention(q, k, v, query_mask=torch.ones(2, 70))
    with pytest.raises(ValueError, match="query_mask must contain only 0"):
        mra_compile.mra_attention(q, k, v, query_mask=torch.full((2, 40), 0.5))
    with pytest.raises(TypeError, match="query_mask must be a torch.Tensor"):
        mra_compile.mra_attention(q, k, v, query_mask=[[1] * 40] * 2)
    with pytest.raises(ValueError, match="k: the key length Nk must be >= 1"):
        mra_compile.mra_attention(q, k[:, :, :0], v[:, :, :0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_where_the_softmax_is_peaky(dtype):
    """Found by the test above (scale 2.5, one real query): with D_t = g . out taken from the
    rounded half-precision output, g . v - D_t cancels and dk came out 120% off its own
    size (5% of the largest gradient). Each gradient within the dtype's tolerance of its
    own largest entry."""
    g = torch.Generator().manual_seed(1746134)
    q, k, v = _qkv(g, 1, 1, 1, 5, 57, 24, dtype)
    query_mask = padded_mask(5, [1])
    kw = dict(approx_mode="full", scale=2.5, block_per_row=1)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    _, grads = _grads(lambda *x: mra_compile.mra_attention(*x, None, query_mask=query_mask, **kw),
                      q, k, v, grad_out=grad_out)
    sel = mra_compile.block_selection(q, k, v, None, query_mask=query_mask, **kw)
    _, ref_grads = _grads(lambda *x: mra2_reference(*x, None, query_mask=as64(query_mask),
                                                    selection=sel, **kw),
                          *(as64(x) for x in (q, k, v)), grad_out=grad_out)
    for a, r in zip(grads, ref_grads):
        assert (a.double() - r).abs().max() <= BACKWARD_RTOL[dtype] * r.abs().max()
