"""attn_implementation="mra": transformers models on mra_compile through AttentionInterface.

The oracle is per attention call: every call of the registered function is recorded with
the q, k, v, mask and scaling the model handed it, and its output is compared with
``mra2_reference`` in float64 on the same q/k/v, with the model's ``scaling``, k/v heads
expanded as transformers' ``repeat_kv`` does, the padding mask the test built (not the
4-D mask the function converted) and the budget from the config. Block selection has
exact ties, so the reference gets the blocks the op selected (``block_selection`` on the
op's own inputs, recorded by wrapping ``mra_compile.mra_attention``).

End to end, a budget that covers every block makes MRA-2 exact attention: the models must
then match themselves under ``attn_implementation="sdpa"`` at every real position.

Models are tiny and randomly initialised from configs (no downloads); ``initializer_range``
is large so that the logits spread over several units and MRA-2 is a real approximation.
"""
import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")

from conftest import RTOL_FP32, padded_mask, rel_err  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    ALL_MASK_ATTENTION_FUNCTIONS,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
    sliding_window_bidirectional_mask_function,
)

import mra_compile  # noqa: E402
from mra_compile.integrations import hf_attention  # noqa: E402
from mra_compile.integrations import transformers as mra_hf  # noqa: E402,F401  (registers "mra")
from mra_compile.reference import mra2_reference  # noqa: E402

VOCAB = 100
KINDS = ("bert", "roberta", "xlm-roberta", "modernbert", "eurobert")


def make_config(kind, hidden=64, heads=4, layers=2, **extra):
    """A tiny config of ``kind``; ``extra`` sets config attributes (the mra_* options too)."""
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=2 * hidden, initializer_range=0.25)
    if kind == "bert":
        config = transformers.BertConfig(**common)
    elif kind == "roberta":
        config = transformers.RobertaConfig(**common, pad_token_id=1)
    elif kind == "xlm-roberta":
        config = transformers.XLMRobertaConfig(**common, pad_token_id=1)
    elif kind == "modernbert":
        # Layer 0 global, layer 1 local; the default window covers the lengths used here
        # (up to 2 * 128 + 1 tokens): a covering window is global attention.
        config = transformers.ModernBertConfig(**common, local_attention=512, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                               sep_token_id=2)
    elif kind == "eurobert":  # grouped-query attention: 2 key/value heads for 4 query heads
        config = transformers.EuroBertConfig(**common, num_key_value_heads=heads // 2,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                             mask_token_id=3)
    elif kind == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=heads, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(kind)
    for key, value in extra.items():
        setattr(config, key, value)
    return config


MODEL_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
                 "modernbert": "ModernBertModel", "eurobert": "EuroBertModel", "llama": "LlamaModel"}


@functools.cache
def _model(kind, **config):
    torch.manual_seed(0)
    return getattr(transformers, MODEL_CLASSES[kind])(make_config(kind, **config)).eval()


def make_model(kind, attn="mra", **config):
    """A new copy of a cached, deterministically initialised model running ``attn``."""
    model = copy.deepcopy(_model(kind, **config))
    model.set_attn_implementation(attn)
    return model


def make_batch(seed, batch, seq_len, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, seq_len), generator=g)
    lengths = [seq_len] * batch if lengths is None else lengths
    return ids, padded_mask(seq_len, lengths, torch.long)


# ---------------------------------------------------------------------------- recording


@dataclasses.dataclass
class Call:
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict
    out: torch.Tensor
    op_calls: list  # the mra_compile.mra_attention calls it made: (args, kwargs)


@contextlib.contextmanager
def recording():
    """Records every call of the registered "mra" attention function (yields a list of
    Call), with the mra_compile.mra_attention calls each made."""
    calls, op_calls = [], []
    real_op = mra_compile.mra_attention

    @functools.wraps(real_op)  # keeps the signature hf_attention inspects
    def op(*args, **kwargs):
        op_calls.append((args, kwargs))
        return real_op(*args, **kwargs)

    def attention(module, query, key, value, attention_mask, **kwargs):
        start = len(op_calls)
        out, weights = hf_attention.mra_attention_forward(module, query, key, value, attention_mask,
                                                          **kwargs)
        calls.append(Call(module, query, key, value, attention_mask, kwargs, out, op_calls[start:]))
        return out, weights

    mra_compile.mra_attention = op
    AttentionInterface.register("mra", attention)
    try:
        yield calls
    finally:
        mra_compile.mra_attention = real_op
        hf_attention.register()


@pytest.fixture
def record():
    with recording() as calls:
        yield calls


# ---------------------------------------------------------------------------- the oracle


def reference(q, k, v, mask, scale, **kwargs):
    """mra2_reference in float64 with logit scale ``scale``."""
    q, k, v = q.double(), k.double(), v.double()
    if "scale" in inspect.signature(mra2_reference).parameters:
        return mra2_reference(q, k, v, mask, scale=scale, **kwargs)
    # Without a scale parameter: MRA-2 sees q only through scale * q . k and q's block means.
    return mra2_reference(q * (scale * math.sqrt(q.shape[-1])), k, v, mask, **kwargs)


def check_call(call, token_mask, config):
    """The call's output against the float64 reference on the same q, k, v."""
    opts = hf_attention.settings(config)
    B, H, N, D = call.query.shape
    assert call.out.shape == (B, N, H, D)
    (op_args, op_kwargs), = call.op_calls
    bpr, b = opts["mra_block_per_row"], opts["mra_block_size"]
    assert op_kwargs["block_per_row"] == bpr and op_kwargs["approx_mode"] == opts["mra_approx_mode"]
    selection = mra_compile.block_selection(*op_args, **op_kwargs)
    groups = H // call.key.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (call.key, call.value))
    scale = call.kwargs.get("scaling") or D ** -0.5
    ref = reference(call.query, k, v, None if token_mask is None else token_mask.double(), scale,
                    block_per_row=bpr, approx_mode=opts["mra_approx_mode"], block_size=b,
                    initial_prior_first_n_blocks=opts["mra_initial_prior_first_n_blocks"],
                    initial_prior_diagonal_n_blocks=opts["mra_initial_prior_diagonal_n_blocks"],
                    selection=selection)
    err = rel_err(call.out, ref.transpose(1, 2))
    assert err <= RTOL_FP32, err


def run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


# ---------------------------------------------------------------------------- registration


def test_registered_on_import():
    assert AttentionInterface()["mra"] is hf_attention.mra_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["mra"] is hf_attention.mra_mask
    assert mra_hf.register() == "mra" == hf_attention.register()
    assert AttentionInterface()["mra"] is hf_attention.mra_attention_forward
    model = make_model("bert")
    assert model.config._attn_implementation == "mra"


# ---------------------------------------------------------------------------- models against the reference


@pytest.mark.parametrize("kind, case", [
    ("bert", {}),
    ("roberta", {}),
    ("xlm-roberta", {"mra_approx_mode": "sparse"}),
    ("modernbert", {}),
    ("eurobert", {}),                                                       # GQA
    ("bert", {"mra_block_per_row": 2, "mra_initial_prior_first_n_blocks": 1,
              "mra_initial_prior_diagonal_n_blocks": 1}),
    ("bert", {"scaling": 0.4}),                                             # not 1/sqrt(D)
])
def test_encoders_match_reference(record, kind, case):
    case = dict(case)
    scaling = case.pop("scaling", None)
    model = make_model(kind, mra_block_per_row=case.pop("mra_block_per_row", 1), **case)
    if scaling is not None:
        for module in model.modules():
            if hasattr(module, "scaling"):
                module.scaling = scaling
    ids, mask = make_batch(1, 2, 200, [200, 131])  # padded, B > 1, H > 1, N % 32 != 0
    out = run(model, ids, mask)
    assert torch.isfinite(out).all()
    assert len(record) == 2
    for call in record:
        if scaling is not None:
            assert call.kwargs["scaling"] == scaling
        if kind == "eurobert":
            assert call.key.shape[1] == 2 and call.query.shape[1] == 4
        check_call(call, mask.bool(), model.config)


@pytest.mark.parametrize("kind", ["bert", "modernbert", "eurobert"])
def test_encoders_tensors_are_read_where_they_lie(monkeypatch, kind):
    """The layers' q, k, v (heads split off the hidden dim; ModernBERT's value a slice of
    its fused projection; EuroBERT's grouped key/value heads) go to the kernels' heads-last
    variant, padded batch and launch-cache replays included: the model's output is the
    one of the op copying its inputs into its own layout, bit for bit."""
    from mra_compile import build, inputs

    model = make_model(kind, mra_block_per_row=2)
    ids, mask = make_batch(3, 2, 256, [256, 161])  # whole blocks, D = 16
    with build.trace_kernel_calls() as calls:
        first = run(model, ids, mask)
    assert {bool(c["static"].get("heads_last")) for c in calls if c["op"] == "hires_rows"} == {True}
    replayed = run(model, ids, mask)
    monkeypatch.setenv(inputs.HEADS_LAST_ENV, "0")
    copied = run(model, ids, mask)
    assert torch.equal(first, copied) and torch.equal(replayed, copied)


@settings(max_examples=15, deadline=None)
@given(seq_len=st.integers(1, 150), batch=st.integers(1, 3), data=st.data(),
       approx_mode=st.sampled_from(["full", "sparse"]), block_per_row=st.sampled_from([1, 2]),
       heads=st.sampled_from([2, 4]), kind=st.sampled_from(["bert", "eurobert"]),
       seed=st.integers(0, 2**31 - 1))
def test_padded_batches_match_reference(seq_len, batch, data, approx_mode, block_per_row, heads,
                                        kind, seed):
    lengths = [data.draw(st.integers(1, seq_len)) for _ in range(batch)]
    model = make_model(kind, layers=1, heads=heads, mra_block_per_row=block_per_row,
                       mra_approx_mode=approx_mode)
    ids, mask = make_batch(seed, batch, seq_len, lengths)
    with recording() as calls:
        run(model, ids, mask)
    call, = calls
    check_call(call, mask.bool(), model.config)


@pytest.mark.parametrize("kind", KINDS)
def test_full_budget_is_exact_attention(kind):
    """Every block exact: the model on "mra" is the model on "sdpa" at every real position
    (mask conversion, scaling, GQA and the output layout end to end); padded tokens change
    nothing there."""
    ids, mask = make_batch(2, 3, 90, [90, 61, 7])
    mra = make_model(kind, mra_block_per_row=8)  # 8 >= ceil(90 / 32): all blocks
    out = run(mra, ids, mask)
    expected = run(make_model(kind, attn="sdpa"), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
    ids2 = torch.where(real, ids, (ids + 17) % VOCAB)
    torch.testing.assert_close(run(mra, ids2, mask)[real], out[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "eurobert"])
def test_full_budget_gradients_match_sdpa(kind):
    """Training: the parameters' gradients of a loss on the real positions are sdpa's."""
    ids, mask = make_batch(3, 2, 70, [70, 45])
    real = mask.bool()
    weights = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for attn in ("mra", "sdpa"):
        model = make_model(kind, attn=attn, mra_block_per_row=4)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (out * weights)[real].sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        if "key.bias" in name:  # exactly 0 for softmax attention: both are rounding noise
            continue
        assert rel_err(grads[0][name], grads[1][name]) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """A half-precision model on "mra" (full budget) is as close to the float32 model as
    the same half-precision model on "sdpa" (whose own rounding dominates)."""
    ids, mask = make_batch(4, 2, 100, [100, 60])
    real = mask.bool()
    expected = run(make_model("eurobert", attn="sdpa"), ids, mask)[real]
    out = run(make_model("eurobert", mra_block_per_row=4).to(dtype), ids, mask)
    sdpa = run(make_model("eurobert", attn="sdpa").to(dtype), ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out[real], expected) <= 1.5 * rel_err(sdpa[real], expected) + 1e-3


# ---------------------------------------------------------------------------- masks


def stub_module(**config):
    module = torch.nn.Module()
    module.config = types.SimpleNamespace(**config)
    module.is_causal = False
    return module


def qkv(seed, B, H, N, D, kv_heads=None):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(B, H, N, D, generator=g)
    k, v = (2 * torch.randn(B, kv_heads or H, N, D, generator=g) for _ in range(2))
    return q, k, v


def test_every_padding_mask_form_gives_the_same_output():
    B, H, N, D = 2, 3, 77, 16
    q, k, v = qkv(4, B, H, N, D)
    module = stub_module(mra_block_per_row=1)
    keep = padded_mask(N, [77, 40], torch.bool)
    expected, weights = hf_attention.mra_attention_forward(module, q, k, v, keep, scaling=0.25)
    assert weights is None and expected.shape == (B, N, H, D) and expected.is_contiguous()
    assert (expected[1, 40:] == 0).all() and (expected[1, :40] != 0).any()
    expanded = keep[:, None, None, :].expand(B, 1, N, N)
    forms = [keep.long(), keep.float(), expanded, expanded.contiguous(),
             keep[:, None, None, :], expanded.expand(B, H, N, N).contiguous()]
    for fill in (torch.finfo(torch.float32).min, float("-inf"), -10000.0):
        forms.append(torch.zeros(B, 1, N, N).masked_fill(~expanded, fill))
    for form in forms:
        got, _ = hf_attention.mra_attention_forward(module, q, k, v, form, scaling=0.25)
        assert torch.equal(got, expected), (form.dtype, tuple(form.shape))
    # No padding: None, all-True and a [1, 1, N, N] mask agree.
    full, _ = hf_attention.mra_attention_forward(module, q, k, v, None, scaling=0.25)
    for form in (torch.ones(B, N, dtype=torch.bool), torch.ones(1, 1, N, N, dtype=torch.bool)):
        assert torch.equal(hf_attention.mra_attention_forward(module, q, k, v, form, scaling=0.25)[0], full)


def test_masks_that_are_not_padding_only_are_refused():
    B, H, N, D = 2, 2, 40, 16
    q, k, v = qkv(5, B, H, N, D)
    module = stub_module()
    keep = padded_mask(N, [40, 30], torch.bool)[:, None, None, :].expand(B, 1, N, N)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    per_head = keep.expand(B, H, N, N).clone()
    per_head[1, 1, :, 5] = False
    bias = torch.randn(B, 1, 1, N).expand(B, 1, N, N)  # the same for every query: a key bias
    cases = [
        (keep & causal, ValueError, "query rows"),
        (per_head, ValueError, "heads"),
        (bias, ValueError, "bias"),
        (torch.zeros(B, 1, N, N).masked_fill(~keep, -5.0), ValueError, "bias"),
        (keep.long(), ValueError, "bool"),
        (keep[:, :, :, :-1], ValueError, "shape"),
        (keep[:, 0], ValueError, "shape"),
        (keep[:1, 0, 0, :], ValueError, r"\[B, N\]"),
        ("mask", TypeError, "tensor"),
    ]
    for mask, error, match in cases:
        with pytest.raises(error, match=match):
            hf_attention.mra_attention_forward(module, q, k, v, mask)


def test_mask_function():
    B, Q, K = 3, 50, 50
    padding = padded_mask(K, [50, 33, 1], torch.bool)
    mask = hf_attention.mra_mask(B, Q, K, attention_mask=padding, allow_is_bidirectional_skip=True)
    assert mask.shape == (B, 1, Q, K) and mask.stride(2) == 0  # a view: nothing N x N
    assert torch.equal(mask, sdpa_mask(B, Q, K, mask_function=bidirectional_mask_function,
                                       attention_mask=padding))
    full = torch.ones(B, K, dtype=torch.bool)
    assert hf_attention.mra_mask(B, Q, K, attention_mask=full, allow_is_bidirectional_skip=True) is None
    assert hf_attention.mra_mask(B, Q, K, attention_mask=None, allow_is_bidirectional_skip=True) is None
    assert hf_attention.mra_mask(B, Q, K, attention_mask=full).all()
    assert hf_attention.mra_mask(B, Q, K).shape == (B, 1, Q, K)
    # Other patterns: sdpa's bool mask, a causal one never skipped as None.
    window = sliding_window_bidirectional_mask_function(4)
    assert torch.equal(hf_attention.mra_mask(B, Q, K, mask_function=window, attention_mask=padding,
                                             local_size=4),
                       sdpa_mask(B, Q, K, mask_function=window, attention_mask=padding, local_size=4))
    causal = hf_attention.mra_mask(1, Q, K, mask_function=causal_mask_function, attention_mask=None)
    assert causal is not None and torch.equal(causal[0, 0], torch.ones(Q, K, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------- scale and GQA switches


def test_native_scale_and_gqa_are_used_when_the_op_has_them(monkeypatch):
    """Once mra_compile.mra_attention takes ``scale`` / ``enable_gqa``, they are passed and q,
    k, v go to the op untouched; the result is the same."""
    B, H, N, D = 2, 4, 70, 16
    q, k, v = qkv(6, B, H, N, D, kv_heads=2)
    module = stub_module(mra_block_per_row=1)
    mask = padded_mask(N, [70, 50], torch.bool)
    expected, _ = hf_attention.mra_attention_forward(module, q, k, v, mask, scaling=0.3)
    seen = {}
    real_op = mra_compile.mra_attention

    def op(q_, k_, v_, mask_=None, *, scale=None, enable_gqa=False, **kwargs):
        seen.update(q=q_, k=k_, scale=scale, enable_gqa=enable_gqa)
        groups = q_.shape[1] // k_.shape[1]
        k_, v_ = (x.repeat_interleave(groups, dim=1) for x in (k_, v_))
        return real_op(q_, k_, v_, mask_, scale=scale, **kwargs)

    monkeypatch.setattr(mra_compile, "mra_attention", op)
    got, _ = hf_attention.mra_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert seen["scale"] == 0.3 and seen["enable_gqa"] is True
    assert seen["q"] is q and seen["k"] is k
    assert torch.equal(got, expected)


def test_default_scaling_does_not_touch_q(monkeypatch):
    q, k, v = qkv(7, 1, 2, 40, 16)
    seen = []
    real_op = mra_compile.mra_attention

    @functools.wraps(real_op)
    def op(*args, **kwargs):
        seen.append((args[0], kwargs.get("scale")))
        return real_op(*args, **kwargs)

    monkeypatch.setattr(mra_compile, "mra_attention", op)
    hf_attention.mra_attention_forward(stub_module(), q, k, v, None, scaling=16 ** -0.5)
    hf_attention.mra_attention_forward(stub_module(), q, k, v, None, scaling=None)
    assert seen[0][0] is q and seen[1] == (q, None)
    # The op takes scale itself: q is passed as it is.
    hf_attention.mra_attention_forward(stub_module(), q, k, v, None, scaling=0.5)
    assert seen[2][0] is q and seen[2][1] == 0.5


# ---------------------------------------------------------------------------- what is refused


def test_causal_models_are_refused():
    ids, mask = make_batch(8, 2, 40, [40, 30])
    decoder = make_model("bert", is_decoder=True)
    with pytest.raises(ValueError, match="causal"):
        run(decoder, ids, mask)
    llama = make_model("llama")
    with pytest.raises(ValueError, match="no causal form"):
        run(llama, ids, mask)
    q, k, v = qkv(9, 1, 2, 40, 16)
    module = stub_module()
    with pytest.raises(ValueError, match="causal"):
        hf_attention.mra_attention_forward(module, q, k, v, None, is_causal=True)
    with pytest.raises(ValueError, match="cross-attention"):
        hf_attention.mra_attention_forward(module, q, k[:, :, :30], v[:, :, :30], None)
    with pytest.raises(ValueError, match="position_bias"):
        hf_attention.mra_attention_forward(module, q, k, v, None, position_bias=torch.zeros(1))
    q4, k3, v3 = qkv(9, 1, 4, 40, 16, kv_heads=3)
    with pytest.raises(ValueError, match="multiple"):
        hf_attention.mra_attention_forward(module, q4, k3, v3, None)
    with pytest.raises(ValueError, match="query"):
        hf_attention.mra_attention_forward(module, q, k, v[..., :8], None)


@pytest.mark.parametrize("key, value, error", [
    ("mra_block_per_row", 0, ValueError),
    ("mra_block_per_row", 1.5, TypeError),
    ("mra_approx_mode", "dense", ValueError),
    ("mra_block_size", 4, ValueError),
    ("mra_initial_prior_first_n_blocks", -1, ValueError),
    ("mra_sliding_window", "eager", ValueError),
])
def test_bad_config_values_name_the_key(key, value, error):
    q, k, v = qkv(10, 1, 2, 40, 16)
    with pytest.raises(error, match=f"config.{key}"):
        hf_attention.mra_attention_forward(stub_module(**{key: value}), q, k, v, None)


def test_modernbert_sliding_window_layers():
    """A local layer whose window does not cover the sequence: refused by default, exact
    local attention through sdpa with config.mra_sliding_window = "sdpa"."""
    ids, mask = make_batch(11, 2, 100, [100, 70])
    model = make_model("modernbert", local_attention=16, mra_block_per_row=1)  # window +-8
    with pytest.raises(ValueError, match="mra_sliding_window"):
        run(model, ids, mask)
    # Full budget: the full layer is exact, the local one is sdpa: the whole model is sdpa's.
    model = make_model("modernbert", local_attention=16, mra_block_per_row=4, mra_sliding_window="sdpa")
    expected = run(make_model("modernbert", attn="sdpa", local_attention=16), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(run(model, ids, mask)[real], expected[real], rtol=1e-5, atol=1e-5)


def test_sliding_layers_use_sdpa_only_when_told(record):
    ids, mask = make_batch(12, 2, 100, [100, 70])
    model = make_model("modernbert", local_attention=16, mra_sliding_window="sdpa", mra_block_per_row=1)
    run(model, ids, mask)
    full, local = record
    assert full.kwargs["sliding_window"] is None and len(full.op_calls) == 1
    assert local.kwargs["sliding_window"] is not None and not local.op_calls
    check_call(full, mask.bool(), model.config)
    expected, _ = sdpa_attention_forward(local.module, local.query, local.key, local.value, local.mask,
                                         scaling=local.kwargs["scaling"])
    assert torch.equal(local.out, expected)


# ---------------------------------------------------------------------------- persistence, warnings, compile


def test_config_options_save_and_load(record, tmp_path):
    model = make_model("bert", mra_block_per_row=2, mra_approx_mode="sparse",
                       mra_initial_prior_first_n_blocks=1)
    ids, mask = make_batch(13, 2, 130, [130, 99])
    expected = run(model, ids, mask)
    model.save_pretrained(tmp_path)
    for loaded in (transformers.BertModel.from_pretrained(tmp_path, attn_implementation="mra"),
                   mra_hf.from_pretrained(transformers.AutoModel, tmp_path)):
        assert loaded.config._attn_implementation == "mra"
        record.clear()
        assert torch.equal(run(loaded.eval(), ids, mask), expected)
        for call in record:
            (_, op_kwargs), = call.op_calls
            assert op_kwargs["block_per_row"] == 2 and op_kwargs["approx_mode"] == "sparse"
            assert op_kwargs["initial_prior_first_n_blocks"] == 1
            check_call(call, mask.bool(), loaded.config)


def test_training_warns_once_about_dropout(monkeypatch):
    monkeypatch.setattr(hf_attention, "WARNED", set())
    model = make_model("bert", attention_probs_dropout_prob=0.1).train()
    ids, mask = make_batch(14, 2, 40, [40, 20])
    with pytest.warns(UserWarning, match="no attention dropout") as caught:
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert len([w for w in caught if "dropout" in str(w.message)]) == 1  # 2 layers, 1 warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, attention_mask=mask)
        model.eval()(input_ids=ids, attention_mask=mask)


def test_compile_fullgraph_matches_eager(fresh_dynamo):
    model = make_model("bert", mra_block_per_row=1)
    ids, mask = make_batch(15, 2, 100, [100, 64])
    expected = run(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True)
    # ... and says nothing while compiling (Dynamo had warned of tracing the cache of the
    # op's parameters: "Dynamo detected a call to a `functools.lru_cache`-wrapped function").
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (torch's own DeprecationWarnings aside)
        got = run(compiled, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiled_mask_checks_run_in_the_graph(fresh_dynamo):
    """Under torch.compile a materialised 4-D mask is checked by an in-graph assertion
    (no graph break): a padding-only one runs, another one fails at run time."""
    B, H, N, D = 2, 2, 40, 16
    q, k, v = qkv(16, B, H, N, D)
    module = stub_module(mra_block_per_row=1)
    keep = padded_mask(N, [40, 25], torch.bool)
    f = torch.compile(lambda q, k, v, m: hf_attention.mra_attention_forward(module, q, k, v, m)[0],
                      fullgraph=True)
    materialised = keep[:, None, None, :].expand(B, 1, N, N).contiguous()
    expected, _ = hf_attention.mra_attention_forward(module, q, k, v, keep)
    torch.testing.assert_close(f(q, k, v, materialised), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="padding-only"):
        f(q, k, v, materialised & torch.ones(N, N, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------- long inputs, fine-tuning

TESTED = ("bert", "roberta", "modernbert")  # the README's table of tested families


@pytest.mark.parametrize("kind", TESTED)
def test_default_budget_on_a_1000_token_input(kind):
    model = make_model(kind, layers=1, max_position_embeddings=1024, local_attention=2048)
    assert getattr(model.config, "mra_block_per_row", None) is None  # the default budget
    ids, mask = make_batch(3, 2, 1000, [1000, 613])
    out = run(model, ids, mask)
    assert out.shape == (2, 1000, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", TESTED)
def test_a_fine_tuning_step(kind, compiled, fresh_dynamo):
    """Loss, backward, optimizer step on a padded batch; under torch.compile too."""
    torch.manual_seed(0)
    model = make_model(kind, layers=1).train()
    head = torch.nn.Linear(64, 3)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids, mask = make_batch(5, 2, 100, [100, 57])
    labels = torch.tensor([0, 2])

    def loss_fn(ids, mask):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.nn.functional.cross_entropy(head(hidden[:, 0]), labels)

    step = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    before = [p.detach().clone() for p in params]
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = step(ids, mask)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses)
    attention = [p for n, p in model.named_parameters() if "query" in n or "Wqkv" in n]
    assert attention and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
