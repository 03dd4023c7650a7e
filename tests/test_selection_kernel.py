"""The CPU selection kernel (``mra_compile.selection_tir``): the same blocks, Hmask and work
plan as the host's ``plan.select_blocks`` and ``plan.make_plan``, on scores drawn to
stress it (ties, the -1e4 penalties, zeros of both signs, infinities, float64), and the
op takes it exactly where it applies."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import build, forward, kernels, plan, targets


def run_kernel(logits, rowmax, K, Cr, Co, full, room=forward.CANDIDATE_ROOM):
    """The kernel on [R, n, n] logits: (scores, as Hmask with ``full``; its outputs)."""
    R, n, _ = logits.shape
    U, _ = plan.plan_bounds(K, n, Cr, Co)
    i32 = torch.int32
    out = dict(index=torch.full((R, K), -7, dtype=torch.int64),
               row_cols=torch.full((R, n, Cr), -7, dtype=i32),
               ov_start=torch.full((R, n), -7, dtype=i32), ov_units=torch.full((R, n), -7, dtype=i32),
               unit_row=torch.full((R, U), -7, dtype=i32), unit_cols=torch.full((R, U, Co), -7, dtype=i32),
               units=torch.full((R, 2), -7, dtype=i32))
    scores = torch.empty(R, n * n, dtype=logits.dtype)
    static = kernels.get("select_plan").static(32, 64, str(logits.dtype).removeprefix("torch."))
    build.run("select_plan", None, targets.CPU, static, logits=logits, rowmax=rowmax,
              scores=scores, cand_val=torch.empty(R, room * K, dtype=logits.dtype),
              cand_idx=torch.empty(R, room * K, dtype=i32), write_mask=int(full), **out)
    return scores.view(R, n, n), out


def check(logits, rowmax, K, Cr, Co, full, room=forward.CANDIDATE_ROOM):
    R, n, _ = logits.shape
    scores, got = run_kernel(logits, rowmax, K, Cr, Co, full, room)
    want = plan.select_blocks(logits, rowmax, num_blocks=K, full=full)
    S = (logits - rowmax[:, :, None]).reshape(R, n * n)
    index = got["index"]
    # T: K blocks in ascending order whose scores are the K largest (ties: any of them).
    assert ((index >= 0) & (index < n * n)).all()
    assert (index.diff(dim=1) > 0).all()
    assert torch.equal(S.gather(1, index).sort(dim=1).values,
                       S.gather(1, want.index).sort(dim=1).values)
    if full:
        assert torch.equal(scores, want.high_mask)
    # The plan of that selection.
    p = plan.make_plan(index, n, Cr, Co)
    for name in ("row_cols", "ov_start", "ov_units"):
        assert torch.equal(got[name], getattr(p, name)), name
    U = max(int(got["units"][:, 0].max()), 1)
    assert torch.equal(got["unit_row"][:, :U], p.unit_row)
    assert torch.equal(got["unit_cols"][:, :U], p.unit_cols)
    assert (got["unit_row"][:, U:] == -1).all() and (got["unit_cols"][:, U:] == -1).all()
    assert max(int(got["units"][:, 1].max()), 1) == p.ucap
    return index, want.index


KINDS = ("normal", "ties", "penalties", "signed zeros", "infinities", "constant")


def draw_logits(kind, R, n, dtype, g):
    x = torch.randn(R, n, n, generator=g, dtype=dtype)
    if kind == "ties":
        x = torch.randint(-2, 3, (R, n, n), generator=g).to(dtype)
    elif kind == "penalties":  # docs/spec.md, step 2: pairs with an empty block, -1e4
        x[:, :, torch.rand(n, generator=g) < 0.5] -= 1e4
    elif kind == "signed zeros":
        x = torch.where(torch.rand(R, n, n, generator=g) < 0.5, x, torch.zeros((), dtype=dtype))
        x = torch.where(torch.rand(R, n, n, generator=g) < 0.5, x, -x)
    elif kind == "infinities":
        x[torch.rand(R, n, n, generator=g) < 0.2] = float("-inf")
    elif kind == "constant":
        x = torch.full((R, n, n), 0.25, dtype=dtype)
    return x


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 48), R=st.integers(1, 4), data=st.data(), Cr=st.integers(1, 9),
       Co=st.integers(1, 4), full=st.booleans(), kind=st.sampled_from(KINDS),
       float64=st.booleans(), zero_rowmax=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_same_selection_and_plan_as_the_host(n, R, data, Cr, Co, full, kind, float64,
                                             zero_rowmax, seed):
    if n == 1:
        return  # (k < n*n: one block is all of them, which the op never sends here)
    K = data.draw(st.integers(1, n * n - 1))
    dtype = torch.float64 if float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    logits = draw_logits(kind, R, n, dtype, g)
    # R[i] of the spec is the maximum over real key blocks, or 0 (no real key).
    finite = torch.where(logits.isinf(), torch.zeros((), dtype=dtype), logits)
    rowmax = torch.zeros(R, n, dtype=dtype) if zero_rowmax else finite.amax(-1)
    got, want = check(logits, rowmax, K, Cr, Co, full)
    if kind == "normal" and zero_rowmax:  # no ties (each row's maximum makes a 0 per row)
        assert torch.equal(got, want)


@pytest.mark.parametrize("room", [1, 2])
@pytest.mark.parametrize("N", [1024, 8192])
def test_long_rows(N, room):
    """Rows of 65536 scores with K = 4n: the bisection stops on all scores once at most
    ``room * K`` remain, and ends on those; with the smallest room too."""
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
    """Plain self-attention takes the kernel; priors (and cross-attention, per-sequence
    budgets) keep the host's selection."""
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))

    def ops(**kw):
        if "block_per_row" not in kw:
            kw.setdefault("num_blocks", 24)
        with build.trace_kernel_calls() as calls:
            mra_compile.mra_attention(q, k, v, **kw)
        return [c["op"] for c in calls]

    assert "select_plan" in ops()
    assert "select_plan" in ops(approx_mode="sparse")
    assert "select_plan" not in ops(initial_prior_diagonal_n_blocks=2)
    padded = torch.ones(1, 256)
    padded[:, 200:] = 0
    assert "select_plan" in ops(mask=padded)
    assert "select_plan" not in ops(block_per_row=3, mask=padded)
    assert "select_plan" not in ops(num_blocks=64)  # every block: nothing to select
