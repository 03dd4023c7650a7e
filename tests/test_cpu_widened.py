"""float16, and bfloat16 without the bf16 micro-kernels, on the CPU: the kernels that read
q, k, v (forward and backward) read them where they lie and widen each value to float32
as they read it (``targets.cpu.widened_in_place``, ``Kernel.static``'s ``widened``); P,
dS, every product and sum stay float32, so the result and the gradients are the float32
op's on the rounded inputs, rounded, bit for bit, as they were when the op computed on
float32 copies of them (``MRA_COMPILE_CPU_WIDEN=0``, which still does). The training
forward's float32 output comes from the widened kernels' float32-output variant.
bfloat16 is widened where the CPU has no AVX-512-BF16 (here: ``MRA_COMPILE_CPU_BF16=0``,
set by ``widening``)."""
import contextlib
import os

import pytest
import torch
from conftest import make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import aot, build, targets
from mra_compile.targets import cpu

DTYPES = [pytest.param(torch.float16, marks=pytest.mark.skipif(
    "f16c" not in mra_compile.host.cpu_flags(), reason="no F16C: fp16 on float32 copies")),
    torch.bfloat16]
MODES = st.sampled_from(["full", "sparse"])
WIDENED = {"pool_and_logits", "hires_units", "hires_rows", "bwd_dkdv_ds_units", "bwd_dq_ds_units"}


@contextlib.contextmanager
def widening(dtype, **env):
    """Inputs of ``dtype`` widened as read (bf16: no micro-kernels), and ``env`` set."""
    env = {**env, cpu.BF16_ENV: "0"} if dtype == torch.bfloat16 else env
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _traced(fn):
    """fn()'s result and the (op, static) of every kernel it launched."""
    with build.trace_kernel_calls() as calls:
        result = fn()
    return result, [(c["op"], c["static"]) for c in calls]


def _grads(fn, xs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def _against_float32(call, qkv, grad_out=None):
    """(what ``call`` returns on ``qkv``: [out] or, given ``grad_out`` (a training call),
    [out, dq, dk, dv]; the kernels it launched; the same from the float32 inputs)."""
    as32 = [x.float() for x in qkv]
    if grad_out is not None:
        got, launched = _traced(lambda: _grads(call, qkv, grad_out))
        return got, launched, _grads(call, as32, grad_out)
    with torch.no_grad():
        got, launched = _traced(lambda: [call(*qkv)])
        return got, launched, [call(*as32)]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), Hkv=st.integers(1, 2),
       group=st.sampled_from([1, 2]), N=st.integers(1, 300), Nk=st.integers(1, 300),
       cross=st.booleans(), D=st.sampled_from([8, 33, 64]), mode=MODES,
       masked=st.booleans(), block_size=st.sampled_from([16, 32, 64]),
       budget=st.integers(1, 4), train=st.booleans())
def test_the_same_bits_as_the_float32_op_on_the_rounded_inputs(dtype, seed, B, Hkv, group, N,
                                                                Nk, cross, D, mode, masked,
                                                                block_size, budget, train):
    """Inference and training (output and gradients of q, k, v), self- and
    cross-attention, padding masks, grouped heads, partial blocks, odd head dims."""
    H, Nk = Hkv * group, Nk if cross else N
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g).to(dtype) for _ in range(2))
    mask = (torch.rand(B, Nk, generator=g) < 0.8) if masked else None
    if mask is not None:
        mask[:, 0] = True
    kw = dict(block_per_row=budget, approx_mode=mode, block_size=block_size,
              enable_gqa=group > 1)

    def call(*x):
        return mra_compile.mra_attention(*x, mask, **kw)

    grad_out = torch.randn(B, H, N, D, generator=g).to(dtype).float()  # (its values)
    with widening(dtype):
        got, launched, want = _against_float32(call, (q, k, v), grad_out if train else None)
    assert all(x.dtype == dtype for x in got)
    for a, b in zip(got, want):
        assert torch.equal(a, b.to(dtype))
    # The kernels that read q, k, v read them in their dtype, widened.
    reading = [s for op, s in launched if op in WIDENED]
    name = str(dtype).removeprefix("torch.")
    assert reading and all(s.get("io") == name and s.get("widened") for s in reading)
    assert not any("micro" in s for _, s in launched)
    assert not train or {"bwd_dkdv_ds_units", "bwd_dq_ds_units"} <= {op for op, _ in launched}
    if train:  # (the training forward's hires_rows: its float32-output variant)
        assert any(op == "hires_rows" and s.get("split_pv") for op, s in launched)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_switched_off_it_computes_on_float32_copies_with_the_same_bits(dtype, mode):
    q, k, v = (x.to(dtype) for x in make_qkv(3, 1, 3, 200, 64))
    with torch.no_grad():
        with widening(dtype):
            assert targets.CPU.io_dtype(dtype) == dtype
            out, launched = _traced(lambda: torch.ops.mra.attention(q, k, v, None, 20, mode))
        assert any(s.get("widened") for _, s in launched)
        with widening(dtype, **{cpu.WIDEN_ENV: "0"}):
            assert targets.CPU.io_dtype(dtype) == torch.float32
            copied, launched = _traced(lambda: torch.ops.mra.attention(q, k, v, None, 20, mode))
    assert not any("io" in s for _, s in launched)
    assert torch.equal(out, copied)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_views_are_read_in_place(dtype):
    """q, k, v as transposed views of [B, N, H, D] tensors (an attention layer's): read
    where they lie (the heads-last variant, widened), the output such a view too."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).to(dtype)
               for x in make_qkv(5, 2, 4, 256, 64))
    assert not q.is_contiguous()
    with torch.no_grad(), widening(dtype):
        out, launched = _traced(lambda: torch.ops.mra.attention(q, k, v, None, 24, "full"))
        want = torch.ops.mra.attention(q.float(), k.float(), v.float(), None, 24, "full")
    assert any(s.get("heads_last") and s.get("widened") for _, s in launched)
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, want.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_library_for_the_dtype_has_the_widened_kernels(dtype):
    name = str(dtype).removeprefix("torch.")
    with widening(dtype):
        variants = list(aot.variants([32], [64], [name], target=targets.CPU))
    assert {op for op, s in variants if s.get("widened")} == WIDENED
    # (the training forward's, and the backward's recomputation after a forward without
    # ``exact_out``: P is float32 anyway, the output float32)
    assert any(op == "hires_rows" and s.get("widened") and s.get("split_pv")
               for op, s in variants)
    assert not any(op in WIDENED and "io" not in s for op, s in variants)  # (no float32 copies)


@pytest.mark.parametrize("train", [False, True])
def test_bf16_in_other_blocks_than_the_micro_kernels_take_is_widened(train):
    """bf16 in 64-token blocks where the CPU has the bf16 micro-kernels (32-token blocks
    only): widened, the float32 op's bits; in 32-token blocks the micro-kernels."""
    q, k, v = (x.bfloat16() for x in make_qkv(7, 1, 2, 300, 64))
    grad = torch.randn(1, 2, 300, 64).bfloat16().float()

    def call(*x):
        return mra_compile.mra_attention(*x, block_per_row=2, block_size=64)

    got, launched, want = _against_float32(call, (q, k, v), grad if train else None)
    assert all(torch.equal(a, b.bfloat16()) for a, b in zip(got, want))
    assert all(s.get("widened") and "micro" not in s for op, s in launched if op in WIDENED)
    assert targets.CPU.micro_kernels(torch.bfloat16) == (
        "avx512_bf16" if cpu.bf16_products() else None)


def test_only_the_cpu_s_kernels_that_read_q_k_v_widen():
    with pytest.raises(ValueError, match="no variant widening"):
        mra_compile.kernels.get("bwd_dq_units").static(32, 64, "float32", "float16",
                                                       widened=True)
    assert not targets.get("cuda-sm_90").widens(torch.float16)
    # (bf16 on the AVX-512-BF16 micro-kernels where the CPU has them: not widened)
    assert targets.CPU.widens(torch.bfloat16) == (not cpu.bf16_products())


def test_info_says_how_half_precision_computes(capsys, monkeypatch):
    from mra_compile import cli

    monkeypatch.setenv(cpu.BF16_ENV, "0")
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines()
                if x.startswith("CPU half precision: "))
    widened = "read in place, widened to float32 as read"
    assert line.endswith(f"bfloat16 {widened}")
    assert (f"float16 {widened};" in line) == cpu.widened_in_place(torch.float16)
    monkeypatch.setenv(cpu.WIDEN_ENV, "0")
    assert cpu.half_precision() == "float16 float32 copies; bfloat16 float32 copies"
