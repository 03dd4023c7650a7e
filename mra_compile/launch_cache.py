"""Inference calls replayed from their kernel launches, kept per call signature (CPU).

The host work of an inference call (validation, preparation, scratch lookups, the
selection's read-back, ~100 Python-level steps) costs 0.5-1 ms right after other heavy
torch work, whose traffic leaves the interpreter's caches cold: ~40% of a call at N = 512
and ~10% at 4096 (``bench/results/host_bound_cpu.md``). So the first call of a signature
runs as usual while its launches are recorded (``build.trace_kernel_calls``), and later
calls of that signature run the recorded launches, with their own q, k, v and a fresh
output substituted, and nothing else but the one data-dependent step between them: the
selection's count of overflow units, which picks the rest of the launches (a plan keeps
one "tail" per count it has seen; a count not seen yet runs the call as usual again and
records its tail).

A signature is everything the host work depends on besides the values of q, k, v and of
a key padding mask: the shapes, dtypes and layouts, the options, torch's thread count, and
the environment that picks kernels, knobs and memory limits. Calls whose launches read
q, k, v in place or through the scratch copies ``inputs.padded`` makes (a partial last
block, a head dim padded to 16, half precision not widened, a non-contiguous or unaligned input:
each replay makes them again; the transposed views attention layers pass are read where
they lie where the kernels can, ``inputs.reads_heads_last``, the others beside them
through ``inputs.heads_last_copy``'s copies, their layout part of the signature), write
the output in place (in the layer's layout where the kernels read it) or into scratch
that the replay copies out, and whose other tensors
are kept memory (the thread's workspace, ``memory.kept_constants``) get a plan; others
keep a marker that sends them the usual way. Masked calls replay too (a key padding
mask; cross-attention's query mask and keys of their own length, each side's mask in
scratch of its own): each replay checks the masks' values, writes each mask, its block
counts and the per-sequence budgets into the scratch the kernels read (``_Masks``; in
one C call, ``native_replay.NativeMasks``, where the C library loads: those torch steps
took 0.3-0.5 ms, a third of a masked call at N = 512), and goes the usual way where a
padded token of q, k or v is not finite (the usual path replaces those in copies).
Plans are per thread (the workspace is) and go whenever the workspace drops a buffer
(``memory.Workspace.dropped``); nothing is planned while kernel calls are traced (the
tracer must see every launch), nor with ``MRA_COMPILE_LAUNCH_CACHE=0``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mra_compile import build, forward, inputs, kernels, memory, native_replay, options, runtime, validate
from mra_compile.targets import CPU, cpu

ENV = "MRA_COMPILE_LAUNCH_CACHE"  # "0": every call the usual way
PLANS_PER_THREAD = 16  # signatures; the oldest is forgotten first
TAILS_PER_PLAN = 16  # overflow-unit counts
_HEAD = ("pool_and_logits", "select_plan")
_TAIL = ("hires_units", "lowres_out", "hires_rows")
_INPUTS = ("q", "k", "v")
_UNPLANNED = None  # the marker of a signature that goes the usual way


@dataclass
class _Launch:
    """One kernel launch: ``fn(*args)`` with this call's tensors at ``slots`` (position,
    "q" / "k" / "v" / "out")."""

    fn: Callable
    args: list
    slots: tuple[tuple[int, str], ...]
    ucap: int | None = None  # the position of the merge loop's extent (hires_rows)

    def __call__(self, tensors: dict, ucap: int) -> None:
        args = self.args
        for i, name in self.slots:
            args[i] = tensors[name]
        if self.ucap is not None:
            args[self.ucap] = ucap
        try:
            self.fn(*args)
        finally:
            for i, _ in self.slots:  # (the plan holds no caller's tensor)
                args[i] = None


@dataclass
class _Tail:
    """The launches after the selection for one count of overflow units, and where the
    units the kernel reads go (numpy views of its arguments; None: no overflow)."""

    launches: list[_Launch]
    used: tuple[np.ndarray, np.ndarray] | None


@dataclass
class _Side:
    """One side's mask as the kernels read it (``inputs.side_mask_into``): the keys' (in
    self-attention, both sides'), or cross-attention's queries'."""

    given: str  # the call's argument it comes from: "mask" or "query_mask"
    maskf: torch.Tensor  # [B, Np]
    counts: torch.Tensor  # [B, n]
    inv_counts: torch.Tensor
    checks: tuple[int, ...]  # the inputs (0 q, 1 k, 2 v) whose padding must be finite


@dataclass
class _Masks:
    """What a replay of a masked call writes again before its launches: each given
    mask's side (``_Side``) and, with per-sequence budgets (``block_per_row``), the
    selection's budget (``forward.write_budget``, from the queries' block counts); all in
    the thread's scratch."""

    sides: tuple[_Side, ...]  # (in the order the usual path checks the masks)
    q_counts: torch.Tensor  # [B, n]: the queries' block counts (a side's, or kept)
    block_size: int
    budget: torch.Tensor | None  # [R] int32; None: the same for every call (kept)
    heads: int  # row r reads mask row r // heads
    block_per_row: int | None
    k: int  # the most blocks a row selects
    # The same from C (``native_replay.NativeMasks``), made on first use; False where
    # there is none (no C library, a mask or input dtype it does not read).
    native: native_replay.NativeMasks | bool | None = None

    def refresh(self, q, k, v, given: dict) -> bool:
        """Check the masks' values (raising as the usual path does) and write what the
        kernels read of them; False where the usual path would copy q, k or v (a padded
        token that is not finite: ``inputs.clean_padding``). ``given``: the call's masks
        by argument name."""
        if self.native is None:
            self.native = False
            if native_replay.enabled():
                try:
                    self.native = native_replay.NativeMasks(self, given, (q, k, v))
                except ValueError:
                    pass  # (refreshed from Python)
        if isinstance(self.native, native_replay.NativeMasks):
            done = self.native.run(q, k, v, given)
            if done != 2:
                return done == 0
            # (a value a mask may not hold: raised below, with its message)
        for side in self.sides:
            validate.check_mask_values(given[side.given], side.given)
        qkv = (q, k, v)
        reals = [inputs.real_tokens(given[side.given]) for side in self.sides]
        for side, real in zip(self.sides, reals):
            checked = tuple(qkv[j] for j in side.checks)
            cleaned = inputs.clean_padding(checked, real, True)
            if any(x is not mine for x, mine in zip(cleaned, checked)):
                return False
        for side, real in zip(self.sides, reals):
            inputs.side_mask_into(real, side.maskf, side.counts, side.inv_counts,
                                  self.block_size)
        if self.budget is not None and self.block_per_row is not None:
            # (k: at most the grid's blocks, and write_budget's bound)
            forward.write_budget(self.budget, forward.sequence_budgets(
                self.q_counts, self.heads, self.block_size, self.block_per_row, self.k),
                self.k)
        return True


@dataclass
class _Plan:
    """A signature's launches: the head (pooling, selection), the selection's outputs the
    tail depends on (numpy views), and a tail per count of overflow units."""

    head: list[_Launch]
    units: np.ndarray  # [R, 2]: per row, overflow units and the widest row unit
    unit_row: np.ndarray  # [R, room], [R, room, Co]: the selection's overflow units
    unit_cols: np.ndarray
    views: dict  # "q" / "k" / "v" / "out" -> (shape, dtype) of the kernels' view
    tails: dict[int, _Tail] = field(default_factory=dict)
    # Inputs the kernels read through a copy (``inputs.padded``: a partial last block, a
    # head dim padded to 16, half precision not widened; ``inputs.heads_last_copy``: beside inputs
    # read as [B, N, H, D] where they lie): name -> (Np, Dp, dtype, its address,
    # heads_last), made again by each call; and the kernels' output where the result is a
    # copy of it (None: the kernels write the result itself).
    copies: dict = field(default_factory=dict)
    out_copy: torch.Tensor | None = None
    # Its launches as C structures (``native_replay``), made on the first replay and
    # again when a tail is added; False where it cannot have them.
    native: native_replay.NativePlan | bool | None = None
    masks: _Masks | None = None  # (a call with a key padding mask)
    # The inputs the kernels read in an attention layer's layout: the caller's [B, H, N, D]
    # view transposed back to its [B, N, H, D] tensor (``inputs.reads_heads_last``); and
    # "out" where they write the output so too.
    transposed: frozenset = frozenset()


def inference(q, k, v, mask, query_mask, args: tuple, usual: Callable):
    """The output of ``usual(q, k, v, mask, query_mask, args)`` (an inference call of
    the forward: ``op._forward_kernels`` without saving), from the launches kept for its
    signature where there are, else by calling it (recording its launches)."""
    key = _signature(q, k, v, mask, query_mask, args)
    if key is None:
        return usual(q, k, v, mask, query_mask, args)
    plans = memory.WORKSPACE.plans
    plan = plans.get(key, False)
    if plan is _UNPLANNED:
        return usual(q, k, v, mask, query_mask, args)
    if plan is not False:
        out = _replay(plan, q, k, v, {"mask": mask, "query_mask": query_mask})
        if out is not None:
            return out
    return _record(key, plan or None, q, k, v, mask, query_mask, args, usual)


def _signature(q, k, v, mask, query_mask, args: tuple):
    """The plan key of this call, or None where it cannot have a plan."""
    env = os.environ.get
    if build.tracing() or env(ENV, "1") == "0":
        return None
    masks = tuple(m for m in (mask, query_mask) if m is not None)
    for x in (q, k, v, *masks):
        if type(x) is not torch.Tensor or not x.is_cpu or x.layout != torch.strided:
            return None
    masked = tuple(None if m is None else (m.shape, m.dtype) for m in (mask, query_mask))
    # Whether the kernels read each input in place, in place in an attention layer's
    # layout, or through a copy (``inputs.prepare``) depends on its layout too.
    return (args, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, masked,
            _layout(q), _layout(k), _layout(v), env(inputs.HEADS_LAST_ENV),
            torch.get_num_threads(), build.lookup_token(), env(cpu.TARGET_ENV),
            env(cpu.BF16_ENV), env(cpu.WIDEN_ENV), env(memory.WORKSPACE_ENV),
            env(native_replay.ENV))


def _layout(x: torch.Tensor) -> int:
    """What of ``x``'s layout the kernels' reading of it depends on: 0 contiguous, 1 a
    transposed view of a contiguous [B, N, H, D] tensor (what attention layers pass:
    ``inputs.reads_heads_last``), 2 neither or unaligned (read through a copy)."""
    if x.data_ptr() % inputs.ALIGNMENT:
        return 2
    if x.is_contiguous():
        return 0
    return 1 if x.dim() == 4 and x.transpose(1, 2).is_contiguous() else 2


def _replay(plan: _Plan, q, k, v, masks: dict):
    """The output from ``plan``'s launches, or None where the selection made a count of
    overflow units the plan has no tail for (the kernels then ran for nothing), or where
    the usual path would copy an input with non-finite padding. ``masks``: the call's,
    by argument name ("mask", "query_mask")."""
    if plan.masks is not None and not plan.masks.refresh(q, k, v, masks):
        return None
    runtime.ensure()
    # The output in the caller's shape, made before the launches, so that nothing is
    # left to do after the last one. (Host work right after a kernel costs several times
    # as much, its traffic leaving the interpreter's caches cold; a call's host work
    # measured the same either way, 0.35-0.40 ms at N = 8192.)
    if "out" in plan.transposed:  # (written as [B, N, H, D]: ``forward._forward``)
        B, H, N, D = q.shape
        written = inputs.result_tensor((B, N, H, D), q.dtype, q.device, CPU)
        out = written.transpose(1, 2)
    else:
        out = written = inputs.result_tensor(tuple(q.shape), q.dtype, q.device, CPU)
    callers = dict(zip(_INPUTS, (q, k, v)))
    for name, (Np, Dp, dtype, address, heads_last) in plan.copies.items():
        x, scratch = callers[name], f"input_{name}"
        made = (inputs.heads_last_copy(x, dtype, scratch, CPU) if heads_last
                else inputs.padded(x, Np, Dp, dtype, scratch, CPU))
        if made.data_ptr() != address:
            return None  # (not where the plan's launches read it: go the usual way)
    native = _native(plan)
    if native:
        done = native.run(q, k, v, out)
        if done == 0:
            return _copied_out(plan, out)
        if done == 1:  # (no tail for this count)
            return None
        # A launch failed: the launches again from Python, which raise its error.
    tensors = {name: _view(x.transpose(1, 2) if name in plan.transposed else x,
                           *plan.views[name]) for name, x in callers.items()
               if name in plan.views}
    if "out" in plan.views:
        tensors["out"] = _view(written, *plan.views["out"])
    for launch in plan.head:
        launch(tensors, 0)
    most, widest = forward.unit_counts(plan.units)
    tail = plan.tails.get(most)
    if tail is None:
        return None
    if tail.used is not None:
        used_row, used_cols = tail.used
        used_row[...] = plan.unit_row[:, :most]
        used_cols[...] = plan.unit_cols[:, :most]
    for launch in tail.launches:
        launch(tensors, max(widest, 1))
    return _copied_out(plan, out)


def _copied_out(plan: _Plan, out: torch.Tensor) -> torch.Tensor:
    """The result ``out`` [B, H, N, D], from the kernels' padded output where they did not
    write it themselves (``forward._forward``'s copy)."""
    src = plan.out_copy
    if src is not None:
        if src.dtype == torch.int16:  # (bf16 bits as the micro-kernels take them)
            src = src.view(torch.bfloat16)
        B, H, N, D = out.shape
        R, n, b, Dp = src.shape
        out.copy_(src.view(B, H, n * b, Dp)[:, :, :N, :D])
    return out


def _native(plan: _Plan):
    """The plan's ``native_replay.NativePlan``, made on first use; False where there is
    none (no C compiler, ``MRA_COMPILE_NATIVE_REPLAY=0``, an argument it cannot pass)."""
    if plan.native is None:
        plan.native = False
        if native_replay.enabled():
            try:
                plan.native = native_replay.NativePlan(plan)
            except (KeyError, TypeError, AttributeError, ValueError, OverflowError):
                pass  # (replays from Python)
    return plan.native


def _view(x: torch.Tensor, shape, dtype) -> torch.Tensor:
    """``x`` as the kernels took it: ``shape``, and its bits as ``dtype`` (bf16 as int16)."""
    return (x if x.dtype == dtype else x.view(dtype)).view(shape)


def _record(key, plan: _Plan | None, q, k, v, mask, query_mask, args, usual):
    """``usual``'s output; its launches become the plan of ``key`` (or a tail of
    ``plan``, the plan of ``key`` so far) where they can."""
    ws = memory.WORKSPACE
    generation = ws.generation
    with build.trace_kernel_calls() as calls:
        out = usual(q, k, v, mask, query_mask, args)
    if ws.generation != generation:  # (a buffer went, or was not kept: next time)
        return out
    made = _plan_of(calls, (q, k, v), out)
    if made is not None and (mask is not None or query_mask is not None):
        made.masks = _masks_of(calls, args, {"mask": mask, "query_mask": query_mask})
        if made.masks is None:
            made = None
    if plan is not None and made is not None:  # (the same buffers: no generation moved)
        if len(plan.tails) >= TAILS_PER_PLAN:
            del plan.tails[next(iter(plan.tails))]
        plan.tails.update(made.tails)
        plan.native = None  # (made again with the new tail)
        return out
    ws.plans.pop(key, None)
    if len(ws.plans) >= PLANS_PER_THREAD:
        del ws.plans[next(iter(ws.plans))]
    ws.plans[key] = _UNPLANNED if made is None else made
    return out


def _plan_of(calls: list[dict], qkv, out) -> _Plan | None:
    """The plan of one recorded call, or None where it cannot be replayed."""
    ops = [c["op"] for c in calls]
    if out.shape != qkv[0].shape or out.dtype != qkv[0].dtype:
        return None
    if (ops[:2] != list(_HEAD) or not ops[2:] or ops[-1] != "hires_rows"
            or ops[2:] != [op for op in _TAIL if op in ops[2:]]):
        return None
    callers = {name: x for name, x in zip(_INPUTS, qkv)}
    callers["out"] = out
    storages = {x.untyped_storage().data_ptr() for x in callers.values()}
    kept = memory.kept_storages() - storages
    # The inputs the kernels read through a copy in scratch (``inputs.padded``), by the
    # address of that copy.
    copied = inputs.copied_inputs()
    views: dict = {}
    copies: dict = {}
    out_copy = None
    transposed: set[str] = set()
    named_calls = []
    for call in calls:
        names = kernels.get(call["op"]).arg_names(call["static"])
        if len(names) != len(call["args"]):
            return None
        named = dict(zip(names, call["args"]))
        slots = []
        for i, (name, arg) in enumerate(named.items()):
            if not isinstance(arg, torch.Tensor):
                continue
            if name in callers and arg.data_ptr() in copied:  # (a copy of q, k or v)
                side, Np, Dp, dtype, heads_last = copied[arg.data_ptr()]
                if side != name:
                    return None
                copies[name] = (Np, Dp, dtype, arg.data_ptr(), heads_last)
                continue
            if name == "out" and arg.data_ptr() != out.data_ptr():  # (the padded output)
                if arg.untyped_storage().data_ptr() not in kept:
                    return None
                out_copy = arg
                continue
            if name in callers:  # (the kernels' view of the caller's tensor, in place)
                mine = callers[name]
                if arg.data_ptr() != mine.data_ptr() or arg.numel() != mine.numel():
                    return None
                if views.setdefault(name, (arg.shape, arg.dtype)) != (arg.shape, arg.dtype):
                    return None
                if not mine.is_contiguous():  # (as [B, N, H, D]: it is its transpose)
                    transposed.add(name)
                slots.append((i, name))
            elif arg.untyped_storage().data_ptr() not in kept:
                return None  # (made for this call: its values would be stale)
        fn = build.kernel(call["op"], call["knobs"], call["target"], **call["static"])
        substituted = {i for i, _ in slots}
        args = [None if i in substituted else a for i, a in enumerate(call["args"])]
        ucap = names.index("ucap") if call["op"] == "hires_rows" else None
        named_calls.append((call["op"], named, _Launch(fn, args, tuple(slots), ucap)))
    if set(views) | set(copies) | ({"out"} if out_copy is not None else set()) != {
            *_INPUTS, "out"}:
        return None
    select = named_calls[1][1]
    units, unit_row, unit_cols = (select[x].numpy() for x in ("units", "unit_row", "unit_cols"))
    most, _ = forward.unit_counts(units)
    overflow = [named for op, named, _ in named_calls if op == "hires_units"]
    if bool(overflow) != (most > 0):
        return None
    used = (overflow[0]["unit_row"].numpy(), overflow[0]["unit_cols"].numpy()) if overflow else None
    if used is not None and (used[0].shape[1] != most or used[1].shape[1] != most):
        return None
    launches = [launch for _, _, launch in named_calls]
    return _Plan(launches[:2], units, unit_row, unit_cols, views,
                 {most: _Tail(launches[2:], used)}, copies, out_copy,
                 transposed=frozenset(transposed))


def _masks_of(calls: list[dict], args: tuple, given: dict) -> _Masks | None:
    """The ``_Masks`` of a recorded masked call (its pooling's mask tensors, its
    selection's budget; ``given``: the call's masks by argument name), or None where its
    kernels did not read them as ``inputs.prepare`` writes them."""
    pool, select = (dict(zip(kernels.get(c["op"]).arg_names(c["static"]), c["args"]))
                    for c in calls[:2])
    if not (select["counts"].data_ptr() == pool["counts"].data_ptr()
            and select["q_counts"].data_ptr() == pool["q_counts"].data_ptr()):
        return None
    sides: tuple[_Side, ...]
    keys = (pool["mask"], pool["counts"], pool["inv_counts"])
    queries = (pool["qmask"], pool["q_counts"], pool["q_inv_counts"])
    if all(a.data_ptr() == b.data_ptr() for a, b in zip(keys, queries)):
        if given["query_mask"] is not None:  # (self-attention: one mask for both sides)
            return None
        sides = (_Side("mask", *keys, (0, 1, 2)),)
    elif any(a.data_ptr() == b.data_ptr() for a, b in zip(keys, queries)):
        return None
    else:  # (cross-attention, or a query mask: each side its own)
        sides = tuple(_Side(name, *tensors, checks)
                      for name, tensors, checks in (("mask", keys, (1, 2)),
                                                    ("query_mask", queries, (0,)))
                      if given[name] is not None)
    per_sequence = bool(select["real_only"])
    block_per_row = options.parse(args).block_per_row
    if per_sequence and block_per_row is None:
        return None
    return _Masks(sides, pool["q_counts"], calls[0]["static"]["b"],
                  select["budget"] if per_sequence else None, int(select["heads"]),
                  block_per_row, int(select["index"].shape[1]))
