"""The operators' float32 exp (``operators._exp``): every probability of the op goes
through it, so its error bound, its exact points and its behaviour on extreme inputs
are checked here, on the compiled CPU code, against float64."""
from __future__ import annotations

import functools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mra_compile import operators


@functools.cache
def _compiled(rounded: bool, capped: bool = False):
    import tvm
    from tvm import te

    n = te.var("n")
    x = te.placeholder((n,), "float32", "x")
    cap = te.placeholder((n,), "float32", "cap")  # (a key's cap, as the units pass it)
    if rounded:  # (as the bf16 units call it: the factor log2(e) in their own multiply)
        y = te.compute((n,), lambda i: operators.exp2_rounded(
            x[i] * operators.LOG2_E, cap[i] if capped else None), name="y")
    else:
        y = te.compute((n,), lambda i: operators._exp(x[i] + 0.0, cap[i] if capped else None),
                       name="y")
    return tvm.compile(te.create_prim_func([x, cap, y]), target="llvm")


def _exp(values, rounded: bool = False, cap=None) -> np.ndarray:
    """``operators._exp`` of ``values``, or (``rounded``) the bf16 units' exp; with ``cap``
    (one per value) as the units' key caps."""
    import tvm

    x = np.ascontiguousarray(values, dtype=np.float32)
    caps = np.zeros_like(x) if cap is None else np.ascontiguousarray(cap, dtype=np.float32)
    out = tvm.runtime.tensor(np.empty_like(x))
    _compiled(rounded, cap is not None)(tvm.runtime.tensor(x), tvm.runtime.tensor(caps), out)
    return out.numpy()


def _relative_error(x: np.ndarray, rounded: bool = False) -> np.ndarray:
    got = _exp(x, rounded).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    return np.abs(got - want) / want


def test_relative_error_on_a_dense_grid():
    # (float32 rounding alone is 6e-8; the polynomial adds the rest)
    x = np.linspace(-87.0, 88.0, 2_000_001, dtype=np.float32)
    assert _relative_error(x).max() < 2e-7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-87.0, 88.0, width=32), min_size=1, max_size=64))
def test_relative_error_on_drawn_points(xs):
    assert _relative_error(np.array(xs, np.float32)).max() < 2e-7


def test_exact_points_and_extremes():
    x = np.array([0.0, -0.0, -87.7, -88.0, -1e4, -np.inf, 88.0, 1e4, np.inf, np.nan],
                 np.float32)
    y = _exp(x)
    assert y[0] == 1.0 and y[1] == 1.0  # a row's largest logit weighs exactly 1
    assert (y[2:6] == 0.0).all()  # penalised terms vanish exactly (no 2^-126 left)
    top = np.float32(np.exp(np.float64(88.0)))
    assert np.isfinite(y[6:]).all() and (np.abs(y[6:] / top - 1) < 1e-6).all()  # clamped


def test_integer_multiples_of_ln2_land_on_powers_of_two():
    # the range reduction's k: x = k ln2 gives r ~ 0, so exp(x) is 2^k to rounding
    k = np.arange(-125, 127)
    x = (k * np.log(2.0)).astype(np.float32)
    got = _exp(x).astype(np.float64)
    assert (np.abs(got / np.exp(x.astype(np.float64)) - 1) < 2e-7).all()


def test_the_exp_of_probabilities_rounded_to_bf16():
    # (2^y, degree 3: for probabilities rounded to bf16 next, 2^-9 of rounding, ~18x its
    # error; the bound holds with y = x log2(e) rounded, as the units compute it)
    x = np.linspace(-87.0, 88.0, 2_000_001, dtype=np.float32)
    err = _relative_error(x, rounded=True)
    assert err.max() < 1.1e-4 and err.max() * 16 < 2.0 ** -9
    y = _exp(np.array([0.0, -88.1, -1e4, -np.inf, np.nan, np.inf, 1e4], np.float32), True)
    assert y[0] == 1.0 and (y[1:4] == 0.0).all() and np.isfinite(y[4:]).all()


EXTREMES = [0.0, -0.0, 1.0, -1.0, -87.7, -88.1, -1e4, 1e4, -np.inf, np.inf, np.nan, 3e38]


def test_a_key_capped_below_gives_exactly_zero_whatever_its_logit():
    # (the units' masked keys and empty slots: key_cap = -cap, in place of a 0/1 factor)
    x = np.array(EXTREMES, np.float32)
    for rounded, cap in ((False, operators.EXP_CAP), (True, operators.EXP2_CAP)):
        got = _exp(x, rounded, np.full_like(x, -cap))
        assert (got == 0.0).all() and not np.signbit(got).any(), (rounded, got)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64))
def test_a_key_capped_above_gives_the_plain_exp(xs):
    # (real keys: key_cap = +cap, the plain exp's own clamp: the same bits)
    x = np.array(xs + EXTREMES, np.float32)
    for rounded, cap in ((False, operators.EXP_CAP), (True, operators.EXP2_CAP)):
        want = _exp(x, rounded)
        got = _exp(x, rounded, np.full_like(x, cap))
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), rounded
