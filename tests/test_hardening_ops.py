"""Hardening of the op's boundaries: sizes the kernels' 32-bit indexing cannot address are
a ValueError before anything large is allocated; torch.func transforms work; a second
differentiation and out-of-range integers are clear errors."""
import pytest
import torch
from conftest import run_python

import mra_compile
from mra_compile import options, validate

# The example: 13 heads, N=4096, D=256, every one of the 512 x 512 blocks of 8
# tokens selected. The overflow units' scratch would need 13 x 86016 x 8 x 256 > 2**31
# elements; the kernels index it with int32 (it crashed in hires_units).
TOO_BIG = r"""
import json, resource, sys
import torch
import mra_compile
# A few GB of data: the scratch (8.8 GB) can only be refused, never allocated.
resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
q = torch.randn(1, 13, 4096, 256)
try:
    mra_compile.mra_attention(q, q, q, num_blocks=512 * 512, block_size=8)
    print(json.dumps({"raised": None}))
except Exception as e:
    print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
"""


def test_unit_scratch_beyond_32_bit_indexing_is_a_value_error_before_allocation(tmp_path):
    report = run_python(TOO_BIG, env={"MRA_COMPILE_CACHE_DIR": str(tmp_path)}, timeout=600)
    assert report["raised"] == "ValueError", report
    assert "num_blocks" in report["message"] and "2**31" in report["message"]


def test_scratch_check_names_the_buffer():
    validate.check_scratch("x", 2, 3)
    with pytest.raises(ValueError, match=r"overflow-unit buffer of 13 x 86016 x 8 x 256"):
        validate.check_scratch("overflow-unit", 13, 86016, 8, 256)


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
