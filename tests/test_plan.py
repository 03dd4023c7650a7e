"""The work plan: its shape-only bounds (CUDA: no host synchronisation) hold for every
selection, and a bounded plan is the exact plan plus empty units. (On the CPU the exact
plan is numpy's, the bounded one torch's: the same steps, compared here.) Grids of n
query blocks by nk key blocks (nk != n: cross-attention)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mra_compile import plan


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 24), nk=st.integers(1, 24), data=st.data(), Cr=st.integers(0, 6),
       Co=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_bounded_plan_is_the_exact_plan_plus_empty_units(n, nk, data, Cr, Co, seed):
    K = data.draw(st.integers(1, n * nk))
    g = torch.Generator().manual_seed(seed)
    # Random selections, and the worst case for the bounds: whole block rows first.
    rows = [torch.randperm(n * nk, generator=g)[:K] for _ in range(2)] + [torch.arange(K)]
    index = torch.stack(rows).sort(dim=1).values
    exact = plan.make_plan(index, n, nk, Cr, Co)
    bounded = plan.make_plan(index, n, nk, Cr, Co, exact=False)
    U, ucap = plan.plan_bounds(K, n, nk, Cr, Co)
    assert exact.unit_row.shape[1] <= U == bounded.unit_row.shape[1]
    assert exact.ucap <= ucap == bounded.ucap
    for name in ("row_cols", "ov_start", "ov_units"):
        assert torch.equal(getattr(exact, name), getattr(bounded, name))
    used = exact.unit_row.shape[1]
    assert torch.equal(bounded.unit_row[:, :used], exact.unit_row)
    assert torch.equal(bounded.unit_cols[:, :used], exact.unit_cols)
    assert (bounded.unit_row[:, used:] == -1).all() and (bounded.unit_cols[:, used:] == -1).all()
    assert bounded.has_overflow or not exact.has_overflow
    # (the exact plan knows it without scanning its units: the same answer)
    assert exact.overflow is not None
    assert exact.has_overflow == bool((exact.unit_row >= 0).any())


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), nk=st.integers(1, 16), data=st.data(), Cr=st.integers(0, 4),
       Co=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_no_block_entries_are_skipped(n, nk, data, Cr, Co, seed):
    """Per-sequence budgets: a row with fewer blocks ends in entries n * nk (no block); its
    plan is the plan of its blocks alone, within the bounds of the full width."""
    K = data.draw(st.integers(1, n * nk))
    kept = data.draw(st.integers(0, K))
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(n * nk, generator=g)[:kept].sort().values
    padded = torch.cat([blocks, torch.full((K - kept,), n * nk)])[None]
    for exact in (True, False):
        got = plan.make_plan(padded, n, nk, Cr, Co, exact=exact)
        U, ucap = plan.plan_bounds(K, n, nk, Cr, Co)
        assert got.unit_row.shape[1] <= U and got.ucap <= ucap
        if kept:
            want = plan.make_plan(blocks[None], n, nk, Cr, Co)
            for name in ("row_cols", "ov_start", "ov_units"):
                assert torch.equal(getattr(got, name), getattr(want, name))
            used = want.unit_row.shape[1]
            assert torch.equal(got.unit_cols[:, :used], want.unit_cols)
            assert (got.unit_row[:, used:] == -1).all()
        else:
            assert (got.row_cols == -1).all() and (got.ov_units == 0).all()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 20), nk=st.integers(1, 20), data=st.data(), Cq=st.integers(1, 6),
       Ck=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_each_query_slot_finds_its_block_among_the_key_units(n, nk, data, Cq, Ck, seed):
    """The CPU backward's dq reads each block's dS where the key-block units wrote it:
    ``transposed_slots`` maps every filled slot of the by-query plan to the by-key slot of
    the same block (i, j), one to one; empty slots to -1."""
    K = data.draw(st.integers(1, n * nk))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(3):  # rows with fewer blocks end in entries n * nk (no block)
        kept = data.draw(st.integers(0, K))
        blocks = torch.randperm(n * nk, generator=g)[:kept].sort().values
        rows.append(torch.cat([blocks, torch.full((K - kept,), n * nk)]))
    index = torch.stack(rows)
    by_query = plan.make_plan(index, n, nk, 0, Cq)
    flipped, order = plan.transposed(index, n, nk)
    by_key = plan.make_plan(flipped, nk, n, 0, Ck)
    at = plan.transposed_slots(index, by_query, Cq, flipped, order, by_key, Ck, n, nk)
    assert at.shape == by_query.unit_cols.shape and at.dtype == torch.int32
    filled = by_query.unit_cols >= 0
    assert torch.equal(at >= 0, filled)
    for r in range(index.shape[0]):
        seen = set()
        for u, c in filled[r].nonzero().tolist():
            i, j = int(by_query.unit_row[r, u]), int(by_query.unit_cols[r, u, c])
            a = int(at[r, u, c])
            assert int(by_key.unit_row[r, a // Ck]) == j
            assert int(by_key.unit_cols[r, a // Ck, a % Ck]) == i
            seen.add(a)
        assert len(seen) == int((index[r] < n * nk).sum())


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 20), nk=st.integers(1, 20), data=st.data(), Cq=st.integers(1, 6),
       Ck=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_backward_plan_kernel_makes_the_host_plans(n, nk, data, Cq, Ck, seed):
    """The CPU backward's ``bwd_plan`` kernel (``backward._unit_plans``) gives the host's
    plans by query and by key block and their slot map, array for array: random
    selections, rows ending in entries n * nk (no block), whole block rows and columns."""
    from mra_compile.backward import _unit_plans
    from mra_compile.inputs import prepare

    K = data.draw(st.integers(1, n * nk))
    g = torch.Generator().manual_seed(seed)
    by_column = torch.arange(n * nk).view(n, nk).t().reshape(-1)[:K]  # (flat i * nk + j)
    rows = [torch.arange(K), by_column.sort().values]
    for _ in range(3):
        kept = data.draw(st.integers(0, K))
        blocks = torch.randperm(n * nk, generator=g)[:kept].sort().values
        rows.append(torch.cat([blocks, torch.full((K - kept,), n * nk)]))
    index = torch.stack(rows)
    q = torch.zeros(1, index.shape[0], n * 32, 16)
    kv = torch.zeros(1, index.shape[0], nk * 32, 16)
    by_query, by_key, at = _unit_plans(prepare(q, kv, kv, None, 32), {}, index, n, nk, Cq, Ck)
    want_q = plan.make_plan(index, n, nk, 0, Cq)
    flipped, order = plan.transposed(index, n, nk)
    want_k = plan.make_plan(flipped, nk, n, 0, Ck)
    want_at = plan.transposed_slots(index, want_q, Cq, flipped, order, want_k, Ck, n, nk)
    for got, want, blocks in ((by_query, want_q, n), (by_key, want_k, nk)):
        for name in ("unit_row", "unit_cols", "ov_start", "ov_units"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.ucap == want.ucap and got.has_overflow == want.has_overflow
        assert got.row_cols.shape == want.row_cols.shape == (len(rows), blocks, 0)
    assert torch.equal(at, want_at)


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([256, 300]), per_row=st.integers(1, 30), seed=st.integers(0, 2**31 - 1),
       layout=st.sampled_from(["random", "sorted", "strided", "one row"]))
def test_sampled_top_k_is_the_top_k(n, per_row, seed, layout):
    """``top_k_numpy`` (a threshold from a strided sample first) selects exactly the k
    largest of every row, also where the sample misleads it (then it partitions the row
    whole): the largest values sorted to one end, or placed on the sample's stride."""
    import numpy as np

    g = np.random.default_rng(seed)
    R, T = 3, n * n
    k = min(per_row * n // 8, T - 1)
    values = g.permutation(R * T).reshape(R, T).astype(np.float64)  # distinct: no ties
    if layout == "sorted":
        values.sort(axis=1)
    elif layout == "strided":  # the sample holds the largest values: its threshold is too high
        sampled = np.arange(0, T, plan.SAMPLE_STRIDE)
        positions = np.r_[sampled, np.setdiff1d(np.arange(T), sampled)]
        row = np.empty(T)
        row[positions] = np.arange(T, 0, -1)
        values = np.stack([row + T * i for i in range(R)])
    elif layout == "one row":
        values[1] = -values[1]
    got = np.sort(plan.top_k_numpy(values, k), axis=1)
    want = np.sort(np.argpartition(values, T - k, axis=1)[:, T - k:], axis=1)
    assert (got == want).all()


@given(n=st.integers(8, 24), per_row=st.integers(1, 6), full=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_selection_takes_one_kept_buffer(n, per_row, full, seed):
    """With ``scores_out`` the host selection writes S there and, in "full" mode, makes
    Hmask from it in place: one [R, n, n] buffer for both (the op's peak memory), and the
    same selection and Hmask as without it. (A budget of every block selects without
    a top-k: n >= 8 keeps per_row * n below n * n.)"""
    g = torch.Generator().manual_seed(seed)
    R = 3
    logits = torch.randn(R, n, n, generator=g)
    rowmax = logits.amax(-1)
    k = min(per_row * n, n * n)
    plain = plan.select_blocks(logits, rowmax, num_blocks=k, full=full)
    out = torch.empty(R, n, n)
    kept = plan.select_blocks(logits, rowmax, num_blocks=k, full=full, scores_out=out)
    assert torch.equal(kept.index, plain.index)
    if full:
        assert kept.high_mask.data_ptr() == out.data_ptr()
        assert torch.equal(kept.high_mask, plain.high_mask)
    else:
        assert kept.high_mask is None
        assert torch.equal(out, logits - rowmax[:, :, None])
