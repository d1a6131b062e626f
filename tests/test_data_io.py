"""NIfTI I/O: canonical orientation, resampling geometry, write-back on the input grid, errors."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from deepatlas_fast.data import io as dio  # noqa: E402
from deepatlas_fast.data.io import (  # noqa: E402
    Volume,
    crop_to_foreground,
    crop_volume,
    detect_modality,
    foreground_mask,
    load_labels,
    load_volume,
    normalize_intensity,
    read_label_table,
    save_like,
    volume_from_array,
    write_label_table,
)
from helpers import write_nifti  # noqa: E402

SHARED_CT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ct", "patient_a")


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = map(float, (np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(kind):
    """Odd affines: oblique, flipped, permuted (LIA like the brain maps), anisotropic."""
    a = np.eye(4)
    if kind == "ras":
        a[:3, :3] = np.diag([1.0, 1.0, 1.0])
    elif kind == "flipped_aniso":
        a[:3, :3] = np.diag([-0.8, 1.3, -2.5])
    elif kind == "lia":
        a[:3, :3] = np.array([[-1.0, 0, 0], [0, 0, 1.2], [0, -0.9, 0]])
    elif kind == "oblique":
        a[:3, :3] = _rotation(0.25, -0.15, 0.4) @ np.diag([1.1, 0.7, 2.0])
    elif kind == "oblique_permuted":
        a[:3, :3] = _rotation(-0.2, 0.3, 0.1) @ np.array([[0, 0, -1.5], [0.9, 0, 0], [0, -1.2, 0]])
    a[:3, 3] = [12.5, -40.25, 7.0]
    return a


KINDS = ["ras", "flipped_aniso", "lia", "oblique", "oblique_permuted"]


def _blobs(shape, seed=0):
    g = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    labels = np.zeros(shape, np.int32)
    for k in range(1, 5):
        c = g.uniform(0.2, 0.8, 3) * (np.array(shape) - 1)
        r = g.uniform(0.15, 0.3) * min(shape)
        labels[((idx - c) ** 2).sum(-1) <= r * r] = k
    return labels


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_orientation_matches_nibabel(tmp_path, kind):
    shape = (7, 9, 11)
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    path = write_nifti(tmp_path / "a.nii.gz", array, _affine(kind))
    vol = load_volume(path)
    canon = nib.as_closest_canonical(nib.load(path))
    assert vol.data.dtype == torch.float32
    assert tuple(vol.data.shape) == canon.shape
    np.testing.assert_array_equal(vol.data.numpy(), canon.get_fdata().astype(np.float32))
    np.testing.assert_allclose(vol.affine, canon.affine, atol=1e-5)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert not vol.resampled


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_exact_without_resampling(tmp_path, kind):
    shape = (8, 10, 9)
    aff = _affine(kind)
    array = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    labels = _blobs(shape).astype(np.uint8)
    img_path = write_nifti(tmp_path / "img.nii.gz", array, aff)
    lab_path = write_nifti(tmp_path / "lab.nii.gz", labels, aff)
    vol = load_volume(img_path)
    lab = load_labels(lab_path, like=vol)
    assert lab.data.dtype == torch.int64
    np.testing.assert_allclose(lab.affine, vol.affine)
    out_img = save_like(vol.data, vol, tmp_path / "out_img.nii.gz")
    out_lab = save_like(lab.data, lab, tmp_path / "out_lab.nii.gz")
    back = nib.load(out_img)
    back_lab = nib.load(out_lab)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), array)
    np.testing.assert_array_equal(np.asanyarray(back_lab.dataobj), labels)
    assert back_lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, aff, atol=1e-6)
    np.testing.assert_allclose(back_lab.affine, aff, atol=1e-6)


def _linear_field(shape, affine, coef=(0.3, -0.2, 0.5), offset=4.0):
    """Values a . world(voxel) + b on a file grid: trilinear resampling reproduces it exactly."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (world @ np.array(coef) + offset).astype(np.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", [0.6, (1.7, 0.9, 1.3)])
def test_resampling_geometry_exact(tmp_path, kind, spacing):
    shape = (9, 8, 10)
    aff = _affine(kind)
    field = _linear_field(shape, aff)
    path = write_nifti(tmp_path / "lin.nii.gz", field.astype(np.float32), aff)
    vol = load_volume(path, spacing=spacing, antialias=False)
    target = (spacing,) * 3 if isinstance(spacing, float) else spacing
    np.testing.assert_allclose(vol.spacing, target, rtol=1e-9)
    # every voxel centre of the resampled grid carries the value of the linear field at its world position
    # (inside the old voxel-centre extent; past it, less than one new voxel repeats the edge value)
    expected = _linear_field(vol.shape, vol.affine)
    canon = nib.as_closest_canonical(nib.load(path))
    inside = [np.arange(n) * z <= s - 1 + 1e-6 for n, z, s in zip(vol.shape, vol.zoom, canon.shape)]
    box = np.ix_(*inside)
    np.testing.assert_allclose(vol.data.numpy()[box], expected[box], atol=2e-4)
    # first voxel centre kept; the smallest grid covering every old voxel centre
    np.testing.assert_allclose(vol.affine[:3, 3], canon.affine[:3, 3], atol=1e-9)
    old = np.linalg.norm(canon.affine[:3, :3], axis=0)
    sizes = [int(math.ceil((n - 1) * o / t - 1e-4)) + 1 for n, o, t in zip(canon.shape, old, target)]
    assert list(vol.shape) == sizes
    for n, z, s in zip(vol.shape, vol.zoom, canon.shape):
        assert (n - 1) * z >= s - 1 - 1e-4 and (n - 2) * z < s - 1


@pytest.mark.parametrize("kind", ["oblique_permuted", "flipped_aniso"])
def test_roundtrip_with_resampling(tmp_path, kind):
    shape = (12, 10, 11)
    aff = _affine(kind)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    smooth = np.sin(idx[..., 0] / 3.0) + np.cos(idx[..., 1] / 4.0) * np.sin(idx[..., 2] / 5.0)
    img_path = write_nifti(tmp_path / "s.nii.gz", smooth.astype(np.float32), aff)
    vol = load_volume(img_path, spacing=0.5)  # upsampling: interpolation only
    out = nib.load(save_like(vol.data, vol, tmp_path / "back.nii.gz"))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, aff, atol=1e-6)
    back = np.asanyarray(out.dataobj)
    # interpolation tolerance of a smooth field
    assert np.abs(back - smooth).max() < 0.05
    # a linear field survives the round trip exactly (edges included: linear up to half a voxel out)
    field = _linear_field(shape, aff)
    vol = load_volume(write_nifti(tmp_path / "f.nii.gz", field.astype(np.float32), aff), spacing=0.5)
    back = np.asanyarray(nib.load(save_like(vol.data, vol, tmp_path / "fb.nii.gz")).dataobj)
    np.testing.assert_allclose(back, field, atol=1e-4)
    # labels: nearest both ways; an integer upsampling factor round-trips exactly
    labels = _blobs(shape, seed=3).astype(np.int16)
    lab_path = write_nifti(tmp_path / "l.nii.gz", labels, aff)
    spacings = np.linalg.norm(aff[:3, :3], axis=0)
    canon_spacing = [spacings[[i for i in range(3) if vol.orientation[i][0] == k][0]] for k in range(3)]
    lab_vol = load_labels(lab_path, spacing=[s / 2 for s in canon_spacing])
    assert lab_vol.data.dtype == torch.int64
    assert set(torch.unique(lab_vol.data).tolist()) <= set(np.unique(labels).tolist())
    back_lab = np.asanyarray(nib.load(save_like(lab_vol.data, lab_vol, tmp_path / "bl.nii.gz")).dataobj)
    np.testing.assert_array_equal(back_lab, labels)


def test_downsampling_antialias_and_labels_follow_image(tmp_path):
    shape = (20, 18, 16)
    aff = _affine("lia")
    g = np.random.default_rng(0)
    noise = g.normal(size=shape).astype(np.float32)
    path = write_nifti(tmp_path / "n.nii.gz", noise, aff)
    plain = load_volume(path, spacing=3.0, antialias=False)
    smooth = load_volume(path, spacing=3.0)
    assert plain.shape == smooth.shape
    assert float(smooth.data.std()) < 0.7 * float(plain.data.std())  # the anti-alias filter removed noise
    labels = _blobs(shape).astype(np.uint8)
    lab = load_labels(write_nifti(tmp_path / "l.nii.gz", labels, aff), like=smooth)
    assert lab.shape == smooth.shape
    np.testing.assert_allclose(lab.affine, smooth.affine)
    # equivalent to loading the labels with the same spacing directly
    direct = load_labels(tmp_path / "l.nii.gz", spacing=3.0)
    assert torch.equal(direct.data, lab.data)


def test_crop_and_save_like_pads_back(tmp_path):
    shape = (10, 12, 9)
    aff = _affine("oblique")
    array = np.zeros(shape, np.float32)
    array[3:7, 4:9, 2:6] = np.random.default_rng(4).uniform(1, 2, (4, 5, 4))
    path = write_nifti(tmp_path / "c.nii.gz", array, aff)
    vol = load_volume(path)
    cropped = crop_to_foreground(vol, vol.data > 0, margin=1)
    assert cropped.shape < vol.shape
    assert cropped.crop_start != (0, 0, 0)
    # the cropped affine still maps its voxels to the same world points
    start = np.array(cropped.crop_start)
    np.testing.assert_allclose(cropped.affine[:3, 3], vol.affine[:3, :3] @ start + vol.affine[:3, 3])
    back = np.asanyarray(nib.load(save_like(cropped.data, cropped, tmp_path / "o.nii.gz")).dataobj)
    np.testing.assert_array_equal(back, array)
    with pytest.raises(ValueError, match="outside"):
        crop_volume(vol, (0, 0, 0), (11, 1, 1))


def test_save_like_dtypes_and_channels(tmp_path):
    vol = volume_from_array(np.zeros((5, 6, 7), np.float32), _affine("lia"))
    p = save_like(torch.full(vol.shape, 300, dtype=torch.int64), vol, tmp_path / "a.nii.gz")
    assert nib.load(p).get_data_dtype() == np.uint16
    p = save_like(torch.ones(vol.shape, dtype=torch.bool), vol, tmp_path / "b.nii.gz")
    assert nib.load(p).get_data_dtype() == np.uint8
    p = save_like(torch.rand(vol.shape), vol, tmp_path / "c.nii.gz", dtype="int16")
    assert nib.load(p).get_data_dtype() == np.int16
    probs = torch.rand(3, *vol.shape)
    out = nib.load(save_like(probs, vol, tmp_path / "d.nii.gz"))
    assert out.shape == (5, 6, 7, 3)
    for c in range(3):
        back = volume_from_array(np.asanyarray(out.dataobj)[..., c], out.affine)
        assert torch.allclose(back.data, probs[c])
    with pytest.raises(ValueError, match="array must have shape"):
        save_like(torch.zeros(4, 4, 4), vol, tmp_path / "e.nii.gz")
    with pytest.raises(ValueError, match="cannot hold"):
        save_like(torch.full(vol.shape, 300.0), vol, tmp_path / "f.nii.gz", dtype=np.uint8)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(ValueError, match="nope.nii.gz.*no such file"):
        load_volume(missing)
    with pytest.raises(ValueError, match="directory"):
        load_volume(tmp_path)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file" * 10)
    with pytest.raises(ValueError, match="garbage.nii.gz.*cannot read"):
        load_volume(garbage)
    truncated = tmp_path / "trunc.nii.gz"
    write_nifti(tmp_path / "full.nii.gz", np.zeros((20, 20, 20), np.float32), np.eye(4))
    truncated.write_bytes((tmp_path / "full.nii.gz").read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.nii.gz"):
        load_volume(truncated)
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 9), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="flat.nii.gz.*2-D"):
        load_volume(flat)
    slab = write_nifti(tmp_path / "slab.nii.gz", np.zeros((8, 9, 1), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="slab.nii.gz.*2-D"):
        load_volume(slab)
    series = write_nifti(tmp_path / "series.nii.gz", np.zeros((5, 5, 5, 3), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="series.nii.gz.*4-D"):
        load_volume(series)
    single = write_nifti(tmp_path / "single.nii.gz", np.ones((5, 5, 5, 1), np.float32), np.eye(4))
    assert load_volume(single).shape == (5, 5, 5)
    with pytest.raises(ValueError, match="spacing"):
        load_volume(single, spacing=-1)
    with pytest.raises(ValueError, match="spacing"):
        load_volume(single, spacing=(1, 2))
    with pytest.raises(TypeError, match="path"):
        load_volume(3)


def test_label_errors(tmp_path):
    aff = _affine("lia")
    frac = write_nifti(tmp_path / "frac.nii.gz", np.full((5, 5, 5), 1.5, np.float32), aff)
    with pytest.raises(ValueError, match="frac.nii.gz.*non-integer"):
        load_labels(frac)
    neg = write_nifti(tmp_path / "neg.nii.gz", np.full((5, 5, 5), -2, np.int16), aff)
    with pytest.raises(ValueError, match="negative"):
        load_labels(neg)
    whole = write_nifti(tmp_path / "whole.nii.gz", np.full((5, 5, 5), 3.0, np.float32), aff)
    assert load_labels(whole).data.dtype == torch.int64
    image = load_volume(write_nifti(tmp_path / "img.nii.gz", np.zeros((5, 5, 6), np.float32), aff))
    with pytest.raises(ValueError, match="whole.nii.gz.*differs from the image's grid"):
        load_labels(whole, like=image)
    shifted = aff.copy()
    shifted[0, 3] += 1.0
    other = load_volume(write_nifti(tmp_path / "img2.nii.gz", np.zeros((5, 5, 5), np.float32), shifted))
    with pytest.raises(ValueError, match="differs"):
        load_labels(whole, like=other)
    with pytest.raises(ValueError, match="spacing must be None"):
        load_labels(whole, like=other, spacing=2.0)


def test_non_finite_voxels_replaced_with_warning(tmp_path):
    array = np.zeros((5, 5, 5), np.float32)
    array[1, 1, 1] = np.nan
    array[2, 2, 2] = -7.0
    path = write_nifti(tmp_path / "nan.nii.gz", array, np.eye(4))
    with pytest.warns(UserWarning, match="non-finite"):
        vol = load_volume(path)
    assert bool(torch.isfinite(vol.data).all())
    assert float(vol.data[1, 1, 1]) == -7.0


def test_normalize_intensity():
    ct = torch.tensor([[[-2000.0, -1000.0], [0.0, 500.0]], [[1000.0, 3000.0], [-500.0, 250.0]]])
    assert detect_modality(ct) == "ct"
    out = normalize_intensity(ct)
    expected = torch.tensor([[[0.0, 0.0], [0.5, 0.75]], [[1.0, 1.0], [0.25, 0.625]]])
    assert torch.allclose(out, expected)
    assert torch.allclose(normalize_intensity(ct, "ct", window=(-100, 100), clip=False)[0, 1, 1], torch.tensor(3.0))
    mr = torch.arange(1000, dtype=torch.float32).reshape(10, 10, 10)
    assert detect_modality(mr) == "mr"
    n = normalize_intensity(mr)
    assert float(n.min()) == 0.0 and float(n.max()) == 1.0
    # the 0.5 / 99.5 percentiles map to 0 / 1: a middle value lands at its relative position
    assert abs(float(n.flatten()[500]) - (500 - 5) / (994 - 5)) < 2e-3
    assert torch.equal(normalize_intensity(torch.full((4, 4, 4), 7.0), "mr"), torch.zeros(4, 4, 4))
    assert normalize_intensity(np.ones((3, 3, 3)), "ct").dtype == torch.float32
    with pytest.raises(ValueError, match="modality"):
        normalize_intensity(mr, "pet")
    with pytest.raises(ValueError, match="window"):
        normalize_intensity(mr, "ct", window=(1, 1))


def test_foreground_mask_fills_enclosed_air():
    shape = (32, 32, 32)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    r = ((idx - 15.5) ** 2).sum(0).sqrt()
    body = r < 12
    lung = ((idx - torch.tensor([15.5, 15.5, 12.0]).view(3, 1, 1, 1)) ** 2).sum(0).sqrt() < 5
    ct = torch.full(shape, -1000.0)
    ct[body] = 40.0
    ct[lung] = -850.0
    ct += 20 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = foreground_mask(ct)
    assert mask.dtype == torch.bool
    assert bool(mask[lung].all())  # the enclosed lung is foreground
    agreement = (mask == body).float().mean()
    assert agreement > 0.98
    assert not bool(mask[0, 0, 0])
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        foreground_mask(torch.zeros(4, 4))


def test_label_table_roundtrip(tmp_path):
    p = write_label_table(tmp_path / "t" / "labels.json", {2: "b", 0: "background", 10: "c"})
    assert json.loads(open(p).read()) == {"0": "background", "2": "b", "10": "c"}
    assert read_label_table(p) == {0: "background", 2: "b", 10: "c"}
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json"):
        read_label_table(tmp_path / "bad.json")


def test_volume_geometry_is_plain_python():
    vol = volume_from_array(np.zeros((4, 5, 6), np.float32), _affine("oblique"), spacing=2.0)
    geo = vol.geometry()
    json.dumps(geo)
    assert geo["shape"] == list(vol.shape)
    assert isinstance(vol, Volume) and vol.resampled
    with pytest.raises(ValueError, match="shape"):
        vol.with_data(torch.zeros(1, 2, 3))


@pytest.mark.skipif(not os.path.isdir(SHARED_CT), reason="../shared/data/ct/patient_a is absent")
def test_shared_ct_loads_with_labels(tmp_path):
    ct = load_volume(os.path.join(SHARED_CT, "ct.nii.gz"), spacing=4.0)
    assert detect_modality(ct.data) == "ct"
    labels = load_labels(os.path.join(SHARED_CT, "labels.nii.gz"), like=ct)
    assert labels.shape == ct.shape and labels.data.dtype == torch.int64
    assert int(labels.data.max()) > 10
    # labels sit inside the body
    body = foreground_mask(ct.data)
    assert float(body[labels.data > 0].float().mean()) > 0.95
    raw = load_labels(os.path.join(SHARED_CT, "labels.nii.gz"))
    back = nib.load(save_like(raw.data, raw, tmp_path / "l.nii.gz"))
    orig = nib.load(os.path.join(SHARED_CT, "labels.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(orig.dataobj))
    np.testing.assert_allclose(back.affine, orig.affine, atol=1e-5)
