"""Training dataset: deterministic crops and augmentation, label alignment, pair batches, errors."""

import numpy as np
import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.data.dataset import ImageDataset, PairBatchSampler, collate, pair_keys
from deepatlas_fast.data.io import normalize_intensity, volume_from_array


def _subjects(n=3, shape=(20, 22, 18)):
    """Blob 'bodies' in [0, 1] with a label map; intensity a function of the label."""
    g = torch.Generator().manual_seed(0)
    out = []
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    for i in range(n):
        centre = torch.tensor(shape, dtype=torch.float32) / 2 + torch.randn(3, generator=g)
        r = ((idx - centre.view(3, 1, 1, 1)) ** 2).sum(0).sqrt()
        labels = torch.zeros(shape, dtype=torch.int64)
        labels[r < 7.5] = 1
        labels[r < 4.0] = 2
        image = torch.tensor([0.0, 0.5, 1.0])[labels]
        out.append((image, labels))
    return out


def test_items_are_deterministic_per_key():
    subjects = _subjects()
    ds = ImageDataset([s[0] for s in subjects], (12, 12, 12), seed=3)
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert torch.equal(a["image"], b["image"]) and a["index"] == 1
    assert a["image"].shape == (1, 12, 12, 12) and a["image"].dtype == torch.float32
    assert not torch.equal(ds[(1, 6)]["image"], a["image"])
    assert not torch.equal(ImageDataset([s[0] for s in subjects], (12, 12, 12), seed=4)[(1, 5)]["image"], a["image"])
    # integer keys: epoch-dependent draws
    first = ds[0]["image"]
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], first)
    ds.set_epoch(0)
    assert torch.equal(ds[0]["image"], first)
    assert len(ds) == 3
    with pytest.raises(IndexError):
        ds[3]


def test_without_augmentation_crops_are_exact_and_inside_the_foreground():
    subjects = _subjects()
    ds = ImageDataset([s[0] for s in subjects], (10, 10, 10), augment=False, normalize=None,
                      labels=[s[1] for s in subjects], return_coords=True)
    for draw in range(4):
        item = ds[(0, draw)]
        image, labels, coords = item["image"][0], item["labels"][0], item["coords"]
        # the crop is a block of the volume: coords give its position, values are exact copies
        start = [int(round(float((coords[k].min() + 1) * (s - 1) / 2))) for k, s in enumerate(subjects[0][0].shape)]
        block = subjects[0][0][start[0]:start[0] + 10, start[1]:start[1] + 10, start[2]:start[2] + 10]
        assert torch.equal(image, block)
        assert torch.equal(labels, subjects[0][1][start[0]:start[0] + 10, start[1]:start[1] + 10, start[2]:start[2] + 10])
        assert float((labels > 0).float().mean()) > 0.3  # crops centred in the foreground
    fixed = ImageDataset([s[0] for s in subjects], (10, 10, 10), augment=False, random_crop=False)
    assert torch.equal(fixed[(0, 0)]["image"], fixed[(0, 1)]["image"])


def test_spatial_augmentation_keeps_labels_aligned_and_coords_exact():
    subjects = _subjects()
    ds = ImageDataset([s[0] for s in subjects], (14, 14, 14), labels=[s[1] for s in subjects], normalize=None,
                      rotation=20, scale=0.15, gamma=0, contrast=0, shift=0, noise=0, bias=0, return_coords=True)
    changed = 0
    for draw in range(3):
        item = ds[(2, draw)]
        image, labels, coords = item["image"][0], item["labels"][0], item["coords"]
        # coords are where the sample was read: da.sample of the source at coords reproduces it
        resampled = da.sample(subjects[2][0][None, None], coords[None], "zeros")[0, 0]
        assert torch.allclose(resampled, image, atol=1e-5)
        # nearest labels agree with the interpolated intensities away from edges
        expected = torch.tensor([0.0, 0.5, 1.0])[labels]
        assert float(((image - expected).abs() < 0.25).float().mean()) > 0.9
        identity = da.identity_coords(coords.shape[1:])[0]
        changed += int(not torch.allclose(coords - coords.mean((1, 2, 3), keepdim=True),
                                          identity * identity.new_tensor([13 / 19, 13 / 21, 13 / 17]).view(3, 1, 1, 1),
                                          atol=1e-3))
    assert changed == 3  # every draw was rotated / scaled


def test_intensity_augmentation_changes_values_but_stays_near_unit_range():
    subjects = _subjects()
    base = ImageDataset([s[0] for s in subjects], (12, 12, 12), normalize=None, rotation=0, scale=0, translate=0,
                        gamma=0, contrast=0, shift=0, noise=0, bias=0)
    aug = ImageDataset([s[0] for s in subjects], (12, 12, 12), normalize=None, rotation=0, scale=0, translate=0)
    diffs = []
    for draw in range(4):
        a, b = base[(0, draw)]["image"], aug[(0, draw)]["image"]
        diffs.append(float((a - b).abs().mean()))
        assert -0.3 < float(b.min()) and float(b.max()) < 1.6
    assert min(diffs) > 1e-3


@pytest.mark.parametrize("translate", [0.0, 0.2])
def test_translation_augmentation_moves_the_anatomy_within_the_crop(translate):
    subjects = _subjects()
    crop = (24, 24, 24)  # centred crops (random_crop=False): without translation the body sits at one place
    ds = ImageDataset([s[0] for s in subjects], crop, normalize=None, random_crop=False, rotation=0, scale=0, translate=translate,
                      gamma=0, contrast=0, shift=0, noise=0, bias=0, return_coords=True)
    offsets = []
    for draw in range(6):
        item = ds[(1, draw)]
        coords, image = item["coords"], item["image"][0]
        assert torch.allclose(da.sample(subjects[1][0][None, None], coords[None], "zeros")[0, 0], image, atol=1e-5)
        # a pure shift: coords - identity (in source voxels) is one constant per axis
        half = torch.tensor([(n - 1) / 2 for n in subjects[1][0].shape]).view(3, 1, 1, 1)
        index = (coords + 1) * half
        step = index[:, 1:, 1:, 1:] - index[:, :-1, :-1, :-1]
        assert torch.allclose(step, torch.ones_like(step), atol=1e-4)
        offsets.append(index[:, 0, 0, 0])
    offsets = torch.stack(offsets)
    centred = offsets - offsets.mean(0)
    if translate == 0:
        assert float(centred.abs().max()) < 1e-4
    else:
        assert float(centred.abs().max()) > 1.0  # the body moved by voxels between draws
        assert float((offsets - offsets[0]).abs().max()) <= 2 * translate * crop[0] + 1e-4


def test_normalisation_and_volume_inputs():
    hu = torch.full((16, 16, 16), -1000.0)
    hu[4:12, 4:12, 4:12] = 40.0
    vol = volume_from_array(hu, np.eye(4))
    ds = ImageDataset([vol, hu.numpy(), hu[None]], None, augment=False)
    assert torch.allclose(ds.volumes[0], normalize_intensity(hu, "ct"))
    assert torch.equal(ds.volumes[0], ds.volumes[1]) and torch.equal(ds.volumes[0], ds.volumes[2])
    item = ds[(0, 0)]
    assert item["image"].shape == (1, 16, 16, 16)
    assert torch.allclose(item["image"][0], ds.volumes[0])


def test_crop_larger_than_volume_is_zero_padded():
    small = torch.rand(6, 7, 8) * 0.5 + 0.5
    ds = ImageDataset([small, small], (10, 10, 10), augment=False, normalize=None)
    item = ds[(0, 0)]["image"][0]
    assert item.shape == (10, 10, 10)
    assert float(item.sum()) == pytest.approx(float(small.sum()), rel=1e-5)  # every voxel kept once
    assert float((item == 0).float().mean()) > 0.5


def test_pair_batches_have_distinct_subjects_and_match_the_dataloader():
    subjects = _subjects(4)
    ds = ImageDataset([s[0] for s in subjects], (8, 8, 8), seed=1)
    for step in range(6):
        keys = pair_keys(step, 4, 2, seed=1)
        assert len({s for s, _ in keys}) == 2
        batch = ds.batch(step)
        assert batch["image"].shape == (2, 1, 8, 8, 8) and batch["index"].dtype == torch.int64
        assert batch["index"].tolist() == [s for s, _ in keys]
    assert torch.equal(ds.batch(3)["image"], ds.batch(3)["image"])
    # DDP ranks get different batches; steps differ
    assert not torch.equal(ds.batch(0, rank=0, world_size=2)["image"], ds.batch(0, rank=1, world_size=2)["image"])
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PairBatchSampler(4, 2, seed=1, start_step=2, num_steps=3),
                                         collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 3
    for i, batch in enumerate(batches):  # resuming at step 2 replays exactly steps 2, 3, 4
        expected = ds.batch(2 + i)
        assert torch.equal(batch["image"], expected["image"]) and torch.equal(batch["index"], expected["index"])
    # the default DataLoader collate works too
    default = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=PairBatchSampler(4, 2, seed=1, num_steps=1))))
    assert torch.equal(default["image"], ds.batch(0)["image"])
    # all subjects get drawn over a few steps
    seen = {s for step in range(20) for s, _ in pair_keys(step, 4, 2, seed=1)}
    assert seen == {0, 1, 2, 3}


def test_bad_inputs():
    good = torch.rand(8, 8, 8)
    with pytest.raises(ValueError, match="volumes is empty"):
        ImageDataset([], (4, 4, 4))
    with pytest.raises(TypeError, match="volumes must be a list"):
        ImageDataset(good, (4, 4, 4))
    with pytest.raises(ValueError, match=r"volumes\[1\].*2-D"):
        ImageDataset([good, torch.rand(8, 8, 1)], (4, 4, 4))
    with pytest.raises(ValueError, match=r"volumes\[0\] must be a 3-D volume"):
        ImageDataset([torch.rand(8, 8)], (4, 4, 4))
    with pytest.raises(ValueError, match=r"volumes\[0\] has non-finite"):
        ImageDataset([torch.full((4, 4, 4), float("nan"))], (4, 4, 4))
    with pytest.raises(ValueError, match="crop_shape"):
        ImageDataset([good], (4, 4))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset([good], (4, 4, 4), labels=[torch.zeros(7, 8, 8, dtype=torch.int64)])
    with pytest.raises(ValueError, match="normalize"):
        ImageDataset([good], (4, 4, 4), normalize="pet")
    with pytest.raises(ValueError, match="rotation"):
        ImageDataset([good], (4, 4, 4), rotation=-1)
    single = ImageDataset([good], (4, 4, 4))
    with pytest.raises(ValueError, match="at least 2 volumes"):
        single.batch(0)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        PairBatchSampler(1)
    with pytest.raises(ValueError, match="rank"):
        pair_keys(0, 4, 2, rank=2, world_size=2)
    uneven = ImageDataset([good, torch.rand(9, 8, 8)], None, augment=False)
    with pytest.raises(ValueError, match="crop_shape"):
        uneven.batch(0)


@pytest.mark.parametrize("augment, crop", [(True, (12, 14, 10)), (False, (12, 14, 10)), (False, (24, 30, 22))])
def test_crops_carry_the_whole_volume_frame_composed_with_their_geometry(augment, crop):
    from deepatlas_fast.frame import apply_frame, moment_frame

    volumes = [image for image, _ in _subjects(2, (20, 26, 18))]
    ds = ImageDataset(volumes, crop_shape=crop, augment=augment, normalize=None, return_coords=True,
                      whole_frames=True, seed=3)
    for key in range(4):
        item = ds[(key % 2, key)]
        whole = moment_frame(ds.volumes[key % 2][None, None])
        # a crop voxel gets the coordinate the whole volume's frame gives the point it was read from
        expected = apply_frame(whole, item["coords"][None].double())
        got = apply_frame(item["frame"][None], da.identity_coords(crop))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert collate([ds[0], ds[1]])["frame"].shape == (2, 3, 4)
    assert "frame" not in ImageDataset(volumes, crop_shape=crop, normalize=None)[0]
