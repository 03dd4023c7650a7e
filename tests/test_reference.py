"""Tests of the PyTorch oracle (mra_compile.reference) and the benchmark fallback.

Everything runs in float64 so that the spec's properties can be checked tightly.
"""

import functools
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# Make the repository root importable (for mra_compile) when run from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import make_qkv, n_blocks, padded_mask

from mra_compile.reference import exact_attention, mra2_reference
from mra_compile.tools.fallback import mra2_fallback

DT = torch.float64
FAST = settings(max_examples=30, deadline=None)

# Random q, k, v [B, H, N, D] drawn in float64, reproducible from seed.
make_qkv64 = functools.partial(make_qkv, dtype=DT, sample_dtype=DT)


def make_mask(seed, B, N, kind):
    """A [B, N] float64 0/1 mask: None, right padding, or random holes (>= 1 real token)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "right":
        return padded_mask(N, torch.randint(1, N + 1, (B,), generator=g), DT)
    mask = (torch.rand(B, N, generator=g) < 0.7).to(DT)
    mask[:, 0] = 1  # keep at least one real token per batch
    return mask


mask_kinds = st.sampled_from(["none", "right", "random"])
modes = st.sampled_from(["full", "sparse"])


@FAST
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 2),
       n=st.integers(1, 4), D=st.sampled_from([8, 16, 33]))
def test_full_all_blocks_is_exact_attention_without_mask(seed, B, H, n, D):
    N = 32 * n
    q, k, v = make_qkv64(seed, B, H, N, D)
    out = mra2_reference(q, k, v, num_blocks=n * n, approx_mode="full")
    torch.testing.assert_close(out, exact_attention(q, k, v), rtol=1e-5, atol=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 2),
       N=st.integers(1, 160), D=st.sampled_from([8, 16, 33]),
       kind=st.sampled_from(["right", "random"]))
def test_full_all_blocks_is_exact_attention_with_mask(seed, B, H, N, D, kind):
    q, k, v = make_qkv64(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    n = n_blocks(N)
    out = mra2_reference(q, k, v, mask, num_blocks=n * n, approx_mode="full")
    expected = exact_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # Padded queries are exactly zero.
    assert torch.all(out[mask[:, None, :].expand(B, H, N) == 0] == 0)


@FAST
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 150), D=st.sampled_from([8, 16]))
def test_unmasked_padding_to_block_multiple_is_exact(seed, N, D):
    # N not a multiple of 32 without a mask: the internal padding acts as masked keys.
    q, k, v = make_qkv64(seed, 1, 2, N, D)
    n = n_blocks(N)
    out = mra2_reference(q, k, v, num_blocks=n * n, approx_mode="full")
    torch.testing.assert_close(out, exact_attention(q, k, v), rtol=1e-5, atol=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 2),
       N=st.integers(1, 200), D=st.sampled_from([8, 16]), mode=modes,
       kind=st.sampled_from(["right", "random"]), frac=st.floats(0.05, 1.0),
       f=st.integers(0, 2), g=st.integers(0, 3))
def test_padding_values_do_not_matter(seed, B, H, N, D, mode, kind, frac, f, g):
    q, k, v = make_qkv64(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    n = n_blocks(N)
    kw = {"num_blocks": max(1, int(frac * n * n)), "approx_mode": mode,
          "initial_prior_first_n_blocks": f, "initial_prior_diagonal_n_blocks": g}
    out = mra2_reference(q, k, v, mask, **kw)

    # Replace every padded token's q, k, v with large garbage.
    pad = (mask == 0)[:, None, :, None]
    garbage = make_qkv64(seed + 7, B, H, N, D, scale=100.0)
    q2, k2, v2 = (torch.where(pad, junk + 37, x) for x, junk in zip((q, k, v), garbage))
    out2 = mra2_reference(q2, k2, v2, mask, **kw)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@FAST
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), H=st.integers(1, 3),
       N=st.integers(1, 150), D=st.sampled_from([8, 16]), mode=modes, kind=mask_kinds,
       frac=st.floats(0.05, 1.0), data=st.data())
def test_rows_are_independent(seed, B, H, N, D, mode, kind, frac, data):
    q, k, v = make_qkv64(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    n = n_blocks(N)
    kw = {"num_blocks": max(1, int(frac * n * n)), "approx_mode": mode}
    out = mra2_reference(q, k, v, mask, **kw)

    # Permute batches (with their masks) and heads.
    pb = torch.tensor(data.draw(st.permutations(range(B))))
    ph = torch.tensor(data.draw(st.permutations(range(H))))
    perm = lambda x: x[pb][:, ph]  # noqa: E731
    pmask = None if mask is None else mask[pb]
    out_p = mra2_reference(perm(q), perm(k), perm(v), pmask, **kw)
    torch.testing.assert_close(out_p, perm(out), rtol=1e-12, atol=1e-12)

    # Without a mask, any permutation of the flattened (batch, head) rows works.
    if mask is None:
        rows = torch.tensor(data.draw(st.permutations(range(B * H))))
        flat = lambda x: x.reshape(1, B * H, N, D)[:, rows]  # noqa: E731
        out_f = mra2_reference(flat(q), flat(k), flat(v), None, **kw)
        torch.testing.assert_close(out_f, flat(out), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), H=st.integers(1, 3),
       N=st.integers(32, 600), D=st.sampled_from([8, 16, 33, 64]), mode=modes,
       kind=mask_kinds, frac=st.floats(0.0, 1.2), f=st.integers(0, 3), g=st.integers(0, 5))
def test_fallback_matches_reference(seed, B, H, N, D, mode, kind, frac, f, g):
    q, k, v = make_qkv64(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    n = n_blocks(N)
    kw = {"num_blocks": max(1, int(frac * n * n)), "approx_mode": mode,
          "initial_prior_first_n_blocks": f, "initial_prior_diagonal_n_blocks": g}
    expected = mra2_reference(q, k, v, mask, **kw)
    got = mra2_fallback(q, k, v, mask, **kw)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 130), D=st.sampled_from([8, 16]),
       mode=modes, kind=mask_kinds, frac=st.floats(0.1, 1.0))
def test_fallback_gradients_match_reference(seed, N, D, mode, kind, frac):
    q, k, v = make_qkv64(seed, 2, 2, N, D)
    mask = make_mask(seed, 2, N, kind)
    n = n_blocks(N)
    kw = {"num_blocks": max(1, int(frac * n * n)), "approx_mode": mode}
    grads = []
    for fn in (mra2_reference, mra2_fallback):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*xs, mask, **kw)
        (out * torch.cos(out)).sum().backward()  # a non-trivial upstream gradient
        grads.append([x.grad for x in xs])
    for g_ref, g_fb in zip(*grads):
        assert torch.isfinite(g_ref).all()
        torch.testing.assert_close(g_fb, g_ref, rtol=1e-9, atol=1e-9)


@FAST
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 200), D=st.sampled_from([8, 16]), mode=modes, kind=mask_kinds,
       frac=st.floats(0.0, 1.0), f=st.integers(0, 2), g=st.integers(0, 3))
def test_forced_selection_reproduces_output(seed, B, H, N, D, mode, kind, frac, f, g):
    q, k, v = make_qkv64(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    n = n_blocks(N)
    kw = {"num_blocks": max(1, int(frac * n * n)), "approx_mode": mode,
          "initial_prior_first_n_blocks": f, "initial_prior_diagonal_n_blocks": g}
    out, (selected, high_mask) = mra2_reference(q, k, v, mask, return_selection=True, **kw)
    assert selected.shape == high_mask.shape == (B, H, n, n)
    assert selected.dtype == high_mask.dtype == torch.bool
    assert (selected.sum(dim=(-1, -2)) == min(kw["num_blocks"], n * n)).all()
    assert (high_mask | ~selected).all()  # every selected block is high resolution
    if mode == "sparse":
        assert torch.equal(high_mask, selected)
    out2 = mra2_reference(q, k, v, mask, selection=(selected, high_mask), **kw)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_unknown_mode_raises():
    q, k, v = make_qkv64(0, 1, 1, 32, 8)
    with pytest.raises(ValueError):
        mra2_reference(q, k, v, num_blocks=1, approx_mode="dense")
    with pytest.raises(ValueError):
        mra2_fallback(q, k, v, num_blocks=1, approx_mode="dense")


def test_output_keeps_input_dtype_and_shape():
    q, k, v = make_qkv64(0, 2, 3, 70, 16)
    q, k, v = q.float(), k.float(), v.float()
    for fn in (mra2_reference, mra2_fallback):
        out = fn(q, k, v, num_blocks=3, approx_mode="full")
        assert out.shape == (2, 3, 70, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_gradcheck(mode, masked):
    # The stabilisers are detached; they cancel mathematically (up to the 1e-6 terms),
    # so finite differences must agree with autograd.
    q, k, v = (x.requires_grad_() for x in make_qkv64(3, 1, 2, 40, 4))
    mask = make_mask(3, 1, 40, "random") if masked else None
    fn = lambda a, b, c: mra2_reference(a, b, c, mask, num_blocks=3, approx_mode=mode,  # noqa: E731
                                        block_size=8)
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- cross-attention
# The oracle's cross-attention (docs/spec.md, "Extensions"): the op does not take Nk != Nq
# yet; these hold the reference the kernels will be tested against.


def _cross_inputs(seed, B, H, Nq, Nk, D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64) for _ in range(2))
    kmask = (torch.arange(Nk)[None, :] < torch.randint(1, Nk + 1, (B,), generator=g)[:, None])
    qmask = (torch.arange(Nq)[None, :] < torch.randint(1, Nq + 1, (B,), generator=g)[:, None])
    return q, k, v, kmask.double(), qmask.double()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 2),
       Nq=st.integers(1, 130), Nk=st.integers(1, 130), D=st.sampled_from([4, 16]),
       scale=st.one_of(st.none(), st.floats(0.05, 0.5)))
def test_cross_attention_with_every_block_is_sdpa(seed, B, H, Nq, Nk, D, scale):
    """Within 1e-5 where logits are of unit size: the spec's +1e-6 in the denominator is
    relative to the high-resolution sum scaled by exp(-(R - m_t)), which large logits
    can make small (then the spec itself, not the code, differs from SDPA)."""
    q, k, v, kmask, qmask = _cross_inputs(seed, B, H, Nq, Nk, D)
    q, k = q * 0.5, k * 0.5
    nq, nk = -(-Nq // 32), -(-Nk // 32)
    out = mra2_reference(q, k, v, kmask, query_mask=qmask, num_blocks=nq * nk, scale=scale)
    assert out.shape == q.shape
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=kmask.bool()[:, None, None, :], scale=scale)
    keep = qmask.bool()[:, None, :, None]
    want = torch.where(keep, want, torch.zeros_like(want))
    assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert torch.equal(out, torch.where(keep, out, torch.zeros_like(out)))  # padded queries 0
    assert torch.allclose(exact_attention(q, k, v, kmask, scale=scale, query_mask=qmask), want,
                          rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 130), mode=st.sampled_from(["full", "sparse"]),
       nb=st.integers(1, 20))
def test_cross_attention_with_equal_lengths_and_one_mask_is_self_attention(seed, N, mode, nb):
    q, k, v, kmask, _ = _cross_inputs(seed, 2, 2, N, N, 8)
    kw = dict(num_blocks=nb, approx_mode=mode, initial_prior_diagonal_n_blocks=1)
    assert torch.equal(mra2_reference(q, k, v, kmask, query_mask=kmask, **kw),
                       mra2_reference(q, k, v, kmask, **kw))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), Nq=st.integers(1, 100), Nk=st.integers(1, 100),
       mode=st.sampled_from(["full", "sparse"]), nb=st.integers(1, 12))
def test_cross_attention_padding_never_reaches_real_outputs(seed, Nq, Nk, mode, nb):
    q, k, v, kmask, qmask = _cross_inputs(seed, 2, 2, Nq, Nk, 8)
    kw = dict(num_blocks=nb, approx_mode=mode)
    out = mra2_reference(q, k, v, kmask, query_mask=qmask, **kw)
    nan_q = torch.where(qmask.bool()[:, None, :, None], q, torch.nan)
    nan_k, nan_v = (torch.where(kmask.bool()[:, None, :, None], x, torch.nan) for x in (k, v))
    assert torch.equal(mra2_reference(nan_q, nan_k, nan_v, kmask, query_mask=qmask, **kw), out)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_float16_inputs_run_in_float16(mode):
    """The reference in float16 (the GPU check times it in the input dtype): the spec's
    -1e5 for a query without pairs is beyond float16, and creating it raised."""
    q, k, v = make_qkv(3, 1, 2, 96, 16, dtype=torch.float64)
    n = n_blocks(96)
    mask = padded_mask(96, [70])
    want = mra2_reference(q, k, v, mask.double(), num_blocks=n * n, approx_mode=mode)
    got = mra2_reference(q.half(), k.half(), v.half(), mask.half(), num_blocks=n * n,
                         approx_mode=mode)
    assert got.dtype == torch.float16
    real = mask.bool()[:, None, :, None].expand_as(want)
    err = (got.double() - want).abs()[real].max() / want.abs()[real].max()
    assert err < 2e-3, err
