"""The test session's background jobs (``conftest.CudaLibraryBuilds``): the CUDA
libraries' builds and the emulations run beside the CPU tests, and a test that needs one
gets its result, or its failure, as if it had run the job itself."""
import os
import sys
import time

import pytest
from conftest import EMULATED, EMULATION_RUNS, CudaLibraryBuilds


def _builds(tmp_path, runs, monkeypatch, **registered):
    for name, run in registered.items():
        monkeypatch.setitem(EMULATION_RUNS, name, run)
        monkeypatch.setitem(EMULATED, name, f"{name}_library")
    return CudaLibraryBuilds(tmp_path, [], [], runs)


def test_a_background_run_gives_the_fixture_its_result(tmp_path, monkeypatch):
    seen = []

    def run(builds, library, workdir):
        seen.append((library, workdir))
        return {"cases": 3}

    builds = _builds(tmp_path, ["emu"], monkeypatch, emu=run)
    assert builds.emulated("emu") == {"cases": 3}
    assert builds.emulated("emu") == {"cases": 3}  # (run once)
    assert seen == [("emu_library", tmp_path / "emu_run")]


def test_a_run_not_scheduled_runs_when_asked(tmp_path, monkeypatch):
    builds = _builds(tmp_path, [], monkeypatch, emu=lambda builds, library, workdir: "here")
    assert builds.emulated("emu") == "here"


@pytest.mark.parametrize("runs", [["emu"], []])
def test_a_failed_run_fails_the_test_that_needs_it_with_its_message(tmp_path, monkeypatch, runs):
    def run(builds, library, workdir):
        pytest.fail("worker0 exited 1: boom")  # (as a failed build or emulation does)

    builds = _builds(tmp_path, runs, monkeypatch, emu=run, other=lambda b, lib, w: "ok")
    with pytest.raises(pytest.fail.Exception, match="emulation emu failed: .*worker0 exited 1: boom"):
        builds.emulated("emu")
    assert builds.emulated("other") == "ok"  # (the background thread goes on)


def test_processes_see_the_sessions_environment_and_stop_kills_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MRA_COMPILE_TEST_MARK", "session")
    builds = _builds(tmp_path, [], monkeypatch)
    monkeypatch.setenv("MRA_COMPILE_TEST_MARK", "a test's")
    out = tmp_path / "mark"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ['MRA_COMPILE_TEST_MARK'])"
    builds.popen([sys.executable, "-c", code]).wait(timeout=60)
    assert out.read_text() == "session"

    sleeper = builds.popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    builds.stop()
    assert sleeper.wait(timeout=30) != 0 and time.monotonic() - start < 30
    with pytest.raises(RuntimeError, match="session ended"):
        builds.popen([sys.executable, "-c", "pass"])
    assert os.environ["MRA_COMPILE_TEST_MARK"] == "a test's"
