"""The torch custom ops (registered on ``import mra_compile``).

- ``mra::attention``: the public op. It is a composite of the two below
  (CompositeImplicitAutograd), so autograd, torch.compile and meta tensors see through it.
- ``mra::attention_inference``: the forward kernels of a call with nothing to
  differentiate; returns the output alone (the launches of an eager call, replayed).
- ``mra::attention_fwd``: the forward kernels; returns the output and what the backward
  needs (selected blocks, stabilisers, normalisers, low-resolution tensors).
- ``mra::attention_bwd``: the backward kernels, registered as attention_fwd's autograd.
  It is not differentiable: a second backward raises a clear error.

The public op differentiates through ``_Attention``, an ``autograd.Function`` in the
``setup_context`` form, so that ``torch.func.grad``/``vjp``/``jacrev`` work too
and ``vmap`` (batching rules: the vmapped dimension joins the batch). Each op has a fake
implementation that gives shapes for torch.compile and meta tensors; they also key
torch.compile's on-disk caches on this package's code (``compile_cache``).
AOTInductor packages are not keyed that way: they call ``mra::attention_fwd`` (or
``mra::attention_inference``) as it was when they were built, and a package whose node has
other outputs than the schema does not load. So their outputs stay as they are, and their
arguments only grow at the end, with defaults (``exact_out`` came so;
tests/test_torch_integration.py keeps both schemas).
The options after q, k, v, mask are those of ``mra_compile.options.Options``, in its
field order; the schemas are generated from it. The public op takes the query padding
mask of cross-attention (``query_mask``) last, so that calls written before it keep
their meaning; the internal ops take it after ``mask``.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from mra_compile import compile_cache, cuda_graphs, launch_cache, options, validate
from mra_compile.backward import mra_backward
from mra_compile.forward import Saved, exact_output_dtype, mra_forward
from mra_compile.inputs import HEAD_DIM_MULTIPLE, real_tokens
from mra_compile.memory import result_tensor
from mra_compile.options import Options
from mra_compile.targets import compute_dtype, of_device

_SAVED = "Tensor stats, Tensor pooled, Tensor logits, Tensor high_mask, Tensor rowmax, Tensor index"
SCHEMA = (f"(Tensor q, Tensor k, Tensor v, Tensor? mask, {options.schema(True)}, "
          "Tensor? query_mask=None) -> Tensor")
FWD_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? query_mask, "
              f"{options.schema(False)}, bool exact_out=False) -> (Tensor out, {_SAVED})")
INFERENCE_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? query_mask, "
                    f"{options.schema(False)}) -> Tensor")
BWD_SCHEMA = (f"(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? query_mask, "
              f"Tensor out, {_SAVED}, {options.schema(False)}) -> (Tensor dq, Tensor dk, Tensor dv)")


def _check_no_tangents(q, k, v) -> None:
    """Forward-mode AD has no formula here: the kernels would drop the inputs' tangents and
    ``torch.func.jvp`` would get a zero one, silently. A call whose q, k or v is a dual
    tensor (``torch.autograd.forward_ad``; ``jvp`` and ``jacfwd`` make them) is an error.
    (No dual level active: one read of an int.)"""
    if forward_ad._current_level < 0:  # (torch's own flag; -1 outside ``dual_level()``)
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"mra_compile: forward-mode AD is not supported ({name} carries a tangent: "
                "torch.func.jvp, jacfwd, torch.autograd.forward_ad); MRA-2 attention has no "
                "forward-mode formula: use reverse mode (backward, torch.func.grad, vjp, "
                "jacrev)")


def _checked(q, k, v, mask, query_mask, args) -> Options:
    """The options, validated, and the tensors checked against them (fake-safe)."""
    opts = options.parse(args)
    validate.check_tensors(q, k, v, mask, opts.enable_gqa, query_mask)
    validate.check_sizes(q, opts.block_size, k.shape[2])
    return opts


def _validated(q, k, v, mask, query_mask, args) -> Options:
    """``_checked``, and the device and the masks' values too (real tensors only)."""
    opts = _checked(q, k, v, mask, query_mask, args)
    validate.check_device(q)
    validate.check_mask_values(mask)
    validate.check_mask_values(query_mask, "query_mask")
    return opts


def _inference(q, k, v, mask, query_mask, args):
    """The output of an inference call, computed as usual."""
    opts = _validated(q, k, v, mask, query_mask, args)
    return mra_forward(q, k, v, mask, opts, query_mask=query_mask)


def _saved_shapes(q, k, opts: Options):
    """Shapes of attention_fwd's extra outputs (see mra_compile.forward.Saved)."""
    B, H, _, D = q.shape
    R = B * H
    # Each side padded to whole blocks of its own (cross-attention: nq != nk); the pooled
    # q̂, k̂, v̂ in one tensor of the longer (SymInts: no guard).
    nq, nk = opts.blocks(q.shape[2]), opts.blocks(k.shape[2])
    Np, Dp = nq * opts.block_size, -(-D // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    K = opts.max_blocks(nq, nk)
    dt = compute_dtype(q.dtype)
    return dt, [(3, R, Np), (3, R, torch.sym_max(nq, nk), Dp), (R, nq, nk), (R, nq, nk),
                (R, nq)], (R, K)


def _forward_kernels(q, k, v, mask, query_mask, args, save: bool = True,
                     exact_out: bool = False):
    """attention_fwd's computation: (out, *what the backward needs); with ``save=False``
    the output alone (its intermediates in scratch memory; the launches of a signature
    seen before replayed: ``launch_cache`` on the CPU, ``cuda_graphs`` on CUDA).
    ``exact_out``: see ``mra_forward``."""
    if _graphable(q, mask, query_mask):
        masks = _graph_masks(q, k, v, mask, query_mask, args)
        if not save:
            return _through_graphs("inference", args, (q, k, v), masks,
                                   lambda q_, k_, v_, m, qm: _inference(q_, k_, v_, m, qm, args))
        return _through_graphs(
            "forward", (args, exact_out), (q, k, v), masks,
            lambda q_, k_, v_, m, qm: _training_forward(q_, k_, v_, m, qm, args, exact_out))
    if not save:
        return launch_cache.inference(q, k, v, mask, query_mask, args, _inference)
    return _training_forward(q, k, v, mask, query_mask, args, exact_out)


def _graphable(q, mask, query_mask) -> bool:
    """Whether a call may go through ``cuda_graphs``: CUDA, not empty, its masks (if any)
    tensors on q's device (anything else, bad input included, goes the usual way, which
    checks it)."""
    return (isinstance(q, torch.Tensor) and q.is_cuda and q.numel() > 0
            and all(m is None or (type(m) is torch.Tensor and m.device == q.device)
                    for m in (mask, query_mask)))


def _graph_masks(q, k, v, mask, query_mask, args) -> tuple:
    """(mask, query_mask) as a call's CUDA graph takes them: checked as the usual path
    checks them (shapes, then values: a read on the host, except for bool masks, whose
    values need no check), then as bool ``[B, N]`` (True: a real token; an SDPA-shaped
    ``[B, 1, 1, N]`` mask's keys). The usual path computes the same from those as from
    the masks given (it takes ``mask != 0``, the additive form's ``== 0``), and reads
    bool masks' values nowhere: the captured call makes no host read (a capture may
    not), and each replay reads the call's own masks."""
    if mask is None and query_mask is None:
        return None, None
    _validated(q, k, v, mask, query_mask, args)
    return real_tokens(mask), real_tokens(query_mask)


def _through_graphs(kind: str, options, tensors: tuple, masks: tuple, fn):
    """``fn(*tensors, mask, query_mask)`` through ``cuda_graphs``: the masks present are
    graph inputs after ``tensors`` (which of them are is part of the signature)."""
    present = tuple(m is not None for m in masks)
    count = len(tensors)

    def call(*given):
        rest = iter(given[count:])
        return fn(*given[:count], *(next(rest) if p else None for p in present))
    return cuda_graphs.run(kind, (options, present), tensors + tuple(m for m in masks
                                                                     if m is not None), call)


def _training_forward(q, k, v, mask, query_mask, args, exact_out: bool):
    """(out, *what the backward needs) of a forward that saves them."""
    opts = _validated(q, k, v, mask, query_mask, args)
    out, s = mra_forward(q, k, v, mask, opts, save=True, query_mask=query_mask,
                         exact_out=exact_out)
    if s is None:  # B*H == 0
        dt, shapes, index_shape = _saved_shapes(q, k, opts)
        return (out, *(q.new_zeros(sh, dtype=dt) for sh in shapes),
                q.new_zeros(index_shape, dtype=torch.int64))
    return out, s.stats, s.pooled, s.logits, s.high_mask, s.rowmax, s.index


@torch.library.custom_op("mra::attention_fwd", mutates_args=(), schema=FWD_SCHEMA)
def attention_fwd(q, k, v, mask, query_mask, *args):
    """The forward kernels; returns (out, *what the backward needs). The last argument,
    ``exact_out`` (after the options): whether ``out`` is the output before its rounding
    to q's dtype (float32 for half-precision inputs: ``exact_output_dtype``),
    which the backward reads and the caller rounds; False where no backward will read it
    (inference graphs), and by default (AOTInductor packages built before it existed)."""
    _check_no_tangents(q, k, v)
    args, exact_out = _split_exact(args)
    return _forward_kernels(q, k, v, mask, query_mask, args, exact_out=exact_out)


def _split_exact(args: tuple) -> tuple[tuple, bool]:
    """attention_fwd's arguments after query_mask: (the options, exact_out)."""
    n = options.count()
    return args[:n], bool(args[n]) if len(args) > n else False


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, query_mask, *args):
    compile_cache.key_compiled_graphs()
    args, exact_out = _split_exact(args)
    opts = _checked(q, k, v, mask, query_mask, args)
    dt, shapes, index_shape = _saved_shapes(q, k, opts)
    out_dtype = exact_output_dtype(q.dtype) if exact_out else q.dtype
    out = torch.empty_like(q, dtype=out_dtype, memory_format=torch.contiguous_format)
    return (out, *(q.new_empty(sh, dtype=dt) for sh in shapes),
            q.new_empty(index_shape, dtype=torch.int64))


torch.library.define("mra::attention_inference", INFERENCE_SCHEMA)


@torch.library.impl("mra::attention_inference", "CompositeExplicitAutograd")
def attention_inference(q, k, v, mask, query_mask, *args, **kwargs):
    """The forward kernels of a call with nothing to differentiate (compiled inference
    graphs, calls under a dispatch mode or on meta tensors): the output alone, as a plain
    eager call computes it (its intermediates in scratch memory, the launches of a
    signature seen before replayed), laid out as its fake says (``_in_layout_of``).
    attention_fwd there had run the training forward: the backward's tensors written, no
    launch replayed, transposed inputs copied; 1.12x the time of an eager call at N =
    4096, 1.51x at 512, 1.44x with an attention layer's views at 4096 (now 1.05x, 1.16x,
    1.01x: bench/results/compiled_cpu.md). No autograd formula: the public op takes
    attention_fwd where a gradient is needed. (``torch.library.define``, not
    ``custom_op``: its call costs ~2.5 us here against ~9 us, several times that after
    the kernels' traffic.)"""
    _check_no_tangents(q, k, v)
    args = _parsed(args, kwargs).as_args()
    return _in_layout_of(q, _forward_kernels(q, k, v, mask, query_mask, args, save=False))


@torch.library.register_fake("mra::attention_inference")
def _attention_inference_fake(q, k, v, mask, query_mask, *args, **kwargs):
    compile_cache.key_compiled_graphs()
    _checked(q, k, v, mask, query_mask, _parsed(args, kwargs).as_args())
    return torch.empty_like(q)


def _parsed(args: tuple, kwargs: dict) -> Options:
    """The options of a ``torch.library.define``d op's call (the dispatcher passes some
    as keywords, and may leave out trailing defaults)."""
    return Options(*args, **kwargs) if kwargs else options.parse(args)


def _needs_grad(q, k, v) -> bool:
    """Whether a call has something to differentiate (else: ``attention_inference``)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def _in_layout_of(q, out):
    """``out`` (q's shape) laid out as ``torch.empty_like(q)`` is: q's own strides where q
    is dense (an attention layer's transposed [B, N, H, D] view: the layout the kernels
    write for it where they read it in place), else contiguous; copied where the kernels
    wrote another (a padded or converted input's output is contiguous). A compiled graph
    reads the output by its fake's strides."""
    if out.stride() == q.stride():  # (then q is dense: empty_like gives it q's strides)
        return out
    want = torch.empty_like(q, device="meta").stride()  # (the fake's own rule)
    if out.stride() == want:
        return out
    # (the copy on kept memory, as a result is: ``memory.result_tensor``)
    order = sorted(range(q.dim()), key=lambda d: (-want[d], d))  # outermost first
    made = result_tensor(tuple(q.shape[d] for d in order), out.dtype, out.device,
                         of_device(out.device)).permute(*sorted(range(q.dim()),
                                                                key=order.__getitem__))
    if made.stride() != want:  # (ties of dims of size 1)
        made = torch.empty_strided(q.shape, want, dtype=out.dtype, device=out.device)
    return made.copy_(out)


@torch.library.custom_op("mra::attention_bwd", mutates_args=(), schema=BWD_SCHEMA)
def attention_bwd(grad, q, k, v, mask, query_mask, out, stats, pooled, logits, high_mask, rowmax,
                  index, *args):
    """Gradients of q, k, v (the selection and stabilisers held constant). ``out``: the
    forward's, before its rounding where it was asked for that (``exact_out``)."""
    tensors = (grad.contiguous(), q, k, v, out, stats, pooled, logits, high_mask, rowmax, index)
    if _graphable(q, mask, query_mask):
        masks = _graph_masks(q, k, v, mask, query_mask, args)
        return _through_graphs("backward", args, tensors, masks,
                               lambda *t: _backward_kernels(args, t[:-2], *t[-2:]))
    return _backward_kernels(args, tensors, mask, query_mask)


def _backward_kernels(args, tensors, mask=None, query_mask=None):
    """attention_bwd's computation; ``tensors``: (grad, q, k, v, out, *Saved's)."""
    grad, q, k, v, out, *saved = tensors
    return mra_backward(grad, q, k, v, mask, out, Saved(*saved), Options(*args),
                        query_mask=query_mask)


@attention_bwd.register_fake
def _attention_bwd_fake(grad, q, k, v, mask, query_mask, out, stats, pooled, logits, high_mask,
                        rowmax, index, *args):
    compile_cache.key_compiled_graphs()
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, query_mask, *args = inputs
    ctx.save_for_backward(q, k, v, mask, query_mask, *output)
    ctx.options = _split_exact(tuple(args))[0]
    ctx.arg_count = len(inputs)


class _OnceDifferentiable(torch.autograd.Function):
    """Passes the gradients ``grads`` through (``anchors``: the inputs they depend on);
    differentiating them again raises a clear error."""

    generate_vmap_rule = True  # (jacrev vmaps the backward)

    @staticmethod
    def forward(grads, *anchors):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "mra_compile: differentiating MRA-2 attention twice (create_graph=True, then a "
            "second backward, or nested torch.func.grad) is not supported")


def _backward(ctx, grad_out, *_unused):
    q, k, v, mask, query_mask, out, *saved = ctx.saved_tensors
    with torch.no_grad():
        grads = torch.ops.mra.attention_bwd(grad_out, q, k, v, mask, query_mask, out, *saved,
                                            *ctx.options)
    if torch.is_grad_enabled():  # create_graph=True: a second backward would come here
        grads = _OnceDifferentiable.apply(tuple(grads), q, k, v, grad_out)
    return *grads, *(None for _ in range(ctx.arg_count - 3))


torch.library.register_autograd("mra::attention_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- batching rules (vmap)
# ``torch.func.vmap`` over the op (per-sample gradients: ``vmap(grad(f))``; ``jacrev``,
# which vmaps the backward): the vmapped dimension joins the batch, one call of the
# kernels for the whole batch (torch's fallback otherwise calls the op once per element,
# with a warning). Every tensor argument and output has its rows (batch, or batch x
# heads) at a known dimension; a sequence's own budget comes from its own mask, so
# folding changes nothing per row.

# The dimension of each tensor argument (by position) and output that holds the batch
# (q, k, v, grad, out, masks) or the rows (B * heads: what ``Saved`` holds); the options
# are not folded.
_SAVED_ROWS = (1, 1, 0, 0, 0, 0)  # stats, pooled, logits, high_mask, rowmax, index
_FWD_ROWS = dict(enumerate((0, 0, 0, 0, 0)))  # q, k, v, mask, query_mask
_BWD_ROWS = dict(enumerate((0, 0, 0, 0, 0, 0, 0, *_SAVED_ROWS)))  # grad, q, k, v, mask,
#                                                                   query_mask, out, ...


def _fold(x, dim, at: int, size: int):
    """``x`` with its vmapped dimension ``dim`` (None: not vmapped, the same for every
    element) merged into its dimension ``at``, the vmapped index outermost: [.., V*B, ..],
    contiguous (the backward's saved tensors go to the kernels as they are; a shared one,
    expanded, is a view with stride 0 where its own dimension ``at`` has size 1)."""
    if x is None:
        return None
    if dim is None:
        x = x.unsqueeze(at).expand(*x.shape[:at], size, *x.shape[at:])
    else:
        x = x.movedim(dim, at)
    return x.reshape(*x.shape[:at], size * x.shape[at + 1], *x.shape[at + 2:]).contiguous()


def _unfold(x, at: int, size: int):
    """``_fold`` undone: [.., V*B, ..] at ``at`` -> [.., V, B, ..], vmapped at ``at``."""
    return x.reshape(*x.shape[:at], size, x.shape[at] // size, *x.shape[at + 1:])


def _batched(op, rows_in: dict, rows_out):
    """A batching rule for ``op``: the arguments at the positions of ``rows_in`` folded
    (their rows at its values; the others, the options, as they are), one call, the
    outputs unfolded (``rows_out``). The arguments come as the caller gave them."""
    def rule(info, in_dims, *args, **kwargs):
        size = info.batch_size
        folded = [_fold(x, d, rows_in[i], size) if i in rows_in else x
                  for i, (x, d) in enumerate(zip(args, in_dims))]
        out = op(*folded, **kwargs)
        if isinstance(out, torch.Tensor):
            return _unfold(out, rows_out[0], size), rows_out[0]
        return (tuple(_unfold(x, at, size) for x, at in zip(out, rows_out)), tuple(rows_out))
    return rule


torch.library.register_vmap("mra::attention_fwd", _batched(
    torch.ops.mra.attention_fwd, _FWD_ROWS, (0, *_SAVED_ROWS)))
torch.library.register_vmap("mra::attention_inference", _batched(
    torch.ops.mra.attention_inference, _FWD_ROWS, (0,)))
torch.library.register_vmap("mra::attention_bwd", _batched(
    torch.ops.mra.attention_bwd, _BWD_ROWS, (0, 0, 0)))


class _Attention(torch.autograd.Function):
    """attention_fwd with its backward, in the form torch.func transforms accept."""

    generate_vmap_rule = True  # (vmap goes through to attention_fwd's and _bwd's rules)

    @staticmethod
    def forward(q, k, v, mask, query_mask, *args):
        return torch.ops.mra.attention_fwd(q, k, v, mask, query_mask, *args, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_out, *grads):
        return _backward(ctx, grad_out, *grads)


torch.library.define("mra::attention", SCHEMA)


@torch.library.impl("mra::attention", "CompositeImplicitAutograd")
def attention(q, k, v, mask, *args, query_mask=None, **kwargs):
    """MRA-2 attention (see ``mra_compile.mra_attention`` for the arguments)."""
    _check_no_tangents(q, k, v)
    if len(args) > options.count():  # query_mask given by position
        args, query_mask = args[:options.count()], args[options.count()]
    opts = _parsed(args, kwargs)
    if _plain_call(q, k, v, mask, query_mask):
        return _forward_kernels(q, k, v, mask, query_mask, opts.as_args(), save=False)
    # (False in torch.compile's inference graphs: nothing there requires a gradient)
    if not _needs_grad(q, k, v):
        return torch.ops.mra.attention_inference(q, k, v, mask, query_mask, *opts.as_args())
    return _rounded(torch.ops.mra.attention_fwd(q, k, v, mask, query_mask, *opts.as_args(),
                                                True)[0], q)


# (q, k, v, mask, then the options, then query_mask where given by position)
torch.library.register_vmap("mra::attention", _batched(
    torch.ops.mra.attention, {0: 0, 1: 0, 2: 0, 3: 0, 4 + options.count(): 0}, (0,)))


def _rounded(out, q):
    """attention_fwd's output in q's dtype (see its ``exact_out``)."""
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _plain_call(*tensors) -> bool:
    """Whether this call of the public op may run the kernels directly instead of
    dispatching ``mra::attention_fwd`` again: eager, nothing to differentiate, plain CPU
    or CUDA tensors, and nothing that watches or transforms ops (dispatch or function
    modes, functorch transforms, forward-mode AD's dual level, the JIT tracer; the op's
    entries refuse a tangent: ``_check_no_tangents``). The second dispatch (the custom op's
    Python wrappers and autograd kernel) gives the same result there, at ~30 us a call
    warm and 100-200 us after other heavy torch work (N = 4096, 2 cores): 10-20% of the
    op at N = 512."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or forward_ad._current_level >= 0):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or not (t.is_cpu or t.is_cuda):
            return False
        if grad and t.requires_grad:
            return False
    return True


def differentiable(q, k, v, mask, opts: Options, query_mask=None) -> torch.Tensor:
    """The op as ``mra_compile.mra_attention`` calls it: the same kernels; in eager mode
    through ``_Attention``, so that torch.func transforms work on it (directly where
    ``_plain_call`` allows); under torch.compile as ``mra::attention`` (Dynamo does not
    trace an autograd.Function given one tensor twice, as self-attention does). With
    nothing to differentiate (e.g. under ``vmap`` alone, or a dispatch mode) it is the
    public op too: the inference forward, as a plain call computes it (``_Attention``
    computes the training forward, whose half-precision output differs in its rounding:
    on the CPU it takes P v in float32)."""
    if torch.compiler.is_compiling():
        return torch.ops.mra.attention(q, k, v, mask, *opts.as_args(), query_mask=query_mask)
    if _plain_call(q, k, v, mask, query_mask):
        return _forward_kernels(q, k, v, mask, query_mask, opts.as_args(), save=False)
    if not _needs_grad(q, k, v):
        return torch.ops.mra.attention(q, k, v, mask, *opts.as_args(), query_mask=query_mask)
    return _rounded(_Attention.apply(q, k, v, mask, query_mask, *opts.as_args())[0], q)
