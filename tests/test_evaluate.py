"""evaluate: Dice / HD95 in mm per label (MONAI's convention), the empty-label rule, comparison across
grids in world coordinates, the ``evaluate`` command, and the PNG pictures."""

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.data.io import Volume, volume_from_array, write_label_table  # noqa: E402
from deepatlas_fast.evaluate import EMPTY_LABEL_RULE, evaluate_labels, hd95, resample_to_grid  # noqa: E402
from deepatlas_fast.pictures import BACKGROUND, label_colour, overlay_png, write_png  # noqa: E402
from helpers import write_nifti  # noqa: E402

SPACING = (0.7, 1.3, 2.1)


def _labels(array, affine=None):
    return volume_from_array(np.asarray(array), affine, labels=True)


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blobs(shape, seed, n_labels=3):
    """Random smooth blobs (smoothed noise thresholded), labels 1..n_labels, some overlapping borders."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape, dtype=torch.int64)
    for label in range(1, n_labels + 1):
        noise = torch.rand((1, 1, *shape), generator=g)
        smooth = torch.nn.functional.avg_pool3d(noise, 5, 1, 2, count_include_pad=False)[0, 0]
        out[smooth > torch.quantile(smooth.flatten(), 0.8)] = label
    return out


def _read_png(path):
    """Decode an 8-bit RGB, non-interlaced PNG with filter type 0 rows (what write_png writes)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


# ----------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("oblique", [False, True])
def test_shifted_cubes_hd95_is_the_shift_in_mm(axis, oblique):
    truth = torch.zeros((16, 15, 14), dtype=torch.int64)
    truth[4:10, 4:10, 4:10] = 1
    pred = truth.roll(2, axis)
    affine = np.diag([*SPACING, 1.0])
    if oblique:  # rotated anisotropic grid: distances between voxels are unchanged
        affine[:3, :3] = _rotation(0.3, -0.2, 0.5) @ affine[:3, :3]
    affine[:3, 3] = [10.0, -20.0, 5.0]
    vol = Volume(data=truth, affine=affine, original_affine=affine, original_shape=truth.shape)
    result = evaluate_labels(vol.with_data(pred), vol)
    metrics = result["labels"]["1"]
    assert metrics["hd95_mm"] == pytest.approx(2 * SPACING[axis], abs=1e-9)
    assert metrics["dice"] == pytest.approx(2 / 3)
    assert metrics["pred_voxels"] == metrics["truth_voxels"] == 216
    assert metrics["truth_mm3"] == pytest.approx(216 * np.prod(SPACING))
    assert metrics["empty"] is None and result["resampled"] is False


def test_identical_masks_and_single_voxels():
    mask = torch.zeros((6, 6, 6), dtype=torch.bool)
    mask[1:5, 2:4, 2:3] = True
    assert hd95(mask, mask, np.eye(4)) == 0.0
    a, b = torch.zeros_like(mask), torch.zeros_like(mask)
    a[0, 0, 0], b[3, 4, 0] = True, True
    assert hd95(a, b, np.diag([2.0, 1.0, 1.0, 1.0])) == pytest.approx(math.sqrt(6.0**2 + 4.0**2))  # in mm
    assert hd95(a, torch.zeros_like(mask), np.eye(4)) is None


def test_hd95_in_chunks_equals_hd95_at_once(monkeypatch):
    import deepatlas_fast.evaluate as evaluate

    truth, pred = _blobs((14, 12, 10), 7, n_labels=1) == 1, _blobs((14, 12, 10), 8, n_labels=1) == 1
    affine = np.diag([*SPACING, 1.0])
    at_once = hd95(pred, truth, affine)
    monkeypatch.setattr(evaluate, "_CHUNK_ELEMENTS", 50)
    assert hd95(pred, truth, affine) == pytest.approx(at_once, abs=1e-9)


def _erosion(mask):
    """scipy.ndimage.binary_erosion's default: 6-neighbour cross, outside the array counts as 0."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    out = m.copy()
    for axis in range(3):
        for shift in (-1, 1):
            out &= np.roll(m, shift, axis)
    return out[1:-1, 1:-1, 1:-1]


class _BruteKDTree:
    """scipy.spatial.KDTree(points).query(x, k=1) by brute force."""

    def __init__(self, points, leafsize=None):
        self.points = np.asarray(points, dtype=np.float64)

    def query(self, x, k=1):
        d = np.sqrt(((np.asarray(x)[:, None, :] - self.points[None]) ** 2).sum(-1))
        index = d.argmin(1)
        return d[np.arange(len(d)), index], index


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_matches_monai_on_random_blobs(monkeypatch):
    pytest.importorskip("monai")
    import monai.metrics.utils as monai_utils
    from monai.metrics import compute_dice, compute_hausdorff_distance

    try:
        import scipy.ndimage  # noqa: F401
        import scipy.spatial  # noqa: F401
    except ImportError:  # MONAI takes its erosion and nearest-point search from scipy: stand-ins for both
        monkeypatch.setattr(monai_utils, "binary_erosion", _erosion)
        monkeypatch.setattr(monai_utils, "KDTree", _BruteKDTree)
        monkeypatch.setattr(monai_utils, "has_scipy_kdtree", True)
    shape = (20, 18, 16)
    affine = np.diag([*SPACING, 1.0])
    for seed in (0, 1):
        truth, pred = _blobs(shape, seed), _blobs(shape, seed + 10)
        result = evaluate_labels(_labels(pred.numpy(), affine), _labels(truth.numpy(), affine))
        ids = sorted(int(k) for k in result["labels"])
        assert ids == [1, 2, 3]
        def one_hot(x):
            return torch.stack([x == i for i in ids])[None].float()

        dice = compute_dice(one_hot(pred), one_hot(truth), include_background=True)[0]
        hd = compute_hausdorff_distance(one_hot(pred), one_hot(truth), include_background=True, percentile=95,
                                        spacing=list(SPACING))[0]
        for i, label in enumerate(ids):
            metrics = result["labels"][str(label)]
            assert metrics["dice"] == pytest.approx(float(dice[i]), abs=1e-6)
            assert metrics["hd95_mm"] == pytest.approx(float(hd[i]), abs=1e-4)


def test_empty_label_rule_and_means():
    truth = np.zeros((10, 10, 10), np.int32)
    pred = np.zeros_like(truth)
    truth[1:5, 1:5, 1:5] = 1
    pred[1:5, 1:5, 2:6] = 1  # label 1 in both
    truth[6:9, 6:9, 6:9] = 2  # label 2 only in the truth
    pred[0:2, 7:9, 7:9] = 3  # label 3 only in the prediction
    result = evaluate_labels(_labels(pred), _labels(truth), names={1: "liver", 2: "spleen", 7: "unused"})
    labels = result["labels"]
    assert sorted(labels) == ["1", "2", "3"]
    assert labels["2"] == {"name": "spleen", "dice": 0.0, "hd95_mm": None, "pred_voxels": 0, "truth_voxels": 27,
                           "pred_mm3": 0.0, "truth_mm3": 27.0, "empty": "pred"}
    assert labels["3"]["empty"] == "truth" and labels["3"]["dice"] == 0.0 and labels["3"]["hd95_mm"] is None
    assert labels["3"]["name"] is None
    assert labels["1"]["empty"] is None and labels["1"]["hd95_mm"] == pytest.approx(1.0)
    assert result["mean_dice"] == pytest.approx(labels["1"]["dice"] / 3)
    assert result["mean_hd95_mm"] == pytest.approx(labels["1"]["hd95_mm"])
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    # a label asked for but absent from both maps is not reported
    only = evaluate_labels(_labels(pred), _labels(truth), labels=[2, 5])
    assert list(only["labels"]) == ["2"] and only["mean_dice"] == 0.0 and only["mean_hd95_mm"] is None
    nothing = evaluate_labels(_labels(np.zeros_like(truth)), _labels(np.zeros_like(truth)))
    assert nothing["labels"] == {} and nothing["mean_dice"] is None and nothing["mean_hd95_mm"] is None


# ----------------------------------------------------------------------------------------------
# different grids


def _pair(seed=3):
    g = np.random.default_rng(seed)
    truth = _blobs((12, 10, 9), seed).numpy().astype(np.int16)
    pred = _blobs((12, 10, 9), seed + 5).numpy().astype(np.int16)
    pred[g.random(pred.shape) < 0.02] = 2
    return pred, truth


def test_reoriented_file_gives_the_same_result(tmp_path):
    pred, truth = _pair()
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-8.0, 3.0, 11.0]
    truth_path = write_nifti(tmp_path / "truth.nii.gz", truth, affine)
    same = evaluate_labels(write_nifti(tmp_path / "pred.nii.gz", pred, affine), truth_path)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LIP"))
    lip = nib.Nifti1Image(pred, affine).as_reoriented(ornt)
    assert nib.aff2axcodes(lip.affine) == ("L", "I", "P")
    other = evaluate_labels(write_nifti(tmp_path / "pred_lip.nii.gz", np.asarray(lip.dataobj), lip.affine), truth_path)
    assert other["resampled"] is False
    assert other["labels"] == same["labels"]


def test_other_spacing_and_field_of_view_in_world_coordinates():
    pred, truth = _pair()
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-8.0, 3.0, 11.0]
    reference = evaluate_labels(_labels(pred, affine), _labels(truth, affine))
    assert reference["resampled"] is False
    # twice finer grid, same first voxel centre: truth voxel i sits on fine voxel 2i
    fine = pred.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_affine = affine @ np.diag([0.5, 0.5, 0.5, 1.0])
    result = evaluate_labels(_labels(fine, fine_affine), _labels(truth, affine))
    assert result["resampled"] is True and result["labels"] == reference["labels"]
    # a larger field of view, 3 voxels more before axis 1 (its origin moves back by 3 voxels)
    padded = np.pad(pred, ((0, 0), (3, 1), (0, 2)))
    padded_affine = affine.copy()
    padded_affine[:3, 3] -= 3 * affine[:3, 1]
    result = evaluate_labels(_labels(padded, padded_affine), _labels(truth, affine))
    assert result["resampled"] is True and result["labels"] == reference["labels"]
    # a smaller field of view: the truth voxels it does not cover are background
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] += 4 * affine[:3, 0]
    result = evaluate_labels(_labels(pred[4:], cropped_affine), _labels(truth, affine))
    outside = pred.copy()
    outside[:4] = 0
    assert result["labels"] == evaluate_labels(_labels(outside, affine), _labels(truth, affine))["labels"]


def test_resample_to_grid_follows_both_affines():
    data = torch.arange(4 * 3 * 2).reshape(4, 3, 2)
    flipped = np.diag([-2.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 6.0  # index i at x = 6 - 2 i: x in {6, 4, 2, 0}
    source = Volume(data=data, affine=flipped, original_affine=flipped, original_shape=(4, 3, 2))
    like_affine = np.diag([2.0, 1.0, 1.0, 1.0])
    like_affine[:3, 3] = [-2.0, 0.0, 0.0]  # x in {-2, 0, 2, 4, 6}: the first is outside
    like = Volume(data=torch.zeros((5, 3, 2), dtype=torch.int64), affine=like_affine,
                  original_affine=like_affine, original_shape=(5, 3, 2))
    out = resample_to_grid(source, like, fill=-1)
    assert (out[0] == -1).all()
    assert torch.equal(out[1:], data.flip(0))


def test_oblique_prediction_grid_agrees_within_resampling():
    """The same analytic prediction rasterised on the truth's grid and on a rotated finer grid."""
    def rasterise(shape, affine, centre):
        index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
        world = index @ affine[:3, :3].T + affine[:3, 3]
        out = np.zeros(shape, np.int16)
        out[((world - centre) ** 2 / np.array([36.0, 25.0, 49.0])).sum(-1) <= 1] = 1
        out[((world - centre - [0, 0, 9.0]) ** 2).sum(-1) <= 9.0] = 2
        return out

    shape = (20, 20, 22)
    truth_affine = np.eye(4)
    truth = rasterise(shape, truth_affine, np.array([9.5, 9.5, 8.0]))
    pred_centre = np.array([10.3, 9.0, 8.4])
    on_truth_grid = evaluate_labels(_labels(rasterise(shape, truth_affine, pred_centre)), _labels(truth))
    oblique = np.eye(4)
    oblique[:3, :3] = _rotation(0.3, -0.2, 0.25) * 0.8
    oblique[:3, 3] = np.array([9.5, 9.5, 10.5]) - oblique[:3, :3] @ np.full(3, 15.0)
    result = evaluate_labels(_labels(rasterise((31, 31, 31), oblique, pred_centre), oblique), _labels(truth))
    assert result["resampled"] is True
    for label in ("1", "2"):
        a, b = result["labels"][label], on_truth_grid["labels"][label]
        assert abs(a["dice"] - b["dice"]) < 0.05
        assert abs(a["hd95_mm"] - b["hd95_mm"]) <= 1.0


# ----------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_name_the_argument(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match=r"pred: path .*missing.nii.gz.*no such file"):
        evaluate_labels(tmp_path / "missing.nii.gz", good)
    fractional = write_nifti(tmp_path / "frac.nii.gz", np.full((4, 4, 4), 1.5, np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"truth: .*non-integer values"):
        evaluate_labels(good, fractional)
    four_d = write_nifti(tmp_path / "4d.nii.gz", np.ones((4, 4, 4, 2), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match=r"pred: .*4-D"):
        evaluate_labels(four_d, good)
    image = volume_from_array(np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"pred: a label map with integer ids"):
        evaluate_labels(image, good)
    with pytest.raises(ValueError, match=r"labels: ids must be integers >= 1"):
        evaluate_labels(good, good, labels=[0, 1])
    with pytest.raises(ValueError, match=r"names: label id 'x'"):
        evaluate_labels(good, good, names={"x": "liver"})
    not_a_map = tmp_path / "list.json"
    not_a_map.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"names: must map label ids to names"):
        evaluate_labels(good, good, names=not_a_map)


# ----------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def case(tmp_path):
    """A truth cube and a prediction shifted by one voxel along the anisotropic axis, on a LPS-like file grid."""
    truth = np.zeros((12, 10, 8), np.uint8)
    truth[3:9, 2:8, 2:6] = 1
    truth[0:2, 0:2, 0:2] = 2
    pred = np.zeros_like(truth)
    pred[3:9, 2:8, 3:7] = 1
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = [20.0, 15.0, -30.0]
    names = write_label_table(tmp_path / "names.json", {1: "liver", 2: "spleen"})
    return {
        "pred": write_nifti(tmp_path / "pred.nii.gz", pred, affine),
        "truth": write_nifti(tmp_path / "truth.nii.gz", truth, affine),
        "image": write_nifti(tmp_path / "image.nii.gz", np.random.default_rng(0).normal(size=truth.shape).astype(np.float32),
                        affine),
        "names": names,
        "tmp": tmp_path,
    }


def test_cli_end_to_end(case, capsys):
    out, png = case["tmp"] / "out" / "metrics.json", case["tmp"] / "overlay.png"
    code = main(["evaluate", "--pred", case["pred"], "--truth", case["truth"], "--labels", case["names"],
                 "-o", str(out), "--png", str(png)])
    printed = capsys.readouterr().out
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics == evaluate_labels(case["pred"], case["truth"], names=case["names"])
    assert metrics["labels"]["1"]["hd95_mm"] == pytest.approx(2.0)  # one voxel along the 2 mm axis
    assert metrics["labels"]["2"]["empty"] == "pred"
    assert "liver" in printed and "spleen" in printed and "empty in pred" in printed
    assert f"{metrics['labels']['1']['dice']:.3f}" in printed and "2.00" in printed
    assert f"mean Dice {metrics['mean_dice']:.3f} over 2 label(s)" in printed
    # canonical grid (12, 10, 8) at 1 x 1 x 2 mm: panels axial 10 x 12, coronal 16 x 12, sagittal 16 x 10 mm,
    # enlarged 16 times (the longest side, 16 mm, becomes 256 pixels)
    rgb = _read_png(png)
    assert rgb.shape == (256, 192 + 4 + 192 + 4 + 160, 3)
    assert tuple(rgb[0, 0]) == (BACKGROUND,) * 3  # no --image: neutral grey
    assert tuple(rgb[255, 0]) == (0, 0, 0)  # below the axial panel's 160 rows
    assert tuple(rgb[0, 193]) == (0, 0, 0)  # the gap between the first two panels
    # the axial panel's centre is inside the prediction (filled) and the truth (outline elsewhere)
    blended = 0.55 * BACKGROUND + 0.45 * np.array(label_colour(1))
    assert np.abs(rgb[5 * 16 + 8, 6 * 16 + 8] - blended).max() <= 1


def test_cli_png_pixels_and_image_background(case, capsys):
    png = case["tmp"] / "o.png"
    assert main(["evaluate", "--pred", case["truth"], "--truth", case["truth"], "--png", str(png),
                 "--image", case["image"]]) == 0
    capsys.readouterr()
    rgb = _read_png(png)
    assert rgb.shape[0] == 256
    grey = rgb[..., 0] == rgb[..., 1]
    assert grey.sum() > 0 and (~grey).sum() > 0  # the image in grey, the labels in colour


def test_cli_errors_exit_2_naming_the_option(case, capsys, tmp_path):
    png_dir = tmp_path / "a_folder"
    png_dir.mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"1": {"name": "liver"}}')
    fractional = write_nifti(tmp_path / "frac.nii.gz", np.full((4, 4, 4), 0.5, np.float32), np.eye(4))
    cases = [
        (["--pred", str(tmp_path / "nope.nii.gz"), "--truth", case["truth"]], "--pred: path"),
        (["--pred", case["pred"], "--truth", fractional], "--truth: path"),
        (["--pred", case["pred"], "--truth", case["truth"], "--labels", str(bad_json)], "--labels: the name of label"),
        (["--pred", case["pred"], "--truth", case["truth"], "--image", case["image"]], "--image: only used"),
        (["--pred", case["pred"], "--truth", case["truth"], "--png", str(png_dir)], "--png: cannot write"),
    ]
    for argv, message in cases:
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepatlas-fast evaluate: error: ") and message in err, err


def test_cli_help_states_the_empty_label_rule(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert EMPTY_LABEL_RULE in text
    assert "world coordinates" in text


# ----------------------------------------------------------------------------------------------
# pictures


def test_write_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = write_png(tmp_path / "sub" / "a.png", rgb)
    np.testing.assert_array_equal(_read_png(path), rgb)
    np.testing.assert_array_equal(_read_png(write_png(tmp_path / "t.png", torch.from_numpy(rgb))), rgb)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "b.png", rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        write_png(tmp_path / "b.png", rgb[..., 0])


def test_overlay_orientation_and_aspect(tmp_path):
    """A block at the highest R, A, S indices shows top-left in every panel (radiological display)."""
    shape = (8, 6, 5)
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[-2:, -2:, -2:] = 4
    path = overlay_png(None, labels, tmp_path / "o.png", spacing=(1.0, 2.0, 3.0), alpha=1.0, gap=2, min_size=1)
    rgb = _read_png(path)
    # axial 12 x 8 (rows A at 2 mm, cols R), coronal 15 x 8 (rows S at 3 mm), sagittal 15 x 12
    assert rgb.shape == (15, 8 + 2 + 8 + 2 + 12, 3)
    colour, grey = label_colour(4), (BACKGROUND,) * 3
    for left, (rows, cols) in zip((0, 10, 20), ((4, 2), (6, 2), (6, 4))):  # the block's size in pixels
        assert tuple(rgb[0, left]) == colour and tuple(rgb[rows - 1, left + cols - 1]) == colour
        assert tuple(rgb[rows, left]) == grey and tuple(rgb[0, left + cols]) == grey
    assert tuple(rgb[14, 0]) == (0, 0, 0)  # the axial panel is only 12 rows high


def test_overlay_contour_and_image(tmp_path):
    image = torch.linspace(0, 1, 10 * 10 * 10).reshape(10, 10, 10)
    truth = torch.zeros((10, 10, 10), dtype=torch.int64)
    truth[2:8, 2:8, 2:8] = 1
    rgb = _read_png(overlay_png(image, None, tmp_path / "c.png", contour=truth, gap=0, min_size=1))
    axial = rgb[:, :10]
    outline = (axial == np.array(label_colour(1))).all(-1)
    assert outline.sum() == 4 * 5  # the 6 x 6 square's 1-pixel outline
    assert (axial[~outline][:, 0] == axial[~outline][:, 1]).all()  # grey elsewhere
    with pytest.raises(ValueError, match="at least one"):
        overlay_png(None, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="contour must have shape"):
        overlay_png(image, None, tmp_path / "x.png", contour=truth[:5])
