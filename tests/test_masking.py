"""Padding as docs/spec.md now defines it: replaced by selection (step 1, property P2) and
left out of both maxima R and m_t (steps 2 and 4, "Deviation", property P3), in the op,
its gradients and the reference."""
import math

import pytest
import torch
from conftest import make_qkv, n_blocks, padded_mask
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile.reference import mra2_reference

MODES = st.sampled_from(["full", "sparse"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), H=st.integers(1, 2),
       N=st.integers(2, 160), D=st.sampled_from([8, 16, 40]), mode=MODES,
       poison=st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30]),
       data=st.data())
def test_padding_values_never_reach_real_outputs_or_gradients(seed, B, H, N, D, mode, poison,
                                                              data):
    q, k, v = make_qkv(seed, B, H, N, D)
    lengths = torch.tensor([data.draw(st.integers(1, N - 1)) for _ in range(B)])
    mask = padded_mask(N, lengths)
    kw = dict(num_blocks=data.draw(st.integers(1, n_blocks(N) ** 2)), approx_mode=mode)
    pad = (mask == 0)[:, None, :, None].expand(B, H, N, D)

    def run(x, y, z):
        x, y, z = (t.clone().requires_grad_() for t in (x, y, z))
        out = mra_compile.mra_attention(x, y, z, mask, **kw)
        out.square().sum().backward()
        return out.detach(), [t.grad for t in (x, y, z)]

    clean, clean_grads = run(q, k, v)
    poisoned, grads = run(*(x.masked_fill(pad, poison) for x in (q, k, v)))
    assert torch.equal(poisoned, clean)
    for g, g0 in zip(grads, clean_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g0, rtol=0, atol=0)
    ref = mra2_reference(*(x.masked_fill(pad, poison).double() for x in (q, k, v)),
                         mask.double(), selection=mra_compile.block_selection(q, k, v, mask, **kw),
                         **kw)
    assert torch.isfinite(ref).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(33, 200), extra=st.integers(1, 300),
       mode=MODES, data=st.data())
def test_a_sequence_alone_and_padded_in_a_batch_agree(seed, N, extra, mode, data):
    """Effect (a) of the deviation: R over real key blocks only, so padding cannot shift the
    scores S, the selection or the output (same num_blocks on both sides)."""
    g = torch.Generator().manual_seed(seed)
    H, D = 2, 16
    # Coarse logits all below 0: where the padding's 0 used to become the maximum.
    q = torch.randn(1, H, N, D, generator=g) - 2.0
    k = torch.randn(1, H, N, D, generator=g) + 2.0
    v = torch.randn(1, H, N, D, generator=g)
    # Every block row's best block scores exactly 0 (S = L - R): a budget of at least n
    # takes all of them, so no tie decides the selection.
    num_blocks = data.draw(st.integers(n_blocks(N), n_blocks(N) ** 2))
    alone = mra_compile.mra_attention(q, k, v, num_blocks=num_blocks, approx_mode=mode)
    M = N + extra
    qb, kb, vb = (torch.cat([torch.nn.functional.pad(x, (0, 0, 0, extra)),
                             torch.randn(1, H, M, D, generator=g)]) for x in (q, k, v))
    mask = padded_mask(M, torch.tensor([N, M]))
    batched = mra_compile.mra_attention(qb, kb, vb, mask, num_blocks=num_blocks,
                                        approx_mode=mode)
    sel_alone = mra_compile.block_selection(q, k, v, num_blocks=num_blocks, approx_mode=mode)[0]
    sel_batch = mra_compile.block_selection(qb, kb, vb, mask, num_blocks=num_blocks,
                                            approx_mode=mode)[0]
    n = n_blocks(N)
    assert torch.equal(sel_batch[:1, :, :n, :n], sel_alone)
    torch.testing.assert_close(batched[:1, :, :N], alone, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(40, 160), offset=st.sampled_from([50.0, 2e3, 3e4]),
       mode=MODES, data=st.data())
def test_a_per_query_offset_changes_nothing_with_padding(seed, N, offset, mode, data):
    """P3 with padding, all blocks kept (effect (b) of the deviation): adding the same
    constant to every logit of queries (one query in "sparse" mode; a whole query block
    in "full" mode, whose coarse maximum R moves with it) changes no output."""
    g = torch.Generator().manual_seed(seed)
    H, D = 2, 16
    q, k, v = (torch.randn(1, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    k[..., 0] = 1.0  # k . u = 1 for every key, u = e_0
    mask = padded_mask(N, torch.tensor([data.draw(st.integers(2, N - 1))]))
    real = int(mask.sum())
    block = data.draw(st.integers(0, (real - 1) // 32))
    rows = range(block * 32, min(block * 32 + 32, real))
    if mode == "sparse":
        rows = [data.draw(st.sampled_from(list(rows)))]
    shifted = q.clone()
    for t in rows:
        shifted[:, :, t, 0] -= offset * math.sqrt(D)  # every logit of query t: -offset
    kw = dict(num_blocks=n_blocks(N) ** 2, approx_mode=mode)
    before = mra_compile.mra_attention(q, k, v, mask, **kw)
    after = mra_compile.mra_attention(shifted, k, v, mask, **kw)
    # (float64; the pooled q̂ divides by c + 1e-6, so R moves by the offset times
    # c / (c + 1e-6): exact only up to ~1e-8 relative at the largest offset)
    torch.testing.assert_close(after, before, rtol=1e-7, atol=1e-7)
    ref = mra2_reference(shifted, k, v, mask.double(), **kw)
    torch.testing.assert_close(ref, before, rtol=1e-7, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), N=st.integers(2, 130),
       heads_last=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       poison=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
       data=st.data())
def test_padding_of_any_pattern_is_checked_where_it_lies(seed, B, N, heads_last, dtype, poison,
                                                         data):
    """``inputs.clean_padding`` on the CPU: padding anywhere (holes, both ends, nothing
    padded), q, k, v contiguous or transposed views of [B, N, H, D]. A tensor whose padded
    tokens are finite is handed back as it is (no copy; large float16 values included:
    their sum is taken in float32), one with a non-finite padded token as a copy with
    every padded token 0 and the rest untouched."""
    from mra_compile.inputs import clean_padding

    H, D = 2, 8
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, N, generator=g) < data.draw(st.floats(0.2, 1.0))
    keep[:, data.draw(st.integers(0, N - 1))] = True
    x = (torch.rand(B, N, H, D, generator=g) * 6e4).to(dtype)  # (near float16's largest)
    padded = [(b, t) for b in range(B) for t in range(N) if not keep[b, t]]
    if poison is not None and padded:
        b, t = padded[data.draw(st.integers(0, len(padded) - 1))]
        x[b, t, data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, D - 1))] = poison
    x = x.transpose(1, 2) if heads_last else x.transpose(1, 2).contiguous()
    (cleaned,) = clean_padding((x,), keep, True)
    if poison is None or not padded:
        assert cleaned is x
    else:
        assert cleaned is not x
        expected = x.masked_fill(~keep[:, None, :, None], 0)
        assert torch.equal(cleaned, expected)


MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("cross", [False, True])
def test_every_mask_dtype_gives_the_float_mask_s_output(cross):
    """A 0/1 mask of any dtype gives what the float32 mask gives, first calls and replays
    (whose C refresh reads bool, uint8, int8, int32, int64, float32 and float64 masks;
    int16, float16 and bfloat16 take the torch steps); a value other than 0 and 1 is
    refused with the same message in each."""
    q, k, v = make_qkv(90, 2, 2, 160, 32)
    real = torch.arange(160)[None, :] < torch.tensor([160, 70])[:, None]
    kw = dict(block_per_row=2)
    if cross:  # (a query mask too: both sides from masks of this dtype)
        kw["query_mask"] = real.float()
    want = torch.ops.mra.attention(q, k, v, real.float(), **kw)
    for dtype in MASK_DTYPES:
        mask = real.to(dtype)
        if cross:
            kw["query_mask"] = real.to(dtype)
        for _ in range(3):  # (the usual path, then the launch cache's replays)
            assert torch.equal(torch.ops.mra.attention(q, k, v, mask, **kw), want), dtype
        if dtype != torch.bool:
            bad = mask.clone()
            bad[1, 5] = 3
            with pytest.raises(ValueError, match="mask must contain only 0 .* found 3"):
                torch.ops.mra.attention(q, k, v, bad, **kw)
