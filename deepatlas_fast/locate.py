"""Find structures and body regions in new exams through template coordinates (``deepatlas-fast crop`` /
``deepatlas-fast locate``).

* **Template box** (:func:`template_box`, :func:`template_boxes`): a structure labelled on a reference
  exam is described by the box its voxels occupy in template space: the per-axis range of the
  template coordinates of the reference's voxels with that label, on the reference's network grid
  (labels brought there by nearest neighbour). ``percentile`` (default 0: the full extent) trims
  ``p`` % of the voxels at each end per axis for a box robust to stray labels or folded maps.
* **Locate** (:func:`locate`): the target's voxels (network grid) whose coordinates fall inside that box
  (closed, within 1e-6) are the structure; their bounding box, each voxel counted with its physical
  extent (one network voxel, so a coarse network grid does not cut the structure short), is mapped onto
  the ORIGINAL file's index space (:func:`~deepatlas_fast.data.io.original_index`: crop offset,
  resampling zoom, reorientation; a box stays a box), grown by ``margin_mm`` on every side (divided by
  the file's voxel size along each file axis) and clipped to the file. The :class:`Region` holds every
  file voxel whose centre lies inside: ``start`` (inclusive), ``stop`` (exclusive).
* **Crop** (:func:`crop`): the file's own stored data in that box, no resampling (the raw stored values
  and their scaling kept), written with the affine ``original_affine @ translate(start)``: the crop's
  voxel ``(0, 0, 0)`` is the file's voxel ``start``, at the same world position.
* **Coverage** (:func:`coverage`): the template extent an exam covers: per template axis the range of
  the coordinates of its body voxels (:func:`~deepatlas_fast.data.io.foreground_mask` of the exam on its
  network grid; ``percentile`` as above), the fraction of each axis (range / 2) and of the cube (their
  product: the box, not the occupied volume). Given template boxes of labelled structures, each is
  ``inside`` the coverage box (fully), ``partial`` or ``outside``, with the fraction of its box inside.

What coordinates can show: an untrained (identity) model maps every exam's grid onto the whole cube,
so it reports full coverage for any field of view; a trained model maps a partial field of view onto
part of the cube. Template axes 0, 1, 2 follow the canonical R, A, S axes the network runs on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .data.io import Volume, _translation, foreground_mask, original_index, quantiles
from .segment import Exam, exam_coordinates, load_reference

__all__ = [
    "TemplateBox",
    "Region",
    "label_id",
    "template_box",
    "template_boxes",
    "locate",
    "crop",
    "coverage",
    "coverage_from_coordinates",
]

PathLike = Union[str, "os.PathLike[str]"]
Labels = Union[Volume, PathLike]

_TOLERANCE = 1e-6  # template units (box membership) and file voxels (centres on the region's boundary)


def _corners(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The 8 corners ``[8, 3]`` of the box ``[low, high]`` (3 values each)."""
    return np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])],
                    dtype=np.float64)


@dataclass(frozen=True)
class TemplateBox:
    """An axis-aligned box in template coordinates (normalised ``[-1, 1]``, template axes D, H, W)."""

    low: tuple
    high: tuple
    label: Optional[int] = None
    name: Optional[str] = None
    percentile: float = 0.0
    """Percent of the voxels left out at each end per axis when the box was measured (0: full extent)."""

    def contains(self, coords: Tensor) -> Tensor:
        """Which points of ``coords`` ``[3, ...]`` lie inside the (closed) box: bool ``[...]``."""
        low = torch.tensor(self.low, dtype=coords.dtype, device=coords.device).view(3, *[1] * (coords.dim() - 1))
        high = torch.tensor(self.high, dtype=coords.dtype, device=coords.device).view_as(low)
        return ((coords >= low - _TOLERANCE) & (coords <= high + _TOLERANCE)).all(0)

    def to_dict(self) -> dict:
        """JSON-ready ``{"label", "name", "low", "high", "percentile"}``."""
        return {"label": self.label, "name": self.name, "low": list(self.low), "high": list(self.high),
                "percentile": self.percentile}


@dataclass(frozen=True, eq=False)
class Region:
    """A box of a target file's ORIGINAL voxel grid holding a located structure (see the module docstring)."""

    start: tuple
    """First voxel (inclusive) per file axis, in the file's own array order."""
    stop: tuple
    """End (exclusive) per file axis."""
    affine: np.ndarray
    """The crop's affine: its voxel index -> world mm (the file's affine translated to ``start``)."""
    original_shape: tuple
    """The file's 3 spatial sizes (a crop checks it is given the same file)."""
    box: TemplateBox
    """The template box located."""
    margin_mm: float
    """The margin added on every side, in mm."""
    voxels: int
    """Target voxels (network grid) found inside the template box."""
    source: Optional[str] = None

    @property
    def shape(self) -> tuple:
        """The crop's 3 sizes."""
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def world_bounds(self) -> tuple:
        """``(min, max)`` world mm (RAS), per axis, over the centres of the crop's corner voxels."""
        corners = _corners(np.zeros(3), np.asarray(self.shape) - 1)
        world = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return tuple(world.min(0).tolist()), tuple(world.max(0).tolist())

    def to_dict(self) -> dict:
        """JSON-ready description (``start``/``stop`` are file voxel indices, ``stop`` exclusive)."""
        low, high = self.world_bounds()
        return {
            "source": self.source,
            "label": self.box.label,
            "name": self.box.name,
            "start": list(self.start),
            "stop": list(self.stop),
            "shape": list(self.shape),
            "original_shape": list(self.original_shape),
            "margin_mm": self.margin_mm,
            "world_min_mm": list(low),
            "world_max_mm": list(high),
            "affine": np.asarray(self.affine).tolist(),
            "found_voxels": self.voxels,
            "template_box": self.box.to_dict(),
        }


def label_id(label: Union[int, str], names: Optional[Mapping[int, str]] = None) -> int:
    """A label id from an id (int or decimal string) or a name of ``names`` (``{id: name}``, matched
    case-insensitively); a ValueError listing the known names otherwise."""
    if isinstance(label, bool):
        raise ValueError(f"label: an id or a name is needed, got {label!r}")
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdecimal()):
        return int(label)
    if not isinstance(label, str):
        raise ValueError(f"label: an id or a name is needed, got {label!r}")
    if not names:
        raise ValueError(f"label {label!r} is not an integer id; give a label table to use names")
    found = [i for i, n in names.items() if n.lower() == label.strip().lower()]
    if not found:
        raise ValueError(f"unknown label name {label!r} (known: {', '.join(sorted(names.values()))})")
    return found[0]


def _percentile(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 50:
        raise ValueError(f"percentile must be a number in [0, 50), got {value!r}")
    return float(value)


def _extent(points: Tensor, percentile: float) -> tuple:
    """Per-axis ``(low, high)`` of ``points [3, N]``: the ``percentile`` and ``100 - percentile`` values."""
    bounds = [quantiles(points[a], [percentile, 100.0 - percentile]) for a in range(3)]
    return tuple(b[0] for b in bounds), tuple(b[1] for b in bounds)


def _reference(model, reference: Exam, reference_labels: Labels) -> tuple[Tensor, Tensor]:
    """The reference's coordinates ``[3, d, h, w]`` and label ids ``[d, h, w]`` on its network grid."""
    volume, labels = load_reference(model, reference, reference_labels)
    coords, _ = exam_coordinates(model, volume)
    return coords[0].cpu(), labels.data


def template_boxes(
    model,
    reference: Exam,
    reference_labels: Labels,
    names: Optional[Mapping[int, str]] = None,
    *,
    percentile: float = 0.0,
) -> dict:
    """The template box of every structure labelled on a reference: ``{label id: TemplateBox}``.

    Args:
        model: a :class:`~deepatlas_fast.model.DeepAtlas`.
        reference: a NIfTI path or a :class:`~deepatlas_fast.data.io.Volume` at the model's spacing.
        reference_labels: its label map (a NIfTI path on the reference file's grid, or a label Volume on
            the reference's network grid).
        names: ``{id: name}`` given to the boxes.
        percentile: ``p`` % of the voxels left out at each end per axis (default 0: the full extent).
    """
    percentile = _percentile(percentile)
    coords, labels = _reference(model, reference, reference_labels)
    names = dict(names or {})
    boxes = {}
    for label in torch.unique(labels).tolist():
        if label != 0:
            low, high = _extent(coords[:, labels == label], percentile)
            boxes[label] = TemplateBox(low, high, label, names.get(label), percentile)
    return boxes


def template_box(
    model,
    reference: Exam,
    reference_labels: Labels,
    label: Union[int, str],
    names: Optional[Mapping[int, str]] = None,
    *,
    percentile: float = 0.0,
) -> TemplateBox:
    """The template box of one structure labelled on a reference (see :func:`template_boxes`).

    ``label``: an id or a name of ``names``. A ValueError when the name is unknown or the label has no
    voxel on the reference's network grid (absent from the file, or smaller than the model's voxel).
    """
    percentile = _percentile(percentile)
    wanted = label_id(label, names)
    coords, labels = _reference(model, reference, reference_labels)
    mask = labels == wanted
    if not bool(mask.any()):
        present = [i for i in torch.unique(labels).tolist() if i != 0]
        raise ValueError(
            f"label {wanted} has no voxel on the reference's label map at the model's spacing "
            f"(ids present: {', '.join(map(str, present)) or 'none'}; a structure smaller than the model's "
            "voxel can vanish when the labels are resampled)"
        )
    low, high = _extent(coords[:, mask], percentile)
    return TemplateBox(low, high, wanted, (names or {}).get(wanted), percentile)


def locate(model, target: Exam, box: TemplateBox, margin_mm: float = 0.0) -> Region:
    """The box of the target file's ORIGINAL grid holding the target voxels whose template coordinates
    fall inside ``box``, grown by ``margin_mm`` (see the module docstring).

    Args:
        model: the model the box was measured with.
        target: a NIfTI path or a :class:`~deepatlas_fast.data.io.Volume` at the model's spacing.
        box: from :func:`template_box`.
        margin_mm: added on every side, in mm (clipped to the file).
    Raises: ValueError when no target voxel falls inside the box (the structure is outside the exam).
    """
    if not isinstance(box, TemplateBox):
        raise TypeError(f"box must be a TemplateBox (from template_box), got {type(box).__name__}")
    if isinstance(margin_mm, bool) or not isinstance(margin_mm, (int, float)) or not 0 <= margin_mm < float("inf"):
        raise ValueError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
    coords, volume = exam_coordinates(model, target)
    found = torch.nonzero(box.contains(coords[0])).cpu()
    if not len(found):
        what = "the template box" if box.label is None else f"the box of label {box.label}"
        raise ValueError(
            f"target {volume.path or '(in memory)'}: no voxel has template coordinates inside {what}"
            f"{f' ({box.name})' if box.name else ''}; the structure is outside the exam's field of view"
        )
    low = found.min(0).values.double().numpy() - 0.5  # each network voxel with its extent
    high = found.max(0).values.double().numpy() + 0.5
    in_file = original_index(volume, _corners(low, high))
    margin = margin_mm / np.linalg.norm(np.asarray(volume.original_affine)[:3, :3], axis=0)  # file voxels
    size = np.asarray(volume.original_shape)
    start = np.clip(np.ceil(in_file.min(0) - margin - _TOLERANCE), 0, size - 1).astype(int)
    stop = np.clip(np.floor(in_file.max(0) + margin + _TOLERANCE) + 1, start + 1, size).astype(int)
    return Region(
        start=tuple(start.tolist()),
        stop=tuple(stop.tolist()),
        affine=np.asarray(volume.original_affine) @ _translation(start),
        original_shape=tuple(volume.original_shape),
        box=box,
        margin_mm=float(margin_mm),
        voxels=len(found),
        source=volume.path,
    )


def crop(target_path: PathLike, region: Region, out_path: PathLike) -> str:
    """Write the ``region`` of the target NIfTI file as a new NIfTI file, without resampling.

    The stored values, their type and scaling (``scl_slope``/``scl_inter``) and the header are kept; the
    sform and qform (those set in the file, both when neither is) get :attr:`Region.affine`, so every
    voxel of the crop keeps its world position. Returns the path written.
    """
    import nibabel as nib

    target_path, out_path = os.fspath(target_path), os.fspath(out_path)
    if not isinstance(region, Region):
        raise TypeError(f"region must be a Region (from locate), got {type(region).__name__}")
    if not out_path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"out_path {out_path!r} must end in .nii or .nii.gz")
    if not os.path.isfile(target_path):
        raise ValueError(f"path {target_path!r}: no such file")
    try:
        image = nib.load(target_path)
    except Exception as exc:  # nibabel raises many types for bad files
        raise ValueError(f"path {target_path!r}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image included
        raise ValueError(f"path {target_path!r}: a NIfTI file is needed to crop, got {type(image).__name__}")
    if tuple(image.shape[:3]) != tuple(region.original_shape):
        raise ValueError(
            f"path {target_path!r}: its grid {tuple(image.shape[:3])} is not the one the region was located "
            f"on {tuple(region.original_shape)}"
        )
    box = tuple(slice(a, b) for a, b in zip(region.start, region.stop))
    stored = np.asanyarray(image.dataobj.get_unscaled())[box]
    header = image.header
    out = type(image)(stored, None, header=header)
    codes = {"sform": int(header["sform_code"]), "qform": int(header["qform_code"])}
    if not any(codes.values()):
        codes = {"sform": 1, "qform": 1}
    for form, code in codes.items():
        getattr(out, f"set_{form}")(region.affine if code else None, code=code)
    out.header.set_slope_inter(image.dataobj.slope, image.dataobj.inter)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    nib.save(out, out_path)
    return out_path


def _overlap(low: Sequence[float], high: Sequence[float], box: TemplateBox) -> float:
    """The fraction of ``box`` inside ``[low, high]`` (per-axis fractions multiplied; a flat axis counts
    1 when inside, 0 when not)."""
    fraction = 1.0
    for lo, hi, b_lo, b_hi in zip(low, high, box.low, box.high):
        length = b_hi - b_lo
        if length <= _TOLERANCE:
            fraction *= float(lo - _TOLERANCE <= b_lo <= hi + _TOLERANCE)
        else:
            fraction *= max(0.0, min(hi, b_hi) - max(lo, b_lo)) / length
    return fraction


def coverage_from_coordinates(
    coords: Tensor,
    body: Optional[Tensor] = None,
    structures: Optional[Sequence[TemplateBox]] = None,
    *,
    percentile: float = 0.0,
) -> dict:
    """The template extent covered by an exam's coordinates (see :func:`coverage`).

    Args:
        coords: ``[1, 3, d, h, w]`` template coordinates (bounded to the cube).
        body: bool ``[d, h, w]``, the voxels measured (default all).
        structures: template boxes (:func:`template_boxes`) to place inside or outside the coverage.
        percentile: ``p`` % of the body voxels left out at each end per axis (default 0: full extent).
    Returns: a JSON-ready dict ``{"low", "high", "fraction", "cube_fraction", "body_voxels", "percentile"}``
        plus ``"structures"`` (a list of ``{"label", "name", "low", "high", "overlap", "status"}``, status
        "inside" | "partial" | "outside") when ``structures`` is given.
    """
    percentile = _percentile(percentile)
    if not isinstance(coords, Tensor) or coords.dim() != 5 or coords.shape[:2] != (1, 3):
        raise ValueError("coords must be a tensor [1, 3, d, h, w]")
    points = coords[0].detach().cpu()
    if body is not None:
        if tuple(body.shape) != tuple(points.shape[1:]):
            raise ValueError(f"body must have the coordinates' grid {tuple(points.shape[1:])}, got {tuple(body.shape)}")
        points = points[:, body.cpu().bool()]
    points = points.reshape(3, -1)
    if not points.shape[1]:
        raise ValueError("no body voxel: nothing to measure")
    low, high = _extent(points, percentile)
    fraction = [max(0.0, hi - lo) / 2 for lo, hi in zip(low, high)]
    result = {
        "low": list(low),
        "high": list(high),
        "fraction": fraction,
        "cube_fraction": float(np.prod(fraction)),
        "body_voxels": int(points.shape[1]),
        "percentile": percentile,
    }
    if structures is not None:
        found = []
        for box in structures:
            if not isinstance(box, TemplateBox):
                raise TypeError(f"structures must hold TemplateBoxes (template_boxes(...).values()), got {box!r}")
            inside = _overlap(low, high, box)
            status = "inside" if inside >= 1 - _TOLERANCE else "partial" if inside > 0 else "outside"
            found.append({**box.to_dict(), "overlap": inside, "status": status})
        result["structures"] = found
    return result


def coverage(
    model, exam: Exam, structures: Optional[Sequence[TemplateBox]] = None, *, percentile: float = 0.0
) -> dict:
    """Body-region metadata of an exam: the template extent its body covers, and which structures of
    ``structures`` (template boxes of a labelled reference, :func:`template_boxes`) lie in it.

    The body is :func:`~deepatlas_fast.data.io.foreground_mask` of the exam on its network grid (all
    voxels when it finds none). Returns :func:`coverage_from_coordinates`'s dict plus ``"exam"`` (the path).
    """
    coords, volume = exam_coordinates(model, exam)
    body = foreground_mask(volume.data)
    if not bool(body.any()):
        body = None
    return {"exam": volume.path, **coverage_from_coordinates(coords, body, structures, percentile=percentile)}
