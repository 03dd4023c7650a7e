"""What the forward and the backward share: inputs as the kernels read them, scratch and
result memory (kept in ``mra_compile.memory``), and the thread policy around kernel calls.

Inputs are validated by the caller (``mra_compile.validate``, ``mra_compile.options``).
Kernels compute in float32, or in float64 for float64 inputs; the kernels that read q, k,
v take them in the target's I/O dtype (``Target.io_dtype``: fp16/bf16 as they are on
CUDA, else the compute dtype).
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mra_compile import build, kernels, library, targets
from mra_compile.memory import WORKSPACE, kept_constants, result_tensor
from mra_compile.targets import Target, compute_dtype

HEAD_DIM_MULTIPLE = kernels.HEAD_DIM_MULTIPLE

_TVM_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16",
              torch.float32: "float32", torch.float64: "float64"}


@contextlib.contextmanager
def torch_single_threaded():
    """Run the plan's small torch ops on the calling thread only.

    Torch's OpenMP workers spin for a while after each parallel op; the kernels that
    follow would share the cores with spinning threads (measured: the next kernel
    1.5-3x slower on 2 cores). The plan's ops are small (n*n per row), so one thread
    loses little; the kernels run on torch's thread count (``mra_compile.openmp``).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


ALIGNMENT = 64  # bytes: TVM's buffer alignment (torch's allocations are at least this)
# "0": inputs in an attention layer's layout are copied into the kernels' own (``prepare``)
HEADS_LAST_ENV = "MRA_COMPILE_HEADS_LAST"
HEADS_LAST_COPY = ":heads_last"  # the suffix of ``heads_last_copy``'s scratch names


def pad(x: torch.Tensor, n_pad: int, d_pad: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, D] -> contiguous [B*H, N + n_pad, D + d_pad] of ``dtype``, zero padded."""
    x = x.to(dtype)
    if n_pad or d_pad:
        x = F.pad(x, (0, d_pad, 0, n_pad))
    B, H, N, D = x.shape
    x = x.reshape(B * H, N, D).contiguous()
    # A view at an odd offset of a larger tensor passes through the lines above; the
    # kernels assume aligned buffers (vector loads: CPU segfault, CUDA misaligned address).
    return x.clone() if x.data_ptr() % ALIGNMENT else x


@dataclass
class Prepared:
    """Inputs as the kernels read them.

    q [R, Np, Dp], k, v [Rkv, Npk, Dp] in the target's I/O dtype, or with ``heads_last``
    [B, Np, H, Dp] (k, v: [B, Npk, Hkv, Dp]; row r = b H + h) where the caller's tensors
    lie so in memory (``rows`` gives (R, Np, Dp) either way, ``key_blocks`` Npk / b);
    mask [Bm, Npk], the keys' (row r of q uses mask row r // heads); counts, inv_counts
    [Bm, Npk / b]; qmask, q_counts, q_inv_counts: the same for the queries (the same
    tensors for self-attention); scale: the logit scale (default 1/sqrt(D) of the real
    head dim). Each side is padded to whole blocks of its own: Npk = Np but for
    cross-attention (``prepare``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor
    inv_counts: torch.Tensor
    qmask: torch.Tensor
    q_counts: torch.Tensor
    q_inv_counts: torch.Tensor
    heads: int
    scale: float
    block_size: int
    target: Target
    masked: bool = False  # a mask was given (not only a partial last block)
    group: int = 1  # query heads per key/value head: q row r reads k, v row r // group
    # The kernels' variant whose P v keeps P at float32 accuracy, for the float32 output
    # of a half-precision result: the micro-kernels' with P v in float32
    # (``Target.micro_kernels``), or P split in two (``Target.splits_pv``), or where P is
    # float32 anyway (``Target.widens``) the variant writing its output in float32.
    float32_pv: bool = False
    # Whether the call returns what the backward reads (``forward.Saved``): False for an
    # inference call, whose intermediates then go to scratch memory (``saved``).
    keeps_saved: bool = True
    # q, k, v are [B, Np, H, Dp]: the kernels' heads-last variant reads them in place.
    heads_last: bool = False

    def __post_init__(self):
        # What selects a kernel variant besides its op, mode and knobs (``run``).
        self._variant = (self.block_size, self.q.shape[-1], self.q.dtype, self.mask.dtype,
                         self.group > 1, self.float32_pv, self.target.name,
                         build.lookup_token(), self.heads_last)

    @property
    def rows(self) -> tuple[int, int, int]:
        """(R, Np, Dp): rows (B * H), padded length and head dim, in either layout."""
        if self.heads_last:
            B, Np, H, Dp = self.q.shape
            return B * H, Np, Dp
        R, Np, Dp = self.q.shape
        return R, Np, Dp

    @property
    def key_blocks(self) -> int:
        """nk: the keys' blocks (k, v [.., Npk, ..] either layout: Npk / b)."""
        return self.k.shape[1] // self.block_size

    @property
    def masks(self) -> dict:
        """Both sides' masks as the kernels name them."""
        return {"mask": self.mask, "qmask": self.qmask}

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the mask and every kernel output but ``out``)."""
        return self.mask.dtype

    def static(self, op: str, full: bool | None = None) -> dict:
        """The compile-time parameters of kernel ``op`` for these inputs."""
        return kernels.get(op).static(self.block_size, self.q.shape[-1], _TVM_DTYPE[self.dtype],
                                      _TVM_DTYPE[self.q.dtype], full, self.target.scratch_args,
                                      self.group > 1,
                                      self.target.micro_kernels(self.q.dtype, self.float32_pv,
                                                                self.block_size),
                                      self.float32_pv and (self.target.splits_pv(self.q.dtype)
                                                           or self.widened),
                                      self.heads_last, self.widened)

    @property
    def widened(self) -> bool:
        """Whether the kernels widen q, k, v as they read them (``Target.widens``)."""
        return self.target.widens(self.q.dtype, self.block_size)

    def scratch(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A scratch tensor (``Workspace``) of the compute dtype unless said otherwise."""
        return WORKSPACE.get(name, *shape, dtype=dtype or self.dtype, device=self.q.device,
                             target=self.target)

    def result(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor the op returns as it is (``memory.result_tensor``)."""
        return result_tensor(shape, dtype or self.dtype, self.q.device, self.target)

    def saved(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor the backward reads: a result where the call returns those
        (``keeps_saved``), else scratch ``name``. (A kept result block costs a lease per
        call, ~8 us, and ~30 us right after other heavy work; scratch is a cached view.)"""
        if self.keeps_saved:
            return self.result(*shape, dtype=dtype)
        return self.scratch(name, *shape, dtype=dtype)

    def kernel_scratch(self, op: str) -> dict:
        """``op``'s intermediates between its launches (``Kernel.scratch``), as named
        arguments, where the target takes them as arguments (``Target.scratch_args``);
        else none (TVM's workspace holds them)."""
        if not self.target.scratch_args:
            return {}
        R, Np, _ = self.rows
        n, nk = Np // self.block_size, self.key_blocks
        shapes = {"raw_logits": (R, n, nk), "real_max": (R, n), "weight": (R, n, nk),
                  "gv": (R, n, nk), "dlog": (R, n, nk)}
        return {name: self.scratch(name, *shapes[name]) for name in kernels.get(op).scratch}

    def run(self, op: str, knobs: dict, full: bool | None = None, **args) -> None:
        """Kernel ``op`` on these inputs (``knobs``: ``{op: schedule knobs}``), with its
        scratch arguments; ``group`` goes only to the grouped-query variants."""
        if self.group == 1:
            args.pop("group", None)
        args.update(self.kernel_scratch(op))
        given = knobs.get(op)
        key = (op, full, self._variant, None if given is None else tuple(given.items()))
        bound = _BOUND.get(key)
        if bound is None or build.tracing():
            static = self.static(op, full)
            kernel = kernels.get(op)
            bound = _Bound(build.kernel(op, given, self.target, **static), kernel,
                           kernel.arg_names(static), "micro" in static
                           or (static.get("widened", False) and static.get("io") == "bfloat16"))
            if not build.tracing():
                if len(_BOUND) >= 256:  # (many shapes and knobs: start again)
                    _BOUND.clear()
                _BOUND[key] = bound
        bound(args)


@dataclass(frozen=True)
class _Bound:
    """A kernel with the order of its arguments, kept per variant (``Prepared.run``): a
    call's five to ten launches had each cost ~10 us of lookups (keys built from dicts,
    environment reads) before this."""

    fn: Callable[..., Any]
    kernel: kernels.Kernel
    names: tuple[str, ...]  # its arguments in call order (``Kernel.arg_names``)
    bf16_bits: bool  # takes bf16 tensors as their bits (operators.BF16_BITS: micro-kernels,
    # or widened as read)

    def __call__(self, args: dict) -> None:
        if self.bf16_bits:
            args = {name: x.view(torch.int16) if isinstance(x, torch.Tensor)
                    and x.dtype == torch.bfloat16 else x for name, x in args.items()}
        self.fn(*self.kernel.ordered(self.names, args))


_BOUND: dict[tuple, _Bound] = {}


def clean_padding(xs, keep, may_sync: bool):
    """docs/spec.md, step 1: the tensors ``xs`` ([B, H, N, D], any H) with their padded
    tokens (``keep`` [B, N] bool False) replaced by zero by selection, so that whatever
    they hold (NaN, inf) never reaches a real token's output.

    The kernels multiply every padded q, k, v value by its 0 mask (pooling, the queries
    of a unit) or exclude it by selection (logits, probabilities); only P V reads a
    padded value as it is, times a probability of exactly 0. So finite padding needs no
    copy: ``may_sync`` (the device's values may be read on the host: CPU) looks at the
    padded tokens only (``_finite_span``) and copies just a tensor that has a non-finite
    one there (a full copy of q, k, v cost 7 ms each at N = 8192, B*H = 12,
    single-threaded). Otherwise (CUDA: no host synchronisation) every tensor is copied."""
    def zeroed(x):
        return torch.where(keep[:, None, :, None], x, torch.zeros((), dtype=x.dtype,
                                                                  device=x.device))

    if not may_sync:
        return tuple(zeroed(x) for x in xs)
    padded = (~keep).numpy()
    spans = [(b, int(row.argmax()), len(row) - int(row[::-1].argmax()))
             for b, row in enumerate(padded) if row.any()]
    if not spans:
        return tuple(xs)
    return tuple(x if _finite_span(x, spans) else zeroed(x) for x in xs)


def _finite_span(x, spans) -> bool:
    """Whether the tokens ``first <= t < stop`` of sequence ``b`` of ``x`` [B, H, N, D]
    are all finite, for each ``(b, first, stop)`` of ``spans`` (those from a sequence's
    first padded token to its last): their sum is finite (a sum is finite only where
    every term is; one that overflows, or a non-finite real token between two padded
    ones, only sends the tensor to the copy, which changes nothing but the padding).
    One pass over those tokens where they lie: the gather of the padded tokens, their
    test and its reduction cost 3.4-3.7 ms a tensor at N = 4096, B = 4, H = 12, D = 64
    (3/4 of a sequence padded, [B, N, H, D] memory), this 0.11-0.2 ms."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tokens = x.transpose(1, 2)  # [B, N, H, D]
    total = sum(tokens[b, first:stop].sum(dtype=acc) for b, first, stop in spans)
    return bool(torch.isfinite(total))


def key_padding(mask):
    """The mask as ``[B, N]`` with nonzero = real: SDPA's ``[B, 1, 1, N]`` (bool: True =
    take part; additive float: 0 = take part, -inf = padding) becomes bool ``[B, N]``."""
    if mask is None or mask.dim() == 2:
        return mask
    keys = mask[:, 0, 0, :]
    return keys if keys.dtype == torch.bool else keys == 0


def real_tokens(mask):
    """Any mask form as bool ``[B, N]``, True = real (``key_padding``'s, nonzero)."""
    real = key_padding(mask)
    return real if real is None or real.dtype == torch.bool else real != 0


def prepare(q, k, v, mask, block_size: int, scale: float | None = None,
            query_mask=None, heads_last: bool = False) -> Prepared:
    """Pad to whole blocks (docs/spec.md, notation: a partial last block's padding counts
    as masked tokens) and head dims of a multiple of 16; the mask tensors. ``scale``: the
    logit scale (None: 1/sqrt(D)). A key length other than q's, or a ``query_mask``
    [B, Nq], is cross-attention (``_prepare_cross``). q, k, v take the target's I/O
    dtype (``Target.io_dtype``, forward and backward alike; not a dtype the kernels widen
    where the kernel libraries in use lack those variants: ``library.has_widened``); where
    they must be copied (padded, converted), the copies go to kept workspace memory on
    targets that reuse it (``padded``). ``heads_last``: where q, k, v are transposed views of
    [B, N, H, D] tensors the kernels can read in place (``reads_heads_last``), they do
    (no copy; an inference call: the backward's kernels read [R, Np, Dp])."""
    B, H, N, D = q.shape
    Nk = k.shape[2]
    b = block_size
    Np = -(-N // b) * b
    Dp = -(-D // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    dt = compute_dtype(q.dtype)
    dev = q.device
    target = targets.of_device(dev)
    io = target.io_dtype(q.dtype, b)
    if io != dt and target.widens(io, b) and (library.directories() or library.only()) \
            and not library.has_widened():
        io = dt  # (kernel libraries without those variants: float32 copies, as before them)
    mask = key_padding(mask)
    common = dict(scale=1.0 / math.sqrt(D) if scale is None else float(scale), block_size=b,
                  target=target, group=H // k.shape[1])
    if query_mask is not None or Nk != N:
        return _prepare_cross(q, k, v, mask, query_mask, Np, Dp, dt, io, common)
    if mask is not None:
        q, k, v = clean_padding((q, k, v), mask != 0, target.exact_plan)
    in_place = heads_last and N == Np and D == Dp and reads_heads_last((q, k, v), io, target)
    if in_place:
        qf, kf, vf = (x.transpose(1, 2) if _lies_heads_last(x, io) else
                      heads_last_copy(x, io, name, target)
                      for x, name in ((q, "input_q"), (k, "input_k"), (v, "input_v")))
    else:
        qf, kf, vf = (padded(x, Np, Dp, io, name, target)
                      for x, name in ((q, "input_q"), (k, "input_k"), (v, "input_v")))
    if mask is None and Np == N:
        # No mask: one shared row of ones; block means divide by b (docs/spec.md, step 2).
        maskf, counts, inv_counts = _unmasked(Np, b, dt, dev, keep=target.reuses_workspace)
        heads = B * H
    elif mask is None:  # (a partial last block: the same for every call of this shape)
        maskf, counts, inv_counts = kept_constants(
            ("partial", B, N, Np, b, dt, dev),
            lambda: _side_mask(torch.ones(B, N, dtype=dt, device=dev), N, Np, dt, b),
            target.reuses_workspace)
        heads = H
    else:
        maskf, counts, inv_counts = _side_mask(mask, N, Np, dt, b, target)
        heads = H
    # Self-attention: one mask (and its counts) for both sides.
    return Prepared(qf, kf, vf, maskf, counts, inv_counts, maskf, counts, inv_counts, heads,
                    masked=mask is not None, heads_last=in_place, **common)


def reads_heads_last(xs, io, target: Target) -> bool:
    """Whether the kernels read ``xs`` ([B, H, N, D] each) as [B, N, H, D] tensors: those
    that are transposed views of contiguous, aligned [B, N, H, D] tensors of dtype ``io``
    (the kernels' own: float32, float64, bf16 on the CPU's bf16 micro-kernels, fp16 or bf16
    widened as read: ``Target.widens``; what an attention layer passes after splitting its
    heads off the hidden dim) where they lie,
    the others through copies in that layout (``heads_last_copy``), where that copies
    fewer of them than the kernels' own layout would (``padded``): e.g. ModernBERT's
    value heads, a strided slice of its fused q, k, v projection beside a rotated query
    and key that are such views. On a target whose kernels have that variant
    (``Target.reads_heads_last``), unless ``MRA_COMPILE_HEADS_LAST`` is "0" or the kernel
    libraries in use have no such variant (``library.has_heads_last``: libraries built
    before they existed)."""
    if not target.reads_heads_last or os.environ.get(HEADS_LAST_ENV, "1") == "0":
        return False
    if (library.directories() or library.only()) and not library.has_heads_last():
        return False
    # (a tensor of one head is both: contiguous ones then read as [B, N, 1, D])
    return (sum(not _lies_heads_last(x, io) for x in xs)
            < sum(not _lies_as_is(x, io) for x in xs))


def _lies_as_is(x, dtype) -> bool:
    """Whether the kernels read ``x`` [B, H, N, D] (whole blocks, a head dim of a multiple
    of 16) where it lies: contiguous, aligned, of their dtype."""
    return x.dtype == dtype and x.is_contiguous() and x.data_ptr() % ALIGNMENT == 0


def _lies_heads_last(x, dtype) -> bool:
    """Whether the kernels' heads-last variant reads ``x`` [B, H, N, D] where it lies."""
    return _lies_as_is(x.transpose(1, 2), dtype)


def heads_last_copy(x, dtype, name: str, target: Target) -> torch.Tensor:
    """``x`` [B, H, N, D] as a contiguous [B, N, H, D] tensor of ``dtype``, in kept
    workspace memory (``name``, as ``padded``'s copies) where the target reuses it."""
    B, H, N, D = x.shape
    if not target.reuses_workspace:
        return x.transpose(1, 2).to(dtype).contiguous()
    buf = WORKSPACE.get(f"{name}:{dtype}{HEADS_LAST_COPY}", B, N, H, D, dtype=dtype,
                        device=x.device, target=target)
    return buf.copy_(x.transpose(1, 2))


def _unmasked(Np: int, b: int, dt, dev, keep: bool):
    """The mask [1, Np] of ones and its counts, b and 1/b per block, [1, Np / b]: the
    same for every call of a length, so made once where the target keeps memory between
    calls (``keep``, CPU: three small tensors a call cost ~40 us; ``kept_constants``).
    Only the kernels read them (inputs, never written), and nothing hands them out."""
    n = Np // b
    return kept_constants(("unmasked", Np, b, dt, dev), lambda: (
        torch.ones(1, Np, dtype=dt, device=dev),
        torch.full((1, n), float(b), dtype=dt, device=dev),
        torch.full((1, n), 1.0 / b, dtype=dt, device=dev)), keep)


def copied_inputs() -> dict:
    """{address: (side, Np, Dp, dtype, heads_last)}: this thread's scratch copies of q,
    k, v ("q", "k", "v": ``padded``'s buffers "input_q:<dtype>", ..., [B*H, Np, Dp], and
    ``heads_last_copy``'s, [B, N, H, D]: ``heads_last`` True) in the shapes the last call
    made them, by the address the kernels read them at."""
    found = {}
    for key, (shape, view) in WORKSPACE.views.items():
        side = key.split(":", 1)[0].removeprefix("input_")
        if not key.startswith("input_") or side not in ("q", "k", "v"):
            continue
        if len(shape) == 3:
            found[view.data_ptr()] = (side, shape[1], shape[2], view.dtype, False)
        elif len(shape) == 4 and key.endswith(HEADS_LAST_COPY):
            found[view.data_ptr()] = (side, shape[1], shape[3], view.dtype, True)
    return found


def padded(x, Np: int, Dp: int, dtype, name: str, target: Target) -> torch.Tensor:
    """``pad`` of ``x`` [B, H, N, D] to [B*H, Np, Dp] of ``dtype``: ``x`` itself where it
    already is that, else a copy in kept workspace memory (``name``) where the target
    reuses it (CPU). Fresh copies had cost more in page faults than in copying: padding
    1024 keys to 8192 for cross-attention made the op 20-36 ms instead of 23, and the
    float16 forward's float32 copies of q, k, v at N = 8192 made it 50-53 ms instead of
    25 (the pages of a freed 25 MB tensor go back to the system and fault in again)."""
    B, H, N, D = x.shape
    # (one view: ``pad`` would make three calls of torch to return x)
    if (N, D) == (Np, Dp) and _lies_as_is(x, dtype):
        return x.view(B * H, N, D)
    if not target.reuses_workspace:
        return pad(x, Np - N, Dp - D, dtype)
    # (one buffer per dtype: a call's bf16 and float32 copies never share one)
    buf = WORKSPACE.get(f"{name}:{dtype}", B * H, Np, Dp, dtype=dtype, device=x.device,
                        target=target)
    buf.view(B, H, Np, Dp)[:, :, :N, :D].copy_(x)
    if N < Np:
        buf[:, N:].zero_()
    if D < Dp:
        buf[:, :N, D:].zero_()
    return buf


def _side_mask(real, N: int, Np: int, dt, b: int, target: Target | None = None,
               name: str = "side"):
    """One side's mask [B, Np] (``real`` [B, N] nonzero = real, padded with zeros) and
    its per-block counts and 1/(count + 1e-6), [B, Np / b]. With a ``target`` that
    reuses its workspace, in this thread's scratch (``side_mask_into``; ``name``: its
    buffers' prefix, one per side), so that the launch cache can replay masked calls;
    else fresh tensors."""
    if target is not None and target.reuses_workspace:
        B, n = real.shape[0], Np // b
        get = WORKSPACE.get
        maskf = get(f"{name}_mask", B, Np, dtype=dt, device=real.device, target=target)
        counts = get(f"{name}_counts", B, n, dtype=dt, device=real.device, target=target)
        inv_counts = get(f"{name}_inv_counts", B, n, dtype=dt, device=real.device,
                         target=target)
        side_mask_into(real, maskf, counts, inv_counts, b)
        return maskf, counts, inv_counts
    maskf = F.pad(real.to(dt), (0, Np - N)).contiguous()
    counts = maskf.view(maskf.shape[0], Np // b, b).sum(-1).contiguous()
    return maskf, counts, (1.0 / (counts + 1e-6)).contiguous()


def side_mask_into(real, maskf, counts, inv_counts, b: int) -> None:
    """``_side_mask``'s three tensors written in place: ``real`` [B, N] (nonzero = real)
    into ``maskf`` [B, Np] (zeros after N), its block counts ``counts`` [B, Np / b] and
    ``inv_counts`` = 1 / (counts + 1e-6) (the same values as the fresh tensors: ``1.0 /
    x`` is torch's reciprocal)."""
    N = real.shape[1]
    maskf[:, :N].copy_(real)
    maskf[:, N:].zero_()
    torch.sum(maskf.view(maskf.shape[0], -1, b), -1, out=counts)
    torch.add(counts, 1e-6, out=inv_counts)
    inv_counts.reciprocal_()


def _prepare_cross(q, k, v, mask, query_mask, Np: int, Dp: int, dt, io, common: dict) -> Prepared:
    """Cross-attention (docs/spec.md, "Extensions"): q [B, H, Nq, D]; k, v [B, Hkv, Nk, D];
    mask [B, Nk] (keys) and query_mask [B, Nq], each None for all real; the rest as
    ``prepare`` derived it (``common``: Prepared's shared fields; ``Np``: the queries'
    padded length).

    Each side is padded to whole blocks of its own (the spec's nq x nk grid), each side's
    padding masked in its own mask: a short query side against long keys costs the
    queries' blocks, not the keys' (before 2026-12-08 both sides were padded to the
    longer one)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    b, target = common["block_size"], common["target"]
    Npk = -(-Nk // b) * b
    # docs/spec.md, step 1, on each side that has a mask.
    if query_mask is not None:
        (q,) = clean_padding((q,), query_mask != 0, target.exact_plan)
    if mask is not None:
        k, v = clean_padding((k, v), mask != 0, target.exact_plan)
    qf = padded(q, Np, Dp, io, "input_q", target)
    kf, vf = (padded(x, Npk, Dp, io, name, target) for x, name in ((k, "input_k"), (v, "input_v")))

    def side(given, N, Ns, name):
        if given is None:  # (all real: the same for every call of this shape)
            return kept_constants(
                ("all real", B, N, Ns, b, dt, q.device),
                lambda: _side_mask(torch.ones(B, N, dtype=dt, device=q.device), N, Ns, dt, b),
                target.reuses_workspace)
        return _side_mask(given != 0, N, Ns, dt, b, target, name)

    # (in scratch of their own where the target reuses it: the launch cache rewrites them)
    maskf, counts, inv_counts = side(mask, Nk, Npk, "side")
    qmaskf, q_counts, q_inv_counts = side(query_mask, Nq, Np, "query_side")
    return Prepared(qf, kf, vf, maskf, counts, inv_counts, qmaskf, q_counts, q_inv_counts, H,
                    masked=mask is not None or query_mask is not None, **common)
