"""mra_compile.integrations.transformers: Hugging Face MRA models on torch.ops.mra.attention.

The oracle is the same model in float64 with every ``MraSelfAttention`` forward replaced
by a literal transcription of the stock forward (mask conversion, zero-padding of head
dims below 32, ``num_block`` from ``max_position_embeddings``) whose MRA-2 is
``mra_compile.reference.mra2_reference``. Block selection has exact ties by
construction, so the oracle is given the blocks the op selected: a torch-function mode records
every ``mra.attention`` call of the patched float32 run, and ``mra_compile.block_selection``
recomputes their block sets (the op's own code path).

Models are small and randomly initialised (no downloads). ``initializer_range`` is large
so that the attention logits spread over several units and MRA-2 is a real approximation.
"""
import copy
import functools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from conftest import op_selection, padded_mask, rel_err  # noqa: E402
from helpers.recording import RecordMraCalls  # noqa: E402
from transformers.models.mra import modeling_mra  # noqa: E402
from transformers.models.mra.modeling_mra import MraSelfAttention  # noqa: E402

from mra_compile.integrations import transformers as mra_hf  # noqa: E402
from mra_compile.integrations.transformers import (  # noqa: E402
    MraCompiledSelfAttention,
    MraStockAttentionWarning,
    from_pretrained,
    is_patched,
    patch_mra_model,
    unpatch_mra_model,
)
from mra_compile.reference import mra2_reference  # noqa: E402

VOCAB = 100
RTOL = 1e-4


def make_config(hidden=64, heads=4, layers=2, block_per_row=1, approx_mode="full", first_n=0,
                diagonal_n=0, max_pos=512, **extra):
    return transformers.MraConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_pos,
        block_per_row=block_per_row, approx_mode=approx_mode,
        initial_prior_first_n_blocks=first_n, initial_prior_diagonal_n_blocks=diagonal_n,
        initializer_range=0.25, **extra,
    )


@functools.cache
def _model(cls_name="MraModel", **config):
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(make_config(**config)).eval()


def fresh_model(cls_name="MraModel", **config):
    """A new unpatched copy of a cached, deterministically initialised model."""
    return copy.deepcopy(_model(cls_name, **config))


def make_batch(seed, batch, seq_len, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=g)
    lengths = [seq_len] * batch if lengths is None else lengths
    mask = padded_mask(seq_len, lengths, torch.long)
    return ids, mask


def hf_reference_forward(module, hidden_states, attention_mask=None, *, selections):
    """The stock MraSelfAttention.forward, transcribed, with MRA-2 = mra2_reference."""
    B, N, _ = hidden_states.shape
    H, Dh = module.num_attention_heads, module.attention_head_size
    q, k, v = (layer(hidden_states).view(B, N, H, Dh).transpose(1, 2)
               for layer in (module.query, module.key, module.value))
    if attention_mask.ndim == 4 and attention_mask.is_floating_point():
        attention_mask = (attention_mask[:, 0, -1, :] == 0).int()
    mask = attention_mask.int().to(q.dtype)
    if Dh < 32:  # zero-padded head dims, so the scale is 1/sqrt(32)
        q, k, v = (torch.nn.functional.pad(x, (0, 32 - Dh)) for x in (q, k, v))
    out = mra2_reference(
        q, k, v, mask, num_blocks=module.num_block, approx_mode=module.approx_mode,
        block_size=32, initial_prior_first_n_blocks=module.initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks=module.initial_prior_diagonal_n_blocks,
        selection=selections.pop(0),
    )[..., :Dh]
    return (out.transpose(1, 2).reshape(B, N, H * Dh),)


def reference_model(model, recorded_calls):
    """A float64 copy of the (unpatched or patched) model running hf_reference_forward."""
    ref = copy.deepcopy(model)
    unpatch_mra_model(ref)
    ref.double()
    selections = [op_selection(*call) for call in recorded_calls]
    layers = [m for m in ref.modules() if isinstance(m, MraSelfAttention)]
    assert len(layers) == len(selections)
    for m in layers:
        m.forward = functools.partial(hf_reference_forward, m, selections=selections)
    return ref


def run_patched_and_reference(model, **inputs):
    """(patched float32 output, float64 oracle output, recorded op calls)."""
    with torch.no_grad(), RecordMraCalls() as rec:
        out = model(**inputs)
    with torch.no_grad():
        ref = reference_model(model, rec.calls)(**inputs)
    return out, ref, rec.calls


# ---------------------------------------------------------------------------- the patch


@pytest.mark.parametrize("case", [
    {"seq_len": 200, "lengths": [200, 150]},                  # the usual: 200 tokens, padding
    {"seq_len": 200, "lengths": [200, 131], "approx_mode": "sparse"},
    {"seq_len": 200, "lengths": [190, 64], "first_n": 1, "diagonal_n": 3},
    {"seq_len": 512, "lengths": [512, 300]},                  # = max_position_embeddings
    {"seq_len": 37, "lengths": [37, 5]},                      # n*n < num_block: all exact
    {"seq_len": 200, "lengths": [200, 170], "override": 2},   # block_per_row per input
    {"seq_len": 96, "lengths": [96, 96], "heads": 2},         # head dim 32: no rescaling
])
def test_patched_model_matches_float64_reference(case):
    case = dict(case)
    seq_len, lengths, override = case.pop("seq_len"), case.pop("lengths"), case.pop("override", None)
    model = patch_mra_model(fresh_model(**case), block_per_row=override)
    ids, mask = make_batch(seq_len, 2, seq_len, lengths)
    out, ref, calls = run_patched_and_reference(model, input_ids=ids, attention_mask=mask)
    assert len(calls) == 2  # one op call per layer: the patch really ran
    n = -(-seq_len // 32)
    config = model.config
    expected_budget = (override * n if override else
                       min(config.max_position_embeddings // 32 * config.block_per_row,
                           (config.max_position_embeddings // 32) ** 2))
    for args, _ in calls:
        assert args[4] == expected_budget
        assert args[6] == 32
    err = rel_err(out.last_hidden_state, ref.last_hidden_state)
    assert err <= RTOL, err
    # Padded positions are ignored: changing their token ids leaves real positions alone.
    ids2 = torch.where(mask.bool(), ids, (ids + 17) % VOCAB)
    with torch.no_grad():
        out2 = model(input_ids=ids2, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out2[real], out.last_hidden_state[real], rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seq_len=st.integers(1, 300), batch=st.integers(1, 3), data=st.data(),
       approx_mode=st.sampled_from(["full", "sparse"]), block_per_row=st.sampled_from([1, 2]),
       heads=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_patched_matches_reference_any_length(seq_len, batch, data, approx_mode, block_per_row,
                                              heads, seed):
    lengths = [data.draw(st.integers(1, seq_len)) for _ in range(batch)]
    model = patch_mra_model(fresh_model(layers=1, heads=heads, approx_mode=approx_mode,
                                        block_per_row=block_per_row))
    ids, mask = make_batch(seed, batch, seq_len, lengths)
    out, ref, calls = run_patched_and_reference(model, input_ids=ids, attention_mask=mask)
    assert len(calls) == 1
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= RTOL


@pytest.mark.parametrize("cls_name, extra_inputs", [
    ("MraForSequenceClassification", {}),
    ("MraForMaskedLM", {}),
    ("MraForTokenClassification", {}),
    ("MraForQuestionAnswering", {}),
])
def test_task_heads(cls_name, extra_inputs):
    model = patch_mra_model(fresh_model(cls_name))
    assert is_patched(model)
    assert sum(isinstance(m, MraCompiledSelfAttention) for m in model.modules()) == 2
    ids, mask = make_batch(1, 2, 200, [200, 120])
    out, ref, _ = run_patched_and_reference(model, input_ids=ids, attention_mask=mask)
    for name in ("logits", "start_logits", "end_logits"):
        if name in out:
            assert torch.isfinite(out[name]).all()
            assert rel_err(out[name], ref[name]) <= RTOL, name


def test_multiple_choice_head():
    model = patch_mra_model(fresh_model("MraForMultipleChoice"))
    ids, mask = make_batch(2, 6, 100, [100, 90, 80, 70, 60, 50])
    inputs = {"input_ids": ids.view(2, 3, 100), "attention_mask": mask.view(2, 3, 100),
              "labels": torch.tensor([0, 2])}
    out, ref, _ = run_patched_and_reference(model, **inputs)
    assert out.logits.shape == (2, 3)
    assert rel_err(out.logits, ref.logits) <= RTOL
    assert torch.isfinite(out.loss)


def test_extended_additive_and_bool_masks_match_2d_mask():
    model = patch_mra_model(fresh_model(layers=1))
    attn = model.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 150, 64, generator=g)
    mask = make_batch(0, 2, 150, [150, 99])[1]
    with torch.no_grad():
        (expected,) = attn(x, mask)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        old_style = (1.0 - mask[:, None, None, :].float()) * -10000.0  # transformers < 4.3x
        as_bool = mask.bool()[:, None, None, :].expand(2, 1, 150, 150)
        for m in (additive, old_style, as_bool, mask.bool(), mask.float()):
            (got,) = attn(x, m)
            assert torch.equal(got, expected)
    assert (expected[1, 99:] == 0).all() and (expected[1, :99] != 0).any()
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, mask[:, None, :])
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, mask[:, :100])


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_model(dtype, rtol):
    model = patch_mra_model(fresh_model(layers=1)).to(dtype)
    ids, mask = make_batch(5, 2, 200, [200, 150])
    out, ref, calls = run_patched_and_reference(model, input_ids=ids, attention_mask=mask)
    assert calls[0][0][0].dtype == torch.float32  # head dim 16 < 32: computed in float32
    hidden = out.last_hidden_state
    assert hidden.dtype == dtype and torch.isfinite(hidden).all()
    assert rel_err(hidden, ref.last_hidden_state) <= rtol
    # Head dims >= 32 go to the op in the model's dtype.
    model = patch_mra_model(fresh_model(layers=1, heads=2)).to(dtype)
    out, ref, calls = run_patched_and_reference(model, input_ids=ids, attention_mask=mask)
    assert calls[0][0][0].dtype == dtype
    assert out.last_hidden_state.dtype == dtype
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= rtol


def test_compile_fullgraph_matches_eager(fresh_dynamo):
    model = patch_mra_model(fresh_model())
    ids, mask = make_batch(9, 2, 200, [200, 160])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- patch mechanics


def attention_outputs(model, **inputs):
    """The context each MraSelfAttention returns, captured with forward hooks."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
             for m in model.modules() if isinstance(m, MraSelfAttention)]
    try:
        with torch.no_grad():
            result = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return result, captured


def test_unpatched_model_attention_is_zero_on_cpu():
    """The bug the patch fixes: without its CUDA kernels, transformers' MRA returns zeros."""
    if modeling_mra.mra_cuda_kernel is not None:
        pytest.skip("the transformers MRA CUDA kernels are loaded here")
    model = fresh_model()
    ids, mask = make_batch(4, 2, 256, [256, 200])
    _, contexts = attention_outputs(model, input_ids=ids, attention_mask=mask)
    assert len(contexts) == 2 and all(torch.count_nonzero(c) == 0 for c in contexts)
    patch_mra_model(model)
    _, contexts = attention_outputs(model, input_ids=ids, attention_mask=mask)
    assert all(c[0].abs().min() > 0 for c in contexts)  # every real position attends


def test_unpatch_restores_the_original_forward():
    model = fresh_model("MraForSequenceClassification")
    ids, mask = make_batch(6, 2, 200, [200, 100])
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    layers = [m for m in model.modules() if isinstance(m, MraSelfAttention)]

    assert patch_mra_model(model) is model
    assert all(type(m) is MraCompiledSelfAttention for m in layers)
    assert all(isinstance(m, MraSelfAttention) for m in layers)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(patched, before)
    # Patching again is harmless; a deep copy stays patched and computes the same.
    patch_mra_model(model)
    assert all(type(m) is MraCompiledSelfAttention for m in layers)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, patched)

    assert unpatch_mra_model(model) is model
    assert all(type(m) is MraSelfAttention for m in layers)
    assert all(type(m).forward is MraSelfAttention.forward for m in layers)
    assert all("mra_compile_block_per_row" not in vars(m) for m in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    unpatch_mra_model(model)  # unpatching an unpatched model is a no-op


def test_patch_of_a_subclass_keeps_the_subclass():
    class MySelfAttention(MraSelfAttention):
        pass

    model = fresh_model(layers=1)
    layer = model.encoder.layer[0].attention
    layer.self.__class__ = MySelfAttention
    patch_mra_model(model)
    assert is_patched(layer.self) and isinstance(layer.self, MySelfAttention)
    unpatch_mra_model(model)
    assert type(layer.self) is MySelfAttention


def test_patch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="MraSelfAttention"):
        patch_mra_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_mra_model("MraModel")
    with pytest.raises(ValueError, match="block_per_row"):
        patch_mra_model(fresh_model(layers=1), block_per_row=0)
    with pytest.raises(TypeError, match="block_per_row"):
        patch_mra_model(fresh_model(layers=1), block_per_row=1.5)


def test_module_options_are_read_at_call_time():
    model = patch_mra_model(fresh_model(layers=1))
    attn = model.encoder.layer[0].attention.self
    ids, mask = make_batch(8, 1, 128)
    attn.approx_mode = "sparse"
    attn.num_block = 5
    with RecordMraCalls() as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    (args, _), = rec.calls
    assert args[4] == 5 and args[5] == "sparse"
    # The head-dim-16 rescaling: q reaches the op multiplied by sqrt(16 / 32).
    with torch.no_grad():
        hidden = model.embeddings(input_ids=ids)
        q = attn.query(hidden).view(1, 128, 4, 16).transpose(1, 2)
    torch.testing.assert_close(args[0], q * math.sqrt(0.5), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- whole models, persistence


def test_is_patched_on_whole_models_and_parts():
    model = fresh_model("MraForSequenceClassification")
    layers = [m for m in model.modules() if isinstance(m, MraSelfAttention)]
    assert not is_patched(model) and not any(is_patched(m) for m in layers)
    patch_mra_model(model)
    assert is_patched(model) and is_patched(model.mra) and is_patched(model.mra.encoder.layer[0])
    assert all(is_patched(m) for m in layers)
    assert not is_patched(model.classifier)  # no MRA attention inside
    unpatch_mra_model(model)
    assert not is_patched(model)
    patch_mra_model(model.mra.encoder.layer[1])  # one layer of two: the model is not patched
    assert is_patched(model.mra.encoder.layer[1]) and not is_patched(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        is_patched("MraModel")


def _snapshot(model):
    """Everything patching may touch: each attention module's class and attributes, the
    config, the model's own attributes, the state dict."""
    layers = [m for m in model.modules() if isinstance(m, MraSelfAttention)]
    return ([(type(m), dict(vars(m))) for m in layers], model.config.to_dict(), dict(vars(model)),
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_same_snapshot(a, b):
    assert [t for t, _ in a[0]] == [t for t, _ in b[0]]
    for (_, va), (_, vb) in zip(a[0], b[0]):
        assert va.keys() == vb.keys() and all(va[k] is vb[k] for k in va)
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(a[2][k] is b[2][k] for k in a[2])
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize("prior", [None, 3])
def test_unpatch_restores_exactly(prior):
    """Classes, module attributes, the config (also one that carried a budget before) and
    the model's attributes are what they were before patch_mra_model."""
    model = fresh_model("MraForSequenceClassification")
    if prior is not None:  # e.g. loaded from a checkpoint saved patched
        model.config.mra_block_per_row = prior
    before = _snapshot(model)
    patch_mra_model(model, block_per_row=2)
    assert model.config.mra_block_per_row == 2
    patch_mra_model(model, block_per_row=None)  # patching twice keeps the first backup
    assert model.config.mra_block_per_row is None
    unpatch_mra_model(model)
    _assert_same_snapshot(_snapshot(model), before)
    assert hasattr(model.config, "mra_block_per_row") == (prior is not None)


def test_patch_takes_the_budget_from_the_config():
    model = fresh_model(layers=1)
    model.config.mra_block_per_row = 2
    ids, mask = make_batch(11, 1, 100)
    with RecordMraCalls() as rec, torch.no_grad():
        patch_mra_model(model)(input_ids=ids, attention_mask=mask)
    assert rec.calls[0][0][4] == 2 * 4  # 2 blocks per row, 4 block rows
    model.config.mra_block_per_row = 0
    with pytest.raises(ValueError, match="config.mra_block_per_row"):
        patch_mra_model(model)


@pytest.mark.parametrize("block_per_row", [None, 2])
def test_save_and_load_round_trip(tmp_path, block_per_row):
    """A patched model saves as a plain checkpoint (plus config.mra_block_per_row) and
    from_pretrained() brings it back patched, with the same budget and outputs."""
    model = patch_mra_model(fresh_model("MraForSequenceClassification"), block_per_row=block_per_row)
    ids, mask = make_batch(12, 2, 200, [200, 140])
    with RecordMraCalls() as rec, torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)

    for cls in (transformers.MraForSequenceClassification, transformers.AutoModelForSequenceClassification):
        loaded = from_pretrained(cls, tmp_path).eval()
        assert type(loaded) is transformers.MraForSequenceClassification and is_patched(loaded)
        assert loaded.config.mra_block_per_row == block_per_row
        with RecordMraCalls() as rec2, torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits
        assert [c[0][4] for c in rec2.calls] == [c[0][4] for c in rec.calls]
        assert torch.equal(got, expected)
    # The plain transformers load plus patch_mra_model does the same.
    plain = transformers.MraForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not is_patched(plain)
    with torch.no_grad():
        assert torch.equal(patch_mra_model(plain)(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.skipif(modeling_mra.mra_cuda_kernel is not None,
                    reason="the transformers MRA CUDA kernels are loaded here")
def test_stock_path_warns_once_where_it_returns_zeros(monkeypatch):
    monkeypatch.setitem(mra_hf.STOCK_WARNING, "given", False)
    model = fresh_model(layers=2)
    ids, mask = make_batch(13, 2, 64)
    with pytest.warns(MraStockAttentionWarning, match="returns zeros") as caught, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len([w for w in caught if w.category is MraStockAttentionWarning]) == 1  # 2 layers, 1 warning
    assert "from_pretrained" in str(caught[0].message) and "patch_mra_model" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as later, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=ids, attention_mask=mask)                     # once per process
        patch_mra_model(model)(input_ids=ids, attention_mask=mask)    # the patched path: never
    assert not [w for w in later if w.category is MraStockAttentionWarning]
    # Importing again does not wrap twice.
    mra_hf.install_stock_warning()
    assert modeling_mra.mra2_attention.__wrapped__.__name__ == "mra2_attention"
    assert not hasattr(modeling_mra.mra2_attention.__wrapped__, "__wrapped__")


def test_stock_mask_reshape_mixes_samples_and_the_patch_does_not(monkeypatch):
    """Witness of the stock bug the docs describe: with B > 1 and H > 1 the stock forward
    gives head h of sample b the mask of sample (b * H + h) % B. (If this fails, transformers
    fixed it: update the module docstring and the README.) The patch passes the op each
    sample's own [B, N] mask."""
    B, H, N = 2, 4, 64
    model = fresh_model(layers=1, heads=H)
    attn = model.encoder.layer[0].attention.self
    seen = []

    def capture(query, key, value, mask, *args, **kwargs):
        seen.append(mask)
        return torch.zeros_like(query)

    monkeypatch.setattr(modeling_mra, "mra2_attention", capture)
    mask = make_batch(0, B, N, [64, 20])[1]
    x = torch.randn(B, N, 64)
    with torch.no_grad():
        attn(x, mask)
    per_head = seen[0].view(B, H, N)
    for b in range(B):
        for h in range(H):
            assert torch.equal(per_head[b, h], mask[(b * H + h) % B].float())
    assert not torch.equal(per_head[0, 1], mask[0].float())  # sample 0, head 1 got sample 1's mask
    patch_mra_model(model)
    with RecordMraCalls() as rec, torch.no_grad():
        attn(x, mask)
    assert torch.equal(rec.calls[0][0][3], mask.bool())
