"""SynthSeg-style synthesis: determinism, class statistics, priors and brain label maps."""

import os

import numpy as np
import pytest
import torch

from deepatlas_fast.data.synth import (
    BrainPriors,
    brain_eval_labels,
    brain_subject_paths,
    load_brain_priors,
    load_brain_subject,
    read_labels_table,
    synthesize_image,
)

BRAINS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "brain_labelmaps")
needs_brains = pytest.mark.skipif(not os.path.isdir(BRAINS), reason="../shared/data/brain_labelmaps is absent")


def _toy_priors():
    # labels 0, 2, 3, 41 -> classes 0, 1, 2, 1; class means 5 / 50 / 150 with small spreads
    means = np.array([[5.0, 50.0, 150.0], [0.5, 2.0, 2.0]])
    stds = np.array([[1.0, 4.0, 4.0], [0.1, 0.5, 0.5]])
    return BrainPriors(
        generation_labels=np.array([0, 2, 3, 41]),
        generation_classes=np.array([0, 1, 2, 1]),
        prior_means=means,
        prior_stds=stds,
        eval_labels=[2, 3, 41],
        label_names={2: "a", 3: "b", 41: "c"},
    )


def _toy_labels(shape=(20, 20, 20)):
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[3:17, 3:17, 3:10] = 2
    labels[3:17, 3:17, 10:17] = 3
    labels[8:12, 8:12, 4:8] = 41
    return labels


def test_deterministic_for_a_generator():
    labels, priors = _toy_labels(), _toy_priors()
    a = synthesize_image(labels, priors, torch.Generator().manual_seed(3))
    b = synthesize_image(labels, priors, torch.Generator().manual_seed(3))
    c = synthesize_image(labels, priors, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == labels.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_intensities_follow_the_class_priors():
    labels, priors = _toy_labels(), _toy_priors()
    image = synthesize_image(labels, priors, torch.Generator().manual_seed(0), blur=(0, 0), bias_std=0.0,
                             noise=0.0, normalize=False)
    core = torch.zeros_like(labels, dtype=torch.bool)
    core[4:16, 4:16, :] = True  # away from the smoothing of class borders
    mean = {k: float(image[(labels == k) & core].mean()) for k in (0, 2, 3, 41)}
    assert mean[3] > mean[2] > mean[0]
    assert 40 < mean[2] < 60 and 140 < mean[3] < 160
    # labels 2 and 41 share class 1: same distribution
    assert abs(mean[41] - mean[2]) < 5
    # unknown ids fall back to background (class 0)
    unknown = labels.clone()
    unknown[labels == 3] = 999
    out = synthesize_image(unknown, priors, torch.Generator().manual_seed(0), blur=(0, 0), bias_std=0.0,
                           noise=0.0, normalize=False)
    assert float(out[labels == 3].mean()) < 10


def test_bias_field_and_smoothing_change_the_image():
    labels, priors = _toy_labels(), _toy_priors()
    uniform = torch.full((16, 16, 16), 3, dtype=torch.int64)
    kwargs = dict(bias_std=0.0, noise=0.0, normalize=False)
    plain = synthesize_image(uniform, priors, torch.Generator().manual_seed(0), blur=(0, 0), **kwargs)
    blurred = synthesize_image(uniform, priors, torch.Generator().manual_seed(0), blur=(1.0, 1.0), **kwargs)
    # smoothing (partial volume) removes voxel noise of a homogeneous region
    assert float(blurred.std()) < 0.5 * float(plain.std())
    assert abs(float(blurred.mean()) - float(plain.mean())) < 1.0
    biased = synthesize_image(labels, priors, torch.Generator().manual_seed(0), blur=(0, 0), bias_std=1.0, noise=0.0,
                              normalize=False)
    region = labels == 3
    assert float(biased[region].std()) > 1.5 * 4.0  # within-class spread grows beyond the class std


def test_bad_inputs():
    priors = _toy_priors()
    with pytest.raises(TypeError, match="integer"):
        synthesize_image(torch.zeros(4, 4, 4), priors)
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        synthesize_image(torch.zeros(4, 4, dtype=torch.int64), priors)
    with pytest.raises(TypeError, match="priors"):
        synthesize_image(torch.zeros(4, 4, 4, dtype=torch.int64), {"means": 1})
    with pytest.raises(ValueError, match="blur"):
        synthesize_image(torch.zeros(4, 4, 4, dtype=torch.int64), priors, blur=(2, 1))


def test_priors_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_brain_priors(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing generation_labels.npy"):
        load_brain_priors(tmp_path)
    with pytest.raises(ValueError, match="no subject_"):
        brain_subject_paths(tmp_path)
    (tmp_path / "t.txt").write_text("labels structures\n0 background\n2   left cerebral white matter\n")
    assert read_labels_table(tmp_path / "t.txt") == {0: "background", 2: "left cerebral white matter"}


@needs_brains
def test_brain_priors_from_shared_data():
    priors = load_brain_priors(BRAINS)
    assert priors.generation_labels.shape == priors.generation_classes.shape == (54,)
    assert priors.prior_means.shape == priors.prior_stds.shape == (2, 25)
    assert len(priors.eval_labels) == 32 and 0 not in priors.eval_labels
    assert all(k < 100 for k in priors.eval_labels)
    assert priors.label_names[17] == "left hippocampus"
    assert brain_eval_labels(BRAINS) == priors.eval_labels


@needs_brains
def test_brain_subject_at_2mm_and_synthesis():
    priors = load_brain_priors(BRAINS)
    path = brain_subject_paths(BRAINS)[1]
    vol = load_brain_subject(path, spacing=2.0, crop=True)
    assert vol.data.dtype == torch.int64
    np.testing.assert_allclose(vol.spacing, (2.0, 2.0, 2.0), rtol=1e-6)
    assert all(s < 128 for s in vol.shape) and all(s > 60 for s in vol.shape)
    ids = set(torch.unique(vol.data).tolist())
    assert ids <= set(priors.generation_labels.tolist())
    assert len(ids & set(priors.eval_labels)) >= 30
    # canonical RAS: the left hemisphere (labels 2-18) lies at smaller x than the right one (41-60)
    idx = torch.nonzero(vol.data == 2).double().mean(0)
    idx_r = torch.nonzero(vol.data == 41).double().mean(0)
    assert idx[0] < idx_r[0]
    image = synthesize_image(vol, priors, torch.Generator().manual_seed(0))
    assert image.shape == vol.shape and bool(torch.isfinite(image).all())
    assert float(image[vol.data == 0].mean()) < float(image[vol.data == 2].mean())  # T1: white matter bright
