"""CUDA calls of the op replayed from a captured CUDA graph, kept per call signature.

A call's host work on CUDA (validation, preparation, the selection and the work plans in
torch, ~70 torch launches and a dozen kernel launches in a forward, twice that in a
backward) took 2.3-2.6 ms a forward and ~5.5 ms a backward on the H200 machine, whose
host runs ~20 us per torch operator: 6-25x the device time at N = 1024-4096, and as long
as the device at N = 16384 (bench/results/gpu_h200.md). The CUDA path has no host
synchronisation (the plans are sized from the shapes, ``plan.plan_bounds``), so a whole
call can be captured: the first call of a signature runs as usual (it loads the kernels:
a capture may not), the second is captured into a CUDA graph that reads its own copies
of the call's tensors, and every later call copies its tensors in, replays the graph on
torch's current stream and returns copies of the graph's outputs: a few copies and a
graph launch in place of ~80-200 launches. ``op`` runs the inference forward, the
training forward and the backward so, masked calls too (``op._graph_masks``: the masks
checked before, then graph inputs as bool ``[B, N]``, which the capture need not read).

A signature is everything the host work depends on besides the tensors' values: the
call's kind and options, the tensors' shapes and dtypes, the device and its current
stream (a graph's buffers serve one stream's calls, in order), and the environment that
picks kernels and knobs (``build.lookup_token``). Calls made while a stream is being
captured (the caller's own graph takes the usual launches), while kernel calls are
traced, or with ``MRA_COMPILE_CUDA_GRAPHS=0`` go the usual way. A signature whose capture
fails is not tried again (a warning says why). Each kept graph holds its call's scratch
memory: at most ``GRAPHS`` graphs are kept, within ``MRA_COMPILE_CUDA_GRAPHS_MB`` of
device memory together (default 2048; a call that alone needs more is not captured);
the least recently used goes first, and its signature runs the usual way from then on;
``clear()`` (``mra_compile.clear_workspace``) frees them all and forgets every signature.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mra_compile import build, memory

ENV = "MRA_COMPILE_CUDA_GRAPHS"  # "0": every call the usual way
BUDGET_ENV = "MRA_COMPILE_CUDA_GRAPHS_MB"  # the device memory the kept graphs may hold
BUDGET_MB = 2048  # (default)
GRAPHS = 8  # signatures with a graph kept; the oldest is dropped first
_SEEN = "seen"  # a signature called once: the next call is captured
_CAPTURING = "capturing"  # being captured (by another thread): the usual way meanwhile
_UNCAPTURABLE = "uncapturable"  # its capture failed: always the usual way


@dataclass
class _Replay:
    """One signature's captured call: the graph, the tensors it reads and what it
    writes; ``lock`` keeps one caller at a time between copy-in and copy-out."""

    graph: Any  # torch.cuda.CUDAGraph (or a stand-in in tests: see ``_new_graph``)
    inputs: tuple[torch.Tensor, ...]
    outputs: Any  # a tensor or a tuple of tensors
    nbytes: int  # the device memory it holds (its inputs and its pool, as reserved)

    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, tensors: tuple[torch.Tensor, ...]):
        with self.lock, _on_device(tensors[0].device):
            for mine, given in zip(self.inputs, tensors):
                mine.copy_(given)
            self.graph.replay()  # (on the current stream of the device, after the copies)
            if isinstance(self.outputs, torch.Tensor):
                return self.outputs.clone()
            return tuple(x.clone() for x in self.outputs)


_ENTRIES: OrderedDict[tuple, object] = OrderedDict()
_LOCK = threading.Lock()


def run(kind: str, options: tuple, tensors: tuple[torch.Tensor, ...], call: Callable):
    """``call(*tensors)``: a tensor or a tuple of tensors that depend on the values of
    ``tensors`` alone, given ``kind`` (the call's name) and ``options`` (the rest of its
    arguments; hashable) and the tensors' shapes and dtypes. From the graph kept for its
    signature where there is one, else by calling it (and capturing it the second
    time); the results are the caller's own (copies of the graph's)."""
    key = _signature(kind, options, tensors)
    if key is None:
        return call(*tensors)
    with _LOCK:
        entry = _ENTRIES.get(key)
        if entry is not None:
            _ENTRIES.move_to_end(key)
        if entry is None:
            _remember(key, _SEEN)
        elif entry == _SEEN:  # (one thread captures a signature; the others go on as usual)
            _remember(key, _CAPTURING)
    if entry is None or entry in (_UNCAPTURABLE, _CAPTURING):
        return call(*tensors)
    if entry == _SEEN:
        entry = _capture(key, tensors, call)
        if entry is None:
            return call(*tensors)
    assert isinstance(entry, _Replay)
    return entry(tensors)


def clear() -> None:
    """Forget every kept graph (their memory goes back to torch's caching allocator)."""
    with _LOCK:
        _ENTRIES.clear()


memory.on_clear(clear)


def kept() -> int:
    """How many signatures have a graph now (for tests and bench/gpu_check.py)."""
    with _LOCK:
        return sum(isinstance(e, _Replay) for e in _ENTRIES.values())


def _signature(kind: str, options: tuple, tensors: tuple):
    """The key of this call, or None where it goes the usual way."""
    if build.tracing() or os.environ.get(ENV, "1") == "0":
        return None
    device = tensors[0].device
    for x in tensors:
        if type(x) is not torch.Tensor or x.device != device or x.layout != torch.strided:
            return None
    stream = _stream_of(device)
    if stream is None:
        return None
    return (kind, options, tuple((x.shape, x.dtype) for x in tensors), device, stream,
            build.lookup_token())


def _stream_of(device) -> int | None:
    """The current stream of CUDA ``device`` (its handle), or None where no graph can be
    captured: not CUDA, or a capture in progress (the caller's own graph takes the
    usual launches then)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _remember(key, entry) -> None:
    """Keep ``entry`` for ``key`` (under ``_LOCK``), dropping the oldest graphs beyond
    ``GRAPHS`` or the memory budget (markers cost nothing, but are bounded too)."""
    _ENTRIES[key] = entry
    _ENTRIES.move_to_end(key)
    graphs = [(k, e) for k, e in _ENTRIES.items() if isinstance(e, _Replay)]
    held, budget = sum(e.nbytes for _, e in graphs), budget_bytes()
    for old, e in graphs[:-1]:  # (the newest stays: its size was checked against the budget)
        if len(graphs) <= GRAPHS and held <= budget:
            break
        # Dropped, it goes the usual way from now on: two signatures taking turns would
        # otherwise be captured again on every call.
        _ENTRIES[old] = _UNCAPTURABLE
        graphs.pop(0)
        held -= e.nbytes
    while len(_ENTRIES) > 16 * GRAPHS:
        del _ENTRIES[next(iter(_ENTRIES))]


def budget_bytes() -> int:
    """The device memory the kept graphs may hold together (``MRA_COMPILE_CUDA_GRAPHS_MB``,
    default 2048): a graph keeps the scratch memory of its call between calls."""
    return memory.megabytes_setting(BUDGET_ENV, BUDGET_MB)


def _capture(key, tensors: tuple, call: Callable) -> _Replay | None:
    """Capture ``call`` on copies of ``tensors`` into a graph kept for ``key``; None
    (and the signature marked) where the capture fails or the graph would hold more
    than the whole budget."""
    device = tensors[0].device
    try:
        before = _reserved(device)
        inputs = tuple(torch.empty_like(x, memory_format=torch.contiguous_format)
                       for x in tensors)
        for mine, given in zip(inputs, tensors):
            mine.copy_(given)
        graph = _new_graph()
        outputs = _record(graph, lambda: call(*inputs), device)
    except Exception as exc:  # noqa: BLE001  (any failure: the usual way from now on)
        warnings.warn(f"mra_compile: CUDA graph capture failed ({type(exc).__name__}: "
                      f"{exc}); this call signature runs without a graph", RuntimeWarning,
                      stacklevel=3)
        with _LOCK:
            _remember(key, _UNCAPTURABLE)
        return None
    entry = _Replay(graph, inputs, outputs, max(_reserved(device) - before, 0))
    with _LOCK:
        if entry.nbytes > budget_bytes():  # (calls this large: their own memory, each time)
            _remember(key, _UNCAPTURABLE)
            return None
        _remember(key, entry)
    return entry


def _reserved(device) -> int:
    """Bytes torch's caching allocator holds on ``device`` in use or in graphs' private
    pools: its unused cache is released first (``torch.cuda.graph`` releases it on
    entering a capture anyway, which would otherwise hide the new pool's size). Tests
    replace this."""
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(device)


def _new_graph():
    """A fresh ``torch.cuda.CUDAGraph`` (tests replace it, ``_record`` and ``_stream_of``
    with stand-ins that run on the CPU)."""
    return torch.cuda.CUDAGraph()


def _record(graph, call: Callable[[], Any], device):
    """``call()``'s launches captured into ``graph`` (not run: its outputs are written at
    the first replay): on a side stream of ``device``, after a synchronisation
    (``torch.cuda.graph``: the capture follows the copies of the inputs). Thread-local
    capture errors: a backward is captured on autograd's device thread while the caller's
    thread waits."""
    with _on_device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        return call()


def _on_device(device):
    """``device`` current inside (a graph is captured and replayed on its device's
    current stream); nothing for a device that is not CUDA (tests' stand-ins)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
