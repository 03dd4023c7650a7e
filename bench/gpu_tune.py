"""Tuning the CUDA knobs on a GPU, from the variants a kernel bundle was built with.

A GPU machine has torch but no TVM, so it cannot compile a variant: the bundle carries
them (``mra-compile build --target cuda ... --tuning-variants bfloat16:64``: every legal
point of ``SPACES`` in ``schedules/cuda.py`` for that input dtype and head dim), and this
module chooses among those. ``bench/gpu_check.py`` runs it as its ``tune`` task, once the
correctness checks of the run have passed (or alone: ``--only tune``).

The search (``search``) walks the tunable kernels in order: ``hires_rows`` and
``hires_units`` timing the forward, ``bwd_dq_units`` and ``bwd_dkdv_units`` timing
forward + backward, each knob of a kernel in turn over the values the bundle holds,
starting from the defaults and keeping the best point so far (coordinate descent; no
point is tried twice).
Before it is timed, a candidate must compute the right function: its output (gradients
for the backward's kernels) on a smaller input against the float64 reference with the
op's own block selection, within the dtype's tolerance. Candidate and best are timed in
alternating rounds; the candidate replaces the best when the median of its per-round time
ratios to the best is below ``1 - MIN_GAIN``. A last verification times the defaults
against the picks (more rounds); picks of a pass that is not at least ``MIN_GAIN`` faster
there go back to the defaults.

The picks are written as CUDA tuning records (``mra_compile.records``: the target, e.g.
``cuda-sm_90``, the input dtype and the shape bucket) to ``cuda_tuned.json``; merged into
``schedules/tuned/cuda-sm_90.json`` of a checkout, they become the knobs the op uses on
that architecture, and the next ``mra-compile build`` compiles them into the bundle.
"""
from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Callable
from pathlib import Path

# The kernels each timed pass tunes, in order: the forward's first, with their picks
# kept while the backward's are timed.
PHASES = (("fwd", ("hires_rows", "hires_units")),
          ("fwd+bwd", ("bwd_dq_units", "bwd_dkdv_units")))
MIN_GAIN = 0.02  # a candidate must be this much faster than the best (GPU timing noise)
RECORDS_FILE = "cuda_tuned.json"
TUNE_FIELDS = ("step", "kernel", "knobs", "error", "limit", "best_ms", "ms", "ratio", "status")


def knobs_text(knobs: dict, default: dict) -> str:
    """The knobs that differ from ``default``, as ``threads=256 vector_bytes=8``."""
    changed = {k: v for k, v in knobs.items() if default.get(k) != v}
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in changed.items()) or "defaults"


def bundle_points(manifests: list[dict], ops, D: int, dtype: str) -> dict[str, list[dict]]:
    """``{op: [knobs, ...]}``: the knob settings the libraries (their manifests) hold for
    each of ``ops`` at head dim ``D`` (padded) and q/k/v dtype ``dtype`` (plain heads; a
    kernel with modes must have both)."""
    found: dict[str, dict[str, list]] = {}
    for manifest in manifests:
        for entry in manifest.get("kernels", []):
            static = entry.get("static", {})
            io = static.get("io", static.get("dtype", "float32"))
            if entry.get("op") in ops and static.get("D") == D and io == dtype \
                    and not static.get("gqa"):
                key = json.dumps(entry["knobs"], sort_keys=True)
                modes = found.setdefault(entry["op"], {}).setdefault(key, [])
                modes.append(static.get("full"))
    return {op: [json.loads(key) for key, modes in by_knobs.items()
                 if None in modes or {True, False} <= set(modes)]
            for op, by_knobs in found.items()}


def search(points: dict[str, list[dict]], default: dict[str, dict],
           check: Callable[[str, dict], tuple[float, float]],
           measure: Callable[[str, dict, dict], tuple[float, float, float]],
           emit: Callable[[dict], None], time_left: Callable[[], float]) -> dict[str, dict]:
    """The best ``{op: knobs}`` found from ``default`` over ``points`` (``bundle_points``).

    check(direction, config) -> (error, limit) of the pass under ``config``;
    measure(direction, best, candidate) -> (best ms, candidate ms, median ratio
    candidate / best); emit(row) gets one row per candidate (``TUNE_FIELDS``);
    time_left() -> seconds: the search stops (keeping what it found) below 10."""
    best = {op: dict(k) for op, k in default.items()}
    for direction, ops in PHASES:
        for op in ops:
            held = points.get(op, [])
            if default.get(op) not in held:
                emit({"step": direction, "kernel": op, "knobs": "defaults",
                      "status": "not tuned: the bundle lacks its default variant"})
                continue
            seen = [default[op]]  # points of this kernel checked or timed already
            for knob in default[op]:
                for value in sorted({p[knob] for p in held}, key=str):
                    candidate = {**best[op], knob: value}
                    if candidate in seen or candidate not in held:
                        continue
                    seen.append(candidate)
                    row = {"step": direction, "kernel": op,
                           "knobs": knobs_text(candidate, default[op])}
                    if time_left() < 10:
                        emit({**row, "status": "not timed: out of time"})
                        continue
                    config = {**best, op: candidate}
                    error, limit = check(direction, config)
                    row.update(error=error, limit=limit)
                    if not error <= limit:  # (a NaN error fails too)
                        emit({**row, "status": "WRONG: not timed"})
                        continue
                    best_ms, ms, ratio = measure(direction, best, config)
                    faster = ratio < 1 - MIN_GAIN
                    emit({**row, "best_ms": best_ms, "ms": ms, "ratio": ratio,
                          "status": "faster: kept" if faster else "not faster"})
                    if faster:
                        best = config
    return best


def verify(best: dict[str, dict], default: dict[str, dict],
           measure: Callable[[str, dict, dict], tuple[float, float, float]],
           emit: Callable[[dict], None]) -> tuple[dict[str, dict], dict[str, float]]:
    """The picks that stand a last comparison with the defaults: per pass (``PHASES``,
    each with the forward's picks in place), the pass's picks are dropped unless the
    pass is at least ``MIN_GAIN`` faster with them. Returns (picks, {direction: ratio})."""
    kept = {op: dict(k) for op, k in default.items()}
    ratios = {}
    for direction, ops in PHASES:
        changed = [op for op in ops if best.get(op) != default.get(op)]
        if not changed:
            continue
        tuned = {**kept, **{op: best[op] for op in changed}}
        base_ms, ms, ratio = measure(direction, kept, tuned)
        good = ratio < 1 - MIN_GAIN
        emit({"step": "verify " + direction, "kernel": ", ".join(changed),
              "knobs": "; ".join(knobs_text(best[op], default[op]) for op in changed),
              "best_ms": base_ms, "ms": ms, "ratio": ratio,
              "status": "kept" if good else "dropped: defaults stay"})
        if good:
            kept = tuned
            ratios[direction] = ratio
    return kept, ratios


def records_of(picks: dict[str, dict], default: dict[str, dict], ratios: dict[str, float],
               *, target, dtype, bucket: str, device: str, command: str) -> list[dict]:
    """Tuning records (``mra_compile.records``) of the picks that differ from the
    defaults."""
    from mra_compile import records

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = []
    for direction, ops in PHASES:
        for op in ops:
            if op in picks and picks[op] != default.get(op):
                out.append(records.make_record(
                    op, bucket, picks[op], target=target, dtype=dtype, device=device,
                    measured=date, command=command,
                    pass_ratio=round(ratios.get(direction, 1.0), 4), pass_timed=direction))
    return out


def write_records(recs: list[dict], out_dir: Path) -> Path | None:
    """``recs`` merged into ``out_dir/cuda_tuned.json`` (None: nothing to write)."""
    if not recs:
        return None
    from mra_compile import records

    return records.save(Path(out_dir) / RECORDS_FILE, recs)


def paired_ms(run_a: Callable[[], None], run_b: Callable[[], None],
              time_ms: Callable[[Callable[[], None]], float],
              rounds: int) -> tuple[float, float, float]:
    """(median ms of a, of b, median of the per-round ratios b / a); the two alternate,
    the order reversed every other round."""
    a_ms, b_ms = [], []
    for r in range(rounds):
        if r % 2:
            b_ms.append(time_ms(run_b))
            a_ms.append(time_ms(run_a))
        else:
            a_ms.append(time_ms(run_a))
            b_ms.append(time_ms(run_b))
    from mra_compile.tuning import paired_ratio

    return statistics.median(a_ms), statistics.median(b_ms), paired_ratio(a_ms, b_ms)
