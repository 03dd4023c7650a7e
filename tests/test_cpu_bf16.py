"""bf16 on CPUs with AVX-512-BF16: the forward's block products on the bf16 micro-kernels
(schedules/cpu_bf16.c, tensorized by schedules/cpu_bf16.py) with float32 sums, chosen
by the CPU target from the CPU's features; float32 everywhere else.

Against the float64 oracle on the bf16-rounded inputs with the op's own selection, bf16
tolerance (1e-2 of each row's largest output: q k and P v are bf16 products, each rounded
once more than the float32 path). The tests that need the instructions are skipped on a
CPU without them; the choice itself is checked everywhere.
"""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from conftest import as64, c_function, c_library, make_qkv, n_blocks, padded_mask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import aot, build, host, inputs, kernels, knob_policy
from mra_compile.reference import mra2_reference
from mra_compile.targets import cpu

op = torch.ops.mra.attention
RTOL_BF16 = 1e-2
needs_bf16 = pytest.mark.skipif(not cpu.bf16_products(),
                                reason="this CPU has no AVX-512-BF16 (bf16 runs in float32)")


def _row_rel_err(out, ref):
    err = (out.double() - ref).abs().amax(dim=(-1, -2))
    return (err / ref.abs().amax(dim=(-1, -2)).clamp_min(1e-30)).max().item()


def _check(q, k, v, mask, *, query_mask=None, **kw):
    out = mra_compile.mra_attention(q, k, v, mask, query_mask=query_mask, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    sel = mra_compile.block_selection(q, k, v, mask, query_mask=query_mask, **kw)
    ref = mra2_reference(as64(q), as64(k), as64(v), as64(mask), query_mask=as64(query_mask),
                         selection=sel, **kw)
    err = _row_rel_err(out, ref)
    assert err <= RTOL_BF16, f"relative error {err:.3g} > {RTOL_BF16}"
    return out


@needs_bf16
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 300), D=st.sampled_from([16, 40, 64, 100, 128]),
       padded=st.booleans(), mode=st.sampled_from(["full", "sparse"]),
       bpr=st.integers(1, 6), scale=st.sampled_from([None, 0.3]))
def test_bf16_products_match_the_reference(seed, B, H, N, D, padded, mode, bpr, scale):
    q, k, v = make_qkv(seed, B, H, N, D, dtype=torch.bfloat16)
    mask = padded_mask(N, [max(1, N - 37 * b) for b in range(B)]) if padded else None
    out = _check(q, k, v, mask, block_per_row=bpr, approx_mode=mode, scale=scale)
    if mask is not None:
        assert torch.all(out.transpose(1, 2)[mask == 0] == 0)


@needs_bf16
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_bf16_rows_with_different_overflow_units(mode):
    # 17 block rows, 10 selected blocks per row: block rows with none, one or several
    # overflow units beside each other (hires_rows skips the units a row lacks).
    q, k, v = make_qkv(5, 1, 2, 520, 64, dtype=torch.bfloat16)
    _check(q, k, v, None, block_per_row=10, approx_mode=mode)


@needs_bf16
@pytest.mark.parametrize("D, blocks_per_unit, heads_last",
                         [(64, 1, False), (64, 1, True), (128, 2, False), (256, 3, False),
                          (304, 1, True)])
def test_bf16_overflow_units_of_one_block_and_wide_heads(D, blocks_per_unit, heads_last):
    # Overflow units (hires_units) in bf16 failed to build with one block a unit (which
    # the tuning records of the Zen 5 and Intel hosts pick for short sequences) and at
    # head dims from 128 on: TVM gave the unit's bf16 queries' buffer to its float32
    # logits, then rejected the micro-kernels' typed pointers into it (now addresses of
    # loads: schedules/extern_calls.py, ``pointer``); and a unit of one slot bound one
    # block of v where the P v call takes all of v (schedules/cpu.py, ``_called``).
    from mra_compile.forward import mra_forward
    from mra_compile.options import Options

    q, k, v = make_qkv(5, 1, 2, 544, D, dtype=torch.bfloat16)  # 17 whole block rows
    if heads_last:  # (read where they lie: the kernels' [B, N, H, D] variant)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    kw = dict(block_per_row=10, approx_mode="sparse")
    # (row units of 8 blocks whatever this CPU's records say: some rows overflow)
    knobs = {"hires_rows": {"row_unit_blocks": 8},
             "hires_units": {"blocks_per_unit": blocks_per_unit}}
    with build.trace_kernel_calls() as calls, torch.no_grad():
        out = mra_forward(q, k, v, None, Options(**kw), knobs=knobs)
    (units,) = [c for c in calls if c["op"] == "hires_units"]
    assert units["knobs"]["blocks_per_unit"] == blocks_per_unit
    assert units["static"].get("heads_last", False) == heads_last
    sel = mra_compile.block_selection(q, k, v, None, **kw)
    ref = mra2_reference(as64(q), as64(k), as64(v), None, selection=sel, **kw)
    err = _row_rel_err(out, ref)
    assert err <= RTOL_BF16, f"relative error {err:.3g} > {RTOL_BF16}"


@needs_bf16
@pytest.mark.parametrize("Nq, Nk", [(70, 130), (130, 40)])
def test_bf16_cross_and_grouped_heads(Nq, Nk):
    g = torch.Generator().manual_seed(Nq)
    q = torch.randn(2, 4, Nq, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, Nk, 64, generator=g).bfloat16() for _ in range(2))
    _check(q, k, v, padded_mask(Nk, [Nk, Nk - 20]), query_mask=padded_mask(Nq, [Nq - 5, Nq]),
           block_per_row=3, enable_gqa=True)


@needs_bf16
@pytest.mark.parametrize("D", [8, 300])
def test_bf16_head_dims_beyond_one_vector_tile(D):
    # D = 8 pads to 16 (one vector); D = 300 pads to 304 (P v in chunks of 256 dims).
    q, k, v = make_qkv(D, 1, 2, 130, D, dtype=torch.bfloat16)
    _check(q, k, v, None, block_per_row=3)


@needs_bf16
def test_small_head_dims_keep_p_in_float32():
    # A head whose outputs all cancel in P v (D = 1, three queries): with P rounded to
    # bf16 its outputs erred by 1.5e-2 of the largest; below forward.SMALL_HEAD_DIM an
    # inference call takes the micro-kernels' float32-P variant too (the output rounded
    # once, at the end), larger head dims keep the bf16 P v.
    from mra_compile import forward

    g = torch.Generator().manual_seed(35)
    N = int(torch.randint(1, 40, (1,), generator=g))
    q, k, v = (torch.randn(1, 3, N, 1, generator=g).bfloat16() for _ in range(3))
    with build.trace_kernel_calls() as calls:
        _check(q, k, v, None, block_per_row=1, approx_mode="full")
    assert {c["static"]["micro"] for c in calls if c["op"] == "hires_rows"} == {
        "avx512_bf16_fp32_pv"}
    D = forward.SMALL_HEAD_DIM
    q, k, v = make_qkv(3, 1, 2, 70, D, dtype=torch.bfloat16)
    with build.trace_kernel_calls() as calls:
        _check(q, k, v, None, block_per_row=2)
    assert {c["static"]["micro"] for c in calls if c["op"] == "hires_rows"} == {"avx512_bf16"}


@pytest.mark.parametrize("D", [48, 80])
def test_the_intrinsics_are_one_per_head_dim_whatever_its_type(D):
    # A schedule gives the head dim as a loop extent (a TVM IntImm) or as a Python int;
    # either way the same intrinsics, registered once (TVM refuses a name registered
    # twice: the cache had one entry per type, so the second registered again and failed).
    # (No micro-kernel is built: registering intrinsics compiles nothing.)
    from tvm import tirx

    from mra_compile.schedules import cpu_bf16

    for make in (int, lambda d: tirx.IntImm("int32", d)):
        assert cpu_bf16.intrinsics(make(D)) == (f"mra_bf16_qk_d{D}", f"mra_bf16_pairs_d{D}")
        assert cpu_bf16.intrinsics(make(D), heads_last=True)[0] == f"mra_bf16_qk_d{D}_heads_last"
        assert cpu_bf16.block_pv_intrinsic(make(D)) == f"mra_bf16_pv_d{D}"
        assert cpu_bf16.float32_pv_intrinsic(make(D)) == f"mra_bf16_pv_f32_d{D}"
        assert cpu_bf16.gathered_pv_intrinsic(make(D)) == f"mra_bf16_pv_d{D}_gathered"


def test_a_failed_micro_kernel_build_says_what_to_do(monkeypatch, tmp_path):
    from mra_compile.schedules import cpu_bf16

    monkeypatch.setenv(host.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(cpu_bf16, "FLAGS", (*cpu_bf16.FLAGS, "-DUNCACHED"))
    with pytest.raises(RuntimeError, match="MRA_COMPILE_CPU_BF16=0"):
        cpu_bf16.objects()


@needs_bf16
def test_bf16_training():
    # The backward's unit kernels take bf16 too (P / Z and dS rounded to bf16 for their
    # products, dO exact; D_t from the output computed again in float32):
    # gradients agree with the float64 oracle's within the bf16 tolerance.
    q, k, v = (t.requires_grad_() for t in make_qkv(3, 1, 2, 200, 64, dtype=torch.bfloat16))
    kw = dict(block_per_row=4)
    out = mra_compile.mra_attention(q, k, v, None, **kw)
    grad = torch.randn_like(out)
    out.backward(grad)
    sel = mra_compile.block_selection(q, k, v, None, **kw)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mra2_reference(*x64, None, selection=sel, **kw).backward(grad.double())
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in x64)):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).abs().max() <= RTOL_BF16 * want.abs().max()


@needs_bf16
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 200), D=st.sampled_from([16, 40, 64, 128]), padded=st.booleans(),
       mode=st.sampled_from(["full", "sparse"]), bpr=st.integers(1, 5),
       scale=st.sampled_from([None, 0.3, 2.0]), grouped=st.booleans())
# (found by this test: dq off by 1.09% of the largest gradient while the backward's block
# products took g = dO / Z rounded to bf16; 0.31% with dO itself and 1/Z applied to P)
@example(seed=2, B=2, H=2, N=2, D=128, padded=False, mode="sparse", bpr=1, scale=2.0,
         grouped=True)
def test_bf16_gradients_match_the_reference(seed, B, H, N, D, padded, mode, bpr, scale, grouped):
    # Within the bf16 tolerance of the largest gradient entry, against the float64 oracle on
    # the same bf16 inputs and blocks (masks, grouped-query heads, peaky scales). (Not of
    # each gradient's own: with one key, dq and dk vanish but for the spec's 1e-6 terms,
    # ~1e-7, below the rounding of their float32 terms, the float32 path's included.)
    q, k, v = make_qkv(seed, B, 2 * H if grouped else H, N, D, dtype=torch.bfloat16)
    if grouped:
        k, v = k[:, :H].contiguous(), v[:, :H].contiguous()
    mask = padded_mask(N, [max(1, N - 37 * b) for b in range(B)]) if padded else None
    kw = dict(block_per_row=bpr, approx_mode=mode, scale=scale, enable_gqa=grouped)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = mra_compile.mra_attention(*x, mask, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).bfloat16()
    out.backward(grad)
    sel = mra_compile.block_selection(q, k, v, mask, **kw)
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    mra2_reference(*x64, as64(mask), selection=sel, **kw).backward(grad.double())
    largest = max(t.grad.abs().max().item() for t in x64)
    for got, want in zip((t.grad for t in x), (t.grad for t in x64)):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        err = (got.double() - want).abs().max().item()
        assert err <= RTOL_BF16 * largest, f"{err:.3g} of {largest:.3g}"


@needs_bf16
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_the_backward_output_pass_keeps_p_in_float32(mode):
    # The backward's second pass (the float32 output, for D_t) on the micro-kernels'
    # variant with float32 P v equals the float32 kernels' on float32 copies within the
    # float32 tolerance: q k^T is exact in bf16 products, and P is not rounded.
    import dataclasses

    from mra_compile import forward
    from mra_compile.options import Options

    q, k, v = make_qkv(7, 1, 3, 300, 64, dtype=torch.bfloat16)
    opts = Options(40, mode)
    _, saved = forward.mra_forward(q, k, v, None, opts, save=True)
    outs = []
    exact = dataclasses.replace(inputs.prepare(q, k, v, None, 32), float32_pv=True)
    assert exact.static("hires_rows", True)["micro"] == "avx512_bf16_fp32_pv"
    for pr in (exact, inputs.prepare(q.float(), k.float(), v.float(), None, 32)):
        R, Np, Dp = pr.q.shape
        out = torch.zeros(R, Np // 32, 32, Dp)
        knobs = knob_policy.knobs_for_shape(None, 300, 64, 32, pr.target)
        forward.exact_and_combine(pr, saved.index, saved.logits, saved.rowmax,
                                  saved.high_mask if mode == "full" else None,
                                  saved.pooled[2], mode == "full", knobs, out,
                                  torch.zeros(3, R, Np // 32, 32))
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@needs_bf16
def test_bf16_kernels_call_the_micro_kernels():
    # The kernels that read q, k, v (forward and backward), bwd_prep (its g is their
    # operand) and bwd_finish (it writes the bf16 gradients, for grouped heads too: it
    # sums their partials itself) are the bf16 variants, and the libraries of
    # those that take products hold the micro-kernels; every other kernel and every
    # float32 one is not.
    q, k, v = make_qkv(4, 1, 2, 100, 64, dtype=torch.bfloat16)
    pr = inputs.prepare(q, k, v, None, 32)
    assert pr.q.dtype == torch.bfloat16
    for name in ("pool_and_logits", "hires_units", "hires_rows"):
        static = pr.static(name, True)
        assert static["io"] == "bfloat16" and static["micro"] == "avx512_bf16"
    for name in ("bwd_prep", "bwd_dq_ds_units", "bwd_dkdv_ds_units", "bwd_finish"):
        assert pr.static(name)["micro"] == "avx512_bf16"
    assert "micro" not in pr.static("bwd_lowres") and "io" not in pr.static("bwd_lowres")
    grouped = inputs.prepare(q, k[:, :1], v[:, :1], None, 32)  # (2 query heads a key head)
    assert grouped.group == 2
    assert grouped.static("bwd_finish") == {**pr.static("bwd_finish"), "gqa": True}
    for name, full in (("hires_rows", True), ("bwd_dkdv_ds_units", None),
                       ("bwd_dq_ds_units", None)):
        static = pr.static(name, full)
        knobs = knob_policy.resolve_knobs(name, None, target=pr.target)
        build.kernel(name, knobs, pr.target, **static)
        path = next(e["path"] for e in reversed(mra_compile.cache_events())
                    if e["op"] == name and e["static"] == static)
        symbols = subprocess.run(["nm", path], capture_output=True, text=True).stdout
        assert all(f"mra_bf16_{m}" in symbols for m in ("qk", "pv", "pairs")), name
        # the inference output rounded and stored by a call (hires_rows' "out")
        calls = str(build.scheduled_func(name, static, knobs, pr.target))
        assert ("mra_bf16_store_rows" in calls) == (name == "hires_rows"), name
    f32 = inputs.prepare(q.float(), k.float(), v.float(), None, 32)
    assert "micro" not in f32.static("hires_rows", True) and "io" not in f32.static("hires_rows", True)
    assert "micro" not in f32.static("bwd_prep") and "io" not in f32.static("bwd_prep")
    assert "io" not in f32.static("bwd_finish")


def test_the_cpu_target_chooses_bf16_products_from_the_cpu(monkeypatch):
    target = cpu.CPU
    assert target.io_dtype(torch.float32) == torch.float32
    assert target.io_dtype(torch.float16) == (
        torch.float16 if cpu.widened_in_place(torch.float16) else torch.float32)
    has = "avx512_bf16" in host.cpu_flags() and "avx512bw" in host.cpu_flags()
    # bf16 on the micro-kernels where the CPU has them, else widened as read (the float32
    # kernels' arithmetic: tests/test_cpu_widened.py); the same for the backward's kernels.
    assert target.io_dtype(torch.bfloat16) == torch.bfloat16
    assert target.micro_kernels(torch.bfloat16) == ("avx512_bf16" if has else None)
    assert target.widens(torch.bfloat16) == (not has)
    # The micro-kernels take 32-token blocks only: another block size widened.
    assert target.io_dtype(torch.bfloat16, 64) == torch.bfloat16
    assert target.micro_kernels(torch.bfloat16, block_size=64) is None
    assert target.widens(torch.bfloat16, 64)
    monkeypatch.setenv(cpu.BF16_ENV, "0")  # (switched off: widened)
    assert target.io_dtype(torch.bfloat16) == torch.bfloat16
    assert target.micro_kernels(torch.bfloat16) is None and target.widens(torch.bfloat16)
    monkeypatch.setenv(cpu.WIDEN_ENV, "0")  # (and not widened: float32 copies)
    assert target.io_dtype(torch.bfloat16) == torch.float32
    monkeypatch.delenv(cpu.BF16_ENV)
    monkeypatch.delenv(cpu.WIDEN_ENV)
    monkeypatch.setenv(cpu.TARGET_ENV, '{"kind": "llvm", "mcpu": "x86-64"}')
    assert target.io_dtype(torch.bfloat16) == torch.float32  # another CPU targeted


def test_switched_off_bf16_is_the_float32_op_rounded(monkeypatch):
    monkeypatch.setenv(cpu.BF16_ENV, "0")
    q, k, v = make_qkv(5, 1, 2, 90, 40, dtype=torch.bfloat16)
    out = op(q, k, v, None, 9, "full")
    want = op(q.float(), k.float(), v.float(), None, 9, "full").bfloat16()
    assert torch.equal(out, want)


def test_ahead_of_time_variants_follow_the_target():
    got = {(name, tuple(sorted(s.items()))) for name, s in aot.variants(
        [32], [64], ("float32", "bfloat16"), target=cpu.CPU)}
    micro = {name for name, s in got if dict(s).get("micro")}
    if cpu.bf16_products():
        assert micro == {"pool_and_logits", "hires_units", "hires_rows", "bwd_prep",
                         "bwd_dq_ds_units", "bwd_dkdv_ds_units", "bwd_finish"}
        # with grouped heads, bwd_finish's grouped variant too (bf16 gradients summed
        # over a key/value head's query heads)
        grouped = [s for name, s in aot.variants([32], [64], ("bfloat16",), gqa=True,
                                                 target=cpu.CPU) if name == "bwd_finish"]
        assert sorted(bool(s.get("gqa")) for s in grouped) == [False, True]
        assert all(s["io"] == "bfloat16" for s in grouped)
    else:
        assert not micro
    # No variant twice (float32 and bf16 share the kernels that do not read q, k, v).
    assert len(got) == len(list(aot.variants([32], [64], ("float32", "bfloat16"),
                                             target=cpu.CPU)))
    # A bf16-only library holds the kernels of the backward's second forward pass (its
    # output in float32, for D_t): with the micro-kernels, their float32 P v variant.
    alone = {(name, tuple(sorted(s.items()))) for name, s in aot.variants(
        [32], [64], ("bfloat16",), target=cpu.CPU)}
    second = {name for name, s in alone if dict(s).get("micro") == "avx512_bf16_fp32_pv"}
    assert second == ({"hires_units", "hires_rows"} if cpu.bf16_products() else set())
    assert "lowres_out" in {name for name, _ in alone}
    assert n_blocks(64) == 2


@needs_bf16
@pytest.mark.parametrize("offset", [0, 1])  # (1: a dst not 32-byte aligned, plain stores)
@pytest.mark.parametrize("D", [48, 64])  # (64: whole 64-byte lines a store where aligned)
def test_the_output_store_rounds_as_torch(tmp_path, offset, D):
    # mra_bf16_store_rows (hires_rows' bf16 output) against torch's rounding, bit for bit:
    # ties both ways, the largest finite values, infinities, signed zeros.
    import ctypes

    from mra_compile.schedules import cpu_bf16

    store = c_function(tmp_path, cpu_bf16.SOURCE, cpu_bf16.FLAGS, "mra_bf16_store_rows")
    rows, lds, ldd = 5, 72, 64
    g = torch.Generator().manual_seed(0)
    src = torch.randn(rows, lds, generator=g) * torch.logspace(-30, 30, lds)
    bits = src.view(torch.int32)
    bits[0, :16] = (bits[0, :16] & ~0xFFFF) | 0x8000  # halfway: ties to even
    bits[1, :8] = (bits[1, :8] & ~0xFFFF) | 0x7FFF
    src[2, :6] = torch.tensor([3.4e38, -3.4e38, float("inf"), -float("inf"), 0.0, -0.0])
    dst = torch.zeros(offset + rows * ldd, dtype=torch.int16)
    store(ctypes.c_void_p(src.data_ptr()), lds,
          ctypes.c_void_p(dst.data_ptr() + 2 * offset), ldd, rows, D)
    got = dst[offset:].view(rows, ldd)
    assert torch.equal(got[:, :D], src[:, :D].bfloat16().view(torch.int16))
    assert not got[:, D:].any()


@pytest.fixture(scope="module")
def pairs_function(tmp_path_factory):
    """``mra_bf16_pairs`` through ctypes, built once for the drawn examples."""
    from mra_compile.schedules import cpu_bf16

    return c_function(tmp_path_factory.mktemp("pairs"), cpu_bf16.SOURCE, cpu_bf16.FLAGS,
                      "mra_bf16_pairs")


@needs_bf16
@settings(max_examples=25, deadline=None)
@given(pairs=st.integers(1, 20).map(lambda m: 8 * m),  # D = 16 ... 320
       pad=st.sampled_from([0, 8, 24]), seed=st.integers(0, 2**31 - 1))
@example(pairs=32, pad=0, seed=0)  # D = 64: two 16 x 16 tiles of pairs a row
@example(pairs=8, pad=8, seed=1)  # D = 16: one masked tail of 8 pairs
def test_the_queries_pairing_is_a_transpose_of_pairs(pairs_function, pairs, pad, seed):
    # mra_bf16_pairs (the unit's queries in vdpbf16ps's layout) against torch, bit for bit:
    # qp[p][t] = the 32-bit pair q[t][2p:2p + 2], for every head dim (D = 2 * pairs, a
    # multiple of 16) and row stride.
    import ctypes

    D, ldq = 2 * pairs, 2 * pairs + pad
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2**15, 2**15, (32, ldq), dtype=torch.int16, generator=g)
    qp = torch.full((pairs, 32), -1, dtype=torch.int32)
    pairs_function(ctypes.c_void_p(q.data_ptr()), ldq, ctypes.c_void_p(qp.data_ptr()), D)
    want = q[:, :D].contiguous().view(torch.int32).t()  # [pairs, 32]
    assert torch.equal(qp, want)


@pytest.fixture(scope="module")
def micro_kernels(tmp_path_factory):
    """The bf16 micro-kernels (``cpu_bf16.c``) through ctypes, built once for the drawn
    examples; ``mra_bf16_amx(want)`` switches their path."""
    from mra_compile.schedules import cpu_bf16

    return c_library(tmp_path_factory.mktemp("micro"), cpu_bf16.SOURCE, cpu_bf16.FLAGS)


# The micro-kernels' two paths: AVX-512-BF16 (vdpbf16ps) and AMX tiles (head dims that are
# a multiple of 32, where the CPU has AMX-BF16; on other CPUs the "amx" cases are skipped).
PATHS = ["avx512_bf16", pytest.param("amx", marks=pytest.mark.skipif(
    not cpu.amx_products(), reason="this CPU has no AMX-BF16"))]


# (the path is set once a test: every drawn example runs on it)
ONE_PATH = [HealthCheck.function_scoped_fixture]


@pytest.fixture(params=PATHS)
def path(request, micro_kernels):
    """The micro-kernels' path for a test, set and checked (AVX-512-BF16 after it)."""
    want = request.param == "amx"
    assert micro_kernels.mra_bf16_amx(int(want)) == want
    yield request.param
    micro_kernels.mra_bf16_amx(0)


@functools.cache
def _unit_probabilities():
    """The bf16 units' probabilities as the operators define them (``prob`` of
    ``operators._unit_attention`` with ``MICRO[0]``), compiled by TVM for this CPU as the
    kernels are (its FMAs contract the multiplies and adds):
    P[w, t] = rounded_probability(x[w, t], m[t], cap[w], scale)."""
    import tvm
    from tvm import te, tirx

    from mra_compile import operators

    W = te.var("W")
    x = te.placeholder((W, 32), "float32", "x")
    m = te.placeholder((32,), "float32", "m")
    cap = te.placeholder((W,), "float32", "cap")
    scale = tirx.Var("scale", "float32")
    P = te.compute((W, 32), lambda w, t: operators.rounded_probability(
        x[w, t], m[t], cap[w], scale), name="P")
    return tvm.compile(te.create_prim_func([x, m, cap, scale, P]), target=cpu.CPU.tvm_target())


@needs_bf16
@settings(max_examples=30, deadline=None, suppress_health_check=ONE_PATH)
@given(vectors=st.integers(1, 16), slots=st.integers(1, 12), tokens=st.integers(1, 20),
       pads=st.tuples(*(st.sampled_from([0, 16]) for _ in range(3))),
       empty=st.floats(0.0, 1.0), masked=st.floats(0.0, 1.0), scale=st.floats(0.05, 2.0),
       ask=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
@example(vectors=4, slots=4, tokens=8, pads=(0, 0, 0), empty=0.0, masked=0.0, scale=0.125,
         ask=3, seed=0)  # D = 64, one group
@example(vectors=8, slots=12, tokens=12, pads=(16, 0, 16), empty=0.3, masked=0.2, scale=1.0,
         ask=1, seed=1)  # three groups
@example(vectors=3, slots=5, tokens=6, pads=(0, 16, 0), empty=1.0, masked=0.0, scale=0.5,
         ask=3, seed=2)  # every slot empty
@example(vectors=6, slots=12, tokens=3, pads=(0, 0, 16), empty=0.0, masked=1.0, scale=0.5,
         ask=2, seed=3)  # D = 96, 2 groups, every key masked
def test_a_units_exps_sums_and_p_v_in_one_call(micro_kernels, path, vectors, slots, tokens,
                                               pads, empty, masked, scale, ask, seed):
    # mra_bf16_exp_pv_slots (hires_rows' and hires_units' exps, sums and P v, all of a
    # unit's slots in one call, empty slots -1 skipped) bit for bit against the operators'
    # own probabilities compiled by TVM: the sums in key order, and P v as mra_bf16_pv
    # called slot after slot onto zeros (the same sums in the same order: groups of
    # blocks; on AVX-512-BF16 dims paired by unpacks and put back in order, on AMX 32 dims
    # of tiles at a time); and against float64 sums of the bf16-rounded P and v. Masked
    # keys (cap -127) weigh exactly 0, their logits NaN or infinite included. D = 16 *
    # vectors (tails of 1-3 vectors past a multiple of 64 included, and head dims under
    # 64, which ask for the next unit's rows over the exps; on AMX, D = 16 mod 32 takes
    # the AVX-512 path), row strides of the logits, v and out padded; the requests for the
    # next unit's rows (ask) point into v.
    import ctypes

    import numpy as np
    import tvm

    from mra_compile import operators

    exp_pv, block_pv = micro_kernels.mra_bf16_exp_pv_slots, micro_kernels.mra_bf16_pv
    D = 16 * vectors
    W = 32 * slots
    ldx, ldv, ldo = 32 + pads[0], D + pads[1], D + pads[2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(W, ldx, generator=g) * 4
    v = (torch.randn(tokens * 32, ldv, generator=g) * 3).bfloat16()
    cols = torch.randint(0, tokens, (slots,), generator=g, dtype=torch.int32)
    cols[torch.rand(slots, generator=g) < empty] = -1
    real = torch.rand(W, generator=g) >= masked
    cap = torch.where(real, operators.EXP2_CAP, -operators.EXP2_CAP).float()
    x[~real, 0] = float("nan")
    x[~real, 1] = float("inf")
    counted = real & (cols.repeat_interleave(32) >= 0)
    m = torch.where(counted[:, None], x[:, :32] * scale, -torch.inf).amax(0)
    m = torch.where(torch.isfinite(m), m, torch.full_like(m, -1e5))  # (the units' -1e5)
    out, sums = torch.full((32, ldo), float("nan")), torch.full((32,), float("nan"))
    f32 = np.float32
    c = f32(scale) * f32(operators.LOG2_E)
    poly = [ctypes.c_float(p) for p in operators.EXP2_POLY_BF16[1:]]
    ptr = ctypes.c_void_p
    exp_pv(ptr(x.data_ptr()), ldx, ptr(m.data_ptr()), ptr(cap.data_ptr()), ctypes.c_float(c),
           ctypes.c_float(operators.LOG2_E), ctypes.c_float(operators.EXP2_CAP), *poly,
           ctypes.c_float(operators.EXP_SHIFTER), ptr(v.data_ptr()), ldv,
           ptr(cols.data_ptr()), slots, ptr(out.data_ptr()), ldo, ptr(sums.data_ptr()), D,
           ask, ptr(cols.data_ptr()), ptr(v.data_ptr()), ptr(v.data_ptr()), ptr(v.data_ptr()),
           ldv)
    P = tvm.runtime.tensor(np.empty((W, 32), np.float32))
    _unit_probabilities()(tvm.runtime.tensor(x[:, :32].contiguous().numpy()),
                          tvm.runtime.tensor(m.numpy()), tvm.runtime.tensor(cap.numpy()),
                          f32(scale), P)
    P = torch.from_numpy(P.numpy())
    assert (P[~real] == 0).all()
    want_sums = torch.zeros(32)
    each = torch.zeros(32, ldo)
    for w in range(W):  # (in key order, in float32, as the kernel sums)
        if cols[w // 32] >= 0:
            want_sums += P[w]
    for s in range(slots):
        if cols[s] >= 0:
            block_pv(ptr(P[32 * s:].data_ptr()), 32,
                     ptr(v[32 * int(cols[s]):].data_ptr()), ldv, ptr(each.data_ptr()), ldo, D)
    assert torch.equal(sums.view(torch.int32), want_sums.view(torch.int32))
    assert torch.equal(out[:, :D].view(torch.int32), each[:, :D].view(torch.int32))
    want = torch.zeros(32, D, dtype=torch.float64)
    for s in range(slots):
        if cols[s] >= 0:
            p = P[32 * s:32 * s + 32].bfloat16().double()  # [keys, queries]
            want += p.T @ v[32 * int(cols[s]):32 * int(cols[s]) + 32, :D].double()
    torch.testing.assert_close(out[:, :D].double(), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())


@needs_bf16
@settings(max_examples=30, deadline=None, suppress_health_check=ONE_PATH)
@given(vectors=st.integers(1, 20), pads=st.tuples(st.sampled_from([0, 8, 32]),
                                                  st.sampled_from([0, 16])),
       seed=st.integers(0, 2**31 - 1))
@example(vectors=4, pads=(0, 0), seed=0)  # D = 64
@example(vectors=3, pads=(8, 16), seed=1)  # D = 48: the AVX-512 path on either
def test_a_key_blocks_logits(micro_kernels, path, vectors, pads, seed):
    # mra_bf16_qk (out[w][t] = k[w] . q[t] over the queries paired by mra_bf16_pairs) on
    # either path against float64 sums of the same bf16 values; out's columns past the
    # block untouched. D = 16 * vectors, k's and out's row strides padded.
    import ctypes

    D = 16 * vectors
    ldk, ldo = D + pads[0], 32 + pads[1]
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(32, ldk, generator=g) * 4).bfloat16()
    q = torch.randn(32, D, generator=g).bfloat16()
    qp = q.view(torch.int32).t().contiguous()  # [D / 2, 32] pairs of dims
    got = torch.full((32, ldo), float("nan"))
    micro_kernels.mra_bf16_qk(ctypes.c_void_p(k.data_ptr()), ldk, ctypes.c_void_p(qp.data_ptr()),
                              ctypes.c_void_p(got.data_ptr()), ldo, D)
    want = k[:, :D].double() @ q.double().T
    torch.testing.assert_close(got[:, :32].double(), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
    assert got[:, 32:].isnan().all()


@pytest.mark.skipif(not cpu.amx_products(), reason="this CPU has no AMX-BF16")
def test_the_tiles_are_configured_again_after_other_amx_work(micro_kernels):
    # torch's bf16 matmuls (oneDNN) configure the AMX tiles their own way on the calling
    # thread; the micro-kernels' next calls must configure them back (they read the
    # configuration each call): the same bits as before, for q k^T and P v.
    import ctypes

    assert micro_kernels.mra_bf16_amx(1) == 1
    g = torch.Generator().manual_seed(5)
    k, q, v = (torch.randn(32, 64, generator=g).bfloat16() for _ in range(3))
    P = torch.rand(32, 32, generator=g)
    qp = q.view(torch.int32).t().contiguous()

    def products():
        logits, out = torch.empty(32, 32), torch.zeros(32, 64)
        micro_kernels.mra_bf16_qk(ctypes.c_void_p(k.data_ptr()), 64,
                                  ctypes.c_void_p(qp.data_ptr()),
                                  ctypes.c_void_p(logits.data_ptr()), 32, 64)
        micro_kernels.mra_bf16_pv(ctypes.c_void_p(P.data_ptr()), 32,
                                  ctypes.c_void_p(v.data_ptr()), 64,
                                  ctypes.c_void_p(out.data_ptr()), 64, 64)
        return logits, out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (oneDNN runs on this thread)
    try:
        first = products()
        for m, kk, n in [(7, 40, 9), (64, 96, 80), (3, 2048, 5)]:
            torch.mm(torch.randn(m, kk).bfloat16(), torch.randn(kk, n).bfloat16())
            again = products()
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)
        micro_kernels.mra_bf16_amx(0)
    want = k.double() @ q.double().T
    torch.testing.assert_close(first[0].double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_bf16
@settings(max_examples=30, deadline=None, suppress_health_check=ONE_PATH)
@given(vectors=st.integers(1, 16), pads=st.tuples(*(st.sampled_from([0, 16]) for _ in range(3))),
       seed=st.integers(0, 2**31 - 1))
@example(vectors=4, pads=(0, 0, 0), seed=0)  # D = 64
@example(vectors=5, pads=(16, 0, 16), seed=1)  # D = 80: the AVX-512 path on either
def test_the_float32_p_v_keeps_p_as_it_is(micro_kernels, path, vectors, pads, seed):
    # mra_bf16_pv_f32 (the training forward's P v, P not rounded: float32 FMAs, or on AMX
    # tiles P as three bf16 parts that sum to it) against float64 sums of the float32 P
    # and the bf16 v, added onto out: within float32 rounding of its terms (2^-18 of
    # sum_w P |v|, where rounding P to bf16 would miss by up to 2^-9 of each term, and P
    # in two bf16 parts by up to 2^-16). P spans six decades, as a softmax's does.
    import ctypes

    D = 16 * vectors
    ldp, ldv, ldo = 32 + pads[0], D + pads[1], D + pads[2]
    g = torch.Generator().manual_seed(seed)
    P = torch.exp(-14 * torch.rand(32, ldp, generator=g))
    v = (torch.randn(32, ldv, generator=g) * 3).bfloat16()
    start = torch.randn(32, ldo, generator=g)
    got = start.clone()
    micro_kernels.mra_bf16_pv_f32(ctypes.c_void_p(P.data_ptr()), ldp,
                                  ctypes.c_void_p(v.data_ptr()), ldv,
                                  ctypes.c_void_p(got.data_ptr()), ldo, D)
    p, vd = P[:, :32].double(), v[:, :D].double()  # [keys, queries], [keys, dims]
    want = start[:, :D].double() + p.T @ vd
    bound = 2.0**-18 * (p.T @ vd.abs() + start[:, :D].double().abs())
    assert ((got[:, :D].double() - want).abs() <= bound).all()
    assert torch.equal(got[:, D:], start[:, D:])


@needs_bf16
@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_the_micro_kernels_choose_the_tiles_as_the_target_says(tmp_path, setting):
    # The C side's choice (cpuid, Linux's permission, MRA_COMPILE_CPU_AMX, decided at the
    # first call of a process) agrees with cpu.amx_products() under the same setting:
    # each in a fresh process, the library's first question being which path it takes.
    import os

    from mra_compile.schedules import cpu_bf16

    lib = c_library(tmp_path, cpu_bf16.SOURCE, cpu_bf16.FLAGS)._name
    env = {k: v for k, v in os.environ.items() if k != cpu.AMX_ENV}
    if setting is not None:
        env[cpu.AMX_ENV] = setting
    script = ("import ctypes\nfrom mra_compile.targets import cpu\n"
              f"on = ctypes.CDLL({lib!r}).mra_bf16_amx(-1)\n"
              "print(on, int(cpu.amx_products()))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == out[1], out
    if setting == "0":
        assert out[0] == "0"


@needs_bf16
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_the_bf16_gradients_are_the_float32_ones_rounded(mode):
    # bwd_finish's bf16 variant (the gradients of bf16 q, k, v written as bf16) against its
    # float32 variant on the arguments of a real backward, rounded by torch: the same bits.
    from mra_compile import build

    q, k, v = (x.requires_grad_() for x in make_qkv(3, 1, 3, 200, 64, dtype=torch.bfloat16))
    out = mra_compile.mra_attention(q, k, v, block_per_row=3, approx_mode=mode)
    with build.trace_kernel_calls() as calls:
        out.backward(torch.randn_like(out))
    call = next(c for c in calls if c["op"] == "bwd_finish")
    assert call["static"]["io"] == "bfloat16"
    names = kernels.get("bwd_finish").arg_names(call["static"])
    args = list(call["args"])
    outs = [names.index(name) for name in ("dq", "dk", "dv")]
    got = [args[i].clone() for i in outs]
    for i in outs:
        args[i] = torch.full(args[i].shape, float("nan"))
    static = {key: val for key, val in call["static"].items() if key not in ("io", "micro")}
    build.kernel("bwd_finish", call["knobs"], call["target"], **static)(*args)
    for i, bits in zip(outs, got):
        assert torch.equal(args[i].bfloat16().view(torch.int16), bits.view(torch.int16))
