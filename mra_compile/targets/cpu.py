"""The CPU target: kernels compiled by TVM's LLVM backend for this host's CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mra_compile import host, native_replay, openmp
from mra_compile.schedules import cpu as cpu_schedules
from mra_compile.targets.base import Target

TARGET_ENV = "MRA_COMPILE_TARGET"  # a TVM target as JSON, replacing this host's CPU
BF16_ENV = "MRA_COMPILE_CPU_BF16"  # "0": no bf16 micro-kernels (float32 arithmetic)
AMX_ENV = "MRA_COMPILE_CPU_AMX"  # "0": the bf16 micro-kernels keep off the AMX tiles
WIDEN_ENV = "MRA_COMPILE_CPU_WIDEN"  # "0": fp16/bf16 computed in float32 on float32 copies


def bf16_products() -> bool:
    """Whether bf16 q, k, v stay bf16 in the kernels that read them (forward and
    backward), their block products on the AVX-512-BF16 micro-kernels
    (``schedules/cpu_bf16.c``): this CPU has the instructions, no other CPU is targeted
    (``MRA_COMPILE_TARGET``), and ``MRA_COMPILE_CPU_BF16`` is not "0"."""
    return ("avx512_bf16" in host.cpu_flags() and "avx512bw" in host.cpu_flags()
            and not os.environ.get(TARGET_ENV) and os.environ.get(BF16_ENV, "1") != "0")


def bf16_micro_kernels(block_size: int = 32) -> bool:
    """Whether bf16 q, k, v in blocks of ``block_size`` go to the bf16 micro-kernels:
    ``bf16_products()``, and 32-token blocks (the only ones they take)."""
    return block_size == 32 and bf16_products()


def widened_in_place(dtype: torch.dtype, block_size: int = 32) -> bool:
    """Whether the kernels that read q, k, v (forward and backward) read half-precision
    ones of ``dtype`` in blocks of ``block_size`` where they lie, widening each value to
    float32 as they read it (the float32 kernels' arithmetic, so the same bits as on
    float32 copies), where they have no micro-kernels for it (``bf16_products``, 32-token
    blocks only): float16 on a CPU with F16C's conversions, bfloat16 anywhere (a shift);
    no other CPU targeted (``MRA_COMPILE_TARGET``), and ``MRA_COMPILE_CPU_WIDEN`` not "0"."""
    if os.environ.get(TARGET_ENV) or os.environ.get(WIDEN_ENV, "1") == "0":
        return False
    if dtype == torch.float16:
        return "f16c" in host.cpu_flags()
    return dtype == torch.bfloat16 and not bf16_micro_kernels(block_size)


def amx_products() -> bool:
    """Whether those bf16 block products run on AMX tiles (``schedules/cpu_bf16.c``
    decides in each process, the same way): ``bf16_products()``, the CPU has AMX-BF16,
    and ``MRA_COMPILE_CPU_AMX`` is not "0". (The micro-kernels also need Linux 5.16 or
    later to grant a process the tiles' state, and a head dim that is a multiple of 32;
    where either lacks they take their AVX-512-BF16 path.)"""
    flags = host.cpu_flags()
    return (bf16_products() and "amx_bf16" in flags and "amx_tile" in flags
            and os.environ.get(AMX_ENV, "1") != "0")


def half_precision() -> str:
    """How float16 and bfloat16 inputs compute here, in words (``mra-compile info``)."""
    widened = "read in place, widened to float32 as read"
    copies = "float32 copies"
    f16 = widened if widened_in_place(torch.float16) else copies
    if bf16_products():
        b16 = f"{bf16_instructions()} micro-kernels (block size 32; else {widened})"
    else:
        b16 = widened if widened_in_place(torch.bfloat16) else copies
    return f"float16 {f16}; bfloat16 {b16}"


def bf16_instructions() -> str:
    """What bf16 inputs' block products run on here, in words (benchmarks' headers)."""
    if not bf16_products():
        return "none (bf16 computed in float32)"
    return "AMX tiles" if amx_products() else "AVX-512-BF16"


class CpuTarget(Target):
    name = "llvm"
    family = "cpu"
    device_type = "cpu"
    uses_tuning_records = True
    # A fresh 50 MB intermediate costs ~10 ms of page faults on first touch: reuse.
    reuses_workspace = True
    exact_plan = True
    selects_in_numpy = True
    reads_heads_last = True

    @property
    def schedules(self):
        return cpu_schedules

    def default_knobs(self, op: str) -> dict:
        # Register tiles sized to this CPU's vector unit (schedules/cpu.py, NARROW_KNOBS).
        return cpu_schedules.default_knobs(op, host.default_vector_width())

    def tuning_host(self) -> str:
        return host.host_fingerprint()  # this CPU model and its vector width

    def tuning_dtype(self, dtype: torch.dtype) -> str:
        # ``mra-compile tune`` measures float32; its records serve every input dtype.
        return "float32"

    def tvm_target(self):
        import tvm

        env = os.environ.get(TARGET_ENV)
        if env:
            return tvm.target.Target(json.loads(env))
        return tvm.target.Target({"kind": "llvm",
                                  "mcpu": tvm.target.codegen.llvm_get_system_cpu()})

    def host_key(self) -> str:
        return host.host_fingerprint()

    def target_override(self) -> str:
        return os.environ.get(TARGET_ENV, "")

    def io_dtype(self, dtype: torch.dtype, block_size: int = 32) -> torch.dtype:
        # bf16 products with fp32 sums where the CPU has them (the 32 x 32 blocks of the
        # forward and of the backward's units); else fp16/bf16 read in place and widened
        # (``widened_in_place``); everything else computes in float32 from float32 copies.
        if dtype == torch.bfloat16 and bf16_micro_kernels(block_size):
            return dtype
        if widened_in_place(dtype, block_size):
            return dtype
        return super().io_dtype(dtype)

    def widens(self, io: torch.dtype, block_size: int = 32) -> bool:
        return io == torch.float16 or (io == torch.bfloat16
                                       and not bf16_micro_kernels(block_size))

    def micro_kernels(self, io: torch.dtype, float32_pv: bool = False,
                      block_size: int = 32) -> str | None:
        if io != torch.bfloat16 or not bf16_micro_kernels(block_size):  # (else widened)
            return None
        return "avx512_bf16_fp32_pv" if float32_pv else "avx512_bf16"

    def link_objects(self, op: str, static: dict) -> list[str]:
        from mra_compile.schedules import cpu_bf16, cpu_select, cpu_stores

        objects = cpu_stores.objects() if op == "hires_rows" else []  # (its output's stores)
        if op == "select_plan":  # (its scans: a compress where the CPU has AVX-512)
            objects += cpu_select.objects()
        if str(static.get("micro", "")).startswith("avx512_bf16"):
            objects += cpu_bf16.objects()
        return objects

    def build_dtypes(self, requested: list[str] | None) -> list[str]:
        # fp16/bf16 inputs run on the float32 kernels where they are neither widened nor
        # on micro-kernels (``widened_in_place``, ``bf16_products``).
        half = tuple(d for d in ("float16", "bfloat16") if not (
            widened_in_place(getattr(torch, d)) or (d == "bfloat16" and bf16_products())))
        return super().build_dtypes(["float32" if d in half else d for d in requested or []])

    def after_load(self, path: Path) -> None:
        openmp.install(path)  # parallel loops on torch's OpenMP threads

    def library_extras(self, out: Path, library: Path, executable, manifest: dict) -> None:
        # The kernels' parallel loops run on torch's OpenMP threads, and the launch cache
        # replays from C: ship both libraries so that a runtime-only machine needs no C
        # compiler.
        openmp.build_into(out / "runtime")
        native_replay.build_into(out / "runtime")


CPU = CpuTarget()
