"""SynthSeg-style image synthesis from label maps (used with ``../shared/data/brain_labelmaps``).

For a label map: every label is mapped to an intensity class (``generation_labels.npy`` ->
``generation_classes_contrast_specific.npy``); per class a mean ~ N(prior_means[0,k], prior_means[1,k])
and a std ~ N(prior_stds[0,k], prior_stds[1,k]) are drawn; each voxel gets a Gaussian sample of its class;
the image is smoothed (partial volume), multiplied by a smooth log-normal bias field, given extra
noise, and normalised to [0, 1] (0.5 / 99.5 percentiles). Deterministic for a ``torch.Generator``.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .io import Volume, gaussian_smooth, load_labels, normalize_intensity

__all__ = [
    "BrainPriors",
    "load_brain_priors",
    "load_brain_subject",
    "brain_subject_paths",
    "brain_eval_labels",
    "read_labels_table",
    "synthesize_image",
]

_PRIOR_FILES = (
    "generation_labels.npy",
    "generation_classes_contrast_specific.npy",
    "prior_means_t1.npy",
    "prior_stds_t1.npy",
)


@dataclass
class BrainPriors:
    """Intensity priors of a SynthSeg-style generator.

    Attributes:
        generation_labels: int64 ``[L]`` label ids known to the generator.
        generation_classes: int64 ``[L]`` intensity class of each of those labels.
        prior_means: float64 ``[2, K]``: (mean, std) of the class mean intensity, per class.
        prior_stds: float64 ``[2, K]``: (mean, std) of the class intensity std, per class.
        eval_labels: label ids to evaluate on (brain structures of ``labels_table.txt``, 0 excluded).
        label_names: id -> structure name for the evaluation labels.
    """

    generation_labels: np.ndarray
    generation_classes: np.ndarray
    prior_means: np.ndarray
    prior_stds: np.ndarray
    eval_labels: list
    label_names: dict

    @property
    def num_classes(self) -> int:
        return int(self.prior_means.shape[1])

    def lookup(self, max_label: int) -> Tensor:
        """int64 table ``[max_label + 1]``: label id -> class (unknown ids -> class 0, background)."""
        table = torch.zeros(max(int(max_label), int(self.generation_labels.max())) + 1, dtype=torch.int64)
        table[torch.from_numpy(self.generation_labels.astype(np.int64))] = torch.from_numpy(
            self.generation_classes.astype(np.int64)
        )
        return table


def read_labels_table(path) -> dict:
    """Parse a SynthSeg ``labels_table.txt`` (lines ``<id>  <name>``) -> ``{id: name}`` in file order."""
    path = os.fspath(path)
    names = {}
    try:
        with open(path) as f:
            for line in f:
                m = re.match(r"^\s*(\d+)\s+(\S.*?)\s*$", line)
                if m:
                    names[int(m.group(1))] = m.group(2)
    except OSError as e:
        raise ValueError(f"path {path!r}: cannot read the labels table ({e})") from None
    if not names:
        raise ValueError(f"path {path!r}: no '<id> <name>' lines found in the labels table")
    return names


def load_brain_priors(folder) -> BrainPriors:
    """Load the generation labels, classes and T1 priors (and evaluation labels) from ``folder``.

    Expects ``generation_labels.npy``, ``generation_classes_contrast_specific.npy``,
    ``prior_means_t1.npy``, ``prior_stds_t1.npy`` and ``labels_table.txt``.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r}: no such directory")
    arrays = []
    for name in _PRIOR_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"folder {folder!r}: missing {name}")
        try:
            arrays.append(np.load(path))
        except Exception as e:
            raise ValueError(f"path {path!r}: cannot read ({type(e).__name__}: {e})") from None
    labels, classes, means, stds = arrays
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    means = np.asarray(means, dtype=np.float64)
    stds = np.asarray(stds, dtype=np.float64)
    if labels.shape != classes.shape:
        raise ValueError(f"folder {folder!r}: {labels.size} generation labels but {classes.size} classes")
    if means.ndim != 2 or means.shape[0] != 2 or stds.shape != means.shape:
        raise ValueError(f"folder {folder!r}: priors must be [2, K], got {means.shape} and {stds.shape}")
    if classes.min() < 0 or classes.max() >= means.shape[1]:
        raise ValueError(f"folder {folder!r}: classes must lie in [0, {means.shape[1]}), got [{classes.min()}, {classes.max()}]")
    table_path = os.path.join(folder, "labels_table.txt")
    names = read_labels_table(table_path) if os.path.exists(table_path) else {}
    eval_labels = [k for k in names if k != 0]
    return BrainPriors(labels, classes, means, stds, eval_labels, {k: names[k] for k in eval_labels})


def brain_eval_labels(folder) -> list:
    """Evaluation label ids (brain structures, 0 excluded) of ``folder/labels_table.txt``, in file order."""
    return [k for k in read_labels_table(os.path.join(os.fspath(folder), "labels_table.txt")) if k != 0]


def brain_subject_paths(folder) -> list:
    """Sorted ``subject_*.nii.gz`` label maps in ``folder`` (ValueError when there are none)."""
    folder = os.fspath(folder)
    paths = sorted(glob.glob(os.path.join(folder, "subject_*.nii*")))
    if not paths:
        raise ValueError(f"folder {folder!r}: no subject_*.nii.gz label maps")
    return paths


def load_brain_subject(path, spacing=2.0, *, crop: bool = False, margin: int = 2) -> Volume:
    """Load a brain label map, canonical RAS+, resampled (nearest) to ``spacing`` mm (default 2).

    Args:
        crop: crop to the bounding box of the non-zero labels plus ``margin`` voxels (the geometry
            keeps track, so :func:`~deepatlas_fast.data.io.save_like` still writes on the 1 mm grid).
    Returns: a :class:`~deepatlas_fast.data.io.Volume` with int64 labels ``[D, H, W]``.
    """
    from .io import crop_to_foreground

    volume = load_labels(path, spacing=spacing)
    if crop:
        volume = crop_to_foreground(volume, volume.data > 0, margin=margin)
    return volume


def _draw(generator, shape, dtype=torch.float64) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype)


def _uniform(generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64))


def synthesize_image(
    labels,
    priors: BrainPriors,
    generator: Optional[torch.Generator] = None,
    *,
    blur: Sequence[float] = (0.3, 0.8),
    bias_std: float = 0.3,
    bias_control: int = 4,
    noise: float = 0.02,
    normalize: bool = True,
) -> Tensor:
    """Synthesise an MR-like image from a label map.

    Args:
        labels: int ``[D, H, W]`` tensor/array or a label :class:`Volume`; ids missing from
            ``priors.generation_labels`` use class 0 (background).
        priors: :func:`load_brain_priors` output.
        generator: CPU ``torch.Generator`` (same state -> same image); default a fresh one seeded 0.
        blur: range of the smoothing sigma in voxels, drawn uniformly per image (default 0.3-0.8).
        bias_std: max std of the log bias field (drawn uniformly in [0, bias_std]; default 0.3).
        bias_control: control points per axis of the bias field (default 4: very smooth).
        noise: max std of extra Gaussian noise after normalisation-scale (fraction of the 99.5th
            percentile, drawn in [0, noise]; default 0.02).
        normalize: map to [0, 1] with the 0.5 / 99.5 percentiles (default True); else T1-like scale.
    Returns: float32 ``[D, H, W]`` image.
    """
    if isinstance(labels, Volume):
        labels = labels.data
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    if not isinstance(labels, Tensor) or labels.dim() != 3:
        raise ValueError(f"labels must be a [D, H, W] tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer ids, got dtype {labels.dtype}")
    if not isinstance(priors, BrainPriors):
        raise TypeError(f"priors must be a BrainPriors (load_brain_priors), got {type(priors).__name__}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    labels = labels.cpu().long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative ids")
    lo_b, hi_b = (float(b) for b in blur)
    if not 0 <= lo_b <= hi_b:
        raise ValueError(f"blur must be (low, high) sigmas with 0 <= low <= high, got {tuple(blur)}")
    classes = priors.lookup(int(labels.max()) if labels.numel() else 0)[labels]
    k = priors.num_classes
    pm = torch.from_numpy(priors.prior_means)
    ps = torch.from_numpy(priors.prior_stds)
    means = (pm[0] + pm[1] * _draw(generator, (k,))).clamp(min=0.0)
    stds = (ps[0] + ps[1] * _draw(generator, (k,))).abs()
    image = means[classes].to(torch.float32) + stds[classes].to(torch.float32) * _draw(
        generator, labels.shape, torch.float32
    )
    image = image.clamp_(min=0.0)
    sigma = _uniform(generator, lo_b, hi_b)
    if sigma > 0:
        image = gaussian_smooth(image, sigma)
    b = _uniform(generator, 0.0, bias_std)
    coarse = b * _draw(generator, (1, 1, bias_control, bias_control, bias_control), torch.float32)
    bias = torch.exp(F.interpolate(coarse, size=tuple(labels.shape), mode="trilinear", align_corners=True)[0, 0])
    image = image * bias
    scale = float(torch.quantile(image.reshape(-1)[:: max(1, image.numel() // 1_000_000)], 0.995)) or 1.0
    sd = _uniform(generator, 0.0, noise) * scale
    if sd > 0:
        image = image + sd * _draw(generator, labels.shape, torch.float32)
    image = image.clamp_(min=0.0)
    if normalize:
        image = normalize_intensity(image, "mr")
    return image.contiguous()
