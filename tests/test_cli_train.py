"""The ``deepatlas-fast train`` command: inputs (files, folders, globs, phantoms), run files, errors."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deepatlas_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "stages": [{"steps": 2, "size": 16, "levels": 2}],
    "spacing": 6.0,
    "phantom_shape": [16, 16, 16],
    "model": {"base": 4, "levels": 3, "features": 2, "feature_width": 4, "template_shape": [8, 8, 8]},
    "loss": {"kernel_size": 5},
    "feature_steps": 1,
    "log_every": 1,
    "amp": "off",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **overrides) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return str(path)


def _write_nifti(path, shape=(18, 20, 16), spacing=(6.0, 6.0, 6.0), seed=0, data=None):
    import nibabel as nib

    if data is None:
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        body = (grid**2).sum(0) < 0.6 + 0.1 * rng.random()
        data = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def test_train_on_a_folder_of_nifti_files(tmp_path, capsys):
    from deepatlas_fast.checkpoint import load_model

    folder = tmp_path / "exams"
    folder.mkdir()
    for i in range(3):
        _write_nifti(folder / f"exam{i}.nii.gz", seed=i)
    out = tmp_path / "run"
    rc = main(["train", "--images", str(folder), "--out", str(out), "--config", _config(tmp_path),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert {"model.pt", "config.yaml", "metrics.csv", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    model, info = load_model(out / "model.pt", with_metadata=True)
    assert info["preprocessing"]["spacing"] == 6.0 and info["preprocessing"]["modality"] == "auto"
    assert info["metadata"]["data"] == {"kind": "images", "count": 3}
    assert "exam0" not in str(torch.load(out / "model.pt", weights_only=True)["metadata"])  # no file names
    assert capsys.readouterr().err == ""  # --quiet: no progress bar


def test_train_on_files_and_globs_with_spacing_and_resume(tmp_path):
    for i in range(2):
        _write_nifti(tmp_path / f"a{i}.nii.gz", seed=i, spacing=(4.0, 5.0, 6.0))
    _write_nifti(tmp_path / "b.nii", seed=5)
    out = tmp_path / "run"
    args = ["train", "--images", str(tmp_path / "a*.nii.gz"), str(tmp_path / "b.nii"), "--out", str(out),
            "--config", _config(tmp_path), "--spacing", "8", "--quiet"]
    assert main(args + ["--max-steps", "2"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["spacing"] == 8.0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # data and config from the run
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert main(["train", "--out", str(out), "--resume", "--extend-steps", "2", "--quiet"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][-1]["steps"] == 4


def test_train_on_phantoms(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--phantoms", "2", "--out", str(out), "--config", _config(tmp_path, spacing=24.0),
                 "--max-steps", "2", "--ops", "stock", "--quiet"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["data"] == {"images": None, "phantoms": 2} and state["ops"] == "stock"


@pytest.mark.parametrize("case", ["no files", "empty folder", "unreadable", "2-D", "4-D", "unknown key",
                                  "bad value", "missing config", "mismatch", "no checkpoint", "existing run",
                                  "extend without resume", "whole without resume", "no data"])
def test_clear_errors(tmp_path, capsys, case):
    out = tmp_path / "run"
    config = _config(tmp_path)
    good = _write_nifti(tmp_path / "good.nii.gz")
    args = ["train", "--out", str(out), "--config", config, "--quiet"]
    if case == "no files":
        args += ["--images", str(tmp_path / "missing*.nii.gz")]
        expected = "matches no files"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        args += ["--images", str(tmp_path / "empty")]
        expected = "holds no .nii/.nii.gz files"
    elif case == "unreadable":
        bad = tmp_path / "broken.nii.gz"
        bad.write_bytes(b"this is not a NIfTI file")
        args += ["--images", str(good), str(bad)]
        expected = "broken.nii.gz"
    elif case == "2-D":
        flat = _write_nifti(tmp_path / "flat.nii.gz", data=np.zeros((20, 20), np.float32))
        args += ["--images", str(good), str(flat)]
        expected = "flat.nii.gz.*2-D"
    elif case == "4-D":
        series = _write_nifti(tmp_path / "series.nii.gz", data=np.zeros((8, 8, 8, 3), np.float32))
        args += ["--images", str(good), str(series)]
        expected = "series.nii.gz.*4-D"
    elif case == "unknown key":
        args = ["train", "--out", str(out), "--config", _config(tmp_path, learning_rate=0.1), "--phantoms", "2"]
        expected = r"unknown key\(s\) \['learning_rate'\]"
    elif case == "bad value":
        args = ["train", "--out", str(out), "--config", _config(tmp_path, amp="fp8"), "--phantoms", "2"]
        expected = "config.amp must be one of"
    elif case == "missing config":
        args = ["train", "--out", str(out), "--config", str(tmp_path / "nope.yaml"), "--phantoms", "2"]
        expected = "config: no such file"
    elif case == "mismatch":
        assert main(args + ["--phantoms", "2", "--max-steps", "1", "--spacing", "24"]) == 0
        args = ["train", "--out", str(out), "--resume", "--config", _config(tmp_path, seed=5), "--quiet"]
        expected = r"does not match the run being resumed.*\['seed', 'spacing'\]"
    elif case == "no checkpoint":
        args += ["--resume"]
        expected = "holds no checkpoint.pt"
    elif case == "extend without resume":
        args += ["--phantoms", "2", "--spacing", "24", "--extend-steps", "3"]
        expected = "extend_steps lengthens a run being resumed"
    elif case == "whole without resume":
        args += ["--phantoms", "2", "--spacing", "24", "--whole-steps", "3"]
        expected = "whole_steps appends a stage to a run being resumed"
    elif case == "existing run":
        assert main(args + ["--phantoms", "2", "--max-steps", "1", "--spacing", "24"]) == 0
        args += ["--phantoms", "2", "--spacing", "24"]
        expected = "already holds a training run"
    else:
        expected = "no training data given"
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("deepatlas-fast train: error:"), err
    import re

    assert re.search(expected, err), err
    assert "Traceback" not in err


def test_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--phantoms", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--phantoms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--phantoms", "2", "--images", "x.nii", "--out", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--phantoms", "2"])
    assert "--out" in capsys.readouterr().err


def test_console_help_lists_train():
    proc = subprocess.run([sys.executable, "-m", "deepatlas_fast.cli", "train", "--help"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0
    for flag in ("--images", "--phantoms", "--out", "--config", "--spacing", "--max-minutes", "--max-steps",
                 "--device", "--ops", "--resume", "--quiet"):
        assert flag in proc.stdout
