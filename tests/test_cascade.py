"""Cascade segmentation (``segment --cascade``): coarse pass on the whole exam, fine passes on crops.

An untrained CoordNet is exactly the identity on its grid, and a coarse identity map interpolated onto
the fine grid is again the identity when the grids line up (sizes ``2 k + 1`` with a coarse spacing twice
the model's). So a reference segmented onto itself through the cascade must give back every requested
structure voxel for voxel: that checks the crop boxes, the hand-over from the coarse to the fine pass
and the merge, on grids stored in several orientations.
"""

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

import deepatlas_fast.cascade as cascade  # noqa: E402
import deepatlas_fast.segment as seg  # noqa: E402
from deepatlas_fast.checkpoint import load_model  # noqa: E402
from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.data.io import load_labels, load_volume, to_original_grid, write_label_table  # noqa: E402
from helpers import identity_model_file, stored_variant, write_nifti  # noqa: E402

SHAPE = (41, 37, 33)  # 2k + 1: the coarse grid (twice the spacing) lines up with the fine one
SPACING = (8.0, 9.0, 10.0)
NAMES = {1: "liver", 2: "spleen", 3: "kidney_left"}


def _atlas(files):
    model = load_model(files["model"])
    return model, seg.build_reference(model, [(files["image"], files["labels"])])


@pytest.mark.parametrize("kind", ["ras", "lia"])
def test_requested_structures_come_back_exactly_on_the_reference_itself(tmp_path, phantom, kind):
    array, labels, affine = phantom
    image = write_nifti(tmp_path / "r.nii.gz", *stored_variant(kind, array, affine))
    truth_path = write_nifti(tmp_path / "rl.nii.gz", *stored_variant(kind, labels, affine))
    model = load_model(identity_model_file(tmp_path / "m.pt", list(load_volume(image).spacing)))
    atlas = seg.build_reference(model, [(image, truth_path)])
    truth = load_labels(truth_path).data

    everything = cascade.cascade_segment(model, atlas, image)
    assert torch.equal(everything.labels.data, truth)
    assert len(everything.crops) == 1 and everything.crops[0].label is None
    assert everything.coarse_spacing == tuple(2 * s for s in load_volume(image).spacing)

    result = cascade.cascade_segment(model, atlas, image, ["liver", 2], names=NAMES)
    assert [c.label for c in result.crops] == [1, 2]
    stored = to_original_grid(result.labels.data, result.labels).numpy()  # the file's voxel order
    for crop in result.crops:
        assert torch.equal(result.labels.data == crop.label, truth == crop.label)
        inside = np.zeros(stored.shape, bool)
        inside[tuple(slice(a, b) for a, b in zip(crop.file_start, crop.file_stop))] = True
        assert (stored == crop.label).any() and not ((stored == crop.label) & ~inside).any()
    np.testing.assert_array_equal(result.labels.original_affine, nib.load(image).affine)


def test_the_network_never_sees_the_whole_exam_at_the_model_spacing(files, monkeypatch):
    model, atlas = _atlas(files)
    seen = []
    original = cascade.network_coordinates

    def spy(model, image, **kwargs):
        seen.append((tuple(image.shape), kwargs.get("init") is not None, kwargs.get("init_level")))
        return original(model, image, **kwargs)

    monkeypatch.setattr(cascade, "network_coordinates", spy)
    result = cascade.cascade_segment(model, atlas, files["image"], [3], names=NAMES)
    coarse_shape = tuple((s - 1) // 2 + 1 for s in SHAPE)
    assert seen[0][:2] == (coarse_shape, False)
    (crop,) = result.crops
    assert seen[1:] == [(crop.shape, True, 1)]  # the coarse pass stands in for the fine pass's level 1 up
    assert all(c >= cascade.MIN_CROP_SIDE for c in crop.shape) and crop.shape != SHAPE


def test_crops_are_at_least_the_training_crop(files):
    model, atlas = _atlas(files)
    model.preprocessing["size"] = [30, 24, 20]
    assert cascade.min_crop_shape(model) == (30, 24, 20)
    (crop,) = cascade.cascade_segment(model, atlas, files["image"], [3], margin_mm=0).crops
    assert all(c >= m for c, m in zip(crop.shape, (30, 24, 20)))
    model.preprocessing["size"] = 8
    assert cascade.min_crop_shape(model) == (cascade.MIN_CROP_SIDE,) * 3


def test_a_structure_the_coarse_pass_misses_gets_no_crop_and_a_warning(files, tmp_path, phantom):
    model, atlas = _atlas(files)
    array, _, affine = phantom
    empty = write_nifti(tmp_path / "air.nii.gz", np.full(SHAPE, -1000.0, np.float32), affine)
    # the identity model maps the air exam onto the references' coverage, so make the label absent by
    # asking for a structure only the reference's splat knows and reading it nowhere: min_weight above
    # every splatted weight puts the whole target outside the coverage
    with pytest.warns(UserWarning, match="finds structure 1"):
        result = cascade.cascade_segment(model, atlas, empty, [1], min_weight=1e9)
    assert result.crops == [] and int(result.labels.data.max()) == 0


def test_api_errors_name_the_argument(files):
    model, atlas = _atlas(files)
    with pytest.raises(ValueError, match="structures: label 9 is not labelled on the references"):
        cascade.cascade_segment(model, atlas, files["image"], [9])
    with pytest.raises(ValueError, match="unknown label name 'heart'"):
        cascade.cascade_segment(model, atlas, files["image"], ["heart"], names=NAMES)
    with pytest.raises(ValueError, match="coarse_spacing .* must not be finer than the model's spacing"):
        cascade.cascade_segment(model, atlas, files["image"], coarse_spacing=4.0)
    with pytest.raises(ValueError, match="margin_mm must be a number >= 0"):
        cascade.cascade_segment(model, atlas, files["image"], margin_mm=-1)
    with pytest.raises(ValueError, match="structures: give at least one structure"):
        cascade.cascade_segment(model, atlas, files["image"], [])
    with pytest.raises(TypeError, match="atlas must be a LabelAtlas"):
        cascade.cascade_segment(model, "atlas", files["image"])


def _run(files, *extra):
    return main(["segment", "--model", files["model"], "--reference", files["image"],
                 "--reference-labels", files["labels"], *extra])


def test_cli_cascade_end_to_end(files, phantom, capsys):
    names = write_label_table(files["tmp"] / "names.json", NAMES)
    out = files["tmp"] / "out.nii.gz"
    assert _run(files, "-i", files["image"], "-o", str(out), "--cascade", "--structures", "liver", "spleen",
                "--labels", names, "--margin", "12") == 0
    printed = capsys.readouterr().out
    assert "2 fine pass(es) (liver " in printed and "; spleen " in printed
    stored = nib.load(out)
    np.testing.assert_array_equal(stored.affine, nib.load(files["image"]).affine)
    assert stored.get_data_dtype() == np.uint8
    truth = np.asarray(nib.load(files["labels"]).dataobj)
    for label in (1, 2):
        np.testing.assert_array_equal(np.asarray(stored.dataobj) == label, truth == label)


def test_cli_cascade_errors_name_the_option(files, capsys):
    out = str(files["tmp"] / "out.nii.gz")
    cases = [
        (["--structures", "1"], "--structures: only used with --cascade"),
        (["--cascade", "--structures", "9"], "--structures: label 9 is not labelled"),
        (["--cascade", "--coarse-spacing", "2"], "--coarse-spacing (2.0, 2.0, 2.0) mm must not be finer"),
        (["--cascade", "--margin", "-3"], "--margin must be a number >= 0"),
    ]
    for extra, message in cases:
        assert _run(files, "-i", files["image"], "-o", out, *extra) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_handover_level_is_log2_of_the_spacing_ratio(files):
    model = load_model(files["model"])  # 2 levels
    assert cascade.handover_level(model, (2.0, 2.0, 2.0)) == 1
    assert cascade.handover_level(model, (4.0, 4.0, 4.0)) == 1  # at most the coarsest level
    assert cascade.handover_level(model, (1.0, 1.0, 1.0)) == 0
    assert cascade.handover_level(model, (1.5, 3.0, 3.0)) == 0

