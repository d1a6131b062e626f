"""Label propagation by coordinate matching and Dice (deepatlas_fast.propagate)."""

import math

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.propagate import dice, label_template, mean_dice, propagate_labels, splat

SHAPE = (12, 14, 10)


def _labels(shape=SHAPE):
    lab = torch.zeros(shape, dtype=torch.long)
    lab[3:8, 4:9, 2:6] = 1
    lab[8:11, 2:5, 5:9] = 2
    lab[1:3, 10:13, 1:4] = 4  # label 3 absent
    return lab


def test_identical_reference_and_target_give_dice_one():
    lab = _labels()
    coords = da.identity_coords(SHAPE)
    out, probs = propagate_labels(coords, lab, coords, 5, SHAPE)
    assert out.shape == SHAPE and out.dtype == torch.int64
    assert probs.shape == (1, 5, *SHAPE)
    assert torch.equal(out, lab)
    scores = dice(out, lab, range(1, 5))
    assert scores[1] == scores[2] == scores[4] == 1.0
    assert math.isnan(scores[3])  # absent from both: undefined
    assert mean_dice(scores) == 1.0
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, *SHAPE))
    assert float(probs[:, 3].max()) == 0  # a label missing from the reference never appears


def test_coarser_template_still_recovers_the_labels():
    lab = _labels()
    coords = da.identity_coords(SHAPE)
    out, _ = propagate_labels(coords, lab, coords, 5, (10, 12, 8))
    assert mean_dice(dice(out, lab)) > 0.85


def test_shifted_coordinates_propagate_shifted_labels():
    lab = _labels()
    ref = da.identity_coords(SHAPE)
    target = ref.clone()
    target[:, 0] += 2 * 2 / (SHAPE[0] - 1)  # target voxel i sits where reference voxel i + 2 is
    out, probs = propagate_labels(ref, lab, target, 5, SHAPE)
    expected = torch.zeros_like(lab)
    expected[:-2] = lab[2:]
    assert torch.equal(out, expected)  # the last two slices map outside the reference: background
    assert torch.equal(probs[0, 0, -2:], torch.ones_like(probs[0, 0, -2:]))


def test_uncovered_template_regions_are_background():
    lab = torch.ones(SHAPE, dtype=torch.long)
    ref = da.identity_coords(SHAPE) * 0.5  # the reference occupies the central half of the template
    target = da.identity_coords(SHAPE)
    out, _ = propagate_labels(ref, lab, target, 2, SHAPE)
    inside = (target.abs() <= 0.45).all(dim=1)[0]
    outside = (target.abs() >= 0.5 + 2 * 2 / (min(SHAPE) - 1)).any(dim=1)[0]  # beyond a 2-cell splat fringe
    assert bool((out[inside] == 1).all()) and bool((out[outside] == 0).all())


def test_few_shot_references_vote():
    lab_a = torch.zeros(SHAPE, dtype=torch.long)
    lab_a[2:10] = 1
    lab_b = torch.zeros(SHAPE, dtype=torch.long)
    lab_b[4:10] = 1
    lab_c = lab_b.clone()
    coords = da.identity_coords(SHAPE, batch=3)
    out, _ = propagate_labels(coords, torch.stack([lab_a, lab_b, lab_c]), coords[:1], 2, SHAPE)
    assert torch.equal(out, lab_b)  # two of three references agree


def test_splat_conserves_mass():
    pos = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    vals = torch.rand(2, 4, 50, generator=torch.Generator().manual_seed(1))
    weight, total = splat(pos, vals, (6, 7, 5))
    torch.testing.assert_close(weight.sum(), torch.tensor(100.0))
    torch.testing.assert_close(total.sum(dim=(1, 2, 3)), vals.sum(dim=(0, 2)))
    probs, w = label_template(da.identity_coords(SHAPE), _labels(), 5, (6, 7, 5))
    assert probs.shape == (1, 5, 6, 7, 5) and w.shape == (1, 1, 6, 7, 5)


def test_dice_values_and_errors():
    a = torch.tensor([0, 1, 1, 2, 2, 2])
    b = torch.tensor([0, 1, 2, 2, 2, 0])
    scores = dice(a, b)
    assert scores == {1: 2 * 1 / 3, 2: 2 * 2 / 6}
    assert math.isnan(mean_dice({1: float("nan")}))
    with pytest.raises(ValueError, match="pred must have the shape"):
        dice(a, b[:3])
    coords = da.identity_coords(SHAPE)
    with pytest.raises(ValueError, match="labels_ref values"):
        propagate_labels(coords, _labels(), coords, 3, SHAPE)
    with pytest.raises(ValueError, match="labels_ref must have shape"):
        propagate_labels(coords, _labels()[:5], coords, 5, SHAPE)
    with pytest.raises(TypeError, match="labels_ref must hold integer"):
        propagate_labels(coords, _labels().float(), coords, 5, SHAPE)
    with pytest.raises(ValueError, match="template_shape"):
        propagate_labels(coords, _labels(), coords, 5, (4, 4))
    with pytest.raises(ValueError, match="coords_target must have shape"):
        propagate_labels(coords, _labels(), coords[0], 5, SHAPE)
