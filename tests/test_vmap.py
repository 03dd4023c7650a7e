"""``torch.func.vmap`` over the op (``mra_compile.op``'s batching rules): the vmapped
dimension joins the batch, one call of the kernels, the same result as calling the op once
per element, forward and gradients (per-sample gradients: ``vmap(grad(f))``), with no
fallback warning (torch's per-element loop, which the rules replace)."""
import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile


def _draw(seed, V, B, H, Hkv, N, Nk, D, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(V, B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(V, B, Hkv, Nk, D, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(2))
    return q, k, v


def _padding(seed, V, B, N):
    """[V, B, N] 0/1: real tokens first, a drawn number of padding tokens after them."""
    g = torch.Generator().manual_seed(seed + 1)
    real = torch.randint(1, N + 1, (V, B), generator=g)
    return (torch.arange(N) < real[..., None]).double()


@contextlib.contextmanager
def no_fallback():
    """Fail on torch's "performance drop ... batching rule" warning (its fallback)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


CASES = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "V": st.integers(1, 3), "B": st.integers(1, 2),
    "H": st.sampled_from([1, 2, 4]), "gqa": st.booleans(), "N": st.integers(1, 130),
    "cross": st.booleans(), "D": st.sampled_from([8, 16, 40]),  # (as other tests: their kernels)
    "dtype": st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    "mode": st.sampled_from(["full", "sparse"]), "masked": st.sampled_from(["no", "shared", "each"]),
    "budget": st.sampled_from([dict(block_per_row=2), dict(num_blocks=3)]),
    "where": st.integers(0, 4), "shared_kv": st.booleans()})


@settings(max_examples=40, deadline=None)
@given(case=CASES)
def test_vmap_is_the_op_called_per_element(case):
    """Forward: vmap over any dimension of q (k, v and the mask vmapped or shared) equals
    the op called once per element, bit for bit (the rows are computed alone), in every
    dtype (half precision: the inference forward in both, not the training forward's
    float32 P v)."""
    V, B, H = case["V"], case["B"], case["H"]
    Hkv = 1 if case["gqa"] else H
    N = case["N"]
    Nk = N + 37 if case["cross"] else N
    q, k, v = _draw(case["seed"], V, B, H, Hkv, N, Nk, case["D"], case["dtype"])
    mask = _padding(case["seed"], V, B, Nk).to(case["dtype"])
    kwargs = dict(approx_mode=case["mode"], enable_gqa=case["gqa"], **case["budget"])

    def attention(qq, kk, vv, mm):
        return mra_compile.mra_attention(qq, kk, vv, mm, **kwargs)

    where, kv_dim = case["where"], None if case["shared_kv"] else 0
    if case["shared_kv"]:
        k, v = k[0], v[0]
    masks = {"no": (None, None), "shared": (mask[0], None), "each": (mask, 0)}[case["masked"]]
    want = torch.stack([attention(q[i], k if kv_dim is None else k[i],
                                  v if kv_dim is None else v[i],
                                  masks[0] if masks[1] is None else masks[0][i])
                        for i in range(V)])
    with no_fallback():
        got = torch.vmap(attention, in_dims=(where, kv_dim, kv_dim, masks[1]))(
            q.movedim(0, where), k, v, masks[0])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), V=st.integers(1, 3), N=st.integers(20, 100),
       mode=st.sampled_from(["full", "sparse"]), shared_kv=st.booleans())
def test_per_sample_gradients_are_the_gradients_of_each_sample(seed, V, N, mode, shared_kv):
    """vmap(grad(f)): the gradients of q (and of k, v, when they are vmapped too) equal
    those of the op called once per sample (float64)."""
    q, k, v = _draw(seed, V, 1, 2, 2, N, N, 16, torch.float64)
    if shared_kv:
        k, v = k[0], v[0]

    def loss(qq, kk, vv):
        return mra_compile.mra_attention(qq, kk, vv, num_blocks=4, approx_mode=mode).square().sum()

    in_dims = (0, None, None) if shared_kv else (0, 0, 0)
    argnums = (0,) if shared_kv else (0, 1, 2)
    with no_fallback():
        got = torch.vmap(torch.func.grad(loss, argnums=argnums), in_dims=in_dims)(q, k, v)
    for i in range(V):
        sample = (q[i], k, v) if shared_kv else (q[i], k[i], v[i])
        want = torch.func.grad(loss, argnums=argnums)(*sample)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[i], w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("query_mask_by", ["position", "keyword"])
def test_vmap_over_the_raw_op_with_a_query_mask(query_mask_by):
    """torch.ops.mra.attention itself, its cross-attention query mask vmapped, given by
    position or by keyword."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 1, 2, 40, 16, generator=g, dtype=torch.float64)
    kv = torch.randn(3, 1, 2, 70, 16, generator=g, dtype=torch.float64)
    query_mask = (torch.rand(3, 1, 40, generator=g) > 0.3).double()

    def op(qq, kk, qm):
        if query_mask_by == "position":
            return torch.ops.mra.attention(qq, kk, kk, None, 12, "full", 32, 0, 0, None, None,
                                           False, qm)
        return torch.ops.mra.attention(qq, kk, kk, None, 12, "full", query_mask=qm)

    with no_fallback():
        got = torch.vmap(op)(q, kv, query_mask)
    want = torch.stack([op(q[i], kv[i], query_mask[i]) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
