"""Bad inputs: every one is a TypeError or ValueError that names the offending argument.

The kernels do not bounds-check, so anything that slips past validation could read out
of bounds; ``test_no_case_crashes_the_process`` runs the whole table in a fresh
interpreter to make sure none of them takes the process down.
"""

import os

import pytest
import torch
from conftest import make_qkv, run_python

import mra_compile

op = torch.ops.mra.attention

B, H, N, D = 2, 2, 40, 8

# The raw op's schema is checked by torch's dispatcher before mra_compile's validation
# runs: a value of the wrong Python type (a float for an int, a list for a tensor) is
# torch's RuntimeError naming the argument. The Python API (mra_attention,
# block_selection) checks first and raises TypeError.


def qkv(dtype=torch.float32, shape=(B, H, N, D)):
    return make_qkv(0, *shape, dtype=dtype)


def ones_mask():
    return torch.ones(B, N)


def call_op(*, q=None, k=None, v=None, mask=None, num_blocks=3, **options):
    q0, k0, v0 = qkv()
    q = q0 if q is None else q
    k = k0 if k is None else k
    v = v0 if v is None else v
    return op(q, k, v, mask, num_blocks, **options)


def call_api(*, q=None, mask=None, **kwargs):
    q0, k0, v0 = qkv()
    return mra_compile.mra_attention(q0 if q is None else q, k0, v0, mask, **kwargs)


def call_selection(**kwargs):
    return mra_compile.block_selection(*qkv(), **kwargs)


def _mask_with(value):
    m = ones_mask()
    m[1, 7] = value
    return m


VE, TE = ValueError, TypeError


def case(name, thunk, exc, match, schema=False):
    """One row: id, thunk, exception type(s), regex for the message; ``schema``: a raw-op
    call that torch's dispatcher rejects (RuntimeError) before our checks run."""
    return (name, thunk, RuntimeError if schema else exc, match, schema)


CASES = [
    # Ranks.
    case("q-rank3", lambda: call_op(q=qkv()[0][0]), VE, r"\bq\b.*4 dims"),
    case("k-rank5", lambda: call_op(k=qkv()[1][None]), VE, r"\bk\b.*4 dims"),
    case("v-rank2", lambda: call_op(v=qkv()[2][0, 0]), VE, r"\bv\b.*4 dims"),
    case("q-rank0", lambda: call_op(q=torch.tensor(1.0)), VE, r"\bq\b"),
    # Shapes.
    # (k may have its own length, cross-attention: v must then have k's)
    case("k-shape-N", lambda: call_op(k=torch.randn(B, H, N + 1, D)), VE,
         r"\bv\b must have shape \[B, H, Nk, D\].*the shape of k"),
    case("v-shape-D", lambda: call_op(v=torch.randn(B, H, N, D + 1)), VE, r"\bv\b.*shape"),
    case("k-shape-B", lambda: call_op(k=torch.randn(B + 1, H, N, D)), VE, r"\bk\b.*shape"),
    case("v-shape-H", lambda: call_op(v=torch.randn(B, H + 1, N, D)), VE, r"\bv\b.*shape"),
    case("q-N0", lambda: op(*qkv(shape=(B, H, 0, D)), None, 3), VE, r"\bq\b.*\bN\b"),
    case("q-D0", lambda: op(*qkv(shape=(B, H, N, 0)), None, 3), VE, r"\bq\b.*\bD\b"),
    # Dtypes.
    case("int64", lambda: op(*qkv(torch.int64), None, 3), TE, r"\bq\b.*int64"),
    case("int32", lambda: op(*qkv(torch.int32), None, 3), TE, r"\bq\b.*int32"),
    case("bool", lambda: op(*qkv(torch.bool), None, 3), TE, r"\bq\b.*bool"),
    case("complex64", lambda: op(*qkv(torch.complex64), None, 3), TE, r"\bq\b.*complex"),
    case("float8", lambda: op(*qkv(torch.float8_e4m3fn), None, 3), TE, r"\bq\b.*float8"),
    case("k-int-only", lambda: call_op(k=qkv(torch.int64)[1]), TE, r"\bk\b.*int64"),
    case("v-float64-only", lambda: call_op(v=qkv(torch.float64)[2]), TE, r"\bv\b.*dtype of q"),
    case("v-fp16-vs-fp32", lambda: call_op(v=qkv(torch.float16)[2]), TE, r"\bv\b.*dtype of q"),
    case("k-bf16-vs-fp16",
         lambda: op(qkv(torch.float16)[0], qkv(torch.bfloat16)[1], qkv(torch.float16)[2], None, 3),
         TE, r"\bk\b.*dtype of q"),
    # Devices (meta stands in for a second device).
    case("k-meta", lambda: call_op(k=torch.empty(B, H, N, D, device="meta")), VE,
         r"\bk\b.*device"),
    case("mask-meta", lambda: call_op(mask=torch.ones(B, N, device="meta")), VE,
         r"\bmask\b.*device"),
    # Sizes past the kernels' 32-bit indexing (meta tensors: no memory).
    case("too-many-elements",
         lambda: op(*(torch.empty(1, 1, 2**26, 64, device="meta") for _ in range(3)), None, 3),
         VE, r"\bq\b.*2\*\*31"),
    case("too-many-logits",
         lambda: op(*(torch.empty(64, 16, 2**16, 16, device="meta") for _ in range(3)), None, 3,
                    "full", 8),
         VE, r"\bq\b.*2\*\*31"),
    # Mask shape, type and values.
    case("mask-1d", lambda: call_op(mask=torch.ones(N)), VE, r"\bmask\b.*shape"),
    case("mask-3d", lambda: call_op(mask=torch.ones(B, 1, N)), VE, r"\bmask\b.*shape"),
    case("mask-wrong-N", lambda: call_op(mask=torch.ones(B, N - 1)), VE, r"\bmask\b.*shape"),
    case("mask-wrong-B", lambda: call_op(mask=torch.ones(B + 1, N)), VE, r"\bmask\b.*shape"),
    case("mask-BH-N", lambda: call_op(mask=torch.ones(B * H, N)), VE, r"\bmask\b.*shape"),
    case("mask-complex", lambda: call_op(mask=torch.ones(B, N, dtype=torch.complex64)), TE,
         r"\bmask\b"),
    case("mask-2", lambda: call_op(mask=_mask_with(2.0)), VE, r"\bmask\b.*0.*1"),
    case("mask-0.5", lambda: call_op(mask=_mask_with(0.5)), VE, r"\bmask\b.*0.*1"),
    case("mask--1", lambda: call_op(mask=_mask_with(-1.0)), VE, r"\bmask\b"),
    case("mask-nan", lambda: call_op(mask=_mask_with(float("nan"))), VE, r"\bmask\b"),
    case("mask-int-2", lambda: call_op(mask=_mask_with(2.0).long()), VE, r"\bmask\b"),
    case("mask-list", lambda: call_op(mask=[[1] * N] * B), (TE, VE), r"\bmask\b", schema=True),
    # num_blocks.
    case("num_blocks-0", lambda: call_op(num_blocks=0), VE, r"num_blocks"),
    case("num_blocks--1", lambda: call_op(num_blocks=-1), VE, r"num_blocks"),
    case("num_blocks-2.5", lambda: call_op(num_blocks=2.5), TE, r"num_blocks", schema=True),
    case("num_blocks-str", lambda: call_op(num_blocks="3"), TE, r"num_blocks", schema=True),
    case("num_blocks-and-block_per_row", lambda: call_op(block_per_row=2), VE,
         r"num_blocks or block_per_row"),
    case("block_per_row-0", lambda: call_op(num_blocks=None, block_per_row=0), VE,
         r"block_per_row"),
    case("block_per_row-2.5", lambda: call_op(num_blocks=None, block_per_row=2.5), TE,
         r"block_per_row", schema=True),
    # approx_mode.
    case("approx_mode-dense", lambda: call_op(approx_mode="dense"), VE, r"approx_mode"),
    case("approx_mode-FULL", lambda: call_op(approx_mode="FULL"), VE, r"approx_mode"),
    case("approx_mode-empty", lambda: call_op(approx_mode=""), VE, r"approx_mode"),
    case("approx_mode-int", lambda: call_op(approx_mode=1), TE, r"approx_mode", schema=True),
    # block_size.
    case("block_size-0", lambda: call_op(block_size=0), VE, r"block_size"),
    case("block_size--32", lambda: call_op(block_size=-32), VE, r"block_size"),
    case("block_size-4", lambda: call_op(block_size=4), VE, r"block_size"),
    case("block_size-7", lambda: call_op(block_size=7), VE, r"block_size"),
    case("block_size-12", lambda: call_op(block_size=12), VE, r"block_size"),
    case("block_size-48", lambda: call_op(block_size=48), VE, r"block_size"),
    case("block_size-512", lambda: call_op(block_size=512), VE, r"block_size"),
    case("block_size-32.0", lambda: call_op(block_size=32.0), TE, r"block_size", schema=True),
    # Priors.
    case("first_n--1", lambda: call_op(initial_prior_first_n_blocks=-1), VE,
         r"initial_prior_first_n_blocks"),
    case("diagonal_n--1", lambda: call_op(initial_prior_diagonal_n_blocks=-1), VE,
         r"initial_prior_diagonal_n_blocks"),
    case("first_n-1.5", lambda: call_op(initial_prior_first_n_blocks=1.5), TE,
         r"initial_prior_first_n_blocks", schema=True),
    # Not tensors.
    case("q-None", lambda: op(None, *qkv()[1:], None, 3), TE, r"\bq\b"),
    case("k-None", lambda: op(qkv()[0], None, qkv()[2], None, 3), TE, r"\bk\b"),
    case("q-list", lambda: op(qkv()[0].tolist(), *qkv()[1:], None, 3), TE, r"\bq\b", schema=True),
    case("q-ndarray", lambda: op(qkv()[0].numpy(), *qkv()[1:], None, 3), TE, r"\bq\b",
         schema=True),
    case("q-float", lambda: op(1.0, *qkv()[1:], None, 3), TE, r"\bq\b", schema=True),
    # Through mra_compile.mra_attention.
    case("api-block_per_row-0", lambda: call_api(block_per_row=0), VE, r"block_per_row"),
    case("api-block_per_row--2", lambda: call_api(block_per_row=-2), VE, r"block_per_row"),
    case("api-block_per_row-1.5", lambda: call_api(block_per_row=1.5), TE, r"block_per_row"),
    case("api-block_per_row-True", lambda: call_api(block_per_row=True), TE, r"block_per_row"),
    case("api-both", lambda: call_api(num_blocks=4, block_per_row=2), VE,
         r"num_blocks.*block_per_row"),
    case("api-num_blocks-0", lambda: call_api(num_blocks=0), VE, r"num_blocks"),
    case("api-block_size-12", lambda: call_api(block_size=12), VE, r"block_size"),
    case("api-block_size-0", lambda: call_api(block_size=0), VE, r"block_size"),
    case("api-approx_mode", lambda: call_api(approx_mode="exact"), VE, r"approx_mode"),
    case("api-mask-0.5", lambda: call_api(mask=_mask_with(0.5)), VE, r"\bmask\b"),
    case("api-q-list", lambda: call_api(q=[1.0, 2.0]), TE, r"\bq\b"),
    case("api-q-rank3", lambda: call_api(q=torch.randn(H, N, D)), VE, r"\bq\b"),
    case("api-num_blocks-2.5", lambda: call_api(num_blocks=2.5), TE, r"num_blocks"),
    case("api-num_blocks-True", lambda: call_api(num_blocks=True), TE, r"num_blocks"),
    case("api-q-nested-list", lambda: mra_compile.mra_attention(qkv()[0].tolist(), *qkv()[1:]), TE,
         r"\bq\b"),
    case("api-approx_mode-int", lambda: call_api(approx_mode=1), TE, r"approx_mode"),
    # Through mra_compile.block_selection.
    case("selection-num_blocks-0", lambda: call_selection(num_blocks=0), VE, r"num_blocks"),
    case("selection-num_blocks-2.5", lambda: call_selection(num_blocks=2.5), TE, r"num_blocks"),
    case("selection-mode", lambda: call_selection(num_blocks=2, approx_mode="x"), VE,
         r"approx_mode"),
    case("selection-mask", lambda: call_selection(num_blocks=2, mask=_mask_with(3.0)), VE,
         r"\bmask\b"),
]


def _params():
    for name, thunk, exc, match, _ in CASES:
        yield pytest.param(thunk, exc, match, id=name)


def test_case_ids_are_unique():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("thunk, exc, match", list(_params()))
def test_bad_input(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_good_inputs_of_the_table_work():
    # The table's base arguments are valid, so each case fails only for its own reason.
    assert call_op().shape == (B, H, N, D)
    out = call_op(mask=ones_mask(), approx_mode="sparse", block_size=16,
                  initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=1)
    assert out.shape == (B, H, N, D)
    assert call_api().shape == (B, H, N, D)
    assert call_api(block_per_row=1, block_size=64).shape == (B, H, N, D)
    selected, high_mask = call_selection(num_blocks=2)
    assert selected.shape == high_mask.shape == (B, H, 2, 2)


def test_no_case_crashes_the_process():
    """Every case of the table in a fresh interpreter: each raises, none kills it."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = f"""
import json, sys
sys.path.insert(0, {tests_dir!r})
import test_errors
out = {{}}
for name, thunk, *_ in test_errors.CASES:
    try:
        thunk()
        out[name] = None
    except Exception as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""
    raised = run_python(script, timeout=300)
    assert set(raised) == {c[0] for c in CASES}
    for name, _thunk, exc, _match, _ in CASES:
        allowed = exc if isinstance(exc, tuple) else (exc,)
        assert raised[name] in {e.__name__ for e in allowed}, (name, raised[name])


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_non_finite_inputs_do_not_crash(mode, masked, bad, where):
    # A non-finite value poisons (at most) its own (batch, head) row; rows are independent.
    shape = (B, H, 70, D)
    q, k, v = qkv(shape=shape)
    mask = torch.ones(B, 70) if masked else None
    if masked:
        mask[:, 60:] = 0
    clean = op(q, k, v, mask, 3, mode)
    x = {"q": q, "k": k, "v": v}
    x[where] = x[where].clone()
    x[where][1, 0, 5, 2] = bad
    out = op(x["q"], x["k"], x["v"], mask, 3, mode)
    assert out.shape == shape and out.dtype == torch.float32
    others = torch.ones(B, H, dtype=torch.bool)
    others[1, 0] = False
    assert torch.equal(out[others], clean[others])


def test_all_nan_input_does_not_crash():
    q, k, v = (torch.full((1, 2, 100, 16), float("nan")) for _ in range(3))
    for mode in ("full", "sparse"):
        out = op(q, k, v, None, 5, mode, 32, 1, 2)
        assert out.shape == q.shape
        selected, _ = mra_compile.block_selection(q, k, v, num_blocks=5, approx_mode=mode)
        assert selected.shape == (1, 2, 4, 4)


@pytest.mark.parametrize("thunk, match", [pytest.param(c[1], c[3], id=c[0]) for c in CASES if c[4]])
def test_schema_errors_still_name_the_argument(thunk, match):
    # Whatever the exception type (see SCHEMA_XFAIL), the message names the argument.
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        thunk()


def test_options_are_parsed_once_per_distinct_arguments():
    # The op parses its options on every call; plain arguments are parsed once
    # (options.parse), bad ones raise every time, and True is not taken for 1.
    from mra_compile import options

    args = (4, "full", 32, 0, 0, None, None, False)
    first = options.parse(args)
    assert options.parse(args) is first and first.num_blocks == 4
    with pytest.raises(TypeError, match="num_blocks"):
        options.parse((True, *args[1:]))
    for _ in range(2):
        with pytest.raises(ValueError, match="num_blocks"):
            options.parse((0, *args[1:]))
