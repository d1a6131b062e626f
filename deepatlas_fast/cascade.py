"""Cascade segmentation: a coarse pass on the whole exam, then fine passes on crops (``segment --cascade``).

Running the network on a whole exam at the model's spacing is what memory limits first on a large field
of view (the U-Net's activations scale with the grid). The cascade runs it there only on crops:

1. **Coarse pass**: the exam, on its network grid (the model's spacing) and normalised as for
   :func:`~deepatlas_fast.segment.segment`, is downsampled to ``coarse_spacing`` (default twice the
   model's spacing); the network maps it to coordinates and the references' labels are read there.
2. **Crops**: for each requested structure, the box of the coarse voxels labelled with it (each coarse
   voxel counted with its physical extent) on the network grid, grown by ``margin_mm`` (default two
   coarse voxels) and to at least the crop shape the network was trained on (:func:`min_crop_shape`: a
   smaller field of view than it ever saw changes its coordinates); without ``structures``, one box
   around every labelled coarse voxel.
3. **Fine passes**: the network runs on each crop at the model's spacing, its maps from level
   :func:`handover_level` up taken from the coarse pass's coordinates interpolated onto the crop
   (``CoordNet(init=..., init_level=...)``): a coarse pass at twice the spacing ran the levels the
   fine pass has from level 1 up, so the fine pass adds its finest refinement only, and the crop's own,
   smaller field of view does not decide where it lies in the template. The labels are read at the
   refined coordinates.
4. **Merge**: label probabilities on the network grid are the fine passes' inside the crops (their mean
   where crops overlap) and the coarse pass's, interpolated, elsewhere; the labels are then brought back
   to the target file's grid exactly as :func:`~deepatlas_fast.segment.segment` does.

A structure the coarse pass does not find in the exam gets no crop (a warning says so); it can still
appear in the output where the coarse pass or another crop labels it.

What limits it: the network's maps are normalised by the grid it sees (identity over the field of view,
regularisers relative to that identity), so a network trained at one spacing maps the coarser grid less
well, and the fine passes cannot undo the coarse pass's errors. With the models trained so far the
cascade is markedly worse than the plain pass (README, Limits); it bounds the network's memory, not its
error. Training at two spacings at once did not fix it (the per-crop regularisers pull against it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .data.io import Volume, _spacing3, original_index, resample_back, resample_to_spacing, volume_from_array
from .locate import label_id
from .model import bound_coords
from .segment import (
    MIN_WEIGHT,
    Exam,
    LabelAtlas,
    _argmax_on_original_grid,
    exam_intensities,
    load_exam,
    model_spacing,
    network_coordinates,
)

__all__ = [
    "MIN_CROP_SIDE",
    "CascadeCrop",
    "CascadeSegmentation",
    "cascade_segment",
    "check_cascade_options",
    "handover_level",
    "min_crop_shape",
    "structure_ids",
]

MIN_CROP_SIDE = 16
"""Smallest crop side (network-grid voxels) whatever the model: below it the U-Net's coarser levels see
too little context."""


@dataclass(frozen=True)
class CascadeCrop:
    """One fine pass: the structure it is for (None: every labelled structure) and its box.

    ``start`` / ``stop`` index the exam's network grid (canonical RAS+ at the model's spacing, stop
    exclusive); ``file_start`` / ``file_stop`` bound the same box on the target file's voxel grid.
    """

    label: Optional[int]
    start: tuple
    stop: tuple
    file_start: tuple
    file_stop: tuple

    @property
    def shape(self) -> tuple:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def slices(self) -> tuple:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))


class CascadeSegmentation(NamedTuple):
    """:class:`~deepatlas_fast.segment.Segmentation` plus what the cascade did."""

    labels: Volume
    """int64 label ids on the target file's grid (as :attr:`Segmentation.labels`)."""
    probability: Volume
    """float32 probability of the written label."""
    crops: list
    """The fine passes run, one :class:`CascadeCrop` each."""
    coarse_spacing: tuple
    """The coarse pass's voxel size in mm."""


def structure_ids(
    structures: Optional[Sequence[Union[int, str]]], atlas: LabelAtlas, names: Optional[Mapping[int, str]] = None
) -> Optional[list]:
    """Label ids of ``structures`` (ids or names of ``names``), each labelled on the references; None stays None."""
    if structures is None:
        return None
    if isinstance(structures, (str, int)):
        structures = [structures]
    known = set(atlas.classes.tolist()) - {0}
    ids = []
    for structure in structures:
        wanted = label_id(structure, names)
        if wanted not in known:
            raise ValueError(
                f"structures: label {wanted} is not labelled on the references (labelled: "
                f"{', '.join(map(str, sorted(known))) or 'none'})"
            )
        if wanted not in ids:
            ids.append(wanted)
    if not ids:
        raise ValueError("structures: give at least one structure, or None for one crop around all of them")
    return ids


def check_cascade_options(
    model, atlas: LabelAtlas, structures=None, names=None, coarse_spacing=None, margin_mm=None
) -> tuple:
    """The checks :func:`cascade_segment` makes before touching a target: ``(structure ids or None, coarse
    spacing, margin per axis in mm)``; a ValueError naming the argument otherwise."""
    wanted = structure_ids(structures, atlas, names)
    coarse = _coarse_spacing(coarse_spacing, model_spacing(model))
    return wanted, coarse, _margin(margin_mm, coarse)


def _coarse_spacing(coarse_spacing, fine: tuple) -> tuple:
    if coarse_spacing is None:
        return tuple(2.0 * s for s in fine)
    coarse = _spacing3(coarse_spacing, "coarse_spacing")
    if any(c < f * (1 - 1e-6) for c, f in zip(coarse, fine)):
        raise ValueError(
            f"coarse_spacing {coarse} mm must not be finer than the model's spacing {fine} mm (the fine passes "
            "run at the model's spacing)"
        )
    return coarse


def _margin(margin_mm, coarse: tuple) -> tuple:
    if margin_mm is None:
        return tuple(2.0 * c for c in coarse)
    if isinstance(margin_mm, bool) or not isinstance(margin_mm, (int, float)) or not margin_mm >= 0:
        raise ValueError(f"margin_mm must be a number >= 0, got {margin_mm!r}")
    return (float(margin_mm),) * 3


def min_crop_shape(model) -> tuple:
    """The smallest crop, per axis: the crop shape the network was trained on (``preprocessing["size"]``,
    its field of view in training), at least :data:`MIN_CROP_SIDE`."""
    size = (getattr(model, "preprocessing", None) or {}).get("size")
    if not size:
        return (MIN_CROP_SIDE,) * 3
    size = [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)] * 3
    return tuple(max(MIN_CROP_SIDE, s) for s in size)


def _box(mask: Tensor, zoom: Sequence[float], margin_voxels: Sequence[float], shape: Sequence[int],
         min_shape: Sequence[int]) -> tuple:
    """Network-grid box ``(start, stop)`` holding the coarse voxels of ``mask`` (each with its extent, coarse
    index ``i`` at fine index ``i * zoom``), grown by ``margin_voxels`` and to ``min_shape`` (centred)."""
    found = torch.nonzero(mask)
    start, stop = [], []
    for a in range(3):
        low = float(found[:, a].min()) * zoom[a] - zoom[a] / 2 - margin_voxels[a]
        high = float(found[:, a].max()) * zoom[a] + zoom[a] / 2 + margin_voxels[a]
        lo, hi = max(0, math.ceil(low - 1e-6)), min(shape[a], math.floor(high + 1e-6) + 1)
        missing = min_shape[a] - (hi - lo)
        if missing > 0:
            lo = max(0, lo - (missing + 1) // 2)
            hi = min(shape[a], lo + min_shape[a])
            lo = max(0, hi - min_shape[a])
        start.append(lo)
        stop.append(hi)
    return tuple(start), tuple(stop)


def _file_box(volume, start: tuple, stop: tuple) -> tuple:
    corners = original_index(volume, np.array([start, [s - 1 for s in stop]], dtype=np.float64))
    low = np.floor(corners.min(0) + 1e-6).astype(int)
    high = np.floor(corners.max(0) + 1e-6).astype(int) + 1
    return tuple(int(v) for v in low), tuple(int(v) for v in high)


def handover_level(model, zoom: Sequence[float]) -> int:
    """The fine pass's level that the coarse pass's finest map stands in for: ``log2`` of the coarse/fine
    spacing ratio (the smallest over the axes, rounded down), at most the network's coarsest level.
    Level ``l`` of the fine pass has voxels ``2^l`` fine voxels apart, so a coarse pass at twice the
    spacing gives level 1 and the fine pass adds only its finest refinement."""
    ratio = min(float(z) for z in zoom)
    return max(0, min(model.coordnet.num_levels - 1, int(math.floor(math.log2(ratio) + 1e-6))))


def cascade_segment(
    model,
    atlas: LabelAtlas,
    target: Exam,
    structures: Optional[Sequence[Union[int, str]]] = None,
    *,
    names: Optional[Mapping[int, str]] = None,
    coarse_spacing=None,
    margin_mm: Optional[float] = None,
    min_weight: float = MIN_WEIGHT,
) -> CascadeSegmentation:
    """Propagate the atlas's labels to a target with a coarse pass and fine passes on crops.

    Args:
        model: the model the atlas was built with.
        atlas: from :func:`~deepatlas_fast.segment.build_reference`.
        target: a NIfTI path or a :class:`~deepatlas_fast.data.io.Volume` at the model's spacing.
        structures: label ids or names (``names``) to crop, one fine pass each; None (default): one crop
            around every structure the coarse pass finds.
        names: ``{id: name}`` for structures given by name.
        coarse_spacing: the coarse pass's voxel size in mm (1 or 3 numbers), not finer than the model's
            spacing; default twice the model's spacing.
        margin_mm: grown on every side of a structure's coarse box (default: two coarse voxels).
        min_weight: coverage threshold (:data:`~deepatlas_fast.segment.MIN_WEIGHT`).
    Returns: a :class:`CascadeSegmentation` on exactly the target file's grid and affine.
    """
    if not isinstance(atlas, LabelAtlas):
        raise TypeError(f"atlas must be a LabelAtlas (from build_reference), got {type(atlas).__name__}")
    wanted, coarse, margin = check_cascade_options(model, atlas, structures, names, coarse_spacing, margin_mm)
    fine_spacing = model_spacing(model)
    volume = load_exam(model, target)
    image = exam_intensities(model, volume)

    small, _, zoom = resample_to_spacing(image, volume.affine, coarse)
    raw = network_coordinates(model, small, bound=False)
    coarse_probs, _ = atlas.read(bound_coords(raw), min_weight)
    coarse_labels = coarse_probs.argmax(0).cpu()
    probabilities = resample_back(coarse_probs, zoom, volume.shape)
    start_coords = resample_back(raw, zoom, volume.shape)

    margin_voxels = [m / s for m, s in zip(margin, fine_spacing)]
    channel = {int(c): i for i, c in enumerate(atlas.classes.tolist())}
    masks = {None: coarse_labels > 0} if wanted is None else {w: coarse_labels == channel[w] for w in wanted}
    crops = []
    for label, mask in masks.items():
        if not bool(mask.any()):
            what = "no structure" if label is None else f"structure {label}"
            warnings.warn(f"cascade: the coarse pass finds {what} in {volume.path or 'the target'}; "
                          "no fine pass for it")
            continue
        start, stop = _box(mask, zoom, margin_voxels, volume.shape, min_crop_shape(model))
        crops.append(CascadeCrop(label, start, stop, *_file_box(volume, start, stop)))

    level = handover_level(model, zoom)
    covered = torch.zeros(volume.shape, dtype=torch.int32, device=probabilities.device)
    for crop in crops:
        box = crop.slices()
        start = start_coords[(slice(None), slice(None), *box)]
        coords = network_coordinates(model, image[box], init=start, init_level=level)
        fine, _ = atlas.read(coords, min_weight)
        seen = covered[box].unsqueeze(0)
        old = probabilities[(slice(None), *box)]
        probabilities[(slice(None), *box)] = torch.where(seen > 0, (old * seen + fine) / (seen + 1), fine)
        covered[box] += 1

    index, best = _argmax_on_original_grid(probabilities, volume)
    ids = atlas.classes.cpu()[index]
    return CascadeSegmentation(
        labels=volume_from_array(ids, volume.original_affine, labels=True),
        probability=volume_from_array(best, volume.original_affine),
        crops=crops,
        coarse_spacing=coarse,
    )
