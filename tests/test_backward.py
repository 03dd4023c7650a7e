"""Gradients of torch.ops.mra.attention.

Against torch.autograd.gradcheck in float64 (the op has float64 kernels), against the
float64 reference's autograd with the op's own block selection (selection and
stabilisers are constants, spec "Properties"), opcheck's autograd checks, and a
torch.compile(fullgraph=True) training step.
"""

import copy
import math

import pytest
import torch
from conftest import as64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import build
from mra_compile.reference import mra2_reference

op = torch.ops.mra.attention


def _inputs(B, H, N, D, dtype, seed, masked):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
               for _ in range(3))
    mask = None
    if masked:
        mask = (torch.rand(B, N, generator=g) > 0.25).to(dtype)
        mask[:, 0] = 1  # at least one real token per batch
    return q, k, v, mask


def _grads_vs_reference(q, k, v, mask, num_blocks, mode, f, g, block_size=32):
    """Max error of dq, dk, dv (the op vs the float64 reference's autograd), each relative
    to the largest entry of the three reference gradients: a gradient that is zero in
    exact arithmetic (e.g. dq with a single real key) has no scale of its own."""
    sel = mra_compile.block_selection(
        q, k, v, mask, num_blocks=num_blocks, approx_mode=mode, block_size=block_size,
        initial_prior_first_n_blocks=f, initial_prior_diagonal_n_blocks=g,
    )
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = op(*leaves, mask, num_blocks, mode, block_size, f, g)
    out.backward(grad_out.to(q.dtype))
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = mra2_reference(*refs, as64(mask), num_blocks=num_blocks, approx_mode=mode,
                         block_size=block_size, initial_prior_first_n_blocks=f,
                         initial_prior_diagonal_n_blocks=g, selection=sel)
    ref.backward(grad_out)
    scale = max(x.grad.abs().max().item() for x in refs) or 1.0
    return [((mine.grad.double() - theirs.grad).abs().max() / scale).item()
            for mine, theirs in zip(leaves, refs)]


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("N", [40, 64, 70])
def test_gradcheck_float64(mode, masked, N):
    # fast_mode: gradcheck along random directions (the full Jacobian of every case
    # would take minutes; test_gradcheck_float64_full_jacobian does one).
    # num_blocks >= n keeps every block row's maximum (S = 0, an exact tie across rows)
    # selected, so finite differences never flip the selection. Tolerances: the spec's
    # gradient holds the stabilisers constant, but the function's +1e-6 terms do move
    # with them, so finite differences differ from it by ~1e-6 (the float64 reference
    # does exactly the same); gradcheck's defaults are atol=1e-5, rtol=1e-3.
    q, k, v, mask = _inputs(1, 2, N, 8, torch.float64, seed=N, masked=masked)
    n = math.ceil(N / 32)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: op(a, b, c, mask, n + 1, mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_gradcheck_float64_full_jacobian(mode):
    q, k, v, mask = _inputs(1, 1, 40, 4, torch.float64, seed=4, masked=True)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: op(a, b, c, mask, 3, mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_gradcheck_float64_block16_priors(mode):
    q, k, v, mask = _inputs(2, 1, 50, 8, torch.float64, seed=3, masked=True)
    n = math.ceil(50 / 16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    # All n*n blocks: priors then only reorder, never change, the selection.
    fn = lambda a, b, c: op(a, b, c, mask, n * n, mode, 16, 1, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 400),
    D=st.sampled_from([8, 16, 33, 64]), mode=st.sampled_from(["full", "sparse"]),
    masked=st.booleans(), blocks_per_row=st.integers(1, 8), f=st.integers(0, 2),
    g=st.integers(0, 4), seed=st.integers(0, 2**16),
)
def test_grads_match_reference_fp32(B, H, N, D, mode, masked, blocks_per_row, f, g, seed):
    q, k, v, mask = _inputs(B, H, N, D, torch.float32, seed, masked)
    n = math.ceil(N / 32)
    errors = _grads_vs_reference(q, k, v, mask, blocks_per_row * n, mode, f, g)
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_grads_match_reference_long(mode):
    q, k, v, mask = _inputs(1, 2, 1000, 64, torch.float32, seed=11, masked=True)
    errors = _grads_vs_reference(q, k, v, mask, 4 * 32, mode, 1, 2)
    assert max(errors) <= 1e-4, errors


@settings(max_examples=12, deadline=None)
@given(N=st.integers(16, 300), mode=st.sampled_from(["full", "sparse"]),
       block_size=st.sampled_from([8, 16, 64]), seed=st.integers(0, 2**16))
def test_grads_float64_exact(N, mode, block_size, seed):
    q, k, v, mask = _inputs(1, 2, N, 24, torch.float64, seed, masked=True)
    n = math.ceil(N / block_size)
    errors = _grads_vs_reference(q, k, v, mask, 2 * n, mode, 0, 0, block_size)
    assert max(errors) <= 1e-10, errors


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_grads(dtype, tol):
    q, k, v, _ = _inputs(1, 2, 96, 32, torch.float32, seed=5, masked=False)
    half = [x.to(dtype) for x in (q, k, v)]
    errors = _grads_vs_reference(*half, None, 6, "full", 0, 0)
    assert max(errors) <= tol, errors
    leaves = [x.clone().requires_grad_() for x in half]
    op(*leaves, None, 6).sum().backward()
    assert all(x.grad.dtype == dtype for x in leaves)


@pytest.mark.parametrize("shape", [(150, 40), (128, 64)])  # padded, and not
@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_training_keeps_the_float32_output(dtype, mode, shape):
    # The forward of a training call (attention_fwd's exact_out) returns a half-precision
    # result's output in float32, as the float32 kernels compute it (P v in float32 with
    # the bf16 micro-kernels); the caller gets its rounding, and the backward's
    # D_t = g . out reads it instead of running the forward's kernels again
    # (forward.exact_output_dtype).
    N, D = shape
    q, k, v, _ = _inputs(1, 3, N, D, torch.float32, seed=3, masked=False)
    x = [t.to(dtype) for t in (q, k, v)]
    nb = 12
    out, *saved = torch.ops.mra.attention_fwd(*x, None, None, nb, mode, exact_out=True)
    plain = torch.ops.mra.attention_fwd(*x, None, None, nb, mode)[0]
    assert len(saved) == 6 and out.shape == (1, 3, N, D) and plain.dtype == dtype
    if dtype == torch.float32:
        assert out.dtype == torch.float32 and torch.equal(out, plain)
        return
    assert out.dtype == torch.float32
    want = op(*(t.float() for t in x), None, nb, mode)  # the float32 kernels, same inputs
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    leaves = [t.clone().requires_grad_() for t in x]
    result = op(*leaves, None, nb, mode)
    assert result.dtype == dtype and torch.equal(result, out.to(dtype))
    with build.trace_kernel_calls() as calls:
        result.backward(torch.randn(result.shape, generator=torch.Generator().manual_seed(1)
                                    ).to(dtype))
    forward_kernels = {"pool_and_logits", "hires_units", "lowres_out", "hires_rows"}
    assert calls and not forward_kernels & {c["op"] for c in calls}
    assert all(x.grad.dtype == dtype for x in leaves)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_half_precision(dtype):
    # The fake forward's shapes and dtypes (the float32 output of exact_out) match the
    # kernels'.
    q, k, v, _ = _inputs(1, 2, 70, 16, torch.float32, seed=1, masked=False)
    args = tuple(x.to(dtype).requires_grad_() for x in (q, k, v)) + (None, 6, "full")
    fwd_args = args[:4] + (None,) + args[4:] + (32, 0, 1)  # (query_mask after mask)
    result = torch.library.opcheck(torch.ops.mra.attention_fwd.default, fwd_args,
                                   {"exact_out": True})
    assert all(v == "SUCCESS" for v in result.values()), result


def test_mask_gets_no_gradient_and_padding_grads_are_zero():
    q, k, v, mask = _inputs(2, 2, 80, 16, torch.float32, seed=9, masked=True)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    op(*leaves, mask, 6).sum().backward()
    padded = mask == 0
    for x in leaves:
        assert torch.all(x.grad.permute(0, 2, 1, 3)[padded] == 0)


@pytest.mark.parametrize("mask_kind", [None, "mask"])
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_opcheck_with_autograd(mask_kind, mode):
    q, k, v, mask = _inputs(2, 2, 70, 16, torch.float32, seed=1, masked=mask_kind == "mask")
    args = tuple(x.requires_grad_() for x in (q, k, v)) + (mask, 6, mode)
    result = torch.library.opcheck(op.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    fwd_args = args[:4] + (None,) + args[4:] + (32, 0, 1)  # (query_mask after mask)
    result = torch.library.opcheck(torch.ops.mra.attention_fwd.default, fwd_args,
                                   {"exact_out": True})
    assert all(v == "SUCCESS" for v in result.values()), result


class TinyMRALayer(torch.nn.Module):
    """A small MRA transformer layer: projections, the op, output projection, MLP."""

    def __init__(self, hidden=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(2 * hidden, hidden))
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, 3, self.heads, C // self.heads).permute(
            2, 0, 3, 1, 4)
        a = op(q, k, v, mask, 2 * ((N + 31) // 32), "full")
        x = x + self.out(a.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(x)


def _train_step(model, x, y, mask, lr=0.05):
    loss = ((model(x, mask) - y) ** 2).mean()
    loss.backward()
    with torch.no_grad():  # SGD, written out: torch.optim graph-breaks on purpose
        for p in model.parameters():
            p.sub_(lr * p.grad)
            p.grad = None
    return loss.detach()


def test_compiled_training_step_matches_eager(monkeypatch, fresh_dynamo):
    monkeypatch.setattr(torch._dynamo.config, "trace_autograd_ops", True)
    torch.manual_seed(0)
    eager = TinyMRALayer()
    compiled = copy.deepcopy(eager)
    x, y = torch.randn(2, 100, 32), torch.randn(2, 100, 32)
    mask = torch.ones(2, 100)
    mask[1, 80:] = 0
    step = torch.compile(_train_step, fullgraph=True)
    for _ in range(3):
        le = _train_step(eager, x, y, mask)
        lc = step(compiled, x, y, mask)
        assert torch.allclose(le, lc, rtol=1e-5, atol=1e-6)
    for pe, pc in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(pe, pc, rtol=1e-5, atol=1e-6)


def test_compiled_backward_dynamic_shapes(fresh_dynamo):
    def loss_fn(q, k, v):
        return op(q, k, v, None, 8).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for N in (96, 160):
        q, k, v, _ = _inputs(1, 2, N, 16, torch.float32, seed=N, masked=False)
        e = [x.clone().requires_grad_() for x in (q, k, v)]
        c = [x.clone().requires_grad_() for x in (q, k, v)]
        loss_fn(*e).backward()
        compiled(*c).backward()
        for a, b in zip(e, c):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
