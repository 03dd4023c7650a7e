"""CUDA inference calls replayed from a captured CUDA graph, kept per call signature.

An inference call's host work on CUDA (validation, preparation, the selection and the
work plan in torch, ~70 torch launches and a dozen kernel launches) took 2.3-2.6 ms on
the H200 machine, whose host runs ~20 us per torch operator: 6-25x the device time at
N = 1024-4096, and as long as the device at N = 16384 (bench/results/gpu_h200.md). The
CUDA path has no host synchronisation (the plan is sized from the shapes, ``plan_bounds``),
so a whole call can be captured: the first call of a signature runs as usual (it loads
the kernels: a capture may not), the second is captured into a CUDA graph that reads
its own copies of q, k, v, and every later call copies its q, k, v in, replays the graph
on torch's current stream and returns a copy of the graph's output: four launches and a
graph launch in place of ~80.

A signature is everything the host work depends on besides the values of q, k, v: the
shapes, dtypes and options, the device and the current stream (a graph's buffers serve
one stream's calls, in order), and the environment that picks kernels and knobs
(``build.lookup_token``). Calls with a mask or a query mask go the usual way (their
validation reads the mask's values on the host), as do calls made while a stream is
being captured (the caller's own graph takes the usual launches), while kernel calls
are traced, and with ``MRA_COMPILE_CUDA_GRAPHS=0``. A signature whose capture fails is
not tried again. At most ``GRAPHS`` graphs are kept (each holds its scratch memory); the
oldest goes first, and ``clear()`` (``mra_compile.clear_workspace``) frees them all.
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
GRAPHS = 8  # signatures with a graph kept; the oldest is dropped first
_SEEN = "seen"  # a signature called once: the next call is captured
_UNCAPTURABLE = "uncapturable"  # its capture failed: always the usual way


@dataclass
class _Replay:
    """One signature's captured call: the graph, the tensors it reads (q, k, v) and the
    output it writes; ``lock`` keeps one caller at a time between copy-in and copy-out."""

    graph: Any  # torch.cuda.CUDAGraph (or a stand-in in tests: see ``_new_graph``)
    inputs: tuple[torch.Tensor, ...]
    out: torch.Tensor
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, q, k, v) -> torch.Tensor:
        with self.lock, _on_device(q.device):
            for mine, given in zip(self.inputs, (q, k, v)):
                mine.copy_(given)
            self.graph.replay()  # (on the current stream of q's device, after the copies)
            return self.out.clone()


_ENTRIES: OrderedDict[tuple, object] = OrderedDict()
_LOCK = threading.Lock()


def inference(q, k, v, mask, query_mask, args: tuple, usual: Callable):
    """The output of ``usual(q, k, v, mask, query_mask, args)`` (an inference call of
    the forward on CUDA tensors), from the graph kept for its signature where there is
    one, else by calling it (and capturing it the second time)."""
    key = _signature(q, k, v, mask, query_mask, args)
    if key is None:
        return usual(q, k, v, mask, query_mask, args)
    with _LOCK:
        entry = _ENTRIES.get(key)
        if entry is not None:
            _ENTRIES.move_to_end(key)
        else:
            _remember(key, _SEEN)
    if entry is None or entry == _UNCAPTURABLE:
        return usual(q, k, v, mask, query_mask, args)
    if entry == _SEEN:
        entry = _capture(key, q, k, v, args, usual)
        if entry is None:
            return usual(q, k, v, mask, query_mask, args)
    assert isinstance(entry, _Replay)
    return entry(q, k, v)


def clear() -> None:
    """Forget every kept graph (their memory goes back to torch's caching allocator)."""
    with _LOCK:
        _ENTRIES.clear()


memory.on_clear(clear)


def kept() -> int:
    """How many signatures have a graph now (for tests and ``mra-compile info``)."""
    with _LOCK:
        return sum(isinstance(e, _Replay) for e in _ENTRIES.values())


def _signature(q, k, v, mask, query_mask, args: tuple):
    """The key of this call, or None where it goes the usual way."""
    if (mask is not None or query_mask is not None or build.tracing()
            or os.environ.get(ENV, "1") == "0"):
        return None
    for x in (q, k, v):
        if type(x) is not torch.Tensor or x.device != q.device or x.layout != torch.strided:
            return None
    stream = _stream_of(q.device)
    if stream is None:
        return None
    return (args, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, stream,
            build.lookup_token())


def _stream_of(device) -> int | None:
    """The current stream of CUDA ``device`` (its handle), or None where no graph can be
    captured: not CUDA, or a capture in progress (the caller's own graph takes the
    usual launches then)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _remember(key, entry) -> None:
    """Keep ``entry`` for ``key`` (under ``_LOCK``), dropping the oldest graph beyond
    ``GRAPHS`` (markers cost nothing, but are bounded too)."""
    _ENTRIES[key] = entry
    _ENTRIES.move_to_end(key)
    graphs = [k for k, e in _ENTRIES.items() if isinstance(e, _Replay)]
    for old in graphs[: max(len(graphs) - GRAPHS, 0)]:
        del _ENTRIES[old]
    while len(_ENTRIES) > 16 * GRAPHS:
        del _ENTRIES[next(iter(_ENTRIES))]


def _capture(key, q, k, v, args, usual) -> _Replay | None:
    """Capture ``usual`` on copies of q, k, v into a graph kept for ``key``; None (and
    the signature marked) where the capture fails."""
    inputs = tuple(torch.empty_like(x, memory_format=torch.contiguous_format)
                   for x in (q, k, v))
    for mine, given in zip(inputs, (q, k, v)):
        mine.copy_(given)
    graph = _new_graph()
    try:
        out = _record(graph, lambda: usual(*inputs, None, None, args), q.device)
    except Exception as exc:  # noqa: BLE001  (any failure: the usual way from now on)
        warnings.warn(f"mra_compile: CUDA graph capture failed ({type(exc).__name__}: "
                      f"{exc}); this call signature runs without a graph", RuntimeWarning,
                      stacklevel=3)
        with _LOCK:
            _remember(key, _UNCAPTURABLE)
        return None
    entry = _Replay(graph, inputs, out)
    with _LOCK:
        _remember(key, entry)
    return entry


def _new_graph():
    """A fresh ``torch.cuda.CUDAGraph`` (tests replace it, ``_record`` and ``_stream_of``
    with stand-ins that run on the CPU)."""
    return torch.cuda.CUDAGraph()


def _record(graph, call: Callable[[], torch.Tensor], device) -> torch.Tensor:
    """``call()``'s launches captured into ``graph`` (not run: the graph's output is
    written at its first replay): on a side stream of ``device``, after a synchronisation
    (``torch.cuda.graph``: the capture follows the copies of the inputs)."""
    with _on_device(device), torch.cuda.graph(graph):
        return call()


def _on_device(device):
    """``device`` current inside (a graph is captured and replayed on its device's
    current stream); nothing for a device that is not CUDA (tests' stand-ins)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
