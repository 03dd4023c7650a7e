"""Autotuning of the CPU schedules' knobs: measure candidates, keep the fastest, persist them.

The search space of every operator is ``mra_compile.schedules.cpu.SPACES`` (legal values
per knob, filtered by ``cpu.constraints``). For every shape bucket the tuner runs these
phases, each starting from the default knobs and keeping the best found so far:

1. ``pool_and_logits``, ``lowres_out``: ``vec``, timing the kernel alone.
2. ``plan``: (``row_unit_blocks``, ``blocks_per_unit``) jointly, timing the whole forward
   (``forward.mra_forward(..., knobs=...)``): they change the work plan, how the blocks are
   split between ``hires_rows`` and ``hires_units``, and ``hires_rows`` merges the output
   of ``hires_units``, so only the whole pass measures them fairly.
3. ``hires_units``, ``hires_rows``: the micro knobs (``vec``, ``qk_rows``, ``pv_rows``,
   ``unroll``), each kernel timed alone under the best plan found (a kernel that plan
   does not call, e.g. ``hires_units`` without overflow units, is skipped).

Candidates come in order: the default first, then (``search="random"``) random points
and neighbours of the best (one knob one step away), until the phase's share of the
budget is spent; ``search="exhaustive"`` walks the whole space in order. Candidate and
best are timed in the same rounds, alternating (so machine noise hits both alike); the
candidate replaces the best when the median of its per-round time ratios to the best is
below 0.99. A last verification times default against tuned again (more rounds) for the
table, whose gains are such paired medians too; tuned knobs that are not at least 1%
faster there are dropped for the defaults (per kernel; the plan by the whole pass).

Progress (stderr, ``mra_compile.progress``; ``progress=False`` or ``MRA_COMPILE_QUIET=1``
silences it): during the search, a status per stage, named by what it tunes
(``plan (row_unit_blocks, blocks_per_unit)``, ``hires_rows (vec, qk_rows, ...)``), with
the points tried and the pick so far. At each stage's end a line with its pick and its
gain over the stage's start (the two timed together, ``rounds`` rounds: a relative
figure under the stage's own plan; no times, since the table's are re-measured against
the defaults). Then one line per row of the table with the table's own figures
(``OpResult.summary``), saying why a pick was dropped for the defaults.

Inputs are realistic: random q, k, v of the bucket's shape go through the real pipeline
(``forward.mra_forward``, with ``build.trace_kernel_calls`` recording every kernel's
arguments: padded inputs, pooled tensors, block selection, ``plan.make_plan``'s plan for the
candidate's blocks), so each kernel is timed on valid block indices with the data it
really gets. Timing uses ``time.perf_counter`` around calls of the loaded kernels (TVM's
``time_evaluator`` is not available on the runtime-only modules ``build.kernel`` loads):
median of several rounds after warm-up, with enough calls per sample to last >= 2 ms.

Results are written as records (``mra_compile.records``; by default to the user db, never
into the package), which ``knob_policy.resolve_knobs`` then uses automatically.
``chosen_knobs(op, bucket)`` tells which knobs an operator would use and where they come
from.
"""
from __future__ import annotations

import datetime
import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mra_compile import build, forward, knob_policy, records, runtime, targets
from mra_compile.options import Options
from mra_compile.progress import Status

OPS = records.tunable_ops()  # pool_and_logits, lowres_out, hires_units, hires_rows
# The knobs that change the work plan (how the blocks are split between the two kernels).
BLOCK_KNOBS = {"hires_rows": "row_unit_blocks", "hires_units": "blocks_per_unit"}
MIN_GAIN = 0.01  # a candidate must beat the best by this fraction to replace it
DEFAULT_BUDGET_S = 60.0


# ---------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """One tuning shape: ``rows`` = B*H, sequence ``N``, head dim ``D``, block size, and
    the selection density (``num_blocks = blocks_per_row * N / block_size``), "full" mode."""

    rows: int = 12
    N: int = 4096
    D: int = 64
    block_size: int = 32
    blocks_per_row: int = 4

    @property
    def bucket(self) -> str:
        return knob_policy.shape_bucket(self.N, self.D, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.blocks_per_row * -(-self.N // self.block_size)

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"4096"`` (N) or ``"12x4096x64"`` (B*H x N x D)."""
        parts = text.lower().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) == 1 and values[0] > 0:
            return cls(N=values[0])
        if len(values) == 3 and min(values) > 0:
            return cls(rows=values[0], N=values[1], D=values[2])
        raise ValueError(f"bad shape {text!r}: expected N (e.g. 4096) or BHxNxD (e.g. 12x4096x64)")

    def __str__(self):
        return f"{self.rows}x{self.N}x{self.D}"


DEFAULT_SHAPES = (Shape(N=1024), Shape(N=4096))


# ---------------------------------------------------------------------------- results

@dataclass
class Trial:
    phase: str
    bucket: str
    knobs: dict
    seconds: float
    best_seconds: float
    ratio: float  # median of the per-round ratios candidate / best
    accepted: bool


@dataclass
class OpResult:
    """Default against tuned for one operator (or ``"forward"``, the whole op) and bucket."""

    op: str
    bucket: str
    default_knobs: dict
    knobs: dict
    default_s: float  # median seconds
    tuned_s: float
    ratio: float = 1.0  # median over rounds of tuned / default (each round times both)
    kept_default: bool = False
    note: str = ""  # what the table says instead of the changed knobs ("" : them)
    called: bool = True  # False: the tuned plan does not call this kernel

    @property
    def gain_pct(self) -> float:
        """Time saved, from the paired ratio (robust to load that changes between rounds)."""
        return 100.0 * (1.0 - self.ratio)

    @property
    def changed(self) -> dict:
        return {k: v for k, v in self.knobs.items() if self.default_knobs.get(k) != v}

    def cells(self) -> tuple[str, str, str]:
        """Default ms, tuned ms and gain as the table and the progress lines show them."""
        if not self.called:
            return f"{1e3 * self.default_s:.3f}", "-", "-"
        return f"{1e3 * self.default_s:.3f}", f"{1e3 * self.tuned_s:.3f}", f"{self.gain_pct:+.1f}%"

    def comment(self) -> str:
        """The table's last column: the knobs changed, or why there are none."""
        changed = " ".join(f"{k}={fmt(v)}" for k, v in self.changed.items())
        if self.note:
            return f"{changed} ({self.note})" if changed else f"({self.note})"
        if not changed and self.ratio != 1.0:
            return "(default knobs; other work under the tuned plan)"
        return changed or "(the default was best)"

    def summary(self) -> str:
        """One line with the table row's figures (the tuner's last progress lines)."""
        default, tuned, gain = self.cells()
        if not self.called:
            return f"{self.op} {self.bucket}: default {default} ms, tuned: {self.comment()}"
        return (f"{self.op} {self.bucket}: default {default} ms, tuned {tuned} ms, "
                f"gain {gain} {self.comment()}")


@dataclass
class TuneResult:
    results: list[OpResult]
    trials: list[Trial]
    records: list[dict]
    db: Path | None
    seconds: float
    shapes: list[Shape] = field(default_factory=list)

    def best(self, op: str, bucket: str) -> dict:
        return next(r.knobs for r in self.results if r.op == op and r.bucket == bucket)

    def table(self) -> str:
        lines = [f"{'operator':<16} {'bucket':<15} {'default ms':>10} {'tuned ms':>9} "
                 f"{'gain':>7}  knobs changed from the default",
                 "-" * 96]
        for r in self.results:
            default, tuned, gain = r.cells()
            lines.append(f"{r.op:<16} {r.bucket:<15} {default:>10} {tuned:>9} {gain:>7}  "
                         f"{r.comment()}")
        lines.append("(ms: medians; gain: 1 - the median over rounds of tuned/default, both "
                     "timed in each round)")
        return "\n".join(lines)


def fmt(v) -> str:
    """A knob value as the CLI shows it (booleans lower-case)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


# ---------------------------------------------------------------------------- chosen knobs

@dataclass(frozen=True)
class Chosen:
    """The knobs ``op`` would use, and where they come from: ``"default"`` or the path of
    the records file (then ``bucket`` is the record's bucket and ``record`` the record)."""

    op: str
    knobs: dict
    source: str
    bucket: str | None = None
    record: dict | None = None


def chosen_knobs(op: str, bucket: str | None = None) -> Chosen:
    """What ``knob_policy.resolve_knobs(op, None, bucket)`` gives, with its origin.

    ``bucket``: ``knob_policy.shape_bucket(N, D, block_size)``; None means the record nearest
    to ``records.REFERENCE_BUCKET`` (what a caller that passes no shape gets).
    """
    match = records.lookup(op, bucket)
    knobs = knob_policy.resolve_knobs(op, None, bucket)
    if match is None:
        return Chosen(op, knobs, "default")
    return Chosen(op, knobs, str(match.path), match.record["bucket"], match.record)


# ---------------------------------------------------------------------------- spaces

PLAN = "plan"  # the stage tuning the plan's knobs (BLOCK_KNOBS), timing the whole forward


@dataclass
class _Phase:
    name: str  # an operator, or PLAN
    timed: str  # the kernel timed, or "forward"
    space: dict  # knob -> values; knobs not in it stay as they are
    weight: float

    @property
    def label(self) -> str:
        """What the stage tunes, as progress shows it: ``plan (row_unit_blocks, ...)``."""
        return f"{self.name} ({', '.join(self.space)})"

    def apply(self, config: dict, point: dict) -> dict:
        new = {op: dict(k) for op, k in config.items()}
        if self.name == PLAN:
            for op, knob in BLOCK_KNOBS.items():
                if knob in point:
                    new[op][knob] = point[knob]
        else:
            new[self.name].update(point)
        return new

    def point_of(self, config: dict) -> dict:
        if self.name == PLAN:
            return {knob: config[op][knob] for op, knob in BLOCK_KNOBS.items() if knob in self.space}
        return {k: config[self.name][k] for k in self.space}


def _key(point: dict) -> tuple:
    return tuple(sorted(point.items()))


def _legal(config: dict) -> bool:
    cpu = targets.CPU.schedules
    return all(cpu.constraints(op, knobs) for op, knobs in config.items() if op in cpu.SPACES)


def _phases(ops, spaces) -> list[_Phase]:
    """The phases for ``ops``; ``spaces[op]`` (if given) replaces ``SPACES[op]`` and knobs
    it leaves out stay at their defaults."""
    cpu = targets.CPU.schedules

    def space(op):
        return dict(spaces[op]) if spaces and op in spaces else dict(cpu.SPACES[op])

    phases = []
    for op in ("pool_and_logits", "lowres_out"):
        if op in ops:
            phases.append(_Phase(op, op, space(op), 1.0))
    blocks = {knob: space(op)[knob] for op, knob in BLOCK_KNOBS.items()
              if op in ops and knob in space(op)}
    if blocks:
        phases.append(_Phase(PLAN, "forward", blocks, 4.0))
    for op, weight in (("hires_units", 2.0), ("hires_rows", 3.0)):
        if op in ops:
            micro = {k: v for k, v in space(op).items() if k != BLOCK_KNOBS[op]}
            if micro:
                phases.append(_Phase(op, op, micro, weight))
    return phases


def _neighbours(point: dict, space: dict) -> list[dict]:
    out = []
    for knob, values in space.items():
        if point[knob] not in values:
            continue
        i = values.index(point[knob])
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                out.append({**point, knob: values[j]})
    return out


# ---------------------------------------------------------------------------- measuring

def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of other / base (samples of the same rounds)."""
    return statistics.median(o / b if b > 0 else 1.0 for b, o in zip(base, other))


def interleaved_samples(fns, rounds: int, warmup: int = 2, min_sample_s: float = 0.002,
                        clock=time.perf_counter) -> list[list[float]]:
    """Seconds per call of each of ``fns``, one sample per round: every round times each
    function once (enough calls to last ``min_sample_s``), in rotating order."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    t0 = clock()
    fns[0]()
    inner = max(1, min(200, math.ceil(min_sample_s / max(clock() - t0, 1e-7))))
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for j in range(len(fns)):
            i = (j + r) % len(fns)  # rotate who goes first
            fn = fns[i]
            t0 = clock()
            for _ in range(inner):
                fn()
            samples[i].append((clock() - t0) / inner)
    return samples


class Case:
    """Realistic inputs of one shape, run through the real pipeline (the tuner and
    ``bench/bench_tuning.py`` time kernels with it): ``runner(op, config)`` is a callable
    running kernel ``op`` (or ``"forward"``) with ``config`` = ``{op: knobs}``."""

    def __init__(self, shape: Shape, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.q, self.k, self.v = (torch.randn(1, shape.rows, shape.N, shape.D, generator=g)
                                  for _ in range(3))
        self._captures: dict[tuple, dict] = {}

    def forward(self, config: dict):
        s = self.shape
        return forward.mra_forward(self.q, self.k, self.v, None,
                                   Options(s.num_blocks, "full", s.block_size), knobs=config)

    def capture(self, config: dict) -> dict:
        """``{op: (static, args)}`` of every kernel the forward calls under ``config``'s
        plan. Arguments that are views (scratch buffers a later call may overwrite) are
        copied; the rest are fresh tensors of that call."""
        key = tuple(config[op][knob] for op, knob in BLOCK_KNOBS.items())
        cap = self._captures.get(key)
        if cap is None:
            with build.trace_kernel_calls() as calls:
                self.forward(config)
            cap = {}
            for c in calls:
                args = tuple(a.clone() if isinstance(a, torch.Tensor) and a._base is not None else a
                             for a in c["args"])
                cap[c["op"]] = (c["static"], args)
            if len(self._captures) >= 4:
                self._captures.pop(next(iter(self._captures)))
            self._captures[key] = cap
        return cap

    def runner(self, timed: str, config: dict):
        if timed == "forward":
            return lambda: self.forward(config)
        static, args = self.capture(config).get(timed, (None, None))
        if static is None:  # not called under this plan (no overflow units)
            return lambda: None
        fn = build.kernel(timed, config[timed], **static)
        return lambda: fn(*args)


class _RealTimer:
    def __init__(self, seed: int):
        self.seed = seed
        self.cases: dict[Shape, Case] = {}

    def case(self, shape: Shape) -> Case:
        case = self.cases.get(shape)
        if case is None:
            runtime.ensure()
            case = self.cases[shape] = Case(shape, self.seed)
        return case

    def __call__(self, shape: Shape, timed: str, configs: list[dict], rounds: int) -> list[list[float]]:
        case = self.case(shape)
        fns = [case.runner(timed, c) for c in configs]
        return interleaved_samples(fns, rounds)

    def called(self, shape: Shape, timed: str, config: dict) -> bool:
        """Whether the forward under ``config``'s plan calls kernel ``timed``."""
        return timed == "forward" or timed in self.case(shape).capture(config)


class _FakeTimer:
    """Adapts ``timer(op, bucket, knobs) -> seconds`` (tests): op is a kernel name with
    its knobs, or ``"forward"`` with ``{op: knobs}`` of every operator. ``called``
    (optional): ``called(op, bucket, config) -> bool``, whether config's plan calls op."""

    def __init__(self, fn, called=None):
        self.fn = fn
        self.is_called = called

    def __call__(self, shape, timed, configs, rounds):
        return [[float(self.fn(timed, shape.bucket, c if timed == "forward" else c[timed]))]
                for c in configs]

    def called(self, shape, timed, config) -> bool:
        return self.is_called is None or bool(self.is_called(timed, shape.bucket, config))


# ---------------------------------------------------------------------------- the tuner

def default_config() -> dict:
    """``{op: default knobs}`` of every tunable operator (records not applied)."""
    return {op: knob_policy.default_knobs(op) for op in OPS}


def tune(ops=None, shapes=None, *, budget_seconds: float | None = DEFAULT_BUDGET_S, db=None,
         search: str = "random", spaces: dict | None = None, seed: int = 0, rounds: int = 7,
         verify_rounds: int = 15, timer=None, progress: bool = True, write: bool = True,
         stream=None, called=None) -> TuneResult:
    """Tune ``ops`` (default: all four) for ``shapes`` (default: ``DEFAULT_SHAPES``) and
    write the records to ``db`` (default: ``records.default_write_path()``, the user db).

    budget_seconds: wall-clock budget of the search (None: unlimited; ``search="random"``
        then stops when the space is exhausted); the final verification comes on top when
        the budget is too small to hold it.
    spaces: ``{op: {knob: [values]}}`` replacing ``SPACES[op]``; knobs left out keep their
        default. Values must still be legal (``cpu.constraints``).
    progress, stream: progress lines (see the module docstring) on ``stream`` (default:
        stderr, or logging: ``mra_compile.progress``).
    timer: for tests, ``timer(op, bucket, knobs) -> seconds`` replaces measuring (no kernel
        is built); op is ``"forward"`` for the whole pass, with ``{op: knobs}``. With it,
        ``called(op, bucket, config) -> bool`` (default: always) tells whether a plan calls
        a kernel.
    """
    start = time.perf_counter()
    ops = tuple(OPS if not ops else ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown operators {unknown}; tunable: {list(OPS)}")
    if search not in ("random", "exhaustive"):
        raise ValueError(f"search must be 'random' or 'exhaustive', not {search!r}")
    shapes = [s if isinstance(s, Shape) else Shape.parse(str(s)) for s in (shapes or DEFAULT_SHAPES)]
    # One shape per bucket: records are per bucket.
    shapes = list({s.bucket: s for s in shapes}.values())
    measure = _FakeTimer(timer, called) if timer is not None else _RealTimer(seed)
    rng = random.Random(seed)
    show = Status("tune", budget=budget_seconds, stream=stream, enabled=progress)
    phases = _phases(ops, spaces)
    default = default_config()
    best = {s.bucket: {op: dict(k) for op, k in default.items()} for s in shapes}
    trials: list[Trial] = []
    reserve = 0.0 if budget_seconds is None else max(2.0, 0.12 * budget_seconds)

    try:
        for idx, phase in enumerate(phases):
            if budget_seconds is None:
                phase_budget = math.inf
            else:
                left = budget_seconds - reserve - (time.perf_counter() - start)
                weights = sum(p.weight for p in phases[idx:])
                phase_budget = max(0.0, left * phase.weight / weights)
            _search(phase, shapes, best, measure, rounds, phase_budget, search, rng, trials, show)
        picks = {b: {op: dict(k) for op, k in config.items()} for b, config in best.items()}
        results = _verify(ops, shapes, default, best, picks, measure, verify_rounds, show)
    finally:
        show.close()
    recs = _records_of(ops, shapes, default, results, trials, search, budget_seconds)
    path = None
    if write:
        path = Path(db) if db is not None else records.default_write_path()
        records.save(path, recs)
    return TuneResult(results, trials, recs, path, time.perf_counter() - start, shapes)


def _knobs_text(point: dict) -> str:
    return " ".join(f"{k}={fmt(v)}" for k, v in point.items())


def _changed(config: dict, default: dict, op: str, skip: str | None = None) -> str:
    """The knobs of ``op`` (but ``skip``) that ``config`` changes from ``default``, as text."""
    return _knobs_text({k: v for k, v in config[op].items()
                        if default[op].get(k) != v and k != skip})


def _moved(start: dict, point: dict) -> str:
    """``point``'s knobs that differ from ``start``, as text ("the start": none)."""
    return _knobs_text({k: v for k, v in point.items() if start.get(k) != v}) or "the start"


def _search(phase, shapes, best, measure, rounds, budget, search, rng, trials, show):
    start = time.perf_counter()
    keys = list(phase.space)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*phase.space.values())]
    visited = {_key(phase.point_of(best[s.bucket])) for s in shapes}
    space_keys = {_key(p) for p in points}
    durations: list[float] = []
    start_config = {s.bucket: best[s.bucket] for s in shapes}
    start_point = {s.bucket: phase.point_of(best[s.bucket]) for s in shapes}
    better = {s.bucket: 0 for s in shapes}  # candidates that replaced the best
    # A kernel the plan does not call (hires_units without overflow units) has nothing to
    # tune: timing it would time nothing.
    active = [s for s in shapes if measure.called(s, phase.timed, best[s.bucket])]

    def candidates():
        if search == "exhaustive":
            yield from points
            return
        while True:
            unvisited = [p for p in points if _key(p) not in visited]
            if not unvisited:
                return
            if rng.random() < 0.5:
                near = [p for s in active for p in _neighbours(phase.point_of(best[s.bucket]), phase.space)
                        if _key(p) not in visited and _key(p) in space_keys]
                if near:
                    yield rng.choice(near)
                    continue
            yield rng.choice(unvisited)

    for point in candidates() if active else ():
        elapsed = time.perf_counter() - start
        if durations and elapsed + statistics.mean(durations) > budget or elapsed > budget:
            break
        if _key(point) in visited:
            continue
        visited.add(_key(point))
        t0 = time.perf_counter()
        for s in active:
            incumbent = best[s.bucket]
            config = phase.apply(incumbent, point)
            if config == incumbent or not _legal(config):
                continue
            s_best, s_new = measure(s, phase.timed, [incumbent, config], rounds)
            ratio = paired_ratio(s_best, s_new)
            accepted = ratio < 1 - MIN_GAIN
            trials.append(Trial(phase.name, s.bucket, dict(point), statistics.median(s_new),
                                statistics.median(s_best), ratio, accepted))
            if accepted:
                best[s.bucket] = config
                better[s.bucket] += 1
            show.update(f"{phase.label} {s.bucket}: {len(durations) + 1}/{len(points)} points, "
                        f"{better[s.bucket]} faster found, pick "
                        f"{_moved(start_point[s.bucket], phase.point_of(best[s.bucket]))}")
        durations.append(time.perf_counter() - t0)
    took = time.perf_counter() - start
    for s in shapes:
        if s not in active:
            show.line(f"{phase.label} {s.bucket}: skipped, the plan calls no {phase.timed} here")
            continue
        where = f"{phase.label} {s.bucket}: {len(durations)}/{len(points)} points in {took:.1f} s"
        pick = _moved(start_point[s.bucket], phase.point_of(best[s.bucket]))
        if best[s.bucket] == start_config[s.bucket]:
            show.line(f"{where}: kept its start, no point was >= 1% faster ({rounds} rounds each)")
            continue
        # The pick against the start, timed together: a fair figure for the stage (a chain of
        # accepted candidates, each compared with the one before, is not).
        s_start, s_pick = measure(s, phase.timed, [start_config[s.bucket], best[s.bucket]], rounds)
        gain = 100 * (1 - paired_ratio(s_start, s_pick))
        show.line(f"{where}: pick {pick}, gain {gain:+.1f}% over its start ({rounds} rounds; "
                  "verified at the end)")


def _verify(ops, shapes, default, best, picks, measure, rounds, show) -> list[OpResult]:
    """Default against tuned per operator and for the whole pass; operators whose tuned
    knobs are not faster keep the defaults, and their rows say why. ``picks``: the
    search's picks (``best`` as the search left it)."""
    results: list[OpResult] = []
    for s in shapes:
        tuned, pick = best[s.bucket], picks[s.bucket]
        dropped: dict[str, str] = {}  # op -> why the search's pick was dropped
        show.update(f"verifying {s.bucket}: default against tuned, {rounds} rounds each")
        for op, knob in BLOCK_KNOBS.items():
            # Micro knobs were chosen under the tuned plan: keep them only if they still
            # beat the default micro knobs there.
            micro_default = {**default[op], knob: tuned[op][knob]}
            if op in ops and tuned[op] != micro_default and measure.called(s, op, tuned):
                alt = {**tuned, op: micro_default}
                s_alt, s_tun = measure(s, op, [alt, tuned], rounds)
                if paired_ratio(s_alt, s_tun) >= 1 - MIN_GAIN:
                    dropped[op] = (f"the search's {_changed(pick, default, op, knob)}: not >= 1% "
                                   "faster re-measured")
                    tuned[op] = micro_default
        rows = {}
        for op in ops:
            if op in BLOCK_KNOBS and not measure.called(s, op, tuned):
                # Not called under the tuned plan: its micro knobs mean nothing.
                tuned[op] = {**default[op], BLOCK_KNOBS[op]: tuned[op][BLOCK_KNOBS[op]]}
                t = (statistics.median(measure(s, op, [default], rounds)[0])
                     if measure.called(s, op, default) else 0.0)
                rows[op] = OpResult(op, s.bucket, default[op], tuned[op], t, 0.0, 1.0,
                                    note="not called under the tuned plan: no overflow units",
                                    called=False)
                continue
            # The hires kernels' work depends on the plan (the blocks knobs of both).
            if tuned[op] == default[op] and (op not in BLOCK_KNOBS or _same_plan(tuned, default)):
                t = statistics.median(measure(s, op, [default], rounds)[0])
                rows[op] = OpResult(op, s.bucket, default[op], tuned[op], t, t)
                if op in dropped:
                    rows[op].kept_default = True
                    rows[op].note = f"default kept: {dropped[op]}"
                continue
            rows[op] = _compare(measure, s, op, default, tuned, rounds, op)
            if op in dropped:
                rows[op].note = f"default micro knobs kept: {dropped[op]}"
        for op in ("pool_and_logits", "lowres_out"):
            r = rows.get(op)
            if r is not None and r.knobs != r.default_knobs and r.ratio >= 1 - MIN_GAIN:
                tuned[op] = dict(default[op])
                rows[op] = _kept(r, f"the search's {_changed(pick, default, op)}: not >= 1% "
                                    "faster re-measured")
        fwd = _compare(measure, s, "forward", default, tuned, rounds, "forward")
        hires = [op for op in BLOCK_KNOBS if op in ops and tuned[op] != default[op]]
        if fwd.ratio >= 1 - MIN_GAIN and hires:
            for op in hires:
                tuned[op] = dict(default[op])
                rows[op] = _kept(rows[op], f"{_knobs_text(rows[op].changed)}: the whole op was "
                                           "not >= 1% faster with them")
            if tuned != default:
                fwd = _compare(measure, s, "forward", default, tuned, rounds, "forward")
        fwd.default_knobs = fwd.knobs = {}
        if tuned == default:
            fwd = _kept(fwd, "")
            fwd.note = ("whole op: every pick of the search dropped, the defaults kept"
                        if pick != default else "whole op: the defaults")
        else:
            fwd.note = "whole op, all kernels and the plan"
        results.extend(rows[op] for op in OPS if op in rows)
        results.append(fwd)
        for op in [*(op for op in OPS if op in rows), "forward"]:
            show.line("verified " + next(r for r in results if r.op == op
                                         and r.bucket == s.bucket).summary())
    return results


def _compare(measure, shape, timed, default, tuned, rounds, name) -> OpResult:
    s_def, s_tun = measure(shape, timed, [default, tuned], rounds)
    knobs = (default.get(name, {}), tuned.get(name, {}))
    return OpResult(name, shape.bucket, dict(knobs[0]), dict(knobs[1]), statistics.median(s_def),
                    statistics.median(s_tun), paired_ratio(s_def, s_tun))


def _kept(r: OpResult, why: str) -> OpResult:
    """``r`` after its operator went back to the defaults: default time both sides."""
    kept = r.knobs != r.default_knobs
    return OpResult(r.op, r.bucket, r.default_knobs, dict(r.default_knobs), r.default_s,
                    r.default_s, 1.0, kept_default=kept,
                    note=f"default kept: {why}" if kept and why else "")


def _same_plan(a, b) -> bool:
    return all(a[op][k] == b[op][k] for op, k in BLOCK_KNOBS.items())


def _records_of(ops, shapes, default, results, trials, search, budget) -> list[dict]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    by = {(r.op, r.bucket): r for r in results}
    recs = []
    for s in shapes:
        fwd = by[("forward", s.bucket)]
        for op in ops:
            r = by[(op, s.bucket)]
            recs.append(records.make_record(
                op, s.bucket, r.knobs,
                default_knobs=r.default_knobs,
                time_ms=round(1e3 * r.tuned_s, 4), default_ms=round(1e3 * r.default_s, 4),
                gain_pct=round(r.gain_pct, 2), kept_default=r.kept_default,
                forward_gain_pct=round(fwd.gain_pct, 2),
                forward_ms=round(1e3 * fwd.tuned_s, 4), forward_default_ms=round(1e3 * fwd.default_s, 4),
                shape={"rows": s.rows, "N": s.N, "D": s.D, "block_size": s.block_size,
                       "blocks_per_row": s.blocks_per_row, "mode": "full"},
                trials=sum(t.bucket == s.bucket for t in trials), search=search,
                budget_seconds=budget, tuned_at=now,
                timing="median of interleaved calls, time.perf_counter",
            ))
    return recs
