"""NIfTI volumes in, NIfTI volumes out: canonical orientation, resampling, intensity normalisation.

Geometry pipeline of :func:`load_volume` (every step recorded in the :class:`Volume`, so that
:func:`save_like` can undo all of them and write exactly on the input file's grid and affine;
:func:`to_original_grid` returns that array instead of writing it):

1. **Reorientation** to the closest canonical RAS+ orientation (``nibabel.as_closest_canonical``
   semantics: axis permutation and flips only, never interpolation; an oblique affine stays oblique).
   ``data[i, j, k]``: ``i`` runs towards subject Right, ``j`` towards Anterior, ``k`` towards Superior.
2. **Resampling** (optional, ``spacing=`` in mm) on the canonical grid, separable linear interpolation
   for images (== trilinear, ``align_corners=True``) and nearest for labels. Convention (as
   ``nibabel.processing.resample_to_output``): the centre of the first voxel (index 0 along every axis)
   is kept, the new spacing is exactly the requested one, and the new grid is the smallest that covers
   every old voxel centre: ``new_size = ceil((old_size - 1) * old_spacing / new_spacing) + 1``. So the
   affine update is exact (each column of the direction/zoom matrix is scaled, the origin is
   unchanged) and no old voxel centre is lost. New centres past the old last centre (less than one new
   voxel) extrapolate the edge linearly up to half an old voxel (the old voxels' physical extent), and
   repeat the edge value beyond. Downsampling an image applies a Gaussian
   anti-alias filter first (sigma = (factor - 1) / 2 old voxels, as scikit-image).
3. **Crop** (optional, :func:`crop_volume` / :func:`crop_to_foreground`): a box of the resampled grid.

nibabel is imported inside the functions that read or write files, so ``import deepatlas_fast``
works on machines without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Volume",
    "load_volume",
    "load_labels",
    "volume_from_array",
    "save_like",
    "to_original_grid",
    "original_index",
    "crop_volume",
    "crop_to_foreground",
    "normalize_intensity",
    "detect_modality",
    "foreground_mask",
    "gaussian_smooth",
    "resample_to_spacing",
    "resample_back",
    "write_label_table",
    "read_label_table",
    "label_names",
    "CT_WINDOW",
    "MR_PERCENTILES",
]

CT_WINDOW = (-1000.0, 1000.0)
"""Default CT window in HU mapped to [0, 1] by :func:`normalize_intensity`."""
MR_PERCENTILES = (0.5, 99.5)
"""Default MR percentiles mapped to [0, 1] by :func:`normalize_intensity`."""

ArrayLike = Union[Tensor, np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]
_Orientation = tuple  # ((canonical_axis, flip), ...) per input axis


@dataclass
class Volume:
    """A 3D volume in canonical RAS+ orientation, with what is needed to write results back.

    Attributes:
        data: ``[D, H, W]`` tensor on the canonical (and possibly resampled / cropped) grid; float32
            for images (:func:`load_volume`), int64 for label maps (:func:`load_labels`).
        affine: ``4x4`` float64 numpy, voxel index of ``data`` -> world (scanner) position in mm.
        original_affine: ``4x4`` float64, the input file's affine.
        original_shape: the input file's 3 spatial sizes.
        orientation: per input axis ``(canonical_axis, flip)`` with ``flip`` in {1, -1} (nibabel
            ``ornt`` convention: flip first, then the input axis becomes ``canonical_axis``).
        canonical_shape: sizes after reorientation, before resampling.
        zoom: per canonical axis, new spacing / old spacing (``(1, 1, 1)``: not resampled). Resampled
            index ``r`` sits at canonical index ``r * zoom``.
        resampled_shape: sizes after resampling, before cropping.
        crop_start: index of ``data[0, 0, 0]`` in the resampled grid (``(0, 0, 0)``: not cropped).
        path: the file read, if any.
    """

    data: Tensor
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple
    orientation: _Orientation = ((0, 1), (1, 1), (2, 1))
    canonical_shape: tuple = ()
    zoom: tuple = (1.0, 1.0, 1.0)
    resampled_shape: tuple = ()
    crop_start: tuple = (0, 0, 0)
    path: Optional[str] = None

    @property
    def shape(self) -> tuple:
        """Spatial shape of :attr:`data`."""
        return tuple(self.data.shape)

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along each axis of :attr:`data` (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))

    @property
    def resampled(self) -> bool:
        return any(abs(z - 1.0) > 1e-12 for z in self.zoom) or tuple(self.resampled_shape) != tuple(
            self.canonical_shape
        )

    def with_data(self, data: ArrayLike) -> "Volume":
        """A copy with new ``data`` of the same spatial shape and the same geometry."""
        data = torch.as_tensor(data)
        if tuple(data.shape) != self.shape:
            raise ValueError(f"data must have the volume's shape {self.shape}, got {tuple(data.shape)}")
        return dataclasses.replace(self, data=data)

    def geometry(self) -> dict:
        """Plain-Python description of the geometry (JSON / ``torch.load(weights_only=True)`` safe)."""
        return {
            "affine": np.asarray(self.affine).tolist(),
            "original_affine": np.asarray(self.original_affine).tolist(),
            "original_shape": list(self.original_shape),
            "orientation": [list(o) for o in self.orientation],
            "canonical_shape": list(self.canonical_shape),
            "zoom": list(self.zoom),
            "resampled_shape": list(self.resampled_shape),
            "crop_start": list(self.crop_start),
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "path": self.path,
        }


# ----------------------------------------------------------------------------------------------
# small helpers


def _path_str(path, name: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(path).__name__}")
    return os.fspath(path)


def _spacing3(spacing, name: str = "spacing") -> tuple:
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        values = (float(spacing),) * 3
    else:
        try:
            values = tuple(float(s) for s in spacing)
        except TypeError:
            raise TypeError(f"{name} must be a number or 3 numbers in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be a positive number or 3 positive numbers in mm, got {spacing!r}")
    return values


def _as_tensor(array, name: str) -> Tensor:
    if isinstance(array, Tensor):
        return array.detach().cpu()
    if isinstance(array, np.ndarray):
        if array.dtype.byteorder not in "=|":
            array = array.astype(array.dtype.newbyteorder("="))
        try:  # keeps Fortran-ordered (NIfTI) arrays as strided views: no copy here
            return torch.from_numpy(array)
        except (ValueError, TypeError):
            return torch.from_numpy(np.ascontiguousarray(array))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}")


def _affine4(affine, name: str = "affine") -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a finite 4x4 matrix, got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name} is singular (zero voxel size or degenerate axes): {a[:3, :3].tolist()}")
    return a


def _orientation_of(affine: np.ndarray) -> _Orientation:
    """Closest canonical orientation of an affine's voxel axes (as ``nibabel.io_orientation``)."""
    rzs = affine[:3, :3]
    zooms = np.linalg.norm(rzs, axis=0)
    rs = rzs / zooms
    # greedily pair voxel axes with world axes by largest |cosine| (unique permutation)
    remaining_in, remaining_out, result = [0, 1, 2], [0, 1, 2], [None, None, None]
    for _ in range(3):
        best = max(
            ((abs(rs[o, i]), i, o) for i in remaining_in for o in remaining_out), key=lambda t: (t[0], -t[1], -t[2])
        )
        _, i, o = best
        result[i] = (o, 1 if rs[o, i] >= 0 else -1)
        remaining_in.remove(i)
        remaining_out.remove(o)
    return tuple(result)


def _orientation_matrix(orientation: _Orientation, shape: Sequence[int]) -> np.ndarray:
    """4x4 map canonical voxel index -> input voxel index."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for i, (o, flip) in enumerate(orientation):
        if flip == 1:
            m[i, o] = 1.0
        else:
            m[i, o] = -1.0
            m[i, 3] = shape[i] - 1
    return m


def _to_canonical(x: Tensor, orientation: _Orientation) -> Tensor:
    """Reorient the last 3 axes of ``x`` (input order) to canonical order."""
    lead = x.dim() - 3
    flips = [lead + i for i, (_, f) in enumerate(orientation) if f == -1]
    if flips:
        x = x.flip(flips)
    # canonical axis o holds input axis i
    perm = [0] * 3
    for i, (o, _) in enumerate(orientation):
        perm[o] = i
    return x.permute(*range(lead), *[lead + p for p in perm]).contiguous()


def _from_canonical(x: Tensor, orientation: _Orientation) -> Tensor:
    """Inverse of :func:`_to_canonical`."""
    lead = x.dim() - 3
    x = x.permute(*range(lead), *[lead + o for o, _ in orientation])
    flips = [lead + i for i, (_, f) in enumerate(orientation) if f == -1]
    if flips:
        x = x.flip(flips)
    return x.contiguous()


def _translation(offset: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def _gaussian_kernel(sigma: float, dtype) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_smooth(x: Tensor, sigma) -> Tensor:
    """Separable Gaussian smoothing of the last 3 axes (edge values replicated at the borders).

    Args:
        x: ``[D, H, W]``, ``[C, D, H, W]`` or ``[N, C, D, H, W]`` floating tensor.
        sigma: standard deviation in voxels, one number or one per axis; 0 leaves an axis untouched.
    Returns: a tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 3:
        raise TypeError("x must be a floating torch.Tensor with at least 3 dims (..., D, H, W)")
    sigmas = _sigma3(sigma)
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-3:])
    for axis, s in enumerate(sigmas):
        if s <= 0 or shape[-3 + axis] == 1:
            continue
        k = _gaussian_kernel(s, y.dtype).to(y.device)
        r = (k.numel() - 1) // 2
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(view))
    return y.reshape(shape)


def _sigma3(sigma) -> tuple:
    if isinstance(sigma, (int, float)):
        values = (float(sigma),) * 3
    else:
        values = tuple(float(s) for s in sigma)
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"sigma must be one or 3 non-negative numbers (voxels), got {sigma!r}")
    return values


def _resample_axis(x: Tensor, axis: int, positions: Tensor, mode: str) -> Tensor:
    """Interpolate ``x`` along ``axis`` at fractional index ``positions``.

    "nearest": nearest index, clamped. "linear": linear inside [0, size - 1], linear extrapolation of
    the end segment up to half a voxel beyond (the end voxels' physical extent), constant further out.
    """
    size = x.shape[axis]
    pos = positions.to(torch.float64)
    if mode == "nearest" or size == 1:
        index = torch.floor(pos + 0.5).long().clamp_(0, size - 1)
        return x.index_select(axis, index.to(x.device))
    # linear: extrapolate up to half a voxel past the end centres (the voxels' physical extent), clamp beyond
    pos = pos.clamp(-0.5, size - 0.5)
    i0 = torch.floor(pos).long().clamp_(0, size - 2)
    w = (pos - i0).to(x.dtype).to(x.device)
    view = [1] * x.dim()
    view[axis] = -1
    w = w.view(view)
    lo = x.index_select(axis, i0.to(x.device))
    hi = x.index_select(axis, (i0 + 1).to(x.device))
    return lo + (hi - lo) * w


def _resample(x: Tensor, positions: Sequence[Tensor], mode: str) -> Tensor:
    """Separable resampling of the last 3 axes at per-axis index positions."""
    lead = x.dim() - 3
    for axis in range(3):
        x = _resample_axis(x, lead + axis, positions[axis], mode)
    return x.contiguous()


def resample_to_spacing(
    data: Tensor, affine: np.ndarray, spacing, mode: str = "linear", antialias: bool = True
) -> tuple:
    """Resample ``data`` (``[..., D, H, W]``) on its voxel axes to ``spacing`` mm.

    Keeps the first voxel centre, uses exactly ``spacing`` (see the module docstring).
    Returns ``(data, affine, zoom)``; ``mode``: "linear" (images) or "nearest" (labels).
    """
    affine = _affine4(affine)
    target = _spacing3(spacing)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    shape = data.shape[-3:]
    zoom = tuple(float(t / o) for t, o in zip(target, old))
    # 1e-4 voxel tolerance: affines stored as float32 make exact ratios inexact
    new_shape = [int(math.ceil((s - 1) / z - 1e-4)) + 1 for s, z in zip(shape, zoom)]
    if mode == "linear" and antialias and data.is_floating_point():
        sigma = [max(0.0, (z - 1.0) / 2.0) if s > 1 else 0.0 for z, s in zip(zoom, shape)]
        if any(s > 0.05 for s in sigma):
            data = gaussian_smooth(data, sigma)
    positions = [torch.arange(n, dtype=torch.float64) * z for n, z in zip(new_shape, zoom)]
    out = _resample(data, positions, mode)
    new_affine = affine @ np.diag([*zoom, 1.0])
    return out, new_affine, zoom


# ----------------------------------------------------------------------------------------------
# building, loading, saving


def volume_from_array(
    array: ArrayLike,
    affine=None,
    spacing=None,
    *,
    labels: bool = False,
    antialias: bool = True,
    path: Optional[str] = None,
) -> Volume:
    """Build a :class:`Volume` from an in-memory 3D array exactly as :func:`load_volume` would.

    Args:
        array: ``[X, Y, Z]`` array in the voxel order of ``affine`` (as stored in a NIfTI file).
        affine: ``4x4`` voxel -> world (mm); default identity (1 mm, RAS).
        spacing: target voxel size in mm (one number or 3, canonical axis order), None keeps the grid.
        labels: integer label map (int64, nearest resampling) instead of an image (float32, linear).
        antialias: Gaussian pre-filter when downsampling an image.
    """
    name = path or "array"
    data = _as_tensor(array, "array")
    if data.dim() != 3:
        raise ValueError(f"{name}: a 3-D volume is needed, got shape {tuple(data.shape)}")
    affine = _affine4(np.eye(4) if affine is None else affine)
    original_shape = tuple(int(s) for s in data.shape)
    orientation = _orientation_of(affine)
    data = _to_canonical(data, orientation)
    canonical_shape = tuple(int(s) for s in data.shape)
    canonical_affine = affine @ _orientation_matrix(orientation, original_shape)
    if not labels:
        data = data.to(torch.float32)
    elif data.is_floating_point() or data.dtype == torch.bool:
        data = data.to(torch.int64)
    zoom, out_affine = (1.0, 1.0, 1.0), canonical_affine
    if spacing is not None:
        data, out_affine, zoom = resample_to_spacing(
            data, canonical_affine, spacing, mode="nearest" if labels else "linear", antialias=antialias
        )
    if labels:
        data = data.to(torch.int64)
    return Volume(
        data=data,
        affine=out_affine,
        original_affine=affine,
        original_shape=original_shape,
        orientation=orientation,
        canonical_shape=canonical_shape,
        zoom=zoom,
        resampled_shape=tuple(int(s) for s in data.shape),
        crop_start=(0, 0, 0),
        path=path,
    )


def _read_nifti(path, what: str = "image"):
    """Read a file with nibabel; returns (array as stored, affine). Clear ValueErrors naming the path."""
    path = _path_str(path)
    if not os.path.exists(path):
        raise ValueError(f"path {path!r}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory, expected a NIfTI file (.nii or .nii.gz)")
    try:
        import nibabel as nib
    except ImportError as e:  # pragma: no cover - the GPU machine
        raise ImportError("reading NIfTI files needs nibabel: pip install nibabel") from e
    try:
        img = nib.load(path)
        affine = np.asarray(img.affine, dtype=np.float64)
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for bad files (ImageFileError, EOFError, zlib...)
        raise ValueError(f"path {path!r}: cannot read as a NIfTI {what} ({type(e).__name__}: {e})") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"path {path!r}: unsupported voxel type {array.dtype} (need real numbers)")
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3 or min(array.shape[:3]) < 2:
        raise ValueError(f"path {path!r}: is a 2-D image (shape {shape}); a 3-D volume is needed")
    if array.ndim > 3:
        raise ValueError(
            f"path {path!r}: is a {array.ndim}-D image (shape {shape}); a single 3-D volume is needed "
            "(split the series into 3-D files first)"
        )
    try:
        affine = _affine4(affine, "affine")
    except ValueError as e:
        raise ValueError(f"path {path!r}: {e}") from None
    return array, affine


def load_volume(path: PathLike, spacing=None, *, antialias: bool = True) -> Volume:
    """Load a 3D NIfTI image, reoriented to canonical RAS+ and optionally resampled.

    Args:
        path: ``.nii`` / ``.nii.gz`` file (any 3-D format nibabel reads; trailing size-1 dims dropped).
        spacing: target voxel size in mm, one number (isotropic) or 3 (canonical R, A, S axes);
            None (default) keeps the file's grid (reoriented only).
        antialias: Gaussian pre-filter when downsampling (default True).
    Returns: a :class:`Volume` with float32 ``data`` ``[D, H, W]`` in the file's units (e.g. HU), its
        affine, and the geometry :func:`save_like` needs.
    Raises: ValueError naming the path for a missing, unreadable, 2-D or 4-D file.
    """
    path = _path_str(path)
    if spacing is not None:
        spacing = _spacing3(spacing)
    array, affine = _read_nifti(path, "image")
    data = _as_tensor(array, "array").to(torch.float32)
    bad = ~torch.isfinite(data) if array.dtype.kind == "f" else None
    if bad is not None and bool(bad.any()):
        fill = float(data[~bad].min()) if bool((~bad).any()) else 0.0
        warnings.warn(f"path {path!r}: {int(bad.sum())} non-finite voxels replaced by the minimum {fill}")
        data = torch.where(bad, torch.full_like(data, fill), data)
    return volume_from_array(data, affine, spacing, antialias=antialias, path=path)


def _integer_labels(array: np.ndarray, path: str) -> np.ndarray:
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(f"path {path!r}: label map has non-finite values")
        rounded = np.round(array)
        bad = rounded != array
        if bad.any():
            example = float(array[bad].flat[0])
            raise ValueError(
                f"path {path!r}: label map has non-integer values (e.g. {example}); "
                "a label map must hold integer ids"
            )
        array = rounded
    if array.size and array.min() < 0:
        raise ValueError(f"path {path!r}: label map has negative ids (min {array.min()}); ids must be >= 0")
    if array.size and array.max() <= np.iinfo(np.int32).max:
        return array.astype(np.int32, copy=array.dtype != np.int32)
    return array.astype(np.int64)


def same_grid(affine_a, shape_a, affine_b, shape_b, atol: float = 1e-3) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, rtol=0, atol=atol)


def _apply_geometry(data: Tensor, like: Volume, mode: str) -> Tensor:
    """Send ``data`` (input-file voxel order, ``like``'s original grid) to ``like``'s grid."""
    data = _to_canonical(data, like.orientation)
    if like.resampled:
        positions = [torch.arange(n, dtype=torch.float64) * z for n, z in zip(like.resampled_shape, like.zoom)]
        data = _resample(data, positions, mode)
    s = like.crop_start
    d, h, w = like.shape
    return data[..., s[0] : s[0] + d, s[1] : s[1] + h, s[2] : s[2] + w].contiguous()


def load_labels(path: PathLike, like: Optional[Volume] = None, spacing=None) -> Volume:
    """Load an integer label map as int64 ``[D, H, W]`` in canonical RAS+ orientation.

    Args:
        path: NIfTI label file (integer ids; float storage accepted when every value is an integer).
        like: an image :class:`Volume`; the label file must be on its original grid (same shape and
            affine within 1e-3 mm) and is brought onto ``like``'s grid with the same reorientation,
            nearest-neighbour resampling and crop, so ``labels.data`` aligns voxel by voxel with
            ``like.data``.
        spacing: target voxel size (nearest resampling) when ``like`` is not given.
    Raises: ValueError naming the path for unreadable, 2-D/4-D, non-integer or mismatched files.
    """
    path = _path_str(path)
    if like is not None and spacing is not None:
        raise ValueError("spacing must be None when like is given (the labels follow like's grid)")
    if like is not None and not isinstance(like, Volume):
        raise TypeError(f"like must be a Volume, got {type(like).__name__}")
    array, affine = _read_nifti(path, "label map")
    array = _integer_labels(array, path)
    if like is None:
        return volume_from_array(array, affine, spacing, labels=True, path=path)
    if not same_grid(affine, array.shape, like.original_affine, like.original_shape):
        raise ValueError(
            f"path {path!r}: label map grid (shape {tuple(array.shape)}, affine "
            f"{np.round(affine, 4).tolist()}) differs from the image's grid (shape {tuple(like.original_shape)}, "
            f"affine {np.round(like.original_affine, 4).tolist()}, file {like.path!r})"
        )
    data = _apply_geometry(_as_tensor(array, "array"), like, "nearest").to(torch.int64)
    return dataclasses.replace(like, data=data, path=path)


def _choose_dtype(data: Tensor, dtype) -> np.dtype:
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            dtype = torch.empty((), dtype=dtype).numpy().dtype
        try:
            return np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a numpy/torch dtype or its name, got {dtype!r}") from None
    if data.dtype == torch.bool:
        return np.dtype(np.uint8)
    if data.is_floating_point():
        return np.dtype(np.float32)
    lo = int(data.min()) if data.numel() else 0
    hi = int(data.max()) if data.numel() else 0
    for candidate in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.int64)


def to_original_grid(array: ArrayLike, reference: Volume, *, mode: Optional[str] = None, fill: float = 0) -> Tensor:
    """``array`` (on ``reference``'s grid) brought back onto the ORIGINAL file's grid, in its voxel order.

    Undoes the crop (outside filled with ``fill``), the resampling (linear for floating data, nearest
    for integer/bool data, or ``mode`` = "linear" | "nearest") and the reorientation: the geometry
    :func:`save_like` writes with, returned instead of written.

    Args:
        array: ``[D, H, W]`` or ``[C, D, H, W]`` tensor or array matching ``reference.data``'s shape.
        reference: the :class:`Volume` the array is aligned with.
    Returns: a CPU tensor ``[*original_shape]`` (or ``[C, *original_shape]``) indexed like the file's
        array (``reference.original_affine`` maps its indices to world mm); bool becomes uint8, and
        integer data becomes float32 when ``mode`` is "linear".
    """
    if not isinstance(reference, Volume):
        raise TypeError(f"reference must be a Volume, got {type(reference).__name__}")
    data = _as_tensor(array, "array")
    if data.dim() not in (3, 4) or tuple(data.shape[-3:]) != reference.shape:
        raise ValueError(
            f"array must have shape {reference.shape} or [C, *{reference.shape}] (reference grid), "
            f"got {tuple(data.shape)}"
        )
    if mode is None:
        mode = "linear" if data.is_floating_point() else "nearest"
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    if mode == "linear" and not data.is_floating_point():
        data = data.to(torch.float32)
    # undo the crop
    full = tuple(reference.resampled_shape) or reference.shape
    if tuple(reference.crop_start) != (0, 0, 0) or full != reference.shape:
        padded = torch.full((*data.shape[:-3], *full), fill, dtype=data.dtype)
        s = reference.crop_start
        d, h, w = reference.shape
        padded[..., s[0] : s[0] + d, s[1] : s[1] + h, s[2] : s[2] + w] = data
        data = padded
    if reference.resampled:
        data = resample_back(data, reference.zoom, reference.canonical_shape, mode)
    return _from_canonical(data, reference.orientation)


def resample_back(data: Tensor, zoom: Sequence[float], shape: Sequence[int], mode: str = "linear") -> Tensor:
    """Undo :func:`resample_to_spacing`: ``data [..., d, h, w]``, resampled from a grid of ``shape`` with
    ``zoom`` (new spacing / old spacing), read back on that grid (index ``i`` sits at resampled index
    ``i / zoom``; linear or nearest, see :func:`_resample_axis` for the ends)."""
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    positions = [torch.arange(int(n), dtype=torch.float64) / float(z) for n, z in zip(shape, zoom)]
    return _resample(data, positions, mode)


def original_index(volume: Volume, index: ArrayLike) -> np.ndarray:
    """Positions on ``volume``'s grid -> (fractional) voxel indices of the ORIGINAL file's array.

    The geometry :func:`to_original_grid` undoes, applied to positions instead of data: the crop offset
    is added, resampled index ``r`` sits at canonical index ``r * zoom``, and the reorientation is undone
    (:func:`_orientation_matrix`). The map is exact and per axis (a permutation with flips and scales,
    never a rotation), so a box on the volume's grid maps to a box on the file's grid.

    Args:
        volume: the :class:`Volume` whose grid the positions are on.
        index: ``[..., 3]`` positions (fractional allowed) in ``volume.data``'s index space.
    Returns: float64 ``[..., 3]`` indices into the file's array (``volume.original_affine`` maps them
        to world mm).
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    positions = np.asarray(index, dtype=np.float64)
    if positions.shape[-1:] != (3,):
        raise ValueError(f"index must have shape [..., 3], got {positions.shape}")
    canonical = (positions + np.asarray(volume.crop_start, dtype=np.float64)) * np.asarray(volume.zoom)
    to_file = _orientation_matrix(volume.orientation, volume.original_shape)
    return canonical @ to_file[:3, :3].T + to_file[:3, 3]


def save_like(
    array: ArrayLike,
    reference: Volume,
    path: PathLike,
    dtype=None,
    *,
    mode: Optional[str] = None,
    fill: float = 0,
) -> str:
    """Write ``array`` (on ``reference``'s grid) as NIfTI on the ORIGINAL file's grid and affine.

    Undoes the crop (outside filled with ``fill``), the resampling (linear for floating data, nearest
    for integer/bool data, or ``mode`` = "linear" | "nearest") and the reorientation
    (:func:`to_original_grid`).

    Args:
        array: ``[D, H, W]`` (or ``[C, D, H, W]``, written as a 4-D file with C last) tensor or array
            matching ``reference.data``'s shape.
        reference: the :class:`Volume` the array is aligned with.
        path: output file (``.nii.gz`` or ``.nii``); parent folders are created.
        dtype: output voxel type; default float32 for floats, the smallest of uint8/uint16/int16/int32
            that holds integer data (labels as uint8/uint16). Floats written to an integer type are rounded.
    Returns: the path written.
    """
    path = _path_str(path)
    if not isinstance(reference, Volume):
        raise TypeError(f"reference must be a Volume, got {type(reference).__name__}")
    data = _as_tensor(array, "array")
    out_dtype = _choose_dtype(data, dtype)
    out = to_original_grid(data, reference, mode=mode, fill=fill).numpy()
    if out.ndim == 4:
        out = np.moveaxis(out, 0, -1)
    if np.issubdtype(out_dtype, np.integer):
        if np.issubdtype(out.dtype, np.floating):
            out = np.round(out)
        info = np.iinfo(out_dtype)
        if out.size and (out.min() < info.min or out.max() > info.max):
            raise ValueError(f"dtype {out_dtype} cannot hold the values [{out.min()}, {out.max()}]")
    out = np.ascontiguousarray(out.astype(out_dtype))
    import nibabel as nib

    affine = np.asarray(reference.original_affine, dtype=np.float64)
    img = nib.Nifti1Image(out, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(out_dtype)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    nib.save(img, path)
    return path


def write_label_table(path: PathLike, names: Mapping[int, str]) -> str:
    """Write a JSON label table ``{"id": "name", ...}`` (ids as strings, sorted numerically)."""
    path = _path_str(path)
    table = {str(int(k)): str(v) for k, v in sorted(((int(k), v) for k, v in names.items()))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
    return path


def read_label_table(path: PathLike, name: str = "path") -> dict:
    """Read a JSON label table ``{"id": "name", ...}`` (as :func:`write_label_table`) -> ``{id (int): name}``.

    Raises ValueError starting with ``name`` (the argument or option the path came from) when the file
    is missing, is not JSON, or is not an object mapping integer ids >= 0 to strings.
    """
    path = _path_str(path, name)
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: {path!r}: cannot read a JSON label table ({e})") from None
    try:
        return label_names(table, name)
    except ValueError as e:
        raise ValueError(f"{e} (file {path!r})") from None


def label_names(table, name: str = "names") -> dict:
    """Validate a label table (a mapping of integer ids >= 0, or their strings, to names) ->
    ``{id (int): name}``; a ValueError starting with ``name`` otherwise."""
    if not isinstance(table, Mapping):
        raise ValueError(f"{name}: must map label ids to names, like {{\"1\": \"liver\"}}, got {type(table).__name__}")
    out = {}
    for key, value in table.items():
        if isinstance(key, (bool, float)) or not str(key).strip().isdecimal():
            raise ValueError(f"{name}: label id {key!r} must be an integer >= 0")
        if not isinstance(value, str):
            raise ValueError(f"{name}: the name of label {key!r} must be a string, got {value!r}")
        out[int(key)] = value
    return out


# ----------------------------------------------------------------------------------------------
# cropping


def crop_volume(volume: Volume, start: Sequence[int], shape: Sequence[int]) -> Volume:
    """A box ``data[start : start + shape]`` of ``volume`` (inside its grid), geometry updated.

    :func:`save_like` on the cropped volume pads back with ``fill`` outside the box.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    start = tuple(int(s) for s in start)
    shape = tuple(int(s) for s in shape)
    if len(start) != 3 or len(shape) != 3:
        raise ValueError(f"start and shape must have 3 entries, got {start} and {shape}")
    for a, (s, n, size) in enumerate(zip(start, shape, volume.shape)):
        if s < 0 or n < 1 or s + n > size:
            raise ValueError(f"crop [{s}, {s + n}) along axis {a} is outside the volume's size {size}")
    data = volume.data[start[0] : start[0] + shape[0], start[1] : start[1] + shape[1], start[2] : start[2] + shape[2]]
    return dataclasses.replace(
        volume,
        data=data.contiguous(),
        affine=np.asarray(volume.affine) @ _translation(start),
        crop_start=tuple(c + s for c, s in zip(volume.crop_start, start)),
    )


def crop_to_foreground(volume: Volume, mask: Optional[Tensor] = None, margin: int = 2) -> Volume:
    """Crop ``volume`` to the bounding box of ``mask`` (default :func:`foreground_mask`) + ``margin`` voxels."""
    if mask is None:
        mask = foreground_mask(volume.data) if volume.data.is_floating_point() else volume.data > 0
    if tuple(mask.shape) != volume.shape:
        raise ValueError(f"mask must have the volume's shape {volume.shape}, got {tuple(mask.shape)}")
    idx = torch.nonzero(mask)
    if idx.numel() == 0:
        return volume
    lo = (idx.min(0).values - int(margin)).clamp(min=0)
    hi = torch.minimum(idx.max(0).values + int(margin) + 1, torch.tensor(volume.shape))
    return crop_volume(volume, lo.tolist(), (hi - lo).tolist())


# ----------------------------------------------------------------------------------------------
# intensities


def quantiles(x: Tensor, qs: Sequence[float]) -> list:
    """The ``qs`` percentiles (0-100) of ``x`` as floats (above 2^24 elements, of a strided subsample)."""
    flat = x.reshape(-1).to(torch.float32)
    if flat.numel() > 1 << 24:
        flat = flat[:: (flat.numel() >> 24) + 1]
    n = flat.numel()
    out = []
    for q in qs:
        k = min(n, max(1, int(round(q / 100.0 * (n - 1))) + 1))
        out.append(float(torch.kthvalue(flat, k).values))
    return out


def detect_modality(data: ArrayLike) -> str:
    """"ct" when the 0.5th percentile is at or below -500 (air in HU), else "mr".

    CT stored without the HU offset (0..4095) reads as "mr": pass ``modality="ct"`` and a window then.
    """
    x = _as_tensor(data, "data").to(torch.float32)
    if x.numel() == 0:
        raise ValueError("data is empty")
    return "ct" if quantiles(x, [0.5])[0] <= -500 else "mr"


def normalize_intensity(
    data: ArrayLike,
    modality: str = "auto",
    *,
    window: Sequence[float] = CT_WINDOW,
    percentiles: Sequence[float] = MR_PERCENTILES,
    clip: bool = True,
) -> Tensor:
    """Map intensities to [0, 1].

    Args:
        data: any-shape tensor/array (e.g. ``[D, H, W]``), HU for CT.
        modality: "ct" (linear HU ``window`` -> [0, 1], default [-1000, 1000]), "mr" (``percentiles``
            of the volume, default 0.5 / 99.5, -> [0, 1]) or "auto" (:func:`detect_modality`).
        clip: clamp to [0, 1] (default True).
    Returns: float32 tensor of ``data``'s shape. A constant MR volume maps to zeros.
    """
    if modality not in ("auto", "ct", "mr"):
        raise ValueError(f"modality must be 'auto', 'ct' or 'mr', got {modality!r}")
    x = _as_tensor(data, "data").to(torch.float32)
    if x.numel() == 0:
        raise ValueError("data is empty")
    if modality == "auto":
        modality = detect_modality(x)
    if modality == "ct":
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"window must be (low, high) with high > low, got {tuple(window)}")
    else:
        p_lo, p_hi = (float(v) for v in percentiles)
        if not 0 <= p_lo < p_hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {tuple(percentiles)}")
        lo, hi = quantiles(x, [p_lo, p_hi])
        if not hi > lo:
            return torch.zeros_like(x)
    y = (x - lo) / (hi - lo)
    return y.clamp_(0.0, 1.0) if clip else y


def _otsu(x: Tensor, bins: int = 256) -> float:
    lo, hi = quantiles(x, [0.0, 99.9])
    if not hi > lo:
        return lo
    hist = torch.histc(x.reshape(-1).clamp(lo, hi), bins=bins, min=lo, max=hi).to(torch.float64)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(hist, 0)
    w1 = w0[-1] - w0
    m0 = torch.cumsum(hist * centres, 0)
    mu0 = m0 / w0.clamp(min=1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(torch.argmax(between[:-1]))
    return float(lo + (k + 1) * (hi - lo) / bins)


def _fill_holes(mask: Tensor) -> Tensor:
    """Fill voxels enclosed by the mask along at least 2 of the 3 axes (lungs, ventricles, bowel gas)."""
    m = mask.to(torch.uint8)
    votes = torch.zeros_like(m)
    for axis in range(3):
        fwd = torch.cummax(m, axis).values
        bwd = torch.cummax(m.flip(axis), axis).values.flip(axis)
        votes += fwd & bwd
    return mask | (votes >= 2)


def foreground_mask(data: ArrayLike, threshold: Optional[float] = None, *, fill_holes: bool = True) -> Tensor:
    """Body / head mask of a ``[D, H, W]`` volume (raw or normalised intensities).

    Threshold (default Otsu's on the histogram) -> 3x3x3 morphological opening (drops isolated noise
    voxels) -> hole filling (voxels enclosed along at least 2 axes, e.g. lungs). Returns bool ``[D, H, W]``.
    """
    x = _as_tensor(data, "data").to(torch.float32)
    if x.dim() != 3:
        raise ValueError(f"data must be [D, H, W], got shape {tuple(x.shape)}")
    t = _otsu(x) if threshold is None else float(threshold)
    mask = x > t
    m = mask[None, None].to(torch.float32)
    opened = F.max_pool3d(-F.max_pool3d(-m, 3, 1, 1), 3, 1, 1)
    mask = opened[0, 0] > 0.5
    if fill_holes:
        mask = _fill_holes(mask)
    return mask
