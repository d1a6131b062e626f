"""Training samples: random crops with intensity and spatial augmentation, batches of distinct subjects.

Every random draw comes from a generator seeded by ``(seed, subject, draw)``, so a sample is a pure
function of its key: the same in every DataLoader worker layout, and a resumed run (same step) sees
exactly the batches it would have seen. Two ways to get batches:

* ``dataset.batch(step, batch_size=2, rank=0, world_size=1)``: the batch of a training step (distinct
  subjects; each DDP rank gets its own); simplest for a step-indexed loop.
* ``DataLoader(dataset, batch_sampler=PairBatchSampler(len(dataset.volumes), ...))``: the same batches
  through a DataLoader (workers, pinning); ``start_step`` resumes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .io import Volume, foreground_mask, normalize_intensity

__all__ = ["ImageDataset", "PairBatchSampler", "pair_keys", "collate"]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % (1 << 64) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _shape3(shape, name: str) -> tuple:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name} must be 3 ints (D, H, W), got {shape!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"{name} must be 3 positive sizes (D, H, W), got {tuple(shape)}")
    return dims


def _as_volume_tensor(item, name: str, labels: bool = False) -> Tensor:
    if isinstance(item, Volume):
        item = item.data
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, Tensor):
        raise TypeError(f"{name} must be a Volume, torch.Tensor or numpy array, got {type(item).__name__}")
    if item.dim() == 4 and item.shape[0] == 1:
        item = item[0]
    if item.dim() != 3:
        raise ValueError(f"{name} must be a 3-D volume [D, H, W] (or [1, D, H, W]), got shape {tuple(item.shape)}")
    if min(item.shape) < 2:
        raise ValueError(f"{name} is a 2-D image (shape {tuple(item.shape)}); a 3-D volume is needed")
    if labels:
        if item.is_floating_point():
            raise TypeError(f"{name} must hold integer label ids, got dtype {item.dtype}")
        return item.detach().cpu().long().contiguous()
    item = item.detach().cpu().to(torch.float32).contiguous()
    if not bool(torch.isfinite(item).all()):
        raise ValueError(f"{name} has non-finite values")
    return item


def pair_keys(step: int, n: int, batch_size: int = 2, seed: int = 0, rank: int = 0, world_size: int = 1) -> list:
    """Sample keys ``[(subject, draw), ...]`` of training step ``step`` on DDP ``rank``.

    ``batch_size`` distinct subjects out of ``n`` (uniform, without replacement), ``draw`` unique per
    (step, rank). Pure function of its arguments.
    """
    if n < batch_size:
        raise ValueError(f"a batch of {batch_size} distinct subjects needs at least {batch_size} volumes, got {n}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    draw = int(step) * int(world_size) + int(rank)
    g = torch.Generator().manual_seed(_seed(seed, 0x9A1E, draw))
    subjects = torch.randperm(n, generator=g)[:batch_size].tolist()
    return [(s, draw) for s in subjects]


def collate(items: Sequence[dict]) -> dict:
    """Stack sample dicts: tensors -> ``[B, ...]``, ints -> int64 ``[B]``."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch {key!r} of different shapes {sorted(shapes)}: give the dataset a crop_shape"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = torch.as_tensor(values)
    return out


class ImageDataset(torch.utils.data.Dataset):
    """Random crops of 3D images with augmentation, as dicts ``{"image": [1, d, h, w], "index": i}``.

    Args:
        volumes: images: :class:`~deepatlas_fast.data.io.Volume` objects or ``[D, H, W]`` tensors/arrays
            (at least 1; pairs need 2). Kept in memory as float32.
        crop_shape: ``(d, h, w)`` of every sample; None = whole volumes (all must share a shape to batch).
            Volumes smaller than the crop are zero padded.
        augment: intensity + spatial augmentation (default True).
        seed: base seed of every random draw (default 0).
        labels: optional label maps (int, same shapes as ``volumes``), cropped/transformed alongside
            (nearest) and returned as ``"labels"`` ``[1, d, h, w]`` int64.
        normalize: "auto" | "ct" | "mr" applies :func:`~deepatlas_fast.data.io.normalize_intensity`
            once at construction (default "auto"); None keeps intensities (already in [0, 1]).
        random_crop: crops centred on random foreground voxels (default True; foreground from
            :func:`~deepatlas_fast.data.io.foreground_mask`); False: centred on the foreground box.
        rotation: max rotation per axis in degrees (default 10); scale: max relative zoom (default 0.1);
            both in voxel space, around the crop centre; translate: max shift of the crop centre per axis
            as a fraction of the crop side (default 0.1), so that the anatomy sits at different places in
            the crop as it does in exams with different fields of view, and the network learns coordinates
            that follow the anatomy rather than the grid (spatial augmentation, ``augment=True`` only).
        gamma: std of log-gamma (default 0.3); contrast: max relative contrast change (0.1); shift: max
            brightness shift (0.05); noise: max Gaussian noise std (0.03); bias: max std of a smooth log
            bias field (0.1). Intensity augmentation, ``augment=True`` only.
        samples_per_epoch: ``len(dataset)`` (default: the number of volumes).
        return_coords: also return ``"coords"`` ``[3, d, h, w]``: where each sample voxel was read in
            its source volume, normalised [-1, 1] (align_corners=True; D, H, W channel order).
        whole_frames: also return ``"frame"`` ``[3, 4]``: the frame of the whole source volume (True: the
            "moments" frame, :func:`~deepatlas_fast.frame.moment_frame`; or a function ``[N, 1, D, H, W]
            -> [N, 3, 4]`` such as a CoordNet's ``frame_of``; computed once, see :meth:`set_whole_frames`)
            composed with the crop's own geometry (offset, rotation, zoom), so a crop is placed in the
            template as the whole exam places that anatomy, not by its own content.
    Item ``key``: an int (subject ``key % n``, draw from :meth:`set_epoch`) or ``(subject, draw)``.
    """

    def __init__(
        self,
        volumes: Sequence[Union[Volume, Tensor, np.ndarray]],
        crop_shape: Optional[Sequence[int]] = None,
        augment: bool = True,
        seed: int = 0,
        *,
        labels: Optional[Sequence] = None,
        normalize: Optional[str] = "auto",
        random_crop: bool = True,
        rotation: float = 10.0,
        scale: float = 0.1,
        translate: float = 0.1,
        gamma: float = 0.3,
        contrast: float = 0.1,
        shift: float = 0.05,
        noise: float = 0.03,
        bias: float = 0.1,
        samples_per_epoch: Optional[int] = None,
        return_coords: bool = False,
        whole_frames=False,
    ):
        if isinstance(volumes, (Tensor, np.ndarray, Volume)) or not hasattr(volumes, "__len__"):
            raise TypeError("volumes must be a list of Volume objects or [D, H, W] tensors")
        if len(volumes) == 0:
            raise ValueError("volumes is empty: at least one image is needed")
        if normalize not in (None, "auto", "ct", "mr"):
            raise ValueError(f"normalize must be None, 'auto', 'ct' or 'mr', got {normalize!r}")
        images = []
        for i, v in enumerate(volumes):
            x = _as_volume_tensor(v, f"volumes[{i}]")
            if normalize is not None:
                x = normalize_intensity(x, normalize)
            images.append(x)
        self.volumes = images
        if labels is not None:
            if len(labels) != len(images):
                raise ValueError(f"labels must have one map per volume ({len(images)}), got {len(labels)}")
            maps = []
            for i, (lab, img) in enumerate(zip(labels, images)):
                lab = _as_volume_tensor(lab, f"labels[{i}]", labels=True)
                if lab.shape != img.shape:
                    raise ValueError(f"labels[{i}] has shape {tuple(lab.shape)}, volumes[{i}] has {tuple(img.shape)}")
                maps.append(lab)
            self.labels = maps
        else:
            self.labels = None
        self.crop_shape = None if crop_shape is None else _shape3(crop_shape, "crop_shape")
        for name, value in (("rotation", rotation), ("scale", scale), ("translate", translate), ("gamma", gamma), ("contrast", contrast),
                            ("shift", shift), ("noise", noise), ("bias", bias)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if scale >= 1 or contrast >= 1:
            raise ValueError(f"scale and contrast must be < 1, got scale={scale}, contrast={contrast}")
        self.augment = bool(augment)
        self.seed = int(seed)
        self.random_crop = bool(random_crop)
        self.rotation, self.scale, self.translate = float(rotation), float(scale), float(translate)
        self.gamma, self.contrast, self.shift = float(gamma), float(contrast), float(shift)
        self.noise, self.bias = float(noise), float(bias)
        self.samples_per_epoch = len(images) if samples_per_epoch is None else int(samples_per_epoch)
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.return_coords = bool(return_coords)
        self.frames = None
        if whole_frames:
            self.set_whole_frames(None if whole_frames is True else whole_frames)
        self.epoch = 0
        # foreground masks and boxes (random crop centres are foreground voxels)
        self.masks, self.boxes = [], []
        for x in images:
            mask = foreground_mask(x)
            idx = torch.nonzero(mask)
            if idx.numel() == 0:
                mask = torch.ones_like(mask)
                lo, hi = [0, 0, 0], [s - 1 for s in x.shape]
            else:
                lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
            self.masks.append(mask)
            self.boxes.append((lo, hi))

    # ------------------------------------------------------------------ sampling API
    @torch.no_grad()
    def set_whole_frames(self, frame_of=None) -> None:
        """(Re)compute each source volume's frame with ``frame_of`` (``[N, 1, D, H, W] -> [N, 3, 4]``, called
        once per group of volumes of one shape; default :func:`~deepatlas_fast.frame.moment_frame`); items then
        carry ``"frame"``."""
        from ..frame import moment_frame, shape_groups

        frame_of = frame_of or moment_frame
        frames = [None] * len(self.volumes)
        for members in shape_groups(self.volumes):
            batch = frame_of(torch.stack([self.volumes[i] for i in members])[:, None]).float().cpu()
            for k, i in enumerate(members):
                frames[i] = batch[k]
        self.frames = frames

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops/augmentations for integer keys (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            subject, draw = int(key[0]), int(key[1])
        else:
            key = int(key)
            if not 0 <= key < len(self):
                raise IndexError(f"index {key} out of range for a dataset of length {len(self)}")
            subject, draw = key % len(self.volumes), self.epoch * len(self) + key
        if not 0 <= subject < len(self.volumes):
            raise IndexError(f"subject {subject} out of range for {len(self.volumes)} volumes")
        return self.sample(subject, draw)

    def batch(self, step: int, batch_size: int = 2, rank: int = 0, world_size: int = 1) -> dict:
        """The batch of training step ``step`` on ``rank``: ``batch_size`` distinct subjects, collated:
        ``{"image": [B, 1, d, h, w], "index": int64 [B], ...}``."""
        keys = pair_keys(step, len(self.volumes), batch_size, self.seed, rank, world_size)
        return collate([self.sample(s, d) for s, d in keys])

    def sample(self, subject: int, draw: int) -> dict:
        """One sample of ``subject`` for random draw ``draw`` (deterministic)."""
        g = torch.Generator().manual_seed(_seed(self.seed, subject, draw))
        x = self.volumes[subject]
        lab = self.labels[subject] if self.labels is not None else None
        out_shape = self.crop_shape or tuple(x.shape)
        centre = self._centre(subject, out_shape, g)
        if self.augment and (self.rotation > 0 or self.scale > 0):
            matrix = self._random_matrix(g)
        else:
            matrix = None
        image, labels, coords = self._extract(x, lab, centre, out_shape, matrix)
        if self.augment:
            image = self._intensity(image, g)
        item = {"image": image[None], "index": subject}
        if self.frames is not None:
            item["frame"] = _crop_frame(self.frames[subject], centre, out_shape, matrix, x.shape)
        if labels is not None:
            item["labels"] = labels[None]
        if self.return_coords:
            item["coords"] = coords
        return item

    # ------------------------------------------------------------------ internals
    def _centre(self, subject: int, out_shape, g: torch.Generator) -> list:
        """Crop centre (voxel index, float).

        Random crops: a random foreground voxel (rejection sampling in the foreground box), shifted so
        the crop stays inside the volume; along an axis where the crop is larger than the volume, the
        crop holds the whole extent (zero padded) at a random offset. Otherwise the foreground box centre.
        """
        shape = self.volumes[subject].shape
        lo, hi = self.boxes[subject]
        mask = self.masks[subject]
        if self.random_crop:
            point = None
            for _ in range(32):
                cand = [lo[a] + int(torch.randint(hi[a] - lo[a] + 1, (), generator=g)) for a in range(3)]
                if bool(mask[cand[0], cand[1], cand[2]]):
                    point = cand
                    break
            if point is None:
                point = [(lo[a] + hi[a]) / 2.0 for a in range(3)]
        else:
            point = [(lo[a] + hi[a]) / 2.0 for a in range(3)]
        centre = []
        for a in range(3):
            half = (out_shape[a] - 1) / 2.0
            if out_shape[a] >= shape[a]:
                c_lo, c_hi = shape[a] - 1 - half, half  # c_lo <= c_hi: the whole extent fits in the crop
                if self.random_crop:
                    c = c_lo + (c_hi - c_lo) * float(torch.rand((), generator=g, dtype=torch.float64))
                else:
                    c = (shape[a] - 1) / 2.0
            else:
                c = min(max(float(point[a]), half), shape[a] - 1 - half)
            if self.augment and self.translate > 0:
                # the anatomy moves within the crop (as fields of view differ between exams)
                c += self.translate * out_shape[a] * (2.0 * float(torch.rand((), generator=g, dtype=torch.float64)) - 1.0)
            if not self.augment:
                # integer crops when not resampling: exact voxel values
                c = math.floor(c - half + 0.5) + half
            centre.append(c)
        return centre

    def _random_matrix(self, g: torch.Generator) -> Tensor:
        def u(lo, hi):
            return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

        angles = [math.radians(u(-self.rotation, self.rotation)) for _ in range(3)]
        zoom = [u(1.0 - self.scale, 1.0 + self.scale) for _ in range(3)]
        m = torch.eye(3, dtype=torch.float64)
        for axis, angle in enumerate(angles):
            i, j = [k for k in range(3) if k != axis]
            r = torch.eye(3, dtype=torch.float64)
            c, s = math.cos(angle), math.sin(angle)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            m = r @ m
        return m @ torch.diag(torch.tensor(zoom, dtype=torch.float64))

    def _extract(self, x: Tensor, lab: Optional[Tensor], centre, out_shape, matrix: Optional[Tensor]):
        shape = x.shape
        if matrix is None and all(abs(c - (o - 1) / 2.0 - round(c - (o - 1) / 2.0)) < 1e-9 for c, o in zip(centre, out_shape)):
            # integer crop (with zero padding outside)
            start = [int(round(c - (o - 1) / 2.0)) for c, o in zip(centre, out_shape)]
            image = _crop_pad(x, start, out_shape)
            labels = _crop_pad(lab, start, out_shape) if lab is not None else None
            coords = None
            if self.return_coords:
                axes = [
                    (torch.arange(o, dtype=torch.float64) + s) * (2.0 / max(n - 1, 1)) - (1.0 if n > 1 else 0.0)
                    for o, s, n in zip(out_shape, start, shape)
                ]
                coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).to(torch.float32)
            return image, labels, coords
        # voxel positions p = centre + M q, q = crop offsets from the crop centre
        axes = [torch.arange(o, dtype=torch.float64) - (o - 1) / 2.0 for o in out_shape]
        q = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)
        m = matrix if matrix is not None else torch.eye(3, dtype=torch.float64)
        p = m @ q + torch.tensor(centre, dtype=torch.float64)[:, None]
        half = torch.tensor([(n - 1) / 2.0 if n > 1 else 1.0 for n in shape], dtype=torch.float64)[:, None]
        coords = (p / half - 1.0).to(torch.float32).reshape(1, 3, *out_shape)
        grid = coords.permute(0, 2, 3, 4, 1).flip(-1)  # == deepatlas_fast.to_grid
        # F.grid_sample has da.sample's semantics (align_corners=True) and is the fastest CPU sampler
        image = F.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        labels = None
        if lab is not None:
            labels = F.grid_sample(
                lab[None, None].to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=True
            )[0, 0].round().long()
        return image.contiguous(), labels, coords[0] if self.return_coords else None

    def _intensity(self, image: Tensor, g: torch.Generator) -> Tensor:
        def u(lo, hi):
            return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

        if self.bias > 0:
            coarse = u(0, self.bias) * torch.randn((1, 1, 3, 3, 3), generator=g)
            field = F.interpolate(coarse, size=tuple(image.shape), mode="trilinear", align_corners=True)[0, 0]
            image = image * torch.exp(field)
        if self.gamma > 0:
            gamma = math.exp(max(-2.5, min(2.5, float(torch.randn((), generator=g)))) * self.gamma)
            image = image.clamp(min=0.0).pow(gamma)
        image = image * u(1 - self.contrast, 1 + self.contrast) + u(-self.shift, self.shift)
        if self.noise > 0:
            image = image + u(0, self.noise) * torch.randn(image.shape, generator=g)
        return image.contiguous()


def _crop_frame(frame: Tensor, centre, out_shape, matrix: Optional[Tensor], shape) -> Tensor:
    """A whole volume's frame ``[3, 4]`` composed with a crop's geometry: the crop's normalised position
    ``q`` is the volume's normalised position ``A q + b`` (voxel ``p = centre + M (q * (o - 1) / 2)``),
    so the crop's frame is ``[L A | L b + t]``."""
    m = matrix if matrix is not None else torch.eye(3, dtype=torch.float64)
    half = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64)
    inverse = torch.where(half > 0, 1.0 / half.clamp_min(1e-30), torch.zeros_like(half))
    crop_half = torch.tensor([(o - 1) / 2.0 for o in out_shape], dtype=torch.float64)
    linear = inverse[:, None] * m * crop_half[None, :]
    offset = torch.tensor(centre, dtype=torch.float64) * inverse - (half > 0).to(torch.float64)
    outer = frame.to(torch.float64)
    return torch.cat([outer[:, :3] @ linear, (outer[:, :3] @ offset + outer[:, 3])[:, None]], dim=1).float()


def _crop_pad(x: Tensor, start, out_shape) -> Tensor:
    out = x.new_zeros(tuple(out_shape))
    src, dst = [], []
    for s, o, n in zip(start, out_shape, x.shape):
        a, b = max(s, 0), min(s + o, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = x[tuple(src)]
    return out


class PairBatchSampler(torch.utils.data.Sampler):
    """Batch sampler of ``(subject, draw)`` keys: ``batch_size`` distinct subjects per step.

    ``DataLoader(dataset, batch_sampler=PairBatchSampler(n, ...), collate_fn=collate)`` yields exactly
    ``dataset.batch(step, ...)`` for ``step = start_step, start_step + 1, ...`` (``num_steps`` of them;
    None: endless). ``rank`` / ``world_size``: DDP process and process count.
    """

    def __init__(
        self,
        n: int,
        batch_size: int = 2,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_steps: Optional[int] = None,
    ):
        if n < batch_size:
            raise ValueError(f"a batch of {batch_size} distinct subjects needs at least {batch_size} volumes, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_step = int(start_step)
        self.num_steps = None if num_steps is None else int(num_steps)

    def __iter__(self):
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield pair_keys(step, self.n, self.batch_size, self.seed, self.rank, self.world_size)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless PairBatchSampler has no length (give num_steps)")
        return self.num_steps
