"""Where a call of ``torch.ops.mra.attention`` spends its time on a GPU: host and device.

    python bench/gpu_profile.py --bundle bench/gpu_bundle --out $OUT     # the lent H200, ~1 min

For each N (B=1, H=16, D=64, bf16, 8 blocks per row, full mode): the host time of a
call (Python to the last launch, no synchronisation), the device time (CUDA events),
the Python functions that take the host time (cProfile, by own time), and the kernels
and torch operators of one forward and one forward+backward (torch.profiler, by device
time and by host time). Writes --out/profile.md and prints it. Uses the bundle as
``bench/gpu_check.py`` does (``gpu_check.bootstrap``).

With ``--one-step`` it runs a single training step (forward + backward, no CUDA graphs:
each kernel launched by itself) at N = 16384 between ``cudaProfilerStart`` and
``cudaProfilerStop``, after a warm-up step, for Nsight Compute (which reads the hardware
counters on the lent H200's Firecracker machines, 2026-11; with its clocks left alone):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        --csv python3 bench/gpu_profile.py --bundle bench/gpu_bundle --out $OUT --one-step \
        > $OUT/ncu.csv
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import gpu_check  # noqa: E402

DTYPE, D, H, BLOCKS_PER_ROW = torch.bfloat16, 64, 16, 8


def host_and_device_ms(fn, dev, calls: int = 20) -> tuple[float, float]:
    """(host ms per call: the calls queued back to back without a synchronisation,
    device ms per call: CUDA events around them)."""
    fn()
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / calls
    end.record()
    torch.cuda.synchronize(dev)
    return host, start.elapsed_time(end) / calls


def python_profile(fn, calls: int = 10, lines: int = 30) -> str:
    """cProfile of ``calls`` calls, the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def torch_profile(fn, dev, calls: int = 3) -> tuple[str, str]:
    """torch.profiler over ``calls`` calls: (by device time, by host time)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(dev)
    table = prof.key_averages()
    return (table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70),
            table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


def profile_size(N: int, mode: str, dev) -> list[str]:
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, g = (torch.randn(1, H, N, D, generator=gen, device=dev).to(DTYPE)
                  for _ in range(4))
    K = BLOCKS_PER_ROW * (N // 32)
    attention = torch.ops.mra.attention

    def forward():
        with torch.no_grad():
            attention(q, k, v, None, K, mode)

    def training():
        for x in (q, k, v):
            x.requires_grad_(True)
        out = attention(q, k, v, None, K, mode)
        torch.autograd.grad(out, (q, k, v), g)
        for x in (q, k, v):
            x.requires_grad_(False)

    lines = [f"## N={N}, {mode} mode", ""]
    for name, fn in (("forward", forward), ("forward+backward", training)):
        host, device = host_and_device_ms(fn, dev)
        lines += [f"### {name}: host {host:.3f} ms per call, device {device:.3f} ms per call",
                  "", "```", python_profile(fn).strip(), "```", ""]
        by_device, by_host = torch_profile(fn, dev)
        lines += ["by device time:", "```", by_device, "```", "by host time:", "```", by_host,
                  "```", ""]
    return lines


def one_step(dev, N: int = 16384, mode: str = "full") -> None:
    """A warm-up step, then one training step between cudaProfilerStart/Stop, every
    kernel launched by itself (``MRA_COMPILE_CUDA_GRAPHS=0``)."""
    os.environ["MRA_COMPILE_CUDA_GRAPHS"] = "0"
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, g = (torch.randn(1, H, N, D, generator=gen, device=dev).to(DTYPE)
                  for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    K = BLOCKS_PER_ROW * (N // 32)
    for profiled in (False, True):
        torch.cuda.synchronize(dev)
        if profiled:
            torch.cuda.profiler.start()
        out = torch.ops.mra.attention(*leaves, None, K, mode)
        torch.autograd.grad(out, leaves, g)
        torch.cuda.synchronize(dev)
        if profiled:
            torch.cuda.profiler.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--one-step", action="store_true",
                   help="one profiled training step at N=16384, for ncu (see above)")
    args = p.parse_args(argv)
    notes: list[str] = []
    gpu_check.bootstrap(args.bundle, notes)
    importlib.import_module("mra_compile")
    dev = torch.device("cuda")
    if args.one_step:
        one_step(dev)
        return 0
    lines = ["# MRA-2 op profile (bench/gpu_profile.py)", "",
             f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; "
             f"B=1, H={H}, D={D}, {DTYPE}, {BLOCKS_PER_ROW} blocks per row", "", *notes, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    for N in args.sizes:
        for mode in ("full", "sparse"):
            lines += profile_size(N, mode, dev)
            (args.out / "profile.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
