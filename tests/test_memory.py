"""The memory the op keeps between calls (``mra_compile.memory``): result blocks come back
when the last tensor using them is freed and are handed out again, a live result is never
handed out, and what is kept stays within ``MRA_COMPILE_WORKSPACE_MB``."""
from __future__ import annotations

import gc
import threading

import pytest
import torch
from conftest import make_qkv

import mra_compile
from mra_compile import memory

op = torch.ops.mra.attention


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


def test_a_freed_result_is_reused_still_mapped():
    # The cold-start fix: the next result of the same size is written into the freed
    # one's memory (pages already mapped), not into memory fresh from the OS.
    x = make_qkv(0, 1, 3, 200, 64)
    gc.collect()  # (a result of this size that earlier tests left in a cycle: freed now)
    mra_compile.clear_workspace()
    assert memory.kept_result_bytes() == 0
    first = op(*x, None, 20, "full")
    want, ptr = first.clone(), first.data_ptr()
    del first
    gc.collect()
    assert memory.kept_result_bytes() >= want.numel() * 4
    again = op(*x, None, 20, "full")
    assert again.data_ptr() == ptr
    assert torch.equal(again, want)
    mra_compile.clear_workspace()
    assert memory.kept_result_bytes() == 0


def test_a_live_result_is_never_handed_out_again():
    x = make_qkv(1, 2, 2, 610, 40)  # (results over memory.SMALL_RESULT come from kept blocks)
    first = op(*x, None, 9, "sparse")
    part = first[1, :, 5:]  # a view keeps the whole block
    kept = part.clone()
    del first
    gc.collect()
    later = [op(*make_qkv(seed, 2, 2, 610, 40), None, 9, "sparse") for seed in range(2, 5)]
    assert torch.equal(part, kept)
    a0, a1 = _span(part)
    for t in later:
        b0, b1 = _span(t)
        assert b1 <= a0 or a1 <= b0


def test_saved_results_survive_later_calls_in_training():
    # What the forward saves for the backward are results too: a second forward and its
    # backward must not touch the first forward's.
    x = [t.requires_grad_() for t in make_qkv(5, 1, 2, 700, 32)]
    y = [t.detach().clone().requires_grad_() for t in x]
    out_x = op(*x, None, 12, "full")
    out_y = op(*y, None, 12, "full")
    out_y.sum().backward()
    del out_y
    gc.collect()
    op(*make_qkv(6, 1, 2, 700, 32), None, 12, "full")  # reuses the freed blocks
    out_x.sum().backward()
    for a, b in zip(x, y):
        assert torch.equal(a.grad, b.grad)


def test_an_inference_call_keeps_only_its_output(monkeypatch):
    # Nothing to differentiate: what the backward would read stays in scratch memory,
    # and the output is the call's only result; with a gradient to compute, the saved
    # tensors are results too. The output is the same either way.
    from mra_compile import inputs

    taken = []
    real = inputs.result_tensor

    def counted(shape, *args):
        taken.append(shape)
        return real(shape, *args)

    monkeypatch.setattr(inputs, "result_tensor", counted)
    q, k, v = make_qkv(8, 1, 3, 512, 64)
    for mode in ("full", "sparse"):
        taken.clear()
        with torch.no_grad():
            out = op(q, k, v, None, 40, mode)
        assert taken == [(3, 16, 32, 64)], (mode, taken)
        taken.clear()
        trained = op(q.clone().requires_grad_(), k, v, None, 40, mode)
        assert len(taken) >= 5, (mode, taken)
        assert torch.equal(out, trained.detach())


def test_kept_results_stay_within_the_bound(monkeypatch):
    x = make_qkv(7, 1, 2, 300, 64)
    one = op(*x, None, 30, "full").numel() * 4
    for megabytes, bound in (("0", 0), (str(2.5 * one / 2**20), 2.5 * one)):
        monkeypatch.setenv(memory.WORKSPACE_ENV, megabytes)
        mra_compile.clear_workspace()
        results = [op(*x, None, 30, "full") for _ in range(4)]
        del results
        gc.collect()
        assert memory.kept_result_bytes() <= bound
    mra_compile.clear_workspace()


def test_a_result_freed_on_another_thread_comes_back():
    x = make_qkv(8, 1, 2, 600, 32)
    mra_compile.clear_workspace()
    box = [op(*x, None, 4, "full")]
    want = box[0].clone()
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    gc.collect()
    assert memory.kept_result_bytes() > 0
    assert torch.equal(op(*x, None, 4, "full"), want)


def test_small_results_are_plain_tensors():
    # Below memory.SMALL_RESULT a result is a plain allocation (heap memory, no fault to
    # avoid): nothing is kept for it.
    x = make_qkv(9, 1, 2, 64, 32)
    mra_compile.clear_workspace()
    out = op(*x, None, 4, "full")
    assert out.numel() * 4 <= memory.SMALL_RESULT
    del out
    gc.collect()
    assert memory.kept_result_bytes() == 0


def test_results_behave_as_tensors():
    import io

    x = make_qkv(9, 1, 2, 600, 32)  # (over memory.SMALL_RESULT: on a kept block)
    out = op(*x, None, 4, "full")
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), out)
    shared = op(*x, None, 4, "full")
    shared.share_memory_()
    assert shared.is_shared() and torch.equal(shared, out)
    with pytest.raises(RuntimeError):
        out.resize_(out.numel() + 1)  # (documented: a result's storage cannot grow)
