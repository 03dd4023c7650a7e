"""Forward-pass benchmark on the CPU: the compiled op against the baselines, side by side.

A thin script over ``mra_compile.tools.benchmarks`` (also ``mra-compile bench``), run
from the repository checkout; see that module for what is timed and how. Results go to
``bench/results/`` of this checkout.

    python bench/bench_forward.py                          # full run, writes bench/results/
    python bench/bench_forward.py --sizes 512 1024 --repeat 3
    python bench/bench_forward.py --plot                   # + time_vs_n.png, error_vs_blocks_per_row.png
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mra_compile.tools.benchmarks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(out_dir=REPO_ROOT / "bench" / "results"))
