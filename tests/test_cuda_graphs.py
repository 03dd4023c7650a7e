"""The CUDA graphs of repeated inference calls (``mra_compile.cuda_graphs``), on the CPU.

The capture and the replay are stand-ins here (``StandInGraph``: the "capture" records
the call and leaves the output poisoned, as a capture does not run the kernels; a replay
runs it again on the graph's own inputs into the graph's output); everything else (the
signatures, the copies in and out, when a call is captured, failures, the bound on
kept graphs, ``clear_workspace``) is the module's own. bench/gpu_check.py checks the real
capture and replay on a GPU ("replay" rows).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_qkv, padding_mask

import mra_compile
from mra_compile import cuda_graphs, op
from mra_compile.options import Options


class StandInGraph:
    made = 0

    def __init__(self):
        StandInGraph.made += 1
        self.call = self.out = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        for mine, fresh in zip(as_tuple(self.out), as_tuple(self.call())):
            mine.copy_(fresh)


def as_tuple(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


HELD = [0]  # bytes the stand-in allocator holds: each capture adds GRAPH_BYTES
GRAPH_BYTES = 100 * 2**20


def stand_in_record(graph, call, device):
    HELD[0] += GRAPH_BYTES
    out = call()
    graph.call, graph.out = call, out
    for x in as_tuple(out):  # (a capture runs nothing)
        x.fill_(float("nan") if x.is_floating_point() else -7)
    return out


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_stream_of", lambda device: 7)
    monkeypatch.setattr(cuda_graphs, "_new_graph", StandInGraph)
    monkeypatch.setattr(cuda_graphs, "_record", stand_in_record)
    monkeypatch.setattr(cuda_graphs, "_reserved", lambda device: HELD[0])
    monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    monkeypatch.delenv(cuda_graphs.BUDGET_ENV, raising=False)
    cuda_graphs.clear()
    StandInGraph.made = 0
    yield
    cuda_graphs.clear()


ARGS = Options(12, "full").as_args()


def call(q, k, v, args=ARGS):
    """An inference call as op makes it on CUDA (here on the CPU, with the stand-ins)."""
    return cuda_graphs.run("inference", args, (q, k, v),
                           lambda *qkv: op._inference(*qkv, None, None, args))


def usual(q, k, v, args=ARGS):
    return op._inference(q, k, v, None, None, args)


@pytest.mark.parametrize("seed", [0, 1])
def test_replayed_calls_equal_the_usual_path(stand_ins, seed):
    first, second, third = (make_qkv(seed * 10 + i, 1, 2, 200, 24) for i in range(3))
    outs = [call(*qkv) for qkv in (first, second, third)]
    assert StandInGraph.made == 1 and cuda_graphs.kept() == 1
    for got, qkv in zip(outs, (first, second, third)):
        assert torch.equal(got, usual(*qkv))
    # Results are the caller's own: a later replay leaves them as they are.
    kept = outs[2].clone()
    call(*first)
    assert torch.equal(outs[2], kept)


def test_first_call_runs_as_usual_and_the_second_is_captured(stand_ins):
    q, k, v = make_qkv(2, 1, 1, 96, 16)
    call(q, k, v)
    assert StandInGraph.made == 0
    call(q, k, v)
    call(q, k, v)
    assert StandInGraph.made == 1 and cuda_graphs.kept() == 1


def test_non_contiguous_inputs_are_copied_in(stand_ins):
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(3, 1, 2, 64, 8))
    assert not q.is_contiguous()
    for _ in range(3):
        out = call(q, k, v)
    assert torch.equal(out, usual(q, k, v))


def test_each_signature_has_its_own_graph(stand_ins):
    a = make_qkv(4, 1, 1, 96, 16)
    b = make_qkv(5, 1, 1, 128, 16)
    other = Options(5, "sparse").as_args()
    for _ in range(3):
        call(*a)
        call(*b)
        call(*a, args=other)
    assert StandInGraph.made == 3 and cuda_graphs.kept() == 3
    assert torch.equal(call(*a, args=other), usual(*a, args=other))


def test_the_switch_turns_graphs_off(stand_ins, monkeypatch):
    monkeypatch.setenv(cuda_graphs.ENV, "0")
    q, k, v = make_qkv(6, 2, 1, 80, 8)
    for _ in range(3):
        assert torch.equal(call(q, k, v), usual(q, k, v))
    assert StandInGraph.made == 0


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_training_forward_and_backward_replayed_equal_the_usual_path(stand_ins, mode):
    args = Options(10, mode).as_args()

    def forward(q, k, v):
        return cuda_graphs.run("forward", (args, True), (q, k, v),
                               lambda *qkv: op._training_forward(*qkv, None, None, args, True))

    def backward(g, q, k, v, saved):
        tensors = (g, q, k, v, *saved)
        return cuda_graphs.run("backward", args, tensors,
                               lambda *t: op._backward_kernels(args, t))

    for seed in range(3):
        q, k, v = make_qkv(20 + seed, 2, 2, 96, 16)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
        saved = forward(q, k, v)
        want = op._training_forward(q, k, v, None, None, args, True)
        assert all(torch.equal(a, b) for a, b in zip(saved, want))
        grads = backward(g, q, k, v, saved)
        want_grads = op._backward_kernels(args, (g, q, k, v, *want))
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    assert StandInGraph.made == 2 and cuda_graphs.kept() == 2


def test_a_failed_capture_is_not_tried_again(stand_ins, monkeypatch):
    def failing(graph, call_, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "_record", failing)
    q, k, v = make_qkv(7, 1, 1, 64, 8)
    call(q, k, v)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = call(q, k, v)
    assert torch.equal(out, usual(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no second warning, no second capture)
        call(q, k, v)
    assert StandInGraph.made == 1 and cuda_graphs.kept() == 0


def test_kept_graphs_are_bounded_and_cleared_with_the_workspace(stand_ins, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "GRAPHS", 2)
    inputs = [make_qkv(10 + i, 1, 1, 32 * (i + 1), 8) for i in range(4)]
    for qkv in inputs:
        call(*qkv)
        call(*qkv)
    assert cuda_graphs.kept() == 2
    # The oldest went, and is not captured again (no capture on every call where
    # signatures take turns); its calls are as right as ever.
    for _ in range(3):
        assert torch.equal(call(*inputs[0]), usual(*inputs[0]))
    assert StandInGraph.made == 4 and cuda_graphs.kept() == 2
    mra_compile.clear_workspace()
    assert cuda_graphs.kept() == 0


def test_cpu_tensors_never_get_a_graph():
    assert cuda_graphs._signature("inference", ARGS, make_qkv(0, 1, 1, 32, 8)) is None


def test_kept_graphs_stay_within_the_memory_budget(stand_ins, monkeypatch):
    monkeypatch.setenv(cuda_graphs.BUDGET_ENV, "250")  # (room for two 100 MiB graphs)
    inputs = [make_qkv(30 + i, 1, 1, 32 * (i + 1), 8) for i in range(3)]
    for qkv in inputs:
        call(*qkv)
        call(*qkv)
    assert StandInGraph.made == 3 and cuda_graphs.kept() == 2
    assert torch.equal(call(*inputs[2]), usual(*inputs[2]))


def test_a_call_larger_than_the_budget_is_not_kept(stand_ins, monkeypatch):
    monkeypatch.setenv(cuda_graphs.BUDGET_ENV, "50")
    q, k, v = make_qkv(40, 1, 1, 64, 8)
    outs = [call(q, k, v) for _ in range(4)]
    assert StandInGraph.made == 1 and cuda_graphs.kept() == 0
    assert all(torch.equal(out, usual(q, k, v)) for out in outs)


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_a_bad_budget_is_a_clear_error(stand_ins, monkeypatch, value):
    monkeypatch.setenv(cuda_graphs.BUDGET_ENV, value)
    q, k, v = make_qkv(41, 1, 1, 64, 8)
    with pytest.raises(ValueError, match=cuda_graphs.BUDGET_ENV):
        call(q, k, v)


def test_calls_during_a_capture_go_the_usual_way(stand_ins, monkeypatch):
    """A call of the signature being captured (another thread's, or one made by the
    capture itself) runs as usual, and nothing is captured twice."""
    q, k, v = make_qkv(42, 1, 1, 64, 8)
    inner = []

    def record_with_a_call_inside(graph, call_, device):
        inner.append(call(q, k, v))
        return stand_in_record(graph, call_, device)

    monkeypatch.setattr(cuda_graphs, "_record", record_with_a_call_inside)
    outs = [call(q, k, v) for _ in range(3)]
    assert StandInGraph.made == 1 and cuda_graphs.kept() == 1 and len(inner) == 1
    assert all(torch.equal(out, usual(q, k, v)) for out in outs + inner)


@pytest.fixture
def masked_graphs(stand_ins, monkeypatch):
    """The op's CUDA-graph path on CPU tensors (with the stand-ins)."""
    monkeypatch.setattr(op, "_graphable", lambda q, mask, query_mask: q.numel() > 0)


@pytest.mark.parametrize("kind", ["float", "bool", "int64", "additive", "bool4d"])
def test_masked_calls_replay_with_their_own_masks(masked_graphs, kind):
    """Masked inference calls of one signature: the second is captured, later ones
    replay with their own mask and give the usual path's bits on the mask as given."""
    args = Options(None, "full", block_per_row=2).as_args()
    for i, lengths in enumerate([[96, 40], [96, 70], [10, 96], [33, 1]]):
        q, k, v = make_qkv(50 + i, 2, 2, 96, 16)
        mask = padding_mask(lengths, 96, kind)
        got = op._forward_kernels(q, k, v, mask, None, args, save=False)
        assert torch.equal(got, op._inference(q, k, v, mask, None, args)), lengths
    assert StandInGraph.made == 1 and cuda_graphs.kept() == 1


def test_masked_training_steps_and_cross_attention_replay(masked_graphs):
    """A training step (forward and backward graphs) with a key mask, and cross-attention
    with a query mask too, through the public op: the usual path's output and gradients."""
    args = dict(block_per_row=2)
    for i, (lq, lk) in enumerate([([64, 20], [80, 50]), ([30, 64], [80, 80]),
                                  ([64, 64], [5, 80])]):
        q, _, _ = make_qkv(60 + i, 2, 2, 64, 16)
        _, k, v = make_qkv(70 + i, 2, 2, 80, 16)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(i))
        for query_mask in (None, padding_mask(lq, 64, "float")):
            mask = padding_mask(lk, 80, "bool")
            results = []
            for graphs in ("1", "0"):
                with pytest.MonkeyPatch.context() as m:
                    m.setenv(cuda_graphs.ENV, graphs)
                    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                    out = torch.ops.mra.attention(*leaves, mask, query_mask=query_mask, **args)
                    results.append((out.detach(), *torch.autograd.grad(out, leaves, g)))
            assert all(torch.equal(a, b) for a, b in zip(*results))
    assert StandInGraph.made == 4 and cuda_graphs.kept() == 4  # (forward, backward) x 2


def test_which_masks_a_call_has_is_part_of_its_signature(masked_graphs):
    """A key mask and a query mask of the same shape are different calls."""
    args = Options(None, "sparse", block_per_row=2).as_args()
    q, k, v = make_qkv(80, 2, 1, 64, 16)
    m = padding_mask([64, 30], 64, "float")
    for _ in range(3):
        for mask, query_mask in ((m, None), (None, m)):
            got = op._forward_kernels(q, k, v, mask, query_mask, args, save=False)
            assert torch.equal(got, op._inference(q, k, v, mask, query_mask, args))
    assert StandInGraph.made == 2


def test_a_replayed_masked_call_checks_its_mask(masked_graphs):
    """Values the usual path refuses are refused on a signature that has a graph; so is a
    mask of another shape (checked before the mask is read)."""
    args = Options(None, "full", block_per_row=2).as_args()
    q, k, v = make_qkv(81, 2, 1, 64, 16)
    mask = padding_mask([64, 30], 64, "float")
    for _ in range(3):
        op._forward_kernels(q, k, v, mask, None, args, save=False)
    assert cuda_graphs.kept() == 1
    with pytest.raises(ValueError, match="mask must contain only 0"):
        op._forward_kernels(q, k, v, mask * 2, None, args, save=False)
    additive = padding_mask([64, 30], 64, "additive")
    with pytest.raises(ValueError, match="additive"):
        op._forward_kernels(q, k, v, additive + 1, None, args, save=False)
    with pytest.raises(ValueError, match="per-query"):
        op._forward_kernels(q, k, v, torch.ones(2, 1, 64, 64), None, args, save=False)


def test_a_captured_masked_call_checks_nothing_on_the_host():
    """What a captured call runs before the kernels (``op._validated``) reads no mask value
    on the host for the bool masks ``op._graph_masks`` gives it (a capture would refuse
    the read), while the float mask it came from is read there, before the graph."""
    from cuda_emulation.runner import HostReads

    args = Options(None, "full", block_per_row=2).as_args()
    q, _, _ = make_qkv(82, 2, 1, 64, 16)
    _, k, v = make_qkv(83, 2, 1, 96, 16)
    mask, query_mask = padding_mask([96, 30], 96, "float"), padding_mask([64, 10], 64, "int64")
    with HostReads() as before:
        real, real_queries = op._graph_masks(q, k, v, mask, query_mask, args)
    assert before.where and real.dtype == real_queries.dtype == torch.bool
    with HostReads() as captured:
        op._validated(q, k, v, real, real_queries, args)
    assert not captured.where, captured.where
