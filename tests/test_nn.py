"""mra_compile.nn.MRASelfAttention: forward against a float64 oracle, config, torch.compile.

The oracle recomputes the module in float64 (same weights): projections, heads,
``mra_compile.reference.mra2_reference`` and the output projection. Block selection has
exact ties by construction, so the oracle gets the blocks the op selected (recorded with
a torch-function mode and recomputed by ``mra_compile.block_selection``, the op's own
selection code). Forward and eval only: the op's backward is not part of this file.
"""
import copy
import types

import pytest
import torch
from conftest import RTOL_FP32, as64, op_selection, padded_mask, rel_err
from helpers.recording import RecordMraCalls
from hypothesis import given, settings
from hypothesis import strategies as st

from mra_compile.nn import MRASelfAttention
from mra_compile.reference import mra2_reference


def reference_forward(module, x, mask, selection):
    """MRASelfAttention's function in float64, spelled out."""
    m = copy.deepcopy(module).double()
    x = x.double()
    B, N, C = x.shape
    H = m.num_attention_heads

    def heads(t):
        return t.view(B, N, H, C // H).transpose(1, 2)

    q, k, v = heads(m.query(x)), heads(m.key(x)), heads(m.value(x))
    ctx = mra2_reference(
        q, k, v, as64(mask), **budget_args(m),
        approx_mode=m.approx_mode, block_size=m.block_size,
        initial_prior_first_n_blocks=m.initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks=m.initial_prior_diagonal_n_blocks, selection=selection,
    )
    return m.out_proj(ctx.transpose(1, 2).reshape(B, N, C))


def budget_args(module):
    """The module's budget as the op takes it: num_blocks, else block_per_row."""
    if module.num_blocks is not None:
        return {"num_blocks": module.num_blocks}
    return {"block_per_row": module.block_per_row}


def run_and_check(module, x, mask, rtol=RTOL_FP32):
    with torch.no_grad(), RecordMraCalls() as rec:
        out = module(x, mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    (args, kwargs), = rec.calls
    # The budget goes to the op as it is: no argument depends on the length.
    assert (args[4], args[10]) == (module.num_blocks, budget_args(module).get("block_per_row"))
    sel = op_selection(args, kwargs)
    with torch.no_grad():
        ref = reference_forward(module, x, mask, sel)
    err = rel_err(out, ref)
    assert err <= rtol, err
    return out


def make_mask(g, B, N, kind):
    if kind == "none":
        return None
    if kind == "right":
        return padded_mask(N, torch.randint(1, N + 1, (B,), generator=g))
    mask = (torch.rand(B, N, generator=g) < 0.7)
    mask[:, 0] = True
    return mask  # bool


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), N=st.integers(1, 300),
       heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16, 32, 40]),
       kind=st.sampled_from(["none", "right", "random"]),
       mode=st.sampled_from(["full", "sparse"]), block_per_row=st.integers(1, 5),
       first_n=st.integers(0, 2), diagonal_n=st.integers(0, 3), block_size=st.sampled_from([16, 32]))
def test_matches_float64_reference(seed, B, N, heads, head_dim, kind, mode, block_per_row, first_n,
                                   diagonal_n, block_size):
    torch.manual_seed(seed)
    module = MRASelfAttention(heads * head_dim, heads, block_per_row=block_per_row, approx_mode=mode,
                              initial_prior_first_n_blocks=first_n,
                              initial_prior_diagonal_n_blocks=diagonal_n,
                              block_size=block_size).eval()
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(B, N, heads * head_dim, generator=g)
    mask = make_mask(g, B, N, kind)
    out = run_and_check(module, x, mask)
    if mask is not None:
        # Padded positions: zero context, so the output is out_proj's bias.
        padded = ~mask.bool()
        assert torch.equal(out[padded], module.out_proj.bias.expand(int(padded.sum()), -1))


def test_long_sequence_is_an_approximation():
    torch.manual_seed(0)
    module = MRASelfAttention(128, 4, block_per_row=2).eval()
    x = 3 * torch.randn(2, 1000, 128)
    mask = torch.ones(2, 1000)
    mask[1, 700:] = 0
    out = run_and_check(module, x, mask)
    # Not accidentally exact: all blocks differ from 2 per row.
    exact = MRASelfAttention(128, 4, num_blocks=32 * 32).eval()
    exact.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert not torch.allclose(exact(x, mask), out, atol=1e-3)
    assert exact.budget(1000) == 1024 and module.budget(1000) == 64


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision(dtype, rtol):
    torch.manual_seed(1)
    module = MRASelfAttention(64, 2, block_per_row=2, dtype=dtype).eval()
    x = torch.randn(2, 200, 64).to(dtype)
    mask = torch.ones(2, 200)
    mask[0, 150:] = 0
    run_and_check(module, x, mask, rtol)


@pytest.mark.parametrize("masked", [False, True])
def test_compile_fullgraph_matches_eager(masked, fresh_dynamo):
    torch.manual_seed(2)
    module = MRASelfAttention(64, 4, block_per_row=2, initial_prior_diagonal_n_blocks=1).eval()
    x = torch.randn(2, 200, 64)
    mask = torch.ones(2, 200, dtype=torch.bool) if masked else None
    if masked:
        mask[1, 120:] = False
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        expected = module(x, mask)
        got = compiled(x, mask)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # A second length: a new graph (num_blocks depends on N), same answers.
        x2 = torch.randn(1, 77, 64)
        m2 = None if mask is None else torch.ones(1, 77, dtype=torch.bool)
        torch.testing.assert_close(compiled(x2, m2), module(x2, m2), rtol=1e-5, atol=1e-6)


def config_fields(**extra):
    return dict(hidden_size=96, num_attention_heads=3, block_per_row=2, approx_mode="sparse",
                initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=3,
                attention_probs_dropout_prob=0.1, vocab_size=50, **extra)


@pytest.mark.parametrize("kind", ["namespace", "dict", "MraConfig"])
def test_from_config(kind):
    fields = config_fields()
    if kind == "namespace":
        config = types.SimpleNamespace(**fields)
    elif kind == "dict":
        config = fields
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.MraConfig(**fields)
    module = MRASelfAttention.from_config(config)
    assert (module.hidden_size, module.num_attention_heads, module.attention_head_size) == (96, 3, 32)
    assert module.block_per_row == 2 and module.approx_mode == "sparse"
    assert module.initial_prior_first_n_blocks == 1 and module.initial_prior_diagonal_n_blocks == 3
    assert module.budget(200) == 2 * 7
    # Overrides go on top; the parameters follow dtype.
    module = MRASelfAttention.from_config(config, approx_mode="full", dtype=torch.bfloat16)
    assert module.approx_mode == "full" and module.query.weight.dtype == torch.bfloat16
    # MraConfig's defaults for the optional fields.
    minimal = MRASelfAttention.from_config({"hidden_size": 32, "num_attention_heads": 2})
    assert (minimal.block_per_row, minimal.approx_mode) == (4, "full")
    assert (minimal.initial_prior_first_n_blocks, minimal.initial_prior_diagonal_n_blocks) == (0, 0)


def test_state_dict_names_match_hugging_face():
    module = MRASelfAttention(64, 4)
    assert set(module.state_dict()) == {f"{p}.{w}" for p in ("query", "key", "value", "out_proj")
                                        for w in ("weight", "bias")}
    assert set(MRASelfAttention(64, 4, bias=False).state_dict()) == {
        f"{p}.weight" for p in ("query", "key", "value", "out_proj")}
    assert "block_per_row=4" in repr(module)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"hidden_size": 64, "num_attention_heads": 5}, ValueError, "multiple of num_attention_heads"),
    ({"hidden_size": 64, "num_attention_heads": 0}, ValueError, "num_attention_heads"),
    ({"hidden_size": 64.0, "num_attention_heads": 4}, TypeError, "hidden_size"),
    ({"hidden_size": 64, "num_attention_heads": 4, "approx_mode": "dense"}, ValueError,
     "approx_mode"),
    ({"hidden_size": 64, "num_attention_heads": 4, "block_per_row": 0}, ValueError,
     "block_per_row"),
    ({"hidden_size": 64, "num_attention_heads": 4, "num_blocks": 0}, ValueError, "num_blocks"),
    ({"hidden_size": 64, "num_attention_heads": 4, "block_size": 24}, ValueError, "block_size"),
    ({"hidden_size": 64, "num_attention_heads": 4, "initial_prior_first_n_blocks": -1}, ValueError,
     "initial_prior_first_n_blocks"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MRASelfAttention(**kwargs)


def test_bad_forward_inputs():
    module = MRASelfAttention(64, 4)
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(10, 64))
    with pytest.raises(ValueError, match="mask"):
        module(torch.randn(2, 10, 64), torch.ones(2, 11))
    with pytest.raises(ValueError, match="config has no 'hidden_size'"):
        MRASelfAttention.from_config({"num_attention_heads": 2})


def test_eval_is_deterministic_and_train_mode_forward_works():
    torch.manual_seed(3)
    module = MRASelfAttention(64, 4, block_per_row=1, attention_probs_dropout_prob=0.5)
    x = torch.randn(1, 128, 64)
    with torch.no_grad():
        train_out = module.train()(x)  # no dropout inside: nothing random in training mode
        assert torch.equal(module.eval()(x), train_out)
        assert torch.equal(module(x), train_out)
