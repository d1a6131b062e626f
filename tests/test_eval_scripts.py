"""The evaluation scripts of benchmarks/: one-shot Dice on phantoms / brains, synthesised brain images."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.checkpoint import load_model, save_model
from deepatlas_fast.model import DeepAtlas, bound_coords

ROOT = Path(__file__).resolve().parents[1]
BRAINS = ROOT.parent / "shared" / "data" / "brain_labelmaps"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_model(path: Path, spacing: float, frame: str = "grid") -> Path:
    torch.manual_seed(0)
    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8), frame=frame)
    save_model(path, model, preprocessing={"spacing": spacing, "modality": "ct"})
    return path


def test_folding_is_measured_on_the_raw_map_not_the_clamped_one():
    one_shot = _script("one_shot_dice")
    # a smooth map that leaves the template cube on a third of the grid but never folds
    raw = 1.5 * da.identity_coords((12, 12, 12)).double()
    det_mean, _, folding, outside = one_shot.jacobian_stats(raw)
    assert folding == 0.0 and det_mean == pytest.approx(1.5**3)
    assert 0.2 < outside < 0.9
    # the clamped map is flat (det 0) where it was clamped: counting that as folding was the old bug
    scale = [(s - 1) / 2 for s in raw.shape[2:]]
    assert (da.jacobian_det(bound_coords(raw), scale=scale) <= 0).any()


def test_model_runs_at_its_own_spacing_and_coordinates_come_back_on_the_eval_grid(tmp_path):
    one_shot = _script("one_shot_dice")
    from deepatlas_fast.checkpoint import load_model

    model = load_model(_tiny_model(tmp_path / "model.pt", spacing=24.0))
    image = torch.rand(20, 16, 18)
    raw = one_shot.model_coordinates(model, image, spacing=12.0)
    assert raw.shape == (1, 3, 20, 16, 18)
    # an untrained network is the identity on its own grid; upsampled half-voxel aligned it stays
    # within half a coarse voxel of the identity of the evaluation grid
    coarse_voxel = 2.0 / (torch.tensor([20, 16, 18]) / 2 - 1)
    error = (raw - da.identity_coords((20, 16, 18))).abs().amax(dim=(0, 2, 3, 4))
    assert (error <= coarse_voxel / 2 + 1e-5).all()


@pytest.mark.slow
@pytest.mark.parametrize("frame", ["grid", "moments"])
def test_one_shot_dice_runs_on_phantoms(tmp_path, capsys, frame):
    one_shot = _script("one_shot_dice")
    model = _tiny_model(tmp_path / "model.pt", spacing=32.0, frame=frame)
    rows = one_shot.main(["--model", str(model), "--phantoms", "3", "--spacing", "32", "--template", "12"])
    assert len(rows) == 2
    for row in rows:
        for method in ("deepatlas", "identity", "affine", "iterative"):
            assert 0.0 <= row[method] <= 1.0
    out = capsys.readouterr().out
    assert "| deepatlas |" in out and "folding fraction max 0.0000" in out
    if frame == "moments":  # an untrained network is its frame: same Dice, det J 1 relative to the frame
        assert all(row["frame only"] == pytest.approx(row["deepatlas"], abs=1e-9) for row in rows)
        assert "det J of the coordinate maps: mean 1.000" in out
    else:
        assert "| frame only |" not in out


def test_one_shot_dice_can_skip_the_registrations(tmp_path, capsys):
    one_shot = _script("one_shot_dice")
    model = _tiny_model(tmp_path / "model.pt", spacing=32.0, frame="moments")
    rows = one_shot.main(["--model", str(model), "--phantoms", "3", "--spacing", "32", "--template", "12",
                          "--no-registration"])
    assert len(rows) == 2 and all("affine" not in row and "iterative" not in row for row in rows)
    out = capsys.readouterr().out
    assert "| deepatlas |" in out and "| frame only |" in out and "| affine |" not in out


def test_objective_ceiling_optimises_free_fields_and_reports_dice(tmp_path, capsys):
    ceiling = _script("objective_ceiling")
    model = _tiny_model(tmp_path / "model.pt", spacing=32.0, frame="moments")
    ceiling.main(["--model", str(model), "--subjects", "3", "--steps", "6", "--control", "4", "--every", "3",
                  "--loss", '{"kernel_size": 3}'])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 3", "step 6"]
    dices = [float(line.split("Dice ")[1].split()[0]) for line in lines]
    implicit = [float(line.split("implicit ")[1].split()[0]) for line in lines]
    assert all(0.0 < d <= 1.0 for d in dices)
    assert implicit[-1] < implicit[0]  # the fields move to raise the exams' correlation
    with pytest.raises(SystemExit):
        ceiling.main(["--model", str(model), "--subjects", "1"])


def test_objective_ceiling_can_start_from_the_trained_network(tmp_path, capsys):
    ceiling = _script("objective_ceiling")
    model = _tiny_model(tmp_path / "model.pt", spacing=32.0, frame="moments")
    ceiling.main(["--model", str(model), "--subjects", "3", "--steps", "0", "--control", "4", "--start", "network",
                  "--loss", '{"kernel_size": 3}'])
    network = capsys.readouterr().out
    ceiling.main(["--model", str(model), "--subjects", "3", "--steps", "0", "--control", "4", "--start", "frame",
                  "--loss", '{"kernel_size": 3}'])
    frame = capsys.readouterr().out
    assert "start network" in network and "start frame" in frame
    # an untrained network is its frame, so both starts are the same map: same step-0 line
    assert network.splitlines()[-1] == frame.splitlines()[-1]


def test_ceiling_resamples_brain_labels_to_the_label_of_largest_share():
    ceiling = _script("objective_ceiling")
    labels = torch.zeros(16, 16, 16, dtype=torch.long)
    labels[:8] = 1
    labels[8:, :8] = 2
    labels[0, 0, 0] = 3  # one voxel of eight: outvoted in its coarse voxel
    image = labels.float()
    coarse_image, coarse_labels = ceiling.at_spacing(image, labels, 0.5)
    assert coarse_image.shape == coarse_labels.shape == (8, 8, 8)
    assert (coarse_labels[:4] == 1).all() and (coarse_labels[4:, :4] == 2).all() and (coarse_labels[4:, 4:] == 0).all()
    assert coarse_image[0, 0, 0] == pytest.approx((7 * 1 + 3) / 8)
    same_image, same_labels = ceiling.at_spacing(image, labels, 1.0)
    assert same_image is image and same_labels is labels


@pytest.mark.skipif(not BRAINS.is_dir(), reason=f"needs the brain label maps in {BRAINS} (not shipped)")
def test_objective_ceiling_runs_on_the_synthesised_brains(tmp_path, capsys):
    ceiling = _script("objective_ceiling")
    model = _tiny_model(tmp_path / "model.pt", spacing=16.0, frame="moments")
    ceiling.main(["--model", str(model), "--brains", str(BRAINS), "--subjects", "3", "--steps", "4", "--control", "4",
                  "--every", "4", "--splat", "16", "--data-spacing", "8"])
    out = capsys.readouterr().out
    assert out.startswith("3 brains ")
    dices = [float(line.split("Dice ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]
    assert len(dices) == 2 and all(0.0 < d <= 1.0 for d in dices)


@pytest.mark.skipif(not BRAINS.is_dir(), reason=f"needs the brain label maps in {BRAINS} (not shipped)")
def test_brain_images_are_written_on_the_label_grid(tmp_path):
    brain_images = _script("brain_images")
    from deepatlas_fast.data.io import load_volume
    from deepatlas_fast.data.synth import brain_subject_paths, load_brain_subject

    written = brain_images.main(["--labelmaps", str(BRAINS), "--out", str(tmp_path), "--spacing", "8"])
    assert len(written) == len(brain_subject_paths(BRAINS)) and all(os.path.exists(p) for p in written)
    image = load_volume(written[0])
    labels = load_brain_subject(brain_subject_paths(BRAINS)[0], spacing=8, crop=True, margin=4)
    assert tuple(image.data.shape) == tuple(labels.data.shape)
    assert torch.allclose(torch.as_tensor(image.affine), torch.as_tensor(labels.affine), atol=1e-4)
    assert 0.0 <= float(image.data.min()) and float(image.data.max()) <= 1.0 + 1e-6
    assert float(image.data[labels.data > 0].mean()) > float(image.data[labels.data == 0].mean())


def test_network_fit_fits_the_network_on_every_exam_at_once_and_saves_it(tmp_path, capsys):
    fit = _script("network_fit")
    model = _tiny_model(tmp_path / "model.pt", spacing=32.0, frame="moments")
    saved = tmp_path / "fit.pt"
    fit.main(["--model", str(model), "--subjects", "3", "--seeds", "0,7", "--steps", "4", "--every", "2",
              "--lr", "1e-2", "--loss", '{"kernel_size": 3}', "--save", str(saved)])
    out = capsys.readouterr().out
    assert "6 exams (2 seeds x 3)" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" (")[0] for line in lines] == ["step 0", "step 2", "step 4"]
    dices = [float(line.split("Dice ")[1].split()[0]) for line in lines]
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert all(0.0 < d <= 1.0 for d in dices)
    assert losses[-1] < losses[0]
    before, after = load_model(model).state_dict(), load_model(saved).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit):
        fit.main(["--model", str(model), "--seeds", "0,0"])
    with pytest.raises(SystemExit):
        fit.main(["--model", str(model), "--subjects", "1"])
