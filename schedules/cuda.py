"""Hand-written CUDA schedules, one named function per operator.

Each function takes an ``s_tir.Schedule`` of the operator's PrimFunc and its knobs as
keyword arguments (``KNOBS[op]`` holds the defaults), like ``schedules/cpu.py``.

Two shapes of kernel:
- *per-unit* kernels (the high-resolution work, the per-block backward stages): one
  thread block per unit of work (a (row, block) pair), every intermediate of the unit
  staged in shared memory (``shared.dyn``: one dynamic allocation, reused between stages
  whose lifetimes do not overlap), every stage's spatial loops spread over the block's
  ``threads`` threads, reductions accumulated in registers;
- *grid* kernels (the small low-resolution stages): each stage its own kernel, one thread
  per output element.

The gathered key and value blocks of a unit (``k_g``, ``v_g``) are staged in shared
memory chunk by chunk, with 16-byte vector loads. fp16/bf16 variants run the two products
of a unit (q k^T and P V) on tensor cores through TVM's wmma intrinsics, accumulating in
fp32 (``_tensor_core_unit``).
"""
from __future__ import annotations

SHARED = "shared.dyn"


def _name(sch, block) -> str:
    return sch.get(block).name_hint


def _reduce_count(sch, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == 2)


def _thread_bind(sch, block, loops, threads):
    """Spread ``loops`` (consecutive spatial loops of ``block``, or none) over threadIdx.x.

    Every stage of a kernel binds a loop of exactly ``threads`` (non-dividing extents are
    guarded), so thread extents agree and no two threads ever write one element."""
    if not loops:
        loops = [sch.add_unit_loop(block)]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, inner = sch.split(fused, [None, threads])
    sch.bind(inner, "threadIdx.x")
    return inner


def _spatial_loops_under(sch, block, anchor_depth):
    """The spatial loops of ``block`` below its first ``anchor_depth`` loops."""
    loops = sch.get_loops(block)[anchor_depth:]
    n_red = _reduce_count(sch, block)
    return list(loops[: len(loops) - n_red]) if n_red else list(loops)


def grid(sch, name, threads=256):
    """One thread per output element of stage ``name``: its own kernel."""
    block = sch.get_sblock(name)
    loops = _spatial_loops_under(sch, block, 0)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def per_unit(sch, outputs, depth, threads, keep_global=()):
    """One thread block per point of the first ``depth`` axes of ``outputs`` (merged).

    Every other computed stage is moved under that loop (consumers first), its buffer put
    in shared memory, and its spatial loops spread over ``threads`` threads. Stages in
    ``keep_global`` stay separate kernels (see ``grid``). Returns the block loop."""
    loops = [sch.fuse(*sch.get_loops(sch.get_sblock(n))[:depth]) for n in outputs]
    unit = sch.merge(*loops) if len(loops) > 1 else loops[0]
    sch.bind(unit, "blockIdx.x")
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    names = [_name(sch, b) for b in blocks]
    inner = [n for n in names if n not in outputs and n not in keep_global]
    for n in reversed(inner):
        sch.compute_at(sch.get_sblock(n), unit)
        sch.set_scope(sch.get_sblock(n), 0, SHARED)
    for n in inner + list(outputs):
        block = sch.get_sblock(n)
        thread = _thread_bind(sch, block, _spatial_loops_under(sch, block, 1), threads)
        if _reduce_count(sch, block):
            # Accumulate in a register, store once: a reduction updating shared memory
            # in place would need a barrier per step (and cannot have one under a guard).
            sch.reverse_compute_at(sch.cache_write(block, 0, "local"), thread)
    for n in keep_global:
        grid(sch, n)
    return unit


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001  (TVM raises its own error type for a missing block)
        return False


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


def pool_and_logits(sch, *, threads=256):
    """Block means per (row, block) in registers; logits, their row maxima as grids."""
    for name in ("qp", "kp", "vp"):
        blk = sch.get_sblock(name + "_sum")
        out = sch.get_sblock(name)
        grid(sch, name, threads)
        sch.compute_at(blk, sch.get_loops(out)[-1])
        sch.set_scope(blk, 0, "local")
    for name in ("raw_logits", "logits", "rowmax"):
        grid(sch, name, threads)
    return sch


def lowres_out(sch, *, threads=256):
    """Weights as a grid kernel; W v̂ and sum W one thread per output."""
    for name in ("weight", "o_lo", "z_lo"):
        grid(sch, name, threads)
    return sch


def hires_units(sch, *, threads=128, blocks_per_unit=2):
    """One thread block per overflow unit; see ``per_unit``."""
    per_unit(sch, ("unit_max", "unit_out", "unit_sum"), 2, threads)
    return sch


def hires_rows(sch, *, threads=128, blocks_per_row=2, full=True):
    """One thread block per (row, query block): its own unit, the merge of its overflow
    units, the low-resolution part and the normalisation, the output written once."""
    # [b, ucap] has a symbolic extent: recompute the merge factors where they are used.
    sch.compute_inline(sch.get_sblock("ov_scale"))
    per_unit(sch, ("out", "stab", "lo_w", "inv_z"), 2, threads)
    return sch


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


def bwd_prep(sch, *, threads=128):
    """One thread block per (row, query block)."""
    per_unit(sch, ("g", "dsum", "ga", "da"), 2, threads)
    return sch


def bwd_dq_units(sch, *, threads=128, blocks_per_unit=2):
    """One thread block per query-block unit."""
    per_unit(sch, ("dq_unit",), 2, threads)
    return sch


def bwd_dkdv_units(sch, *, threads=128, blocks_per_unit=2):
    """One thread block per key-block unit."""
    per_unit(sch, ("dk_unit", "dv_unit"), 2, threads)
    return sch


def bwd_lowres(sch, *, threads=256):
    """Grid kernels over the n x n weights and the three small products."""
    for name in ("weight", "gv", "dlog", "dqp", "dkp", "dvp"):
        grid(sch, name, threads)
    return sch


def bwd_finish(sch, *, threads=128):
    """One thread per output element; the unit partials summed in registers."""
    for name in ("dq", "dk", "dv"):
        grid(sch, name, threads)
        blk = sch.get_sblock(name + "_sum")
        sch.compute_at(blk, sch.get_loops(sch.get_sblock(name))[-1])
        sch.set_scope(blk, 0, "local")
    return sch


OPERATOR_KNOBS = {
    "hires_units": ("blocks_per_unit",), "hires_rows": ("blocks_per_row",),
    "bwd_dq_units": ("blocks_per_unit",), "bwd_dkdv_units": ("blocks_per_unit",),
}

KNOBS = {
    "pool_and_logits": dict(threads=256),
    "lowres_out": dict(threads=256),
    "hires_units": dict(threads=128, blocks_per_unit=2),
    "hires_rows": dict(threads=128, blocks_per_row=2),
    "bwd_prep": dict(threads=128),
    "bwd_dq_units": dict(threads=128, blocks_per_unit=2),
    "bwd_dkdv_units": dict(threads=128, blocks_per_unit=2),
    "bwd_lowres": dict(threads=256),
    "bwd_finish": dict(threads=128),
}
