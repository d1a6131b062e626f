"""``deepatlas-fast bench``: the user-facing kernel benchmark (timings are never asserted, only the report)."""

import json

from deepatlas_fast import bench
from deepatlas_fast.cli import main


def test_bench_writes_table_json_and_plot(tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    assert main(["bench", "--sizes", "8", "12", "--reps", "1", "--ops", "jacobian_var,lncc", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| op | case | impl | fwd ms | bwd ms | fwd+bwd ms |" in printed and "plot.png" in printed
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"jacobian_var", "lncc"}
    assert {r["side"] for r in rows} == {8, 12}
    impls = {r["impl"] for r in rows if r["op"] == "jacobian_var"}
    assert "stock" in impls and "reference" in impls  # the reference joins at the smallest size only
    assert {r["side"] for r in rows if r["impl"] == "reference"} == {8}
    assert all("error" not in r and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all("speedup_vs_stock" in r for r in rows)  # against stock / MONAI measured in the same run
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text().count("| jacobian_var |") == sum(r["op"] == "jacobian_var" for r in rows)


def test_plot_needs_two_sizes(tmp_path):
    rows = [{"op": "lncc", "case": "k=9 box 1x1x8³", "impl": "cpu", "side": 8, "batch": 1, "channels": 1,
             "fwd_bwd_ms": 1.0}]
    assert bench.plot_png(rows, str(tmp_path / "p.png")) is None
    rows.append(dict(rows[0], side=16, case="k=9 box 1x1x16³", fwd_bwd_ms=4.0))
    assert bench.plot_png(rows, str(tmp_path / "p.png")) == str(tmp_path / "p.png")


def test_bench_errors_name_the_option(tmp_path, capsys):
    assert main(["bench", "--ops", "blur", "--out", str(tmp_path)]) == 2
    assert "--ops: unknown op(s) blur" in capsys.readouterr().err
    assert main(["bench", "--ops", "lncc,blur", "sample", "--out", str(tmp_path)]) == 2
    assert "--ops: unknown op(s) blur" in capsys.readouterr().err
    assert main(["bench", "--backends", "fpga", "--sizes", "8", "--out", str(tmp_path)]) == 2
    assert "--backends: unknown backend(s) fpga" in capsys.readouterr().err
