"""The ``mra-compile`` command line: one function per subcommand, ``main`` dispatches.

    mra-compile info [--shape 12x4096x64]
    mra-compile tune [--target llvm] [--ops ...] [--shapes ...] [--budget-seconds S] [--db PATH]
                     [--search random|exhaustive]
    mra-compile demo [demo arguments, e.g. --seq-len 4096 --mode sparse]
    mra-compile bench [--sizes 512 1024 ...] [--repeat 7] [--plot]
    mra-compile build --out DIR [--target llvm|cuda] [--arch sm_90] [--head-dims ...] [...]

To add a subcommand: write ``_add_<name>(subparsers)`` that registers its arguments and
``set_defaults(func=_cmd_<name>)``, a ``_cmd_<name>(args) -> int`` returning the exit code,
and list the adder in ``_SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------- info

def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, cache, tuning records and the knobs in use",
                       description="Show versions, the kernel cache, the tuning records in use "
                                   "and the knobs each operator would use now.")
    p.add_argument("--shape", default=None, metavar="BHxNxD",
                   help="show the knobs for this call shape (N, or BHxNxD, e.g. 12x4096x64); "
                        "default: those a caller without a shape gets (the nearest record)")
    p.set_defaults(func=_cmd_info)


def _cuda_line() -> str:
    """GPUs torch sees, and whether CUDA kernels can be built here (nvcc)."""
    import shutil

    import torch

    from mra_compile import cuda_toolchain

    if torch.cuda.is_available():
        gpus = ", ".join(f"{torch.cuda.get_device_name(i)} (sm_"
                         f"{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                         for i in range(torch.cuda.device_count()))
    else:
        gpus = "no GPU visible to torch"
    nvcc = (f"nvcc {cuda_toolchain.nvcc_version()} (mra-compile build --target cuda works)"
            if shutil.which("nvcc") else "no nvcc (CUDA kernels can only come from a library)")
    return f"{gpus}; {nvcc}"


def _cmd_info(args) -> int:
    from mra_compile import host, library, native_replay, openmp, records, targets, tuning
    from mra_compile.targets import cpu as cpu_target

    bucket = None
    if args.shape:
        try:
            bucket = tuning.Shape.parse(args.shape).bucket
        except ValueError as e:
            print(f"mra-compile info: {e}", file=sys.stderr)
            return EXIT_USAGE
    import mra_compile

    print(f"mra-compile {mra_compile.__version__}")
    print(f"python {platform.python_version()}, torch {_version('torch')}, "
          f"apache-tvm {_version('apache-tvm')}, apache-tvm-ffi {_version('apache-tvm-ffi')}")
    print(f"host: {host.host_fingerprint()} (vector width {host.default_vector_width()} floats)")
    cache = host.cache_dir()
    count = len(list(cache.glob("*.so"))) if cache.is_dir() else 0
    print(f"kernel cache: {cache} ({count} kernels)")
    print(f"cuda: {_cuda_line()}")
    print(f"CPU kernels' parallel loops: {openmp.status()}")
    print(f"launch cache replays: {native_replay.status()}")
    print(f"CPU half precision: {cpu_target.half_precision()}")

    for directory in library.directories():
        try:
            manifest = json.loads((Path(directory) / library.MANIFEST).read_text())
            state = f"target {manifest.get('target')}, {len(manifest.get('kernels', []))} kernels"
        except (OSError, ValueError):
            state = "no readable manifest"
        print(f"kernel library ({library.ENV}): {directory} ({state})")
    print("tuning records (first match wins):")
    for label, path in (("user db", records.user_db_path()),
                        ("shipped (in the package, read-only)", records.shipped_db_path())):
        if path.exists():
            usable = records.records_in(path)
            cpu = sum(r["target"] == targets.CPU.name for r in usable)
            state = (f"{cpu} records for this CPU and TVM version"
                     + (f", {len(usable) - cpu} for CUDA architectures" if len(usable) > cpu else ""))
        else:
            state = "absent"
        print(f"  {label}: {path} ({state})")
    if os.environ.get(records.ENV_ENABLE, "1") == "0":
        print(f"  (ignored: {records.ENV_ENABLE}=0)")
    print(f"  mra-compile tune writes to: {records.default_write_path()}")
    where = f"bucket {bucket}" if bucket else f"no shape given: nearest to {records.REFERENCE_BUCKET}"
    print(f"knobs in use ({where}):")
    for op in records.tunable_ops():
        chosen = tuning.chosen_knobs(op, bucket)
        knobs = " ".join(f"{k}={tuning.fmt(v)}" for k, v in chosen.knobs.items())
        source = "default" if chosen.source == "default" else f"record {chosen.bucket} in {chosen.source}"
        print(f"  {op:<16} {knobs}  [{source}]")
    return EXIT_OK


# ---------------------------------------------------------------------------- tune

def _add_tune(sub) -> None:
    from mra_compile import tuning

    p = sub.add_parser("tune", help="autotune the schedule knobs and write tuning records",
                       description="Search the schedule knobs of each operator for the fastest on "
                                   "this machine and write them as tuning records, which the op "
                                   "then uses automatically.")
    from mra_compile import targets

    p.add_argument("--target", default=targets.CPU.name, choices=[targets.CPU.name],
                   help="compilation target (only the CPU, llvm, for now)")
    p.add_argument("--ops", nargs="+", default=list(tuning.OPS), choices=list(tuning.OPS),
                   metavar="OP", help="operators to tune (default: all: %(default)s)")
    p.add_argument("--shapes", nargs="+", default=[str(s) for s in tuning.DEFAULT_SHAPES],
                   metavar="SHAPE", help="N or BHxNxD per shape bucket (default: %(default)s)")
    p.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                   help=f"search time budget (default: {tuning.DEFAULT_BUDGET_S:g} s for random "
                        "search, unlimited for exhaustive)")
    p.add_argument("--db", default=None, metavar="PATH",
                   help="records file to write (default: the user db, $MRA_COMPILE_TUNE_DB "
                        "else ~/.cache/mra_compile/tuned.json; the records shipped in the "
                        "package are read-only unless this names their file)")
    p.add_argument("--search", default="random", choices=["random", "exhaustive"],
                   help="random sampling with local refinement, or every point in order")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved timing rounds per comparison (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="tune and print, write no records")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (search, verification, kernel compiles)")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from mra_compile import progress, tuning

    try:
        shapes = [tuning.Shape.parse(s) for s in args.shapes]
    except ValueError as e:
        print(f"mra-compile tune: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.budget_seconds is not None and args.budget_seconds < 0 or args.rounds < 1:
        print("mra-compile tune: --budget-seconds must be >= 0 and --rounds >= 1", file=sys.stderr)
        return EXIT_USAGE
    budget = args.budget_seconds
    if budget is None and args.search == "random":
        budget = tuning.DEFAULT_BUDGET_S
    try:
        with progress.silenced(args.quiet):
            result = tuning.tune(args.ops, shapes, budget_seconds=budget, db=args.db,
                                 search=args.search, seed=args.seed, rounds=args.rounds,
                                 progress=not args.quiet, write=not args.dry_run)
    except OSError as e:
        print(f"mra-compile tune: cannot write the records: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(result.table())
    print(f"{len(result.trials)} measured candidates in {result.seconds:.1f} s "
          f"(median of {args.rounds} interleaved rounds each; table: 15 rounds)")
    if result.db is not None:
        print(f"wrote {len(result.records)} records to {result.db}")
    else:
        print("dry run: no records written")
    return EXIT_OK


# ---------------------------------------------------------------------------- demo

def _add_demo(sub) -> None:
    # Every argument goes to mra_compile.tools.demo untouched (prefix_chars: no option is ours).
    p = sub.add_parser("demo", help="build the kernels and compare MRA-2 with exact attention",
                       description="Run mra_compile.tools.demo; arguments pass through "
                                   "(mra-compile demo --help lists them).",
                       add_help=False, prefix_chars="\0")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from mra_compile.tools import demo

    try:
        return demo.main(args.demo_args, prog="mra-compile demo")
    except SystemExit as e:  # the demo's argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE


# ---------------------------------------------------------------------------- bench

def _add_bench(sub) -> None:
    from mra_compile.tools import benchmarks

    p = sub.add_parser("bench", help="time the op against the fallback, reference and SDPA",
                       description=benchmarks.__doc__.split("\n\n")[0].replace("\n", " ")
                       + f" --plot also writes {benchmarks.TIME_PLOT} and "
                       f"{benchmarks.ERROR_PLOT}.")
    benchmarks.add_arguments(p, out_dir="bench/results")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from mra_compile.tools import benchmarks

    problem = benchmarks.check_arguments(args)
    if problem:
        print(f"mra-compile bench: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return benchmarks.run(args)
    except ImportError as e:  # --plot without matplotlib
        print(f"mra-compile bench: {e}", file=sys.stderr)
        return EXIT_FAILURE


# ---------------------------------------------------------------------------- main

def _add_build(sub) -> None:
    from mra_compile import aot, targets

    p = sub.add_parser(
        "build", help="compile every kernel ahead of time into one library + manifest",
        description="Compile every operator (forward and backward) for the given block sizes, "
        "head dims and dtypes into DIR/mra_kernels.so with DIR/manifest.json. Set "
        "MRA_COMPILE_KERNEL_LIBRARY=DIR and the op loads its kernels from there with the TVM "
        "runtime only. --target cuda compiles device code with nvcc (no GPU or driver "
        "needed) and copies TVM's runtime libraries to DIR/runtime/.")
    p.add_argument("--target", choices=targets.BUILD_KINDS, default=targets.CPU.name,
                   help="llvm: this CPU (default); cuda: NVIDIA GPUs of --arch (default: "
                   "%(default)s)")
    p.add_argument("--arch", default="sm_90",
                   help="GPU architecture for --target cuda, e.g. sm_80, sm_90 "
                   "(default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--block-sizes", type=int, nargs="+", default=list(aot.DEFAULT_BLOCK_SIZES),
                   metavar="B", help="block sizes to cover (default: "
                   f"{' '.join(map(str, aot.DEFAULT_BLOCK_SIZES))})")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(aot.DEFAULT_HEAD_DIMS),
                   metavar="D", help="head dims to cover, compiled padded to multiples of 16 "
                   f"(default: {' '.join(map(str, aot.DEFAULT_HEAD_DIMS))}); a call with a "
                   f"shape the library lacks warns and compiles it (an error with "
                   "MRA_COMPILE_LIBRARY_ONLY=1)")
    p.add_argument("--dtypes", nargs="+", default=None,
                   choices=("float32", "float64", "float16", "bfloat16"),
                   help="input dtypes (default: float32; with cuda: float32 float16 bfloat16). "
                   "On the CPU float16 adds the variants that read it in place (with F16C), "
                   "and bfloat16 its bf16 micro-kernel variants where the CPU has "
                   "AVX-512-BF16, else those that read it in place")
    p.add_argument("--float64", action="store_true", help="also the float64 kernels")
    p.add_argument("--grouped-heads", action="store_true",
                   help="also the grouped-query variants (enable_gqa=True with fewer key/value "
                   "heads) of the kernels that read k, v")
    p.add_argument("--tuning-variants", nargs="+", default=[], metavar="DTYPE:D",
                   help="also build the tunable kernels at every point of their search "
                   "space for inputs of DTYPE and head dim D (e.g. bfloat16:64), for a tuning "
                   "run where TVM is not installed (bench/gpu_check.py on a GPU)")
    p.add_argument("--wheel-for-python", nargs="+", default=[], metavar="X.Y",
                   help="also download the apache-tvm-ffi wheel (the version installed here) "
                   "for these Pythons into DIR/wheels/, for machines without TVM (needs PyPI)")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from mra_compile import aot, library, options, targets

    try:
        target = targets.for_build(args.target, args.arch)
    except ValueError as e:
        print(f"mra-compile build: {e}", file=sys.stderr)
        return EXIT_USAGE
    for b in args.block_sizes:
        if b < options.MIN_BLOCK_SIZE or b & (b - 1) or b > options.MAX_BLOCK_SIZE:
            print(f"mra-compile build: --block-sizes: {b} is not a power of two in "
                  f"[{options.MIN_BLOCK_SIZE}, {options.MAX_BLOCK_SIZE}]", file=sys.stderr)
            return EXIT_USAGE
    if any(d < 1 for d in args.head_dims):
        print("mra-compile build: --head-dims must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    tuning = []
    for item in args.tuning_variants:
        dtype, _, dim = item.partition(":")
        if dtype not in ("float32", "float64", "float16", "bfloat16") or not dim.isdigit() \
                or int(dim) < 1:
            print(f"mra-compile build: --tuning-variants: {item!r} is not DTYPE:D "
                  "(e.g. bfloat16:64)", file=sys.stderr)
            return EXIT_USAGE
        if int(dim) not in args.head_dims:
            print(f"mra-compile build: --tuning-variants: head dim {dim} is not in "
                  f"--head-dims {args.head_dims}", file=sys.stderr)
            return EXIT_USAGE
        tuning.append((dtype, int(dim)))
    dtypes = target.build_dtypes(args.dtypes)
    if args.float64:
        dtypes = list(dict.fromkeys([*dtypes, "float64"]))
    print(f"compiling for {target.name} into {args.out}:")
    try:
        manifest = aot.build_library(args.out, args.block_sizes, args.head_dims, dtypes,
                                     target=target, gqa=args.grouped_heads,
                                     tuning_variants=tuning)
    except RuntimeError as e:  # e.g. no nvcc, or TVM kept only CUDA source
        print(f"mra-compile build: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {Path(args.out) / library.LIBRARY} and {manifest}")
    for version in args.wheel_for_python:
        try:
            wheel = aot.download_ffi_wheel(args.out, version)
        except RuntimeError as e:
            print(f"mra-compile build: {e}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"wrote {wheel}")
    print(f"use it with: export {library.ENV}={Path(args.out).resolve()}")
    return EXIT_OK


_SUBCOMMANDS = (_add_info, _add_tune, _add_demo, _add_bench, _add_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mra-compile",
                                     description="MRA-2 attention compiled with Apache TVM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
