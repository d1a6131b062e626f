"""segment: one-shot / few-shot label propagation from NIfTI references to NIfTI targets, the Python API and
the ``segment`` command.

An untrained CoordNet is exactly the identity on its input grid, which makes most checks exact: a
reference segmented onto itself (at the model's spacing) must give back its labels voxel for voxel.
What an identity model cannot show: it maps voxel indices, not anatomy, so it does not follow anatomy
moved inside the field of view. Tests that need coordinates other than the identity build them directly
(a constant shift in the network's coarsest head, or a LabelAtlas from hand-made coordinates).
"""

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

import deepatlas_fast.segment as seg  # noqa: E402
from deepatlas_fast.checkpoint import load_model, save_model  # noqa: E402
from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.coords import identity_coords  # noqa: E402
from deepatlas_fast.data.io import (  # noqa: E402
    load_labels,
    load_volume,
    read_label_table,
    save_like,
    to_original_grid,
    write_label_table,
)
from deepatlas_fast.data.phantoms import phantom_subject  # noqa: E402
from deepatlas_fast.model import DeepAtlas  # noqa: E402
from helpers import identity_model_file, rotation4, stored_variant, write_nifti  # noqa: E402
from deepatlas_fast.propagate import dice, mean_dice  # noqa: E402

SHAPE = (19, 17, 15)  # odd sizes
SPACING = (20.0, 22.0, 24.0)  # anisotropic, exact in float32 (NIfTI stores the affine as float32)
NAMES = {1: "liver", 2: "spleen", 7: "spine", 300: "unused"}


def _file_array(path):
    return np.asarray(nib.load(path).dataobj)


def _mean_dice(pred, truth) -> float:
    def as_labels(x):
        return torch.as_tensor(np.asarray(x).astype(np.int64))

    return mean_dice(dice(as_labels(pred), as_labels(truth)))


# ----------------------------------------------------------------------------------------------
# the Python API


@pytest.mark.parametrize("kind", ["ras", "flipped", "lia", "oblique"])
def test_reference_onto_itself_gives_back_its_labels_exactly(tmp_path, phantom, kind):
    array, labels, affine = phantom
    image_path = write_nifti(tmp_path / "r.nii.gz", *stored_variant(kind, array, affine))
    labels_path = write_nifti(tmp_path / "rl.nii.gz", *stored_variant(kind, labels, affine))
    # the model runs at the file's own (anisotropic) spacing, in canonical axis order
    model = load_model(identity_model_file(tmp_path / "m.pt", list(load_volume(image_path).spacing)))
    atlas = seg.build_reference(model, [(image_path, labels_path)])
    assert atlas.template_shape == SHAPE  # default: the reference's network grid
    assert atlas.classes.tolist() == sorted(np.unique(labels).tolist())
    result = seg.segment(model, atlas, image_path)
    truth = load_labels(labels_path)
    assert torch.equal(result.labels.data, truth.data)
    assert mean_dice(dice(result.labels.data, truth.data)) == 1.0
    torch.testing.assert_close(result.probability.data, torch.ones(truth.shape))
    np.testing.assert_array_equal(result.labels.original_affine, nib.load(image_path).affine)


def test_to_original_grid_is_what_save_like_writes(tmp_path, phantom):
    array, _, affine = phantom
    path = write_nifti(tmp_path / "lia.nii.gz", *stored_variant("lia", array, affine))
    volume = load_volume(path, spacing=31.0)
    back = to_original_grid(volume.data, volume)
    assert tuple(back.shape) == nib.load(path).shape
    np.testing.assert_array_equal(back.numpy(), _file_array(save_like(volume.data, volume, tmp_path / "b.nii.gz")))


def test_world_position_is_ignored_by_the_identity_model(files, phantom):
    """The same voxels stored 40 mm elsewhere in the scanner get the same labels, on the moved grid.

    (That is the point of coordinates: anatomy is found wherever it lies in the scanner. An identity
    model maps voxel indices, so anatomy moved *inside* the field of view is not followed: see the
    next test for coordinates that move.)"""
    array, labels, affine = phantom
    moved = affine.copy()
    moved[:3, 3] += [40.0, -25.0, 61.0]
    target = write_nifti(files["tmp"] / "moved.nii.gz", array, moved)
    model = load_model(files["model"])
    atlas = seg.build_reference(model, [(files["image"], files["labels"])])
    result = seg.segment(model, atlas, target)
    assert torch.equal(result.labels.data, torch.as_tensor(labels, dtype=torch.int64))
    np.testing.assert_array_equal(result.labels.original_affine, nib.load(target).affine)


def test_labels_follow_the_coordinates(files, phantom):
    """A model whose coordinates are shifted by 2 voxels along R reads the reference 2 voxels further."""
    _, labels, _ = phantom
    identity = load_model(files["model"])
    shifted = load_model(identity_model_file(files["tmp"] / "shift.pt", list(SPACING), [4.0 / (SHAPE[0] - 1), 0, 0]))
    atlas = seg.build_reference(identity, [(files["image"], files["labels"])])
    result = seg.segment(shifted, atlas, files["image"])
    assert torch.equal(result.labels.data[:-2], torch.as_tensor(labels[2:], dtype=torch.int64))


def test_few_shot_votes_are_pooled(files, phantom):
    """Two references disagree on the liver (ids 1 and 12): each class gets half the votes there."""
    _, labels, affine = phantom
    other = labels.copy()
    other[labels == 1] = 12
    other_path = write_nifti(files["tmp"] / "other_labels.nii.gz", other, affine)
    model = load_model(files["model"])
    atlas = seg.build_reference(model, [(files["image"], files["labels"]), (files["image"], other_path)])
    assert atlas.classes.tolist() == sorted(set(np.unique(labels).tolist()) | {12})
    assert atlas.sources == [files["labels"], other_path]
    result = seg.segment(model, atlas, files["image"])
    liver = torch.as_tensor(labels == 1)
    torch.testing.assert_close(result.probability.data[liver], torch.full((int(liver.sum()),), 0.5))
    assert bool((result.labels.data[liver] == 1).all())  # a tie goes to the lower id
    torch.testing.assert_close(result.probability.data[~liver], torch.ones(int((~liver).sum())))
    assert torch.equal(result.labels.data[~liver], torch.as_tensor(labels, dtype=torch.int64)[~liver])


def test_references_of_different_shapes_share_one_template(files, phantom, tmp_path):
    image, labels, affine = phantom
    image2, labels2, affine2 = phantom_subject(5, shape=(21, 13, 16), spacing=SPACING)
    second = (write_nifti(tmp_path / "r2.nii.gz", image2.numpy(), affine2),
              write_nifti(tmp_path / "r2l.nii.gz", labels2.numpy().astype(np.uint8), affine2))
    model = load_model(files["model"])
    atlas = seg.build_reference(model, [(files["image"], files["labels"]), second])
    assert atlas.template_shape == (21, 17, 16)  # per axis the largest network grid
    torch.testing.assert_close(atlas.weight.sum(), torch.tensor(float(np.prod(SHAPE) + 21 * 13 * 16)))
    assert seg.build_reference(model, [second], template_shape=(9, 10, 11)).template_shape == (9, 10, 11)
    result = seg.segment(model, atlas, files["image"])
    assert _mean_dice(result.labels.data, labels) > 0.5


def test_background_outside_the_coverage_and_union_of_few_shot_coverage(files):
    """References whose coordinates cover only one half of the template (along R): targets are
    background in the other half; pooling both halves covers everything."""
    model = load_model(files["model"])
    full = identity_coords(SHAPE)
    half = SHAPE[0] // 2  # template nodes 0..9 and 9..18 along R
    left, right = full[:, :, : half + 1], full[:, :, half:]
    ones = torch.ones(left.shape[2:], dtype=torch.int64)
    one_half = seg.LabelAtlas.from_coordinates([left], [ones], SHAPE)
    labels = seg.segment(model, one_half, files["image"]).labels.data
    assert bool((labels[: half + 1] == 1).all()) and bool((labels[half + 1 :] == 0).all())
    both = seg.LabelAtlas.from_coordinates([left, right], [ones, 2 * ones[: SHAPE[0] - half]], SHAPE)
    labels = seg.segment(model, both, files["image"]).labels.data
    assert bool((labels[:half] == 1).all()) and bool((labels[half + 1 :] == 2).all())
    assert bool((labels != 0).all())


def test_api_errors_are_clear(files, phantom, tmp_path):
    _, labels, affine = phantom
    model = load_model(files["model"])
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    off_grid = write_nifti(tmp_path / "off.nii.gz", labels, shifted)
    with pytest.raises(ValueError, match=r"references\[0\]: path .*off.nii.gz.*differs from the image's grid"):
        seg.build_reference(model, [(files["image"], off_grid)])
    with pytest.raises(ValueError, match=r"references\[0\]: image .*spacing .* differs from the model's"):
        seg.build_reference(model, [(load_volume(files["image"], spacing=30.0), files["labels"])])
    with pytest.raises(ValueError, match=r"an \(image, labels\) pair"):
        seg.build_reference(model, [files["image"]])
    with pytest.raises(ValueError, match="one label map per reference"):
        seg.LabelAtlas.from_coordinates([identity_coords(SHAPE)], [])
    with pytest.raises(TypeError, match="LabelAtlas"):
        seg.segment(model, "atlas", files["image"])
    del model.preprocessing["spacing"]
    with pytest.raises(ValueError, match="no 'spacing'"):
        seg.exam_coordinates(model, files["image"])


# ----------------------------------------------------------------------------------------------
# the command


def _run(files, *extra, reference=None):
    ref = reference or (files["image"], files["labels"])
    return main(["segment", "--model", files["model"], "--reference", ref[0], "--reference-labels", ref[1], *extra])


def test_cli_end_to_end(files, phantom, capsys):
    _, labels, affine = phantom
    names = write_label_table(files["tmp"] / "names.json", NAMES)
    out, png, prob = files["tmp"] / "out" / "seg.nii.gz", files["tmp"] / "pics" / "seg.png", files["tmp"] / "p.nii.gz"
    assert _run(files, "-i", files["image"], "-o", str(out), "--labels", names, "--png", str(png),
                "--probabilities", str(prob)) == 0
    printed = capsys.readouterr().out
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8 and written.shape == SHAPE
    np.testing.assert_array_equal(written.affine, nib.load(files["image"]).affine)
    np.testing.assert_array_equal(_file_array(out), labels)
    assert read_label_table(files["tmp"] / "out" / "seg.json") == NAMES
    probability = nib.load(prob)
    assert probability.get_data_dtype() == np.float32 and probability.shape == SHAPE
    np.testing.assert_array_equal(probability.affine, written.affine)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reference: 1 exam(s), 11 label(s)" in printed
    assert f"{out}: 11 label(s) (liver, spleen, 3, 4, 5, 6, spine," in printed


@pytest.mark.parametrize("kind", ["flipped", "lia", "oblique", "anisotropic"])
def test_cli_output_is_on_the_target_grid(tmp_path, phantom, kind, capsys):
    """Targets stored flipped, permuted, oblique or with thicker slices, segmented by a model running
    at a coarser spacing than the files: every output has exactly its target's shape and affine, and
    equals the reference's own segmentation carried along (the canonical data is the same)."""
    array, labels, affine = phantom
    files = {"image": write_nifti(tmp_path / "r.nii.gz", array, affine),
             "labels": write_nifti(tmp_path / "rl.nii.gz", labels, affine),
             "model": identity_model_file(tmp_path / "m.pt", 31.0)}
    target = write_nifti(tmp_path / f"{kind}.nii.gz", *stored_variant(kind, array, affine))
    own, out = tmp_path / "own.nii.gz", tmp_path / "out.nii.gz"
    assert _run(files, "-i", files["image"], "-o", str(own), "-i", target, "-o", str(out), "--quiet") == 0
    assert capsys.readouterr().out == ""
    written, expected = nib.load(out), nib.load(target)
    assert written.shape == expected.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, expected.affine)
    mine = _file_array(own)
    assert _mean_dice(mine, labels) > 0.6  # the information a 31 mm grid keeps of these 20-24 mm organs
    if kind == "anisotropic":
        assert _mean_dice(_file_array(out), stored_variant(kind, labels, affine)[0]) > 0.6
    else:
        np.testing.assert_array_equal(_file_array(out), stored_variant(kind, mine, affine)[0])


def test_large_label_ids_are_written_as_uint16(files, phantom):
    _, labels, affine = phantom
    big = labels.astype(np.int32)
    big[labels == 1] = 300
    reference = (files["image"], write_nifti(files["tmp"] / "big.nii.gz", big, affine))
    out = files["tmp"] / "big_out.nii.gz"
    assert _run(files, "-i", files["image"], "-o", str(out), "--quiet", reference=reference) == 0
    assert nib.load(out).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(_file_array(out), big)


def _spy(monkeypatch):
    calls = {"build_reference": 0, "exam_coordinates": 0}
    for name in calls:
        original = getattr(seg, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(seg, name, counted)
    return calls


def test_several_targets_reuse_the_reference(files, monkeypatch, capsys):
    calls = _spy(monkeypatch)
    outs = [files["tmp"] / "a.nii.gz", files["tmp"] / "b.nii"]
    assert _run(files, "-i", files["image"], "-o", str(outs[0]), "-i", files["image"], "-o", str(outs[1]),
                "--png", str(files["tmp"] / "pngs")) == 0
    assert calls == {"build_reference": 1, "exam_coordinates": 3}  # 1 reference + 2 targets
    printed = capsys.readouterr().out
    for out in outs:
        assert out.is_file() and f"{out}: 11 label(s)" in printed
    assert (files["tmp"] / "pngs" / "a.png").is_file() and (files["tmp"] / "pngs" / "b.png").is_file()


def test_folder_mode(files, phantom, monkeypatch, capsys):
    array, labels, affine = phantom
    folder = files["tmp"] / "targets"
    folder.mkdir()
    for kind in ("ras", "lia", "anisotropic"):
        write_nifti(folder / f"{kind}.nii.gz", *stored_variant(kind, array, affine))
    (folder / "notes.txt").write_text("not an exam")
    calls = _spy(monkeypatch)
    out, prob = files["tmp"] / "segs", files["tmp"] / "probs"
    assert _run(files, "-i", str(folder), "-o", str(out), "--probabilities", str(prob), "--quiet") == 0
    assert calls == {"build_reference": 1, "exam_coordinates": 4}
    assert sorted(p.name for p in out.iterdir()) == ["anisotropic.nii.gz", "lia.nii.gz", "ras.nii.gz"]
    assert sorted(p.name for p in prob.iterdir()) == ["anisotropic.nii.gz", "lia.nii.gz", "ras.nii.gz"]
    for kind in ("ras", "lia"):
        np.testing.assert_array_equal(_file_array(out / f"{kind}.nii.gz"), stored_variant(kind, labels, affine)[0])
        assert nib.load(prob / f"{kind}.nii.gz").shape == nib.load(folder / f"{kind}.nii.gz").shape


def test_cli_errors_exit_2_naming_the_option(files, phantom, capsys):
    _, labels, affine = phantom
    tmp = files["tmp"]
    fractional = write_nifti(tmp / "frac.nii.gz", np.full(SHAPE, 0.5, np.float32), affine)
    moved = affine.copy()
    moved[:3, 3] += 3.0
    off_grid = write_nifti(tmp / "off.nii.gz", labels, moved)
    not_a_model = tmp / "model.txt"
    not_a_model.write_text("hello")
    no_spacing = tmp / "no_spacing.pt"
    save_model(no_spacing, DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8)), preprocessing={})
    empty = tmp / "empty"
    empty.mkdir()
    a_file = tmp / "png_is_a_file.png"
    a_file.write_bytes(b"")
    out = str(tmp / "o.nii.gz")
    ref = ["--reference", files["image"], "--reference-labels", files["labels"]]
    cases = [
        (["--model", files["model"], *ref, "--reference", files["image"], "-i", files["image"], "-o", out],
         "--reference-labels: got 1 label map(s) for 2 --reference image(s)"),
        (["--model", files["model"], *ref, "-i", files["image"], "-i", files["image"], "-o", out],
         "-o: got 1 output(s) for 2"),
        (["--model", files["model"], "--reference", str(tmp / "nope.nii.gz"), "--reference-labels", files["labels"],
          "-i", files["image"], "-o", out], "--reference: path"),
        (["--model", files["model"], *ref, "-i", str(tmp / "nope.nii.gz"), "-o", out], "-i: path"),
        (["--model", files["model"], "--reference", files["image"], "--reference-labels", fractional,
          "-i", files["image"], "-o", out], "--reference-labels: path"),
        (["--model", files["model"], "--reference", files["image"], "--reference-labels", off_grid,
          "-i", files["image"], "-o", out], "differs from the image's grid"),
        (["--model", str(not_a_model), *ref, "-i", files["image"], "-o", out], "--model: model: cannot read"),
        (["--model", str(no_spacing), *ref, "-i", files["image"], "-o", out],
         "--model: model: its preprocessing has no"),
        (["--model", files["model"], *ref, "-i", str(empty), "-o", out], "-i: no .nii or .nii.gz files"),
        (["--model", files["model"], *ref, "-i", files["image"], "-o", str(tmp / "o.png")], "-o: "),
        (["--model", files["model"], *ref, "-i", files["image"], "-o", files["image"]],
         "-o: an output would overwrite"),
        (["--model", files["model"], *ref, "-i", files["image"], "-o", out, "-i", files["image"], "-o", out + "2.nii",
          "--png", str(a_file)], "--png: "),
        (["--model", files["model"], *ref, "-i", files["image"], "-o", out, "--labels", str(tmp / "none.json")],
         "--labels: "),
        (["--model", files["model"], *ref, "-i", files["image"], "-o", out, "--template-shape", "4", "5"],
         "--template-shape: give 1 or 3"),
    ]
    for argv, message in cases:
        assert main(["segment", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepatlas-fast segment: error: ") and message in err, (argv, err)
    assert not (tmp / "o.nii.gz").exists()


def test_few_shot_pools_references_and_beats_one_shot_on_phantoms(tmp_path):
    """Few-shot >= one-shot on the phantom cohort: K references' votes, pooled in the template, against
    each reference alone, on held-out targets (an identity model: the pooling itself is what is tested)."""
    spacing = (24.0, 24.0, 24.0)
    model = load_model(identity_model_file(tmp_path / "m.pt", list(spacing)))
    subjects = []
    for i in range(7):
        image, labels, affine = phantom_subject(100 + i, shape=(16, 16, 16), spacing=spacing)
        subjects.append((write_nifti(tmp_path / f"img{i}.nii.gz", image.numpy(), affine),
                         write_nifti(tmp_path / f"lab{i}.nii.gz", labels.numpy().astype(np.int16), affine),
                         labels))
    references, targets = subjects[:3], subjects[3:]

    def mean_target_dice(atlas):
        scores = [mean_dice(dice(seg.segment(model, atlas, img).labels.data, truth, range(1, 12)))
                  for img, _, truth in targets]
        return sum(scores) / len(scores)

    one_shot = [mean_target_dice(seg.build_reference(model, [(img, lab)])) for img, lab, _ in references]
    few_shot = mean_target_dice(seg.build_reference(model, [(img, lab) for img, lab, _ in references]))
    assert few_shot >= sum(one_shot) / len(one_shot) + 0.01, (few_shot, one_shot)
