"""What every kernel target (a backend: CPU through LLVM, NVIDIA GPUs through CUDA) tells
the rest of the package. Everything that differs between backends is a method or an
attribute here; no other module branches on the target's name."""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import ModuleType

import torch


class Target:
    """One backend. ``name`` keys kernels ("llvm", "cuda-sm_90"); ``family`` names its
    schedules module (``mra_compile.schedules.<family>``) and its source hash."""

    name: str
    family: str
    device_type: str  # the torch device type its kernels run on
    # Whether the tuning records (``mra_compile.records``) apply to its kernels.
    uses_tuning_records: bool = False
    # Whether scratch tensors may be reused across calls (``mra_compile.inputs.Workspace``).
    reuses_workspace: bool = False
    # Whether the work plan may read the selection back to size itself exactly
    # (``plan.make_plan(exact=...)``); False keeps the call free of host synchronisation.
    exact_plan: bool = True
    # Whether block selection runs in numpy on the host (``plan.select_blocks``): the
    # tensors are in host memory, where numpy's selection beats torch.topk.
    selects_in_numpy: bool = False
    # Whether the intermediates a kernel keeps in global memory between its launches
    # (``Kernel.scratch``) are arguments allocated by torch, instead of TVM's workspace
    # pool. CUDA: TVM returns its workspace to the pool when the kernels are queued,
    # not when they finish, so another stream or a replaying CUDA graph could reuse it
    # while they run; torch's allocator orders reuse by stream and keeps a graph's own.
    scratch_args: bool = False
    # Whether its kernels that read q, k, v have the variant that reads them from
    # [B, N, H, D] tensors (``Kernel.heads_last``; ``inputs.reads_heads_last``).
    reads_heads_last: bool = False

    @property
    def schedules(self) -> ModuleType:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<target {self.name}>"

    # ------------------------------------------------------------------ kernels

    def default_knobs(self, op: str) -> dict:
        """The schedule knobs of ``op`` when nothing else is said (``KNOBS[op]``)."""
        return dict(self.schedules.KNOBS[op])

    def tuning_host(self) -> str:
        """What a tuning record of this target was measured on and applies to (its
        ``host`` field; the name of its shipped records file)."""
        raise NotImplementedError

    def tuning_dtype(self, dtype: torch.dtype) -> str:
        """The dtype whose tuning records apply to inputs of ``dtype`` (their ``dtype``)."""
        return str(self.io_dtype(dtype)).removeprefix("torch.")

    def tvm_target(self):
        """The ``tvm.target.Target`` kernels are compiled for (imports TVM)."""
        raise NotImplementedError

    def host_key(self) -> str:
        """The host a kernel of this target is tied to (part of its key)."""
        raise NotImplementedError

    def target_override(self) -> str:
        """A user override of the TVM target that changes the code (part of the key)."""
        return ""

    def io_dtype(self, dtype: torch.dtype, block_size: int = 32) -> torch.dtype:
        """The dtype q, k, v have in the kernels that read them (forward and backward), for
        inputs of ``dtype`` in blocks of ``block_size``; every other kernel computes in
        ``compute_dtype(dtype)``."""
        return compute_dtype(dtype)

    def widens(self, io: torch.dtype, block_size: int = 32) -> bool:
        """Whether the kernels that read q, k, v of dtype ``io`` (narrower than the
        compute dtype) in blocks of ``block_size`` widen each value as they read it and
        compute everything else, P included, in the compute dtype: the compute dtype's
        arithmetic on the inputs where they lie (``Kernel.static``'s ``widened``), instead
        of rounding the block products' operands to ``io`` (tensor cores)."""
        return False

    def micro_kernels(self, io: torch.dtype, float32_pv: bool = False,
                      block_size: int = 32) -> str | None:
        """The hand-written micro-kernels the kernels reading q, k, v of dtype ``io`` in
        blocks of ``block_size`` call (tensorized by the schedules), or None.
        ``float32_pv``: the variant whose P v keeps P in float32 (the float32 output of a
        half-precision result, which the backward reads)."""
        return None

    def splits_pv(self, io: torch.dtype) -> bool:
        """Whether the kernels reading q, k, v of dtype ``io`` have a variant whose P v
        takes P in two parts of that dtype (``kernels.Kernel.static``'s ``split_pv``): how
        a half-precision result's float32 output is computed where the block products
        run on half-precision operands and there are no micro-kernels for it."""
        return False

    def link_objects(self, op: str, static: dict) -> list[str]:
        """Object files to link into the library of kernel ``op``'s variant ``static``."""
        return []

    # ------------------------------------------------------------------ building

    def build_dtypes(self, requested: list[str] | None) -> list[str]:
        """The kernel dtypes an ahead-of-time library needs for inputs of ``requested``
        dtypes (None: the target's usual ones)."""
        return list(dict.fromkeys(requested or ["float32"]))

    def prepare_compiler(self) -> None:
        """Before compiling kernels of this target."""

    def check_export(self, path: Path) -> list:
        """Raise unless the exported module at ``path`` is complete (returns details)."""
        return []

    def prepare_runtime(self) -> None:
        """Before loading an exported module of this target (after ``runtime.load``)."""

    def after_load(self, path: Path) -> None:
        """After loading the exported module at ``path``."""

    def wrap_kernel(self, fn):
        """The callable a loaded kernel function is used through (identity here; a target
        may adapt the arguments, e.g. a test target emulating a device on the CPU)."""
        return fn

    def library_extras(self, out: Path, library: Path, executable, manifest: dict) -> None:
        """What an ahead-of-time library of this target carries besides its kernels
        (``mra_compile.aot``; ``library``: the exported kernels, ``executable``: the TVM
        executable they came from): files under ``out``, entries in ``manifest``."""

    # ------------------------------------------------------------------ calls

    def device_scope(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Entered around a call on ``device``."""
        return contextlib.nullcontext()

    def check_launch(self, **extents: int) -> None:
        """ValueError when a launch of these extents is impossible (e.g. a CUDA grid)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in float32, or float64 for float64 inputs (tests, gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
