"""The user-facing tools: ``mra-compile demo`` / ``bench``, the accuracy measurement, plots."""
import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mra_compile import cli
from mra_compile.reference import exact_attention
from mra_compile.tools import accuracy, benchmarks

REPO = Path(__file__).resolve().parent.parent


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("bpr", [1, 2, 3, 4, 20])
def test_window_blocks(n, bpr):
    w = accuracy.window_blocks(n, bpr)
    assert (w.sum(-1) == min(bpr, n)).all()
    assert w.diagonal().all()  # the query block itself is always in its window
    rows, cols = w.nonzero(as_tuple=True)
    for i in range(n):  # contiguous, within reach of the diagonal
        c = cols[rows == i]
        assert (c.diff() == 1).all() and (c - i).abs().max() < min(bpr, n)


def test_random_blocks():
    g = torch.Generator().manual_seed(0)
    r = accuracy.random_blocks(2, 3, 10, 4, g)
    assert r.shape == (2, 3, 10, 10) and (r.sum(-1) == 4).all()
    assert not torch.equal(r[0, 0], r[0, 1])  # independent per head
    assert (accuracy.random_blocks(1, 1, 3, 8, g).sum(-1) == 3).all()


def test_block_sparse_attention_is_exact_on_all_blocks_and_local_on_the_diagonal():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    exact = exact_attention(q.double(), k.double(), v.double())
    full = accuracy.block_sparse_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool))
    torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-5)
    diag = accuracy.block_sparse_attention(q, k, v, accuracy.window_blocks(3, 1))
    for i in range(3):  # each 32-token block attends to itself only
        s = slice(32 * i, 32 * i + 32)
        local = exact_attention(q[:, :, s].double(), k[:, :, s].double(), v[:, :, s].double())
        torch.testing.assert_close(diag[:, :, s], local, rtol=1e-5, atol=1e-5)


def test_topic_inputs_cluster_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = accuracy.topic_inputs(1, 2, 1024, 64, g)
    assert q.shape == k.shape == v.shape == (1, 2, 1024, 64)
    assert abs(v.std().item() - 1) < 0.1
    logits = (q @ k.transpose(-1, -2) / 8).flatten()
    # Two populations: same topic (~TOPIC_LOGIT) and different topics (~0), little between.
    same = (logits > accuracy.TOPIC_LOGIT - 2).float().mean()
    other = (logits < 2).float().mean()
    assert 0.05 < same < 0.6 and 0.4 < other < 0.95 and same + other > 0.9


def test_measure_rows_and_full_budget_is_exact():
    n = 4  # N = 128: 16 blocks per row cover every block
    rows = accuracy.measure("topics", seq_len=128, heads=2, head_dim=16, blocks_per_row=(1, 16))
    assert [r.blocks_per_row for r in rows] == [1, 16]
    assert rows[0].share == 1 / n and rows[1].share == 1.0
    for method in accuracy.METHODS:
        assert rows[0].errors[method] > 1e-3  # a real approximation at 1 block per row
        assert rows[1].errors[method] < 1e-4  # every block exact: exact attention
    table = accuracy.markdown(rows)
    assert "| 16 | 100.0% |" in table and "**topics**" in table


# ---------------------------------------------------------------------------- CLI


def test_cli_demo_passes_arguments_through(capsys):
    assert cli.main(["demo", "--seq-len", "64", "--heads", "1", "--head-dim", "8",
                     "--block-per-row", "1"]) == 0
    out = capsys.readouterr().out
    assert "MRA-2 demo" in out and "N=64" in out and "speedup" in out
    assert cli.main(["demo", "--help"]) == 0
    assert "--seq-len" in capsys.readouterr().out
    assert cli.main(["demo", "--no-such-option"]) == 2


def test_cli_bench_writes_tables_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = ["bench", "--sizes", "64", "100", "--repeat", "1", "--csv", str(tmp_path / "f.csv"),
            "--md", str(tmp_path / "f.md"), "--plot", "--error-seq-len", "128"]
    assert cli.main(args) == 0
    with open(tmp_path / "f.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["N"], r["mode"]) for r in rows] == [("64", "full"), ("64", "sparse"),
                                                   ("100", "full"), ("100", "sparse")]
    for r in rows:
        for field in ("op_ms", "fallback_ms", "reference_ms", "sdpa_ms"):
            assert float(r[field]) > 0
        assert float(r["max_rel_err_op_vs_fallback"]) < 1e-4
    assert "| 100 | sparse |" in (tmp_path / "f.md").read_text()
    for png in (benchmarks.TIME_PLOT, benchmarks.ERROR_PLOT):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["bench", "--sizes", "0"]) == 2


def test_bench_without_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "load_fallback", lambda: None)
    assert benchmarks.main(["--sizes", "64", "--repeat", "1", "--reference-max-gb", "0",
                            "--csv", str(tmp_path / "f.csv"), "--md", str(tmp_path / "f.md")]) == 0
    text = (tmp_path / "f.md").read_text()
    assert "Fallback: not timed" in text and "| 64 | full |" in text
    assert "n/a" in text and "skipped" in text


def test_load_fallback_finds_the_packaged_copy():
    fallback = benchmarks.load_fallback()
    assert fallback is not None
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 64, 8, generator=g) for _ in range(3))
    out = fallback(q, k, v, num_blocks=4, approx_mode="full")
    assert out.shape == q.shape


def test_accuracy_script(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    script = load_script("accuracy")
    md = tmp_path / "acc.md"
    assert script.main(["--seq-len", "128", "--heads", "1", "--head-dim", "16",
                        "--blocks-per-row", "1", "2", "--structures", "local+prefix", "noise",
                        "--md", str(md), "--plot"]) == 0
    text = md.read_text()
    assert text.startswith("# MRA-2 accuracy at equal budget")
    assert "**local+prefix**" in text and "**noise**" in text and "sliding window" in text
    assert md.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_script_is_a_thin_wrapper():
    script = load_script("bench_forward")
    assert script.main is benchmarks.main


def test_plot_times_handles_missing_series(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [benchmarks.make_row(n, m, {("op", m): 1.0 * n, ("sdpa", None): 2.0 * n}, None, 0.0)
            for n in (64, 128) for m in benchmarks.MODES]
    benchmarks.plot_times(rows, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert math.isclose(rows[0]["sdpa_over_op"], 2.0)


# ---------------------------------------------------------------------------- bf16 vs SDPA


def test_bf16_error_vs_sdpa_writes_its_table(tmp_path):
    script = load_script("bf16_error_vs_sdpa")
    out = tmp_path / "e.md"
    assert script.main(["--head-dims", "1", "64", "--cases", "3", "--out", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 64 ")]
    assert [r[1] for r in rows] == ["op", "SDPA"]
    assert all(float(r[2]) < script.TOLERANCE for r in rows)  # D = 64: within bf16's tolerance
    assert "Command: `python bench/bf16_error_vs_sdpa.py --head-dims 1 64" in out.read_text()
    for bad in (["--cases", "0"], ["--head-dims", "0"]):
        with pytest.raises(SystemExit):
            script.main([*bad, "--out", str(out)])


# ---------------------------------------------------------------------------- huge pages


def test_huge_pages_bench_compares_the_same_inputs_on_other_pages(tmp_path, monkeypatch):
    # bench/bench_huge_pages.py: the inputs' copies on memory asked for 2 MB pages give
    # the same outputs (it checks them bit for bit before timing) and it writes its row;
    # where the kernel has no transparent huge pages it says so instead of timing.
    script = load_script("bench_huge_pages")
    out = tmp_path / "h.md"
    argv = ["--sizes", "96", "--dtypes", "float32", "--modes", "sparse", "--rounds", "1",
            "--out", str(out)]
    if script.thp_mode() in ("always", "madvise"):
        assert script.main(argv) == 0
        rows = [line for line in out.read_text().splitlines() if line.startswith("| 96 |")]
        assert len(rows) == 1 and "| float32 | sparse |" in rows[0]
        assert "Command: `python bench/bench_huge_pages.py --sizes 96" in out.read_text()
    monkeypatch.setattr(script, "thp_mode", lambda: "never")
    with pytest.raises(SystemExit):
        script.main(argv)
    monkeypatch.setattr(script, "thp_mode", lambda: "madvise")
    with pytest.raises(SystemExit):
        script.main([*argv[:-2], "--rounds", "0", "--out", str(out)])
