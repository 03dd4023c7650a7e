"""Kernel targets: one object per backend (``base.Target``), looked up by name or device.

    targets.of_device(q.device)  -> the target of a tensor's device
    targets.get("cuda-sm_90")    -> a target by its kernel name ("llvm", "cuda-sm_XY")
"""
from __future__ import annotations

import functools
import re

import torch

from mra_compile.targets.base import Target, compute_dtype
from mra_compile.targets.cpu import CPU
from mra_compile.targets.cuda import CudaTarget

__all__ = ["CPU", "Target", "compute_dtype", "get", "of_device", "check_device",
           "for_build", "BUILD_KINDS"]

DEVICE_TYPES = ("cpu", "cuda")
BUILD_KINDS = ("llvm", "cuda")  # what ``mra-compile build --target`` takes
CUDA_ARCHS = re.compile(r"sm_(\d+)")
MIN_CUDA_SM = 70


@functools.cache
def _named(name: str) -> Target:
    if name == CPU.name:
        return CPU
    m = re.fullmatch(r"cuda-(sm_\d+)", name)
    if m:
        return CudaTarget(m.group(1))
    raise ValueError(f"unknown kernel target {name!r} (expected 'llvm' or 'cuda-sm_XY')")


def get(target: Target | str | None = None) -> Target:
    """``target`` as a Target: a Target, its name, or None for the CPU."""
    if target is None:
        return CPU
    if isinstance(target, Target):
        return target
    return _named(target)


def check_device(device: torch.device, name: str = "q") -> None:
    """ValueError unless kernels exist for ``device``'s type."""
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} is on {device}: mra_compile runs on the CPU and on NVIDIA "
                         "GPUs (cuda) only")


def of_device(device: torch.device) -> Target:
    """The target of a torch device: the CPU, or the CUDA device's architecture."""
    check_device(device, "tensor")
    if device.type == CPU.device_type:
        return CPU
    major, minor = torch.cuda.get_device_capability(device)
    return _named(f"cuda-sm_{major}{minor}")


def for_build(kind: str, arch: str | None = None) -> Target:
    """The target of ``mra-compile build --target KIND [--arch ARCH]``."""
    if kind == CPU.name:
        return CPU
    if kind != "cuda":
        raise ValueError(f"--target must be one of {BUILD_KINDS}, got {kind!r}")
    m = CUDA_ARCHS.fullmatch(arch or "")
    if m is None or int(m.group(1)) < MIN_CUDA_SM:
        raise ValueError(f"--arch: {arch!r} is not an NVIDIA architecture like sm_80 or sm_90 "
                         f"(sm_{MIN_CUDA_SM} or newer)")
    return _named(f"cuda-{arch}")
