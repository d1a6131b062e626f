"""register: affine and deformable registration in world coordinates (our ops), label/image warping
onto the fixed grid, and the ``register`` command. Tiny phantoms (<= 32^3, 12 mm) on one thread."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nib = pytest.importorskip("nibabel")

from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.data.io import volume_from_array  # noqa: E402
from deepatlas_fast.data.phantoms import phantom_subject  # noqa: E402
from deepatlas_fast.evaluate import resample_to_grid  # noqa: E402
from deepatlas_fast.propagate import dice, mean_dice  # noqa: E402
from helpers import write_nifti  # noqa: E402
from deepatlas_fast.register import (  # noqa: E402
    AffineResult,
    affine_register,
    coordinates,
    default_spacing,
    deformable_register,
    warp_image,
    warp_labels,
)

SHAPE = (32, 32, 32)
LABELS = range(1, 12)
AIR = -1000.0


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (tiny volumes)."""


@pytest.fixture(scope="module")
def phantom():
    """(HU image, labels, affine) of one 32^3 phantom at 12 mm."""
    return phantom_subject(3, shape=SHAPE)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _known_affine() -> np.ndarray:
    """A world transform fixed -> moving: ~8 degrees of rotation, a few % scale, 15 mm of translation."""
    t = np.eye(4)
    t[:3, :3] = _rotation(0.05, -0.04, 0.14) @ np.diag([1.05, 0.96, 1.02])
    t[:3, 3] = [12.0, -8.0, 5.0]
    return t


def _resample_world(data: torch.Tensor, affine: np.ndarray, matrix: np.ndarray, out_affine: np.ndarray,
                    out_shape, mode: str, fill: float) -> torch.Tensor:
    """``data`` (grid ``affine``) read at ``inverse(matrix) @ out_affine @ index`` of every output voxel.

    An independent implementation with ``F.grid_sample``: the output is the image as the moving
    subject, when ``matrix`` maps fixed world points to moving world points.
    """
    chain = np.linalg.inv(affine) @ np.linalg.inv(matrix) @ out_affine
    index = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    source = index @ chain[:3, :3].T + chain[:3, 3]
    normalised = source / (np.array(data.shape) - 1) * 2 - 1
    grid = torch.as_tensor(normalised[:, ::-1].copy(), dtype=torch.float32).view(1, *out_shape, 3)
    x = (data.to(torch.float32) - fill)[None, None]
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True)[0, 0] + fill
    return out if mode == "bilinear" else out.round().to(torch.int64)


def _moving_pair(phantom, matrix: np.ndarray, out_affine: np.ndarray, out_shape):
    """Moving image and label Volumes: the phantom moved by ``matrix`` and stored on (``out_affine``, ``out_shape``)."""
    image, labels, affine = phantom
    img = _resample_world(image, affine, matrix, out_affine, out_shape, "bilinear", AIR)
    lab = _resample_world(labels, affine, matrix, out_affine, out_shape, "nearest", 0)
    return volume_from_array(img, out_affine), volume_from_array(lab, out_affine, labels=True)


def _foreground_error(result_matrix: np.ndarray, truth: np.ndarray, labels: torch.Tensor, affine: np.ndarray) -> float:
    """RMS distance in mm between the two transforms' images of the labelled fixed voxels."""
    index = torch.nonzero(labels > 0).numpy().astype(np.float64)
    points = np.c_[index @ affine[:3, :3].T + affine[:3, 3], np.ones(len(index))]
    return float(np.sqrt((((points @ result_matrix.T) - (points @ truth.T))[:, :3] ** 2).sum(1).mean()))


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid",
    [
        "same",  # moving on the fixed grid
        "flipped",  # moving stored with a flipped first axis, anisotropic spacing, another origin
    ],
)
def test_affine_recovers_a_known_world_transform(phantom, grid):
    image, labels, affine = phantom
    truth = _known_affine()
    if grid == "same":
        out_affine, out_shape = affine, SHAPE
    else:
        out_affine = np.diag([-10.0, 13.0, 11.0, 1.0])
        out_affine[:3, 3] = [150.0, -200.0, -170.0]
        out_shape = (30, 30, 34)
    moving, moving_labels = _moving_pair(phantom, truth, out_affine, out_shape)
    fixed = volume_from_array(image, affine)
    result = affine_register(fixed, moving, quiet=True)
    assert isinstance(result, AffineResult) and result.matrix.shape == (4, 4)
    # within a third of a 12 mm voxel on the labelled anatomy
    assert _foreground_error(result.matrix, truth, labels, affine) < 4.0
    assert result.lncc > result.lncc_initial
    before = mean_dice(dice(resample_to_grid(moving_labels, fixed), labels, LABELS))
    after = mean_dice(dice(warp_labels(result, moving_labels), labels, LABELS))
    assert after > 0.75 and after > before + 0.3
    moved = warp_image(result, moving)
    assert moved.shape == SHAPE and moved.dtype == torch.float32


def test_identity_when_the_same_image_lies_on_another_grid(phantom):
    """Same subject, same world position, stored flipped and coarser: the registration stays the identity."""
    image, labels, affine = phantom
    out_affine = np.diag([-13.0, 12.0, -14.0, 1.0])
    out_affine[:3, 3] = [190.0, -180.0, 200.0]
    moving, moving_labels = _moving_pair(phantom, np.eye(4), out_affine, (28, 32, 27))
    fixed = volume_from_array(image, affine)
    result = affine_register(fixed, moving, quiet=True, transform="rigid")
    assert _foreground_error(result.matrix, np.eye(4), labels, affine) < 3.0
    # as good as reading the labels at the exact world positions (both lose detail to the coarse grids)
    exact = mean_dice(dice(resample_to_grid(moving_labels, fixed), labels, LABELS))
    assert mean_dice(dice(warp_labels(result, moving_labels), labels, LABELS)) > exact - 0.02


def _smooth_displacement(shape, amplitude_voxels: float, seed: int) -> torch.Tensor:
    """A smooth random displacement ``[1, 3, *shape]`` in normalised units (max ~``amplitude_voxels``)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    field = field / field.abs().amax() * amplitude_voxels
    return (field * torch.tensor([2.0 / (n - 1) for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)).float()


def test_deformable_improves_on_affine_without_folding(phantom):
    import deepatlas_fast as da

    image, labels, affine = phantom
    disp = _smooth_displacement(SHAPE, 2.0, seed=1)
    moving_image = da.warp((image - AIR)[None, None], disp, "zeros")[0, 0] + AIR
    onehot = F.one_hot(labels, 12).permute(3, 0, 1, 2)[None].float()
    moving_labels = da.warp(onehot, disp, "zeros").argmax(1)[0]
    fixed = volume_from_array(image, affine)
    moving = volume_from_array(moving_image, affine)
    moving_lab = volume_from_array(moving_labels, affine, labels=True)
    stage = affine_register(fixed, moving, quiet=True)
    result = deformable_register(fixed, moving, stage, quiet=True)
    affine_dice = mean_dice(dice(warp_labels(stage, moving_lab), labels, LABELS))
    deformable_dice = mean_dice(dice(warp_labels(result, moving_lab), labels, LABELS))
    assert deformable_dice > affine_dice + 0.05 and deformable_dice > 0.85
    assert result.folding < 1e-3
    assert result.lncc > stage.lncc
    assert result.displacement.shape == (3, *result.grid_shape)
    # a 4x4 matrix works as the affine stage too, and measures its own LNCC
    again = deformable_register(fixed, moving, stage.matrix, quiet=True, iterations=(2, 2, 2))
    assert again.affine.lncc == pytest.approx(stage.lncc, abs=1e-4) and again.affine.seconds == 0.0


def test_warps_land_on_the_fixed_grid_and_keep_labels():
    # fixed on an anisotropic grid; identity transform: the labels come back by nearest-like sampling
    labels = torch.zeros(12, 10, 8, dtype=torch.int64)
    labels[3:8, 2:7, 2:6] = 4
    labels[8:11, 5:9, 1:4] = 9
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    fixed = volume_from_array(labels.float() * 100 - 1000, affine)
    moving_labels = volume_from_array(labels, affine, labels=True)
    identity = AffineResult(np.eye(4), affine, fixed.shape, 2.0, 0.0, 0.0, 0.0)
    assert torch.equal(warp_labels(identity, moving_labels), labels)
    assert torch.allclose(warp_image(identity, fixed), fixed.data, atol=1e-3)
    # outside the moving field of view: background labels, image minimum
    shifted = identity.matrix.copy()
    shifted[0, 3] = 100.0
    far = AffineResult(shifted, affine, fixed.shape, 2.0, 0.0, 0.0, 0.0)
    assert int(warp_labels(far, moving_labels).max()) == 0
    assert torch.allclose(warp_image(far, fixed), torch.full(fixed.shape, -1000.0))
    assert coordinates(identity, fixed).shape == (1, 3, 12, 10, 8)


def test_default_spacing_caps_the_working_grid():
    small = volume_from_array(torch.zeros(32, 32, 32), np.diag([12.0, 12.0, 12.0, 1.0]))
    big = volume_from_array(torch.zeros(200, 200, 150), np.diag([1.0, 1.0, 2.0, 1.0]))
    assert default_spacing(small, small) == 12.0
    assert default_spacing(big, small) == pytest.approx(372.0 / 95)  # the small image's 31 * 12 mm extent
    assert math.ceil(371.0 / default_spacing(big, small)) + 1 <= 96


def test_bad_arguments_raise_clear_errors(phantom):
    image, labels, affine = phantom
    fixed = volume_from_array(image, affine)
    with pytest.raises(TypeError, match="fixed must be a Volume"):
        affine_register(image, fixed, quiet=True)
    with pytest.raises(ValueError, match="moving must be an image"):
        affine_register(fixed, volume_from_array(labels, affine, labels=True), quiet=True)
    with pytest.raises(ValueError, match="transform must be"):
        affine_register(fixed, fixed, transform="similarity", quiet=True)
    with pytest.raises(ValueError, match="no foreground"):
        affine_register(fixed, volume_from_array(torch.zeros(SHAPE), affine), quiet=True)
    with pytest.raises(ValueError, match="iterations must be one value or one per pyramid level"):
        affine_register(fixed, fixed, iterations=(1, 2), quiet=True)
    with pytest.raises(ValueError, match="affine must be an AffineResult or a finite 4x4"):
        deformable_register(fixed, fixed, np.eye(3), quiet=True)


# ----------------------------------------------------------------------------------------------
# the command




@pytest.fixture(scope="module")
def files(tmp_path_factory, phantom):
    """Fixed image (RAS grid) and moving image + labels stored on an LPS-like grid of another spacing."""
    folder = tmp_path_factory.mktemp("register")
    image, labels, affine = phantom
    out_affine = np.diag([-11.0, -12.5, 12.0, 1.0])
    out_affine[:3, 3] = [170.0, 190.0, -180.0]
    out_shape = (31, 30, 32)
    truth = _known_affine()
    img = _resample_world(image, affine, truth, out_affine, out_shape, "bilinear", AIR)
    lab = _resample_world(labels, affine, truth, out_affine, out_shape, "nearest", 0)
    return {
        "fixed": write_nifti(folder / "fixed.nii.gz", image.numpy(), affine),
        "fixed_labels": labels,
        "moving": write_nifti(folder / "moving.nii.gz", img.numpy(), out_affine),
        "moving_labels": write_nifti(folder / "moving_labels.nii.gz", lab.numpy().astype(np.int16), out_affine),
        "other_grid_labels": write_nifti(folder / "other.nii.gz", labels.numpy().astype(np.int16), affine),
    }


def test_register_command_writes_on_the_fixed_grid(files, tmp_path, capsys):
    out = tmp_path / "moved.nii.gz"
    out_labels = tmp_path / "moved_labels.nii.gz"
    matrix_file = tmp_path / "affine.json"
    png = tmp_path / "overlay.png"
    code = main(["register", "--fixed", files["fixed"], "--moving", files["moving"],
                 "--moving-labels", files["moving_labels"], "-o", str(out), "--out-labels", str(out_labels),
                 "--save-affine", str(matrix_file), "--png", str(png), "--quiet"])
    assert code == 0
    fixed = nib.load(files["fixed"])
    for path in (out, out_labels):
        written = nib.load(str(path))
        assert written.shape == fixed.shape
        np.testing.assert_allclose(written.affine, fixed.affine, atol=1e-6)
    moved_labels = np.asarray(nib.load(str(out_labels)).dataobj)
    assert moved_labels.dtype == np.uint8
    assert mean_dice(dice(torch.as_tensor(moved_labels.astype(np.int64)), files["fixed_labels"], LABELS)) > 0.75
    assert np.asarray(nib.load(str(out)).dataobj).dtype == np.float32
    saved = json.loads(matrix_file.read_text())
    assert np.asarray(saved["matrix"]).shape == (4, 4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "LNCC" in printed and "folding fraction" in printed and str(out) in printed


def test_register_command_affine_only_names_default_label_output(files, tmp_path, capsys):
    out = tmp_path / "moved.nii.gz"
    code = main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--affine-only",
                 "--moving-labels", files["moving_labels"], "-o", str(out), "--quiet", "--spacing", "16"])
    assert code == 0
    written = nib.load(str(tmp_path / "moved_labels.nii.gz"))
    assert written.shape == nib.load(files["fixed"]).shape
    assert "folding" not in capsys.readouterr().out


def test_register_command_without_labels_draws_the_moved_image(files, tmp_path):
    png = tmp_path / "moved.png"
    code = main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--affine-only",
                 "-o", str(tmp_path / "moved.nii"), "--png", str(png), "--quiet", "--spacing", "16"])
    assert code == 0 and nib.load(str(tmp_path / "moved.nii")).shape == SHAPE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*labels*"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--fixed": "missing.nii.gz"}, "--fixed: path .*missing.nii.gz.*no such file"),
        ({"--moving": "missing.nii.gz"}, "--moving: path .*missing.nii.gz.*no such file"),
        ({"--moving-labels": "other_grid_labels"}, "--moving-labels: .*differs from the image's grid"),
        ({"--out-labels": "x.nii.gz"}, "--out-labels: only used with --moving-labels"),
        ({"-o": "moved.png"}, "-o/--out: .*must end in .nii or .nii.gz"),
    ],
)
def test_register_command_errors_name_the_option(files, tmp_path, capsys, change, message):
    args = {"--fixed": files["fixed"], "--moving": files["moving"], "-o": str(tmp_path / "moved.nii.gz")}
    for option, value in change.items():
        args[option] = files.get(value, str(tmp_path / value))
    argv = ["register", "--quiet"] + [item for pair in args.items() for item in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepatlas-fast register: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "moved.nii.gz").exists()
