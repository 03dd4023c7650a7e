"""What the tools share: test inputs ``[B, H, N, D]``, the error measure, one timer, the
machine description and the matplotlib loader.

The two input generators are the ones the demo, the accuracy study and the benchmark
compare on: i.i.d. noise (flat attention) and ``local_prefix_inputs`` (local attention
plus a shared prefix, the demo's input).
"""
from __future__ import annotations

import importlib.metadata
import math
import platform
import statistics
import time
from pathlib import Path

import torch

BLOCK_SIZE = 32  # tokens per block in every tool
CORRELATION_LENGTH = 64  # tokens: how far the random walk of queries/keys stays similar
LOCAL_LOGIT = 8.0  # q.k/sqrt(D) of a token with itself
PREFIX_TOKENS = 32  # the shared prefix every query attends to (one block)
PREFIX_LOGIT = 6.0  # extra q.k/sqrt(D) towards a prefix token
QUERY_NOISE = 0.3


# ---------------------------------------------------------------------------- inputs

def random_qkv(B: int, H: int, N: int, D: int, gen: torch.Generator):
    """q, k, v [B, H, N, D], i.i.d. N(0, 1), fp32: flat attention, no structure."""
    return tuple(torch.randn(B, H, N, D, generator=gen) for _ in range(3))


def smooth_walk(B: int, H: int, N: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """[B, H, N, D] AR(1) random walk along the tokens: unit variance, correlation exp(-|t-s|/L)."""
    rho = math.exp(-1.0 / CORRELATION_LENGTH)
    steps = torch.randn(B, H, N, D, generator=gen)
    x = torch.empty_like(steps)
    x[:, :, 0] = steps[:, :, 0]
    keep, fresh = rho, math.sqrt(1.0 - rho * rho)
    for t in range(1, N):
        x[:, :, t] = keep * x[:, :, t - 1] + fresh * steps[:, :, t]
    return x


def local_prefix_inputs(B: int, H: int, N: int, D: int, gen: torch.Generator):
    """q, k, v [B, H, N, D] whose attention is local plus a shared prefix.

    The first D-1 coordinates of q and k follow one smooth random walk, scaled so that a
    token's logit with itself is about LOCAL_LOGIT and falls off with distance. The
    last coordinate is reserved: every query and the first PREFIX_TOKENS keys carry a
    constant there, adding PREFIX_LOGIT to every logit towards the prefix. Values are
    i.i.d. N(0, 1).
    """
    x = smooth_walk(B, H, N, D - 1, gen)
    a = math.sqrt(LOCAL_LOGIT * math.sqrt(D) / (D - 1))
    c = math.sqrt(PREFIX_LOGIT * math.sqrt(D))
    q = torch.zeros(B, H, N, D)
    k = torch.zeros(B, H, N, D)
    q[..., :-1] = a * (x + QUERY_NOISE * torch.randn(x.shape, generator=gen))
    k[..., :-1] = a * x
    q[..., -1] = c
    k[:, :, :PREFIX_TOKENS, -1] = c
    v = torch.randn(B, H, N, D, generator=gen)
    return q, k, v


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| per (batch, head) of [B, H, N, D], averaged."""
    num = (approx - exact).flatten(2).norm(dim=-1)
    return (num / exact.flatten(2).norm(dim=-1)).mean().item()


def worst_head_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """max |approx - exact| / max |exact| per (batch, head) of [B, H, N, D], the largest:
    the measure the tests hold a dtype's tolerance to (in float64)."""
    err = (approx.double() - exact.double()).abs().amax(dim=(-1, -2))
    return (err / exact.double().abs().amax(dim=(-1, -2)).clamp_min(1e-30)).max().item()


# ---------------------------------------------------------------------------- timing

def median_ms(fns: dict, rounds: int, on_round=None, alternate: bool = False,
              before=None) -> dict:
    """Median milliseconds per call of each of ``fns`` (name -> zero-argument callable).

    Interleaved: each round calls every function once, in turn, so machine noise hits
    all of them alike. A single function is timed back to back. ``on_round(i)`` (if given)
    is called before round i (1-based): a progress counter. ``alternate``: every other
    round in the reverse order, so that no function always runs right after the same one
    (what it leaves in the caches). ``before``: a zero-argument callable run (untimed)
    before each call.
    """
    samples = round_ms(fns, rounds, on_round, alternate, before)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def round_ms(fns: dict, rounds: int, on_round=None, alternate: bool = False,
             before=None) -> dict:
    """``median_ms``' samples: name -> milliseconds of each round's call, in round order
    (entry i of every list is from the same round: ratios within a round see one state
    of the machine)."""
    samples: dict = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        if on_round is not None:
            on_round(r + 1)
        for name, fn in order[::-1] if alternate and r % 2 else order:
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


# ---------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has
    them: a VM's "AMD EPYC" alone does not tell a Zen 4 (family 25) from a Zen 5 (26),
    whose vector units differ twofold."""
    try:
        fields: dict = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's entry only
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
            return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed); ImportError says
    how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'mra-compile[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(path, lines: list[str]) -> None:
    """Write a benchmark's markdown ``lines`` to ``path`` (its folder created) and say so."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
