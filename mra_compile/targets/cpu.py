"""The CPU target: kernels compiled by TVM's LLVM backend for this host's CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mra_compile import host, openmp
from mra_compile.schedules import cpu as cpu_schedules
from mra_compile.targets.base import Target

TARGET_ENV = "MRA_COMPILE_TARGET"  # a TVM target as JSON, replacing this host's CPU


class CpuTarget(Target):
    name = "llvm"
    family = "cpu"
    device_type = "cpu"
    uses_tuning_records = True
    # A fresh 50 MB intermediate costs ~10 ms of page faults on first touch: reuse.
    reuses_workspace = True
    exact_plan = True
    selects_in_numpy = True

    @property
    def schedules(self):
        return cpu_schedules

    def default_knobs(self, op: str) -> dict:
        knobs = super().default_knobs(op)
        if "vec" in knobs:
            knobs["vec"] = host.default_vector_width()
        return knobs

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

    def build_dtypes(self, requested: list[str] | None) -> list[str]:
        # float16/bfloat16 inputs run on the float32 kernels here.
        half = ("float16", "bfloat16")
        return super().build_dtypes(["float32" if d in half else d for d in requested or []])

    def after_load(self, path: Path) -> None:
        openmp.install(path)  # parallel loops on torch's OpenMP threads

    def library_extras(self, out: Path, library: Path, executable, manifest: dict) -> None:
        # The kernels' parallel loops run on torch's OpenMP threads: ship the launcher so
        # that a runtime-only machine needs no C compiler.
        openmp.build_into(out / "runtime")


CPU = CpuTarget()
