"""One-shot GPU acceptance check of ``torch.ops.mra.attention`` (CUDA kernels from a bundle).

    python bench/gpu_check.py --bundle BUNDLE_DIR --out $OUT        # the lent H200, < 8 min
    python bench/gpu_check.py --smoke --out /tmp/gpucheck_smoke      # tiny run, any device

BUNDLE_DIR is made here (nvcc, no GPU needed; 8-13 minutes on 2 cores, 62 MiB with the wheel) by

    mra-compile build --target cuda --arch sm_90 --out bench/gpu_bundle \
        --head-dims 40 64 72 96 100 128 --grouped-heads --wheel-for-python 3.12 \
        --tuning-variants bfloat16:64

(the head dims the checks below use; the tuning variants for task 4: 160 of its 512
kernels, 2026-12-06; the device tool carries at most 64 MiB) and holds mra_kernels.so, manifest.json,
runtime/libtvm_runtime*.so, wheels/apache_tvm_ffi-*.whl, the generated source
mra_kernels.cu and device_report.json; carry it to the GPU machine
(``run`` tool: carry=["bench/gpu_bundle"]). When ``tvm_ffi`` is missing, the carried wheel is installed
offline into /tmp/mra_pylib; MRA_COMPILE_KERNEL_LIBRARY is pointed at the bundle before
``import mra_compile``, so no TVM compiler is needed. Without --bundle the installed
package is used as is (it compiles CPU kernels with TVM when run here).

Within --budget-seconds (default 420 s; work left over is recorded as skipped) it checks:

1. Correctness: float32/float16/bfloat16 x "full"/"sparse" on seeded random shapes (odd N
   and head dims, [B, N] masks with padding, N up to 32768) against ``mra2_reference`` in
   float64 on the same device, given the op's own block selection; q/k/v gradients for a
   subset; the op on a side stream held back by a sleep (it must follow torch's current
   stream); a mask-free forward captured in a CUDA graph and replayed on new inputs; the
   op's own CUDA graphs (mra_compile.cuda_graphs: a signature's third call, inference and
   a training step) against the usual path.
2. Timings (B=1, H=16, D 64/128, 8 blocks per row, bf16 then fp16, N 1024..32768):
   forward and forward+backward of the op, flash SDPA, compiled FlexAttention on the op's
   selected blocks, and the plain-torch reference where it fits; at the must-show
   configuration (bf16, N=16384, D=64) also the peer a GPU user would write, MRA-2 full
   mode on FlexAttention (bench/flex_mra.py). Ratios against the op.
3. Kernels: time, bytes and flops of every kernel of one forward and one backward, against
   the card's measured copy bandwidth and bf16 matmul rate, with the registers and spills
   ptxas gave it in the bundle's build (the bundle's device_report.json).
4. Tuning (when every correctness check of the run passed, or alone with ``--only
   tune``): the knobs of the hot kernels over the variants the bundle holds
   (bench/gpu_tune.py), at the must-show configuration; each candidate checked against
   the float64 reference first; the picks written as CUDA tuning records to
   --out/cuda_tuned.json (merge them into schedules/tuned/cuda-sm_90.json).

How a fault loses only its own check (bench/gpu_driver.py): this process (the
supervisor) never touches the GPU; it starts a worker process that runs the checks as
tasks, appending every row to --out/rows.jsonl (flushed and fsynced) as soon as it is
measured. After each task the worker probes the device; a sticky CUDA error (an illegal
address, a launch failure) is recorded against the task and the worker exits, and the
supervisor starts a fresh worker for the remaining tasks. A task that outlives its
allowance is stopped (its stacks go to worker_stacks.txt) and recorded as hung; a worker
that crashes has its task recorded as died. gpu_check.md, correctness.csv, timings.csv
and kernels.csv are rebuilt from rows.jsonl after every task, and printed at the end.
``--resume`` continues a run that was cut off; ``--only KIND ...`` runs a subset.
Exit status: 0 when every correctness check that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime
import functools
import gc
import importlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # bench.* and mra_compile from this checkout

from bench import flex_mra, gpu_driver, gpu_tune  # noqa: E402
from bench.gpu_driver import Results, Task  # noqa: E402

RESULTS = "rows.jsonl"  # under --out: every row, appended as it is measured
PYLIB = Path("/tmp/mra_pylib")  # where the carried tvm_ffi wheel is unpacked
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("full", "sparse")
FWD_LIMIT = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BWD_LIMIT = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
HEAD_DIMS = (40, 64, 72, 96, 100, 128)
BLOCK = 32
FP64_MATRIX_CAP = 8 * 2**30  # bytes of one float64 [B, H, N, N] matrix of the oracle
BLOCKS_PER_ROW = 8
SUMMARY = (torch.bfloat16, 64, 16384)  # dtype, D, N of the must-show line
SMOKE_SUMMARY = (torch.bfloat16, 64, 512)
DIRECTIONS = ("fwd", "fwd+bwd")
FLEX_VARIANTS = ("bs32", "bs128+mask_mod")

CORR_FIELDS = ("check", "dtype", "mode", "B", "H", "N", "D", "masked", "num_blocks", "options",
               "error", "limit", "status", "seconds", "message")
TIME_FIELDS = ("dtype", "mode", "direction", "N", "D", "op_ms", "op_masked_ms", "sdpa_ms",
               "flex_ms", "peer_ms", "reference_ms", "op_masked_over_op", "sdpa_over_op",
               "flex_over_op", "peer_over_op",
               "flex_variant", "flex_vs_op_sparse", "peer_vs_op_full", "notes")
KERNEL_FIELDS = ("pass", "kernel", "ms", "bytes", "GB/s", "% copy bw", "flops",
                 "flop formula", "TFLOP/s", "% matmul", "registers", "spill B")

TUNE_CHECK = (4, 2048)  # heads, N of the input each tuning candidate is checked on

mc = None  # the mra_compile package, imported after the bootstrap


short = gpu_driver.one_line  # an exception as one line, for a table cell


def short_dtype(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------- bootstrap

def bootstrap(bundle: Path | None, notes: list[str]) -> None:
    """Make ``tvm_ffi`` importable (offline, from the bundle) and point the op at the bundle."""
    if bundle is None:
        return
    try:
        importlib.import_module("tvm_ffi")
    except ImportError as missing:
        if not (PYLIB / "tvm_ffi").is_dir():
            tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
            wheels = (sorted((bundle / "wheels").glob(f"apache_tvm_ffi-*-{tag}-*.whl"))
                      or sorted((bundle / "wheels").glob("apache_tvm_ffi-*.whl")))
            if not wheels:
                raise RuntimeError(f"tvm_ffi missing and no wheel in {bundle / 'wheels'}") from missing
            # --no-index: the GPU machine has no network; --no-deps: torch brings typing_extensions.
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--no-index", "--disable-pip-version-check", "--target", str(PYLIB),
                            str(wheels[-1])], check=True,
                           env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
            notes.append(f"installed {wheels[-1].name} into {PYLIB}")
        sys.path.insert(0, str(PYLIB))
        importlib.invalidate_caches()
        importlib.import_module("tvm_ffi")  # fails loudly here if the wheel did not work
    os.environ["MRA_COMPILE_KERNEL_LIBRARY"] = str(bundle.resolve())


def environment(dev, bundle) -> list[tuple[str, str]]:
    env = [("python", platform.python_version()), ("torch", torch.__version__),
           ("torch CUDA", str(torch.version.cuda)), ("device", str(dev)),
           ("MRA_COMPILE_KERNEL_LIBRARY", os.environ.get("MRA_COMPILE_KERNEL_LIBRARY", "unset"))]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env += [("GPU", p.name), ("SMs", str(p.multi_processor_count)),
                ("compute capability", f"{p.major}.{p.minor}"),
                ("GPU memory", f"{p.total_memory / 2**30:.1f} GiB")]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            env.append(("driver", smi.stdout.strip().splitlines()[0]))
        except (OSError, IndexError, subprocess.SubprocessError):
            env.append(("driver", "n/a (no nvidia-smi)"))
    else:
        env.append(("CPU threads", str(torch.get_num_threads())))
    for name in ("triton", "tvm_ffi"):
        try:
            mod = importlib.import_module(name)
            env.append((name, f"{getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent})"))
        except Exception as exc:  # noqa: BLE001  (a missing module is a fact to report)
            env.append((name, f"not importable: {short(exc)}"))
    if bundle is not None:
        try:
            manifest = json.loads((bundle / "manifest.json").read_text())
            kernels = manifest.get("kernels", [])
            dims = sorted({k["static"].get("D") for k in kernels if "D" in k.get("static", {})})
            kinds = sorted({k["static"].get("dtype", "float32") for k in kernels})
            env.append(("bundle", f"{bundle.resolve()}: target {manifest.get('target')}, "
                                  f"{len(kernels)} kernels, D {dims}, dtypes {kinds}"))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            env.append(("bundle", f"{bundle}: manifest unreadable ({short(exc)})"))
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        env.append(("repo commit", head or "n/a"))
    except (OSError, subprocess.SubprocessError):
        pass
    return env


# ---------------------------------------------------------------------------- timing

def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def without_graphs():
    """The op without its own CUDA graphs inside (``MRA_COMPILE_CUDA_GRAPHS=0``: the
    usual path, every call's host work), the setting as it was after."""
    name = mc.cuda_graphs.ENV
    before = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def free_memory(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def bench_ms(fn, dev, warmup: int = 2, target_ms: float = 200.0, max_repeat: int = 30) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    estimate = (time.perf_counter() - t0) * 1e3
    repeat = max(3, min(max_repeat, int(target_ms / max(estimate, 1e-3))))
    if dev.type != "cuda":
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(dev)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def machine_rates(dev, smoke: bool) -> dict:
    """Device-to-device copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s)."""
    nbytes = (64 if smoke else 1024) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), dev, warmup=3)
    m = 512 if smoke else 8192
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # CPU bf16 matmul is emulated
    a, b = (torch.randn(m, m, device=dev).to(dt) for _ in range(2))
    mm_ms = bench_ms(lambda: a @ b, dev, warmup=3)
    return {"copy_GBps": 2 * nbytes / copy_ms / 1e6, "copy_desc": f"{nbytes >> 20} MiB copy_",
            "matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9,
            "matmul_desc": f"{m}^3 {short_dtype(dt)} matmul"}


# ---------------------------------------------------------------------------- correctness

# A peaky softmax (scale 2.5, one real query of 5 against 57 keys, 1 block per row), the
# inputs of tests/test_cuda_emulation.py's peaky cases (drawn on the host: "host_seed"):
# where the backward's D_t and logits disagreed with its products, dq and dk came out
# 1.5-1.7x their own size off there; each gradient is held to its own largest entry
# ("own"), which these inputs allow (a softmax closer to one-hot leaves dq, dk near zero,
# below float32 rounding; other seeds may).
PEAKY = dict(check="backward", B=1, H=1, N=5, Nk=57, D=64, masked=False, real_queries=1,
             own=True, num_blocks=None, amp=1.0, seed=10, host_seed=True,
             extra=dict(scale=2.5, block_per_row=1))


def draw_cases(seed: int, smoke: bool) -> list[dict]:
    """Seeded cases, cheapest and most informative first: forward, stream, misaligned
    inputs, backward, the large-N forwards (the float64 oracle is the expensive part), then
    the CUDA graph captures last, so that a capture gone wrong cannot spoil the other
    checks."""
    rng = random.Random(seed)
    small, streams, backward, large, graphs = [], [], [], [], []
    large_n = [300, 257, 200, 300, 231, 129] if smoke else [32768, 16411, 8191, 32768, 24007, 12345]
    large_d = [64, 40, 64, 40, 64, 40] if smoke else [64, 128, 96, 64, 100, 128]
    dims = (40, 64) if smoke else HEAD_DIMS  # smoke: few head dims = few CPU kernel compiles
    combo = 0
    for dtype in DTYPES:
        for mode in MODES:
            base = dict(dtype=dtype, mode=mode)
            for i in range(3 if smoke else 12):
                hi = 300 if smoke else (1100 if rng.random() < 0.7 else 4100)
                N = rng.randint(40, hi)
                if N % BLOCK == 0:
                    N += rng.randint(1, BLOCK - 1)  # the partial last block is the tricky case
                n = -(-N // BLOCK)
                # Around a few blocks per row; the first case asks for every block (exact).
                nb = (n * n + 3 if i == 0 else
                      max(1, rng.randint(1, 8) * n + rng.randint(-(n // 2), n // 2)))
                case = dict(base, check="forward", B=rng.randint(1, 2 if smoke else 3),
                            H=rng.randint(1, 2 if smoke else 4), N=N, D=rng.choice(dims),
                            masked=rng.random() < 0.5, num_blocks=nb,
                            amp=rng.choice((0.5, 1.0, 2.0)), seed=rng.randrange(2**31))
                small.append(case)
                if i < (1 if smoke else 3) and N <= 2100:
                    backward.append(dict(case, check="backward", num_blocks=max(1, 4 * n)))
            n = -(-large_n[combo] // BLOCK)
            large.append(dict(base, check="forward", B=1, H=1, N=large_n[combo], D=large_d[combo],
                              masked=combo % 2 == 1, num_blocks=BLOCKS_PER_ROW * n, amp=1.0,
                              seed=rng.randrange(2**31)))
            # The SDPA-shaped options together (issue 12): a scale, grouped key/value heads,
            # a per-sequence budget on a padded batch; forward and backward.
            sdpa_shaped = dict(base, check="forward", B=2, H=4, kv_heads=2, N=rng.randint(300, 700),
                               D=64, masked=True, num_blocks=None, amp=1.0,
                               seed=rng.randrange(2**31),
                               extra=dict(scale=0.3, enable_gqa=True, block_per_row=3))
            small.append(sdpa_shaped)
            backward.append(dict(sdpa_shaped, check="backward"))
            # Cross-attention (issue 12): keys of their own length, both sides padded.
            Nq = rng.randint(100, 300 if smoke else 900)
            cross = dict(base, check="forward", B=2, H=2, N=Nq, Nk=rng.randint(Nq + 1, 3 * Nq),
                         D=64, masked=True, cross=True, num_blocks=None, amp=1.0,
                         seed=rng.randrange(2**31), extra=dict(block_per_row=3))
            small.append(cross)
            backward.append(dict(cross, check="backward"))
            if dtype != torch.float32 and mode == "full":
                backward.append(dict(base, **PEAKY))
            common = dict(base, B=2, H=4, N=200 if smoke else 1000, D=64, masked=False,
                          amp=1.0, seed=rng.randrange(2**31))
            common["num_blocks"] = 4 * -(-common["N"] // BLOCK)
            streams.append(dict(common, check="stream"))
            # Odd storage offsets (not 16-byte aligned) against the kernels' vector loads.
            streams.append(dict(common, check="misaligned", masked=combo % 2 == 0))
            graphs.append(dict(common, check="graph"))
            graphs.append(dict(common, check="replay"))
            # The op's graphs of masked calls: a padding mask (bool, as the Hugging Face
            # integration passes it, or 0/1 in q's dtype), per-sequence budgets; and
            # cross-attention with its query mask.
            graphs.append(dict(common, check="replay", masked=True, bool_mask=combo % 2 == 0,
                               num_blocks=None, extra=dict(block_per_row=4)))
            graphs.append(dict(cross, check="replay"))
            combo += 1
    return small + streams + backward + large + graphs


def _padding_mask(B, N, dtype, dev, rng, gen):
    """[B, N] 0/1: row 0 real (B > 1), the others padded at the end and in a few holes."""
    mask = torch.ones(B, N, dtype=dtype, device=dev)
    for b in range(B):
        if b == 0 and B > 1:
            continue  # one full row next to padded ones
        mask[b, N - rng.randint(1, max(1, N // 3)):] = 0  # padding at the end
        holes = torch.rand(N, generator=gen, device=dev) < 0.03  # and a few in the middle
        mask[b, holes] = 0
        mask[b, 0] = 1  # at least one real token
    return mask


def make_inputs(case: dict, dev, seed_offset: int = 0):
    """q [B, H, N, D], k, v [B, kv_heads (default H), Nk (default N), D] and a [B, Nk] 0/1
    mask (or None) for a case."""
    B, H, N, D = case["B"], case["H"], case["N"], case["D"]
    Nk = case.get("Nk", N)
    gen = torch.Generator(device=dev).manual_seed(case["seed"] + seed_offset)
    q, k, v = (case["amp"] * torch.randn(B, heads, length, D, generator=gen, device=dev)
               for heads, length in ((H, N), (case.get("kv_heads", H), Nk),
                                     (case.get("kv_heads", H), Nk)))
    q, k, v = (x.to(case["dtype"]) for x in (q, k, v))
    mask = None
    if case["masked"]:
        mask = _padding_mask(B, Nk, case["dtype"], dev, random.Random(case["seed"]), gen)
    return q, k, v, mask


def host_drawn(case: dict, dev):
    """q, k, v and the upstream gradient of a "host_seed" case, drawn in float64 on the
    host (the same numbers on every device), in the case's dtype on ``dev``."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, N, D, Nk = case["B"], case["H"], case["N"], case["D"], case["Nk"]
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    return tuple(x.to(case["dtype"]).to(dev) for x in (q, k, v, grad))


def call_options(case: dict, dev) -> tuple[dict, torch.Tensor | None]:
    """The case's further options for the op and the oracle (a cross-attention case's
    ``query_mask`` made here), and the mask of the padded queries (their output is 0)."""
    extra = dict(case.get("extra", {}))
    if "real_queries" in case:  # only the first ones real
        extra["query_mask"] = torch.zeros(case["B"], case["N"], device=dev)
        extra["query_mask"][:, :case["real_queries"]] = 1
        return extra, extra["query_mask"]
    if case.get("cross"):
        gen = torch.Generator(device=dev).manual_seed(case["seed"] + 3)
        extra["query_mask"] = _padding_mask(case["B"], case["N"], case["dtype"], dev,
                                            random.Random(case["seed"] + 3), gen).float()
        return extra, extra["query_mask"]
    return extra, None


def op(q, k, v, mask, num_blocks, mode, extra=None):
    """The op; ``extra``: mra_attention's further options (scale, enable_gqa, block_per_row)."""
    if extra:
        return mc.mra_attention(q, k, v, mask, num_blocks=num_blocks, approx_mode=mode, **extra)
    return torch.ops.mra.attention(q, k, v, mask, num_blocks, mode)


def selection(q, k, v, mask, num_blocks, mode, extra=None):
    sel, high = mc.block_selection(q, k, v, mask, num_blocks=num_blocks, approx_mode=mode,
                                   **(extra or {}))
    return sel.to(q.device), high.to(q.device)


def rel_error(out, ref, mask) -> tuple[float, str]:
    """max |out - ref| / max |ref| over real tokens, and a note.

    Padded queries must be zero (spec step 6): a nonzero one counts as its size relative
    to max |ref|, so it fails like any other error beyond the limit.
    """
    if out.shape != ref.shape or out.device != ref.device:
        return math.inf, f"output {tuple(out.shape)} on {out.device}, expected {tuple(ref.shape)}"
    diff, mag = (out.double() - ref).abs(), ref.abs()
    note, pad_max = "", 0.0
    if mask is not None:
        real = mask.bool()[:, None, :, None]
        pad_max = torch.where(real, 0.0, out.double().abs()).max().item()
        if pad_max != 0:
            note = f"padded queries not zero (max |out| = {pad_max:.3g})"
        diff, mag = torch.where(real, diff, 0.0), torch.where(real, mag, 0.0)
    worst = (diff.max().item(), pad_max)
    if any(math.isnan(x) for x in worst):  # Python's max() would drop a NaN
        return math.inf, note or "NaN in the output"
    return max(worst) / max(mag.max().item(), 1e-30), note


def check_forward(case, dev):
    q, k, v, mask = make_inputs(case, dev)
    nb, mode = case["num_blocks"], case["mode"]
    Np = -(-case["N"] // BLOCK) * BLOCK
    matrix = case["B"] * case["H"] * Np * Np * 8
    if matrix > FP64_MATRIX_CAP:
        return None, f"skipped: float64 oracle needs {matrix / 2**30:.1f} GiB per N x N matrix"
    if dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] < 6 * matrix:
        return None, "skipped: float64 oracle does not fit in free GPU memory"
    extra, query_mask = call_options(case, dev)
    with torch.no_grad():
        out = op(q, k, v, mask, nb, mode, extra)
        sel = selection(q, k, v, mask, nb, mode, extra)
        ref = mc.reference.mra2_reference(
            q.double(), k.double(), v.double(), None if mask is None else mask.double(),
            num_blocks=nb, approx_mode=mode, selection=sel, **extra)
    return rel_error(out, ref, mask if query_mask is None else query_mask)


def check_backward(case, dev):
    nb, mode = case["num_blocks"], case["mode"]
    if case.get("host_seed"):  # as tests/cuda_emulation/runner.py draws them
        (q, k, v, grad), mask = host_drawn(case, dev), None
    else:
        q, k, v, mask = make_inputs(case, dev)
        gen = torch.Generator(device=dev).manual_seed(case["seed"] + 7)
        grad = torch.randn(q.shape, generator=gen, device=dev).to(q.dtype)
    extra, _ = call_options(case, dev)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(op(*leaves, mask, nb, mode, extra), leaves, grad)
    sel = selection(q, k, v, mask, nb, mode, extra)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = mc.reference.mra2_reference(*leaves64, None if mask is None else mask.double(),
                                      num_blocks=nb, approx_mode=mode, selection=sel, **extra)
    want = torch.autograd.grad(ref, leaves64, grad.double())
    return gradient_error(got, want, own=bool(case.get("own")))


def gradient_error(got, want, own: bool = False) -> tuple[float, str]:
    """max |got - want| over the gradients, relative to the largest |want| entry of them
    all (``own``: each gradient against its own largest entry, the worst of the three),
    and a note; inf where a gradient holds a NaN."""
    worst = [(g.double() - w).abs().max().item() for g, w in zip(got, want)]
    if any(math.isnan(x) for x in worst):  # Python's max() would drop a NaN
        return math.inf, "NaN in a gradient"
    if own:
        return max(e / max(w.abs().max().item(), 1e-30) for e, w in zip(worst, want)), \
            "each gradient against its own size"
    scale = max(w.abs().max().item() for w in want)
    return max(worst) / max(scale, 1e-30), ""


def check_stream(case, dev):
    """The op must run on torch's current stream. Its inputs are filled on a side stream
    behind a 10 ms sleep, and the default stream sleeps 100 ms first: kernels on any
    other stream would read zero inputs or be read (cloned) before they finish."""
    if dev.type != "cuda":
        return None, "skipped: no CUDA"
    q, k, v, _ = make_inputs(case, dev)
    nb, mode = case["num_blocks"], case["mode"]
    expected = op(q, k, v, None, nb, mode)
    slots = [torch.zeros_like(x) for x in (q, k, v)]
    torch.cuda.synchronize(dev)
    side = torch.cuda.Stream(dev)
    torch.cuda._sleep(200_000_000)  # ~100 ms on the default stream, not waited for
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
        for dst, src in zip(slots, (q, k, v)):
            dst.copy_(src)
        out = op(*slots, None, nb, mode)
        snapshot = out.clone()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    err_out, _ = rel_error(out, expected.double(), None)
    err_snap, _ = rel_error(snapshot, expected.double(), None)
    msg = "" if err_snap <= err_out else f"clone on the side stream differs ({err_snap:.2e})"
    return max(err_out, err_snap), msg


def check_graph(case, dev):
    """Capture one forward in a CUDA graph; replay on new inputs copied into the static ones."""
    if dev.type != "cuda":
        return None, "skipped: no CUDA"
    nb, mode = case["num_blocks"], case["mode"]
    static = [x.clone() for x in make_inputs(case, dev)[:3]]
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
        for _ in range(3):
            op(*static, None, nb, mode)
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = op(*static, None, nb, mode)
    except Exception as exc:
        # Ending a broken capture raises again and hides the op's own error: report both.
        inner = f" (inside the capture: {short(exc.__context__)})" if exc.__context__ else ""
        raise RuntimeError(f"capture failed: {short(exc)}{inner}") from exc
    op(*make_inputs(case, dev, 2)[:3], None, nb, mode)  # eager work between capture and replay
    fresh = make_inputs(case, dev, 1)[:3]
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize(dev)
    return rel_error(static_out, op(*fresh, None, nb, mode).double(), None)


def check_replay(case, dev):
    """The op's own CUDA graphs (mra_compile.cuda_graphs): the third call of a signature
    replays the graph captured at the second; on new inputs (and a masked case's new
    mask) it must give what the usual path (MRA_COMPILE_CUDA_GRAPHS=0) gives: the
    inference forward, and the output and gradients of a training step (its forward and
    backward graphs)."""
    if dev.type != "cuda":
        return None, "skipped: no CUDA"
    nb, mode = case["num_blocks"], case["mode"]
    extra, _ = call_options(case, dev)
    mc.cuda_graphs.clear()

    def step(q, k, v, mask, g):
        with torch.no_grad():
            inference = op(q, k, v, mask, nb, mode, extra)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = op(*leaves, mask, nb, mode, extra)
        return (inference, out.detach(), *torch.autograd.grad(out, leaves, g))

    def inputs(offset):  # (a masked case's mask changes from call to call: its holes)
        q, k, v, mask = make_inputs(case, dev, offset)
        if mask is not None and case.get("bool_mask"):
            mask = mask != 0
        return q, k, v, mask, torch.randn_like(q)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for offset in (3, 4):  # (the first call of each signature, then its capture)
            step(*inputs(offset))
        fresh = inputs(1)
        replayed = step(*fresh)
        kept = mc.cuda_graphs.kept()
        with without_graphs():
            usual = step(*fresh)
    if kept != 3:
        why = "; ".join(str(w.message) for w in caught) or "none failed"
        return math.inf, f"{kept} of 3 graphs kept (inference, forward, backward): {why}"
    names = ("inference", "out", "dq", "dk", "dv")
    errors = {name: rel_error(a, b.double(), None)[0]
              for name, a, b in zip(names, replayed, usual)}
    same = [name for name, a, b in zip(names, replayed, usual) if torch.equal(a, b)]
    worst = max(errors, key=lambda name: errors[name])
    return errors[worst], (f"bit-identical to the usual path: {', '.join(same) or 'none'}; "
                           f"largest difference: {worst}")


def offset_by_one(x):
    """x's values in a tensor whose storage begins one element into its buffer, so that its
    data pointer is not 16-byte aligned."""
    y = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    return y.copy_(x)


def check_misaligned(case, dev):
    """q, k, v and mask at an odd storage offset give what aligned copies give (issue 15:
    the kernels read with 16-byte vector loads)."""
    q, k, v, mask = make_inputs(case, dev)
    nb, mode = case["num_blocks"], case["mode"]
    with torch.no_grad():
        aligned = op(q, k, v, mask, nb, mode)
        shifted = op(*(offset_by_one(x) for x in (q, k, v)),
                     None if mask is None else offset_by_one(mask), nb, mode)
    return rel_error(shifted, aligned.double(), mask)


CHECKS = {"forward": (check_forward, FWD_LIMIT), "backward": (check_backward, BWD_LIMIT),
          "stream": (check_stream, FWD_LIMIT), "misaligned": (check_misaligned, FWD_LIMIT),
          "graph": (check_graph, FWD_LIMIT), "replay": (check_replay, FWD_LIMIT)}


def correctness_row(case: dict) -> dict:
    """A correctness row of a case, before its outcome."""
    row = {f: case.get(f) for f in CORR_FIELDS}
    extra = dict(case.get("extra", {}), **({"kv_heads": case["kv_heads"]} if "kv_heads" in case
                                          else {}), **({"Nk": case["Nk"]} if "Nk" in case else {}))
    if case.get("cross"):
        extra["query_mask"] = "padded"
    if "real_queries" in case:
        extra["query_mask"] = f"{case['real_queries']} real"
    row["options"] = " ".join(f"{k}={v}" for k, v in extra.items())
    row.update(table="correctness", dtype=short_dtype(case["dtype"]),
               limit=CHECKS[case["check"]][1][case["dtype"]], error=None)
    return row


def run_correctness(case: dict, ctx, emit) -> None:
    """One case against its limit, as one row (an exception is a FAIL row, made by
    failure_rows from the message)."""
    t0 = time.monotonic()
    err, msg = CHECKS[case["check"]][0](case, ctx.dev)
    row = correctness_row(case)
    row.update(error=err, message=msg, seconds=time.monotonic() - t0,
               status="SKIPPED" if err is None else "PASS" if err <= row["limit"] else "FAIL")
    emit(row)
    if row["status"] == "FAIL":
        ctx.progress(f"  FAIL {case['check']} {row['dtype']} {row['mode']} B{row['B']} "
                     f"H{row['H']} N{row['N']} D{row['D']}: {fmt(err, 'error')} {msg}")


# ---------------------------------------------------------------------------- flex attention

def flex_block_mask(selected, N, variant):
    """A BlockMask for the op's selected 32-token blocks ``selected`` [B, H, n, n].

    "bs32": the selected blocks as full 32x32 blocks, exactly the op's work
    (flex_mra.selection_block_mask, also what the MRA-2-on-Flex peer uses).
    "bs128+mask_mod": flex's default 128-token tiles that hold a selected block; a partly
    selected tile costs the whole 128x128 tile, so this does more work than the op (the
    fallback where bs32 fails). Its mask_mod looks ``selected`` up per token: it defines
    the function (eager flex evaluates it everywhere), while compiled kernels evaluate it
    only in partial tiles and skip the unlisted ones.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if variant == "bs32":
        return flex_mra.selection_block_mask(selected, None, BLOCK)

    def lookup(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    B, H, n, _ = selected.shape
    r, m = 128 // BLOCK, -(-n * BLOCK // 128)
    tiles = F.pad(selected, (0, m * r - n, 0, m * r - n)).view(B, H, m, r, m, r)
    some, every = tiles.any(5).any(3), tiles.all(5).all(3)
    return BlockMask.from_kv_blocks(*flex_mra.kv_lists(some & ~every), *flex_mra.kv_lists(every),
                                    BLOCK_SIZE=128, mask_mod=lookup, seq_lengths=(N, N))


def make_flex(dev):
    """flex_attention compiled once (eager on the CPU, where it only validates the BlockMask)."""
    from torch.nn.attention.flex_attention import flex_attention

    if dev.type != "cuda":
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return types.SimpleNamespace(fn=flex_attention, failed={})
    for name in ("cache_size_limit", "recompile_limit"):  # each new shape compiles once
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    # A compile error must raise, not fall back to eager flex (dense N x N scores): that
    # would time something else under Flex's name.
    torch._dynamo.config.suppress_errors = False
    return types.SimpleNamespace(fn=torch.compile(flex_attention, dynamic=False), failed={})


def flex_options(variant):
    # 32-token blocks need kernel tiles that divide them; the default forward tile is larger.
    return {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK} if variant == "bs32" else None


def flex_call(flex, q, k, v, block_mask, variant):
    return flex.fn(q, k, v, block_mask=block_mask, kernel_options=flex_options(variant))


def peer_call(flex, q, k, v, num_blocks):
    """MRA-2 full mode on FlexAttention (bench/flex_mra.py), end to end: the op's block
    selection, the BlockMask, flex on the exact blocks, the coarse part, the merge."""
    return flex_mra.flex_mra(q, k, v, None, num_blocks=num_blocks, flex=flex.fn,
                             kernel_options=flex_options("bs32"), block_size=BLOCK)


# ---------------------------------------------------------------------------- timings

def timing_configs(smoke: bool):
    if smoke:
        return [(torch.bfloat16, 64, 256), SMOKE_SUMMARY]
    configs = [(dt, d, n) for dt in (torch.bfloat16, torch.float16) for d in (64, 128)
               for n in (1024, 2048, 4096, 8192, 16384, 32768)]
    configs.remove(SUMMARY)
    return [SUMMARY] + configs  # the must-show configuration first


def reference_peak_bytes(H, N, dtype, backward: bool) -> float:
    # About five [H, N, N] matrices of the dtype plus bool selections are alive at once;
    # autograd keeps most of them, hence about 2.5x with the backward.
    return H * N * N * (5 * torch.finfo(dtype).bits // 8 + 2) * (2.5 if backward else 1.0)


def config_inputs(cfg, dev, args):
    """Seeded q, k, v, upstream grad [1, H, N, D] of a timing configuration (dtype, D, N)."""
    dtype, D, N = cfg
    gen = torch.Generator(device=dev).manual_seed(args.seed + N + D)
    H = 2 if args.smoke else 16
    return [torch.randn(1, H, N, D, generator=gen, device=dev).to(dtype) for _ in range(4)]


def make_measure(cfg, emit, q, k, v, g, dev, until: float):
    """measure(impl, mode, direction, fn_of_qkv, need_s, variant) times fn_of_qkv(q, k, v)
    and appends one timing row at once: ms, or why not ("skipped: ..."). Returns the row.
    "fwd" runs under no_grad; "fwd+bwd" adds the gradients of q, k, v."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    dtype, D, N = cfg

    def measure(impl, mode, direction, impl_fn, need_s=5.0, variant=None):
        row = {"table": "timing", "dtype": short_dtype(dtype), "D": D, "N": N, "impl": impl,
               "mode": mode, "direction": direction, "variant": variant, "ms": None, "why": None}
        if until - time.monotonic() < need_s:
            row["why"] = "skipped: time budget"
        else:
            if direction == "fwd":
                def fn():
                    with torch.no_grad():
                        return impl_fn(q, k, v)
            else:
                def fn():
                    return torch.autograd.grad(impl_fn(*leaves), leaves, g)
            try:
                row["ms"] = bench_ms(fn, dev)
            except Exception as exc:  # noqa: BLE001  (recorded; the run goes on)
                row["why"] = f"skipped: {short(exc)}"
                free_memory(dev)
        emit(row)
        return row

    return measure


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def tail_padding(N: int, dev) -> torch.Tensor:
    """A bool [1, N] padding mask (True = real token) whose last eighth is padding, as a
    tokenizer pads a batch's shorter sequences; the type the Hugging Face integration
    passes."""
    mask = torch.ones(1, N, dtype=torch.bool, device=dev)
    mask[:, N - N // 8:] = False
    return mask


def time_baselines(cfg, ctx, emit) -> None:
    """The op (both modes, without and with a padding mask), flash SDPA and the dense
    reference at one configuration."""
    dtype, D, N = cfg
    dev, args = ctx.dev, ctx.args
    q, k, v, g = config_inputs(cfg, dev, args)
    H, nb = q.shape[1], BLOCKS_PER_ROW * (N // BLOCK)
    measure = make_measure(cfg, emit, q, k, v, g, dev, ctx.until)
    padding = tail_padding(N, dev)
    for direction in DIRECTIONS:
        for mode in MODES:
            measure("op", mode, direction, lambda a, b, c, m=mode: op(a, b, c, None, nb, m))
            # A padded batch's call (every Hugging Face call on one): the same kernels,
            # masked; its host work is what the op's CUDA graphs take over.
            measure("op_masked", mode, direction,
                    lambda a, b, c, m=mode: op(a, b, c, padding, nb, m))
        if dev.type == "cuda":
            measure("sdpa", None, direction, sdpa_flash)
        else:
            emit({"table": "timing", "dtype": short_dtype(dtype), "D": D, "N": N, "impl": "sdpa",
                  "mode": None, "direction": direction, "why": "skipped: no CUDA"})
    # The plain-torch oracle in the input dtype, where its N x N matrices fit.
    cap = args.reference_max_gb * 1e9
    if dev.type == "cuda":
        cap = min(cap, 0.8 * torch.cuda.mem_get_info(dev)[0])
    for mode in MODES:
        sel = selection(q, k, v, None, nb, mode)
        for direction in DIRECTIONS:
            if reference_peak_bytes(H, N, dtype, direction != "fwd") > cap:
                emit({"table": "timing", "dtype": short_dtype(dtype), "D": D, "N": N,
                      "impl": "reference", "mode": mode, "direction": direction,
                      "why": "skipped: dense N x N does not fit"})
            else:
                measure("reference", mode, direction, lambda a, b, c, m=mode, s=sel:
                        mc.reference.mra2_reference(a, b, c, num_blocks=nb, approx_mode=m,
                                                    selection=s), 15)
        free_memory(dev)


def time_flex(cfg, ctx, emit) -> None:
    """FlexAttention on exactly the op's blocks (T is the same in both modes), trying the
    BlockMask variants in turn; a variant that failed once is not compiled again (also
    across workers: the failures are rows of the results file)."""
    dtype, D, N = cfg
    flex = ctx.flex()
    q, k, v, g = config_inputs(cfg, ctx.dev, ctx.args)
    nb = BLOCKS_PER_ROW * (N // BLOCK)
    measure = make_measure(cfg, emit, q, k, v, g, ctx.dev, ctx.until)
    selected = selection(q, k, v, None, nb, "full")[0]
    worked = {}
    for direction in DIRECTIONS:
        for variant in FLEX_VARIANTS:
            if (direction, variant) in flex.failed:
                continue
            mask = flex_block_mask(selected, N, variant)
            row = measure("flex", None, direction, lambda a, b, c, bm=mask, vr=variant:
                          flex_call(flex, a, b, c, bm, vr), need_s=60, variant=variant)
            if row["ms"] is not None:
                worked[direction] = variant
                break
            if "budget" in row["why"]:
                break
            flex.failed[(direction, variant)] = row["why"]
            emit({"table": "flexfail", "direction": direction, "variant": variant,
                  "why": row["why"]})
            ctx.progress(f"  flex {direction} {variant}: {row['why']}")
    if "fwd" in worked:  # the op's sparse mode is the same function: checks the BlockMask
        with torch.no_grad():
            got = flex_call(flex, q, k, v, flex_block_mask(selected, N, worked["fwd"]),
                            worked["fwd"])
            err = rel_error(got, op(q, k, v, None, nb, "sparse").double(), None)[0]
        emit({"table": "timing", "dtype": short_dtype(dtype), "D": D, "N": N,
              "impl": "flex-check", "value": err})
    free_memory(ctx.dev)


def time_peer(cfg, ctx, emit) -> None:
    """MRA-2 full mode on FlexAttention (the peer a GPU user would write), end to end,
    and its difference from the op's full mode (the same function)."""
    dtype, D, N = cfg
    flex = ctx.flex()
    q, k, v, g = config_inputs(cfg, ctx.dev, ctx.args)
    nb = BLOCKS_PER_ROW * (N // BLOCK)
    measure = make_measure(cfg, emit, q, k, v, g, ctx.dev, ctx.until)
    for direction in DIRECTIONS:
        measure("peer", "full", direction, lambda a, b, c: peer_call(flex, a, b, c, nb), need_s=60)
    with torch.no_grad():
        err = rel_error(peer_call(flex, q, k, v, nb), op(q, k, v, None, nb, "full").double(),
                        None)[0]
    emit({"table": "timing", "dtype": short_dtype(dtype), "D": D, "N": N, "impl": "peer-check",
          "value": err})
    free_memory(ctx.dev)


def timing_entries(rows: list[dict]) -> dict:
    """{(dtype, D, N): {(impl, mode, direction): ms or why, "variants": {...}, checks}}."""
    entries: dict = {}
    for r in rows:
        entry = entries.setdefault((r["dtype"], r["D"], r["N"]), {"variants": {}})
        if r["impl"] in ("flex-check", "peer-check"):
            entry[r["impl"]] = r["value"]
            continue
        ms = r.get("ms")
        entry[(r["impl"], r["mode"], r["direction"])] = ms if ms is not None else r.get("why")
        if r["impl"] == "flex" and ms is not None:
            entry["variants"][r["direction"]] = r["variant"]
    return entries


def timing_rows(key, entry) -> list[dict]:
    """One row per mode and direction; SDPA and Flex (mode independent) repeat in both;
    the peer is full mode only."""
    dtype, D, N = key
    rows = []
    for mode in MODES:
        for direction in DIRECTIONS:
            row = {"dtype": dtype, "mode": mode, "direction": direction, "N": N, "D": D,
                   "flex_variant": entry["variants"].get(direction, ""),
                   "flex_vs_op_sparse": entry.get("flex-check") if direction == "fwd" else None,
                   "peer_vs_op_full": (entry.get("peer-check")
                                       if direction == "fwd" and mode == "full" else None)}
            notes = []
            impls = [("op", mode), ("op_masked", mode), ("sdpa", None), ("flex", None),
                     ("reference", mode)]
            if mode == "full" and any(k[0] == "peer" for k in entry if isinstance(k, tuple)):
                impls.append(("peer", "full"))
            for impl, key_mode in impls:
                value = entry.get((impl, key_mode, direction), "skipped: not reached")
                row[f"{impl}_ms"] = None if isinstance(value, str) else value
                if isinstance(value, str):
                    notes.append(f"{impl}: {value.removeprefix('skipped: ')}")
            for impl in ("op_masked", "sdpa", "flex", "peer"):
                if row["op_ms"] and row.get(f"{impl}_ms"):
                    row[f"{impl}_over_op"] = row[f"{impl}_ms"] / row["op_ms"]
            row["notes"] = "; ".join(notes)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- kernels

# (name fragment, formula, flops(R, n, N, D, K)); the first fragment found in the op name
# wins. R = B*H rows, n = N/32 blocks per row, K = selected blocks per row, b = 32.
FLOPS = (
    ("pool_and_logits", "3*R*N*D + 2*R*n^2*D",
     lambda R, n, N, D, K: 3 * R * N * D + 2 * R * n * n * D),
    ("bwd_dkdv", "8*b^2*D*K*R", lambda R, n, N, D, K: 8 * BLOCK**2 * D * K * R),
    ("bwd_dq", "6*b^2*D*K*R", lambda R, n, N, D, K: 6 * BLOCK**2 * D * K * R),
    ("bwd_lowres", "6*R*n^2*D", lambda R, n, N, D, K: 6 * R * n * n * D),
    ("bwd_prep", "2*R*N*D", lambda R, n, N, D, K: 2 * R * N * D),
    ("lowres", "2*R*n^2*D", lambda R, n, N, D, K: 2 * R * n * n * D),
    ("hires_units", "(overflow share; counted in hires_rows)", None),
    ("hires", "4*b^2*D*K*R (all selected blocks)", lambda R, n, N, D, K: 4 * BLOCK**2 * D * K * R),
)


@functools.cache
def device_report(directory: Path) -> dict:
    """A library's ``device_report.json`` (read once per directory); {} without one."""
    path = directory / mc.library.CUDA_REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def device_resources(rec: dict) -> dict:
    """What ptxas gave the CUDA kernels of one traced call in the bundle's own build
    (its ``device_report.json``): the most registers per thread of its kernels and their
    spill stores (bytes); {} where no library of ``MRA_COMPILE_KERNEL_LIBRARY`` has them."""
    key = mc.build.kernel_key(rec["op"], rec["static"], rec["resolved"], rec["target"])
    prefix = mc.library.symbol(key) + "_kernel"
    for directory in mc.library.directories():
        found = [entry for name, entry in device_report(Path(directory)).items()
                 if name == prefix or name.startswith(prefix + "_")]
        if found:
            return {"registers": max(e.get("registers", 0) for e in found),
                    "spill B": sum(e.get("spill_stores", 0) for e in found)}
    return {}


def kernel_table(dev, smoke: bool, rates: dict, emit) -> str:
    """Trace one forward and one backward, re-time each kernel call on its own arguments
    (one row each, emitted as it is timed); returns the table's note."""
    dtype, D, N = SMOKE_SUMMARY if smoke else SUMMARY
    H = 2 if smoke else 16
    n = N // BLOCK
    K = BLOCKS_PER_ROW * n
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v, g = (torch.randn(1, H, N, D, generator=gen, device=dev).to(dtype) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    padded = torch.arange(N, device=dev)[None, :] < N - N // 8  # (bool: the last N/8 padded)
    with torch.no_grad():
        op_fwd = bench_ms(lambda: op(q, k, v, None, K, "full"), dev)
        masked_fwd = bench_ms(lambda: op(q, k, v, padded, K, "full"), dev)
        with without_graphs():
            op_usual = bench_ms(lambda: op(q, k, v, None, K, "full"), dev)
            masked_usual = bench_ms(lambda: op(q, k, v, padded, K, "full"), dev)
    totals = {}
    with mc.build.trace_kernel_calls() as calls:
        op(q, k, v, None, K, "full")
    passes = [("forward", list(calls))]
    # The backward called directly: autograd runs a CUDA backward on its own device
    # thread, where this thread's trace sees no call (the first H200 run's backward rows
    # were missing so).
    opts = mc.options.Options(K, "full")
    with torch.no_grad():
        with mc.build.trace_kernel_calls() as calls:
            out, saved = mc.forward.mra_forward(q, k, v, None, opts, save=True)
        # The training forward's own kernels: those with P split in two (its float32
        # output, which the backward reads); the rest are the inference forward's.
        passes.append(("training forward", [c for c in calls if c["static"].get("split_pv")]))
        with mc.build.trace_kernel_calls() as calls:
            mc.backward.mra_backward(g, q, k, v, None, out, saved, opts)
    passes.append(("backward", list(calls)))
    for name, recorded in passes:
        for rec in recorded:
            fn = mc.build.kernel(rec["op"], rec["knobs"], rec.get("target", "llvm"), **rec["static"])
            ms = bench_ms(lambda f=fn, a=rec["args"]: f(*a), dev, target_ms=50)
            nbytes = sum(a.numel() * a.element_size() for a in rec["args"]
                         if isinstance(a, torch.Tensor))
            formula, flops = "not estimated", None
            for fragment, text, count in FLOPS:
                if fragment in rec["op"]:
                    formula, flops = text, count and count(H, n, N, D, K)
                    break
            static = ",".join(f"{key}={val}" for key, val in sorted(rec["static"].items()))
            emit({"table": "kernel", "pass": name, "kernel": f"{rec['op']}({static})",
                  "ms": ms, "bytes": nbytes, "GB/s": nbytes / ms / 1e6,
                  "% copy bw": 100 * nbytes / ms / 1e6 / rates["copy_GBps"],
                  "flops": flops, "flop formula": formula,
                  "TFLOP/s": flops / ms / 1e9 if flops else None,
                  "% matmul": (100 * flops / ms / 1e9 / rates["matmul_TFLOPs"]
                               if flops else None), **device_resources(rec)})
            totals[name] = totals.get(name, 0.0) + ms
    return (f"{short_dtype(dtype)}, B=1, H={H}, N={N}, D={D}, {BLOCKS_PER_ROW} blocks/row, "
            "full mode. "
            f"Sum of kernel times: forward {totals.get('forward', 0):.3f} ms (whole op forward "
            f"{op_fwd:.3f} ms; {op_usual:.3f} ms without its CUDA graphs, "
            f"{mc.cuda_graphs.ENV}=0), backward {totals.get('backward', 0):.3f} ms. "
            f"With a bool padding mask (the last N/8 tokens): {masked_fwd:.3f} ms, "
            f"{masked_usual:.3f} ms without graphs.")


# ---------------------------------------------------------------------------- output

def fmt(value, field: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if field in ("error", "limit", "flex_vs_op_sparse", "peer_vs_op_full"):
            return "inf" if math.isinf(value) else f"{value:.2e}"
        if field.endswith("over_op"):
            return f"{value:.2f}x"
        if field in ("flops",):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "/").replace("\n", " ")


def md_table(fields, rows) -> str:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(r.get(f), f) for f in fields) + " |" for r in rows]
    return "\n".join(lines)


def latest_per_task(rows: list[dict]) -> list[dict]:
    """One row per task, the last written: a case whose row was measured before its worker
    died, or before the device was found broken after it, is superseded by its FAIL row."""
    last = {r.get("task", i): r for i, r in enumerate(rows)}
    return list(last.values())


def collect(results: Results, smoke: bool) -> dict:
    """What the report shows, from the results file alone (any worker may have written it)."""
    order = {(short_dtype(dt), D, N): i for i, (dt, D, N) in enumerate(timing_configs(smoke))}
    entries = timing_entries(results.rows("timing"))
    rates = results.rows("rates")
    return {"env": [(r["fact"], r["value"]) for r in results.rows("env")],
            "notes": [r["text"] for r in results.rows("note")],
            "rates": rates[-1] if rates else {},
            "correctness": latest_per_task(results.rows("correctness")),
            "timings": [row for key in sorted(entries, key=lambda k: order.get(k, len(order)))
                        for row in timing_rows(key, entries[key])],
            "kernels": results.rows("kernel"),
            "kernel_note": " ".join(r["text"] for r in results.rows("kernel_note")),
            "tune": results.rows("tune"),
            "tune_note": " ".join(r["text"] for r in results.rows("tune_note"))}


def verdict(ratio, need: float) -> str:
    """A speed-up against a must-show threshold."""
    if ratio is None:
        return "n/a"
    return f"{ratio:.2f}x, needs >= {need:g}x: {'yes' if ratio >= need else 'NO'}"


def speed_line(rows, cfg, H: int, direction: str, needs: dict) -> str:
    """The op against each peer at one configuration, with the must-show thresholds."""
    dtype, D, N = cfg
    head = f"{direction} {short_dtype(dtype)} N={N} D={D} B*H={H} {BLOCKS_PER_ROW} blocks/row"
    row = next((r for r in rows if r["dtype"] == short_dtype(dtype) and r["D"] == D
                and r["N"] == N and r["mode"] == "full" and r["direction"] == direction), None)
    if row is None or row["op_ms"] is None:
        return f"{head}: op not measured"
    names = {"sdpa": "SDPA flash", "flex": "Flex on the same blocks", "peer": "MRA-2 on Flex"}
    parts = [f"op {fmt(row['op_ms'])} ms"]
    for impl, need in needs.items():
        ms = row.get(f"{impl}_ms")
        parts.append(f"{names[impl]} {fmt(ms) or 'n/a'} ms "
                     f"({verdict(row.get(f'{impl}_over_op'), need)})")
    return f"{head}: " + "; ".join(parts)


def summary_lines(report, smoke: bool, fatal: list[str]) -> list[str]:
    corr = report["correctness"]
    counts = {s: sum(r["status"] == s for r in corr) for s in ("PASS", "FAIL", "SKIPPED")}
    ok = counts["FAIL"] == 0 and counts["PASS"] > 0 and not fatal
    lines = [f"every correctness check passes: {'yes' if ok else 'no'} "
             f"({counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped)"]
    for check in CHECKS:
        rows = [r for r in corr if r["check"] == check]
        by = collections.Counter(r["status"] for r in rows)
        lines.append(f"{check}: {by['PASS']} of {len(rows)} pass"
                     + (f", {by['FAIL']} FAIL" if by["FAIL"] else "")
                     + (f", {by['SKIPPED']} skipped" if by["SKIPPED"] else ""))
    cfg, H = (SMOKE_SUMMARY, 2) if smoke else (SUMMARY, 16)
    lines.append(speed_line(report["timings"], cfg, H, "fwd", {"sdpa": 5, "flex": 1, "peer": 1}))
    lines.append(speed_line(report["timings"], cfg, H, "fwd+bwd",
                            {"sdpa": 3, "flex": 1, "peer": 1}))
    lines.append(f"kernels timed against copy bandwidth and matmul rate: {len(report['kernels'])}")
    lines.append(f"tuning: {len(report['tune'])} rows. {report['tune_note'] or 'not run'}")
    return lines


def render(report, meta) -> str:
    out = ["# MRA-2 CUDA check (bench/gpu_check.py)", "",
           f"`{' '.join(meta['argv'])}` — {meta['date']}, {meta['elapsed']:.0f} s of "
           f"{meta['budget']:.0f} s budget", "", "## Summary", ""]
    out += [f"- {line}" for line in summary_lines(report, meta["smoke"], meta["fatal"])
            + meta["fatal"] + meta["notes"] + report["notes"]]
    out += ["", "## Environment", "", md_table(("fact", "value"),
                                               [{"fact": k, "value": v} for k, v in report["env"]])]
    out += ["", "## Correctness", "",
            "Relative error = max |out − ref| / max |ref| over real tokens (gradients: over "
            "dq, dk, dv together), ref = mra2_reference in float64 on the same device with the "
            "op's own block selection; limits fp32 1e-5, fp16 2e-3, bf16 1e-2 (gradients 1e-4, "
            "1e-2, 5e-2). stream: the op launched on a side stream held back by a sleep while "
            "the default stream sleeps longer, against the eager result; misaligned: q, k, v, mask "
            "at an odd storage offset against aligned copies; graph: a mask-free "
            "forward captured in a CUDA graph, replayed on new inputs, against eager."]
    failing = [r for r in report["correctness"] if r["status"] == "FAIL"]
    if failing:
        out += ["", "### Failing checks", "", md_table(CORR_FIELDS, failing), "", "### All checks"]
    out += ["", md_table(CORR_FIELDS, report["correctness"])]
    out += ["", "## Timings", "",
            "Median ms (CUDA events; wall clock on a CPU) after warm-up, no L2 flush; forward "
            "under no_grad; B=1, "
            f"{BLOCKS_PER_ROW} blocks per row; SDPA = flash backend; Flex = torch.compile'd "
            "flex_attention on the op's selected blocks (variant bs32: BLOCK_SIZE=32 BlockMask, "
            "the op's exact work; bs128+mask_mod: 128-token tiles with a per-token lookup, more "
            "work); peer = MRA-2 full mode on Flex (bench/flex_mra.py: the op's selection, "
            "compiled flex with its LSE on the exact blocks, the coarse part in torch, merged "
            "in log space), end to end; op_masked = the op with a bool padding mask [1, N], "
            "its last eighth padding (the call a padded batch makes); "
            "X_over_op = X ms / op ms (above 1: the op is faster); "
            "flex_vs_op_sparse, peer_vs_op_full = rel. diff against the op (same function); "
            "reference = mra2_reference in the input dtype.", "",
            md_table(TIME_FIELDS, report["timings"])]
    rates = report["rates"]
    out += ["", "## Kernels", "",
            (f"Copy bandwidth {rates['copy_GBps']:.0f} GB/s ({rates['copy_desc']}, read + "
             f"write), matmul {rates['matmul_TFLOPs']:.1f} TFLOP/s ({rates['matmul_desc']}). "
             if rates else "") +
            "Bytes = sum of the tensor arguments' sizes (a lower bound: re-reads not counted); "
            "flops from the formula column; each kernel timed alone on its recorded "
            "arguments (tiny kernels: launch overhead included). " + report["kernel_note"], "",
            md_table(KERNEL_FIELDS, report["kernels"])]
    out += ["", "## Tuning", "",
            "bench/gpu_tune.py over the bundle's variants: each candidate (the best so far "
            "with one knob changed; knobs = those differing from the defaults) checked on a "
            f"B=1, H={TUNE_CHECK[0]}, N={TUNE_CHECK[1]} input against the float64 reference "
            "(error, limit), then timed against the best in alternating rounds (best_ms, ms, "
            "ratio = median of per-round ms / best ms); verify = defaults against the picks. "
            + report["tune_note"], "", md_table(gpu_tune.TUNE_FIELDS, report["tune"])]
    return "\n".join(out) + "\n"


def write_outputs(results: Results, meta) -> str:
    """gpu_check.md and the CSV files, rebuilt from the results file."""
    out_dir = meta["out"]
    out_dir.mkdir(parents=True, exist_ok=True)
    meta["elapsed"] = time.monotonic() - meta["start"]
    report = collect(results, meta["smoke"])
    text = render(report, meta)
    (out_dir / "gpu_check.md").write_text(text)
    for name, fields, rows in (("correctness.csv", CORR_FIELDS, report["correctness"]),
                               ("timings.csv", TIME_FIELDS, report["timings"]),
                               ("kernels.csv", KERNEL_FIELDS, report["kernels"]),
                               ("tuning.csv", gpu_tune.TUNE_FIELDS, report["tune"])):
        with open(out_dir / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return text


# ---------------------------------------------------------------------------- tasks

def config_name(cfg) -> str:
    return f"{short_dtype(cfg[0])}-D{cfg[1]}-N{cfg[2]}"


def plan_tasks(args, start: float) -> list[Task]:
    """Every unit of work in the order it runs, each with its allowance (seconds before it
    counts as hung) and latest start: correctness until 40% of the budget; the must-show
    timings (op, SDPA, Flex, the peer) and the kernel table next; the other timing
    configurations while time is left. Parent and workers build the same list."""
    end = start + args.budget_seconds
    corr_by, time_by = start + 0.40 * args.budget_seconds, end - (20 if args.smoke else 45)
    tasks = [Task("env", "env", 60), Task("rates", "rates", 90)]
    for i, case in enumerate(draw_cases(args.seed, args.smoke)):
        name = (f"correctness/{i:03d}-{case['check']}-{short_dtype(case['dtype'])}-"
                f"{case['mode']}-B{case['B']}H{case['H']}N{case['N']}D{case['D']}")
        tasks.append(Task(name, "correctness", 120, corr_by, case))
    summary = SMOKE_SUMMARY if args.smoke else SUMMARY
    others = [cfg for cfg in timing_configs(args.smoke) if cfg != summary]
    tasks += [Task(f"baselines/{config_name(summary)}", "baselines", 240, time_by, summary),
              Task(f"flex/{config_name(summary)}", "flex", 300, time_by, summary),
              Task(f"peer/{config_name(summary)}", "peer", 300, time_by, summary),
              Task("kernels", "kernels", 180, end - 5), Task("tune", "tune", 240, time_by)]
    tasks += [Task(f"baselines/{config_name(c)}", "baselines", 240, time_by, c) for c in others]
    tasks += [Task(f"flex/{config_name(c)}", "flex", 300, time_by, c) for c in others]
    if args.only:
        tasks = [t for t in tasks if t.kind in args.only or t.kind in ("env", "rates")]
    return tasks


def failure_rows(task: Task, status: str, message: str) -> list[dict]:
    """What stands for a task that did not finish: a correctness case keeps its row (FAIL,
    or SKIPPED when never started), anything else becomes a note."""
    if task.kind == "correctness":
        row = correctness_row(task.spec)
        row.update(status="SKIPPED" if status == "skipped" else "FAIL", message=message)
        return [row]
    return [{"table": "note", "text": f"{task.id}: {status}: {message}"}]


def device_problem(dev) -> str | None:
    """None while the device still runs work, else the error: a sticky CUDA error (an
    illegal address, a launch failure) fails every later call of this process, so the
    worker must hand over to a fresh one. Frees cached memory on the way."""
    try:
        free_memory(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.ones(1, device=dev).add_(1).item()
    except Exception as exc:  # noqa: BLE001  (any failure here means: start afresh)
        return short(exc)
    return None


class Context:
    """What the task runners of one worker share."""

    def __init__(self, dev, args, results: Results, start: float):
        self.dev, self.args, self.results, self.start = dev, args, results, start
        self.until = start + args.budget_seconds - (20 if args.smoke else 45)
        self.flex_state = None

    def progress(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {msg}", flush=True)

    def flex(self):
        """flex_attention, compiled once per worker; the BlockMask variants that failed in
        earlier workers are not tried again."""
        if self.flex_state is None:
            self.flex_state = make_flex(self.dev)
            for r in self.results.rows("flexfail"):
                self.flex_state.failed[(r["direction"], r["variant"])] = r["why"]
        return self.flex_state


def run_env(_, ctx, emit) -> None:
    for fact, value in environment(ctx.dev, ctx.args.bundle):
        emit({"table": "env", "fact": fact, "value": value})


def run_rates(_, ctx, emit) -> None:
    emit({"table": "rates", **machine_rates(ctx.dev, ctx.args.smoke)})


def run_kernels(_, ctx, emit) -> None:
    rates = ctx.results.rows("rates")
    if not rates:
        raise RuntimeError("no machine rates: the rates task did not finish")
    note = kernel_table(ctx.dev, ctx.args.smoke, rates[-1], emit)
    emit({"table": "kernel_note", "text": note})


def tuning_pass(direction: str, config: dict, q, k, v, g, opts):
    """The forward (under no_grad) or forward + backward with kernel knobs ``config``."""
    if direction == "fwd":
        with torch.no_grad():
            return (mc.forward.mra_forward(q, k, v, None, opts, knobs=config),)
    out, saved = mc.forward.mra_forward(q, k, v, None, opts, knobs=config, save=True)
    return mc.backward.mra_backward(g, q, k, v, None, out, saved, opts, knobs=config)


def run_tune(_, ctx, emit) -> None:
    """Task 4 of the module docstring (bench/gpu_tune.py)."""
    failed = [r for r in latest_per_task(ctx.results.rows("correctness")) if r["status"] == "FAIL"]
    if failed:
        emit({"table": "tune_note", "text": f"Not run: {len(failed)} correctness checks "
                                            "failed in this run (tune a passing build)."})
        return
    dev, smoke = ctx.dev, ctx.args.smoke
    dtype, D, N = SMOKE_SUMMARY if smoke else SUMMARY
    H = 2 if smoke else 16
    target = mc.targets.of_device(dev)
    ops = mc.records.tunable_ops(target)
    Dp = -(-D // mc.kernels.HEAD_DIM_MULTIPLE) * mc.kernels.HEAD_DIM_MULTIPLE
    manifests = [json.loads((Path(d) / mc.library.MANIFEST).read_text())
                 for d in mc.library.directories() if (Path(d) / mc.library.MANIFEST).is_file()]
    points = gpu_tune.bundle_points(manifests, ops, Dp, str(dtype).removeprefix("torch."))
    if not any(len(held) > 1 for held in points.values()):
        emit({"table": "tune_note", "text": f"Not run: no kernel library of "
              f"MRA_COMPILE_KERNEL_LIBRARY holds variants of {', '.join(ops)} for "
              f"{short_dtype(dtype)}, D={D} (mra-compile build ... --tuning-variants "
              f"{str(dtype).removeprefix('torch.')}:{D})."})
        return
    default = {op: target.default_knobs(op) for op in ops}
    gen = torch.Generator(device=dev).manual_seed(5)
    big = [torch.randn(1, H, N, D, generator=gen, device=dev).to(dtype) for _ in range(4)]
    opts = mc.options.Options(BLOCKS_PER_ROW * (N // BLOCK), "full")
    heads, n_check = TUNE_CHECK if not smoke else (2, 256)
    small = [torch.randn(1, heads, n_check, D, generator=gen, device=dev).to(dtype)
             for _ in range(4)]
    small_opts = mc.options.Options(BLOCKS_PER_ROW * (n_check // BLOCK), "full")
    sel = selection(*small[:3], None, small_opts.num_blocks, "full")
    leaves = [x.double().requires_grad_() for x in small[:3]]
    ref = mc.reference.mra2_reference(*leaves, None, num_blocks=small_opts.num_blocks,
                                      approx_mode="full", selection=sel)
    want = torch.autograd.grad(ref, leaves, small[3].double())

    def check(direction, config):
        got = tuning_pass(direction, config, *small, small_opts)
        if direction == "fwd":
            return rel_error(got[0], ref.detach(), None)[0], FWD_LIMIT[dtype]
        return gradient_error(got, want)[0], BWD_LIMIT[dtype]

    def measure(direction, a, b, rounds=5):
        return gpu_tune.paired_ms(lambda: tuning_pass(direction, a, *big, opts),
                                  lambda: tuning_pass(direction, b, *big, opts),
                                  lambda fn: bench_ms(fn, dev, warmup=1, target_ms=40), rounds)

    def emit_row(row):
        emit({"table": "tune", **row})

    best = gpu_tune.search(points, default, check, measure, emit_row,
                           lambda: ctx.until - time.monotonic())
    picks, ratios = gpu_tune.verify(best, default,
                                    lambda d, a, b: measure(d, a, b, rounds=9), emit_row)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    recs = gpu_tune.records_of(picks, default, ratios, target=target, dtype=dtype,
                               bucket=mc.knob_policy.shape_bucket(N, D), device=device,
                               command="bench/gpu_check.py (tune)")
    path = gpu_tune.write_records(recs, ctx.args.out)
    held = ", ".join(f"{op} {len(p)}" for op, p in points.items())
    emit({"table": "tune_note", "text": (
        f"{short_dtype(dtype)}, B=1, H={H}, N={N}, D={D}, {BLOCKS_PER_ROW} blocks/row, full "
        f"mode; variants in the bundle: {held}. "
        + (f"{len(recs)} records written to {path}: "
           + "; ".join(f"{r['op']} {gpu_tune.knobs_text(r['knobs'], default[r['op']])}"
                       for r in recs) + "."
           if recs else "No pick beat the defaults: no records."))})


RUNNERS = {"env": run_env, "rates": run_rates, "correctness": run_correctness,
           "baselines": time_baselines, "flex": time_flex, "peer": time_peer,
           "kernels": run_kernels, "tune": run_tune}


# ---------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="kernel bundle from mra-compile build --target cuda")
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("OUT") or REPO_ROOT / "bench" / "results" / "gpu"))
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="wall-clock budget of the whole run (default 420; 1800 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-max-gb", type=float, default=48.0,
                   help="time the dense reference only while its estimated peak fits")
    p.add_argument("--only", nargs="+", choices=sorted(RUNNERS),
                   help="run only these kinds of task (env and rates always run)")
    p.add_argument("--resume", action="store_true",
                   help=f"keep --out/{RESULTS} and run only the tasks it does not end")
    p.add_argument("--worker-of", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_seconds is None:
        args.budget_seconds = 1800.0 if args.smoke else 420.0
    return args


def import_package() -> None:
    global mc
    mc = importlib.import_module("mra_compile")
    for module in ("reference", "build", "forward", "backward", "options", "targets",
                   "records", "kernels", "library", "knob_policy", "cuda_graphs"):
        importlib.import_module(f"mra_compile.{module}")


def worker_main(args) -> int:
    """A worker: runs the tasks the results file has not begun, on the device."""
    results = Results(args.out / RESULTS)
    try:
        bootstrap(args.bundle, [])
        import_package()
    except Exception as exc:  # noqa: BLE001  (reported in the file; the parent gives up)
        results.append({"table": "note", "text": f"worker setup failed: {short(exc)}"})
        return 1
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(dev, args, results, args.worker_of)

    def run(task: Task, emit) -> None:
        ctx.progress(task.id)
        RUNNERS[task.kind](task.spec, ctx, emit)

    with open(args.out / "worker_stacks.txt", "a") as stacks:
        code = gpu_driver.work(plan_tasks(args, args.worker_of), results, run,
                               lambda: device_problem(dev), failure_rows, stacks)
    # Where this worker's kernels came from: "library" is the bundle, "compiled" needs TVM.
    origins = collections.Counter(e["origin"] for e in mc.cache_events())
    results.append({"table": "env", "fact": f"kernels loaded by worker {os.getpid()}",
                    "value": ", ".join(f"{v} {k}" for k, v in origins.items()) or "none"})
    return code


def main(argv=None) -> int:
    """The supervisor: never touches the device; workers do, one after another."""
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    if args.worker_of is not None:
        return worker_main(args)
    start = time.monotonic()
    results = Results(args.out / RESULTS)
    if not args.resume and results.path.exists():
        results.path.unlink()  # a fresh run; --resume continues an interrupted one
    meta = {"argv": ["python", "bench/gpu_check.py", *raw],
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "start": start, "budget": args.budget_seconds, "smoke": args.smoke,
            "out": args.out, "fatal": [], "notes": []}
    try:
        bootstrap(args.bundle, meta["notes"])  # once here, so workers find tvm_ffi installed
    except Exception as exc:  # noqa: BLE001  (report it in the files rather than crash)
        meta["fatal"].append(f"setup failed: {short(exc)}")
        print(write_outputs(results, meta))
        return 1
    tasks = plan_tasks(args, start)
    print(f"{len(tasks)} tasks; rows appended to {results.path} as they are measured", flush=True)
    worker = [sys.executable, str(Path(__file__).resolve()), *raw, "--worker-of", repr(start)]
    gpu_driver.supervise(tasks, results, lambda: subprocess.Popen(worker), failure_rows,
                         deadline=start + args.budget_seconds,
                         on_progress=lambda: write_outputs(results, meta))
    text = write_outputs(results, meta)
    print(text)
    lines = summary_lines(collect(results, args.smoke), args.smoke, meta["fatal"])
    print("\n".join(lines))
    print(f"files in {args.out}: gpu_check.md correctness.csv timings.csv kernels.csv "
          f"tuning.csv {RESULTS} (and {gpu_tune.RECORDS_FILE} when tuning picked knobs)")
    return 0 if lines[0].startswith("every correctness check passes: yes") else 1


if __name__ == "__main__":
    sys.exit(main())
