"""CUDA tuning without a GPU: the knob spaces, the records the op reads, the bundle's
variants, and the search ``bench/gpu_tune.py`` runs on a GPU (checks and timings faked).

The variants' device code is compiled and emulated in tests/test_cuda_emulation.py.
"""
import json
import sys
import time

import pytest
import torch
from conftest import REPO

from mra_compile import aot, knob_policy, records, targets
from mra_compile.schedules import cuda

sys.path.insert(0, str(REPO))
from bench import gpu_tune  # noqa: E402

SM90 = targets.get("cuda-sm_90")
BUCKET = "N16384-D64-b32"


def test_spaces_cover_the_knobs_and_hold_the_defaults():
    assert set(cuda.SPACES) == {"hires_units", "hires_rows", "bwd_dq_units", "bwd_dkdv_units"}
    for op, space in cuda.SPACES.items():
        assert set(space) == set(cuda.KNOBS[op]), op
        assert cuda.constraints(op, dict(cuda.KNOBS[op])), op
        points = aot.space_points(op, SM90)
        assert len(points) == (24 if op == "hires_rows" else 16), op
        assert cuda.KNOBS[op] in points, op
    good = dict(cuda.KNOBS["hires_rows"])
    assert not cuda.constraints("hires_rows", {**good, "threads": 96})
    assert not cuda.constraints("hires_rows", {**good, "tensor_cores": 1})  # not True
    assert not cuda.constraints("hires_rows", {k: v for k, v in good.items() if k != "threads"})
    assert not cuda.constraints("bwd_prep", {"threads": 128})
    unit = dict(cuda.KNOBS["hires_units"])
    assert cuda.constraints("hires_units", {**unit, "threads": 256, "blocks_per_unit": 2})
    assert not cuda.constraints("hires_units", {**unit, "threads": 256, "blocks_per_unit": 4})


def test_a_row_unit_of_8_blocks_only_where_its_shared_memory_fits():
    """hires_rows with 8 blocks in its row unit: 112-136 KB of shared memory at D = 64
    (bf16, float32), 176-208 KB at D = 128, over sm_80's 163 KB a thread block."""
    eight = {**cuda.KNOBS["hires_rows"], "row_unit_blocks": 8}
    assert cuda.constraints("hires_rows", eight)  # (the knobs alone)
    for shape, fits in (((64, 32), True), ((48, 32), True), ((80, 32), False),
                        ((128, 32), False), ((64, 64), False), ((64, 16), False)):
        assert cuda.constraints("hires_rows", eight, shape) == fits, shape
        assert cuda.constraints("hires_rows", {**eight, "row_unit_blocks": 4}, shape), shape
    assert len(aot.space_points("hires_rows", SM90, (64, 32))) == 24
    assert len(aot.space_points("hires_rows", SM90, (128, 32))) == 18
    # no record of it for a shape it does not fit; another bucket's record is not taken
    with pytest.raises(ValueError, match="legal point"):
        records.make_record("hires_rows", "N16384-D128-b32", eight, target=SM90,
                            dtype=torch.bfloat16, device="test")


def test_another_buckets_record_is_taken_only_where_its_knobs_fit(isolated):
    eight = {**cuda.KNOBS["hires_rows"], "row_unit_blocks": 8}
    records.save(isolated, [records.make_record("hires_rows", BUCKET, eight, target=SM90,
                                                dtype=torch.bfloat16, device="test")])
    pick = knob_policy.resolve_knobs
    assert pick("hires_rows", None, BUCKET, SM90, torch.bfloat16) == eight
    assert pick("hires_rows", None, "N8192-D48-b32", SM90, torch.bfloat16) == eight
    # D = 128: the nearest record would not fit in shared memory; the defaults
    assert pick("hires_rows", None, "N16384-D128-b32", SM90, torch.bfloat16) == \
        cuda.KNOBS["hires_rows"]
    four = {**eight, "row_unit_blocks": 4}
    records.save(isolated, [records.make_record("hires_rows", "N16384-D96-b32", four,
                                                target=SM90, dtype=torch.bfloat16,
                                                device="test")])
    assert pick("hires_rows", None, "N16384-D128-b32", SM90, torch.bfloat16) == four


def test_a_cuda_record_is_used_for_its_target_dtype_and_bucket_only(isolated):
    knobs = {**cuda.KNOBS["hires_rows"], "threads": 256, "row_unit_blocks": 4}
    records.save(isolated, [records.make_record("hires_rows", BUCKET, knobs, target=SM90,
                                                dtype=torch.bfloat16, device="test")])
    rec = json.loads(isolated.read_text())["records"][0]
    assert (rec["target"], rec["host"], rec["dtype"]) == ("cuda-sm_90", "cuda-sm_90", "bfloat16")
    chosen = knob_policy.knobs_for_shape(None, 16384, 64, 32, SM90, torch.bfloat16)
    assert chosen["hires_rows"] == knobs
    assert chosen["hires_units"] == cuda.KNOBS["hires_units"]
    # float16 and float32 calls, another architecture, the CPU: their own (default) knobs
    for target, dtype in ((SM90, torch.float16), (SM90, torch.float32),
                          (targets.get("cuda-sm_80"), torch.bfloat16)):
        assert knob_policy.resolve_knobs("hires_rows", None, BUCKET, target, dtype) == \
            cuda.KNOBS["hires_rows"]
    cpu = knob_policy.resolve_knobs("hires_rows", None, BUCKET, targets.CPU, torch.bfloat16)
    assert cpu == targets.CPU.default_knobs("hires_rows")
    # a bundle built with the record compiles the record's knobs for bf16 (every bucket
    # takes the nearest record), the defaults for float32
    static = {"b": 32, "D": 64, "io": "bfloat16", "full": True}
    assert aot.knob_settings("hires_rows", static, SM90) == [knobs]
    assert aot.knob_settings("hires_rows", {"b": 32, "D": 64, "full": True}, SM90) == \
        [cuda.KNOBS["hires_rows"]]


def test_an_illegal_cuda_record_is_refused():
    with pytest.raises(ValueError, match="legal point"):
        records.make_record("hires_rows", BUCKET, {"threads": 96}, target=SM90)
    with pytest.raises(ValueError, match="no search space"):
        records.make_record("bwd_prep", BUCKET, {"threads": 128}, target=SM90)


def test_tuning_variants_are_built_for_the_named_dtype_and_head_dim_only():
    named = [("bfloat16", 64), ("float32", 128)]
    counts = {}
    for op, static in aot.variants((32,), (64, 128), ["float32", "bfloat16"], True,
                                   target=SM90):
        settings = aot.knob_settings(op, static, SM90, named)
        key = (op, static.get("io", "float32"), static["D"], static.get("full"))
        counts[key] = len(settings)
    for op in cuda.SPACES:
        for full in ((True, False) if op == "hires_rows" else (None,)):
            assert counts[(op, "bfloat16", 64, full)] == (24 if op == "hires_rows" else 16), op
            assert counts[(op, "bfloat16", 128, full)] == 1, op
            assert counts[(op, "float32", 64, full)] == 1, op
            # (no 8-block row unit at D = 128: its shared memory would not fit sm_80's)
            assert counts[(op, "float32", 128, full)] == (18 if op == "hires_rows" else 16), op
    assert counts[("bwd_prep", "bfloat16", 64, None)] == 1


# ----------------------------------------------------------------------------- the search

OPS = tuple(cuda.SPACES)
DEFAULT = {op: dict(cuda.KNOBS[op]) for op in OPS}


def _manifest(points):
    return {"kernels": [{"op": op, "static": {"b": 32, "D": 64, "io": "bfloat16", **extra},
                         "knobs": knobs}
                        for op, held in points.items() for knobs in held
                        for extra in (({"full": True}, {"full": False})
                                      if op == "hires_rows" else ({},))]}


def test_bundle_points_are_the_manifests_variants():
    every = {op: aot.space_points(op, SM90) for op in OPS}
    manifest = _manifest(every)
    manifest["kernels"].append({"op": "hires_rows", "static": {"b": 32, "D": 64, "io": "bfloat16",
                                                                "full": True},
                                "knobs": {**DEFAULT["hires_rows"], "threads": 999}})
    points = gpu_tune.bundle_points([manifest], OPS, 64, "bfloat16")
    # (the variant in one mode only is left out)
    assert {op: len(p) for op, p in points.items()} == {op: len(every[op]) for op in OPS}
    assert gpu_tune.bundle_points([manifest], OPS, 128, "bfloat16") == {}
    assert gpu_tune.bundle_points([manifest], OPS, 64, "float16") == {}


def _fake(cost, wrong=()):
    """check/measure over a cost model: ms of a pass = sum of its kernels' costs."""
    timed = []

    def ms(direction, config):
        ops = [op for d, group in gpu_tune.PHASES for op in group
               if direction == "fwd+bwd" or d == "fwd"]
        return sum(cost(op, config[op]) for op in ops)

    def check(direction, config):
        bad = any(config[op] == knobs for op, knobs in wrong)
        return (0.5 if bad else 1e-3), 1e-2

    def measure(direction, a, b):
        timed.append((direction, a, b))
        ma, mb = ms(direction, a), ms(direction, b)
        return ma, mb, mb / ma

    return check, measure, timed


def test_the_search_keeps_faster_points_skips_wrong_ones_and_writes_records(isolated, tmp_path):
    points = {op: aot.space_points(op, SM90) for op in OPS}
    fast_rows = {**DEFAULT["hires_rows"], "threads": 256}
    wrong = {**DEFAULT["bwd_dq_units"], "vector_bytes": 8}

    def cost(op, knobs):
        c = 10.0
        if op == "hires_rows" and knobs["threads"] == 256:
            c -= 3  # much faster: kept
        if op == "hires_rows" and knobs["row_unit_blocks"] == 4:
            c -= 0.1  # 1% of the forward: not enough
        if op == "bwd_dq_units" and knobs["vector_bytes"] == 8:
            c -= 5  # fast but wrong: never timed, never kept
        return c

    check, measure, timed = _fake(cost, wrong=[("bwd_dq_units", wrong)])
    rows = []
    best = gpu_tune.search(points, DEFAULT, check, measure, rows.append, lambda: 1e9)
    assert best == {**DEFAULT, "hires_rows": fast_rows}
    assert not any(b["bwd_dq_units"] == wrong for _, _, b in timed)
    statuses = {(r["kernel"], r["knobs"]): r["status"] for r in rows}
    assert statuses[("hires_rows", "threads=256")] == "faster: kept"
    assert statuses[("hires_rows", "threads=256 row_unit_blocks=4")] == "not faster"
    assert statuses[("bwd_dq_units", "vector_bytes=8")] == "WRONG: not timed"
    # every candidate is one knob away from the best of its time (and legal): 5 a kernel,
    # and hires_rows' row unit of 8 blocks
    assert len(rows) == 4 * 5 + 1

    picks, ratios = gpu_tune.verify(best, DEFAULT, measure, rows.append)
    assert picks == best and set(ratios) == {"fwd"} and ratios["fwd"] < 0.9
    recs = gpu_tune.records_of(picks, DEFAULT, ratios, target=SM90, dtype=torch.bfloat16,
                               bucket=BUCKET, device="test card", command="test")
    assert [r["op"] for r in recs] == ["hires_rows"]
    path = gpu_tune.write_records(recs, tmp_path / "out")
    # merged into the user db, the op's knob policy takes them
    records.save(isolated, records.records_in(path))
    chosen = knob_policy.knobs_for_shape(None, 16384, 64, 32, SM90, torch.bfloat16)
    assert chosen["hires_rows"] == fast_rows


def test_verification_drops_picks_that_do_not_hold(isolated):
    best = {**DEFAULT, "bwd_dkdv_units": {**DEFAULT["bwd_dkdv_units"], "threads": 64}}
    rows = []

    def measure(direction, a, b):
        return 10.0, 9.9, 0.99  # 1% faster: below MIN_GAIN

    picks, ratios = gpu_tune.verify(best, DEFAULT, measure, rows.append)
    assert picks == DEFAULT and ratios == {}
    assert rows[0]["status"].startswith("dropped")
    assert gpu_tune.records_of(picks, DEFAULT, ratios, target=SM90, dtype=torch.bfloat16,
                               bucket=BUCKET, device="x", command="x") == []


def test_the_search_stops_when_time_is_out_and_without_the_default_variant():
    points = {op: aot.space_points(op, SM90) for op in OPS}
    points["hires_units"] = [p for p in points["hires_units"] if p != DEFAULT["hires_units"]]
    check, measure, timed = _fake(lambda op, knobs: 1.0)
    rows = []
    best = gpu_tune.search(points, DEFAULT, check, measure, rows.append, lambda: 5.0)
    assert best == DEFAULT and not timed
    assert any(r["kernel"] == "hires_units" and r["status"].startswith("not tuned") for r in rows)
    assert all(r["status"] == "not timed: out of time" for r in rows if r["kernel"] != "hires_units")


def test_paired_timing_alternates_the_order():
    order = []
    a_ms, b_ms, ratio = gpu_tune.paired_ms(lambda: order.append("a"), lambda: order.append("b"),
                                           lambda fn: (fn(), 2.0 if order[-1] == "a" else 1.0)[1],
                                           rounds=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert (a_ms, b_ms, ratio) == (2.0, 1.0, 0.5)


def test_gpu_checks_tune_task_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, isolated):
    """The task's own code (inputs, the float64 check, the paired timing, the records
    file, the report) on the CPU kernels, with a space of two points of ``hires_rows``
    standing for the bundle's variants: a GPU run must not be the first to execute it."""
    from bench import gpu_check
    from bench.gpu_driver import Results

    gpu_check.import_package()
    args = gpu_check.parse_args(["--smoke", "--out", str(tmp_path / "out")])
    results = Results(tmp_path / "out" / gpu_check.RESULTS)
    ctx = gpu_check.Context(torch.device("cpu"), args, results, time.monotonic())
    default = targets.CPU.default_knobs("hires_rows")
    other = {**default, "pv_rows": 2 if default["pv_rows"] != 2 else 1}
    monkeypatch.setattr(gpu_tune, "bundle_points",
                        lambda manifests, ops, D, dtype: {"hires_rows": [default, other]})
    # the candidate comes out 30% faster: it must be checked, timed, verified and recorded
    real = gpu_tune.paired_ms

    def faster(run_a, run_b, time_ms, rounds):
        a_ms, b_ms, _ = real(run_a, run_b, time_ms, 1)
        return a_ms, 0.7 * a_ms, 0.7

    monkeypatch.setattr(gpu_tune, "paired_ms", faster)
    gpu_check.run_tune(None, ctx, results.append)
    rows = results.rows("tune")
    tried = [r for r in rows if r["step"] == "fwd" and r["kernel"] == "hires_rows"]
    assert len(tried) == 1 and tried[0]["status"] == "faster: kept", rows
    assert tried[0]["error"] <= tried[0]["limit"] == gpu_check.FWD_LIMIT[torch.bfloat16]
    assert any(r["step"] == "verify fwd" and r["status"] == "kept" for r in rows)
    saved = json.loads((tmp_path / "out" / gpu_tune.RECORDS_FILE).read_text())["records"]
    assert [(r["op"], r["knobs"], r["bucket"]) for r in saved] == \
        [("hires_rows", other, "N512-D64-b32")]
    note = " ".join(r["text"] for r in results.rows("tune_note"))
    assert "1 records written" in note
    text = gpu_check.render(gpu_check.collect(results, True),
                            {"argv": ["x"], "date": "d", "elapsed": 1.0, "budget": 1.0,
                             "smoke": True, "fatal": [], "notes": []})
    assert "## Tuning" in text and "faster: kept" in text
