"""The template image reconstructed from exams (``deepatlas-fast atlas``).

Every exam is loaded on its network grid (:func:`~deepatlas_fast.segment.load_exam`), its intensities
normalised as the network sees them (:func:`~deepatlas_fast.segment.exam_intensities`, [0, 1]), and each
voxel's intensity is splatted (trilinear, :func:`~deepatlas_fast.propagate.splat`) into the template grid
at the voxel's template coordinate. Values and weights are summed over the exams, then divided: each
template cell holds the mean normalised intensity of the exam voxels mapped into it.

Choices:

* **Template grid** (default): the model's own template grid (``model.template_shape``, the grid of the
  atlas it learnt). A grid finer than the exams' network grids leaves holes between the splatted voxels
  (filled, see below); pass the exams' network-grid size for an atlas at their resolution.
* **Raw coordinates**: the unbounded coordinate map is splatted, so voxels the network maps outside the
  cube are dropped instead of piling up on its faces (the bounded map clamps them there).
* **Holes** (:data:`~deepatlas_fast.segment.MIN_WEIGHT`, :data:`FILL_CELLS`): a cell whose splatted weight
  is below ``MIN_WEIGHT`` times the mean weight of the occupied cells is a hole. A hole with enough
  weight within ``FILL_CELLS`` cells takes the weighted mean of those covered neighbours (normalised
  convolution with a ``(2 * FILL_CELLS + 1)^3`` box); the remaining holes, outside every exam's coverage,
  are 0 (air in the CT window). The weight map (exam voxels per cell, before filling) marks both.
* **Physical frame** (:func:`template_affine`): the template has no physical size of its own; the written
  affine makes it an average exam. Per exam and template axis ``a``, the exam's network grid spans
  ``(n_a - 1) * spacing_a`` mm along canonical axis ``a`` and template coordinates ``[lo_a, hi_a]``
  (raw map), giving ``scale_a = extent / (hi_a - lo_a)`` mm per normalised unit and the world position of
  coordinate 0, ``centre_a - (lo_a + hi_a) / 2 * scale_a``. Both are averaged over the exams; the grid
  is axis-aligned RAS (template axes 0, 1, 2 along R, A, S, the canonical axes the network runs on), the
  cube ``[-1, 1]`` spans ``2 * scale_a`` mm, and the voxel size is ``2 * scale_a / (T_a - 1)``. An exam
  covering half the template along an axis (coordinates over half the cube) counts its extent twice, so
  partial fields of view do not shrink the frame. With an untrained (identity) model and one exam, the
  atlas grid of the exam's network-grid size is exactly the exam's network grid.
"""

from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.io import Volume, save_like, volume_from_array
from .propagate import _template, splat
from .segment import MIN_WEIGHT, Exam, exam_intensities, load_exam, network_coordinates

__all__ = ["FILL_CELLS", "MIN_SPAN", "TemplateImage", "reconstruct_atlas", "template_affine"]

FILL_CELLS = 1
"""Holes are filled from covered cells at most this many cells away (per axis); 0 leaves them at 0."""

MIN_SPAN = 0.1
"""An exam whose template coordinates span less than this (normalised units) along an axis is left out
of the physical frame along that axis (its extent says nothing about the cube's size)."""

PathLike = Union[str, "os.PathLike[str]"]


class TemplateImage(NamedTuple):
    """The reconstructed template image and its weight map, on the same template grid and affine."""

    intensity: Volume
    """float32 ``[D, H, W]`` mean normalised intensity ([0, 1]) per template cell; holes filled or 0."""
    weight: Volume
    """float32 ``[D, H, W]`` exam voxels per cell (summed trilinear splat weights, before filling)."""

    def save(self, path: PathLike, *, weights: Optional[PathLike] = None, png: Optional[PathLike] = None) -> list:
        """Write the intensity as NIfTI (float32, the template affine), optionally the weight map and a
        three-plane PNG of the intensity. Returns the paths written."""
        from .pictures import overlay_png

        written = [save_like(self.intensity.data, self.intensity, path)]
        if weights is not None:
            written.append(save_like(self.weight.data, self.weight, weights))
        if png is not None:
            written.append(overlay_png(self.intensity.data, None, png, spacing=self.intensity.spacing))
        return written


def _exam_frame(coords: Tensor, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """One exam's ``(mm per normalised unit, world position of coordinate 0)`` per template axis (nan
    along an axis its coordinates span less than :data:`MIN_SPAN`); see the module docstring."""
    flat = coords[0].reshape(3, -1).to(torch.float64)
    lo, hi = flat.amin(1).cpu().numpy(), flat.amax(1).cpu().numpy()
    span = hi - lo
    last = np.asarray(volume.shape, dtype=np.float64) - 1
    extent = last * np.asarray(volume.spacing)
    centre = (np.asarray(volume.affine) @ np.append(last / 2, 1.0))[:3]
    scale = np.divide(extent, span, out=np.full(3, np.nan), where=span >= MIN_SPAN)
    return scale, centre - (lo + hi) / 2 * scale


def template_affine(scale: Sequence[float], zero: Sequence[float], template_shape: Sequence[int]) -> np.ndarray:
    """The RAS affine of a template grid whose cube ``[-1, 1]^3`` spans ``2 * scale`` mm per axis, with
    normalised coordinate 0 at the world position ``zero`` (mm); voxel size ``2 * scale / (T - 1)``."""
    scale = np.asarray(scale, dtype=np.float64)
    size = np.asarray(_template(template_shape), dtype=np.float64)
    affine = np.diag([*(2 * scale / (size - 1)), 1.0])
    affine[:3, 3] = np.asarray(zero, dtype=np.float64) - scale
    return affine


def _fill_holes(total: Tensor, weight: Tensor, covered: Tensor, threshold: float, radius: int) -> Tensor:
    """Mean intensity per cell: ``total / weight`` where covered; holes with at least ``threshold``
    covered weight within ``radius`` cells get the weighted mean of those cells; 0 elsewhere."""
    mean = torch.where(covered, total / weight.clamp_min(1e-12), torch.zeros_like(total))
    if radius < 1:
        return mean
    size = 2 * radius + 1
    kept = torch.stack([total * covered, weight * covered])[:, None]  # [2, 1, D, H, W]
    near_total, near_weight = F.avg_pool3d(kept, size, stride=1, padding=radius)[:, 0] * size**3
    fillable = ~covered & (near_weight >= threshold)
    return torch.where(fillable, near_total / near_weight.clamp_min(1e-12), mean)


def reconstruct_atlas(
    model,
    images: Iterable[Exam],
    template_shape: Optional[Sequence[int]] = None,
    *,
    fill: int = FILL_CELLS,
    min_weight: float = MIN_WEIGHT,
) -> TemplateImage:
    """Reconstruct the template image by splatting exams into the template grid at their coordinates.

    Args:
        model: a :class:`~deepatlas_fast.model.DeepAtlas` (e.g. from :func:`~deepatlas_fast.checkpoint.load_model`).
        images: the exams, each a NIfTI path or a :class:`~deepatlas_fast.data.io.Volume` at the model's
            spacing (:func:`~deepatlas_fast.segment.load_exam`); any iterable, read once, one exam in
            memory at a time (wrap it in a progress bar freely).
        template_shape: the template grid (D, H, W); default the model's ``template_shape``.
        fill: holes are filled from covered cells up to this many cells away (:data:`FILL_CELLS`; 0: none).
        min_weight: a cell with less splatted weight than ``min_weight`` times the mean weight of the
            occupied cells is a hole (default :data:`~deepatlas_fast.segment.MIN_WEIGHT`).
    Returns: a :class:`TemplateImage` on the template grid, with the affine of :func:`template_affine`
        (frames of the exams averaged, see the module docstring).
    """
    if isinstance(images, (str, os.PathLike, Volume)):
        raise ValueError("images: give a list of exams (NIfTI paths or Volumes), not a single one")
    if template_shape is None:
        template_shape = getattr(model, "template_shape", None)
    shape = _template(template_shape)
    if isinstance(fill, bool) or not isinstance(fill, int) or fill < 0:
        raise ValueError(f"fill must be an int >= 0 (cells), got {fill!r}")
    if not (isinstance(min_weight, (int, float)) and 0 <= min_weight < float("inf")):
        raise ValueError(f"min_weight must be a finite number >= 0, got {min_weight!r}")
    weight = total = 0
    scales, zeros = [], []
    for image in images:
        volume = load_exam(model, image)
        data = exam_intensities(model, volume)
        coords = network_coordinates(model, data, bound=False)
        w, t = splat(coords.reshape(1, 3, -1), data.to(coords.device).reshape(1, 1, -1), shape)
        weight, total = weight + w[0], total + t[0]
        scale, zero = _exam_frame(coords, volume)
        scales.append(scale)
        zeros.append(zero)
    if not scales:
        raise ValueError("images: no exam given")
    usable = ~np.isnan(np.stack(scales))
    if not usable.any(0).all():
        axes = [a for a in range(3) if not usable[:, a].any()]
        raise ValueError(
            f"the exams' template coordinates span less than {MIN_SPAN} along template axis/axes {axes}: "
            "the coordinate maps are degenerate (no physical frame for the template)"
        )
    affine = template_affine(np.nanmean(np.stack(scales), 0), np.nanmean(np.stack(zeros), 0), shape)
    occupied = weight[weight > 0]
    threshold = max(min_weight * float(occupied.mean()), 1e-12) if occupied.numel() else 1e-12
    intensity = _fill_holes(total, weight, weight >= threshold, threshold, fill)
    return TemplateImage(
        intensity=volume_from_array(intensity.cpu(), affine),
        weight=volume_from_array(weight.cpu(), affine),
    )
