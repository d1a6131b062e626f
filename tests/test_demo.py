"""``deepatlas-fast demo``: the whole job on generated phantoms, end to end (a short budget)."""

import json
import os

import pytest

pytest.importorskip("nibabel")

from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.demo import run_demo  # noqa: E402

METHODS = ["deepatlas one-shot", "no alignment", "affine", "iterative"]


def test_demo_trains_segments_compares_and_writes_everything(tmp_path, capsys, monkeypatch):
    """The README's main command with a short budget, through the command line."""
    from deepatlas_fast import frame

    monkeypatch.setattr(frame, "FIT_STEPS", 10)  # the affine frame's fits come out of the 6 s of training budget
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.4", "--targets", "2", "--subjects", "3", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == METHODS
    for row in results["methods"].values():
        assert len(row["dice"]) == 2 and all(0.0 <= d <= 1.0 for d in row["dice"])
        assert row["min_dice"] <= row["mean_dice"] <= row["max_dice"] and row["seconds_per_target"] >= 0
    # registration on phantoms is well above chance: the table compares real numbers
    assert results["methods"]["iterative"]["mean_dice"] > results["methods"]["no alignment"]["mean_dice"]
    assert results["training"]["steps"] >= 1 and os.path.isfile(results["training"]["model"])
    names = sorted(os.path.basename(t) for t in results["targets"])
    assert sorted(os.listdir(out / "segmentations")) == names
    assert sorted(os.listdir(out / "pictures")) == [n.split(".nii")[0] + ".png" for n in names]
    table = "\n".join(lines)
    assert "| method | mean Dice | min | max | s per target |" in table
    assert all(f"| {m} |" in table for m in METHODS)
    assert not any("continue with --resume" in line for line in lines)
    assert any(line.startswith("trained ") for line in lines)


def test_demo_refuses_a_used_folder_and_bad_budgets(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "used"), "--minutes", "0.1", "--quiet"]) == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "used" / "x.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        main(["demo", "--minutes", "0"])
    with pytest.raises(ValueError, match="targets must be an int >= 1"):
        run_demo(str(tmp_path / "new"), targets=0)
