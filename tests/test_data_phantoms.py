"""The procedural phantom cohort: determinism, anatomy, variation, NIfTI export."""

import json
import os

import numpy as np
import pytest
import torch

from deepatlas_fast.data.phantoms import (
    PHANTOM_LABELS,
    phantom_cohort,
    phantom_seed,
    phantom_subject,
    write_phantom_cohort,
)

COHORT = phantom_cohort(5, seed=0, shape=(48, 48, 48))


def _centroid_mm(labels, affine, k):
    idx = torch.nonzero(labels == k).double()
    if idx.numel() == 0:
        return None
    vox = idx.mean(0).numpy()
    return affine[:3, :3] @ vox + affine[:3, 3]


def test_deterministic_per_seed():
    a = phantom_subject(7, (32, 32, 32))
    b = phantom_subject(7, (32, 32, 32))
    c = phantom_subject(8, (32, 32, 32))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])
    assert phantom_seed(0, 1) == phantom_seed(0, 1) != phantom_seed(1, 1)
    # cohorts of different sizes share their first subjects
    assert torch.equal(phantom_cohort(2, seed=0, shape=(48, 48, 48))[1][0], COHORT[1][0])


def test_types_shapes_and_geometry():
    image, labels, affine = COHORT[0]
    assert image.dtype == torch.float32 and image.shape == (48, 48, 48)
    assert labels.dtype == torch.int64 and labels.shape == (48, 48, 48)
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_allclose(np.diag(affine)[:3], [8.0, 8.0, 8.0])  # 384 mm field of view
    img, lab, aff = phantom_subject(0, (20, 24, 30), spacing=(4.0, 5.0, 6.0))
    assert img.shape == lab.shape == (20, 24, 30)
    np.testing.assert_allclose(np.diag(aff)[:3], [4.0, 5.0, 6.0])
    assert set(torch.unique(lab).tolist()) <= {0, *PHANTOM_LABELS}


def test_hounsfield_units_per_tissue():
    image, labels, _ = phantom_subject(3, noise=0.0)
    assert float(image[0, 0, 0]) == pytest.approx(-1000.0, abs=1.0)  # air in the corner
    median = {k: float(image[labels == k].median()) for k in PHANTOM_LABELS if bool((labels == k).any())}
    assert 70 < median[1] < 150  # liver
    assert median[8] < -600 and median[9] < -600  # lungs
    assert median[7] > 150  # spine (bone)
    assert 80 < median[6] < 220  # aorta (contrast; partial volume at 6 mm)
    assert -20 < median.get(11, 10.0) < 40  # bladder (fluid)
    body = image > -500
    assert 0.2 < float(body.float().mean()) < 0.9
    # fat exists (subcutaneous layer)
    assert float(((image > -130) & (image < -70)).float().mean()) > 0.01
    noisy = phantom_subject(3)[0]
    assert 5 < float((noisy - image).std()) < 25


def test_consistent_layout_across_subjects():
    """Same relative anatomy in every subject: what one-shot label propagation relies on."""
    for image, labels, affine in COHORT:
        present = set(torch.unique(labels).tolist())
        assert {1, 2, 3, 4, 5, 6, 7}.issubset(present)  # abdominal organs always in the field of view
        c = {k: _centroid_mm(labels, affine, k) for k in PHANTOM_LABELS}
        assert c[1][0] > 20 > -20 > c[2][0]  # liver on the subject's right (+x), spleen on the left
        assert c[3][0] < 0 < c[4][0]  # kidney_left at -x, kidney_right at +x
        assert c[7][1] < c[6][1] < c[1][1] + 40  # spine posterior to the aorta
        if c[8] is not None and c[9] is not None:
            assert c[8][2] > c[1][2] and c[9][2] > c[1][2]  # lungs above the liver
        if c[11] is not None:
            assert c[11][2] < c[3][2]  # bladder below the kidneys
        if c[10] is not None:
            assert c[10][2] > c[1][2]  # heart above the liver


def test_subjects_vary_in_shape_pose_and_field_of_view():
    origins_z = [a[2, 3] for _, _, a in COHORT]
    assert np.ptp(origins_z) > 10.0  # different field of view along z
    liver_centres = np.array([_centroid_mm(lab, a, 1) for _, lab, a in COHORT])
    spread = liver_centres.std(0)
    assert (spread > 1.0).all() and (spread < 40.0).all()
    volumes = [int((lab == 1).sum()) for _, lab, _ in COHORT]
    assert max(volumes) > 1.1 * min(volumes)
    # the union of organs overlaps across subjects but is never identical
    a, b = COHORT[0][1], COHORT[1][1]
    dice = 2 * float(((a == 1) & (b == 1)).sum()) / float((a == 1).sum() + (b == 1).sum())
    assert 0.3 < dice < 0.98
    # lungs and bladder enter / leave the field of view across the cohort
    counts = [[int((lab == k).sum()) for _, lab, _ in phantom_cohort(12, seed=5, shape=(24, 24, 24))] for k in (9, 11)]
    assert min(counts[0]) < 0.5 * max(counts[0]) and min(counts[1]) < 0.5 * max(counts[1])


def test_variation_zero_is_the_template():
    a = phantom_subject(1, (32, 32, 32), variation=0.0, noise=0.0)
    b = phantom_subject(2, (32, 32, 32), variation=0.0, noise=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        phantom_subject(0, (64, 64))
    with pytest.raises(ValueError, match="spacing"):
        phantom_subject(0, (16, 16, 16), spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="variation"):
        phantom_subject(0, (16, 16, 16), variation=-1)
    with pytest.raises(ValueError, match="n must be"):
        phantom_cohort(0)


def test_write_cohort_as_nifti(tmp_path):
    pytest.importorskip("nibabel")
    from deepatlas_fast.data.io import load_labels, load_volume

    out = write_phantom_cohort(tmp_path / "cohort", 2, seed=0, shape=(24, 24, 24))
    assert len(out["images"]) == len(out["labels"]) == 2
    table = json.loads(open(out["table"]).read())
    assert table["0"] == "background" and table["1"] == "liver" and len(table) == len(PHANTOM_LABELS) + 1
    assert sorted(os.listdir(tmp_path / "cohort" / "images")) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    image, labels, affine = phantom_subject(phantom_seed(0, 1), (24, 24, 24))
    vol = load_volume(out["images"][1])
    lab = load_labels(out["labels"][1], like=vol)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)  # already canonical: geometry kept
    assert torch.equal(lab.data, labels)
    expected = image.round().clamp(-1024, 3071)
    assert torch.equal(vol.data, expected)


def test_data_package_works_without_nibabel():
    """The GPU machine has no nibabel: importing the package and generating phantoms must not need it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['nibabel'] = None\n"
        "import deepatlas_fast, deepatlas_fast.data as d\n"
        "img, lab, aff = d.phantom_subject(0, (16, 16, 16))\n"
        "ds = d.ImageDataset([img, img], (8, 8, 8)); ds.batch(0)\n"
        "try:\n"
        "    d.load_volume(__file__)\n"
        "except ImportError as e:\n"
        "    assert 'nibabel' in str(e)\n"
        "else:\n"
        "    raise SystemExit('load_volume worked without nibabel')\n"
    )
    script = os.path.join(os.path.dirname(__file__), "test_data_phantoms.py")
    result = subprocess.run([sys.executable, "-c", code.replace("__file__", repr(script))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
