"""Which schedule knobs a kernel is built with: the one place they are resolved.

In order, later wins: the target's defaults (``KNOBS`` of its schedules module), the
tuning record of the call's target, input dtype and shape bucket (``mra_compile.records``),
the knobs the caller gives.
"""
from __future__ import annotations

import math

import torch

from mra_compile import records, targets
from mra_compile.targets import Target


def shape_bucket(N: int, D: int, block_size: int = 32) -> str:
    """The tuning-record bucket of a call: ``"N4096-D64-b32"``.

    N: the sequence length padded to whole blocks, rounded to the nearest power of two
    (in log scale); D: the head dim padded to 16, as the kernels are compiled.
    """
    b = max(int(block_size), 1)
    n_pad = max(-(-int(N) // b) * b, b)
    d_pad = max(-(-int(D) // 16) * 16, 16)
    return f"N{2 ** round(math.log2(n_pad))}-D{d_pad}-b{b}"


def default_knobs(op: str, target: Target | str | None = None) -> dict:
    """The defaults of ``op`` on ``target`` (the CPU's take this host's vector width)."""
    return targets.get(target).default_knobs(op)


def resolve_knobs(op: str, knobs: dict | None = None, bucket: str | None = None,
                  target: Target | str | None = None, dtype: torch.dtype | None = None) -> dict:
    """The knobs a kernel is built with: the defaults, overridden by the tuning record of
    ``target`` (this host, this TVM version) for inputs of ``dtype`` (None: float32) and
    the shape ``bucket`` (``shape_bucket``; the record of the nearest bucket when there is
    none for it, or when ``bucket`` is None), overridden by ``knobs``. See
    ``mra_compile.records``. Targets without tuning records: the defaults overridden by
    ``knobs``."""
    target = targets.get(target)
    base = target.default_knobs(op)
    if knobs is not None and base.keys() <= knobs.keys():
        return {**base, **knobs}  # complete: no record can change it
    if not target.uses_tuning_records:
        return {**base, **(knobs or {})}
    match = records.lookup(op, bucket, target, dtype)
    if match is not None:
        base.update(match.knobs)
    if knobs:
        base.update(knobs)
    return base


_SHAPE_KNOBS: dict[tuple, dict] = {}


def knobs_for_shape(knobs: dict | None, N: int, D: int, block_size: int = 32,
                    target: Target | str | None = None,
                    dtype: torch.dtype | None = None) -> dict:
    """``{op: complete knobs}`` of every tunable operator of ``target`` for a call of this
    shape and input ``dtype`` (None: float32): the per-operator ``knobs`` given (``{op:
    {knob: value}}``, may be None or partial) over the tuning record of the shape's bucket
    over the defaults. Entries for other operators are passed on unchanged. Cached per
    bucket when ``knobs`` is empty."""
    target = targets.get(target)
    bucket = shape_bucket(N, D, block_size)
    if not knobs:
        key = (bucket, records.token(), target.name, target.tuning_dtype(dtype or torch.float32))
        resolved = _SHAPE_KNOBS.get(key)
        if resolved is None:
            resolved = _SHAPE_KNOBS[key] = {
                op: resolve_knobs(op, None, bucket, target, dtype)
                for op in records.tunable_ops(target)}
        return {op: dict(k) for op, k in resolved.items()}
    out = {op: resolve_knobs(op, knobs.get(op), bucket, target, dtype)
           for op in records.tunable_ops(target)}
    out.update((op, k) for op, k in knobs.items() if op not in out)
    return out
