"""bench/ab_kernel.py, the in-process A/B of one kernel: it compares what it says it compares."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import ab_kernel  # noqa: E402

SMALL = ["--n", "256", "--heads", "2", "--rounds", "1"]


def test_a_variant_with_other_knobs_is_built_checked_and_timed(capsys):
    # lowres_out's vector width changes its lanes, not its sums: the same bits.
    assert ab_kernel.main(["--op", "lowres_out", *SMALL, "--knobs", '{"vec": 8}']) == 0
    out = capsys.readouterr().out
    assert 'this checkout\'s kernel: ' in out and "lowres_out-" in out
    assert '{"vec": 8}: the same bits' in out
    assert f"{ab_kernel.CONTROL}: the same bits" in out
    assert out.count(" ms ") == 3  # the reference, the control and the variant, each timed
    assert "--knobs '{\"vec\": 8}'" in out  # the command, quoted for a shell


def test_the_control_can_be_left_out(capsys):
    assert ab_kernel.main(["--op", "lowres_out", *SMALL, "--knobs", "{}", "--no-control"]) == 0
    out = capsys.readouterr().out
    assert ab_kernel.CONTROL not in out and out.count(" ms ") == 2


def test_an_old_kernel_file_is_loaded_as_the_op_loads_it(capsys):
    assert ab_kernel.main(["--op", "lowres_out", *SMALL, "--knobs", "{}"]) == 0
    path = next(line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("this checkout's kernel: "))
    assert ab_kernel.main(["--op", "lowres_out", *SMALL, "--old", path]) == 0
    assert f"{path}: the same bits" in capsys.readouterr().out


def test_differences_name_the_argument_and_the_size():
    a = [torch.zeros(3), 5, torch.ones(2, dtype=torch.int32)]
    b = [torch.tensor([0.0, -0.0, 0.5]), 5, torch.ones(2, dtype=torch.int32)]
    (only,) = ab_kernel.differences(a, b)  # (-0.0 differs from 0.0 in its bits)
    assert only.startswith("argument 0 (3,) torch.float32") and "0.5" in only
    assert ab_kernel.differences(a, a) == []


def test_a_kernel_the_call_does_not_launch_is_named(capsys):
    with pytest.raises(SystemExit, match="bwd_finish.*need --training"):
        ab_kernel.main(["--op", "bwd_finish", *SMALL, "--knobs", "{}"])
    with pytest.raises(SystemExit):
        ab_kernel.main(["--op", "lowres_out", *SMALL])  # no variant
    assert "give at least one variant" in capsys.readouterr().err


def test_the_timer_alternates_its_order_only_when_asked():
    from mra_compile.tools import common

    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "ab"}
    assert set(common.median_ms(fns, 4, alternate=True)) == {"a", "b"}
    assert calls == list("abbaabba")
    calls.clear()
    common.median_ms(fns, 2)
    assert calls == list("abab")


def test_the_timer_runs_before_untimed_ahead_of_each_call(monkeypatch):
    import time

    from mra_compile.tools import common

    calls: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))

    def before():
        calls.append("-")
        next(clock)  # (a tick inside before: not counted)
        next(clock)

    fns = {name: (lambda n=name: calls.append(n)) for name in "ab"}
    timed = common.median_ms(fns, 2, alternate=True, before=before)
    assert calls == list("-a-b-b-a")
    assert timed == {"a": 1e3, "b": 1e3}  # each call one tick: before's ticks left out


def test_cold_rounds_read_other_memory_before_each_call(capsys, monkeypatch):
    from mra_compile.tools import common

    seen = {}
    timer = common.median_ms

    def spy(fns, rounds, **kw):
        seen.update(kw)
        return timer(fns, rounds, **kw)

    monkeypatch.setattr(common, "median_ms", spy)
    assert ab_kernel.main(["--op", "lowres_out", *SMALL, "--knobs", "{}", "--cold"]) == 0
    assert callable(seen["before"]) and "--cold" in capsys.readouterr().out
