"""The fuzz property, in a subprocess so that a crash is a test failure with its input:
hypothesis-drawn valid inputs (shapes, dtypes, masks, budgets, priors, block sizes,
strides, grouped heads, cross-attention) never crash and match the float64 reference
given the op's own selection, gradients too where drawn; invalid ones raise
TypeError/ValueError only (tests/helpers/fuzz_worker.py)."""
import json
import subprocess
import sys

from conftest import REPO

WORKER = REPO / "tests" / "helpers" / "fuzz_worker.py"


def test_fuzz_never_crashes_and_matches_the_reference():
    proc = subprocess.run([sys.executable, str(WORKER), "100", "60", "20261130"],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    last = proc.stderr.strip().splitlines()[-12:]
    assert proc.returncode == 0, (f"fuzz worker failed (exit {proc.returncode}); last lines:\n"
                                  + "\n".join(last))
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    # (hypothesis may stop early once a small space is exhausted: every invalid kind ran)
    assert counts["valid"] >= 80 and counts["invalid"] == counts["kinds"], counts
    # (about 2 in 5 cases are cross-attention, 1 in 3 take gradients)
    assert counts["cross"] >= 20 and counts["gradients"] >= 15, counts
