"""Tuning records: the schedule knobs measured fastest (``mra-compile tune`` on a CPU,
``bench/gpu_check.py`` on a GPU), as JSON files.

A record holds the complete knobs of one operator and is keyed by the operator, dtype,
target (its name and ``Target.tuning_host()``), TVM version and shape bucket
(``knob_policy.shape_bucket``: sequence length rounded to a power of two, head dim padded
to 16, block size). CPU records (target ``llvm``) are measured by ``mra-compile tune`` on
one CPU model (``host.host_fingerprint()``) in float32 and serve every input dtype; CUDA
records (``cuda-sm_90``) are measured on a card of the architecture by
``bench/gpu_check.py`` and are per input dtype (``Target.tuning_dtype``).
``knob_policy.resolve_knobs`` reads the records of the call's target, in this order,
first match wins:

1. the user db: ``$MRA_COMPILE_TUNE_DB``, else ``~/.cache/mra_compile/tuned.json`` (the
   user cache directory): where ``mra-compile tune`` writes;
2. the records shipped for the target: ``<package>/schedules/tuned/<tuning_host>.json``
   (this CPU's fingerprint; ``cuda-sm_90``), read-only: nothing writes into the installed
   package unless given that path explicitly (``mra-compile tune --db``, how a checkout
   updates the shipped records).

A record of the exact bucket wins over one of another bucket; without one (or without a
bucket) the record of the nearest bucket is used. ``MRA_COMPILE_TUNED=0`` ignores every
record. Files are read once per process; a corrupt or stale file (unparseable, another
schema version or TVM version) is reported with a ``TuningRecordWarning`` and ignored.

Writes (``save``) merge into the file under an exclusive ``fcntl.flock`` of its directory
(a sidecar ``<file>.lock`` where directories cannot be locked, e.g. NFS) and replace it
atomically (temporary file + ``os.replace``), so readers never see half a file and two
tuners writing at once both keep their records.

Records made before the row-unit knob was renamed (``blocks_per_row``, now
``row_unit_blocks``) are read under the new name.

This module does not import TVM.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mra_compile import host, kernels, targets
from mra_compile.targets import Target

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, concurrent writers may lose records
    fcntl = None  # type: ignore[assignment]

SCHEMA = 1
ENV_DB = "MRA_COMPILE_TUNE_DB"
ENV_ENABLE = "MRA_COMPILE_TUNED"  # "0" ignores all records
LEGACY_KNOBS = {"blocks_per_row": "row_unit_blocks"}  # old name -> new name
# Without a shape, the record nearest to the default tuning shape is used.
REFERENCE_BUCKET = "N4096-D64-b32"


class TuningRecordWarning(UserWarning):
    """A tuning-record file or entry that is ignored (corrupt, stale or invalid)."""


@dataclass(frozen=True)
class Match:
    knobs: dict
    path: Path
    record: dict


# ---------------------------------------------------------------------------- places

def sanitise(text: str) -> str:
    """``text`` reduced to a portable file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unknown"


def user_db_path() -> Path:
    env = os.environ.get(ENV_DB)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mra_compile" / "tuned.json"


def shipped_db_path(target: Target | str | None = None) -> Path:
    """The records shipped in the package for ``target`` (default: the CPU)."""
    return host.schedule_dir() / "tuned" / f"{sanitise(targets.get(target).tuning_host())}.json"


def db_paths(target: Target | str | None = None) -> list[Path]:
    """The files consulted for ``target``'s kernels, highest priority first."""
    paths = [user_db_path(), shipped_db_path(target)]
    return paths if paths[0] != paths[1] else paths[:1]


def default_write_path() -> Path:
    """Where ``mra-compile tune`` writes without ``--db``: the user db (``user_db_path``),
    never the package's shipped records, even where the package is writable (records
    written there would outlive ``pip uninstall`` and pass for shipped ones)."""
    return user_db_path()


# ---------------------------------------------------------------------------- buckets

def parse_bucket(bucket: str) -> tuple[int, int, int]:
    """``"N4096-D64-b32"`` -> (4096, 64, 32)."""
    m = re.fullmatch(r"N(\d+)-D(\d+)-b(\d+)", bucket)
    if m is None:
        raise ValueError(f"not a shape bucket: {bucket!r} (expected like 'N4096-D64-b32')")
    return int(m[1]), int(m[2]), int(m[3])


def bucket_distance(a: str, b: str) -> float:
    (na, da, ba), (nb, db, bb) = parse_bucket(a), parse_bucket(b)
    return abs(math.log2(na) - math.log2(nb)) + abs(da - db) / 64 + (0 if ba == bb else 8)


# ---------------------------------------------------------------------------- records

def tunable_ops(target: Target | str | None = None) -> tuple[str, ...]:
    """The operators with tuning records on ``target`` (a search space there; default:
    the CPU)."""
    return kernels.tunable(targets.get(target))


def record_key(rec: dict) -> tuple:
    return tuple(rec[f] for f in ("op", "dtype", "target", "host", "tvm", "bucket"))


def make_record(op: str, bucket: str, knobs: dict, *, target: Target | str | None = None,
                dtype: torch.dtype | None = None, **meta) -> dict:
    """A record of ``target`` (default: the CPU) on this host, with this TVM version, for
    inputs of ``dtype`` (default float32; see ``Target.tuning_dtype``); ``meta`` (timings,
    dates...) is kept as is."""
    target = targets.get(target)
    rec = {"op": op, "dtype": target.tuning_dtype(dtype or torch.float32), "target": target.name,
           "host": target.tuning_host(), "tvm": host.tvm_version(), "bucket": bucket,
           "knobs": dict(knobs), **meta}
    problem = _record_problem(rec)
    if problem:
        raise ValueError(f"invalid tuning record: {problem}")
    return rec


def _target_of(rec: dict) -> Target | None:
    try:
        return targets.get(str(rec.get("target")))
    except ValueError:
        return None


def _ours(rec: dict) -> bool:
    """Whether ``rec`` was measured where it applies here: its target's tuning host (this
    CPU; any card of a CUDA architecture) and this TVM version."""
    target = _target_of(rec)
    return (target is not None and rec.get("host") == target.tuning_host()
            and rec.get("tvm") == host.tvm_version())


def _legal(target: Target, op: str, knobs: dict, bucket: str) -> bool:
    """Whether ``knobs`` (a record's, over ``op``'s defaults) are a legal point of its
    search space on ``target`` for the shape of ``bucket`` (its head dim and block size)."""
    _, head_dim, block = parse_bucket(bucket)
    return target.schedules.constraints(op, {**target.default_knobs(op), **knobs},
                                        (head_dim, block))


def _record_problem(rec) -> str | None:
    """Why ``rec`` cannot be used on this host (None: it can)."""
    if not isinstance(rec, dict):
        return f"not an object: {rec!r:.80}"
    missing = [f for f in ("op", "dtype", "target", "host", "tvm", "bucket", "knobs") if f not in rec]
    if missing:
        return f"missing fields {missing}"
    target = _target_of(rec)
    if target is None:
        return f"unknown target {rec['target']!r}"
    if rec["op"] not in getattr(target.schedules, "SPACES", {}):
        return f"unknown operator {rec['op']!r} (no search space on {target.name})"
    try:
        parse_bucket(rec["bucket"])
    except (TypeError, ValueError) as e:
        return str(e)
    if not isinstance(rec["knobs"], dict):
        return "knobs is not an object"
    if not _ours(rec):
        return None  # another host's record: kept, not checked here
    if not _legal(target, rec["op"], rec["knobs"], rec["bucket"]):
        return (f"{rec['op']} knobs {rec['knobs']} are not a legal point of its search space "
                f"on {target.name} here (shape {rec['bucket']})")
    return None


def _read(path: Path, *, purpose: str) -> list[dict]:
    """Every valid record of ``path`` ([] when absent); problems warn and are skipped."""
    try:
        text = path.read_bytes()  # (json decodes; bad bytes are a ValueError there)
    except FileNotFoundError:
        return []
    except OSError as e:
        _warn(f"tuning records {path} unreadable ({e}); {purpose}")
        return []
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        _warn(f"tuning records {path} are corrupt (not JSON: {e}); {purpose}")
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        _warn(f"tuning records {path} are corrupt (no 'records' list); {purpose}")
        return []
    if doc.get("schema") != SCHEMA:
        _warn(f"tuning records {path} have schema version {doc.get('schema')!r}, this "
              f"mra_compile reads version {SCHEMA}; {purpose}")
        return []
    if doc.get("tvm") != host.tvm_version():
        _warn(f"tuning records {path} are stale: made with TVM {doc.get('tvm')!r}, this is "
              f"TVM {host.tvm_version()}; {purpose}")
        return []
    good = []
    for rec in doc["records"]:
        if isinstance(rec, dict) and isinstance(rec.get("knobs"), dict):
            rec["knobs"] = {LEGACY_KNOBS.get(k, k): v for k, v in rec["knobs"].items()}
        problem = _record_problem(rec)
        if problem:
            _warn(f"tuning record in {path} ignored: {problem}")
        else:
            good.append(rec)
    return good


def _warn(message: str) -> None:
    warnings.warn(message, TuningRecordWarning, stacklevel=3)


# ---------------------------------------------------------------------------- lookup

_GENERATION = 0
_FILES: dict[str, list[dict]] = {}  # path -> its usable records (``_ours``)
_LOOKUPS: dict[tuple, Match | None] = {}


def token() -> tuple:
    """Changes whenever lookups may answer differently (part of build's kernel fast key)."""
    return os.environ.get(ENV_DB), os.environ.get(ENV_ENABLE), _GENERATION


def reload() -> None:
    """Forget the files read so far (the next lookup reads them again)."""
    global _GENERATION
    _FILES.clear()
    _LOOKUPS.clear()
    _GENERATION += 1


def records_in(path: Path, target: Target | str | None = None) -> list[dict]:
    """The records of ``path`` usable here (read once per process), of ``target`` only
    when given."""
    key = str(path)
    recs = _FILES.get(key)
    if recs is None:
        recs = _FILES[key] = [r for r in _read(Path(path), purpose="ignoring the file")
                              if _ours(r)]
    if target is None:
        return recs
    name = targets.get(target).name
    return [r for r in recs if r["target"] == name]


def lookup(op: str, bucket: str | None = None, target: Target | str | None = None,
           dtype: torch.dtype | None = None) -> Match | None:
    """The record ``op`` uses on ``target`` (default: the CPU) for inputs of ``dtype``
    (default float32) and ``bucket`` (None: nearest to ``REFERENCE_BUCKET``)."""
    target = targets.get(target)
    kind = target.tuning_dtype(dtype or torch.float32)
    key = (op, bucket, target.name, kind, token())
    try:
        return _LOOKUPS[key]
    except KeyError:
        pass
    match = None
    if os.environ.get(ENV_ENABLE, "1") != "0":
        match = _find(op, bucket, target, kind)
    _LOOKUPS[key] = match
    return match


def _find(op: str, bucket: str | None, target: Target, kind: str) -> Match | None:
    candidates = [(path, rec) for path in db_paths(target) for rec in records_in(path, target)
                  if rec["op"] == op and rec["dtype"] == kind]
    if not candidates:
        return None
    if bucket is not None:
        for path, rec in candidates:
            if rec["bucket"] == bucket:
                return Match(dict(rec["knobs"]), path, rec)
        # Another bucket's knobs only where they are legal for this shape too (a CUDA
        # kernel's shared memory grows with the head dim: ``constraints``).
        candidates = [(path, rec) for path, rec in candidates
                      if _legal(target, op, rec["knobs"], bucket)]
        if not candidates:
            return None
    near = bucket or REFERENCE_BUCKET
    # Nearest bucket; ties go to the higher-priority file, then the longer sequence.
    best = min(range(len(candidates)), key=lambda i: (
        bucket_distance(candidates[i][1]["bucket"], near), i))
    path, rec = candidates[best]
    return Match(dict(rec["knobs"]), path, rec)


# ---------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock for read-modify-write of ``path`` (released on exit)."""
    if fcntl is None:
        yield
        return
    fd = None
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        if fd is not None:
            os.close(fd)
            fd = None
    if fd is None:  # directories cannot be flock'ed here: a lock file next to ``path``
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield
        return
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def save(path, new_records) -> Path:
    """Merge ``new_records`` (from ``make_record``) into the file at ``path``: same key
    replaces. Safe against concurrent writers and readers; returns the path."""
    path = Path(path)
    new_records = list(new_records)
    for rec in new_records:
        problem = _record_problem(rec)
        if problem:
            raise ValueError(f"invalid tuning record: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        merged = {record_key(r): r for r in _read(path, purpose="replacing it")}
        merged.update((record_key(r), r) for r in new_records)
        doc = {"schema": SCHEMA, "tvm": host.tvm_version(),
               "records": sorted(merged.values(), key=lambda r: tuple(map(str, record_key(r))))}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    reload()
    return path
