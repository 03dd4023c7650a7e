"""The op from two checkouts of this repository, one process each, alternated.

    python bench/compare_checkouts.py /path/to/old/checkout . --rounds 3

Each round runs one process per checkout (in alternating order); a process imports
``mra_compile`` from its checkout (first on ``sys.path``; an old checkout needs its
``mra_compile/schedules`` link to ``../schedules``, as ``pip install -e`` gives) with its
own kernel cache (``MRA_COMPILE_CACHE_DIR``: ``<checkout>/.bench-cache`` unless set) and
times the forward (full mode, B*H=12, D=64, 4 blocks per row; median of 11 back-to-back
calls after 3 warm-up calls) at N=1024, 4096 and 8192, and forward+backward at N=4096
(median of 5), and an attention layer's call at N=1024 and 4096 ("layer": sparse mode,
q, k, v transposed views of [1, N, 12, 64] tensors, the output transposed back to
[1, N, 12, 64] and made contiguous, as the layer does). ``--training DTYPE ...`` adds
a training step in each of those dtypes at N=4096 and 8192 (the op's forward and
``backward`` with a given gradient, the leaves' gradients reset after it; median of 5
after 2). Two checkouts cannot share one process (one package name), hence processes;
their alternation is what keeps the comparison fair on a noisy machine.

    python bench/compare_checkouts.py /tmp/before . --rounds 5 --training bfloat16 float16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import mra_compile
assert mra_compile.__file__.startswith(sys.argv[1]), mra_compile.__file__
res = {}
for N in (1024, 4096, 8192):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, N, 64, generator=g) for _ in range(3))
    nb = 4 * (N // 32)
    with torch.no_grad():
        for _ in range(3):
            torch.ops.mra.attention(q, k, v, None, nb, "full")
        ts = []
        for _ in range(11):
            t0 = time.perf_counter()
            torch.ops.mra.attention(q, k, v, None, nb, "full")
            ts.append(time.perf_counter() - t0)
    res[f"fwd N={N}"] = statistics.median(ts) * 1e3
    if N == 4096:
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        ts = []
        for i in range(7):
            t0 = time.perf_counter()
            torch.ops.mra.attention(qq, kk, vv, None, nb, "full").sum().backward()
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        res[f"fwd+bwd N={N}"] = statistics.median(ts) * 1e3
for N in (1024, 4096):  # (an attention layer's call: heads-last views in, transposed back)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, N, 12, 64, generator=g).transpose(1, 2) for _ in range(3))
    nb = 4 * (N // 32)
    with torch.no_grad():
        for _ in range(3):
            torch.ops.mra.attention(q, k, v, None, nb, "sparse").transpose(1, 2).contiguous()
        ts = []
        for _ in range(11):
            t0 = time.perf_counter()
            torch.ops.mra.attention(q, k, v, None, nb, "sparse").transpose(1, 2).contiguous()
            ts.append(time.perf_counter() - t0)
    res[f"layer N={N}"] = statistics.median(ts) * 1e3
for name in filter(None, sys.argv[2].split(",")):
    for N in (4096, 8192):
        g = torch.Generator().manual_seed(0)
        leaves = [torch.randn(1, 12, N, 64, generator=g).to(getattr(torch, name))
                  .requires_grad_() for _ in range(3)]
        grad = torch.randn(1, 12, N, 64, generator=g).to(leaves[0].dtype)
        ts = []
        for i in range(7):
            t0 = time.perf_counter()
            torch.ops.mra.attention(*leaves, None, 4 * (N // 32), "full").backward(grad)
            for x in leaves:
                x.grad = None
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        res[f"step {name} N={N}"] = statistics.median(ts) * 1e3
print(json.dumps(res))
"""


def run(checkout: Path, training: list[str]) -> dict:
    env = dict(os.environ)
    env.setdefault("MRA_COMPILE_CACHE_DIR", str(checkout / ".bench-cache"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkout), ",".join(training)],
                         env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="checkout of the code before")
    p.add_argument("after", type=Path, help="checkout of the code after")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--training", nargs="*", default=[], metavar="DTYPE",
                   choices=["float32", "bfloat16", "float16"],
                   help="also a training step in these dtypes at N=4096 and 8192")
    args = p.parse_args()
    paths = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            results[name].append(run(paths[name], args.training))
    keys = list(results["before"][0])
    print("| | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, rows in results.items():
        cells = [", ".join(f"{row[k]:.1f}" for row in rows) for k in keys]
        print(f"| {name} ({len(rows)} processes) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
