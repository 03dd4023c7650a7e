"""One kernel of the op against variants of it, on the arguments of a real call, in one process.

    python bench/ab_kernel.py --op hires_rows --n 8192 --dtype bfloat16 --mode sparse \\
        --old ~/.cache/mra_compile/hires_rows-<key>.so
    python bench/ab_kernel.py --op bwd_dkdv_ds_units --training --knobs '{"rows": 2}'

Records one call of the op (inference, or with ``--training`` a forward and backward)
with ``build.trace_kernel_calls`` and takes the arguments of ``--op``'s first launch.
The reference is that kernel as this checkout builds it (printed with its cache path:
note it before changing a schedule, then pass it as ``--old``: the cache keeps kernels
by source hash, so the file stays). Variants: ``--old`` kernel files (built by another
checkout, or before an edit) and ``--knobs`` (JSON schedule knobs over the recorded
ones, built here). Each variant first runs on copies of the arguments and is compared
with the reference bit for bit (every tensor argument, outputs included); then all are
timed in interleaved rounds, the order reversed every other round
(``tools.common.median_ms``; median ms and the ratio to the reference), beside a control:
the reference's own file loaded a second time from a copy (``--no-control``: not), whose
ratio is the noise floor (two loads of one kernel: up to 3% apart on a Zen 5).
``--cold``: each timed call right after a read of 64 MB (twice this host's L3), as in the
op, where a kernel's inputs come from memory (back to back, part of them stays in L3).

Every kernel is loaded as the op loads it: from an exported file, through
``Target.after_load`` (the CPU target installs the OpenMP launcher that runs parallel
loops on torch's threads). A kernel compiled in-process, or loaded without that step,
runs its parallel loops on TVM's own thread pool, 1.5-2x slower here: comparing it with
a properly loaded one measures the loading, not the schedule.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile import build, targets  # noqa: E402
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import machine_line  # noqa: E402


def recorded_call(args):
    """The first recorded launch of ``args.op`` in one call of the op (a dict of
    ``build.trace_kernel_calls``)."""
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    shape = (1, args.heads, args.n, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=args.training) for _ in range(3))
    num_blocks = args.blocks_per_row * (-(-args.n // 32))

    def call():
        out = torch.ops.mra.attention(q, k, v, None, num_blocks, args.mode)
        if args.training:
            out.backward(torch.randn(shape, dtype=dtype))

    with torch.set_grad_enabled(args.training):
        call()  # (builds or loads the kernels, fills the workspace)
        with build.trace_kernel_calls() as calls:
            call()
    for c in calls:
        if c["op"] == args.op:
            return c
    ops = sorted({c["op"] for c in calls})
    raise SystemExit(f"ab_kernel: --op {args.op!r} is not launched by this call; it launches "
                     f"{ops} (backward kernels need --training)")


CONTROL = "control: this checkout's file, loaded again"


def load(path: Path, target):
    """The kernel in the exported file ``path``, loaded as ``build`` loads the op's."""
    import tvm_ffi

    module = tvm_ffi.load_module(str(path))
    target.after_load(path)
    return target.wrap_kernel(module["main"])


def copies(xs):
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in xs]


def differences(ref, got) -> list[str]:
    """Each tensor argument that differs in its bits: position, shape, largest |diff|."""
    out = []
    for i, (a, b) in enumerate(zip(ref, got)):
        if not isinstance(a, torch.Tensor):
            continue
        if a.dtype.is_floating_point:
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            same = torch.equal(a.view(bits), b.view(bits))
        else:
            same = torch.equal(a, b)
        if not same:
            diff = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()
            out.append(f"argument {i} {tuple(a.shape)} {a.dtype}: largest |diff| {diff:.3g}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", required=True, help="the kernel (e.g. hires_rows, bwd_finish)")
    p.add_argument("--n", type=int, default=4096, help="sequence length N")
    p.add_argument("--heads", type=int, default=12, help="B*H rows (B=1)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks-per-row", type=int, default=4)
    p.add_argument("--mode", choices=("full", "sparse"), default="full")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--training", action="store_true",
                   help="record a forward and backward (for the backward's kernels)")
    p.add_argument("--old", type=Path, nargs="*", default=[], help="kernel files to compare")
    p.add_argument("--knobs", nargs="*", default=[],
                   help="JSON knobs over the recorded ones, each a variant built here")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-control", action="store_true",
                   help="leave out the control (this checkout's kernel file loaded a second time)")
    p.add_argument("--cold", action="store_true",
                   help="evict the caches (a 64 MB read) before each timed call")
    args = p.parse_args(argv)
    if not args.old and not args.knobs:
        p.error("give at least one variant: --old FILE or --knobs JSON")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    for path in args.old:
        if not path.is_file():
            p.error(f"--old {path}: no such file")
    try:
        overrides = [json.loads(k) for k in args.knobs]
    except ValueError as e:
        p.error(f"--knobs: not JSON ({e})")
    if not all(isinstance(k, dict) for k in overrides):
        p.error("--knobs: each must be a JSON object, e.g. '{\"rows\": 2}'")

    call = recorded_call(args)
    target = targets.get(call["target"])
    knobs = call["resolved"]  # (the knobs it was built with)
    kernels = {"this checkout": build.kernel(args.op, knobs, target, **call["static"])}
    path = next((e["path"] for e in build.cache_events() if e["op"] == args.op
                 and e["static"] == call["static"] and e["knobs"] == knobs), None)
    if path is not None and not args.no_control:
        # The same file loaded again from a copy (another mapping, other addresses): two
        # loads of one kernel differed by up to 3% here (Zen 5), so a variant's ratio means
        # something only beyond the control's.
        with tempfile.TemporaryDirectory(prefix="ab_kernel_") as tmp:  # (loaded: mapped)
            control = Path(tmp) / Path(path).name
            shutil.copyfile(path, control)
            kernels[CONTROL] = load(control, target)
    for path_ in args.old:
        kernels[str(path_)] = load(path_, target)
    for over in overrides:
        kernels[json.dumps(over, sort_keys=True)] = build.kernel(
            args.op, {**knobs, **over}, target, **call["static"])

    print(machine_line())
    print(f"{args.op}: N={args.n} B*H={args.heads} D={args.head_dim} {args.blocks_per_row} "
          f"blocks/row, {args.mode}, {args.dtype}{', training' if args.training else ''}; "
          f"{json.dumps(call['static'], sort_keys=True)}; knobs {json.dumps(knobs, sort_keys=True)}")
    print(f"this checkout's kernel: {path}")
    reference = None
    for name, fn in kernels.items():
        got = copies(call["args"])
        fn(*got)
        if reference is None:
            reference = got
            continue
        diffs = differences(reference, got)
        print(f"  {name}: " + ("the same bits" if not diffs else "differs: " + "; ".join(diffs)))

    for fn in kernels.values():
        fn(*call["args"])  # (warm)
    evict = None
    if args.cold:
        other = torch.ones(16 << 20)  # (64 MB; a read: large writes stream past L3)
        evict = other.sum
    timed = common.median_ms({name: (lambda f=fn: f(*call["args"])) for name, fn in kernels.items()},
                             args.rounds, alternate=True, before=evict)
    base = timed["this checkout"]
    for name, ms in timed.items():
        print(f"  {ms:9.3f} ms  {ms / base:6.3f}x  {name}")
    given = sys.argv[1:] if argv is None else argv
    print(f"(medians of {args.rounds} interleaved rounds; command: python bench/ab_kernel.py "
          f"{shlex.join(given)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
