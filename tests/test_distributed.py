"""Training under torch.distributed: 2 ranks (gloo, CPU) vs one process on the whole batch.

Each rank trains on half of a fixed batch (same number of real tokens per half, so the
ranks' averaged gradients are the concatenated batch's); after the first step the
gradients, and after three SGD steps the parameters, must equal a single process's.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from helpers.tiny_model import STEPS, batch, make_model, sgd_step  # noqa: E402


def _single_process_baseline():
    model = make_model()
    x, y, mask = batch()
    first = None
    for step in range(STEPS):
        grads = sgd_step(model, x, y, mask)
        if step == 0:
            first = grads
    return first, {name: p.detach().clone() for name, p in model.named_parameters()}


def _launch(mode, tmp_path):
    store, out = tmp_path / "store", tmp_path / "result.pt"
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "helpers" / "dist_worker.py"), mode,
                          str(store), str(out)], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return torch.load(out)


def _compare(result):
    first, params = _single_process_baseline()
    for name, g in first.items():
        torch.testing.assert_close(result["grads"][name], g, rtol=1e-5, atol=1e-6)
    for name, p in params.items():
        torch.testing.assert_close(result["params"][name], p, rtol=1e-5, atol=1e-6)


def test_ddp_two_ranks_match_single_process(tmp_path):
    _compare(_launch("ddp", tmp_path))


def test_fsdp2_two_ranks_match_single_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    _compare(_launch("fsdp2", tmp_path))
