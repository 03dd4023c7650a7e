"""Forward+backward benchmark on the CPU: the op against the reference's autograd and
dense SDPA's, side by side in one run, plus peak memory at the largest N.

    python bench/bench_training.py                      # N = 512 ... 8192, both modes
    python bench/bench_training.py --sizes 4096 --repeat 5

Setup as the forward table: B = 1, H = 12, D = 64, 4 blocks per row, fp32. Each timed
call is forward + backward of sum(out * grad) from fresh leaf tensors; implementations
are interleaved within each round and the median is reported. The dense reference
builds [B, H, N, N] matrices and runs only while they fit (``--reference-max-gb``).
Peak memory: each implementation once in a fresh process at ``--memory-n``, reported as
the growth of the process's peak resident set over its inputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

B, H, D, BLOCK, BPR = 1, 12, 64, 32, 4


def inputs(n_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, n_tokens, D, generator=g) for _ in range(4))
    return q, k, v, grad


def fwd_bwd(fn, q, k, v, grad):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return leaves[0].grad


def implementations(n_tokens: int, mode: str, with_reference: bool) -> dict:
    import mra_compile  # noqa: F401
    from mra_compile.reference import mra2_reference

    nb = BPR * n_tokens // BLOCK
    impls = {
        "op": lambda q, k, v: torch.ops.mra.attention(q, k, v, None, nb, mode),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    if with_reference:
        impls["reference"] = lambda q, k, v: mra2_reference(q, k, v, num_blocks=nb,
                                                            approx_mode=mode)
    return impls


def reference_fits(n_tokens: int, max_gb: float) -> bool:
    # About 8 live [B, H, N, N] float32 matrices through forward and backward.
    return 8 * B * H * n_tokens * n_tokens * 4 / 2**30 <= max_gb


def time_size(n_tokens: int, mode: str, repeat: int, with_reference: bool) -> dict:
    q, k, v, grad = inputs(n_tokens)
    impls = implementations(n_tokens, mode, with_reference)
    for fn in impls.values():  # warm-up: kernel build/load, allocator
        fwd_bwd(fn, q, k, v, grad)
    times = {name: [] for name in impls}
    for _ in range(repeat):
        for name, fn in impls.items():
            t = time.perf_counter()
            fwd_bwd(fn, q, k, v, grad)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


MEMORY_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
import torch
from bench.bench_training import fwd_bwd, implementations, inputs
name, n, mode = {name!r}, {n}, {mode!r}
q, k, v, grad = inputs(n)
impl = implementations(256, mode, False)  # build/load kernels on a small size first
fwd_bwd(impl[name], *inputs(256))
fn = implementations(n, mode, False)[name]

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

try:  # reset the peak (VmHWM) to now: earlier peaks (imports, a compile) must not count
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kib("VmRSS")
    fwd_bwd(fn, q, k, v, grad)
    peak = status_kib("VmHWM")
except OSError:  # no /proc: the process's peak so far
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_bwd(fn, q, k, v, grad)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mib": (peak - base) / 1024}}))
"""


def peak_memory(name: str, n_tokens: int, mode: str) -> float:
    code = MEMORY_CHILD.format(repo=str(REPO), name=name, n=n_tokens, mode=mode)
    # Twice: a first process may compile kernels (the TVM compiler's own memory would
    # set the peak); the second loads them from the disk cache and is the one reported.
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv=None) -> int:
    from mra_compile.tools.benchmarks import machine_line

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reference-max-gb", type=float, default=8.0)
    p.add_argument("--memory-n", type=int, default=8192, help="0 disables the memory rows")
    p.add_argument("--md", default=str(REPO / "bench" / "results" / "training_cpu.md"))
    args = p.parse_args(argv)

    lines = [machine_line(),
             f"Setup: B={B}, H={H}, D={D}, block {BLOCK}, {BPR} blocks per row, fp32, CPU; "
             f"forward+backward, median of {args.repeat} interleaved rounds; ms",
             "",
             "| N | mode | op ms | reference ms | SDPA ms | reference/op | SDPA/op |",
             "|---:|:---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for n_tokens in args.sizes:
        for mode in ("full", "sparse"):
            ref = reference_fits(n_tokens, args.reference_max_gb)
            t = time_size(n_tokens, mode, args.repeat, ref)
            op_ms, sdpa_ms, r = t["op"], t["sdpa"], t.get("reference")
            ref_ms = f"{r:.1f}" if r else "skipped (dense N×N)"
            ref_ratio = f"{r / op_ms:.1f}×" if r else "—"
            row = (f"| {n_tokens} | {mode} | {op_ms:.1f} | {ref_ms} | {sdpa_ms:.1f} | "
                   f"{ref_ratio} | {sdpa_ms / op_ms:.1f}× |")
            lines.append(row)
            print(row, flush=True)
    if args.memory_n:
        lines += ["", f"Peak memory of one forward+backward at N = {args.memory_n} (growth of the "
                  "process's peak RSS over its inputs, fresh process each):", "",
                  "| implementation | mode | peak MiB |", "|:---|:---|---:|"]
        for name, mode in (("op", "full"), ("op", "sparse"), ("sdpa", "-")):
            mib = peak_memory(name, args.memory_n, mode if mode != "-" else "full")
            lines.append(f"| {name} | {mode} | {mib:.0f} |")
            print(lines[-1], flush=True)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
