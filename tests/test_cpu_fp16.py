"""float16 on the CPU: the kernels that read q, k, v (forward and backward) read fp16 ones
where they lie and widen each value to float32 as they read it
(``targets.cpu.fp16_in_place``, ``Kernel.static``'s ``widened``); P, dS, every product
and sum stay float32, so the result and the gradients are the float32 op's on the
rounded inputs, rounded, bit for bit, as they were when the op computed on float32
copies of them (``MRA_COMPILE_CPU_FP16=0``, which still does). The training forward's
float32 output comes from the widened kernels' float32-output variant."""
import pytest
import torch
from conftest import make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import aot, build, targets
from mra_compile.targets import cpu

pytestmark = pytest.mark.skipif(not cpu.fp16_in_place(),
                                reason="this CPU has no F16C: fp16 runs on float32 copies")

MODES = st.sampled_from(["full", "sparse"])
WIDENED = {"pool_and_logits", "hires_units", "hires_rows", "bwd_dkdv_ds_units", "bwd_dq_ds_units"}


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


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), Hkv=st.integers(1, 2),
       group=st.sampled_from([1, 2]), N=st.integers(1, 300), Nk=st.integers(1, 300),
       cross=st.booleans(), D=st.sampled_from([8, 33, 64]), mode=MODES,
       masked=st.booleans(), block_size=st.sampled_from([16, 32, 64]),
       budget=st.integers(1, 4), train=st.booleans())
def test_the_same_bits_as_the_float32_op_on_the_rounded_inputs(seed, B, Hkv, group, N, Nk,
                                                                cross, D, mode, masked,
                                                                block_size, budget, train):
    """Inference and training (output and gradients of q, k, v), self- and
    cross-attention, padding masks, grouped heads, partial blocks, odd head dims."""
    H, Nk = Hkv * group, Nk if cross else N
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).half()
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g).half() for _ in range(2))
    mask = (torch.rand(B, Nk, generator=g) < 0.8) if masked else None
    if mask is not None:
        mask[:, 0] = True
    kw = dict(block_per_row=budget, approx_mode=mode, block_size=block_size,
              enable_gqa=group > 1)

    def call(*x):
        return mra_compile.mra_attention(*x, mask, **kw)

    if train:
        grad_out = torch.randn(B, H, N, D, generator=g).half().float()  # (fp16 values)
        got, launched = _traced(lambda: _grads(call, (q, k, v), grad_out))
        want = _grads(call, [x.float() for x in (q, k, v)], grad_out)
    else:
        with torch.no_grad():
            got, launched = _traced(lambda: [call(q, k, v)])
            want = [call(q.float(), k.float(), v.float())]
    assert all(x.dtype == torch.float16 for x in got)
    for a, b in zip(got, want):
        assert torch.equal(a, b.half())
    # The kernels that read q, k, v read them as fp16, widened.
    reading = [s for op, s in launched if op in WIDENED]
    assert reading and all(s.get("io") == "float16" and s.get("widened") for s in reading)
    assert not train or {"bwd_dkdv_ds_units", "bwd_dq_ds_units"} <= {op for op, _ in launched}
    if train:  # (the training forward's hires_rows: its float32-output variant)
        assert any(op == "hires_rows" and s.get("split_pv") for op, s in launched)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_switched_off_it_computes_on_float32_copies_with_the_same_bits(mode, monkeypatch):
    q, k, v = (x.half() for x in make_qkv(3, 1, 3, 200, 64))
    with torch.no_grad():
        out, launched = _traced(lambda: torch.ops.mra.attention(q, k, v, None, 20, mode))
        assert any(s.get("widened") for _, s in launched)
        monkeypatch.setenv(cpu.FP16_ENV, "0")
        assert targets.CPU.io_dtype(torch.float16) == torch.float32
        copied, launched = _traced(lambda: torch.ops.mra.attention(q, k, v, None, 20, mode))
    assert not any("io" in s for _, s in launched)
    assert torch.equal(out, copied)


def test_layer_views_are_read_in_place():
    """q, k, v as transposed views of [B, N, H, D] fp16 tensors (an attention layer's):
    read where they lie (the heads-last variant, widened), the output such a view too."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).half()
               for x in make_qkv(5, 2, 4, 256, 64))
    assert not q.is_contiguous()
    with torch.no_grad():
        out, launched = _traced(lambda: torch.ops.mra.attention(q, k, v, None, 24, "full"))
        want = torch.ops.mra.attention(q.float(), k.float(), v.float(), None, 24, "full")
    assert any(s.get("heads_last") and s.get("widened") for _, s in launched)
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, want.half())


def test_a_library_for_float16_has_the_widened_kernels():
    variants = list(aot.variants([32], [64], ["float16"], target=targets.CPU))
    assert {op for op, s in variants if s.get("widened")} == WIDENED
    # (the training forward's, and the backward's recomputation after a forward without
    # ``exact_out``: P is float32 anyway, the output float32)
    assert any(op == "hires_rows" and s.get("widened") and s.get("split_pv")
               for op, s in variants)
    assert not any(op in WIDENED and "io" not in s for op, s in variants)  # (no float32 copies)
    with pytest.raises(ValueError, match="no variant widening"):
        mra_compile.kernels.get("bwd_dq_units").static(32, 64, "float32", "float16",
                                                       widened=True)
