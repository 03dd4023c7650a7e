"""Small C programs that measure the machine (``bench_fma_peak.py``, ``bench_memory_rate.py``):
built with the system C compiler into a temporary directory."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# A monotonic clock in seconds, for the programs' own timing: ``now()``.
CLOCK = r"""
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
"""


def build(workdir: Path, name: str, source: str, flags: list[str], script: str) -> Path:
    """``source`` compiled with ``flags`` into the executable ``workdir/name``; ``script``
    (the bench's file name) is named in the errors."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise SystemExit(f"{script} needs a C compiler (cc or gcc)")
    src, exe = workdir / f"{name}.c", workdir / name
    src.write_text(source)
    proc = subprocess.run([cc, *flags, str(src), "-o", str(exe)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script}: its C program did not build ({' '.join(flags)}):\n"
                         f"{proc.stderr[-2000:]}")
    return exe
