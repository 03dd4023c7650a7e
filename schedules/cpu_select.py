"""The selection kernel's scans that pick a row's entries out (``cpu_select.c``), called
from its TIR (``mra_compile.selection_tir``) by name: TIR has no way to move a vector's
passing lanes together (AVX-512's compress), so the candidates' pass and the read-off of
T were a branch per vector and a scalar loop per entry there."""
from __future__ import annotations

from pathlib import Path

from mra_compile.schedules import cpu_stores

SOURCE = Path(__file__).with_name("cpu_select.c")
FLAGS = ("-O2",)


def objects() -> list[str]:
    """The scans as an object file to link into the selection kernel's library."""
    return cpu_stores.c_object(SOURCE, FLAGS, "select",
                               "the CPU kernels need a C compiler (cc or gcc).")
