"""Autotuning: search spaces, the tuner, tuning records and their automatic use.

Every test that reads or writes records points ``MRA_COMPILE_TUNE_DB`` at its own file
and hides the records shipped in the package (``isolated`` fixture), so the result does
not depend on what ``schedules/tuned/`` holds. Kernels go to the usual disk cache: the
correctness tests draw their knob configurations deterministically, so a second run
loads them instead of compiling.
"""

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, RTOL_FP32, as64, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mra_compile
from mra_compile import build, cli, forward, host, knob_policy, records, tuning
from mra_compile.options import Options
from mra_compile.reference import mra2_reference
from mra_compile.schedules import cpu

TUNABLE = tuple(cpu.SPACES)


def legal_configs(op):
    space = cpu.SPACES[op]
    for values in itertools.product(*space.values()):
        knobs = dict(zip(space, values))
        if cpu.constraints(op, knobs):
            yield knobs


# ---------------------------------------------------------------------------- spaces

@pytest.mark.parametrize("width", [16, 8])
def test_spaces_match_the_schedules_and_hold_the_defaults(monkeypatch, width):
    """On an AVX-512 CPU (16 lanes) and an AVX2 one (8: vec=16 is not legal there, so the
    operators whose only knob is vec have one point)."""
    monkeypatch.setattr(host, "default_vector_width", lambda: width)
    for op in TUNABLE:
        assert set(cpu.SPACES[op]) == set(cpu.KNOBS[op]), op
        assert cpu.constraints(op, knob_policy.default_knobs(op)), op
        points = len(list(legal_configs(op)))
        assert points >= (1 if width == 8 and set(cpu.SPACES[op]) == {"vec"} else 2), op
    assert cpu.SPACES["hires_rows"]["row_unit_blocks"] == [2, 3, 4, 6, 8, 12, 16]
    assert cpu.SPACES["hires_units"]["blocks_per_unit"] == [1, 2, 3, 4]


@pytest.mark.parametrize("width", [16, 8])
def test_default_register_tiles_fit_the_vector_registers(monkeypatch, width):
    """The default accumulator tiles at D = 64 and 128 (logits: qk_rows keys x 32
    queries; P V: pv_rows queries x pv_cols vectors of D, all of D where they do not
    divide it; the backward's likewise) take at most half the vector registers (32 with
    AVX-512, 16 with AVX2), the rest holding operands."""
    monkeypatch.setattr(host, "default_vector_width", lambda: width)
    half = (32 if width == 16 else 16) // 2

    def vectors(cols, D):  # (the band of _register_tile, or all of D)
        return cols if (D // width) % cols == 0 else D // width
    for D in (64, 128):
        for op in ("hires_units", "hires_rows"):
            knobs = knob_policy.default_knobs(op)
            assert knobs["vec"] == width
            assert knobs["qk_rows"] * 32 // width <= half, op
            assert knobs["pv_rows"] * vectors(knobs["pv_cols"], D) <= half, (op, D)
        # The backward's units: dots and dP (rows slot tokens x 32), the [b, D] outputs
        # (out_rows tokens x out_cols vectors of D).
        for op in ("bwd_dkdv_ds_units", "bwd_dq_ds_units"):
            knobs = knob_policy.default_knobs(op)
            assert knobs["rows"] * 32 // width <= half, op
            assert knobs["out_rows"] * vectors(knobs["out_cols"], D) <= half, (op, D)


def test_constraints_reject_illegal_points(monkeypatch):
    good = knob_policy.default_knobs("hires_units")
    assert not cpu.constraints("hires_units", {**good, "unroll": 1})  # True == 1, but not a bool
    assert not cpu.constraints("hires_units", {**good, "qk_rows": 3})
    assert not cpu.constraints("hires_units", {**good, "extra": 1})
    assert not cpu.constraints("hires_units", {k: v for k, v in good.items() if k != "vec"})
    assert not cpu.constraints("combine", {"vec": 8})
    # Without AVX-512 there is no vec=16, and the logits tile must fit 16 registers.
    monkeypatch.setattr(host, "default_vector_width", lambda: 8)
    assert not cpu.constraints("pool_and_logits", {"vec": 16})
    assert cpu.constraints("pool_and_logits", {"vec": 8})
    assert not cpu.constraints("hires_units", {**good, "vec": 8, "qk_rows": 8})
    assert cpu.constraints("hires_units", {**good, "vec": 8, "qk_rows": 4})


def test_shape_buckets():
    assert knob_policy.shape_bucket(4096, 64) == "N4096-D64-b32"
    assert knob_policy.shape_bucket(3000, 60) == "N4096-D64-b32"  # nearest power of two; D padded
    assert knob_policy.shape_bucket(2500, 64) == "N2048-D64-b32"
    assert knob_policy.shape_bucket(1, 8) == "N32-D16-b32"
    assert knob_policy.shape_bucket(300, 40, 16) == "N256-D48-b16"
    assert tuning.Shape.parse("12x4096x64") == tuning.Shape(12, 4096, 64)
    assert tuning.Shape.parse("1024").bucket == "N1024-D64-b32"
    with pytest.raises(ValueError):
        tuning.Shape.parse("12x4096")


# ---------------------------------------------------------------------------- the tuner

TINY_SPACES = {
    "pool_and_logits": {"vec": [8, 16]},
    "hires_rows": {"row_unit_blocks": [2, 6, 12], "qk_rows": [2, 4]},  # (12: the default)
    "hires_units": {"blocks_per_unit": [2, 3]},
}


def fake_timer(calls):
    """Deterministic costs: vec=8, (Cr, Co) = (6, 3) and qk_rows=2 are the fastest."""

    def timer(op, bucket, knobs):
        calls.append((op, bucket, json.dumps(knobs, sort_keys=True)))
        if op == "pool_and_logits":
            return 1e-3 if knobs["vec"] == 8 else 2e-3
        if op == "forward":
            cr, co = knobs["hires_rows"]["row_unit_blocks"], knobs["hires_units"]["blocks_per_unit"]
            return 1e-2 * (1 + abs(cr - 6) + abs(co - 3))
        if op == "hires_rows":
            return 3e-3 if knobs["qk_rows"] == 4 else 1e-3
        return 1e-3

    return timer


@pytest.mark.parametrize("search", ["random", "exhaustive"])
def test_tuner_finds_and_persists_the_best(isolated, search, avx512_defaults):
    calls = []
    shape = tuning.Shape(rows=2, N=256, D=64)
    result = tuning.tune(["pool_and_logits", "hires_rows", "hires_units"], [shape],
                         budget_seconds=None, db=isolated, search=search, spaces=TINY_SPACES,
                         timer=fake_timer(calls), progress=False)
    bucket = shape.bucket
    expected = {
        "pool_and_logits": {"vec": 8},
        "hires_rows": {**knob_policy.default_knobs("hires_rows"), "row_unit_blocks": 6, "qk_rows": 2},
        "hires_units": {**knob_policy.default_knobs("hires_units"), "blocks_per_unit": 3},
    }
    for op, knobs in expected.items():
        assert result.best(op, bucket) == knobs
    # Every point of the tiny spaces was measured; the default always came first.
    assert {t.phase for t in result.trials} == {"pool_and_logits", tuning.PLAN, "hires_rows"}
    assert sum(t.phase == tuning.PLAN for t in result.trials) == 3 * 2 - 1
    first_forward = next(c for c in calls if c[0] == "forward")
    default = knob_policy.default_knobs("hires_rows")["row_unit_blocks"]
    assert json.loads(first_forward[2])["hires_rows"]["row_unit_blocks"] == default
    fwd = next(r for r in result.results if r.op == "forward")
    # (the default, Cr = 12: 1 + |12 - 6| hundredths; the best, Cr = 6: one)
    assert fwd.default_s == pytest.approx(0.07) and fwd.tuned_s == pytest.approx(0.01)
    assert fwd.gain_pct == pytest.approx(600 / 7)
    assert "forward" in result.table() and "+85.7%" in result.table()

    # Persisted, and what the op now uses, for this bucket and (nearest) for any.
    assert result.db == isolated
    doc = json.loads(isolated.read_text())
    assert doc["schema"] == records.SCHEMA and doc["tvm"] == host.tvm_version()
    saved = {r["op"]: r for r in doc["records"]}
    assert set(saved) == set(expected)
    for op, knobs in expected.items():
        assert saved[op]["knobs"] == knobs and saved[op]["bucket"] == bucket
        assert saved[op]["host"] == host.host_fingerprint()
        for b in (bucket, None, "N8192-D64-b32"):
            chosen = tuning.chosen_knobs(op, b)
            assert chosen.source == str(isolated) and chosen.bucket == bucket
            assert chosen.knobs == {**knob_policy.default_knobs(op), **knobs}
    assert tuning.chosen_knobs("lowres_out", bucket).source == "default"


def test_tuner_real_short_run(isolated):
    """Real compiles and timings on a tiny space: records land and are legal and used."""
    shape = tuning.Shape(rows=2, N=512, D=32)
    cr = knob_policy.default_knobs("hires_rows")["row_unit_blocks"]  # (this CPU's default)
    spaces = {"pool_and_logits": {"vec": [8, 16]},
              "hires_rows": {"row_unit_blocks": [2, cr]}, "hires_units": {"blocks_per_unit": [3]}}
    result = tuning.tune(["pool_and_logits", "hires_rows", "hires_units"], [shape],
                         budget_seconds=60, db=isolated, spaces=spaces, rounds=3,
                         verify_rounds=3, progress=False)
    assert {t.phase for t in result.trials} <= {"pool_and_logits", tuning.PLAN}
    assert 1 <= len(result.trials) <= 2  # vec=8 (with AVX-512), blocks_per_row=2
    assert all(r.default_s > 0 and r.tuned_s > 0 for r in result.results
               if r.op != "hires_units")
    saved = json.loads(isolated.read_text())["records"]
    assert sorted(r["op"] for r in saved) == ["hires_rows", "hires_units", "pool_and_logits"]
    for rec in saved:
        assert cpu.constraints(rec["op"], rec["knobs"])
        assert tuning.chosen_knobs(rec["op"], shape.bucket).knobs == rec["knobs"]
        assert rec["bucket"] == "N512-D32-b32"
        assert rec["default_ms"] > 0 or rec["op"] == "hires_units"  # (0: no overflow units)


def test_cli_tune_and_info(isolated, capsys):
    code = cli.main(["tune", "--target", "llvm", "--ops", "pool_and_logits", "--shapes", "2x256x16",
                     "--budget-seconds", "20", "--rounds", "3", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pool_and_logits  N256-D16-b32" in out and f"to {isolated}" in out
    assert [r["op"] for r in json.loads(isolated.read_text())["records"]] == ["pool_and_logits"]
    assert cli.main(["info", "--shape", "2x256x16"]) == 0
    out = capsys.readouterr().out
    assert "apache-tvm 0.27" in out and str(isolated) in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("pool_and_logits"))
    assert f"record N256-D16-b32 in {isolated}" in line
    assert cli.main(["tune", "--shapes", "12x4096"]) == 2
    assert cli.main(["tune", "--ops", "combine"]) == 2
    assert cli.main([]) == 2


# ---------------------------------------------------------------------------- records in use

DISTINCT = {
    "pool_and_logits": {"vec": 8},
    "lowres_out": {"vec": 8},
    "hires_units": {"vec": 8, "qk_rows": 2, "pv_rows": 1, "pv_cols": 1, "unroll": False,
                    "blocks_per_unit": 3},
    "hires_rows": {"vec": 8, "qk_rows": 2, "pv_rows": 2, "pv_cols": 4, "unroll": False,
                   "row_unit_blocks": 3},
}


def reference_error(out, q, k, v, mask, num_blocks, mode):
    """out's relative error against the float64 oracle given the op's own block set."""
    sel = mra_compile.block_selection(q, k, v, mask, num_blocks=num_blocks, approx_mode=mode)
    ref = mra2_reference(as64(q), as64(k), as64(v), as64(mask), num_blocks=num_blocks,
                         approx_mode=mode, selection=sel)
    return rel_err(out, ref)


def check_op(q, k, v, mask, num_blocks, mode):
    out = torch.ops.mra.attention(q, k, v, mask, num_blocks, mode)
    err = reference_error(out, q, k, v, mask, num_blocks, mode)
    assert err <= RTOL_FP32, f"relative error {err:.3g}"


@pytest.mark.parametrize("record_bucket", ["exact", "other"])
def test_op_uses_a_record(isolated, record_bucket):
    g = torch.Generator().manual_seed(5)
    B, H, N, D = 1, 2, 300, 40
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    bucket = knob_policy.shape_bucket(N, D)
    assert bucket == "N256-D48-b32"
    rec_bucket = bucket if record_bucket == "exact" else "N2048-D64-b32"
    path = records.save(isolated, [records.make_record(op, rec_bucket, knobs, note="test")
                                   for op, knobs in DISTINCT.items()])
    for op, knobs in DISTINCT.items():
        for b in (bucket, None):
            chosen = tuning.chosen_knobs(op, b)
            assert chosen.source == str(path) and chosen.bucket == rec_bucket
            assert chosen.knobs == knobs and knob_policy.resolve_knobs(op, None, b) == knobs
    # Explicit knobs still win, key by key.
    assert knob_policy.resolve_knobs("hires_rows", {"vec": 16}, bucket) == {
        **DISTINCT["hires_rows"], "vec": 16}
    assert knob_policy.knobs_for_shape(None, N, D)["hires_units"] == DISTINCT["hires_units"]

    n = -(-N // 32)
    with build.trace_kernel_calls() as calls:
        for mode in ("full", "sparse"):  # 6 blocks per row: rows overflow their own 3
            check_op(q, k, v, None, 6 * n, mode)
    tuned = [c for c in calls if c["op"] in DISTINCT]  # (select_plan has no knobs)
    assert {c["op"] for c in calls} == set(DISTINCT) | {"select_plan"}
    for c in tuned:
        assert c["resolved"] == DISTINCT[c["op"]], c["op"]
    # The kernels this process built or loaded (the first parametrisation built them).
    events = mra_compile.cache_events()
    for op, knobs in DISTINCT.items():
        assert any(e["op"] == op and e["knobs"] == knobs for e in events), op
    variants = {e["static"].get("full") for e in events
                if e["op"] == "hires_rows" and e["knobs"] == DISTINCT["hires_rows"]}
    assert variants == {True, False}


SMALL = {**DISTINCT["hires_rows"], "row_unit_blocks": 3}
LARGE = {**DISTINCT["hires_rows"], "row_unit_blocks": 6}


@pytest.fixture
def two_buckets(isolated):
    records.save(isolated, [records.make_record("hires_rows", "N256-D48-b32", SMALL),
                            records.make_record("hires_rows", "N4096-D64-b32", LARGE)])
    return isolated


def test_records_per_bucket(two_buckets):
    assert knob_policy.knobs_for_shape(None, 300, 40)["hires_rows"] == SMALL
    assert knob_policy.knobs_for_shape(None, 3000, 64)["hires_rows"] == LARGE
    assert knob_policy.knobs_for_shape(None, 16384, 64)["hires_rows"] == LARGE  # the nearest
    assert knob_policy.knobs_for_shape(None, 100, 40)["hires_rows"] == SMALL
    assert knob_policy.resolve_knobs("hires_rows") == LARGE  # no shape: nearest to N4096-D64-b32
    assert tuning.chosen_knobs("hires_rows").bucket == "N4096-D64-b32"
    assert knob_policy.knobs_for_shape({"hires_rows": {"vec": 8}}, 300, 40)["hires_rows"] == SMALL
    assert knob_policy.knobs_for_shape(None, 300, 40)["lowres_out"] == knob_policy.default_knobs("lowres_out")
    # The forward given the shape's knobs (what forward.py passes with the bucket change).
    g = torch.Generator().manual_seed(8)
    N, D = 300, 40
    q, k, v = (torch.randn(1, 2, N, D, generator=g) for _ in range(3))
    with build.trace_kernel_calls() as calls:
        forward.mra_forward(q, k, v, None, Options(60, "full", 32),
                            knobs=knob_policy.knobs_for_shape(None, N, D))
    assert [c["resolved"] for c in calls if c["op"] == "hires_rows"] == [SMALL]


def test_op_uses_the_record_of_its_bucket(two_buckets):
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 300, 40, generator=g) for _ in range(3))
    with build.trace_kernel_calls() as calls:
        check_op(q, k, v, None, 60, "full")
    assert [c["resolved"] for c in calls if c["op"] == "hires_rows"] == [SMALL]


def test_disabling_records(isolated, monkeypatch):
    records.save(isolated, [records.make_record("lowres_out", "N1024-D64-b32", {"vec": 8})])
    assert tuning.chosen_knobs("lowres_out").knobs == {"vec": 8}
    monkeypatch.setenv(records.ENV_ENABLE, "0")
    assert tuning.chosen_knobs("lowres_out").source == "default"
    assert knob_policy.resolve_knobs("lowres_out") == knob_policy.default_knobs("lowres_out")


def test_avx512_defaults_read_no_developer_records(avx512_defaults, tmp_path, monkeypatch):
    # A developer's own tuning run writes ~/.cache/mra_compile/tuned.json: the tests that
    # pin AVX-512's defaults must not read it (conftest.avx512_defaults).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    records.save(tmp_path / "home" / ".cache" / "mra_compile" / "tuned.json",
                 [records.make_record("lowres_out", "N1024-D64-b32", {"vec": 8})])
    records.reload()
    assert tuning.chosen_knobs("lowres_out").source == "default"
    assert knob_policy.resolve_knobs("lowres_out") == knob_policy.default_knobs("lowres_out")
    assert knob_policy.default_knobs("lowres_out")["vec"] == 16


def good_doc(**change):
    rec = records.make_record("lowres_out", "N1024-D64-b32", {"vec": 8})
    doc = {"schema": records.SCHEMA, "tvm": host.tvm_version(), "records": [rec]}
    doc.update(change)
    return doc


DAMAGES = {
    "not-json": lambda db: db.write_text('{"schema": 1, "records": [tru'),
    "empty": lambda db: db.write_text(""),
    "binary": lambda db: db.write_bytes(b"\x00\xff\xfe garbage"),
    "not-an-object": lambda db: db.write_text("[1, 2, 3]"),
    "other-schema": lambda db: db.write_text(json.dumps(good_doc(schema=99))),
    "no-schema": lambda db: db.write_text(json.dumps({"records": []})),
    "other-tvm": lambda db: db.write_text(json.dumps(good_doc(tvm="0.19.0"))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_corrupt_or_stale_db_warns_and_is_ignored(isolated, damage):
    isolated.parent.mkdir(parents=True)
    DAMAGES[damage](isolated)
    with pytest.warns(records.TuningRecordWarning):
        chosen = tuning.chosen_knobs("lowres_out", "N1024-D64-b32")
    assert chosen.source == "default" and chosen.knobs == knob_policy.default_knobs("lowres_out")
    assert knob_policy.resolve_knobs("hires_rows") == knob_policy.default_knobs("hires_rows")
    # A tuner writing there replaces the bad file (with a warning), never fails.
    with pytest.warns(records.TuningRecordWarning):
        records.save(isolated, [records.make_record("pool_and_logits", "N1024-D64-b32", {"vec": 8})])
    assert [r["op"] for r in json.loads(isolated.read_text())["records"]] == ["pool_and_logits"]
    assert tuning.chosen_knobs("pool_and_logits").knobs == {"vec": 8}


def test_invalid_records_are_skipped_and_the_rest_used(isolated):
    isolated.parent.mkdir(parents=True)
    doc = good_doc()
    bad = [
        {**doc["records"][0], "op": "hires_rows", "knobs": {"vec": 8, "qk_rows": 3}},  # illegal value
        {**doc["records"][0], "op": "hires_units", "knobs": {"tile": 4}},  # unknown knob
        {**doc["records"][0], "op": "combine"},  # unknown operator
        {"op": "pool_and_logits"},  # fields missing
        "not a record",
    ]
    other_host = {**doc["records"][0], "host": "riscv|elsewhere|0", "knobs": {"vec": 99}}
    doc["records"] += bad + [other_host]
    isolated.write_text(json.dumps(doc))
    with pytest.warns(records.TuningRecordWarning) as caught:
        chosen = {op: tuning.chosen_knobs(op) for op in ("lowres_out", "hires_rows", "hires_units")}
    assert chosen["lowres_out"].knobs == {"vec": 8}
    assert chosen["hires_rows"].source == "default"
    assert chosen["hires_units"].source == "default"
    assert len(caught) == len(bad)
    # Saving keeps the other host's record (and drops the invalid ones).
    with pytest.warns(records.TuningRecordWarning):
        records.save(isolated, [records.make_record("pool_and_logits", "N1024-D64-b32", {"vec": 8})])
    hosts = sorted(r["host"] for r in json.loads(isolated.read_text())["records"])
    assert hosts == sorted([host.host_fingerprint()] * 2 + ["riscv|elsewhere|0"])


def test_op_runs_with_a_corrupt_db(isolated):
    isolated.parent.mkdir(parents=True)
    isolated.write_text("not json at all")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g) for _ in range(3))
    with pytest.warns(records.TuningRecordWarning):
        check_op(q, k, v, None, 8, "full")


WRITER = r"""
import sys, time
from pathlib import Path
from mra_compile import records
db, worker, count, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
start.with_name(f"ready{worker}").touch()
while not start.exists():
    time.sleep(0.005)
for i in range(count):
    rec = records.make_record("pool_and_logits", f"N{2 ** (5 + i)}-D{16 * (worker + 1)}-b32",
                              {"vec": 8}, worker=worker, i=i)
    records.save(db, [rec])
print("ok")
"""


def test_concurrent_writers_both_land(isolated, tmp_path):
    count, start = 25, tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(isolated), str(w), str(count),
                               str(start)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    start.touch()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    doc = json.loads(isolated.read_text())
    got = sorted((r["worker"], r["i"]) for r in doc["records"])
    assert got == sorted((w, i) for w in range(2) for i in range(count))
    leftovers = [p.name for p in isolated.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------------------- correctness

def covering_configs():
    """A few configurations of every operator that together use every legal value of
    every knob (row i takes the i-th value of each knob, cycling)."""
    rows = []
    longest = max(len(v) for op in TUNABLE for v in cpu.SPACES[op].values())
    width = host.default_vector_width()
    for i in range(longest):
        config = {}
        for op in TUNABLE:
            knobs = {k: v[i % len(v)] for k, v in cpu.SPACES[op].items()}
            knobs["vec"] = min(knobs["vec"], width)
            if "qk_rows" in knobs and not cpu.constraints(op, knobs):
                knobs["qk_rows"] = 2
            assert cpu.constraints(op, knobs), (op, knobs)
            config[op] = knobs
        rows.append(config)
    return rows


def run_forward(config, seed, N, D, mode, num_blocks, masked):
    g = torch.Generator().manual_seed(seed)
    B, H = 1, 2
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    mask = None
    if masked:
        mask = (torch.rand(B, N, generator=g) < 0.8).float()
        mask[:, 0] = 1
    out = forward.mra_forward(q, k, v, mask, Options(num_blocks, mode, 32), knobs=config)
    err = reference_error(out, q, k, v, mask, num_blocks, mode)
    assert err <= RTOL_FP32, f"relative error {err:.3g} with {config}"


@pytest.mark.parametrize("i", range(len(covering_configs())))
def test_every_knob_value_gives_correct_results(i):
    config = covering_configs()[i]
    N = 288  # 9 block rows; 5 blocks per row on average: the rows overflow Cr <= 4
    run_forward(config, 100 + i, N, 40, "full" if i % 2 == 0 else "sparse", 45, masked=i % 3 == 0)


@st.composite
def configs(draw):
    return {op: draw(st.sampled_from(list(legal_configs(op)))) for op in TUNABLE}


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), seed=st.integers(0, 2**31 - 1), N=st.integers(33, 400),
       D=st.sampled_from([16, 33, 64]), mode=st.sampled_from(["full", "sparse"]),
       density=st.integers(1, 8), masked=st.booleans())
def test_any_config_in_the_spaces_is_correct(config, seed, N, D, mode, density, masked):
    n = -(-N // 32)
    run_forward(config, seed, N, D, mode, min(density * n, n * n), masked)
