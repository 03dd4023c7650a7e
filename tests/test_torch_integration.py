"""torch.ops.mra.attention as a citizen of torch: opcheck, torch.compile, meta tensors."""

import pytest
import torch
import torch._dynamo
from conftest import make_qkv, padded_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import mra_compile

op = torch.ops.mra.attention

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


OPCHECK_CASES = {
    "no-mask": lambda: (*make_qkv(0, 2, 2, 96, 24), None, 5),
    "mask": lambda: (*make_qkv(0, 2, 2, 96, 24), padded_mask(96, [96, 70]), 5, "full", 32, 1, 2),
    "sparse-bool-mask": lambda: (*make_qkv(0, 2, 3, 70, 33), padded_mask(70, [1, 64], torch.bool),
                                 4, "sparse"),
    "fp16": lambda: (*make_qkv(0, 1, 2, 100, 16, dtype=torch.float16), padded_mask(100, [77]), 7),
    "bf16-block16": lambda: (*make_qkv(0, 2, 1, 50, 8, dtype=torch.bfloat16), None, 3, "full", 16),
    "non-contiguous": lambda: (*(x.transpose(1, 2) for x in make_qkv(0, 1, 40, 2, 16)), None, 2),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    args = OPCHECK_CASES[name]()
    result = torch.library.opcheck(torch.ops.mra.attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("name", ["mask", "fp16", "non-contiguous"])
def test_opcheck_inference_op(name):
    q, k, v, mask, *rest = OPCHECK_CASES[name]()
    result = torch.library.opcheck(torch.ops.mra.attention_inference.default,
                                   (q, k, v, mask, None, *rest))
    assert all(v == "SUCCESS" for v in result.values()), result


def pointwise_around(q, k, v, mask):
    x = op(torch.tanh(q) * 2, k + 1, v, mask, 6, "full", 32, 1, 0)
    y = op(q, k, v * 0.5, mask, 3, "sparse")
    return torch.relu(x) * 0.5 + y.sigmoid()


def test_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(0, 2, 2, 96, 24)
    mask = padded_mask(96, [96, 61])
    compiled = torch.compile(pointwise_around, fullgraph=True)
    expected = pointwise_around(q, k, v, mask)
    got = compiled(q, k, v, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got_none = compiled(q, k, v, None)
    torch.testing.assert_close(got_none, pointwise_around(q, k, v, None), rtol=1e-5, atol=1e-6)


def test_compile_dynamic_shapes_match_eager():
    def fn(q, k, v, mask):
        out = op(q * 1.5, k, v, mask, 7, "full")
        return out - v.mean(dim=2, keepdim=True)

    # Sizes chosen so that no two dims coincide (duck sizing) and none is 0 or 1
    # (always specialised): one graph must then serve every shape.
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for B, N in [(2, 96), (4, 160), (5, 130)]:
        q, k, v = make_qkv(N, B, 3, N, 16)
        mask = padded_mask(N, [N - i * 7 for i in range(B)])
        torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), rtol=1e-5,
                                   atol=1e-6)
    assert counter.frame_count == 1


def test_compile_dynamic_num_blocks_from_shape_matches_eager():
    # num_blocks computed from N (the block_per_row convention) under dynamic shapes.
    def fn(q, k, v, mask):
        return mra_compile.mra_attention(q, k, v, mask, block_per_row=2) + 1

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for B, N in [(1, 96), (2, 160), (3, 130)]:
        q, k, v = make_qkv(N, B, 2, N, 16)
        mask = padded_mask(N, [N - i * 7 for i in range(B)])
        torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), rtol=1e-5,
                                   atol=1e-6)


def test_compile_dynamic_block_per_row_does_not_recompile():
    """The default budget (block_per_row) over 20 lengths: one graph (at most two), and the
    recompile limit (8) is never reached; the results are the eager ones."""
    def fn(q, k, v, mask):
        return mra_compile.mra_attention(q, k, v, mask) * 2

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for i, N in enumerate(range(37, 37 + 20 * 23, 23)):
            q, k, v = make_qkv(N, 2, 3, N, 16)
            mask = padded_mask(N, [N, N - i - 1]) if i % 2 else None
            torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), rtol=0, atol=0)
    assert counter.frame_count <= 2


def test_export_nn_module_with_a_dynamic_length():
    from mra_compile.nn import MRASelfAttention

    module = MRASelfAttention(32, 2).eval()
    x, mask = torch.randn(2, 100, 32), padded_mask(100, [100, 71])
    seq = torch.export.Dim("seq", min=2, max=4096)
    exported = torch.export.export(module, (x, mask),
                                   dynamic_shapes=({1: seq}, {1: seq}))
    for N in (100, 257, 40):
        x, mask = torch.randn(2, N, 32), padded_mask(N, [N, N // 2])
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x, mask), module(x, mask), rtol=0,
                                       atol=0)


def test_compile_half_precision():
    q, k, v = make_qkv(0, 1, 2, 64, 16, dtype=torch.bfloat16)

    def fn(q, k, v):
        return op(q, k, v, None, 3) * 2

    got = torch.compile(fn, fullgraph=True)(q, k, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, fn(q, k, v), rtol=0, atol=0)


def test_compile_half_precision_training():
    # A compiled training step keeps the float32 output for the backward as eager
    # training does (attention_fwd's exact_out): the same output and gradients, bit for bit.
    q, k, v = make_qkv(0, 1, 2, 64, 16, dtype=torch.bfloat16)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).bfloat16()

    def fn(q, k, v):
        return op(q, k, v, None, 3) * 2

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*leaves)
        out.backward(grad)
        results.append((out.detach(), *(t.grad for t in leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# mra::attention_fwd as AOTInductor packages built by 49359fd and earlier call it (no
# arguments or outputs have changed since the options took their present form).
PACKAGED_FWD_SCHEMA = (
    "mra::attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? query_mask, "
    "int? num_blocks=None, str approx_mode=\"full\", int block_size=32, "
    "int initial_prior_first_n_blocks=0, int initial_prior_diagonal_n_blocks=0, "
    "float? scale=None, int? block_per_row=None, bool enable_gqa=False) -> (Tensor out, "
    "Tensor stats, Tensor pooled, Tensor logits, Tensor high_mask, Tensor rowmax, "
    "Tensor index)")


def test_attention_fwd_still_takes_the_calls_of_packages():
    # An AOTInductor package calls attention_fwd as its schema was when it was built; one
    # whose node has other outputs does not load ("Serialized node doesn't match operator
    # ... schema outputs", seen with a package of 49359fd against a 7th output). So the
    # outputs stay, and new arguments come last, with defaults.
    def described(args):
        return [(a.name, str(a.type), a.default_value, a.kwarg_only) for a in args]

    now = torch.ops.mra.attention_fwd.default._schema
    then = torch._C.parse_schema(PACKAGED_FWD_SCHEMA)
    assert described(now.returns) == described(then.returns)
    kept = len(then.arguments)
    assert described(now.arguments[:kept]) == described(then.arguments)
    assert all(a.has_default_value() for a in now.arguments[kept:])


# mra::attention_inference as AOTInductor packages built since it exists call it (an
# inference graph's node): like attention_fwd's, its output stays and new arguments come
# last, with defaults.
PACKAGED_INFERENCE_SCHEMA = (
    "mra::attention_inference(Tensor q, Tensor k, Tensor v, Tensor? mask, "
    "Tensor? query_mask, int? num_blocks=None, str approx_mode=\"full\", int block_size=32, "
    "int initial_prior_first_n_blocks=0, int initial_prior_diagonal_n_blocks=0, "
    "float? scale=None, int? block_per_row=None, bool enable_gqa=False) -> Tensor")


def test_attention_inference_keeps_the_schema_of_packages():
    def described(args):
        return [(a.name, str(a.type), a.default_value, a.kwarg_only) for a in args]

    now = torch.ops.mra.attention_inference.default._schema
    then = torch._C.parse_schema(PACKAGED_INFERENCE_SCHEMA)
    assert described(now.returns) == described(then.returns)
    kept = len(then.arguments)
    assert described(now.arguments[:kept]) == described(then.arguments)
    assert all(a.has_default_value() for a in now.arguments[kept:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_inference_graph_runs_the_inference_kernels(dtype):
    # With nothing to differentiate a compiled graph calls attention_inference (the eager
    # call's kernels and launch replay), not attention_fwd's training forward, and gives
    # the eager output bit for bit, in float32 and bf16 (whose training forward rounds
    # differently); with a gradient, attention_fwd.
    q, k, v = make_qkv(5, 2, 2, 96, 16, dtype=dtype)

    def fn(q, k, v):
        return op(q, k, v, None, 5, "full") * 2

    compiled = torch.compile(fn, fullgraph=True)
    with torch.no_grad():
        compiled(q, k, v)  # (compiles)
        got = {}
        seen = _ops_seen(lambda: got.setdefault("out", compiled(q, k, v)))
        assert "mra::attention_inference" in seen and "mra::attention_fwd" not in seen
        assert torch.equal(got["out"], fn(q, k, v))
    # Without no_grad, inputs that need no gradient: inference too.
    assert "mra::attention_fwd" not in _ops_seen(lambda: compiled(q, k, v))
    qg = q.clone().requires_grad_()
    assert "mra::attention_fwd" in _ops_seen(lambda: compiled(qg, k, v))


LAYOUTS = ("contiguous", "heads-last", "fused-qkv", "permuted")


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` [B, H, N, D] with the same values in another memory layout."""
    B, H, N, D = x.shape
    if layout == "heads-last":  # (an attention layer's view of [B, N, H, D])
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "fused-qkv":  # (a slice of a fused projection [B, N, 3, H, D]: not dense)
        fused = torch.zeros(B, N, 3, H, D, dtype=x.dtype)
        fused[:, :, 1] = x.transpose(1, 2)
        return fused[:, :, 1].transpose(1, 2)
    if layout == "permuted":  # (dense, [D, B, N, H] in memory)
        return x.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0)
    return x


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(20, 130),
       D=st.sampled_from([8, 16, 20]), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       mode=st.sampled_from(["full", "sparse"]), seed=st.integers(0, 2**16))
def test_inference_op_output_is_laid_out_as_its_fake(B, H, N, D, layout, dtype, mode, seed):
    # A compiled graph reads attention_inference's output by its fake's strides (Inductor
    # asserts them): torch.empty_like(q)'s, for any layout of q (dense or not, a partial
    # last block or a converted dtype, whose kernels write another layout), with the
    # values of the op's plain eager call.
    q, k, v = (_laid_out(x, layout) for x in make_qkv(seed, B, H, N, D, dtype=dtype))
    blocks = max(1, (-(-N // 32)) ** 2 // 3)
    with torch.no_grad():
        got = torch.ops.mra.attention_inference(q, k, v, None, None, blocks, mode)
        fake = torch.ops.mra.attention_inference(
            *(torch.empty_strided(x.shape, x.stride(), dtype=dtype, device="meta")
              for x in (q, k, v)), None, None, blocks, mode)
        expected = op(q, k, v, None, blocks, mode)
    assert got.stride() == fake.stride() == torch.empty_like(q).stride()
    assert got.dtype == fake.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("N", [128, 100])
def test_compiled_inference_of_an_attention_layers_views(N):
    # q, k, v as an attention layer passes them (transposed [B, N, H, D] views) and the
    # output transposed back, under Inductor: read in place (N = 128) or through a copy
    # (N = 100: a partial last block), the compiled graph gives the eager output.
    x = torch.randn(2, N, 3, 16, generator=torch.Generator().manual_seed(N))
    q, k, v = (x * s for s in (1.0, 0.5, 2.0))

    def layer(q, k, v):
        out = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 7, "full")
        return out.transpose(1, 2).reshape(2, N, 48) + 1

    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True)(q, k, v)
        torch.testing.assert_close(got, layer(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_meta_tensors(dtype, masked):
    q, k, v = (torch.empty(2, 3, 100, 33, dtype=dtype, device="meta") for _ in range(3))
    mask = torch.ones(2, 100, device="meta") if masked else None
    out = op(q, k, v, mask, 4, "sparse", 16, 1, 1)
    assert out.device.type == "meta"
    assert out.shape == (2, 3, 100, 33) and out.dtype == dtype
    # An attention layer's transposed [B, N, H, D] views give a result laid out as
    # torch.empty_like(q) is, as the inference op gives it (see its layout test below).
    qt, kt, vt = (torch.empty(2, 100, 3, 33, dtype=dtype, device="meta").transpose(1, 2)
                  for _ in range(3))
    out = op(qt, kt, vt, mask, 4)
    assert out.shape == (2, 3, 100, 33) and out.stride() == qt.stride()


def test_meta_tensors_still_validate():
    q, k, v = (torch.empty(2, 3, 100, 33, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="num_blocks"):
        op(q, k, v, None, 0)
    with pytest.raises(ValueError, match="mask"):
        op(q, k, v, torch.ones(2, 99, device="meta"), 4)
    with pytest.raises(ValueError, match="block_size"):
        op(q, k, v, None, 4, "full", 24)


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        q = mode.from_tensor(torch.randn(1, 2, 70, 8))
        out = op(q, q, q, None, 3)
        assert out.shape == (1, 2, 70, 8) and out.dtype == torch.float32


def _ops_seen(fn) -> set[str]:
    """Names of the ops the profiler records while ``fn`` runs (no dispatch mode: it
    leaves the op's own choice of path alone)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_plain_eager_call_skips_the_second_dispatch_with_the_same_result():
    q, k, v = make_qkv(3, 2, 2, 96, 24)
    mask = padded_mask(96, [96, 61])
    with torch.no_grad():
        got = {}
        seen = _ops_seen(lambda: got.setdefault("out", op(q, k, v, mask, 5, "full")))
    assert "mra::attention" in seen and "mra::attention_fwd" not in seen
    # With something to differentiate, the call goes through attention_fwd (its autograd).
    qg = q.clone().requires_grad_()
    kept = {}
    seen = _ops_seen(lambda: kept.setdefault("out", op(qg, k, v, mask, 5, "full")))
    assert "mra::attention_fwd" in seen
    assert torch.equal(got["out"], kept["out"].detach())
    # Under no_grad, inputs that require gradients take the direct path too.
    with torch.no_grad():
        assert "mra::attention_fwd" not in _ops_seen(lambda: op(qg, k, v, mask, 5, "full"))
    # The user API likewise (its autograd.Function only where there is a gradient).
    api = {}
    with torch.no_grad():
        seen = _ops_seen(lambda: api.setdefault("out", mra_compile.mra_attention(
            q, k, v, mask, num_blocks=5)))
    assert "mra::attention_fwd" not in seen
    assert torch.equal(api["out"], got["out"])
    assert "mra::attention_fwd" in _ops_seen(
        lambda: mra_compile.mra_attention(qg, k, v, mask, num_blocks=5))


def test_dispatch_modes_still_see_the_forward_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = make_qkv(4, 1, 2, 64, 16)
    with torch.no_grad(), Names() as mode:
        out = op(q, k, v, None, 4, "sparse")
    assert "mra.attention_inference.default" in mode.names
    with torch.no_grad():
        torch.testing.assert_close(out, op(q, k, v, None, 4, "sparse"), rtol=0, atol=0)
