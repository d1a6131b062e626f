"""One-shot / few-shot label propagation by coordinate matching (DESIGN §6) and Dice.

A reference exam with labels and its template coordinates ``c_ref`` gives a label probability map on
the template grid: each reference voxel's one-hot label is splatted (trilinear weights,
``scatter_add``) into the template grid at ``c_ref`` and normalised by the splatted weight. A target
exam's voxel ``p`` then reads that map at ``c_target(p)`` (trilinear :func:`deepatlas_fast.sample`);
its label is the argmax. Where ``c_target(p)`` lands in template cells that received (almost) no
reference mass the voxel is background (label 0, probability 1 for class 0). Several references
(few-shot) are splatted into the same grid, which averages their votes.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .ops import sample

__all__ = ["splat", "splat_labels", "label_template", "read_label_template", "propagate_labels", "dice", "mean_dice"]


def _check_coords(name: str, coords) -> None:
    if not isinstance(coords, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [K, 3, D, H, W], got {type(coords).__name__}")
    if coords.dim() != 5 or coords.shape[1] != 3:
        raise ValueError(f"{name} must have shape [K, 3, D, H, W], got {tuple(coords.shape)}")
    if not coords.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {coords.dtype}")


def _template(template_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in template_shape)
    except TypeError:
        raise TypeError(f"template_shape must be 3 ints (D, H, W), got {template_shape!r}") from None
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"template_shape must be 3 sizes >= 2 (D, H, W), got {template_shape!r}")
    return shape


def _corners(positions: Tensor, shape: Sequence[int]) -> Iterator[tuple[Tensor, Tensor]]:
    """The 8 trilinear corners of each point: ``(flat cell index [K * P], weight [K * P])`` per corner.

    ``positions``: ``[K, 3, P]`` normalised (D, H, W order, ``align_corners=True``) in a grid of
    ``shape``. Corners outside the grid get weight 0 (and a clamped, valid index).
    """
    sizes = list(shape)
    pos = positions.to(torch.float32)
    voxels = [((pos[:, a] + 1) / 2 * (sizes[a] - 1)) for a in range(3)]  # [K, P]
    lows = [torch.floor(v) for v in voxels]
    fracs = [v - low for v, low in zip(voxels, lows)]
    lows = [low.long() for low in lows]
    for corner in range(8):
        steps = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
        w = torch.ones_like(fracs[0])
        inside = torch.ones_like(fracs[0], dtype=torch.bool)
        flat = torch.zeros_like(lows[0])
        for axis, step in enumerate(steps):
            index = lows[axis] + step
            w = w * (fracs[axis] if step else 1 - fracs[axis])
            inside &= (index >= 0) & (index < sizes[axis])
            flat = flat * sizes[axis] + index.clamp(0, sizes[axis] - 1)
        yield flat.reshape(-1), (w * inside).reshape(-1)


def splat(positions: Tensor, values: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Trilinear splat (adjoint of trilinear sampling) with ``scatter_add``.

    Args:
        positions: ``[K, 3, P]`` normalised positions (D, H, W order) in a grid of ``shape``.
        values: ``[K, C, P]`` values carried by each point.
        shape: target grid (D, H, W).

    Returns:
        ``(weight [C=1, *shape], total [C, *shape])``: summed trilinear weights and weighted values,
        summed over K. Corners outside the grid are dropped.
    """
    k, c, p = values.shape
    sizes = list(shape)
    cells = sizes[0] * sizes[1] * sizes[2]
    weight = torch.zeros(cells, dtype=torch.float32, device=values.device)
    total = torch.zeros(c, cells, dtype=torch.float32, device=values.device)
    vals = values.to(torch.float32).permute(1, 0, 2).reshape(c, k * p)
    for flat, w in _corners(positions, sizes):
        weight.scatter_add_(0, flat, w)
        total.scatter_add_(1, flat.unsqueeze(0).expand(c, -1), vals * w)
    return weight.view(1, *sizes), total.view(c, *sizes)


def _check_labels(labels_ref, coords_ref, num_labels: int) -> Tensor:
    if not isinstance(labels_ref, Tensor):
        raise TypeError(f"labels_ref must be an integer torch.Tensor [D, H, W] or [K, D, H, W], got {type(labels_ref).__name__}")
    if labels_ref.is_floating_point() or labels_ref.is_complex() or labels_ref.dtype == torch.bool:
        raise TypeError(f"labels_ref must hold integer labels, got dtype {labels_ref.dtype}")
    if labels_ref.dim() == 3:
        labels_ref = labels_ref.unsqueeze(0)
    if labels_ref.dim() != 4 or labels_ref.shape[0] != coords_ref.shape[0] or labels_ref.shape[1:] != coords_ref.shape[2:]:
        raise ValueError(
            f"labels_ref must have shape [D, H, W] (or [K, D, H, W]) matching coords_ref {tuple(coords_ref.shape)}, "
            f"got {tuple(labels_ref.shape)}"
        )
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
    if labels_ref.numel() and (int(labels_ref.min()) < 0 or int(labels_ref.max()) >= num_labels):
        raise ValueError(
            f"labels_ref values must lie in [0, num_labels - 1] = [0, {num_labels - 1}], "
            f"got [{int(labels_ref.min())}, {int(labels_ref.max())}]"
        )
    return labels_ref.to(coords_ref.device)


def splat_labels(
    coords_ref: Tensor,
    labels_ref: Tensor,
    num_labels: int,
    template_shape: Sequence[int],
    *,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    """Splat the one-hot labels of one or more references into the template grid (unnormalised).

    Equals :func:`splat` of the one-hot map, without building it: each voxel adds its trilinear
    weights to its own label's channel only, so the cost does not grow with ``num_labels``.
    ``differentiable``: keep the gradient with respect to ``coords_ref`` (fine-tuning); by default the
    coordinates are detached.

    Args:
        coords_ref: ``[K, 3, D, H, W]`` template coordinates of K references of equal shape.
        labels_ref: ``[D, H, W]`` (or ``[K, D, H, W]``) integer labels in ``[0, num_labels)``.
    Returns:
        ``(weight [1, *template], total [num_labels, *template])``: reference voxels (trilinear
        weights) per cell, and per label. Sums over references of any shapes pool their votes.
    """
    _check_coords("coords_ref", coords_ref)
    shape = _template(template_shape)
    labels = _check_labels(labels_ref, coords_ref, num_labels)
    k = coords_ref.shape[0]
    cells = shape[0] * shape[1] * shape[2]
    weight = torch.zeros(cells, dtype=torch.float32, device=coords_ref.device)
    total = torch.zeros(num_labels * cells, dtype=torch.float32, device=coords_ref.device)
    offset = labels.reshape(-1).long() * cells
    coords = coords_ref if differentiable else coords_ref.detach()
    for flat, w in _corners(coords.reshape(k, 3, -1), shape):
        weight.scatter_add_(0, flat, w)
        total.scatter_add_(0, offset + flat, w)
    return weight.view(1, *shape), total.view(num_labels, *shape)


def label_template(
    coords_ref: Tensor, labels_ref: Tensor, num_labels: int, template_shape: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Label probabilities on the template grid from one or more labelled references.

    Returns:
        ``(probabilities [1, num_labels, *template], weight [1, 1, *template])``: the normalised
        splatted one-hot (0 where the weight is 0) and the splatted weight (reference voxels per cell).
    """
    weight, total = splat_labels(coords_ref, labels_ref, num_labels, template_shape)
    probs = total / weight.clamp_min(1e-12)
    return probs.unsqueeze(0), weight.unsqueeze(0)


def read_label_template(
    probabilities: Tensor, weight: Tensor, coords_target: Tensor, min_weight: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Label probabilities at a target's template coordinates, background outside the coverage.

    Args:
        probabilities: ``[1, C, *template]`` (:func:`label_template`); class 0 is background.
        weight: ``[1, 1, *template]`` splatted weight (reference voxels per cell).
        coords_target: ``[1, 3, d, h, w]`` template coordinates of the target exam.
        min_weight: a target voxel whose coordinate reads a splatted weight (interpolated) below
            ``min_weight`` times the mean weight of the covered template cells is outside the
            references' coverage.
    Returns:
        ``(probabilities [1, C, d, h, w], covered [1, 1, d, h, w] bool)``: trilinear reads renormalised
        to sum to 1 where covered; one-hot background (class 0) where not covered.
    """
    _check_coords("coords_target", coords_target)
    if coords_target.shape[0] != 1:
        raise ValueError(f"coords_target must hold one exam [1, 3, d, h, w], got {tuple(coords_target.shape)}")
    if not (isinstance(min_weight, (int, float)) and min_weight >= 0 and math.isfinite(min_weight)):
        raise ValueError(f"min_weight must be a finite number >= 0, got {min_weight!r}")
    target = coords_target.detach().to(torch.float32)
    with torch.no_grad():
        probs = sample(probabilities.to(target.device), target, "zeros")
        read = sample(weight.to(target.device), target, "zeros")
        occupied = weight[weight > 0]
        typical = float(occupied.mean()) if occupied.numel() else 1.0
        covered = read >= max(min_weight * typical, 1e-12)
        background = torch.zeros_like(probs)
        background[:, 0] = 1.0
        probs = torch.where(covered, probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12), background)
    return probs, covered


def propagate_labels(
    coords_ref: Tensor,
    labels_ref: Tensor,
    coords_target: Tensor,
    num_labels: Optional[int] = None,
    template_shape: Sequence[int] = (32, 32, 32),
    min_weight: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Propagate a reference's labels to a target exam by matching template coordinates.

    Args:
        coords_ref: ``[1, 3, D, H, W]`` template coordinates of the reference (``[K, ...]`` for K
            references of equal shape: few-shot, votes averaged).
        labels_ref: ``[D, H, W]`` (or ``[K, D, H, W]``) integer labels in ``[0, num_labels)``; 0 is
            background.
        coords_target: ``[1, 3, d, h, w]`` template coordinates of the target exam.
        num_labels: number of classes including background (default ``labels_ref.max() + 1``).
        template_shape: grid (D, H, W) the labels are splatted into: about the reference's
            resolution in template space. Finer than about twice that leaves holes between the
            splatted voxels (read as background); coarser blurs small structures.
        min_weight: a target voxel whose coordinate reads a splatted weight (interpolated) below
            ``min_weight`` times the mean weight of the covered template cells is background
            (default 0.1).

    Returns:
        ``(labels [d, h, w] int64, probabilities [1, num_labels, d, h, w] float32)``. Labels absent
        from the reference get probability 0 everywhere (and never appear in the output).
    """
    if num_labels is None:
        if not isinstance(labels_ref, Tensor):
            raise TypeError(f"labels_ref must be an integer torch.Tensor, got {type(labels_ref).__name__}")
        num_labels = int(labels_ref.max()) + 1 if labels_ref.numel() else 1
    probs_t, weight_t = label_template(coords_ref, labels_ref, num_labels, template_shape)
    probs, _ = read_label_template(probs_t, weight_t, coords_target, min_weight)
    return probs.argmax(dim=1)[0], probs


def dice(pred: Tensor, truth: Tensor, labels: Optional[Iterable[int]] = None) -> dict:
    """Dice overlap per label.

    Args:
        pred, truth: integer label maps of equal shape. labels: the label ids to score (default:
            every nonzero id present in ``truth`` or ``pred``).

    Returns:
        ``{label: dice}``. A label absent from both maps gets ``nan`` (as MONAI's
        ``ignore_empty``); use :func:`mean_dice` to average over the defined ones.
    """
    if not isinstance(pred, Tensor) or not isinstance(truth, Tensor):
        raise TypeError("pred and truth must be torch.Tensor label maps")
    if pred.shape != truth.shape:
        raise ValueError(f"pred must have the shape of truth {tuple(truth.shape)}, got {tuple(pred.shape)}")
    if labels is None:
        present = set(torch.unique(truth).tolist()) | set(torch.unique(pred).tolist())
        labels = sorted(int(l) for l in present if l != 0)
    out = {}
    for label in labels:
        p, t = pred == label, truth == label
        denom = int(p.sum()) + int(t.sum())
        out[int(label)] = float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


def mean_dice(scores: dict) -> float:
    """Mean of the defined (non-nan) Dice values; nan when none is defined."""
    values = [v for v in scores.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
