"""One-shot / few-shot segmentation of NIfTI exams through template coordinates (``deepatlas-fast segment``).

A structure labelled once on a reference exam is found in a new exam by matching coordinates:

1. **Coordinates** (:func:`exam_coordinates`): an exam is loaded at the spacing the network was trained
   at (``model.preprocessing["spacing"]``, the *network grid*: canonical RAS+, resampled by
   :func:`~deepatlas_fast.data.io.load_volume`), normalised with the model's modality, and the CoordNet
   maps every voxel to a bounded template coordinate ``[1, 3, d, h, w]``.
2. **Reference** (:func:`build_reference`, done once): each reference's label map is read onto its
   image's network grid (:func:`~deepatlas_fast.data.io.load_labels` with ``like=``, nearest
   neighbour) and its one-hot labels are splatted (trilinear, :func:`~deepatlas_fast.propagate.splat_labels`)
   into a template grid at its coordinates. Counts and weights are summed over the K references
   (few-shot: their votes pool, each voxel one vote, whatever the exams' shapes) into a
   :class:`LabelAtlas`, reused for every target.
3. **Target** (:func:`segment`): the label probabilities of the template grid are read (trilinear) at
   the target's coordinates on its network grid; each class's probability map is brought back onto the
   target file's ORIGINAL grid with linear interpolation (:func:`~deepatlas_fast.data.io.to_original_grid`:
   resampling, then reorientation undone), and the label is the argmax there. The result is on exactly
   the target file's grid and affine, smoother than labels upsampled by nearest neighbour.

Choices:

* **Template grid** (default :func:`default_template_shape`): per axis, the largest network-grid size of
  the references, at most :data:`MAX_TEMPLATE_SIDE`. At that size the references' voxels are about one
  template cell apart, so the splat leaves no holes where the coordinate map does not stretch, and
  small structures are not blurred more than the network grid already does (an identity map puts
  every voxel of a single reference exactly on a template node). The bound caps memory:
  ``labels x cells x 4`` bytes (128^3 cells: 8 MiB per label).
* **Coverage** (:data:`MIN_WEIGHT`): a target voxel whose coordinate reads an interpolated splatted
  weight below ``MIN_WEIGHT`` times the mean weight of the occupied template cells lies outside the
  references' coverage and is background (:func:`~deepatlas_fast.propagate.read_label_template`).
* **Probability output**: the probability of the written label at each voxel (the maximum over the
  classes after interpolation onto the original grid), a 3-D float32 map on the target's grid; 1 for
  background outside the references' coverage. (A 4-D per-class file would take ``labels`` times the
  memory and disk of the exam.)
* **Label files**: uint8 when every label id is at most 255, uint16 up to 65535, int32 beyond
  (:attr:`LabelAtlas.dtype`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .data.io import (
    Volume,
    _spacing3,
    load_labels,
    load_volume,
    normalize_intensity,
    same_grid,
    to_original_grid,
    volume_from_array,
)
from .propagate import read_label_template, splat_labels

__all__ = [
    "MIN_WEIGHT",
    "MAX_TEMPLATE_SIDE",
    "LabelAtlas",
    "Segmentation",
    "build_reference",
    "default_template_shape",
    "exam_coordinates",
    "exam_intensities",
    "load_exam",
    "load_reference",
    "model_spacing",
    "network_coordinates",
    "segment",
]

MIN_WEIGHT = 0.1
"""Coverage threshold: fraction of the mean splatted weight of the occupied template cells below which
a target voxel is outside the references' coverage (background)."""

MAX_TEMPLATE_SIDE = 128
"""Upper bound of each side of the default template grid (:func:`default_template_shape`)."""

PathLike = Union[str, "os.PathLike[str]"]
Exam = Union[Volume, PathLike]


def _preprocessing(model) -> dict:
    """The preprocessing dict saved with the model (``load_model`` attaches it as ``model.preprocessing``)."""
    found = getattr(model, "preprocessing", None)
    if found is None:
        found = getattr(model, "config", {}).get("preprocessing")
    return dict(found or {})


def model_spacing(model) -> tuple[float, float, float]:
    """The voxel size in mm (canonical R, A, S axes) the network runs at: ``preprocessing["spacing"]``."""
    spacing = _preprocessing(model).get("spacing")
    if spacing is None:
        raise ValueError("model: its preprocessing has no 'spacing' (the voxel size in mm the network runs at)")
    return _spacing3(spacing, "model: preprocessing spacing")


def network_coordinates(
    model, image: Tensor, *, bound: bool = True, init: Optional[Tensor] = None, init_level: Optional[int] = None
) -> Tensor:
    """Run the CoordNet on a normalised image on its own grid, without gradient.

    Args:
        model: a :class:`~deepatlas_fast.model.DeepAtlas` (its ``preprocessing["levels"]``, the decoder
            levels active at the end of training, is used when present).
        image: ``[D, H, W]`` intensities already normalised to [0, 1], at the model's spacing.
        bound: clamp to the template cube ``[-1, 1]^3`` (default); False returns the raw map.
        init, init_level: ``[1, 3, D, H, W]`` coordinates that replace the network's maps from level
            ``init_level`` (default the coarsest) up, for the finer levels to refine (the cascade's fine
            pass; see :class:`~deepatlas_fast.model.CoordNet`).
    Returns: ``[1, 3, D, H, W]`` float32 coordinates on the model's device.
    """
    device = next(model.parameters()).device
    levels = _preprocessing(model).get("levels")
    with torch.no_grad():
        return model.coordnet(image.to(device, torch.float32)[None, None], levels=levels, bound=bound, init=init,
                              init_level=init_level)


def load_exam(model, image: Exam) -> Volume:
    """An exam on the model's network grid: a NIfTI path loaded at :func:`model_spacing`, or a
    :class:`Volume` already at that spacing (raw intensities, e.g. HU). ValueErrors name the file."""
    spacing = model_spacing(model)
    if isinstance(image, Volume):
        if not np.allclose(image.spacing, spacing, rtol=1e-3, atol=0):
            raise ValueError(
                f"image {image.path or '(in memory)'}: spacing {tuple(round(s, 4) for s in image.spacing)} mm "
                f"differs from the model's {spacing} mm; load it with load_volume(path, spacing=model_spacing(model))"
            )
        if not image.data.is_floating_point():
            raise ValueError(
                f"image {image.path or '(in memory)'}: an intensity image is needed, got {image.data.dtype} data"
            )
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"image must be a Volume or a NIfTI path, got {type(image).__name__}")
    return load_volume(image, spacing=spacing)


def exam_intensities(model, volume: Volume) -> Tensor:
    """An exam's intensities normalised to [0, 1] as the network sees them: ``normalize_intensity`` with
    the model's ``preprocessing["modality"]`` (default "auto"). ``[D, H, W]`` float32, ``volume``'s grid."""
    return normalize_intensity(volume.data, modality=_preprocessing(model).get("modality", "auto"))


def exam_coordinates(model, image: Exam) -> tuple[Tensor, Volume]:
    """Template coordinates of an exam on the model's network grid.

    The exam is loaded at the model's spacing (:func:`load_exam`), its intensities normalised with the
    model's ``preprocessing["modality"]`` (default "auto") and the network run without gradient.

    Returns: ``(coords [1, 3, d, h, w] bounded to [-1, 1], volume)``: the :class:`Volume` of the
    network grid (its geometry brings results back to the file's grid).
    """
    volume = load_exam(model, image)
    return network_coordinates(model, exam_intensities(model, volume)), volume


def default_template_shape(grids: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Per axis, the largest of the references' network-grid sizes, at most :data:`MAX_TEMPLATE_SIDE`."""
    if not grids:
        raise ValueError("at least one reference grid is needed")
    return tuple(min(max(int(g[a]) for g in grids), MAX_TEMPLATE_SIDE) for a in range(3))


def _check_reference(index: int, coords, labels) -> None:
    name = f"references[{index}]"
    if not isinstance(coords, Tensor) or coords.dim() != 5 or coords.shape[:2] != (1, 3):
        shape = tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__
        raise ValueError(f"{name}: coordinates must be a tensor [1, 3, d, h, w], got {shape}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor [d, h, w]")
    if tuple(labels.shape) != tuple(coords.shape[2:]):
        raise ValueError(
            f"{name}: labels shape {tuple(labels.shape)} differs from the coordinates' grid {tuple(coords.shape[2:])}"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name}: label ids must be >= 0, got {int(labels.min())}")


@dataclass
class LabelAtlas:
    """The references' label votes on the template grid: built once, read for every target.

    Attributes:
        classes: ``[C]`` int64 label ids in ascending order, ``classes[0] == 0`` (background); channel
            ``c`` of :attr:`total` counts label ``classes[c]``.
        weight: ``[1, *template]`` float32 reference voxels per template cell (trilinear splat weights
            summed over the references).
        total: ``[C, *template]`` float32, the same per label (sums to :attr:`weight` over ``C``).
        sources: the reference label files (None for in-memory label maps), in order.
    """

    classes: Tensor
    weight: Tensor
    total: Tensor
    sources: list = field(default_factory=list)

    @classmethod
    def from_coordinates(
        cls,
        coords: Sequence[Tensor],
        labels: Sequence[Tensor],
        template_shape: Optional[Sequence[int]] = None,
        sources: Optional[Sequence[Optional[str]]] = None,
    ) -> "LabelAtlas":
        """Splat K references given as coordinates and label maps (any shapes, one per reference).

        Args:
            coords: per reference ``[1, 3, d, h, w]`` template coordinates.
            labels: per reference ``[d, h, w]`` integer label ids >= 0 (0: background), any ids.
            template_shape: the splat grid (D, H, W); default :func:`default_template_shape`.
            sources: a name per reference (kept in :attr:`sources`).
        """
        if len(coords) != len(labels) or not coords:
            raise ValueError(
                f"one label map per reference is needed, got {len(coords)} coordinate maps and {len(labels)} label maps"
            )
        for index, (c, l) in enumerate(zip(coords, labels)):
            _check_reference(index, c, l)
        if template_shape is None:
            template_shape = default_template_shape([c.shape[2:] for c in coords])
        device = coords[0].device
        present = torch.cat([torch.zeros(1, dtype=torch.int64)] + [l.reshape(-1).cpu().long() for l in labels])
        classes = torch.unique(present)
        weight = total = 0
        for c, l in zip(coords, labels):
            index = torch.searchsorted(classes.to(device), l.to(device).long())  # label id -> channel
            w, t = splat_labels(c.to(device), index, len(classes), template_shape)
            weight, total = weight + w, total + t
        return cls(classes, weight, total, list(sources) if sources is not None else [None] * len(coords))

    @property
    def template_shape(self) -> tuple[int, int, int]:
        """The splat grid (D, H, W)."""
        return tuple(self.weight.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        """Voxel type of label files: uint8 when every id is <= 255, uint16 up to 65535, else int32."""
        top = int(self.classes.max())
        for candidate in (np.uint8, np.uint16):
            if top <= np.iinfo(candidate).max:
                return np.dtype(candidate)
        return np.dtype(np.int32)

    def probabilities(self) -> Tensor:
        """``[1, C, *template]`` label probabilities per template cell (0 where no reference voxel landed)."""
        return (self.total / self.weight.clamp_min(1e-12)).unsqueeze(0)

    def read(self, coords: Tensor, min_weight: float = MIN_WEIGHT) -> tuple[Tensor, Tensor]:
        """Label probabilities at a target's coordinates ``[1, 3, d, h, w]``.

        Returns: ``(probabilities [C, d, h, w], covered [d, h, w] bool)``; probabilities sum to 1,
        one-hot background where the target is outside the references' coverage (see :data:`MIN_WEIGHT`).
        """
        probs, covered = read_label_template(self.probabilities(), self.weight.unsqueeze(0), coords, min_weight)
        return probs[0], covered[0, 0]


def load_reference(model, image: Exam, labels: Union[Volume, PathLike]) -> tuple[Volume, Volume]:
    """A labelled reference's image and label map, both on the image's network grid.

    Args:
        image: a NIfTI path or a :class:`Volume` at the model's spacing (:func:`load_exam`).
        labels: a NIfTI path on the image file's grid, or a label Volume already on the image's network
            grid (a ValueError naming the file otherwise).
    """
    volume = load_exam(model, image)
    if isinstance(labels, Volume):
        if not same_grid(labels.affine, labels.shape, volume.affine, volume.shape):
            raise ValueError(
                f"label map {labels.path or '(in memory)'} is not on the image's network grid "
                "(load it with load_labels(path, like=image))"
            )
        return volume, labels
    if not isinstance(labels, (str, os.PathLike)):
        raise TypeError(f"labels must be a Volume or a NIfTI path, got {type(labels).__name__}")
    return volume, load_labels(labels, like=volume)


def _reference_volumes(model, index: int, image: Exam, labels: Union[Volume, PathLike]) -> tuple[Volume, Volume]:
    """:func:`load_reference` with its ValueErrors naming the reference's rank."""
    try:
        return load_reference(model, image, labels)
    except ValueError as exc:
        raise ValueError(f"references[{index}]: {exc}") from None


def build_reference(
    model, references: Sequence[tuple[Exam, Union[Volume, PathLike]]], template_shape: Optional[Sequence[int]] = None
) -> LabelAtlas:
    """Splat the labels of K labelled reference exams into one :class:`LabelAtlas` (done once per set).

    Args:
        model: a :class:`~deepatlas_fast.model.DeepAtlas` (e.g. from :func:`~deepatlas_fast.checkpoint.load_model`).
        references: ``(image, labels)`` pairs: the image a NIfTI path or a :class:`Volume` at the model's
            spacing (:func:`load_exam`); the labels a NIfTI path on the image file's grid (a clear
            ValueError naming the file otherwise) or a label Volume already on the image's network grid.
        template_shape: the splat grid (D, H, W); default :func:`default_template_shape` of the
            references' network grids.
    """
    if isinstance(references, (str, os.PathLike)) or not references:
        raise ValueError("references: give a non-empty list of (image, labels) pairs")
    coords, label_maps, sources = [], [], []
    for index, pair in enumerate(references):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"references[{index}]: an (image, labels) pair is needed, got {pair!r}")
        volume, labels = _reference_volumes(model, index, *pair)
        coords.append(exam_coordinates(model, volume)[0])
        label_maps.append(labels.data)
        sources.append(labels.path)
    return LabelAtlas.from_coordinates(coords, label_maps, template_shape, sources)


class Segmentation(NamedTuple):
    """A target's labels and their probability, both on the target file's original grid."""

    labels: Volume
    """int64 label ids (canonical RAS+ ``data`` on the original grid; :func:`~deepatlas_fast.data.io.save_like`
    writes them on the file's grid and affine)."""
    probability: Volume
    """float32 probability of the written label (1 for background outside the references' coverage)."""


def _argmax_on_original_grid(probabilities: Tensor, volume: Volume) -> tuple[Tensor, Tensor]:
    """Class index and its probability per voxel of ``volume``'s original grid (file voxel order).

    Each class's map is interpolated (linear) onto the original grid one at a time, keeping a running
    maximum, so memory stays at a few copies of the original grid whatever the number of classes.
    Ties go to the lower class (background first).
    """
    best = index = None
    for c, channel in enumerate(probabilities.cpu()):
        p = to_original_grid(channel, volume, mode="linear")
        if best is None:
            best, index = p, torch.zeros(p.shape, dtype=torch.int64)
            continue
        better = p > best
        best = torch.where(better, p, best)
        index[better] = c
    return index, best


def segment(model, atlas: LabelAtlas, target: Exam, *, min_weight: float = MIN_WEIGHT) -> Segmentation:
    """Propagate the atlas's labels to a target exam.

    Args:
        model: the model the atlas was built with.
        atlas: from :func:`build_reference`.
        target: a NIfTI path or a :class:`Volume` at the model's spacing (:func:`load_exam`).
        min_weight: coverage threshold (:data:`MIN_WEIGHT`); voxels outside the coverage are background.
    Returns: a :class:`Segmentation` on exactly the target file's grid and affine (see the module
        docstring for how probabilities are brought back from the network grid).
    """
    if not isinstance(atlas, LabelAtlas):
        raise TypeError(f"atlas must be a LabelAtlas (from build_reference), got {type(atlas).__name__}")
    coords, volume = exam_coordinates(model, target)
    probabilities, _ = atlas.read(coords, min_weight)
    index, best = _argmax_on_original_grid(probabilities, volume)
    ids = atlas.classes.cpu()[index]
    return Segmentation(
        labels=volume_from_array(ids, volume.original_affine, labels=True),
        probability=volume_from_array(best, volume.original_affine),
    )
