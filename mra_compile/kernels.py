"""The kernel registry: every MRA-2 operator declared once.

Each ``Kernel`` names its TE builder (the function of the same name in
``mra_compile.operators``), its arguments in the order the builder returns them (checked
against the built PrimFunc's parameters, and used to order the named arguments of a
call), whether it reads q, k, v (then CUDA gives it fp16/bf16 as they are), which of its
schedule knobs shape the operator itself, and whether it has a "full"/"sparse" variant.
Its knobs and tunable space per target live with that target's schedules
(``schedules/<family>.py``: ``KNOBS[name]``, ``SPACES[name]``).

The ahead-of-time library (``mra_compile.aot``), the tuner, the forward and backward
and the tests all derive their lists of operators from ``KERNELS``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

QKV = ("q", "k", "v", "mask", "qmask")  # mask: the keys', qmask: the queries' (operators)
HEAD_DIM_MULTIPLE = 16  # kernels are compiled for head dims padded to this (one AVX-512 vector)


@dataclass(frozen=True)
class Kernel:
    name: str
    args: tuple[str, ...]  # the TE builder's parameters, in order
    reads_qkv: bool = False
    shape_knobs: tuple[str, ...] = ()  # knobs passed to the TE builder
    full_only: tuple[str, ...] = ()  # arguments only in "full" mode (then ``static["full"]``)
    # Takes the I/O dtype though it does not read q, k, v (bwd_prep: with micro-kernels
    # dout and g, the backward's block products' operand, are stored in it).
    takes_io: bool = False
    # Writes its outputs in the I/O dtype where the target's micro-kernels take q, k, v
    # (bwd_finish: bf16 gradients on CPUs with the bf16 micro-kernels, not float32 ones
    # rounded by a copy after it).
    writes_io: bool = False
    # Has a grouped-query variant though it does not read k, v (``static``'s ``gqa``):
    # bwd_finish sums the query heads' partials of dk, dv per key/value head.
    sums_groups: bool = False
    # Intermediates in global memory between the kernel's launches: with
    # ``static["scratch"]`` (``Target.scratch_args``) the builder returns them as its last
    # arguments, and the caller allocates them.
    scratch: tuple[str, ...] = ()
    # The module of ``mra_compile`` that defines it: "operators" (TE) or one that writes
    # TIR with its schedule in it (``selection_tir``, ``plan_tir``: control flow that TE
    # cannot state).
    module: str = "operators"
    # The target families (``Target.family``) that have it; None: every one.
    families: tuple[str, ...] | None = None
    # Has a P v product with a variant that takes P in two half-precision parts (the
    # float32 output of a half-precision result on tensor cores: ``static``'s
    # ``split_pv``).
    splits_pv: bool = False
    # Has a variant that reads q, k, v where they lie in [B, N, H, D] tensors (the layout
    # an attention layer's heads come from): ``static``'s ``heads_last``.
    heads_last: bool = False
    # Has a variant that widens q, k, v of a narrower dtype as it reads them, computing
    # everything else in the compute dtype (``static``'s ``widened``; ``Target.widens``).
    widens: bool = False

    def on(self, family: str) -> bool:
        """Whether targets of ``family`` have this kernel."""
        return self.families is None or family in self.families

    @property
    def has_modes(self) -> bool:
        """Whether the kernel is compiled per mode (``static["full"]``)."""
        return bool(self.full_only)

    def builder(self):
        """The TE builder (imports TVM)."""
        return getattr(importlib.import_module(f"mra_compile.{self.module}"), self.name)

    def static(self, b: int, D: int, dtype: str = "float32", io: str | None = None,
               full: bool | None = None, scratch: bool = False, gqa: bool = False,
               micro: str | None = None, split_pv: bool = False,
               heads_last: bool = False, widened: bool = False) -> dict:
        """The compile-time parameters of one variant: block edge ``b``, padded head dim
        ``D``, compute ``dtype``, the q/k/v dtype ``io`` where it differs (read only by
        kernels that read q, k, v, and by ``takes_io`` ones), for kernels
        with modes ``full``, ``scratch``: whether the ``scratch`` intermediates are
        arguments, and ``gqa`` for the grouped-query variant of the kernels that read
        k, v or sum over their heads (``sums_groups``; an extra ``group`` argument; the
        plain variant has no division in its indexing); ``micro``: the target's
        micro-kernels for q, k, v of dtype ``io`` (``Target.micro_kernels``), named in the
        key of the kernels that take ``io``;
        ``split_pv``: P v from P split into two parts in ``io``, P_hi + P_lo (the
        variant of ``splits_pv`` kernels whose output is float32: ``Target.splits_pv``);
        ``heads_last``: q, k, v are [B, N, H, D] tensors (row r = b H + h), for the kernels
        that have that variant (a ValueError for another kernel that reads them);
        ``widened``: q, k, v of dtype ``io`` are widened as they are read
        (``Target.widens``; with ``split_pv``: the float32 output, P not split), for the
        kernels that have that variant (a ValueError for another that reads them)."""
        static: dict = {"b": b, "D": D}
        if dtype != "float32":  # float32 kernels keep their historical keys
            static["dtype"] = dtype
        writes = self.writes_io and micro is not None
        if io is not None and io != dtype and (self.reads_qkv or self.takes_io or writes):
            static["io"] = io
            if micro is not None:
                static["micro"] = micro
            elif split_pv and self.splits_pv:
                static["split_pv"] = True
            if widened and self.reads_qkv:
                if not self.widens:
                    raise ValueError(f"kernel {self.name} has no variant widening {io} q, k, v")
                static["widened"] = True
        if gqa and (self.reads_qkv or self.sums_groups):
            static["gqa"] = True
        if self.has_modes:
            if full is None:
                raise ValueError(f"kernel {self.name} needs full=True or False")
            static["full"] = bool(full)
        if scratch and self.scratch:
            static["scratch"] = True
        if heads_last and self.reads_qkv:
            if not self.heads_last:
                raise ValueError(f"kernel {self.name} has no variant reading q, k, v as "
                                 "[B, N, H, D]")
            static["heads_last"] = True
        return static

    def arg_names(self, static: dict) -> tuple[str, ...]:
        """The arguments of the variant ``static``, in call order."""
        args = self.args + (self.scratch if static.get("scratch") else ())
        if self.full_only and not static.get("full", True):
            args = tuple(a for a in args if a not in self.full_only)
        if not static.get("gqa"):
            args = tuple(a for a in args if a != "group")
        return args

    def order(self, static: dict, named: dict) -> tuple:
        """``named`` arguments as the positional tuple the compiled kernel takes."""
        return self.ordered(self.arg_names(static), named)

    def ordered(self, names: tuple[str, ...], named: dict) -> tuple:
        """``named`` arguments in the order ``names`` (``arg_names`` of a variant); a
        TypeError names the missing and the unexpected ones."""
        if named.keys() != set(names):
            missing = [a for a in names if a not in named]
            extra = [a for a in named if a not in names]
            raise TypeError(f"kernel {self.name}: missing arguments {missing}, "
                            f"unexpected {extra}")
        return tuple(named[a] for a in names)


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    # Forward (docs/spec.md, steps 2-6).
    # (v and v̂ only in "full" mode: "sparse" has no low-resolution output)
    Kernel("pool_and_logits", (*QKV, "counts", "inv_counts", "q_counts", "q_inv_counts", "qp",
                               "kp", "vp", "logits", "rowmax", "heads", "group", "scale"),
           reads_qkv=True, full_only=("v", "vp"),
           scratch=("raw_logits", "real_max"), heads_last=True, widens=True),
    Kernel("lowres_out", ("logits", "rowmax", "hmask", "counts", "vp", "o_lo", "z_lo",
                          "heads"), scratch=("weight",)),
    Kernel("hires_units", (*QKV, "unit_row", "unit_cols", "unit_max", "unit_out", "unit_sum",
                           "heads", "group", "scale"), reads_qkv=True, shape_knobs=("blocks_per_unit",),
           splits_pv=True, heads_last=True, widens=True),
    Kernel("hires_rows", (*QKV, "row_cols", "ov_max", "ov_out", "ov_sum", "ov_start",
                          "ov_units", "o_lo", "z_lo", "rowmax", "out", "stab", "lo_w", "inv_z",
                          "heads", "group", "scale", "ucap"),
           reads_qkv=True, shape_knobs=("row_unit_blocks",), full_only=("o_lo", "z_lo", "rowmax"),
           splits_pv=True, heads_last=True, widens=True),
    # Block selection and the work plan in one pass (docs/spec.md, step 3; CPU: on the
    # host otherwise, and for priors).
    Kernel("select_plan", ("logits", "rowmax", "counts", "q_counts", "budget", "scores",
                           "cand_val", "cand_idx", "index", "row_cols", "ov_start", "ov_units",
                           "unit_row", "unit_cols", "units", "heads", "real_only",
                           "write_mask"), module="selection_tir", families=("cpu",)),
    # Backward.
    # Its two work plans (by query block, by key block) and where dq's units read dS, in
    # one pass over the selection (CPU: ``plan_tir``; on the host otherwise).
    Kernel("bwd_plan", ("index", "q_start", "q_units", "q_row", "q_cols", "k_start", "k_units",
                        "k_col", "k_rows", "ds_at", "k_seen", "units"), module="plan_tir",
           families=("cpu",)),
    Kernel("bwd_prep", ("dout", "out", "inv_z", "lo_w", "g", "dsum", "ga", "da"),
           takes_io=True),
    # CUDA's units: dq by query block, dk and dv by key block, each computing the
    # logits, P and dS of its blocks itself.
    Kernel("bwd_dq_units", (*QKV, "unit_row", "unit_cols", "stab", "g", "dsum", "inv_z",
                            "dq_unit", "heads", "group", "scale"),
           reads_qkv=True, shape_knobs=("blocks_per_unit",), families=("cuda",)),
    Kernel("bwd_dkdv_units", (*QKV, "unit_col", "unit_rows", "stab", "g", "dsum", "inv_z",
                              "dk_unit", "dv_unit", "heads", "group", "scale"),
           reads_qkv=True, shape_knobs=("blocks_per_unit",), families=("cuda",)),
    # The CPU's: dk, dv and dS by key block, then dq from that dS (one block product where
    # bwd_dq_units has three, and no exp). CUDA keeps the two above (dS through global
    # memory is not measured there: its kernels have not run on a GPU yet).
    Kernel("bwd_dkdv_ds_units", (*QKV, "unit_col", "unit_rows", "stab", "g", "dsum", "inv_z",
                                 "dk_unit", "dv_unit", "ds_blocks", "heads", "group", "scale"),
           reads_qkv=True, shape_knobs=("blocks_per_unit",), families=("cpu",), widens=True),
    Kernel("bwd_dq_ds_units", ("k", "unit_cols", "ds_at", "ds_blocks", "dq_unit", "group"),
           reads_qkv=True, shape_knobs=("blocks_per_unit",), families=("cpu",), widens=True),
    Kernel("bwd_lowres", ("logits", "hmask", "rowmax", "counts", "qp", "kp", "vp", "ga", "da",
                          "dqp", "dkp", "dvp", "heads", "scale"),
           scratch=("weight", "gv", "dlog")),
    Kernel("bwd_finish", ("dq_unit", "q_start", "q_units", "dk_unit", "dv_unit", "k_start",
                          "k_units", "dqp", "dkp", "dvp", "inv_counts", "q_inv_counts", "mask",
                          "qmask", "dq", "dk", "dv", "heads", "group", "ucap_q", "ucap_k"),
           writes_io=True, sums_groups=True),
)}


def get(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; known: {list(KERNELS)}") from None


def reading_qkv() -> tuple[str, ...]:
    """The kernels that read q, k, v (on CUDA they take fp16/bf16 as they are)."""
    return tuple(k.name for k in KERNELS.values() if k.reads_qkv)


def operator_modules(family: str | None = None) -> tuple[str, ...]:
    """The modules of ``mra_compile`` that define the kernels (``Kernel.module``), sorted;
    with ``family``, those of its kernels only (``Kernel.on``)."""
    return tuple(sorted({k.module for k in KERNELS.values()
                         if family is None or k.on(family)}))


def on_target(target) -> tuple[str, ...]:
    """The kernels ``target`` has (``Kernel.families``)."""
    return tuple(name for name, k in KERNELS.items() if k.on(target.family))


def tunable(target) -> tuple[str, ...]:
    """The kernels with a tuning search space on ``target`` (``SPACES`` of its schedules)."""
    spaces = getattr(target.schedules, "SPACES", {})
    return tuple(name for name in KERNELS if name in spaces)
