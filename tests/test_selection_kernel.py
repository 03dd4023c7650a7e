"""The CPU selection kernel (``mra_compile.selection_tir``): the same blocks, Hmask and work
plan as the host's ``plan.select_blocks`` and ``plan.make_plan``, on scores drawn to
stress it (ties, the -1e4 penalties, zeros of both signs, infinities, float64), with
per-sequence budgets and cross-attention's nq x nk grids, and the op takes it exactly where it
applies."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import build, forward, kernels, plan, targets

SENTINEL = 7.5  # (what ``scores`` holds before the kernel runs)


def run_kernel(logits, rowmax, K, Cr, Co, full, room=forward.CANDIDATE_ROOM, budgets=None,
               inference=False):
    """The kernel on [R, n, nk] logits: (scores, as Hmask with ``full``, else zeros, or S as
    the kernel made it with ``inference``; its outputs).
    ``budgets``: (row_blocks [R], q_counts [R, n], counts [R, nk]) for per-sequence
    budgets (one head per sequence here)."""
    R, n, nk = logits.shape
    U, _ = plan.plan_bounds(K, n, nk, Cr, Co)
    i32 = torch.int32
    out = dict(index=torch.full((R, K), -7, dtype=torch.int64),
               row_cols=torch.full((R, n, Cr), -7, dtype=i32),
               ov_start=torch.full((R, n), -7, dtype=i32), ov_units=torch.full((R, n), -7, dtype=i32),
               unit_row=torch.full((R, U), -7, dtype=i32), unit_cols=torch.full((R, U, Co), -7, dtype=i32),
               units=torch.full((R, 2), -7, dtype=i32))
    if budgets is None:
        budget = torch.full((R,), K, dtype=i32)
        q_counts, counts = torch.ones(R, n, dtype=logits.dtype), torch.ones(R, nk, dtype=logits.dtype)
    else:
        row_blocks, q_counts, counts = budgets
        budget = row_blocks.clamp_max(K).to(i32)
    scores = torch.full((R, n * nk), SENTINEL, dtype=logits.dtype)
    static = kernels.get("select_plan").static(32, 64, str(logits.dtype).removeprefix("torch."))
    build.run("select_plan", None, targets.CPU, static, logits=logits, rowmax=rowmax,
              counts=counts, q_counts=q_counts, budget=budget, scores=scores,
              cand_val=torch.empty(R, room * K, dtype=logits.dtype),
              cand_idx=torch.empty(R, room * K, dtype=i32), heads=1,
              real_only=int(budgets is not None),
              write_mask=1 if full else 2 if inference else 0, **out)
    return scores.view(R, n, nk), out


def check(logits, rowmax, K, Cr, Co, full, room=forward.CANDIDATE_ROOM, budgets=None,
          inference=False):
    R, n, nk = logits.shape
    scores, got = run_kernel(logits, rowmax, K, Cr, Co, full, room, budgets, inference)
    kw = {}
    if budgets is not None:
        row_blocks, q_counts, counts = budgets
        pairs = (q_counts > 0.5)[:, :, None] & (counts > 0.5)[:, None, :]
        kw = dict(row_blocks=row_blocks, real_pairs=pairs)
    want = plan.select_blocks(logits, rowmax, num_blocks=K, full=full, **kw)
    S = torch.cat([(logits - rowmax[:, :, None]).reshape(R, n * nk),
                   torch.zeros(R, 1, dtype=logits.dtype)], 1)  # (entry n*nk: no block)
    index = got["index"]
    # T: ascending, then the no-block entries; its scores the largest (ties: any of them).
    assert torch.equal(index, index.sort(dim=1).values)
    assert ((index >= 0) & (index <= n * nk)).all()
    real = index < n * nk
    assert ((index.diff(dim=1) > 0) | ~real[:, 1:]).all()
    assert torch.equal(real.sum(1), (want.index < n * nk).sum(1))
    assert torch.equal(S.gather(1, index).sort(dim=1).values,
                       S.gather(1, want.index).sort(dim=1).values)
    if full:
        assert torch.equal(scores, want.high_mask)
    elif inference:  # nothing written after the selection: S, NaN where not selectable
        S = logits - rowmax[:, :, None]
        allowed = torch.ones(R, n, nk, dtype=torch.bool)
        if budgets is not None:
            allowed &= ((q_counts > 0.5)[:, :, None] & (counts > 0.5)[:, None, :]
                        & (S > float("-inf")))
        S = torch.where(allowed, S, float("nan"))
        if budgets is None:
            # The usual call computes S where it reads it: each row untouched, or S where
            # more ties at theta than the candidates' room sent it to its other path.
            untouched = (scores == SENTINEL).flatten(1).all(1)
            same = ((scores == S) | (scores.isnan() & S.isnan())).flatten(1).all(1)
            assert (untouched | same).all()
        else:
            torch.testing.assert_close(scores, S, rtol=0, atol=0, equal_nan=True)
    else:  # zeros: what the backward reads in Hmask's place in "sparse" mode
        assert torch.equal(scores, torch.zeros_like(scores))
    # The plan of that selection.
    p = plan.make_plan(index, n, nk, Cr, Co)
    for name in ("row_cols", "ov_start", "ov_units"):
        assert torch.equal(got[name], getattr(p, name)), name
    U = max(int(got["units"][:, 0].max()), 1)
    assert torch.equal(got["unit_row"][:, :U], p.unit_row)
    assert torch.equal(got["unit_cols"][:, :U], p.unit_cols)
    assert (got["unit_row"][:, U:] == -1).all() and (got["unit_cols"][:, U:] == -1).all()
    assert max(int(got["units"][:, 1].max()), 1) == p.ucap
    # (what forward._select_and_plan tells its Plan: some row has an overflow unit)
    assert (int(got["units"][:, 0].max()) > 0) == bool((p.unit_row >= 0).any())
    return index, want.index


KINDS = ("normal", "ties", "penalties", "signed zeros", "infinities", "constant")


def draw_logits(kind, R, n, dtype, g, nk=None):
    shape = (R, n, n if nk is None else nk)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    if kind == "ties":
        x = torch.randint(-2, 3, shape, generator=g).to(dtype)
    elif kind == "penalties":  # docs/spec.md, step 2: pairs with an empty block, -1e4
        x[:, :, torch.rand(shape[2], generator=g) < 0.5] -= 1e4
    elif kind == "signed zeros":
        x = torch.where(torch.rand(*shape, generator=g) < 0.5, x, torch.zeros((), dtype=dtype))
        x = torch.where(torch.rand(*shape, generator=g) < 0.5, x, -x)
    elif kind == "infinities":
        x[torch.rand(*shape, generator=g) < 0.2] = float("-inf")
    elif kind == "constant":
        x = torch.full(shape, 0.25, dtype=dtype)
    return x


def draw_rowmax(logits, zero):
    """R[i] of the spec: the maximum over real key blocks, or 0 (no real key)."""
    finite = torch.where(logits.isinf(), torch.zeros((), dtype=logits.dtype), logits)
    return torch.zeros(logits.shape[:2], dtype=logits.dtype) if zero else finite.amax(-1)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 48), R=st.integers(1, 4), data=st.data(), Cr=st.integers(1, 9),
       Co=st.integers(1, 4), full=st.booleans(), kind=st.sampled_from(KINDS),
       float64=st.booleans(), zero_rowmax=st.booleans(), inference=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_same_selection_and_plan_as_the_host(n, R, data, Cr, Co, full, kind, float64,
                                             zero_rowmax, inference, seed):
    K = data.draw(st.integers(1, n * n - 1))
    dtype = torch.float64 if float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    logits = draw_logits(kind, R, n, dtype, g)
    got, want = check(logits, draw_rowmax(logits, zero_rowmax), K, Cr, Co, full,
                      inference=inference)
    if kind == "normal" and zero_rowmax:  # no ties (each row's maximum makes a 0 per row)
        assert torch.equal(got, want)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 40), R=st.integers(1, 4), data=st.data(), Cr=st.integers(1, 9),
       Co=st.integers(1, 4), full=st.booleans(), kind=st.sampled_from(KINDS),
       with_budgets=st.booleans(), inference=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_budgets_and_grids_as_the_host(n, R, data, Cr, Co, full, kind, with_budgets, inference,
                                       seed):
    """docs/spec.md, "Per-sequence budget" (each row's own number of blocks, among those
    with a real query and a real key) and cross-attention's nq x nk grid."""
    nq, nk = data.draw(st.integers(1, n)), data.draw(st.integers(1, n))
    if nq * nk < 2:
        return
    K = data.draw(st.integers(1, nq * nk - 1))
    g = torch.Generator().manual_seed(seed)
    logits = draw_logits(kind, R, nq, torch.float32, g, nk)
    budgets = None
    if with_budgets:
        row_blocks = torch.randint(1, K + 3, (R,), generator=g)
        q_counts = (torch.rand(R, nq, generator=g) < 0.7).float() * 32
        counts = (torch.rand(R, nk, generator=g) < 0.7).float() * 32
        budgets = (row_blocks, q_counts, counts)
    check(logits, draw_rowmax(logits, False), K, Cr, Co, full, budgets=budgets,
          inference=inference)


@settings(max_examples=4, deadline=None)
@given(N=st.sampled_from([1024, 8192]), room=st.sampled_from([1, 2]))
def test_long_rows(N, room):
    """Rows of up to 65536 scores with K = 4n: the bisection stops on all scores once at
    most ``room * K`` remain, and ends on those; with the smallest room too."""
    n = N // 32
    g = torch.Generator().manual_seed(N)
    logits = torch.randn(3, n, n, generator=g) / 4
    got, want = check(logits, logits.amax(-1), 4 * n, 8, 3, True, room)
    assert torch.equal(got, want)  # (ties only at 0, n of them per row, all selected)


def test_more_ties_than_room_stay_on_all_scores():
    """A row whose ties at theta outnumber the candidates' room: the kernel's other path."""
    n, K = 40, 100
    logits = torch.zeros(2, n, n)
    logits[0, 3, 5] = 1.0
    got, _ = check(logits, torch.zeros(2, n), K, 4, 2, True)
    # Ties: the first in row-major order (after the larger score).
    assert torch.equal(got[1], torch.arange(K))
    assert got[0, 0] == 0 and (3 * n + 5) in got[0].tolist()


def test_the_op_uses_the_kernel_where_it_applies():
    """Self- and cross-attention, with or without per-sequence budgets, take the kernel;
    priors (and selecting every block) keep the host's selection."""
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))

    def ops(q=q, k=k, v=v, **kw):
        if "block_per_row" not in kw:
            kw.setdefault("num_blocks", 24)
        with build.trace_kernel_calls() as calls:
            mra_compile.mra_attention(q, k, v, **kw)
        return [c["op"] for c in calls]

    padded = torch.ones(1, 256)
    padded[:, 200:] = 0
    assert "select_plan" in ops()
    assert "select_plan" in ops(approx_mode="sparse")
    assert "select_plan" in ops(mask=padded)
    assert "select_plan" in ops(block_per_row=3, mask=padded)
    assert "select_plan" in ops(k=k[:, :, :100], v=v[:, :, :100], num_blocks=8)
    assert "select_plan" not in ops(initial_prior_diagonal_n_blocks=2)
    assert "select_plan" not in ops(num_blocks=64)  # every block: nothing to select


def test_what_the_selection_writes_after_it_by_call():
    """Hmask in "full" mode (the low-resolution part reads it); in "sparse" mode zeros
    where a backward will read them in Hmask's place, and nothing in an inference call."""
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))

    def write_mask(mode, grad):
        leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
        with build.trace_kernel_calls() as calls, torch.set_grad_enabled(grad):
            mra_compile.mra_attention(*leaves, num_blocks=24, approx_mode=mode)
        call, = (c for c in calls if c["op"] == "select_plan")
        names = kernels.get("select_plan").arg_names(call["static"])
        return call["args"][names.index("write_mask")]

    assert write_mask("full", False) == 1 and write_mask("full", True) == 1
    assert write_mask("sparse", True) == 0
    assert write_mask("sparse", False) == 2


# ------------------------------------------------------------------- the C scans themselves


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """``schedules/cpu_select.c`` through ctypes: as the kernels link it (its AVX-512
    paths where this CPU has them), without AVX-512 (its AVX2 paths where the CPU has
    those) and with its portable paths only."""
    from conftest import c_library

    from mra_compile.schedules import cpu_select

    return {name: c_library(tmp_path_factory.mktemp(name), cpu_select.SOURCE,
                            (*cpu_select.FLAGS, *extra))
            for name, extra in (("linked", ()), ("avx2", ("-DMRA_SELECT_NO_AVX512",)),
                                ("portable", ("-DMRA_SELECT_PORTABLE",)))}


def _scan_values(data, size, dtype):
    """Scores as the scans meet them: ties, zeros of both signs, infinities and NaN."""
    pool = [0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf"), float("nan"), -1e4]
    pick = st.one_of(st.sampled_from(pool), st.floats(-4, 4, width=32))
    return torch.tensor(data.draw(st.lists(pick, min_size=size, max_size=size)), dtype=dtype)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 19), nk=st.integers(1, 19), float64=st.booleans(),
       room_cut=st.integers(0, 3), data=st.data())
def test_candidates_scan_is_the_scores_at_least_the_bound_in_order(scans, n, nk, float64,
                                                                   room_cut, data):
    """Both forms (S as written; S from the logits and their row maxima), both builds,
    with the room cut short too (a bound on memory: nothing written past it)."""
    import ctypes

    dtype = torch.float64 if float64 else torch.float32
    suffix, scalar = ("f64", ctypes.c_double) if float64 else ("f32", ctypes.c_float)
    logits = _scan_values(data, n * nk, dtype).view(n, nk)
    rowmax = _scan_values(data, n, dtype)
    bound = data.draw(st.sampled_from([0.0, -0.0, -1.0, 0.5, float("-inf"), float("inf")]))
    S = logits - rowmax[:, None]  # (the kernel's own subtraction)
    for flat in (False, True):  # (S from the logits; S as written)
        scores = S.flatten() if flat else logits.flatten()
        passing = (scores if flat else S.flatten()) >= bound
        room = max(int(passing.sum()) - room_cut, 0)
        for lib in scans.values():
            val = torch.full((room + 16,), 99.0, dtype=dtype)
            idx = torch.full((room + 16,), -5, dtype=torch.int32)
            ptr = [ctypes.c_void_p(t.data_ptr()) for t in (logits, rowmax, val, idx)]
            if flat:
                got = getattr(lib, f"mra_select_candidates_{suffix}")(
                    ctypes.c_void_p(scores.data_ptr()), n * nk, scalar(bound), ptr[2], ptr[3],
                    room)
            else:
                got = getattr(lib, f"mra_select_candidates_rows_{suffix}")(
                    ptr[0], ptr[1], n, nk, scalar(bound), ptr[2], ptr[3], room)
            want = passing.nonzero().flatten()[:room]
            assert got == len(want)
            assert torch.equal(idx[:got], want.to(torch.int32))
            assert torch.equal(val[:got].view(torch.int64 if float64 else torch.int32),
                               S.flatten()[want].view(torch.int64 if float64 else torch.int32))
            assert (idx[got:] == -5).all() and (val[got:] == 99.0).all()  # (nothing past)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 70), float64=st.booleans(), data=st.data())
def test_read_off_scan_takes_the_larger_then_the_first_ties(scans, m, float64, data):
    """T from the candidates: those > theta, then ties at theta while ``ties`` last, at
    most ``want``; their positions and the smallest value, every build. The same from a
    row's scores themselves (``*_scores_*``: each at its own position)."""
    import ctypes

    dtype = torch.float64 if float64 else torch.float32
    suffix, scalar = ("f64", ctypes.c_double) if float64 else ("f32", ctypes.c_float)
    val = _scan_values(data, m, dtype)
    val = torch.where(val.isnan(), torch.zeros((), dtype=dtype), val)  # (candidates: >= lo)
    idx = torch.sort(torch.randperm(4 * m + 1)[:m]).values.to(torch.int32)
    theta = data.draw(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]))
    want_n = data.draw(st.integers(0, m + 2))
    ties = data.draw(st.integers(-1, m + 2))
    # The rule: larger than theta, or tied while ties are left.
    take, left = [], ties
    for e in range(m):
        x = float(val[e])
        if len(take) < want_n and (x > theta or (x == theta and left > 0)):
            left -= x == theta
            take.append(e)
    smallest = float(val[take].min()) if take else float("inf")
    for lib in scans.values():
        for positions in (idx, None):
            index = torch.full((m + 16,), -3, dtype=torch.int64)
            least = torch.full((1,), float("inf"), dtype=dtype)
            tail = (scalar(theta), want_n, ctypes.c_int64(ties),
                    ctypes.c_void_p(index.data_ptr()), ctypes.c_void_p(least.data_ptr()))
            if positions is None:
                got = getattr(lib, f"mra_select_read_off_scores_{suffix}")(
                    ctypes.c_void_p(val.data_ptr()), m, *tail)
                want = torch.tensor(take, dtype=torch.int64)
            else:
                got = getattr(lib, f"mra_select_read_off_{suffix}")(
                    ctypes.c_void_p(val.data_ptr()), ctypes.c_void_p(positions.data_ptr()), m,
                    *tail)
                want = positions[take].to(torch.int64)
            assert got == len(take)
            assert torch.equal(index[:got], want)
            assert (index[got:] == -3).all()
            assert float(least) == smallest  # (a zero of either sign where it is 0)
