"""ptxas report of every CUDA kernel, without a GPU: registers, spills, stack frame.

    python bench/cuda_report.py                       # sm_80 and sm_90, D 64 and 128
    python bench/cuda_report.py --arch sm_90 --head-dims 64 --out /tmp/report.md

Builds the kernel library (``mra_compile.aot.build_library``) for each architecture
into a temporary directory and writes one table per architecture (default
``bench/results/cuda_ptxas.md``) from what ptxas reported in that build's own nvcc compile
(the library's ``device_report.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mra_compile import aot, cuda_toolchain, library  # noqa: E402

HOT = ("hires_units", "hires_rows", "bwd_dq_units", "bwd_dkdv_units")


def report(arch: str, head_dims, dtypes) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        aot.build_library(tmp, (32,), head_dims, dtypes, log=lambda *_: None,
                              target=f"cuda-{arch}")
        manifest = json.loads((Path(tmp) / library.MANIFEST).read_text())
        source = (Path(tmp) / library.CUDA_SOURCE).read_text()
        device_report = json.loads((Path(tmp) / library.CUDA_REPORT).read_text())
    entries = {e["symbol"]: e for e in manifest["kernels"]}
    symbols = cuda_toolchain.kernel_symbols(source)
    rows = []
    for name, stats in device_report.items():
        e = entries[symbols[name]]
        st = e["static"]
        variant = ",".join(f"{k}={v}" for k, v in sorted(st.items()) if k not in ("b", "D"))
        rows.append({"op": e["op"], "D": st["D"], "variant": variant or "float32",
                     "kernel": name.removeprefix(symbols[name] + "_") or "kernel",
                     "hot": e["op"] in HOT, **{k: v for k, v in stats.items() if k != "mma"}})
    return sorted(rows, key=lambda r: (r["op"], r["D"], r["variant"], r["kernel"]))


def markdown(arch: str, rows: list[dict]) -> str:
    lines = [f"### {arch}", "",
             "| op | D | variant | kernel | registers | spill stores (B) | spill loads (B) "
             "| stack frame (B) |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        op = f"**{r['op']}**" if r["hot"] else r["op"]
        lines.append(f"| {op} | {r['D']} | {r['variant']} | {r['kernel']} | "
                     f"{r.get('registers', '')} | {r.get('spill_stores', 0)} | "
                     f"{r.get('spill_loads', 0)} | {r.get('stack_frame', 0)} |")
    spilling = [r for r in rows if r["hot"] and r.get("spill_stores", 0)]
    lines += ["", f"Hot kernels (bold) with spills: {len(spilling)} of "
                  f"{sum(r['hot'] for r in rows)}"
              + "".join(f"; {r['op']} D={r['D']} {r['variant']}: {r['spill_stores']} B"
                        for r in spilling), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "cuda_ptxas.md"))
    args = p.parse_args()
    parts = [f"# ptxas -v of every CUDA kernel ({date.today()})", "",
             f"`python bench/cuda_report.py --arch {' '.join(args.arch)} --head-dims "
             f"{' '.join(map(str, args.head_dims))}`: nvcc "
             f"{cuda_toolchain.nvcc_version()}, block size 32, default knobs. What ptxas "
             "reported in each library's own build (`device_report.json`: the shipped flags, "
             f"{' '.join(cuda_toolchain.NVCC_OPTIONS[:2])}). Compiled only: no GPU was used.",
             ""]
    for arch in args.arch:
        parts.append(markdown(arch, report(arch, args.head_dims, args.dtypes)))
    Path(args.out).write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
