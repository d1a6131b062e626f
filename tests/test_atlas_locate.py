"""atlas, crop and locate: the template image from exams, structures and body regions found in new exams.

An untrained CoordNet is exactly the identity on its input grid: every exam's network grid is mapped
onto the whole template cube, voxel index by voxel index. That makes reconstruction and cropping exact
(an exam splatted onto a template grid of its own size is the exam; a reference located in itself is its
own bounding box), but it cannot say which part of the template an exam covers: any field of view fills
the cube. Where coordinates must differ from the identity, the tests use a constant shift (the coarsest
head's bias) or hand-made coordinates, and say what that does and does not check.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nib = pytest.importorskip("nibabel")

from deepatlas_fast.atlas import reconstruct_atlas  # noqa: E402
from deepatlas_fast.checkpoint import load_model  # noqa: E402
from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.coords import identity_coords  # noqa: E402
from deepatlas_fast.data.io import (  # noqa: E402
    crop_volume,
    foreground_mask,
    load_volume,
    normalize_intensity,
    original_index,
    write_label_table,
)
from deepatlas_fast.data.phantoms import PHANTOM_LABELS, phantom_subject  # noqa: E402
from deepatlas_fast.locate import (  # noqa: E402
    Region,
    coverage,
    coverage_from_coordinates,
    crop,
    label_id,
    locate,
    template_box,
    template_boxes,
)
from helpers import identity_model_file, rotation4, stored_variant, write_nifti  # noqa: E402

SHAPE = (19, 17, 15)  # odd sizes: R, A, S
SPACING = (20.0, 22.0, 24.0)  # anisotropic, exact in float32
LIVER = 1  # voxels i 10..16, j 6..11, k 10..13 of the seed-3 phantom at SHAPE / SPACING


def _voxels(shift_voxels, axis=0):
    """A shift of whole voxels of SHAPE along ``axis``, in normalised units."""
    shift = [0.0, 0.0, 0.0]
    shift[axis] = 2.0 * shift_voxels / (SHAPE[axis] - 1)
    return shift


def _normalised(array):
    return normalize_intensity(torch.as_tensor(array), "ct")


def _bbox(mask):
    """``(first, last)`` index per axis of a boolean array's True voxels."""
    index = np.nonzero(mask)
    return [int(i.min()) for i in index], [int(i.max()) for i in index]


# ----------------------------------------------------------------------------------------------
# atlas


@pytest.mark.parametrize("kind", ["ras", "lia"])
def test_atlas_of_one_exam_on_its_own_grid_is_the_exam(tmp_path, phantom, kind):
    """Identity model, template grid = the exam's network grid: every voxel lands on its own template
    node, so the template image is the exam's normalised intensities and its grid is the exam's."""
    array, _, affine = phantom
    path = write_nifti(tmp_path / "e.nii.gz", *stored_variant(kind, array, affine))
    model = load_model(identity_model_file(tmp_path / "m.pt", list(SPACING)))
    atlas = reconstruct_atlas(model, [path], template_shape=SHAPE)
    assert atlas.intensity.shape == SHAPE and atlas.intensity.data.dtype == torch.float32
    torch.testing.assert_close(atlas.intensity.data, _normalised(array), atol=1e-5, rtol=0)
    torch.testing.assert_close(atlas.weight.data, torch.ones(SHAPE), atol=1e-5, rtol=0)
    np.testing.assert_allclose(atlas.intensity.affine, load_volume(path).affine, rtol=0, atol=1e-9)  # the exam's grid
    np.testing.assert_array_equal(atlas.weight.affine, atlas.intensity.affine)


def test_atlas_averages_exams_and_their_frames(tmp_path):
    """Two subjects (different anatomy and table positions): the template image is the mean of their
    normalised intensities, the weight 2, the affine their mean grid."""
    exams = [phantom_subject(seed, shape=SHAPE, spacing=SPACING) for seed in (3, 8)]
    paths = [write_nifti(tmp_path / f"e{i}.nii.gz", image.numpy(), affine) for i, (image, _, affine) in enumerate(exams)]
    assert not np.allclose(exams[0][2], exams[1][2])
    model = load_model(identity_model_file(tmp_path / "m.pt", list(SPACING)))
    atlas = reconstruct_atlas(model, iter(paths), template_shape=SHAPE)
    expected = (_normalised(exams[0][0]) + _normalised(exams[1][0])) / 2
    torch.testing.assert_close(atlas.intensity.data, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(atlas.weight.data, torch.full(SHAPE, 2.0), atol=1e-5, rtol=0)
    grids = [load_volume(path).affine for path in paths]
    np.testing.assert_allclose(atlas.intensity.affine, (grids[0] + grids[1]) / 2, rtol=0, atol=1e-9)


def test_default_template_grid_is_the_models(files):
    atlas = reconstruct_atlas(load_model(files["model"]), [files["image"]])
    assert atlas.intensity.shape == (8, 8, 8)
    # the cube spans the exam: voxel size = extent / 7 per axis
    np.testing.assert_allclose(atlas.intensity.spacing, [(n - 1) * s / 7 for n, s in zip(SHAPE, SPACING)])


def test_holes_of_a_finer_template_are_filled_from_their_neighbours(files, phantom):
    """A template twice as fine as the exam: the exam's voxels land on the even nodes and every odd
    node is a hole. Filled from the covered cells of its 3x3x3 neighbourhood (all of weight 1), a hole
    gets the mean of the 2, 4 or 8 nodes around it: trilinear interpolation. Without filling, 0."""
    array, _, affine = phantom
    model = load_model(files["model"])
    fine = tuple(2 * n - 1 for n in SHAPE)
    atlas = reconstruct_atlas(model, [files["image"]], template_shape=fine)
    expected = F.interpolate(_normalised(array)[None, None], size=fine, mode="trilinear", align_corners=True)[0, 0]
    torch.testing.assert_close(atlas.intensity.data, expected, atol=1e-5, rtol=0)
    assert float(atlas.weight.data[1::2].max()) < 1e-4  # the holes are marked in the weight map
    np.testing.assert_allclose(atlas.intensity.spacing, np.asarray(SPACING) / 2)
    origin = load_volume(files["image"]).affine[:3, 3]
    np.testing.assert_allclose(atlas.intensity.affine[:3, 3], origin, rtol=0, atol=1e-9)
    unfilled = reconstruct_atlas(model, [files["image"]], template_shape=fine, fill=0)
    assert float(unfilled.intensity.data[1::2].abs().max()) == 0.0
    torch.testing.assert_close(unfilled.intensity.data[::2, ::2, ::2], _normalised(array), atol=1e-5, rtol=0)


def test_atlas_of_shifted_coordinates_stays_in_register_with_the_exam(tmp_path, files, phantom):
    """Coordinates shifted by 4 voxels along R: exam voxel i lands on template node i + 4, the voxels
    mapped past the cube's edge are dropped (not piled on its face), nodes 0..2 stay empty (node 3 is
    filled from its covered neighbours, on node 4), and the affine puts every template node at the world
    position of the exam voxel splatted onto it."""
    array, _, affine = phantom
    model = load_model(identity_model_file(tmp_path / "s.pt", list(SPACING), _voxels(4)))
    atlas = reconstruct_atlas(model, [files["image"]], template_shape=SHAPE)
    normalised = _normalised(array)
    torch.testing.assert_close(atlas.intensity.data[4:], normalised[:-4], atol=1e-5, rtol=0)
    plane_mean = F.avg_pool2d(normalised[0][None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    torch.testing.assert_close(atlas.intensity.data[3], plane_mean, atol=1e-5, rtol=0)  # its covered neighbours
    assert float(atlas.intensity.data[:3].abs().max()) == 0.0 and float(atlas.weight.data[:3].max()) < 1e-4
    node, voxel = np.array([9.0, 5.0, 7.0, 1.0]), np.array([5.0, 5.0, 7.0, 1.0])
    exam = load_volume(files["image"]).affine  # float32 coordinates: 1e-4 mm
    np.testing.assert_allclose(atlas.intensity.affine @ node, exam @ voxel, rtol=0, atol=1e-4)


def test_atlas_api_errors(files, tmp_path):
    model = load_model(files["model"])
    with pytest.raises(ValueError, match="images: no exam given"):
        reconstruct_atlas(model, [])
    with pytest.raises(ValueError, match="not a single one"):
        reconstruct_atlas(model, files["image"])
    with pytest.raises(ValueError, match="no such file"):
        reconstruct_atlas(model, [str(tmp_path / "nope.nii.gz")])
    with pytest.raises(ValueError, match="template_shape"):
        reconstruct_atlas(model, [files["image"]], template_shape=(4, 1, 4))
    with pytest.raises(ValueError, match="fill"):
        reconstruct_atlas(model, [files["image"]], fill=-1)


def test_cli_atlas_writes_the_template_its_weights_and_a_png(files, phantom, capsys):
    array, _, affine = phantom
    folder = files["tmp"] / "exams"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", array, affine)
    write_nifti(folder / "b.nii", array, affine)
    (folder / "notes.txt").write_text("not an exam")
    out, weights, png = files["tmp"] / "out" / "atlas.nii.gz", files["tmp"] / "w.nii.gz", files["tmp"] / "a.png"
    assert main(["atlas", "--model", files["model"], "--images", str(folder), "-o", str(out),
                 "--template-shape", *map(str, SHAPE), "--weights", str(weights), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    written = nib.load(out)
    assert written.shape == SHAPE and written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(written.dataobj), _normalised(array).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(nib.load(weights).dataobj), 2.0, atol=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{out}: template 19x17x15 from 2 exam(s), voxel 20 x 22 x 24 mm; 0 cell(s)" in printed
    assert f"weights: {weights}" in printed and f"picture: {png}" in printed
    # a glob and a cube side; --quiet prints nothing
    assert main(["atlas", "--model", files["model"], "--images", str(folder / "*.nii*"), "-o", str(out),
                 "--template-shape", "6", "--quiet"]) == 0
    assert capsys.readouterr().out == "" and nib.load(out).shape == (6, 6, 6)


def test_cli_atlas_errors_exit_2_naming_the_option(files, capsys):
    tmp = files["tmp"]
    base = ["atlas", "--model", files["model"]]
    cases = [
        ([*base, "--images", str(tmp / "nope.nii.gz"), "-o", str(tmp / "a.nii.gz")],
         "--images: no such file or folder"),
        ([*base, "--images", str(tmp / "*.nii.xyz"), "-o", str(tmp / "a.nii.gz")], "--images: pattern"),
        ([*base, "--images", files["image"], "-o", str(tmp / "a.png")], "-o: "),
        ([*base, "--images", files["image"], "-o", files["image"]], "-o: "),
        ([*base, "--images", files["image"], "-o", str(tmp / "a.nii.gz"), "--weights", str(tmp / "a.nii.gz")],
         "--weights: "),
        ([*base, "--images", files["image"], "-o", str(tmp / "a.nii.gz"), "--template-shape", "4", "5"],
         "--template-shape: give 1 or 3"),
        (["atlas", "--model", str(tmp / "none.pt"), "--images", files["image"], "-o", str(tmp / "a.nii.gz")],
         "--model: "),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepatlas-fast atlas: error: ") and message in err, (argv, err)
    assert not (tmp / "a.nii.gz").exists()


# ----------------------------------------------------------------------------------------------
# template boxes and crop


@pytest.mark.parametrize("kind", ["lia", "oblique", "anisotropic"])
def test_original_index_agrees_with_the_affines(tmp_path, phantom, kind):
    """A position on a reoriented, resampled and cropped grid and its original file index are the same
    world point."""
    array, _, affine = phantom
    volume = crop_volume(load_volume(write_nifti(tmp_path / "v.nii.gz", *stored_variant(kind, array, affine)), spacing=31.0),
                         (1, 2, 0), (5, 4, 6))
    index = np.array([[0.0, 0.0, 0.0], [4.0, 3.0, 5.0], [-0.5, 2.25, 1.5]])
    world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    in_file = original_index(volume, index)
    np.testing.assert_allclose(in_file @ volume.original_affine[:3, :3].T + volume.original_affine[:3, 3], world,
                               rtol=0, atol=1e-9)


def test_template_box_is_the_structures_coordinate_extent(files, phantom):
    _, labels, _ = phantom
    model = load_model(files["model"])
    box = template_box(model, files["image"], files["labels"], "liver", PHANTOM_LABELS)
    first, last = _bbox(labels == LIVER)
    np.testing.assert_allclose(box.low, [-1 + 2 * f / (n - 1) for f, n in zip(first, SHAPE)], atol=1e-6)
    np.testing.assert_allclose(box.high, [-1 + 2 * l / (n - 1) for l, n in zip(last, SHAPE)], atol=1e-6)
    assert (box.label, box.name, box.percentile) == (LIVER, "liver", 0.0)
    robust = template_box(model, files["image"], files["labels"], LIVER, percentile=10)
    assert all(lo <= r for lo, r in zip(box.low, robust.low)) and all(r <= hi for hi, r in zip(box.high, robust.high))
    assert robust.low != box.low
    boxes = template_boxes(model, files["image"], files["labels"], PHANTOM_LABELS)
    assert sorted(boxes) == sorted(int(i) for i in np.unique(labels) if i != 0)
    assert boxes[LIVER] == box


def _expected_region(labels_file, label, spacing, margin):
    """The file voxels whose centre lies within ``margin`` mm of the structure's voxels' extent."""
    first, last = _bbox(labels_file == label)
    grow = [int(np.floor(margin / s + 0.5 + 1e-9)) for s in spacing]
    start = [max(0, f - g) for f, g in zip(first, grow)]
    stop = [min(n, l + 1 + g) for l, g, n in zip(last, grow, labels_file.shape)]
    return start, stop


@pytest.mark.parametrize("kind", ["ras", "flipped", "lia", "oblique", "anisotropic"])
@pytest.mark.parametrize("margin", [0.0, 35.0])  # 35 mm: 1.75, 1.59, 1.46 (0.73) voxels
def test_crop_of_the_reference_itself_is_its_own_bounding_box(tmp_path, phantom, kind, margin):
    """Identity model at the file's own spacing, reference = target: the region is the structure's
    bounding box in the file's own voxel order (+ the margin), and the crop holds the file's voxels at
    their world positions."""
    array, labels, affine = phantom
    image_path = write_nifti(tmp_path / "r.nii.gz", *stored_variant(kind, array, affine))
    labels_file, file_affine = stored_variant(kind, labels, affine)
    labels_path = write_nifti(tmp_path / "rl.nii.gz", labels_file, file_affine)
    model = load_model(identity_model_file(tmp_path / "m.pt", list(load_volume(image_path).spacing)))
    box = template_box(model, image_path, labels_path, LIVER)
    region = locate(model, image_path, box, margin_mm=margin)
    file_spacing = np.linalg.norm(nib.load(image_path).affine[:3, :3], axis=0)
    start, stop = _expected_region(labels_file, LIVER, file_spacing, margin)
    assert (list(region.start), list(region.stop)) == (start, stop)
    first, last = _bbox(labels_file == LIVER)
    assert region.voxels == np.prod([l - f + 1 for f, l in zip(first, last)])  # the box's voxels, liver or not
    out = crop(image_path, region, tmp_path / "crop.nii.gz")
    written, original = nib.load(out), nib.load(image_path)
    assert written.shape == region.shape and written.get_data_dtype() == original.get_data_dtype()
    data, source = np.asarray(written.dataobj), np.asarray(original.dataobj)
    np.testing.assert_array_equal(data, source[tuple(slice(a, b) for a, b in zip(start, stop))])
    np.testing.assert_allclose(written.affine, region.affine, atol=1e-4)
    np.testing.assert_allclose(written.get_qform(), region.affine, atol=1e-4)
    # a few crop voxels: their world position (crop affine) is the same voxel of the original file
    to_source = np.linalg.inv(original.affine) @ written.affine
    for voxel in [(0, 0, 0), tuple(s - 1 for s in region.shape), (1, 0, region.shape[2] // 2)]:
        at = to_source @ np.array([*voxel, 1.0])
        np.testing.assert_allclose(at[:3], np.round(at[:3]), atol=1e-3)
        assert data[voxel] == source[tuple(np.round(at[:3]).astype(int))]
    json.dumps(region.to_dict())  # JSON-ready


def test_crop_keeps_the_stored_type_and_scaling(files, phantom, tmp_path):
    array, _, affine = phantom
    img = nib.Nifti1Image(np.round((array + 1000) / 0.5).astype(np.int16), affine)
    img.header.set_slope_inter(0.5, -1000.0)
    img.set_sform(affine, code=2)
    path = str(tmp_path / "scaled.nii.gz")
    nib.save(img, path)
    model = load_model(files["model"])
    box = template_box(model, files["image"], files["labels"], LIVER)
    region = locate(model, path, box, margin_mm=10.0)
    written, original = nib.load(crop(path, region, tmp_path / "c.nii")), nib.load(path)
    assert written.get_data_dtype() == np.int16
    assert (written.dataobj.slope, written.dataobj.inter) == (0.5, -1000.0)
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 0)
    box_slices = tuple(slice(a, b) for a, b in zip(region.start, region.stop))
    np.testing.assert_array_equal(np.asarray(written.dataobj.get_unscaled()),
                                  np.asarray(original.dataobj.get_unscaled())[box_slices])


def test_located_box_follows_the_coordinates(files, phantom, tmp_path):
    """Target coordinates shifted by 2 voxels along R: the target voxel i reads the template at the
    reference's voxel i + 2, so the liver is found 2 voxels further left."""
    _, labels, _ = phantom
    box = template_box(load_model(files["model"]), files["image"], files["labels"], LIVER)
    shifted = load_model(identity_model_file(tmp_path / "s.pt", list(SPACING), _voxels(2)))
    region = locate(shifted, files["image"], box)
    first, last = _bbox(labels == LIVER)
    assert region.start == (first[0] - 2, first[1], first[2]) and region.stop == (last[0] - 1, last[1] + 1, last[2] + 1)


def test_located_box_through_a_coarser_network_grid_holds_the_structure(files, phantom, tmp_path):
    """The model runs at 31 mm, coarser than the file (20-24 mm): the region, mapped back through the
    resampling, holds the structure's bounding box once grown by one network voxel, and is at most one
    more network voxel larger on each side."""
    _, labels, _ = phantom
    model = load_model(identity_model_file(tmp_path / "c.pt", 31.0))
    box = template_box(model, files["image"], files["labels"], LIVER)
    region = locate(model, files["image"], box, margin_mm=31.0)
    first, last = _bbox(labels == LIVER)
    for axis, spacing in enumerate(SPACING):
        assert region.start[axis] <= first[axis] and region.stop[axis] >= last[axis] + 1
        slack = 2 * 31.0 / spacing + 1
        assert first[axis] - region.start[axis] <= slack or region.start[axis] == 0
        assert region.stop[axis] - (last[axis] + 1) <= slack or region.stop[axis] == SHAPE[axis]


def test_locate_and_crop_errors(files, phantom, tmp_path):
    _, labels, affine = phantom
    model = load_model(files["model"])
    with pytest.raises(ValueError, match="unknown label name 'pancreas'"):
        template_box(model, files["image"], files["labels"], "pancreas", PHANTOM_LABELS)
    with pytest.raises(ValueError, match="not an integer id"):
        label_id("liver")
    with pytest.raises(ValueError, match=r"label 42 has no voxel on the reference's label map .*ids present: 1, 2"):
        template_box(model, files["image"], files["labels"], 42)
    with pytest.raises(ValueError, match="no such file"):
        template_box(model, files["image"], str(tmp_path / "nope.nii.gz"), LIVER)
    with pytest.raises(ValueError, match="percentile"):
        template_box(model, files["image"], files["labels"], LIVER, percentile=50)
    box = template_box(model, files["image"], files["labels"], LIVER)
    # every target coordinate clamped onto the cube's R face (+1): none inside the liver's box (R < 1)
    away = load_model(identity_model_file(tmp_path / "far.pt", list(SPACING), [3.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"no voxel has template coordinates inside the box of label 1"):
        locate(away, files["image"], box)
    with pytest.raises(ValueError, match="margin_mm"):
        locate(model, files["image"], box, margin_mm=-1.0)
    region = locate(model, files["image"], box)
    assert isinstance(region, Region)
    small = write_nifti(tmp_path / "small.nii.gz", labels[:10], affine)
    with pytest.raises(ValueError, match="is not the one the region was located on"):
        crop(small, region, tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="no such file"):
        crop(tmp_path / "nope.nii.gz", region, tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="must end in .nii"):
        crop(files["image"], region, tmp_path / "c.png")


def test_cli_crop_end_to_end(files, phantom, capsys):
    array, labels, _ = phantom
    names = write_label_table(files["tmp"] / "names.json", PHANTOM_LABELS)
    out, box_json = files["tmp"] / "crops" / "liver.nii.gz", files["tmp"] / "box.json"
    assert main(["crop", "--model", files["model"], "--reference", files["image"], "--reference-labels",
                 files["labels"], "--label", "Liver", "--labels", names, "-i", files["image"], "-o", str(out),
                 "--margin", "20", "--json", str(box_json)]) == 0
    printed = capsys.readouterr().out
    # 20 mm past the liver's voxels (half a voxel past its outer centres): one more voxel on every side
    start, stop = _expected_region(labels, LIVER, SPACING, 20.0)
    first, last = _bbox(labels == LIVER)
    assert (start, stop) == ([f - 1 for f in first], [l + 2 for l in last])
    region = json.loads(box_json.read_text())
    assert (region["start"], region["stop"], region["label"], region["name"]) == (start, stop, 1, "liver")
    assert region["output"] == str(out) and region["margin_mm"] == 20.0
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), array[tuple(slice(a, b) for a, b in zip(start, stop))])
    np.testing.assert_allclose(written.affine, np.asarray(region["affine"]), atol=1e-5)
    stored = nib.load(files["image"]).affine  # float32 in the file
    np.testing.assert_allclose(region["world_min_mm"], (stored @ np.array([*start, 1.0]))[:3], atol=1e-6)
    voxels = ", ".join(f"{a}:{b}" for a, b in zip(start, stop))
    assert f"{out}: label 1 (liver): voxels [{voxels}] of {files['image']} (crop " in printed


def test_cli_crop_errors_exit_2_naming_the_option(files, capsys):
    tmp = files["tmp"]
    names = write_label_table(tmp / "names.json", PHANTOM_LABELS)
    ref = ["--model", files["model"], "--reference", files["image"], "--reference-labels", files["labels"]]
    out = str(tmp / "c.nii.gz")
    cases = [
        ([*ref, "--label", "pancreas", "--labels", names, "-i", files["image"], "-o", out],
         "--label: unknown label name 'pancreas'"),
        ([*ref, "--label", "liver", "-i", files["image"], "-o", out], "--label: label 'liver' is not an integer id"),
        ([*ref, "--label", "42", "-i", files["image"], "-o", out], "--label: label 42 has no voxel"),
        ([*ref, "--label", "1", "-i", str(tmp / "nope.nii.gz"), "-o", out], "-i: path"),
        (["--model", files["model"], "--reference", str(tmp / "nope.nii.gz"), "--reference-labels", files["labels"],
          "--label", "1", "-i", files["image"], "-o", out], "--reference: path"),
        ([*ref, "--label", "1", "-i", files["image"], "-o", str(tmp / "c.png")], "-o: "),
        ([*ref, "--label", "1", "-i", files["image"], "-o", files["image"]], "-o: "),
        ([*ref, "--label", "1", "-i", files["image"], "-o", out, "--margin", "-2"], "--margin: "),
        ([*ref, "--label", "1", "-i", files["image"], "-o", out, "--labels", str(tmp / "none.json")], "--labels: "),
    ]
    for argv, message in cases:
        assert main(["crop", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepatlas-fast crop: error: ") and message in err, (argv, err)
    assert not (tmp / "c.nii.gz").exists()


# ----------------------------------------------------------------------------------------------
# coverage (locate)


def _upper_half(tmp_path, array, affine, name="upper.nii.gz"):
    """The exam's upper (superior) half, from slice 7 of 15, written with its own correct affine."""
    affine_half = affine.copy()
    affine_half[:3, 3] = (affine @ np.array([0.0, 0.0, 7.0, 1.0]))[:3]
    return write_nifti(tmp_path / name, array[:, :, 7:], affine_half)


def _expected_status(labels):
    """Per label: inside / outside / partial the upper half (slices 7..14), from the labels themselves."""
    status = {}
    for label in (int(i) for i in np.unique(labels) if i != 0):
        _, _, s = np.nonzero(labels == label)
        status[label] = "inside" if s.min() >= 7 else "outside" if s.max() < 7 else "partial"
    return status


def test_coverage_of_a_half_exam_with_corresponding_coordinates(files, phantom):
    """What a trained model should give an upper-half exam: the coordinates of those same voxels in the
    full reference (the identity map of the whole exam, cut to its upper half). The body covers the
    template's upper half along S (from coordinate 0, slice 7 of 15, to +1), and every structure is
    inside, partly inside or outside it as its own voxels are."""
    array, labels, _ = phantom
    coords = identity_coords(SHAPE)[..., 7:]
    body = foreground_mask(torch.as_tensor(array[:, :, 7:]))
    boxes = template_boxes(load_model(files["model"]), files["image"], files["labels"], PHANTOM_LABELS)
    region = coverage_from_coordinates(coords, body, list(boxes.values()))
    assert region["low"][2] == pytest.approx(0.0, abs=1e-6) and region["high"][2] == pytest.approx(1.0, abs=1e-6)
    assert region["fraction"][2] == pytest.approx(0.5, abs=1e-6)
    assert region["body_voxels"] == int(body.sum())
    found = {s["label"]: s for s in region["structures"]}
    assert {label: s["status"] for label, s in found.items()} == _expected_status(labels)
    assert found[11]["name"] == "bladder" and found[11]["overlap"] == 0.0
    assert all(0 < s["overlap"] < 1 for s in found.values() if s["status"] == "partial")
    json.dumps(region)


def test_coverage_with_a_model_that_places_the_half_exam_in_the_upper_half(files, phantom, tmp_path):
    """The model API end to end. An identity model maps the upper-half file onto the whole cube (full
    coverage: it cannot tell a half exam from a whole one). A model whose coordinates are shifted by +1
    along S maps it onto [0, 2], bounded to [0, 1]: the upper half of the template, as a trained model
    would. (A constant shift cannot also halve the scale, so its coordinates inside that half are not
    the reference's: this checks the measured extent, the previous test the correspondence.)"""
    array, _, affine = phantom
    half = _upper_half(tmp_path, array, affine)
    full = coverage(load_model(files["model"]), half)
    assert full["low"][2] == pytest.approx(-1.0) and full["high"][2] == pytest.approx(1.0)
    assert full["exam"] == half
    placed = coverage(load_model(identity_model_file(tmp_path / "up.pt", list(SPACING), [0.0, 0.0, 1.0])), half)
    assert placed["low"][2] == pytest.approx(0.0, abs=1e-6) and placed["high"][2] == pytest.approx(1.0)
    assert placed["fraction"][2] == pytest.approx(0.5, abs=1e-6)
    assert placed["low"][:2] == full["low"][:2] and placed["high"][:2] == full["high"][:2]
    assert placed["cube_fraction"] == pytest.approx(np.prod(placed["fraction"]))
    assert "structures" not in placed


def test_cli_locate_end_to_end(files, phantom, capsys):
    array, labels, _ = phantom
    names = write_label_table(files["tmp"] / "names.json", PHANTOM_LABELS)
    out = files["tmp"] / "region.json"
    assert main(["locate", "--model", files["model"], "-i", files["image"], "--reference", files["image"],
                 "--reference-labels", files["labels"], "--labels", names, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    region = json.loads(out.read_text())
    assert region["exam"] == files["image"] and region["reference_labels"] == files["labels"]
    # the reference in itself with the identity model: a structure is inside unless its bounding box
    # leaves the body's (the spine's posterior voxels are mostly air at 22 mm, outside the body mask)
    body_first, body_last = _bbox(foreground_mask(torch.as_tensor(array)).numpy())
    expected = {}
    for label in (int(i) for i in np.unique(labels) if i != 0):
        first, last = _bbox(labels == label)
        within = all(b <= f and l <= e for b, f, l, e in zip(body_first, first, last, body_last))
        expected[label] = "inside" if within else "partial"
    assert {s["label"]: s["status"] for s in region["structures"]} == expected
    assert expected[7] == "partial" and sum(v == "inside" for v in expected.values()) == 10
    assert printed.startswith(f"{files['image']}: body covers the template R [")
    assert "inside: liver, spleen, kidney_left" in printed and f"region: {out}" in printed
    assert main(["locate", "--model", files["model"], "-i", files["image"], "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_locate_errors_exit_2_naming_the_option(files, capsys):
    tmp = files["tmp"]
    base = ["locate", "--model", files["model"], "-i", files["image"]]
    cases = [
        ([*base, "--reference", files["image"]], "--reference-labels: --reference and --reference-labels go together"),
        ([*base, "--labels", str(tmp / "n.json")], "--labels: only used with --reference"),
        (["locate", "--model", files["model"], "-i", str(tmp / "nope.nii.gz")], "-i: path"),
        ([*base, "--percentile", "60"], "--percentile: "),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepatlas-fast locate: error: ") and message in err, (argv, err)
