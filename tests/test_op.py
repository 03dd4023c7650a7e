"""Correctness of torch.ops.mra.attention against the float64 oracle (mra_compile.reference).

Block selection is a top-k with exact ties by construction (every block row has S = 0
at its maximum; the priors add equal bonuses), and float32 versus float64 can flip
near-ties. Output comparisons therefore give the oracle the op's own block set
(``mra_compile.block_selection`` on the same inputs); ``test_selection_is_a_valid_top_k``
checks separately that this set is a correct top-k of the float64 scores.
"""

import math
import threading

import pytest
import torch
from conftest import RTOL_FP32, as64, make_qkv, n_blocks, padded_mask
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import targets
from mra_compile.reference import exact_attention, mra2_reference

op = torch.ops.mra.attention

HEAD_DIMS = [8, 16, 24, 33, 64, 100, 128]
MASK_KINDS = ["none", "ones", "right", "random", "blocks"]


def make_mask(seed, B, N, kind, b=32, dtype=torch.float32):
    """A [B, N] 0/1 mask (or None) with at least one real token per batch.

    none: no mask; ones: all real; right: padding at the end; random: scattered holes;
    blocks: whole blocks of padding (empty blocks trigger the c_i * c_j < 0.5 penalty).
    """
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "ones":
        mask = torch.ones(B, N)
    elif kind == "right":
        mask = padded_mask(N, torch.randint(1, N + 1, (B,), generator=g))
    elif kind == "random":
        mask = (torch.rand(B, N, generator=g) < 0.7).float()
    else:
        n = n_blocks(N, b)
        keep = torch.rand(B, n, generator=g) < 0.5
        mask = keep.repeat_interleave(b, dim=1)[:, :N].float()
        mask = mask * (torch.rand(B, N, generator=g) < 0.9).float()
    # At least one real token per batch, at a random place.
    first = torch.randint(0, N, (B,), generator=g)
    mask[torch.arange(B), first] = 1
    return mask.to(dtype)


def row_rel_err(out, ref):
    """max |out - ref| / max |ref| over each (batch, head) row; the worst row."""
    out, ref = out.double(), ref.double()
    if out.numel() == 0:
        return 0.0
    err = (out - ref).abs().amax(dim=(-1, -2))
    size = ref.abs().amax(dim=(-1, -2))
    return (err / size.clamp_min(1e-30)).max().item()


def check_against_reference(q, k, v, mask, rtol, **kw):
    """Run the op, give the oracle the op's block set, compare; returns the op output."""
    out = op(q, k, v, mask, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.is_contiguous()
    sel = mra_compile.block_selection(q, k, v, mask, **kw)
    B, H, N, _ = q.shape
    n = n_blocks(N, kw.get("block_size", 32))
    selected, high_mask = sel
    assert selected.shape == high_mask.shape == (B, H, n, n)
    assert (selected.sum(dim=(-1, -2)) == min(kw["num_blocks"], n * n)).all()
    ref = mra2_reference(as64(q), as64(k), as64(v), as64(mask), selection=sel, **kw)
    err = row_rel_err(out, ref)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"
    if mask is not None:
        padded = (mask == 0)[:, None, :].expand(B, H, N)
        assert torch.all(out[padded] == 0)
    return out


def options(draw, N, b=32):
    n = n_blocks(N, b)
    return {
        "num_blocks": draw(st.integers(1, n * n + 5)),
        "approx_mode": draw(st.sampled_from(["full", "sparse"])),
        "block_size": b,
        "initial_prior_first_n_blocks": draw(st.integers(0, 3)),
        "initial_prior_diagonal_n_blocks": draw(st.integers(0, 5)),
    }


seq_lengths = st.one_of(st.integers(1, 700), st.sampled_from([32, 64, 96, 128, 256, 512]))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3), N=seq_lengths,
       D=st.sampled_from(HEAD_DIMS), kind=st.sampled_from(MASK_KINDS),
       mask_dtype=st.sampled_from([torch.float32, torch.bool, torch.int64]),
       scale=st.sampled_from([0.1, 1.0, 2.0]), data=st.data())
def test_matches_reference(seed, B, H, N, D, kind, mask_dtype, scale, data):
    q, k, v = make_qkv(seed, B, H, N, D, scale)
    mask = make_mask(seed, B, N, kind, dtype=mask_dtype)
    kw = options(data.draw, N)
    check_against_reference(q, k, v, mask, RTOL_FP32, **kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 2),
       N=st.integers(1, 400), D=st.sampled_from([8, 33, 64]), b=st.sampled_from([16, 64]),
       kind=st.sampled_from(MASK_KINDS), data=st.data())
def test_matches_reference_other_block_sizes(seed, B, H, N, D, b, kind, data):
    q, k, v = make_qkv(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind, b=b)
    kw = options(data.draw, N, b)
    check_against_reference(q, k, v, mask, RTOL_FP32, **kw)


def test_a_sequence_whose_every_term_is_penalised_gives_zeros():
    """The second sequence has one real token, in a block row with no selected block whose
    low-resolution terms are all penalised (-1e4): exp(-1e4) = 0, so its output is 0, as
    the reference's (found by test_matches_reference_other_block_sizes: the kernels' exp
    gave 2^-126 there, and the output v * 1e-32)."""
    q, k, v = make_qkv(8117, 2, 1, 238, 8)
    mask = make_mask(8117, 2, 238, "blocks", b=64)
    assert mask.sum(-1).tolist() == [104.0, 1.0]
    out = check_against_reference(q, k, v, mask, RTOL_FP32, num_blocks=1, approx_mode="full",
                                  block_size=64, initial_prior_first_n_blocks=1)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_matches_reference_long_sequence(mode):
    N = 2048
    q, k, v = make_qkv(11, 1, 1, N, 64)
    n = n_blocks(N)
    check_against_reference(q, k, v, None, RTOL_FP32, num_blocks=4 * n, approx_mode=mode,
                            initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=3)
    mask = make_mask(11, 1, N, "right")
    check_against_reference(q, k, v, mask, RTOL_FP32, num_blocks=4 * n, approx_mode=mode)


def reference_scores(q, k, mask, b, first_n, diagonal_n):
    """S of spec step 3 in float64, [B, H, n, n], re-derived from the spec (steps 1-3)."""
    q, k = q.double(), k.double()
    B, H, N, D = q.shape
    n = n_blocks(N, b)
    pad = n * b - N
    if mask is None and pad:
        mask = torch.ones(B, N)
    masked = mask is not None
    q = torch.nn.functional.pad(q, (0, 0, 0, pad))
    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    if masked:
        m = torch.nn.functional.pad(mask.double(), (0, pad))
        q = torch.where(m[:, None, :, None] > 0, q, 0.0)
        k = torch.where(m[:, None, :, None] > 0, k, 0.0)
        counts = m.view(B, 1, n, b).sum(-1)
        q_hat = q.view(B, H, n, b, D).sum(3) / (counts[..., None] + 1e-6)
        k_hat = k.view(B, H, n, b, D).sum(3) / (counts[..., None] + 1e-6)
    else:
        q_hat = q.view(B, H, n, b, D).mean(3)
        k_hat = k.view(B, H, n, b, D).mean(3)
    L = q_hat @ k_hat.transpose(-1, -2) / math.sqrt(D)
    # R: over the key blocks holding a real token, 0 without one (step 2).
    R = L.masked_fill(counts[..., None, :] == 0, float("-inf")).amax(-1) if masked else L.amax(-1)
    R = torch.where(torch.isinf(R), torch.zeros_like(R), R)
    if masked:
        L = L - 1e4 * (counts[..., :, None] * counts[..., None, :] < 0.5).double()
    S = L - R[..., None]
    i = torch.arange(n)
    if diagonal_n > 0:
        S = S + 5e3 * ((i[:, None] - i[None, :]).abs() <= diagonal_n // 2).double()
    if first_n > 0:
        S = S + 5e3 * (i[:, None] < first_n).double() + 5e3 * (i[None, :] < first_n).double()
    return S


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 700), D=st.sampled_from([8, 33, 64]), kind=st.sampled_from(MASK_KINDS),
       b=st.sampled_from([32, 32, 16]), data=st.data())
def test_selection_is_a_valid_top_k(seed, B, H, N, D, kind, b, data):
    q, k, v = make_qkv(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind, b=b)
    kw = options(data.draw, N, b)
    selected, high_mask = mra_compile.block_selection(q, k, v, mask, **kw)
    S = reference_scores(q, k, mask, b, kw["initial_prior_first_n_blocks"],
                         kw["initial_prior_diagonal_n_blocks"]).flatten(2)
    sel = selected.flatten(2)
    n2 = S.shape[-1]
    assert (sel.sum(-1) == min(kw["num_blocks"], n2)).all()
    # The op's scores are float32: blocks with the -1e4 padding penalty carry it in their
    # logits, where one float32 ulp is ~1e-3. Near-ties closer than 1e-4 plus two ulps of
    # the score's magnitude cannot be ordered; anything farther apart must be.
    tol = 1e-4 + 2 * torch.finfo(torch.float32).eps * S.abs().amax(-1)
    inf = torch.tensor(float("inf"), dtype=S.dtype)
    theta = torch.where(sel, S, inf).amin(-1)  # smallest selected score per row
    best_unselected = torch.where(sel, -inf, S).amax(-1)
    assert (theta >= best_unselected - tol).all(), (theta, best_unselected)
    tol = tol[..., None].expand_as(S)
    hm = high_mask.flatten(2)
    assert (hm | ~sel).all()  # selected blocks are high resolution
    if kw["approx_mode"] == "sparse":
        assert torch.equal(hm, sel)
    else:
        # Hmask = {S >= theta}, up to float32-versus-float64 near-ties.
        assert (S[hm] >= theta[..., None].expand_as(S)[hm] - tol[hm]).all()
        assert (S[~hm] < theta[..., None].expand_as(S)[~hm] + tol[~hm]).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       n=st.integers(1, 8), D=st.sampled_from(HEAD_DIMS))
def test_full_all_blocks_is_exact_attention(seed, B, H, n, D):
    N = 32 * n
    q, k, v = make_qkv(seed, B, H, N, D)
    out = op(q, k, v, None, n * n, "full")
    expected = exact_attention(q.double(), k.double(), v.double())
    assert row_rel_err(out, expected) <= RTOL_FP32


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 300), D=st.sampled_from(HEAD_DIMS),
       kind=st.sampled_from(["none", "ones", "right", "random", "blocks"]))
def test_full_all_blocks_is_exact_attention_with_mask(seed, B, H, N, D, kind):
    q, k, v = make_qkv(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    n = n_blocks(N)
    out = op(q, k, v, mask, n * n, "full")
    expected = exact_attention(q.double(), k.double(), v.double(), as64(mask))
    assert row_rel_err(out, expected) <= RTOL_FP32
    if mask is not None:
        padded = (mask == 0)[:, None, :].expand(B, H, N)
        assert torch.all(out[padded] == 0)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 400), D=st.sampled_from([8, 33, 64]),
       kind=st.sampled_from(["right", "random", "blocks"]), data=st.data())
def test_padding_values_do_not_matter(seed, B, H, N, D, kind, data):
    q, k, v = make_qkv(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    kw = options(data.draw, N)
    out = op(q, k, v, mask, **kw)
    pad = (mask == 0)[:, None, :, None]
    junk = make_qkv(seed + 7, B, H, N, D, scale=100.0)
    q2, k2, v2 = (torch.where(pad, j + 37, x) for x, j in zip((q, k, v), junk))
    out2 = op(q2, k2, v2, mask, **kw)
    real = (mask == 1)[:, None, :].expand(B, H, N)
    torch.testing.assert_close(out2[real], out[real], rtol=0, atol=1e-6)
    assert torch.all(out2[~real] == 0)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), H=st.integers(1, 3),
       N=st.integers(1, 300), D=st.sampled_from([8, 33, 64]), kind=st.sampled_from(MASK_KINDS),
       data=st.data())
def test_rows_are_independent(seed, B, H, N, D, kind, data):
    q, k, v = make_qkv(seed, B, H, N, D)
    mask = make_mask(seed, B, N, kind)
    kw = options(data.draw, N)
    out = op(q, k, v, mask, **kw)
    pb = torch.tensor(data.draw(st.permutations(range(B))))
    ph = torch.tensor(data.draw(st.permutations(range(H))))
    perm = lambda x: x[pb][:, ph]  # noqa: E731
    out_p = op(perm(q), perm(k), perm(v), None if mask is None else mask[pb], **kw)
    torch.testing.assert_close(out_p, perm(out), rtol=0, atol=1e-6)
    # A single row alone gives the same as inside the batch.
    b, h = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, H - 1))
    one = lambda x: x[b:b + 1, h:h + 1]  # noqa: E731
    out_1 = op(one(q), one(k), one(v), None if mask is None else mask[b:b + 1], **kw)
    torch.testing.assert_close(out_1, one(out), rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(2, 3),
       N=st.integers(1, 300), D=st.sampled_from([8, 33, 64]), kind=st.sampled_from(MASK_KINDS),
       data=st.data())
def test_non_contiguous_inputs(seed, B, H, N, D, kind, data):
    g = torch.Generator().manual_seed(seed)
    # [B, N, H, D] tensors (the usual projection layout) seen as [B, H, N, D].
    q, k, v = (torch.randn(B, N, H, D, generator=g).transpose(1, 2) for _ in range(3))
    mask = make_mask(seed, B, N, kind)
    if N > 1:
        assert not q.is_contiguous()
    kw = options(data.draw, N)
    out = op(q, k, v, mask, **kw)
    expected = op(q.contiguous(), k.contiguous(), v.contiguous(), mask, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # A strided slice of the head dim too.
    wide = torch.randn(B, H, N, 2 * D, generator=g)
    sl = wide[..., ::2]
    torch.testing.assert_close(op(sl, k, v, mask, **kw), op(sl.contiguous(), k, v, mask, **kw),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 400), D=st.sampled_from(HEAD_DIMS), kind=st.sampled_from(MASK_KINDS),
       data=st.data())
def test_half_precision(dtype, rtol, seed, B, H, N, D, kind, data):
    q, k, v = make_qkv(seed, B, H, N, D, dtype=dtype)
    mask = make_mask(seed, B, N, kind)
    kw = options(data.draw, N)
    # The oracle sees the rounded inputs (as64 of the half tensors): only the op's
    # float32 arithmetic and the final rounding differ.
    out = check_against_reference(q, k, v, mask, rtol, **kw)
    assert out.dtype == dtype
    io = targets.CPU.io_dtype(dtype, kw["block_size"])
    if io == torch.float32 or targets.CPU.widens(io, kw["block_size"]):
        # Computed in float32 (fp16, read in place and widened, or from float32 copies;
        # bf16 without the CPU's bf16 products, which tests/test_cpu_bf16.py checks): the
        # float32 op on the rounded inputs, rounded.
        out32 = op(q.float(), k.float(), v.float(), mask, **kw)
        torch.testing.assert_close(out, out32.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("N", [1, 31, 32, 100, 257])
@pytest.mark.parametrize("block_size", [32, 64])
def test_block_per_row(N, block_size):
    q, k, v = make_qkv(N, 2, 2, N, 16)
    mask = make_mask(N, 2, N, "random")
    n = n_blocks(N, block_size)
    for bpr in (1, 2, 3):
        got = mra_compile.mra_attention(q, k, v, None, block_per_row=bpr, block_size=block_size)
        expected = op(q, k, v, None, bpr * n, "full", block_size)
        assert torch.equal(got, expected)
        # With padding, per sequence: r * ceil(c / b) of its blocks with a real query and key.
        kw = dict(block_per_row=bpr, block_size=block_size)
        selected = mra_compile.block_selection(q, k, v, mask, **kw)[0]
        filled = mask.view(2, -1).new_zeros(2, n * block_size)
        filled[:, :N] = mask
        filled = filled.view(2, n, block_size).sum(-1) > 0
        real_pairs = filled[:, None, :, None] & filled[:, None, None, :]
        budget = (bpr * torch.ceil(mask.sum(-1) / block_size)).clamp_min(bpr)
        want = torch.minimum(budget, real_pairs.sum((-1, -2, -3)).double())
        assert ((selected & real_pairs).sum((-1, -2)) == want[:, None]).all()
    # Default: block_per_row = 4.
    got = mra_compile.mra_attention(q, k, v, block_size=block_size)
    assert torch.equal(got, op(q, k, v, None, 4 * n, "full", block_size))
    # num_blocks passes through; all keyword options too.
    got = mra_compile.mra_attention(q, k, v, mask, num_blocks=3, approx_mode="sparse",
                                    block_size=block_size, initial_prior_first_n_blocks=1,
                                    initial_prior_diagonal_n_blocks=2)
    assert torch.equal(got, op(q, k, v, mask, 3, "sparse", block_size, 1, 2))


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_num_blocks_is_clamped(mode):
    q, k, v = make_qkv(5, 2, 2, 100, 24)
    n = n_blocks(100)
    expected = op(q, k, v, None, n * n, mode)
    for nb in (n * n + 1, n * n + 5, 10**6):
        assert torch.equal(op(q, k, v, None, nb, mode), expected)


@pytest.mark.parametrize("shape", [(2, 0, 50, 8), (0, 2, 50, 8), (0, 0, 7, 33)])
@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch_or_heads(shape, masked):
    B, _, N, _ = shape
    q, k, v = (torch.randn(shape) for _ in range(3))
    mask = torch.ones(B, N) if masked else None
    for dtype in (torch.float32, torch.bfloat16):
        x = [t.to(dtype) for t in (q, k, v)]
        out = op(*x, mask, 3)
        assert out.shape == shape and out.dtype == dtype
    out = mra_compile.mra_attention(q, k, v, mask)
    assert out.shape == shape


def test_deterministic_and_workspace_reuse():
    # Calls of different sizes share the scratch buffers; results must not depend on
    # what ran before.
    small = make_qkv(1, 1, 2, 70, 33)
    large = make_qkv(2, 2, 3, 600, 64)
    first = op(*small, None, 5, "full")
    op(*large, None, 40, "full")
    op(*large, make_mask(2, 2, 600, "random"), 40, "sparse")
    assert torch.equal(op(*small, None, 5, "full"), first)
    mra_compile.clear_workspace()
    assert torch.equal(op(*small, None, 5, "full"), first)


def test_budgets_and_overflow_units_change_between_calls():
    """One shape, calls with other block counts in turn: the selection's budget (kept
    between calls) and the overflow units (a width per call) follow each call. Query
    block 0 is near zero, so its row's scores are flat and near the top: that row takes
    more blocks than a row unit holds."""
    q, k, v = make_qkv(11, 1, 2, 1024, 64)
    q[:, :, :32] *= 0.01
    first = {}
    for K, mode in ((200, "sparse"), (60, "full"), (200, "full"), (600, "sparse"), (60, "full"),
                    (200, "sparse")):
        out = check_against_reference(q, k, v, None, RTOL_FP32, num_blocks=K, approx_mode=mode)
        if (K, mode) in first:
            assert torch.equal(out, first[K, mode])
        first[K, mode] = out
    sel, _ = mra_compile.block_selection(q, k, v, None, num_blocks=600, approx_mode="sparse")
    assert sel[:, :, 0].sum(-1).max() > 12  # (beyond a row unit's 12 blocks: overflow)


def test_the_kept_workspace_is_bounded(monkeypatch):
    """What a thread keeps between calls stays within MRA_COMPILE_WORKSPACE_MB; a call
    whose scratch would pass it allocates that scratch for itself (same results)."""
    from mra_compile import memory

    x = make_qkv(3, 2, 3, 600, 64)
    mra_compile.clear_workspace()
    want = op(*x, None, 40, "full")
    kept = memory.WORKSPACE.kept_bytes()
    assert kept > 0
    for megabytes in ("0", str(kept / 2**20 / 2)):
        monkeypatch.setenv(memory.WORKSPACE_ENV, megabytes)
        mra_compile.clear_workspace()
        assert torch.equal(op(*x, None, 40, "full"), want)
        assert memory.WORKSPACE.kept_bytes() <= memory.workspace_limit()
    monkeypatch.setenv(memory.WORKSPACE_ENV, "lots")
    with pytest.raises(ValueError, match="MRA_COMPILE_WORKSPACE_MB must be a number"):
        op(*x, None, 40, "full")
    mra_compile.clear_workspace()


def test_threads_agree_with_serial():
    inputs = [make_qkv(N, 2, 2, N, 24) for N in (64, 300, 130, 500)]
    serial = [op(*x, None, 7) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            for r in range(3):
                results[i, r] = op(*inputs[i], None, 7)
        except Exception as e:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for (i, _), out in results.items():
        assert torch.equal(out, serial[i])
    assert len(results) == 3 * len(inputs)


@pytest.mark.parametrize("shape, dtype", [((1, 1, 1000, 64), torch.float32),
                                          ((2, 3, 100, 40), torch.float32),
                                          ((1, 2, 128, 64), torch.bfloat16)])
def test_results_never_share_the_reused_scratch(shape, dtype):
    """A result copied out of the kernels' output (padded N or D, another dtype) comes
    from reused scratch memory: the next call must not change a result already returned
    (one row of 1000 tokens: its first 1000 padded rows are contiguous as they are)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    first = mra_compile.mra_attention(q, k, v, num_blocks=9)
    kept = first.clone()
    second = mra_compile.mra_attention(k, q, v, num_blocks=9)
    assert torch.equal(first, kept)
    assert first.data_ptr() != second.data_ptr() and first.is_contiguous()
