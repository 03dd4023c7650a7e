"""hires_rows' output stored by a C call a block row (``cpu_stores.c``, and for bf16
``cpu_bf16.c``): TVM 0.27 emits no non-temporal store (nor ``vcvtneps2bf16``), and the
output (25 MB in float32 at N = 8192, B·H = 12, D = 64) is written once and not read
again by the kernel.

The intrinsic's description is the store of a [b, D] block of float32 rows (the block
row's output, computed into a scratch block in L1: ``schedules/cpu.py``,
``_stored_output``) into the op's output: a copy, or for bf16 bits the rounding of
``operators.bf16_narrow``. Also the C objects' build (``c_object``), which
``cpu_bf16`` shares.
"""
from __future__ import annotations

import functools
from pathlib import Path

from mra_compile import host
from mra_compile.schedules import extern_calls

SOURCE = Path(__file__).with_name("cpu_stores.c")
FLAGS = ("-O2",)
# The C function storing an output of each dtype ("int16": bf16 bits, in cpu_bf16.c).
EXTERNS = {"float32": "mra_store_rows_f32", "int16": "mra_bf16_store_rows"}


def c_object(source: Path, flags: tuple[str, ...], stem: str, advice: str) -> list[str]:
    """C ``source`` compiled with ``flags`` into an object file to link into a kernel
    library, once into the kernel cache (``micro/<stem>-<digest>.o``); ``advice``: what a
    failed build's error says to do."""
    import subprocess

    text = source.read_text()
    digest = host.text_digest(text + " ".join(flags))[:16]
    try:
        built = host.cached_c_library(text, f"micro/{stem}-{digest}.o", flags, shared=False)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise RuntimeError(
            f"mra_compile: building {source.parent.name}/{source.name} failed; {advice} "
            f"{e} {detail.decode(errors='replace')[-400:]}") from e
    return [str(built)]


def objects() -> list[str]:
    """The float32 store as an object file to link into a kernel library."""
    return c_object(SOURCE, FLAGS, "stores", "the CPU kernels need a C compiler (cc or gcc).")


@functools.cache
def store_intrinsic(b: int, D: int, dtype: str = "float32", heads_last: bool = False) -> str:
    """The name of the intrinsic that stores a [b, D] float32 block (a block row of ``b``
    tokens) into an output of ``dtype`` ("float32", or "int16": bf16 bits, rounded) for
    head dim ``D`` (registered once): a call of ``EXTERNS[dtype]``. ``heads_last``: the
    output is [B, n, b, H, D] (an attention layer's [B, N, H, D]), whose block row is a
    [1, 1, b, 1, D] region, its rows H D apart."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    from mra_compile.operators import bf16_narrow

    F32, extern = "float32", EXTERNS[dtype]

    def value(x):  # the output's value of float32 x
        return x if dtype == F32 else bf16_narrow(x)

    @T.prim_func(s_tir=True)
    def desc(s: T.handle, o: T.handle):
        ss, so = T.int32(), T.int32()
        S = T.match_buffer(s, (b, D), F32, strides=[ss, 1], offset_factor=1)
        O = T.match_buffer(o, (b, D), dtype, strides=[so, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(S[0:b, 0:D])
            T.writes(O[0:b, 0:D])
            for t, d in T.grid(b, D):
                with T.sblock("store"):
                    vt, vd = T.axis.remap("SS", [t, d])
                    O[vt, vd] = value(S[vt, vd])

    @T.prim_func(s_tir=True)
    def heads_last_desc(s: T.handle, o: T.handle):
        ss, s0, s1, so, s3 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        S = T.match_buffer(s, (b, D), F32, strides=[ss, 1], offset_factor=1)
        O = T.match_buffer(o, (1, 1, b, 1, D), dtype, strides=[s0, s1, so, s3, 1],
                           offset_factor=1)
        with T.sblock("root"):
            T.reads(S[0:b, 0:D])
            T.writes(O[0:1, 0:1, 0:b, 0:1, 0:D])
            for t, d in T.grid(b, D):
                with T.sblock("store"):
                    vt, vd = T.axis.remap("SS", [t, d])
                    O[0, 0, vt, 0, vd] = value(S[vt, vd])

    def call(reads, writes):  # (O's row stride: that of its token dimension)
        (S,), (O,) = reads, writes
        return (extern, extern_calls.pointer(S), S.strides[0], extern_calls.pointer(O),
                O.strides[2 if heads_last else 0], b, D)

    chosen = heads_last_desc if heads_last else desc
    name = f"{extern}_b{b}_d{D}" + ("_heads_last" if heads_last else "")
    TensorIntrin.register(name, chosen, extern_calls.called(chosen, call))
    return name
