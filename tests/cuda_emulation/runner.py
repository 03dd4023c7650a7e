"""The emulated process: ``python runner.py SPEC.json OUT.json``.

The fake NVIDIA driver and runtime are loaded first (they stand in for the real ones in
this process only), then mra_compile, whose CPU tensors take the CUDA target's path
(``emulator.install``). SPEC (JSON):

    fakes, libs            build_fakes() and build_emulation() outputs
    manifest               the CUDA library's manifest.json (kernel names -> operators)
    env                    variables to set before importing mra_compile
                           (MRA_COMPILE_KERNEL_LIBRARY, MRA_COMPILE_CACHE_DIR, ...)
    cases                  [{dtype, mode, masked, B, H, N, D, num_blocks, seed, backward,
                             inference, Nk (optional: cross-attention, with a query mask
                             too)}]: the op's training forward (and backward; with
                             ``inference``, an inference forward too) on random inputs,
                             against the float64 reference with the op's own selection
 or kernels                [{name, grid, block, smem, args: [{bytes} | {int} | {float}]}]:
                           hand-written kernels launched through the driver API

OUT (JSON): per case the forward and backward errors, the checks' findings, the
operators called; every kernel function launched; the kernels' origins; statistics.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: cuda_emulation

from cuda_emulation import emulator  # noqa: E402


def _clean(findings: list[dict]) -> list[dict]:
    out = []
    for f in findings:
        f = {k: v for k, v in f.items() if k not in ("key", "report")}
        out.append(f)
    return out


def _row_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| over each (batch, head) row; the worst row."""
    out, ref = out.double(), ref.double()
    err = (out - ref).abs().amax(dim=(-1, -2))
    size = ref.abs().amax(dim=(-1, -2))
    return (err / size.clamp_min(1e-30)).max().item()


def _inputs(case: dict):
    import torch

    g = torch.Generator().manual_seed(case["seed"])
    B, H, N, D = case["B"], case["H"], case["N"], case["D"]
    Nk = case.get("Nk", N)
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
    Hkv = case.get("Hkv", H)  # grouped-query heads: fewer key/value heads
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(2))
    mask = query_mask = None
    if case["masked"]:
        mask = (torch.rand(B, Nk, generator=g) > 0.25).float()
        mask[:, 32:64] = 0  # a whole block of padding (its pooled vectors are empty)
        mask[:, 0] = 1
        mask[-1, Nk - Nk // 3:] = 0  # padding at the end of one sequence
    if "real_queries" in case:  # only the first ones real
        query_mask = torch.zeros(B, N)
        query_mask[:, :case["real_queries"]] = 1
    elif "Nk" in case:  # cross-attention: the queries' own padding
        query_mask = torch.ones(B, N)
        query_mask[0, N - N // 4:] = 0
    grad_out = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    return q, k, v, mask, query_mask, grad_out


class HostReads:
    """Where the op reads a tensor's values on the host (``item``, ``tolist``, ``numpy``,
    ``cpu``, ``bool()``, ``int()``, ``float()``, a tensor as an index) while the context
    is open: on a GPU each is a synchronisation with the device, which a CUDA graph's
    capture refuses (the op captures masked and unmasked calls alike,
    ``mra_compile.cuda_graphs``). Reads made by the emulation or the test are not the
    op's: only those whose nearest caller outside torch is in ``mra_compile`` count."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
    PACKAGE = str(Path(__file__).resolve().parent.parent.parent / "mra_compile")

    def __init__(self):
        self.where: list[str] = []

    def __enter__(self):
        import torch

        self._saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._recording(name, original))
        return self

    def __exit__(self, *exc):
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _recording(self, name, original):
        def read(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(self.PACKAGE):
                where = (f"{name} in {Path(frame.f_code.co_filename).name}:{frame.f_lineno} "
                         f"({frame.f_code.co_name})")
                if where not in self.where:
                    self.where.append(where)
            return original(tensor, *args, **kwargs)
        return read


def run_case(emu: emulator.Emulator, case: dict) -> dict:
    import torch

    from mra_compile.backward import mra_backward
    from mra_compile.forward import block_selection, mra_forward
    from mra_compile.options import Options
    from mra_compile.reference import mra2_reference

    q, k, v, mask, query_mask, grad_out = _inputs(case)
    budget = dict(num_blocks=case.get("num_blocks"), block_per_row=case.get("block_per_row"),
                  scale=case.get("scale"))
    opts = Options(approx_mode=case["mode"], **budget)
    mask64 = None if mask is None else mask.double()
    ref_kw = dict(approx_mode=case["mode"], **budget, enable_gqa="Hkv" in case,
                  query_mask=None if query_mask is None else query_mask.double())
    result: dict = {"case": case}
    emu.findings.clear()
    emu.calls.clear()
    emu.forget_writes()
    start = time.perf_counter()
    reads = HostReads()
    try:
        with reads:
            out, saved = mra_forward(q, k, v, mask, opts, knobs=case.get("knobs"), save=True,
                                     query_mask=query_mask)
        # the op's blocks, for the oracle
        selection = block_selection(q, k, v, mask, opts, query_mask)
        ref = mra2_reference(q.double(), k.double(), v.double(), mask64, selection=selection,
                             **ref_kw)
        forward = {"error": _row_rel_err(out, ref), "dtype": str(out.dtype),
                   "finite": bool(torch.isfinite(out).all())}
        queries = mask if query_mask is None else query_mask
        if queries is not None:
            padded = (queries == 0)[:, None, :].expand(q.shape[:3])
            forward["padding_zero"] = bool((out[padded] == 0).all())
        forward["training_calls"] = list(emu.calls)
        if case.get("inference"):  # no backward: the output in q's dtype, scratch memory
            with reads:
                plain = mra_forward(q, k, v, mask, opts, knobs=case.get("knobs"),
                                    query_mask=query_mask)
            forward.update(inference_error=_row_rel_err(plain, ref),
                           inference_dtype=str(plain.dtype),
                           inference_finite=bool(torch.isfinite(plain).all()))
    except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
        forward = {"exception": traceback.format_exc()[-3000:]}
    forward.update(findings=_clean(emu.findings), calls=list(emu.calls),
                   seconds=time.perf_counter() - start, host_reads=reads.where)
    result["forward"] = forward
    if not case.get("backward") or "exception" in forward:
        return result
    emu.findings.clear()
    emu.calls.clear()
    start = time.perf_counter()
    reads = HostReads()
    try:
        with reads:
            grads = mra_backward(grad_out.to(q.dtype), q, k, v, mask, out, saved, opts,
                                 knobs=case.get("knobs"), query_mask=query_mask)
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = mra2_reference(*leaves, mask64, selection=selection, **ref_kw)
        ref.backward(grad_out)
        scale = max(x.grad.abs().max().item() for x in leaves) or 1.0
        errors = [((mine.double() - theirs.grad).abs().max() / scale).item()
                  for mine, theirs in zip(grads, leaves)]
        own = [((mine.double() - theirs.grad).abs().max()
                / theirs.grad.abs().max().clamp_min(1e-30)).item()
               for mine, theirs in zip(grads, leaves)]
        backward = {"errors": dict(zip(("dq", "dk", "dv"), errors)),
                    "own_errors": dict(zip(("dq", "dk", "dv"), own)),
                    "finite": all(bool(torch.isfinite(x).all()) for x in grads)}
    except Exception:  # noqa: BLE001
        backward = {"exception": traceback.format_exc()[-3000:]}
    backward.update(findings=_clean(emu.findings), calls=list(emu.calls),
                    seconds=time.perf_counter() - start, host_reads=reads.where)
    result["backward"] = backward
    return result


# --------------------------------------------------------------- hand-written kernels


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h, CUDA 13)
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p), ("numAttrs", ctypes.c_uint)]


def run_kernels(emu: emulator.Emulator, specs: list[dict], image: bytes) -> list[dict]:
    """Launch each kernel of ``specs`` through cuModuleLoadData / cuModuleGetFunction /
    cuLaunchKernelEx once per variant; its buffers (``args``: {"bytes": n, "fill": byte,
    "name"}) come from cudaMalloc and are initialised by the host (cudaMemcpyAsync), as
    a program would. Returns per kernel: the launch results, the reports, whether the
    buffers agree across the variants, and their contents (variant 0, as lists of
    floats)."""
    cuda, cudart = emu.core, emu.cudart
    cudart.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    cudart.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_int, ctypes.c_void_p]
    cudart.cudaFree.argtypes = [ctypes.c_void_p]
    cuda.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    cuda.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                         ctypes.c_char_p]
    cuda.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p]
    cuda.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    module = ctypes.c_void_p()
    assert cuda.cuModuleLoadData(ctypes.byref(module), image) == 0
    out = []
    for spec in specs:
        func = ctypes.c_void_p()
        rc = cuda.cuModuleGetFunction(ctypes.byref(func), module, spec["name"].encode())
        if rc:
            out.append({"name": spec["name"], "error": f"cuModuleGetFunction: {rc}"})
            continue
        runs = []
        for variant in emu.variants:
            cuda.emu_set_variant(variant.lib, variant.threads, variant.blocks, variant.seed,
                                 variant.preempt, variant.poison)
            values, keep, buffers = [], [], []
            for arg in spec["args"]:
                if "bytes" in arg:
                    ptr = ctypes.c_void_p()
                    assert cudart.cudaMalloc(ctypes.byref(ptr), arg["bytes"]) == 0
                    data = arg.get("data") or [arg.get("fill", 0)] * arg["bytes"]
                    host = (ctypes.c_uint8 * arg["bytes"])(*data)
                    if arg.get("init", True):
                        cudart.cudaMemcpyAsync(ptr, host, arg["bytes"], 1, None)
                    buffers.append((ptr, arg["bytes"]))
                    value = ctypes.c_void_p(ptr.value + arg.get("offset", 0))
                elif "int" in arg:
                    value = ctypes.c_int(arg["int"])
                else:
                    value = ctypes.c_float(arg["float"])
                keep.append(value)
                values.append(ctypes.cast(ctypes.pointer(value), ctypes.c_void_p))
            params = (ctypes.c_void_p * len(values))(*values)
            grid, block = spec["grid"], spec["block"]
            config = _LaunchConfig(*grid, *block, spec.get("smem", 0), None, None, 0)
            rc = cuda.cuLaunchKernelEx(ctypes.byref(config), func, params, None)
            name = ctypes.c_char_p()
            cuda.cuGetErrorName(rc, ctypes.byref(name))
            contents = [bytes((ctypes.c_uint8 * n).from_address(p.value)) for p, n in buffers]
            runs.append({"variant": variant.name, "rc": rc, "error": name.value.decode(),
                         "reports": emu.take_reports(), "contents": contents})
            for p, _ in buffers:
                cudart.cudaFree(p)
        contents = [r["contents"] for r in runs]
        out.append({
            "name": spec["name"],
            "runs": [{k: v for k, v in r.items() if k != "contents"} for r in runs],
            "differs": [r["variant"] for r in runs[1:] if r["contents"] != contents[0]],
            "floats": [list(memoryview(c).cast("f")) if len(c) % 4 == 0 else []
                       for c in contents[0]],
        })
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    manifest = json.loads(Path(spec["manifest"]).read_text()) if spec.get("manifest") else None
    # The fakes before anything loads TVM's CUDA runtime: it then binds to them.
    emu = emulator.Emulator(spec["fakes"], spec["libs"], manifest)
    os.environ.update(spec.get("env", {}))
    report: dict = {}
    start = time.perf_counter()
    if "kernels" in spec:
        report["kernels"] = run_kernels(emu, spec["kernels"], Path(spec["image"]).read_bytes())
    else:
        import torch

        import mra_compile

        # torch.empty fills with NaN / the largest integer: never-written elements of the
        # buffers handed to the kernels are known (and marked uninitialised on the device).
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        torch.set_num_threads(1)
        emulator.install(emu, spec.get("arch", "sm_80"))
        report["results"] = [run_case(emu, case) for case in spec["cases"]]
        report["origins"] = sorted({e["origin"] for e in mra_compile.cache_events()})
        report["launched"] = sorted(emu.launched)
    report["stats"] = emu.stats()
    report["seconds"] = time.perf_counter() - start
    Path(sys.argv[2]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
