"""Hardening of the op's boundaries: sizes the kernels' 32-bit indexing cannot address are
a ValueError before anything large is allocated; torch.func transforms work; a second
differentiation, forward-mode AD and out-of-range integers are clear errors."""
import pytest
import torch
from conftest import run_python

import mra_compile
from mra_compile import options, validate

# One (batch, head) row whose overflow units alone need more than 2**31 elements: N=16384,
# D=256, every one of the 2048 x 2048 blocks of 8 tokens selected, 1.4 million units of
# 8 x 256. (Larger batches are split into rows until each part fits: test below.)
TOO_BIG = r"""
import json, resource, sys
import torch
import mra_compile
# A few GB of data: the scratch (>= 13 GB) can only be refused, never allocated. n = 2560
# blocks of 8, every block selected: the overflow units' [n, units, 8, 256] buffer is past
# 2**31 elements whatever the knobs (rows' own units take at most 16 blocks, overflow
# units at most 4: >= 636 units a row). (At n = 2048 a host's tuning records of 12 and 4
# made it 2048 x 509 x 8 x 256, just under 2**31: an 8.5 GB allocation, refused by the
# limit as a RuntimeError.)
resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
q = torch.randn(1, 1, 20480, 256)
try:
    mra_compile.mra_attention(q, q, q, num_blocks=2560 * 2560, block_size=8)
    print(json.dumps({"raised": None}))
except Exception as e:
    print(json.dumps({"raised": type(e).__name__, "message": str(e),
                      "value_error": isinstance(e, ValueError)}))
"""


def test_unit_scratch_beyond_32_bit_indexing_is_a_value_error_before_allocation(tmp_path):
    report = run_python(TOO_BIG, env={"MRA_COMPILE_CACHE_DIR": str(tmp_path)}, timeout=600)
    assert report.get("value_error"), report
    assert "num_blocks" in report["message"] and "2**31" in report["message"]


def test_scratch_check_names_the_buffer():
    validate.check_scratch("x", 2, 3)
    with pytest.raises(ValueError, match=r"overflow-unit buffer of 13 x 86016 x 8 x 256"):
        validate.check_scratch("overflow-unit", 13, 86016, 8, 256)


# (B, H, Hkv): split by batch, by heads; with grouped heads by key/value heads (each with
# its query heads), and with one key/value head by query heads (each part reading it whole)
@pytest.mark.parametrize("shape", [(4, 3, 3), (1, 6, 6), (1, 6, 3), (1, 4, 1), (2, 4, 1)])
@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("form", ["2d", "sdpa"])  # the mask [B, N] 0/1, or [B, 1, 1, N] bool
def test_calls_beyond_32_bit_scratch_run_in_parts(monkeypatch, shape, mode, form):
    """Issue 15, item 2: B=8, H=32, N=16384, D=128, 8 blocks per row passed validation and
    overflowed the int32 offsets of the per-unit tensors (blockIdx.x * U * b * Dp). Such a
    call now runs in parts of whole rows, each within the limit; here the limit is lowered
    so that a small call needs the split (before: a ValueError). With grouped heads the
    split had cut k, v at the query heads' ranges ("start (2) + length (2) exceeds
    dimension size (2)", 2026-12-08); a split by heads leaves the mask whole, in every
    form it may take (an SDPA-shaped one too)."""
    B, H, Hkv = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, 200, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hkv, 200, 16, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.ones(B, 200)
    mask[-1, 150:] = 0
    if form == "sdpa":
        mask = (mask != 0)[:, None, None, :]

    def run():
        out = mra_compile.mra_attention(q, k, v, mask, num_blocks=20, approx_mode=mode,
                                        enable_gqa=Hkv < H)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        return out, grads

    sizes = []
    check = validate.check_scratch
    monkeypatch.setattr(validate, "check_scratch",
                        lambda name, *shape: (sizes.append(torch.Size(shape).numel()),
                                              check(name, *shape))[1])
    expected = run()
    largest, per_row = max(sizes), max(sizes) // (B * H)
    limit = max(largest // 3, 4 * per_row)
    monkeypatch.setattr(validate, "SCRATCH_LIMIT", limit)
    sizes.clear()
    out, grads = run()
    # a whole call (forward or backward) was refused, then its parts ran
    refused = [i for i, size in enumerate(sizes) if size >= limit]
    assert refused and sum(size < limit for size in sizes[refused[0]:]) >= 2, sizes
    torch.testing.assert_close(out, expected[0], rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _qkv(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, 80, 16, generator=g, dtype=dtype)


def _attention(x):
    return mra_compile.mra_attention(x, x, x, num_blocks=5)


def test_torch_func_grad_and_jacrev_match_autograd():
    q = _qkv()
    x = q.clone().requires_grad_()
    _attention(x).pow(2).sum().backward()
    grad = torch.func.grad(lambda y: _attention(y).pow(2).sum())(q)
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(_attention)(q[:, :1, :40])
    x = q[:, :1, :40].clone().requires_grad_()
    _attention(x).sum().backward()
    torch.testing.assert_close(jac.sum(dim=(0, 1, 2, 3)), x.grad, rtol=1e-10, atol=1e-10)


def test_second_differentiation_is_a_clear_error():
    x = _qkv().requires_grad_()
    (g,) = torch.autograd.grad(_attention(x).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="differentiating MRA-2 attention twice"):
        g.sum().backward()
    with pytest.raises(NotImplementedError, match="differentiating MRA-2 attention twice"):
        torch.func.grad(lambda y: torch.func.grad(lambda z: _attention(z).sum())(y).sum())(
            _qkv())


@pytest.mark.parametrize("how", ["jvp", "jacfwd", "dual"])
@pytest.mark.parametrize("entry", ["mra_attention", "op"])
def test_forward_mode_ad_is_a_clear_error_not_a_dropped_tangent(how, entry):
    """The kernels have no forward-mode formula: a dual tensor's tangent was dropped (and
    torch.func.jvp returned a zero tangent, silently); now each entry point refuses it.
    Dual tensors without a tangent still run."""
    import torch.autograd.forward_ad as fwAD

    x = _qkv()
    if entry == "mra_attention":
        def f(y):
            return _attention(y)
    else:
        def f(y):
            return torch.ops.mra.attention(y, y, y, None, 5, "full")
    with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
        if how == "jvp":
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        elif how == "jacfwd":
            torch.func.jacfwd(f)(x[:, :1, :8])
        else:
            with fwAD.dual_level():
                f(fwAD.make_dual(x, torch.ones_like(x)))
    with fwAD.dual_level():  # (a dual level, no tangent: the usual result)
        torch.testing.assert_close(f(x), _attention(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_blocks=2**63), "num_blocks"),
    (dict(num_blocks=4, initial_prior_first_n_blocks=2**63), "initial_prior_first_n_blocks"),
    (dict(num_blocks=4, initial_prior_diagonal_n_blocks=2**64), "initial_prior_diagonal_n_blocks"),
    (dict(block_per_row=2**63), "block_per_row"),
])
def test_integers_beyond_int64_are_value_errors_naming_the_argument(kwargs, name):
    q = _qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match=name):
        mra_compile.mra_attention(q, q, q, **kwargs)


def test_huge_block_per_row_selects_every_block():
    q = _qkv(dtype=torch.float32)
    n = -(-q.shape[2] // 32)
    every = mra_compile.mra_attention(q, q, q, block_per_row=n)
    assert torch.equal(mra_compile.mra_attention(q, q, q, block_per_row=2**62), every)
    assert options.budget(2**62, 4096, 32) == 2**31 * 128  # capped: within int64


MISALIGNED = r"""
import json
import torch
import mra_compile
errors = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    B, H, N, D = 1, 2, 96, 64
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4 * B * H * N * D + 1, generator=g).to(dtype)
    # contiguous views one element past an aligned address (a slice of a larger buffer)
    q, k, v, dout = base[1:].view(4, B, H, N, D).unbind(0)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]  # views, still misaligned
    copies = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    mask = torch.ones(B, N)
    mask[:, 80:] = 0
    outs = []
    for inputs, grad in ((leaves, dout), (copies, dout.clone())):
        out = mra_compile.mra_attention(*inputs, mask, num_blocks=6)
        out.backward(grad)
        outs.append([out.float()] + [x.grad.float() for x in inputs])
    assert leaves[0].data_ptr() % 16
    errors[str(dtype)] = max(float((a - b).abs().max()) for a, b in zip(*outs))
print(json.dumps(errors))
"""


def test_misaligned_views_are_copied_before_the_kernels():
    """Issue 15, item 5: q, k, v (and the upstream gradient) that are contiguous views at
    an odd offset reached the kernels as they were; their vector loads need aligned
    buffers (this segfaulted on the CPU). In a subprocess: a regression crashes it."""
    errors = run_python(MISALIGNED)
    assert errors == {"torch.float32": 0.0, "torch.float16": 0.0, "torch.bfloat16": 0.0}
