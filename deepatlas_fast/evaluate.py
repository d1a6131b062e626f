"""Segmentation metrics: Dice and HD95 in mm per label, comparing in world coordinates.

Both label maps are read with :func:`deepatlas_fast.data.io.load_labels` (canonical RAS+ ``[D, H, W]``,
integer ids). When their grids differ (shape, or affine beyond 1e-3 mm) the prediction is resampled
onto the truth's grid by nearest neighbour in world coordinates (through both affines); truth voxels
outside the prediction's field of view are background. Every number is then measured on the truth's
grid.

HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the boundary of a mask is its
voxels with at least one 6-neighbour outside the mask or outside the grid; the distance from each
boundary voxel of one mask to the nearest boundary voxel of the other is measured between voxel
centres in world mm (through the affine, so anisotropic and oblique grids are exact); HD95 is the
larger of the two directed 95th percentiles (linear interpolation, as ``torch.quantile``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .data.io import Volume, label_names, load_labels, read_label_table, same_grid

__all__ = ["EMPTY_LABEL_RULE", "evaluate_labels", "resample_to_grid", "hd95"]

EMPTY_LABEL_RULE = (
    "Labels empty in one image: a label absent from both maps is not reported; a label present in only "
    "one map gets Dice 0 and HD95 null, with 'empty' naming the side where it is missing ('pred' or "
    "'truth'), and counts as Dice 0 in the mean Dice. The mean HD95 averages the labels where HD95 is "
    "defined (present in both)."
)
"""The rule for labels missing from one or both maps (also printed by ``deepatlas-fast evaluate --help``)."""

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK_ELEMENTS = 1 << 22  # distances held at once by hd95 (32 MiB of float64)


def _label_volume(value: Union[Volume, PathLike], name: str) -> Volume:
    """A label :class:`Volume` from a Volume or a path; ValueErrors start with ``name``."""
    if isinstance(value, Volume):
        if value.data.dim() != 3:
            raise ValueError(f"{name}: a 3-D label map is needed, got shape {tuple(value.data.shape)}")
        if value.data.is_floating_point() or value.data.is_complex():
            raise ValueError(
                f"{name}: a label map with integer ids is needed, got {value.data.dtype} data "
                "(read label files with load_labels)"
            )
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a label Volume or a NIfTI path, got {type(value).__name__}")
    try:
        return load_labels(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def resample_to_grid(volume: Volume, like: Volume, fill: float = 0) -> Tensor:
    """``volume.data`` resampled onto ``like``'s grid by nearest neighbour in world coordinates.

    Each voxel of ``like`` takes the value of the ``volume`` voxel whose centre is nearest to its
    world position (``like.affine`` then the inverse of ``volume.affine``; a position exactly half-way
    rounds up). Voxels of ``like`` outside ``volume``'s field of view get ``fill``.
    Returns a tensor of ``like.shape`` and ``volume.data``'s dtype.
    """
    to_src = torch.as_tensor(np.linalg.inv(np.asarray(volume.affine)) @ np.asarray(like.affine), dtype=torch.float64)
    src = volume.data
    size = torch.tensor(src.shape)
    d, h, w = like.shape
    jj, kk = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    plane = jj[..., None] * to_src[:3, 1] + kk[..., None] * to_src[:3, 2] + to_src[:3, 3]  # [H, W, 3]
    out = torch.full(like.shape, fill, dtype=src.dtype)
    for i in range(d):  # one slice at a time keeps memory at O(H * W)
        index = torch.floor(plane + i * to_src[:3, 0] + 0.5).long()
        inside = ((index >= 0) & (index < size)).all(-1)
        found = index[inside]
        out[i][inside] = src[found[:, 0], found[:, 1], found[:, 2]]
    return out


def _boundary_points(mask: Tensor, affine: np.ndarray) -> Tensor:
    """World positions in mm (float64 ``[N, 3]``) of the mask's boundary voxel centres.

    Boundary: mask voxels with at least one 6-neighbour outside the mask or outside the grid.
    """
    index = torch.nonzero(mask)
    lo = index.min(0).values
    hi = index.max(0).values + 1
    box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    p = torch.zeros([s + 2 for s in box.shape], dtype=torch.bool)  # False outside the box (and the grid)
    p[1:-1, 1:-1, 1:-1] = box
    interior = (
        box
        & p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1]
        & p[1:-1, :-2, 1:-1] & p[1:-1, 2:, 1:-1]
        & p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:]
    )
    edge = torch.nonzero(box & ~interior) + lo
    a = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    return edge.to(torch.float64) @ a[:3, :3].T + a[:3, 3]


def _percentile(values: Tensor, q: float) -> float:
    """The ``q``-th percentile with linear interpolation (``torch.quantile`` / numpy "linear")."""
    ordered = torch.sort(values).values
    position = q / 100.0 * (ordered.numel() - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo))


def hd95(pred: Tensor, truth: Tensor, affine: np.ndarray, percentile: float = 95.0) -> Optional[float]:
    """Symmetric percentile Hausdorff distance in mm between two boolean masks on one grid.

    The larger of the two directed ``percentile``-th percentiles of boundary-to-boundary distances
    (see the module docstring); ``affine`` maps voxel index to world mm. None when a mask is empty.
    """
    if not bool(pred.any()) or not bool(truth.any()):
        return None
    a = _boundary_points(pred, affine)
    b = _boundary_points(truth, affine)
    centre = torch.cat([a, b]).mean(0)  # centred coordinates keep cdist's matrix-product form accurate
    a, b = a - centre, b - centre
    a_to_b = torch.empty(len(a), dtype=torch.float64)
    b_to_a = torch.full((len(b),), math.inf, dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMENTS // len(b))
    for start in range(0, len(a), rows):
        dist = torch.cdist(a[start : start + rows], b)
        a_to_b[start : start + rows] = dist.min(1).values
        torch.minimum(b_to_a, dist.min(0).values, out=b_to_a)
    return max(_percentile(a_to_b, percentile), _percentile(b_to_a, percentile))


def _label_ids(labels: Optional[Iterable[int]]) -> Optional[list]:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise TypeError(f"labels must be an iterable of label ids, got {type(labels).__name__}")
    ids = []
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 1:
            raise ValueError(f"labels: ids must be integers >= 1 (0 is background), got {label!r}")
        ids.append(int(label))
    return sorted(set(ids))


def evaluate_labels(
    pred: Union[Volume, PathLike],
    truth: Union[Volume, PathLike],
    labels: Optional[Iterable[int]] = None,
    names: Optional[Union[Mapping[int, str], PathLike]] = None,
) -> dict:
    """Dice, HD95 (mm) and volumes per label of a predicted label map against the truth.

    Args:
        pred, truth: label :class:`Volume` (from :func:`~deepatlas_fast.data.io.load_labels`) or
            NIfTI paths. When the grids differ, ``pred`` is resampled onto ``truth``'s grid (nearest
            neighbour in world coordinates, background outside its field of view) and ``"resampled"``
            is True; every number is measured on the truth's grid.
        labels: the ids to score (default: every nonzero id of either map).
        names: ``{id: name}`` or the path of a JSON label table; ids without a name get None.

    Empty labels: a label absent from both maps is not reported; a label present in only one map gets
    Dice 0 and HD95 None (JSON null), with ``"empty"`` naming the side where it is missing ("pred" or
    "truth"), and counts as Dice 0 in the mean Dice. The mean HD95 averages the labels where HD95 is
    defined (present in both). Means are None when no label is reported.

    Returns:
        A JSON-serialisable dict (label ids as strings, as JSON writes them)::

            {"labels": {"1": {"name", "dice", "hd95_mm", "pred_voxels", "truth_voxels",
                              "pred_mm3", "truth_mm3", "empty": None | "pred" | "truth"}, ...},
             "mean_dice", "mean_hd95_mm", "resampled", "pred", "truth"}

        ``"pred"`` / ``"truth"``: the files read (None for in-memory volumes).
    Raises:
        ValueError naming the argument: missing or unreadable files, 2-D/4-D files, non-integer or
        negative label values, a names table that is not an id -> name map, bad ``labels``.
    """
    pred = _label_volume(pred, "pred")
    truth = _label_volume(truth, "truth")
    ids = _label_ids(labels)
    if names is None:
        names = {}
    elif isinstance(names, (str, os.PathLike)):
        names = read_label_table(names, "names")
    else:
        names = label_names(names, "names")
    resampled = not same_grid(pred.affine, pred.shape, truth.affine, truth.shape)
    p_data = resample_to_grid(pred, truth) if resampled else pred.data
    t_data = truth.data
    if ids is None:
        present = set(torch.unique(p_data).tolist()) | set(torch.unique(t_data).tolist())
        ids = sorted(int(label) for label in present if label != 0)
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(truth.affine)[:3, :3])))
    results = {}
    for label in ids:
        p, t = p_data == label, t_data == label
        n_p, n_t = int(p.sum()), int(t.sum())
        if n_p == 0 and n_t == 0:
            continue
        results[str(label)] = {
            "name": names.get(label),
            "dice": 2.0 * int((p & t).sum()) / (n_p + n_t),
            "hd95_mm": hd95(p, t, truth.affine),
            "pred_voxels": n_p,
            "truth_voxels": n_t,
            "pred_mm3": n_p * voxel_mm3,
            "truth_mm3": n_t * voxel_mm3,
            "empty": "pred" if n_p == 0 else "truth" if n_t == 0 else None,
        }
    dices = [r["dice"] for r in results.values()]
    distances = [r["hd95_mm"] for r in results.values() if r["hd95_mm"] is not None]
    return {
        "labels": results,
        "mean_dice": sum(dices) / len(dices) if dices else None,
        "mean_hd95_mm": sum(distances) / len(distances) if distances else None,
        "resampled": resampled,
        "pred": pred.path,
        "truth": truth.path,
    }
