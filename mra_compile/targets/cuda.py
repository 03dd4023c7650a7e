"""The CUDA target: kernels for one NVIDIA GPU architecture ("sm_90"), device code
compiled by nvcc (``mra_compile.cuda_toolchain``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mra_compile import cuda_toolchain, host, runtime
from mra_compile.schedules import cuda as cuda_schedules
from mra_compile.targets.base import Target

SOURCE_FILE = "mra_kernels.cu"  # a CUDA library's generated device source, for inspection
# ... and what its compile made of each kernel (cuda_toolchain.device_report): registers,
# spills, shared memory, tensor-core instructions
REPORT_FILE = "device_report.json"
GRID_Y = 65535  # blockIdx.y limit: the kernels put a row's blocks / units there
HALF = (torch.float16, torch.bfloat16)


class CudaTarget(Target):
    family = "cuda"
    device_type = "cuda"
    # The plan is sized from the shapes alone: no host synchronisation, capturable.
    exact_plan = False
    scratch_args = True
    # Records of the architecture, measured on one of its cards (``bench/gpu_check.py``)
    # and shipped in the package; per input dtype (tensor cores or not).
    uses_tuning_records = True

    def __init__(self, arch: str):
        self.arch = arch
        self.name = f"cuda-{arch}"

    @property
    def schedules(self):
        return cuda_schedules

    def tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "cuda", "arch": self.arch})

    def tuning_host(self) -> str:
        return self.name

    def host_key(self) -> str:
        return host.machine()  # the host side is generic code for the machine type

    def io_dtype(self, dtype: torch.dtype, block_size: int = 32) -> torch.dtype:
        # fp16/bf16 are tensor-core operands as they are; sums stay in float32.
        return dtype if dtype in HALF else super().io_dtype(dtype)

    def splits_pv(self, io: torch.dtype) -> bool:
        # P v on tensor cores with P as P_hi + P_lo: the float32 output of the training
        # forward, which the backward then reads instead of computing it again.
        return io in HALF

    def prepare_compiler(self) -> None:
        cuda_toolchain.prepare_compiler()

    def build_dtypes(self, requested: list[str] | None) -> list[str]:
        return super().build_dtypes(requested or ["float32", "float16", "bfloat16"])

    def check_export(self, path: Path) -> list:
        # Never keep a module that holds only CUDA source (no driver: see cuda_toolchain).
        return cuda_toolchain.check_device_code(Path(path), self.arch)

    def prepare_runtime(self) -> None:
        cuda_toolchain.ensure_cuda_runtime(allow_stub=True)

    def library_extras(self, out: Path, library: Path, executable, manifest: dict) -> None:
        manifest["device_images"] = len(self.check_export(library))
        source = cuda_toolchain.device_source(executable)
        (out / SOURCE_FILE).write_text(source)
        (out / REPORT_FILE).write_text(json.dumps(cuda_toolchain.device_report(source),
                                                  indent=1, sort_keys=True))
        # A machine with torch but without TVM loads the library with these.
        (out / "runtime").mkdir(exist_ok=True)
        for lib in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
            shutil.copy2(runtime.runtime_dir() / lib, out / "runtime" / lib)

    def device_scope(self, device: torch.device):
        # torch's current stream is per device: the kernels launch on the current stream
        # of their tensors' device.
        return torch.cuda.device(device)

    def check_launch(self, **extents: int) -> None:
        # One thread block per (row, block or unit).
        for name, extent in extents.items():
            if extent > GRID_Y:
                what = "blocks per row" if name == "n" else "work units per row"
                raise ValueError(
                    f"num_blocks/N: {extent} {what} exceed the CUDA grid's {GRID_Y}; use "
                    "fewer blocks or a larger block_size")
