"""Inputs in an attention layer's layout: q, k, v that are [B, N, H, D] tensors seen as
[B, H, N, D] (the heads split off the hidden dim) are read in place by the kernels'
heads-last variant (``inputs.reads_heads_last``; CPU, float32): the same bits as the
copy into the kernels' own layout, within the float64 oracle's tolerance. That variant
writes the output as [B, N, H, D] too, which the op returns as its [B, H, N, D] view."""
import pytest
import torch
from conftest import RTOL_FP32, as64, make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import build, inputs
from mra_compile.reference import mra2_reference
from mra_compile.targets import cpu

op = torch.ops.mra.attention


def layer_views(seed, B, H, N, D, Hkv=None):
    """q [B, H, N, D] and k, v [B, Hkv, N, D] as transposed views of [B, N, ., D] tensors."""
    q, k, v = make_qkv(seed, B, H, N, D)
    k, v = k[:, :Hkv or H], v[:, :Hkv or H]
    return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))


def traced(*args, **kw):
    """The op's output and the ``heads_last`` flags of the kernels it launched."""
    with build.trace_kernel_calls() as calls:
        out = op(*args, **kw)
    return out, {c["op"]: bool(c["static"].get("heads_last")) for c in calls}


def assert_layout(out, heads_last: bool):
    """``out`` [B, H, N, D] is a view of a [B, N, H, D] tensor (what an attention layer
    transposes it back to, then at no cost), or contiguous."""
    back = out.transpose(1, 2)
    if heads_last:
        assert back.is_contiguous()
        assert back.contiguous().data_ptr() == out.data_ptr()
    else:
        assert out.is_contiguous()


def copied(*args, **kw):
    """The op's output with the inputs copied into the kernels' layout."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv(inputs.HEADS_LAST_ENV, "0")
        out, flags = traced(*args, **kw)
    assert not any(flags.values())
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.sampled_from([2, 4]),
       group=st.sampled_from([1, 2]), N=st.sampled_from([64, 256, 300]),
       D=st.sampled_from([16, 40, 64]), mode=st.sampled_from(["full", "sparse"]),
       per_row=st.integers(1, 5), padded=st.booleans())
def test_layer_layout_matches_the_copy_and_the_oracle(seed, B, H, group, N, D,
                                                      mode, per_row, padded):
    """Whole blocks and head dims of a multiple of 16 are read in place (pooling and
    both unit kernels), others through the copy; grouped key/value heads and key padding
    masks included. The output is the copy path's, bit for bit, laid out as [B, N, H, D]
    where the kernels read the inputs so."""
    Hkv = H // group
    q, k, v = layer_views(seed, B, H, N, D, Hkv)
    mask = None
    if padded:
        mask = torch.arange(N)[None, :] < torch.tensor([N, max(1, N // 3)])[:B, None]
    kw = dict(block_per_row=per_row, approx_mode=mode, enable_gqa=group > 1)
    with torch.no_grad():
        out, flags = traced(q, k, v, mask, **kw)
        assert torch.equal(out, copied(q, k, v, mask, **kw))
    readers = {name for name in flags if name in ("pool_and_logits", "hires_units", "hires_rows")}
    in_place = N % 32 == 0 and D % 16 == 0
    assert {flags[name] for name in readers} == {in_place}
    assert_layout(out, in_place)
    sel = mra_compile.block_selection(q, k, v, mask, **kw)
    kk, vv = (x.repeat_interleave(group, dim=1) for x in (k, v))
    ref = mra2_reference(as64(q), as64(kk), as64(vv), None if mask is None else as64(mask.float()),
                         selection=sel, **{**kw, "enable_gqa": False})
    err = ((out.double() - ref).abs().amax((-1, -2))
           / ref.abs().amax((-1, -2)).clamp_min(1e-30)).max()
    assert err <= RTOL_FP32


def test_overflow_units_read_the_layer_layout_too():
    """A row with more blocks than its row unit holds: the overflow units
    (``hires_units``) read q, k, v in place as well."""
    q, k, v = layer_views(3, 1, 2, 1024, 64)
    q.transpose(1, 2)[:, :32] *= 0.01  # (query block 0: flat scores, many blocks)
    kw = dict(num_blocks=600, approx_mode="sparse")
    with torch.no_grad():
        out, flags = traced(q, k, v, None, **kw)
        assert flags.get("hires_units") is True and flags["hires_rows"] is True
        assert torch.equal(out, copied(q, k, v, None, **kw))
    assert_layout(out, True)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_bf16_reads_the_layer_layout_on_its_micro_kernels(mode):
    """bf16 q, k, v on the AVX-512-BF16 micro-kernels: read in place too (the key and
    value blocks [1, b, 1, D] regions of the inputs), the same bits as the copy; on other
    CPUs bf16 is computed in float32 copies."""
    q, k, v = (x.transpose(1, 2).bfloat16().transpose(1, 2)
               for x in layer_views(8, 2, 4, 256, 64))
    kw = dict(block_per_row=3, approx_mode=mode)
    with torch.no_grad():
        out, flags = traced(q, k, v, None, **kw)
        assert torch.equal(out, copied(q, k, v, None, **kw))
    assert flags["hires_rows"] == cpu.bf16_products()
    assert out.dtype == torch.bfloat16
    assert_layout(out, flags["hires_rows"])


@pytest.mark.parametrize("case", ["contiguous", "gradient", "float16", "other transpose"])
def test_other_inputs_are_copied(case, monkeypatch):
    """Contiguous inputs, a call whose gradient is wanted (the backward's kernels read the
    kernels' own layout), float16 on float32 copies (``MRA_COMPILE_CPU_WIDEN=0``, or no
    F16C; read in place otherwise: tests/test_cpu_widened.py) and other strides: no
    heads-last kernel."""
    q, k, v = layer_views(5, 2, 2, 128, 32)
    if case == "contiguous":
        q, k, v = (x.contiguous() for x in (q, k, v))
    elif case == "float16":
        monkeypatch.setenv(cpu.WIDEN_ENV, "0")
        q, k, v = (x.transpose(1, 2).half().transpose(1, 2) for x in (q, k, v))
    elif case == "other transpose":
        q, k, v = (x.contiguous().transpose(2, 3).contiguous().transpose(2, 3)
                   for x in (q, k, v))
    grad = case == "gradient"
    with torch.set_grad_enabled(grad):
        if grad:
            q.requires_grad_()
        out, flags = traced(q, k, v, None, 12)
        if grad:
            out.sum().backward()
    assert not any(flags.values())
    assert_layout(out, False)


def test_an_attention_layers_round_trip():
    """What an attention layer does with the op: heads split off the hidden dim, the
    output merged back into it (a view: no copy), the output laid out as SDPA's for the
    same inputs, and the values equal to the op on contiguous copies of the inputs."""
    B, N, H, D = 2, 256, 4, 32
    hidden = torch.randn(3, B, N, H * D, generator=torch.Generator().manual_seed(4))
    q, k, v = (x.view(B, N, H, D).transpose(1, 2) for x in hidden)
    with torch.no_grad():
        out = op(q, k, v, None, 3)
        assert out.stride() == torch.nn.functional.scaled_dot_product_attention(q, k, v).stride()
        merged = out.transpose(1, 2).reshape(B, N, H * D)
        assert merged.data_ptr() == out.data_ptr()
        assert torch.equal(merged, op(*(x.contiguous() for x in (q, k, v)), None, 3)
                           .transpose(1, 2).reshape(B, N, H * D))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_projections_values_are_copied_beside_the_rest(dtype):
    """ModernBERT's layout: q and k transposed views of [B, N, H, D] tensors (its rotary
    embedding makes them new tensors), v a slice of the fused [B, N, 3, H, D] projection.
    The kernels read q and k in place and a [B, N, H, D] copy of v (one copy instead of
    three), first call and replays alike: the bits of the copy path, in the layer's
    layout."""
    from mra_compile import memory

    B, N, H, D = 2, 256, 4, 64
    fused = torch.randn(B, N, 3, H, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    q, k, v = (x.transpose(1, 2) for x in fused.unbind(2))
    q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    assert not v.transpose(1, 2).is_contiguous()
    mra_compile.clear_workspace()
    kw = dict(block_per_row=3, approx_mode="full")
    micro = dtype == torch.float32 or cpu.bf16_products()
    with torch.no_grad():
        expected = copied(q, k, v, None, **kw)
        out, flags = traced(q, k, v, None, **kw)
        replays = [op(q, k, v, None, **kw) for _ in range(2)]
    assert flags["hires_rows"] == micro
    for x in (out, *replays):
        assert torch.equal(x, expected)
        assert_layout(x, micro)
    if micro:
        (plan,) = [p for p in memory.WORKSPACE.plans.values() if p is not None]
        assert {name: c[-1] for name, c in plan.copies.items()} == {"v": True}
        assert plan.transposed == {"q", "k", "out"}
