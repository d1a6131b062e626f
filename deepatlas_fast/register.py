"""Classic iterative registration on this package's ops: affine, then multi-scale deformable.

A baseline for DeepATLAS and a showcase of the ops for other frameworks: every similarity is
:func:`deepatlas_fast.lncc`, every resampling :func:`deepatlas_fast.sample`, the folding regulariser
:func:`deepatlas_fast.jacobian_var`.

**World coordinates.** Both images are :class:`~deepatlas_fast.data.io.Volume` objects (canonical
RAS+ ``[D, H, W]``, affine voxel -> world mm), so they may lie on different grids, orientations and
spacings. A transform maps a *fixed* world point ``x`` (mm) to the *moving* world point

    y = A @ x + t + v(x)

with ``(A, t)`` the affine (:attr:`AffineResult.matrix`, 4x4) and ``v`` the deformable displacement in
mm along the world axes (:attr:`DeformableResult.displacement`, zero for an affine registration). The
moving image is read at ``y`` through its own affine: the whole chain (fixed voxel -> world ->
moving world -> moving voxel -> normalised moving coordinates) is one coordinate field for
:func:`deepatlas_fast.sample` (:func:`coordinates`).

**Working grids.** Registration runs on copies of both images resampled to an isotropic working
spacing (default :func:`default_spacing`: the finest input spacing, coarsened until the larger image
has at most 96 voxels per side), intensities mapped to [0, 1] by
:func:`~deepatlas_fast.data.io.normalize_intensity` (CT window or MR percentiles, detected per image),
and a pyramid of coarser copies (spacing x 4, x 2, x 1 by default; levels whose fixed grid would have
a side under 8 voxels are skipped). Results are applied to the full-resolution images
(:func:`warp_image`, :func:`warp_labels`), on the fixed image's own grid.

**Affine** (:func:`affine_register`): ``y = c_m + r * p + expm(B) (x - c_f)``, where ``c_f`` and ``c_m``
are the centres of mass of the two foreground masks (:func:`~deepatlas_fast.data.io.foreground_mask`;
so the optimisation starts with the bodies' centres aligned), ``r`` the RMS radius of the fixed
foreground (mm), ``p`` the translation in units of ``r`` and ``B`` a 3x3 matrix: its antisymmetric part
is the rotation (radians), its diagonal the log scales, its symmetric off-diagonal part the shears.
Every parameter is dimensionless and moves points at the foreground's typical radius by about
``r`` times its change, so one Adam learning rate suits all of them. ``expm(B)`` never reflects.
``transform="rigid"`` keeps only the rotation (and the translation).

**Deformable** (:func:`deformable_register`): on top of a fixed affine, a displacement field on the
fixed working grid, optimised coarse to fine with Adam (in voxels of the current level) on
``lncc + jacobian_weight * jacobian_var(normalised)``; after every step the field is smoothed with a
Gaussian of ``sigma`` voxels (the classic demons-style diffusion regularisation). The field of each
level is trilinearly upsampled to start the next. The result reports the folding fraction (share of
working voxels where the determinant of the map's Jacobian is <= 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.io import Volume, foreground_mask, gaussian_smooth, normalize_intensity, resample_to_spacing
from .ops import jacobian_var, lncc, sample

__all__ = [
    "AffineResult",
    "DeformableResult",
    "default_spacing",
    "affine_register",
    "deformable_register",
    "coordinates",
    "warp_image",
    "warp_labels",
]

MAX_WORKING_SIZE = 96
"""Default cap on the working grid's side (voxels) of the larger image, see :func:`default_spacing`."""
MIN_LEVEL_SIZE = 8
"""Pyramid levels whose fixed grid would have a side under this many voxels are skipped."""


@dataclass
class AffineResult:
    """An affine registration of a moving image to a fixed image.

    Attributes:
        matrix: 4x4 float64, fixed world point (mm) -> moving world point (mm).
        fixed_affine, fixed_shape: the fixed image's grid (:func:`warp_image` writes on it).
        spacing: working spacing in mm.
        lncc_initial: mean local NCC (squared correlation, in [0, 1]; higher is better) of the images
            as they lie in the scanner frame (identity transform), on the working grid.
        lncc: the same after registration.
        seconds: wall time of the registration.
    """

    matrix: np.ndarray
    fixed_affine: np.ndarray
    fixed_shape: tuple
    spacing: float
    lncc_initial: float
    lncc: float
    seconds: float


@dataclass
class DeformableResult:
    """An affine plus deformable registration of a moving image to a fixed image.

    Attributes:
        affine: the affine stage (its ``matrix`` is applied first).
        displacement: ``[3, d, h, w]`` float32 displacement ``v`` in mm along the world (R, A, S) axes,
            added to the affine's moving point, on the working fixed grid ``grid_affine`` / ``grid_shape``.
        grid_affine, grid_shape: the working fixed grid (voxel -> world mm) carrying ``displacement``.
        lncc: mean local NCC after registration on the working grid (``affine.lncc`` before this stage).
        folding: share of working voxels where the map's Jacobian determinant is <= 0.
        seconds: wall time of the deformable stage (the affine's is in ``affine.seconds``).
    """

    affine: AffineResult
    displacement: Tensor
    grid_affine: np.ndarray
    grid_shape: tuple
    lncc: float
    folding: float
    seconds: float

    @property
    def matrix(self) -> np.ndarray:
        """The affine stage's 4x4 world matrix, fixed -> moving."""
        return self.affine.matrix

    @property
    def fixed_affine(self) -> np.ndarray:
        return self.affine.fixed_affine

    @property
    def fixed_shape(self) -> tuple:
        return self.affine.fixed_shape


Result = Union[AffineResult, DeformableResult]


# ----------------------------------------------------------------------------------------------
# geometry


def _normalizer(shape: Sequence[int]) -> np.ndarray:
    """4x4 voxel index -> normalised coordinate (align_corners=True; a size-1 axis maps to 0)."""
    m = np.eye(4)
    for k, n in enumerate(shape):
        m[k, k] = 2.0 / (n - 1) if n > 1 else 0.0
        m[k, 3] = -1.0 if n > 1 else 0.0
    return m


def _world_to_normalized(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """4x4 world (mm) -> normalised coordinate of the grid (``affine``, ``shape``)."""
    return _normalizer(shape) @ np.linalg.inv(affine)


def _index_grid(shape: Sequence[int], device: torch.device) -> Tensor:
    """``[3, D, H, W]`` float32 voxel indices of a grid."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _apply(matrix: Tensor, points: Tensor) -> Tensor:
    """``matrix`` (4x4) applied to ``points`` ``[3, D, H, W]`` -> ``[1, 3, D, H, W]`` float32."""
    m = matrix.to(torch.float32)
    return (torch.einsum("ij,jdhw->idhw", m[:3, :3], points) + m[:3, 3].view(3, 1, 1, 1))[None]


def _linear(matrix: np.ndarray, field: Tensor) -> Tensor:
    """The top-left 3x3 block of ``matrix`` applied to a vector field ``[1, 3, D, H, W]``."""
    m = torch.as_tensor(matrix[:3, :3], dtype=torch.float32, device=field.device)
    return torch.einsum("ij,njdhw->nidhw", m, field)


def _grid_map(src_affine: np.ndarray, src_shape: Sequence[int], dst_affine: np.ndarray, device) -> Tensor:
    """4x4 (float64 tensor) voxel index of a dst grid -> normalised coordinate of the src grid, through world."""
    return torch.as_tensor(_world_to_normalized(src_affine, src_shape) @ dst_affine, dtype=torch.float64, device=device)


def _displacement_at(result: DeformableResult, affine: np.ndarray, shape: Sequence[int], device) -> Tensor:
    """``result.displacement`` (mm) read at the voxel centres of the grid (``affine``, ``shape``): ``[1, 3, ...]``."""
    to_working = _grid_map(result.grid_affine, result.grid_shape, affine, device)
    field = result.displacement.to(device=device, dtype=torch.float32)[None]
    return sample(field, _apply(to_working, _index_grid(shape, device)), "border")


def coordinates(result: Result, moving: Volume, *, device: Union[str, torch.device] = "cpu") -> Tensor:
    """The coordinate field ``[1, 3, D, H, W]`` on ``result``'s fixed grid into ``moving``'s grid.

    Normalised coordinates (``align_corners=True``) of ``moving.data``, ready for
    :func:`deepatlas_fast.sample`: entry ``[0, :, i, j, k]`` is where fixed voxel ``(i, j, k)`` lands.
    ``moving`` may be any grid of the moving subject (e.g. its label map from ``load_labels(like=)``).
    """
    device = torch.device(device)
    to_moving = _world_to_normalized(moving.affine, moving.shape)
    chain = torch.as_tensor(to_moving @ result.matrix @ result.fixed_affine, dtype=torch.float64, device=device)
    coords = _apply(chain, _index_grid(result.fixed_shape, device))
    if isinstance(result, DeformableResult):
        v = _displacement_at(result, result.fixed_affine, result.fixed_shape, device)
        coords = coords + _linear(to_moving, v)
    return coords


def warp_image(result: Result, moving: Volume, *, device: Union[str, torch.device] = "cpu") -> Tensor:
    """``moving.data`` (its own units, e.g. HU) resampled trilinearly on the fixed grid: ``[D, H, W]`` float32.

    Fixed voxels that map outside the moving image's field of view get the moving image's minimum
    (air / background).
    """
    data = moving.data.to(device=device, dtype=torch.float32)
    low = data.min()
    coords = coordinates(result, moving, device=device)
    return (sample((data - low)[None, None], coords, "zeros")[0, 0] + low).cpu()


def warp_labels(result: Result, moving_labels: Volume, *, device: Union[str, torch.device] = "cpu") -> Tensor:
    """An integer label map of the moving subject carried onto the fixed grid: ``[D, H, W]`` int64.

    Each label's indicator is sampled trilinearly and every fixed voxel takes the label of the largest
    value (one-hot sampling + argmax, one label at a time, so memory does not grow with the label
    count); outside the moving field of view: background 0.
    """
    labels = moving_labels.data.to(device)
    if labels.is_floating_point():
        raise ValueError("moving_labels must hold integer ids (read it with load_labels)")
    coords = coordinates(result, moving_labels, device=device)
    best = torch.zeros(coords.shape[2:], device=device)
    out = torch.zeros(coords.shape[2:], dtype=torch.int64, device=device)
    for label in torch.unique(labels).tolist():
        score = sample((labels == label).to(torch.float32)[None, None], coords, "zeros")[0, 0]
        better = score > best
        best = torch.where(better, score, best)
        out[better] = label
    return out.cpu()


# ----------------------------------------------------------------------------------------------
# working images


def default_spacing(fixed: Volume, moving: Volume, max_size: int = MAX_WORKING_SIZE) -> float:
    """Working spacing (mm): the finest spacing of either image, coarsened so that the larger of the
    two images spans at most ``max_size`` voxels along every axis."""
    extent = max((n - 1) * s for v in (fixed, moving) for n, s in zip(v.shape, v.spacing))
    finest = min(min(v.spacing) for v in (fixed, moving))
    return max(finest, extent / (max_size - 1))


@dataclass
class _Image:
    """One image on one pyramid level: ``[1, 1, D, H, W]`` intensities in [0, 1] and its grid."""

    data: Tensor
    affine: np.ndarray

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[2:])


@dataclass
class _Level:
    fixed: _Image
    moving: _Image
    spacing: float


@dataclass
class _Pair:
    """The normalised images on every pyramid level (coarse to fine) and the foreground geometry."""

    levels: list
    fixed_centre: np.ndarray
    moving_centre: np.ndarray
    radius: float

    @property
    def finest(self) -> _Level:
        return self.levels[-1]


def _normalized(volume: Volume, name: str) -> Tensor:
    if not isinstance(volume, Volume):
        raise TypeError(f"{name} must be a Volume (deepatlas_fast.data.io.load_volume), got {type(volume).__name__}")
    if not volume.data.is_floating_point():
        raise ValueError(f"{name} must be an image with floating-point intensities, got {volume.data.dtype} data")
    return normalize_intensity(volume.data)


def _foreground(image: _Image, name: str) -> tuple:
    """Centre of mass (world mm) and world positions of the foreground voxels of a working image."""
    mask = foreground_mask(image.data[0, 0].cpu())
    index = torch.nonzero(mask).to(torch.float64).numpy()
    if len(index) == 0:
        raise ValueError(f"{name}: no foreground found (the image is empty or constant)")
    points = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    return points.mean(axis=0), points


def _prepare(fixed: Volume, moving: Volume, spacing: Optional[float], levels: int, device) -> _Pair:
    f_data, m_data = _normalized(fixed, "fixed"), _normalized(moving, "moving")
    if spacing is None:
        spacing = default_spacing(fixed, moving)
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a positive number of mm, got {spacing!r}")
    if not (isinstance(levels, int) and levels >= 1):
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    pyramid = []
    for level in range(levels):
        factor = 2 ** (levels - 1 - level)
        step = float(spacing) * factor
        images = []
        for data, volume in ((f_data, fixed), (m_data, moving)):
            out, affine, _ = resample_to_spacing(data, volume.affine, step)
            images.append(_Image(out.to(device)[None, None].contiguous(), affine))
        if factor > 1 and min(images[0].shape) < MIN_LEVEL_SIZE:
            continue
        pyramid.append(_Level(images[0], images[1], step))
    fixed_centre, points = _foreground(pyramid[-1].fixed, "fixed")
    moving_centre, _ = _foreground(pyramid[-1].moving, "moving")
    radius = float(np.sqrt(((points - fixed_centre) ** 2).sum(axis=1).mean()))
    return _Pair(pyramid, fixed_centre, moving_centre, max(radius, float(spacing)))


def _per_level(value, pair: _Pair, levels: int, name: str) -> list:
    """A per-level setting, given once for all levels or once per requested level (coarse to fine),
    for the levels ``pair`` kept (the finest ones: coarse levels of small images are skipped)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, levels):
        raise ValueError(f"{name} must be one value or one per pyramid level ({levels}), got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name} must hold numbers >= 0, got {value!r}")
    if len(values) == 1:
        values = values * levels
    return values[levels - len(pair.levels) :]


def _similarity(level: _Level, coords: Tensor, kernel_size: int) -> Tensor:
    """The LNCC loss (-mean NCC) of the moving image sampled at ``coords`` against the fixed image."""
    return lncc(sample(level.moving.data, coords, "border"), level.fixed.data, kernel_size=kernel_size)


def _affine_coords(level: _Level, world: Tensor, grid: Tensor) -> Tensor:
    """Coordinates into the level's moving image of the fixed voxels ``grid`` under the world matrix ``world``."""
    to_moving = torch.as_tensor(_world_to_normalized(level.moving.affine, level.moving.shape), dtype=torch.float64,
                                device=world.device)
    fixed_affine = torch.as_tensor(level.fixed.affine, dtype=torch.float64, device=world.device)
    return _apply(to_moving @ world @ fixed_affine, grid)


def _affine_ncc(level: _Level, world: Tensor, kernel_size: int) -> float:
    """Mean local NCC (higher is better) on ``level`` under the world matrix ``world``."""
    with torch.no_grad():
        coords = _affine_coords(level, world, _index_grid(level.fixed.shape, world.device))
        return -float(_similarity(level, coords, kernel_size))


# ----------------------------------------------------------------------------------------------
# affine


def _affine_matrix(params: Tensor, pair: _Pair, rigid: bool) -> Tensor:
    """4x4 float64 world matrix of the affine parameters (see the module docstring).

    ``params``: 12 values, ``B`` row-major then the translation ``p`` (units of the foreground radius).
    """
    b = params[:9].view(3, 3)
    if rigid:
        b = 0.5 * (b - b.T)
    linear = torch.linalg.matrix_exp(b)
    c_f = torch.as_tensor(pair.fixed_centre, dtype=torch.float64, device=params.device)
    c_m = torch.as_tensor(pair.moving_centre, dtype=torch.float64, device=params.device)
    shift = c_m + pair.radius * params[9:] - linear @ c_f
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64, device=params.device)
    return torch.cat([torch.cat([linear, shift[:, None]], dim=1), bottom])


def affine_register(
    fixed: Volume,
    moving: Volume,
    *,
    transform: str = "affine",
    spacing: Optional[float] = None,
    levels: int = 3,
    iterations: Union[int, Sequence[int]] = (100, 50, 25),
    learning_rate: Union[float, Sequence[float]] = (0.02, 0.01, 0.005),
    kernel_size: int = 7,
    device: Union[str, torch.device] = "cpu",
    quiet: bool = False,
) -> AffineResult:
    """Affine (or rigid) registration of ``moving`` to ``fixed`` in world coordinates.

    Adam on :func:`deepatlas_fast.lncc` (box window) over a pyramid, starting from the foreground
    centres of mass aligned (see the module docstring for the parameterisation).

    Args:
        fixed, moving: image Volumes (:func:`~deepatlas_fast.data.io.load_volume`), any grids.
        transform: "affine" (12 degrees of freedom) or "rigid" (rotation and translation).
        spacing: working spacing in mm (default :func:`default_spacing`).
        levels: pyramid levels, spacing x 2^(levels-1) ... x 1 (default 3: x4, x2, x1).
        iterations: Adam steps per level, coarse to fine (default 100, 50, 25), or one number for all;
            when coarse levels are skipped (small images) the finest values are used.
        learning_rate: Adam learning rate per level (default 0.02, 0.01, 0.005), or one for all.
        kernel_size: odd LNCC box window in voxels of each level (default 7).
        device: where to compute ("cpu" or "cuda").
        quiet: no progress bar.
    Returns: an :class:`AffineResult`.
    """
    if transform not in ("affine", "rigid"):
        raise ValueError(f"transform must be 'affine' or 'rigid', got {transform!r}")
    start = time.perf_counter()
    device = torch.device(device)
    pair = _prepare(fixed, moving, spacing, levels, device)
    steps = [int(n) for n in _per_level(iterations, pair, levels, "iterations")]
    rates = _per_level(learning_rate, pair, levels, "learning_rate")
    params = torch.zeros(12, dtype=torch.float64, device=device, requires_grad=True)
    rigid = transform == "rigid"
    with tqdm(total=sum(steps), disable=quiet, desc="affine", unit="step", dynamic_ncols=True) as bar:
        for index, (level, count, rate) in enumerate(zip(pair.levels, steps, rates)):
            grid = _index_grid(level.fixed.shape, device)
            optimizer = torch.optim.Adam([params], lr=rate)
            for _ in range(count):
                optimizer.zero_grad(set_to_none=True)
                loss = _similarity(level, _affine_coords(level, _affine_matrix(params, pair, rigid), grid), kernel_size)
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(level=f"{index + 1}/{len(pair.levels)}", lncc=f"{-loss.item():.4f}", refresh=False)
    with torch.no_grad():
        matrix = _affine_matrix(params, pair, rigid)
    return _affine_result(fixed, pair, matrix, kernel_size, time.perf_counter() - start)


def _affine_result(fixed: Volume, pair: _Pair, matrix: Tensor, kernel_size: int, seconds: float) -> AffineResult:
    """An :class:`AffineResult` for the world matrix ``matrix``, its LNCC measured on the finest level."""
    identity = torch.eye(4, dtype=torch.float64, device=matrix.device)
    return AffineResult(
        matrix=matrix.cpu().numpy(),
        fixed_affine=np.asarray(fixed.affine, dtype=np.float64),
        fixed_shape=tuple(fixed.shape),
        spacing=pair.finest.spacing,
        lncc_initial=_affine_ncc(pair.finest, identity, kernel_size),
        lncc=_affine_ncc(pair.finest, matrix, kernel_size),
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------
# deformable


def deformable_register(
    fixed: Volume,
    moving: Volume,
    affine: Optional[Union[AffineResult, np.ndarray]] = None,
    *,
    spacing: Optional[float] = None,
    levels: int = 3,
    iterations: Union[int, Sequence[int]] = (100, 50, 25),
    learning_rate: Union[float, Sequence[float]] = 1.0,
    kernel_size: int = 7,
    sigma: float = 0.75,
    jacobian_weight: float = 0.5,
    device: Union[str, torch.device] = "cpu",
    quiet: bool = False,
) -> DeformableResult:
    """Multi-scale deformable registration of ``moving`` to ``fixed`` on top of an affine.

    Adam on ``lncc + jacobian_weight * jacobian_var(normalized=True)`` over a displacement field on
    the fixed working grid, in voxels of each level, Gaussian-smoothed (``sigma`` voxels) after every
    step (see the module docstring).

    Args:
        fixed, moving: image Volumes, any grids.
        affine: the affine stage: an :class:`AffineResult`, a 4x4 world matrix fixed -> moving (its
            LNCC is then measured here, with ``seconds`` 0), or None to run :func:`affine_register`
            with its defaults (and this call's ``spacing``, ``device`` and ``quiet``).
        spacing: working spacing in mm (default :func:`default_spacing`).
        levels: pyramid levels, coarse to fine (default 3: x4, x2, x1 the working spacing).
        iterations: Adam steps per level, coarse to fine (default 100, 50, 25), or one for all.
        learning_rate: Adam learning rate in voxels of the level (default 1.0), or one per level.
        kernel_size: odd LNCC box window in voxels of each level (default 7, as the affine's, so that
            the reported LNCC values compare).
        sigma: Gaussian smoothing of the displacement after every step, in voxels of the level
            (default 0.75; smaller follows the images more closely and overfits noise sooner).
        jacobian_weight: weight of the normalised variance of the Jacobian determinant (default 0.5).
        device: where to compute; quiet: no progress bar.
    Returns: a :class:`DeformableResult`.
    """
    if not (isinstance(sigma, (int, float)) and sigma >= 0):
        raise ValueError(f"sigma must be a number >= 0 (voxels), got {sigma!r}")
    if not (isinstance(jacobian_weight, (int, float)) and jacobian_weight >= 0):
        raise ValueError(f"jacobian_weight must be a number >= 0, got {jacobian_weight!r}")
    if affine is None:
        affine = affine_register(fixed, moving, spacing=spacing, device=device, quiet=quiet)
    start = time.perf_counter()
    device = torch.device(device)
    pair = _prepare(fixed, moving, spacing, levels, device)
    if isinstance(affine, AffineResult):
        stage = affine
    else:
        matrix = np.asarray(affine, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"affine must be an AffineResult or a finite 4x4 matrix, got shape {matrix.shape}")
        stage = _affine_result(fixed, pair, torch.as_tensor(matrix, device=device), kernel_size, 0.0)
    world = torch.as_tensor(stage.matrix, dtype=torch.float64, device=device)
    steps = [int(n) for n in _per_level(iterations, pair, levels, "iterations")]
    rates = _per_level(learning_rate, pair, levels, "learning_rate")
    field_mm: Optional[Tensor] = None  # [1, 3, d, h, w] displacement in mm on the previous level's grid
    previous: Optional[_Level] = None
    with tqdm(total=sum(steps), disable=quiet, desc="deformable", unit="step", dynamic_ncols=True) as bar:
        for index, (level, count, rate) in enumerate(zip(pair.levels, steps, rates)):
            grid = _index_grid(level.fixed.shape, device)
            base = _affine_coords(level, world, grid)
            # field in voxels of this level (world axes) -> normalised moving coordinates
            voxels_to_moving = _world_to_normalized(level.moving.affine, level.moving.shape)[:3, :3] * level.spacing
            scale = _jacobian_scale(level, stage.matrix)
            if field_mm is None:
                field = torch.zeros_like(base)
            else:
                upsample = _grid_map(previous.fixed.affine, previous.fixed.shape, level.fixed.affine, device)
                field = sample(field_mm, _apply(upsample, grid), "border") / level.spacing
            field.requires_grad_(True)
            optimizer = torch.optim.Adam([field], lr=rate)
            for _ in range(count):
                optimizer.zero_grad(set_to_none=True)
                coords = base + _linear(voxels_to_moving, field)
                similarity = _similarity(level, coords, kernel_size)
                loss = similarity + jacobian_weight * jacobian_var(coords, scale=scale, normalized=True)
                loss.backward()
                optimizer.step()
                if sigma > 0:
                    with torch.no_grad():
                        field.copy_(gaussian_smooth(field, sigma))
                bar.update()
                bar.set_postfix(level=f"{index + 1}/{len(pair.levels)}", lncc=f"{-similarity.item():.4f}",
                                refresh=False)
            field_mm = field.detach() * level.spacing
            previous = level
    with torch.no_grad():
        coords = base + _linear(voxels_to_moving, field.detach())
        final = -float(_similarity(previous, coords, kernel_size))
        _, folding = jacobian_var(coords, scale=scale, return_folding=True)
    return DeformableResult(
        affine=stage,
        displacement=field_mm[0].cpu(),
        grid_affine=previous.fixed.affine,
        grid_shape=previous.fixed.shape,
        lncc=final,
        folding=float(folding),
        seconds=time.perf_counter() - start,
    )


def _jacobian_scale(level: _Level, matrix: np.ndarray) -> list:
    """Channel scale for :func:`jacobian_det` of a coordinate field into the level's moving image:
    determinants in moving voxels per fixed voxel, made positive for the affine alone (so a negative
    determinant is a fold of the displacement, whatever the grids' handedness)."""
    half = [(n - 1) / 2.0 for n in level.moving.shape]
    chain = _world_to_normalized(level.moving.affine, level.moving.shape) @ matrix @ level.fixed.affine
    if np.linalg.det(chain[:3, :3]) < 0:
        half[0] = -half[0]
    return half
