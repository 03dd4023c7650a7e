"""The op with q, k, v on 2 MB pages (transparent huge pages) against the same values on the
usual 4 KB pages, on the CPU.

torch puts its large CPU tensors on huge pages with ``THP_MEM_ALLOC_ENABLE=1``
(where the kernel's THP mode is ``madvise`` or ``always``); this measures what that is
worth to the op, in one process: the inputs copied into an
anonymous mapping asked for huge pages (``madvise(MADV_HUGEPAGE)``, 2 MB aligned) against
torch's own tensors, the two calls alternating (``tools.common.median_ms``), their
outputs compared bit for bit. ``--cold``: each call right after a read of 64 MB.

    python bench/bench_huge_pages.py                  # bench/results/huge_pages_cpu.md
    python bench/bench_huge_pages.py --sizes 4096 --dtypes bfloat16 --out /tmp/huge.md
"""
from __future__ import annotations

import argparse
import mmap
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mra_compile  # noqa: E402,F401  (registers torch.ops.mra.attention)
from mra_compile.tools import common  # noqa: E402
from mra_compile.tools.benchmarks import report_head  # noqa: E402

HUGE = 2 << 20
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def anon_huge_kb() -> int:
    """This process's anonymous memory on huge pages, kB (``/proc/self/smaps_rollup``)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


class HugeCopies:
    """Copies of tensors on memory asked for 2 MB pages; ``close()`` unmaps it."""

    def __init__(self):
        self.maps: list[mmap.mmap] = []

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)  # (before the first touch: the faults take 2 MB pages)
        self.maps.append(m)
        raw = torch.frombuffer(m, dtype=torch.uint8)
        start = -raw.data_ptr() % HUGE
        out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        return out

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # (a tensor still views it: the mapping goes with it)
                pass
        self.maps.clear()


def timed(plain, copies, n: int, approx: str, rounds: int, evict) -> tuple[float, float]:
    """Median ms of the op on ``plain`` and on ``copies`` (the same values on other pages),
    alternating, after checking that the two give the same bits."""
    def call(x):
        return torch.ops.mra.attention(*x, None, 4 * (-(-n // 32)), approx)

    if not torch.equal(call(plain), call(copies)):
        raise SystemExit(f"N={n} {plain[0].dtype} {approx}: the outputs differ with the inputs "
                         "on other pages")
    ms = common.median_ms({"small": lambda: call(plain), "huge": lambda: call(copies)}, rounds,
                          alternate=True, before=evict)
    return ms["small"], ms["huge"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="sequence lengths N")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--modes", nargs="+", default=["sparse", "full"], choices=["sparse", "full"])
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds (median)")
    p.add_argument("--cold", action="store_true", help="a 64 MB read before each call")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "huge_pages_cpu.md")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.rounds < 1:
        p.error("--sizes and --rounds must be positive")
    mode = thp_mode()
    if mode not in ("always", "madvise"):
        p.error(f"transparent huge pages are {mode or 'unknown'} here ({THP_MODE}): nothing "
                "to compare")
    evict = torch.ones(16 << 20).sum if args.cold else None
    lines = report_head(
        "q, k, v on 2 MB pages against 4 KB pages",
        f"B*H=12 D=64, 4 blocks/row; median ms of {args.rounds} interleaved rounds"
        f"{', each call after a 64 MB read' if args.cold else ''}; the kernel's THP mode: {mode}",
        ["N", "dtype", "mode", "4 KB pages ms", "2 MB pages ms", "ratio", "inputs on huge pages"])
    for line in lines:
        print(line)
    for n in args.sizes:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            g = torch.Generator().manual_seed(n)
            plain = [torch.randn(1, 12, n, 64, generator=g).to(dtype) for _ in range(3)]
            huge = HugeCopies()
            before = anon_huge_kb()
            copies = [huge.copy(t) for t in plain]
            on_huge = (anon_huge_kb() - before) * 1024 / sum(t.numel() * t.element_size()
                                                             for t in plain)
            for approx in args.modes:
                small_ms, huge_ms = timed(plain, copies, n, approx, args.rounds, evict)
                lines.append(f"| {n} | {name} | {approx} | {small_ms:.2f} | {huge_ms:.2f} | "
                             f"{huge_ms / small_ms:.3f}x | {min(on_huge, 1.0):.0%} |")
                print(lines[-1])
            copies.clear()
            huge.close()
    given = sys.argv[1:] if argv is None else argv
    lines += ["", f"Command: `{' '.join(['python bench/bench_huge_pages.py', *given])}`"]
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
