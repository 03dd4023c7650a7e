"""Memory the op keeps between calls on the CPU: scratch buffers and result blocks.

Both exist for one reason: memory the process just got from the OS costs a page fault
(and a page of zeroing) on first touch, ~10 ms for 50 MB here, as much as the kernel that
fills it. What is kept is bounded by ``workspace_limit()`` (``MRA_COMPILE_WORKSPACE_MB``,
default 1024 MiB) for a thread's scratch and again for the result blocks kept unused;
``clear_workspace()`` frees both.

Results: a result is written once by the last kernel. Back to back its fresh pages cost
nothing (glibc hands out the last result's freed memory again), but after other
memory-heavy torch work glibc has returned that memory to the OS and the next call pays
the faults: at N = 4096 (a 12.6 MB result) ~4 ms of system time in a 9 ms call
(``bench/bench_cold_start.py``). So a result is a view of a block kept here: when the
last tensor using it is freed, the block comes back, still mapped, for the next result of
its size (oldest block dropped first past the bound). Results are ordinary tensors except
that their storage cannot grow in place. (Results up to ``SMALL_RESULT`` are plain
tensors: heap memory, no fault to avoid.)
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from mra_compile.targets import Target


class Workspace(threading.local):
    """Per-thread scratch buffers for the intermediates, reused between calls where the
    target allows it (``Target.reuses_workspace``); a buffer that would take the thread
    past ``workspace_limit()`` is allocated for the call only."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        # name -> (shape, its view of the kept buffer): a call of the same shape as the
        # last gets that view again (a call takes ~15 scratch tensors; slicing and viewing
        # each anew cost ~5 us). Only views of kept buffers, dropped with them.
        self.views: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        # Counts the buffers replaced or dropped and the scratch allocated for a call only;
        # the launch cache's plans (``launch_cache``), which hold views of the buffers, go
        # whenever it moves.
        self.generation = 0
        self.plans: dict = {}

    def get(self, name: str, *shape: int, dtype: torch.dtype, device: torch.device,
            target: Target) -> torch.Tensor:
        if not target.reuses_workspace:
            # e.g. CUDA: a tensor reused across calls could still be read by a kernel
            # queued on another stream; the caching allocator makes fresh memory cheap.
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self.buffers.get(name)
        last = self.views.get(name)
        if (last is not None and last[0] == shape and buf is not None and buf.dtype == dtype
                and buf.device == device):
            return last[1]
        numel = math.prod(shape)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            if buf is not None:
                self.dropped()
            self.buffers.pop(name, None)
            self.views.pop(name, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            if self.kept_bytes() + buf.numel() * buf.element_size() <= workspace_limit():
                self.buffers[name] = buf
            else:
                self.dropped()
        view = buf[:numel].view(shape)
        if self.buffers.get(name) is buf:
            self.views[name] = (shape, view)
        return view

    def kept_bytes(self) -> int:
        """Bytes this thread keeps for later calls."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def dropped(self) -> None:
        """A buffer went (or a call's scratch is not kept): forget the plans."""
        self.generation += 1
        self.plans.clear()


_CONSTANTS: dict = {}  # key -> what ``kept_constants`` made for it; bounded below


def kept_constants(key: tuple, make: Callable[[], Any], keep: bool):
    """``make()``: tensors the same for every call of ``key`` (its first item names the
    kind) that only the kernels read (never written, never handed out), made once and
    kept where the target keeps memory between calls (``keep``; small tensors made per
    call had cost 10-40 us a call). The oldest of 128 is forgotten."""
    made = _CONSTANTS.get(key) if keep else None
    if made is None:
        made = make()
        if keep:
            if len(_CONSTANTS) >= 128:
                del _CONSTANTS[next(iter(_CONSTANTS))]
            _CONSTANTS[key] = made
    return made


def kept_storages() -> set[int]:
    """The addresses of the memory kept between calls that a tensor may view: this
    thread's scratch buffers and the ``kept_constants`` (their storages' data pointers)."""
    tensors = list(WORKSPACE.buffers.values())
    for made in _CONSTANTS.values():
        tensors.extend(t for t in (made if isinstance(made, tuple) else (made,))
                       if isinstance(t, torch.Tensor))
    return {t.untyped_storage().data_ptr() for t in tensors}


WORKSPACE_ENV = "MRA_COMPILE_WORKSPACE_MB"


def workspace_limit() -> int:
    """Bytes of scratch a thread may keep between calls (``MRA_COMPILE_WORKSPACE_MB``)."""
    return megabytes_setting(WORKSPACE_ENV, 1024)


def megabytes_setting(name: str, default: float) -> int:
    """The bytes environment variable ``name`` gives in MiB (``default`` where unset);
    ValueError naming it for anything but a number >= 0."""
    return _parsed_megabytes(name, os.environ.get(name, str(default)))


@functools.lru_cache(maxsize=8)
def _parsed_megabytes(name: str, value: str) -> int:
    # (read on every release of a result: the parse is done once per distinct value)
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB, got {value!r}") from None
    if not megabytes >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(megabytes * 2**20)


WORKSPACE = Workspace()


def clear_workspace() -> None:
    """Free this thread's scratch buffers, the blocks kept for later results, and what
    else registered with ``on_clear`` (the CUDA graphs of repeated inference calls)."""
    WORKSPACE.buffers.clear()
    WORKSPACE.views.clear()
    WORKSPACE.dropped()
    _POOL.clear()
    for hook in _CLEAR_HOOKS:
        hook()


_CLEAR_HOOKS: list[Callable[[], None]] = []


def on_clear(hook: Callable[[], None]) -> None:
    """Have ``clear_workspace`` call ``hook`` too (a module that keeps memory of its own)."""
    if hook not in _CLEAR_HOOKS:
        _CLEAR_HOOKS.append(hook)


class _Pool:
    """Blocks (uint8 tensors) not in use, by size, oldest first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.free: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self.kept = 0  # bytes in ``free``

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            blocks = self.free.get(nbytes)
            if blocks:
                block = blocks.pop()
                self.kept -= nbytes
                if not blocks:
                    del self.free[nbytes]
                return block
        return torch.empty(nbytes, dtype=torch.uint8)

    def give_back(self, block: torch.Tensor, nbytes: int) -> None:
        """Keep ``block`` (``nbytes`` bytes) for a later result, the oldest blocks beyond
        the workspace limit dropped."""
        with self.lock:
            self.free.setdefault(nbytes, []).append(block)
            self.free.move_to_end(nbytes)
            self.kept += nbytes
            try:
                limit = workspace_limit()
            except ValueError:  # (reported by the next call; a release must not raise)
                limit = 0
            while self.free and self.kept > limit:
                size, blocks = next(iter(self.free.items()))
                blocks.pop(0)
                self.kept -= size
                if not blocks:
                    del self.free[size]

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.kept = 0

    def kept_bytes(self) -> int:
        return self.kept


_POOL = _Pool()


@functools.lru_cache(maxsize=256)
def _lease_type(nbytes: int) -> type[ctypes.Array]:
    """A ctypes byte array over a block, that gives the block back when it is freed.

    ``torch.frombuffer`` keeps the object it was given until the tensor's storage is freed
    (the last view with it): that is when the block is free again."""
    def release(self):
        pool = _POOL  # (None while the interpreter shuts down)
        if pool is not None:
            pool.give_back(self.block, nbytes)

    return cast("type[ctypes.Array]",
                type("ResultBlock", (ctypes.c_ubyte * nbytes,), {"__del__": release}))


# Results up to this size are plain tensors: glibc serves them from its heap (its mmap
# threshold starts at 128 KiB), whose pages stay mapped, and a kept block cost ~8 us a
# result against ~1 us (a call makes seven).
SMALL_RESULT = 128 << 10


def result_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  target: Target) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` for a result: on a kept block where
    the target reuses memory (``Target.reuses_workspace``) and it is over
    ``SMALL_RESULT``, else fresh."""
    numel = math.prod(shape)
    nbytes = max(numel * dtype.itemsize, 1)
    if not target.reuses_workspace or nbytes <= SMALL_RESULT:
        return torch.empty(shape, dtype=dtype, device=device)
    block = _POOL.take(nbytes)
    lease: Any = _lease_type(nbytes).from_address(block.data_ptr())
    lease.block = block
    return torch.frombuffer(lease, dtype=dtype, count=numel).view(shape)


def kept_result_bytes() -> int:
    """Bytes of blocks kept for later results, none of them in use."""
    with _POOL.lock:
        return _POOL.kept_bytes()
