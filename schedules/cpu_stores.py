"""The float32 output of ``hires_rows`` stored by a C call (``cpu_stores.c``): TVM 0.27
emits no non-temporal store, and the output (25 MB at N = 8192, B·H = 12, D = 64) is
written once and not read again by the kernel.

The intrinsic's description is a copy of a [b, D] block of float32 rows (the block row's
output, computed into a scratch block in L1 by the schedule's ``cache_write``) into the
op's output.
"""
from __future__ import annotations

import functools
from pathlib import Path

from mra_compile import host

SOURCE = Path(__file__).with_name("cpu_stores.c")
FLAGS = ("-O2",)


def objects() -> list[str]:
    """The store as an object file to link into a kernel library (built once into the
    kernel cache)."""
    import subprocess

    source = SOURCE.read_text()
    digest = host.text_digest(source + " ".join(FLAGS))[:16]
    try:
        built = host.cached_c_library(source, f"micro/stores-{digest}.o", FLAGS, shared=False)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise RuntimeError(
            "mra_compile: building the output stores (schedules/cpu_stores.c) failed; "
            f"the CPU kernels need a C compiler (cc or gcc). {e} "
            f"{detail.decode(errors='replace')[-400:]}") from e
    return [str(built)]


@functools.cache
def store_intrinsic(b: int, D: int) -> str:
    """The name of the intrinsic that copies a [b, D] float32 block (a block row of ``b``
    tokens) into the output (``mra_store_rows_f32``) for head dim ``D`` (registered
    once)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    F32 = "float32"

    @T.prim_func(s_tir=True)
    def desc(s: T.handle, o: T.handle):
        ss, so = T.int32(), T.int32()
        S = T.match_buffer(s, (b, D), F32, strides=[ss, 1], offset_factor=1)
        O = T.match_buffer(o, (b, D), F32, strides=[so, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(S[0:b, 0:D])
            T.writes(O[0:b, 0:D])
            for t, d in T.grid(b, D):
                with T.sblock("copy"):
                    vt, vd = T.axis.remap("SS", [t, d])
                    O[vt, vd] = S[vt, vd]

    @T.prim_func(s_tir=True)
    def impl(s: T.handle, o: T.handle):
        ss, so = T.int32(), T.int32()
        S = T.match_buffer(s, (b, D), F32, strides=[ss, 1], offset_factor=1)
        O = T.match_buffer(o, (b, D), F32, strides=[so, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(S[0:b, 0:D])
            T.writes(O[0:b, 0:D])
            T.evaluate(T.call_extern("int32", "mra_store_rows_f32", S.access_ptr("r"), ss,
                                     O.access_ptr("w"), so, b, D))

    name = f"mra_store_rows_f32_b{b}_d{D}"
    TensorIntrin.register(name, desc, impl)
    return name
