"""Coordinate conventions shared by every op, backend and test.

A *coordinate field* is a tensor ``[N, 3, d, h, w]``: channel ``k`` addresses spatial dimension ``k``
of the volume being sampled, in (D, H, W) order, normalised to ``[-1, 1]`` with
``align_corners=True`` semantics (-1 is the centre of the first voxel, +1 the centre of the last).
Displacement fields use the same layout and units.

``grid_sample`` grids are ``[N, d, h, w, 3]`` in (x, y, z) = (W, H, D) order; :func:`to_grid` and
:func:`from_grid` convert. A dimension of size 1 has one voxel, whose normalised position is 0
(as ``F.affine_grid``); voxel displacements along it cannot be expressed and convert to 0.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "axis_positions",
    "identity_coords",
    "to_grid",
    "from_grid",
    "voxel_to_normalized",
    "normalized_to_voxel",
    "displacement_to_normalized",
    "displacement_to_voxel",
]


def _shape3(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 ints (D, H, W), got {shape!r}") from None
    if len(dims) != 3 or any(s < 1 for s in dims):
        raise ValueError(f"{name} must be 3 positive sizes (D, H, W), got {tuple(shape)}")
    return dims


def axis_positions(size: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised positions of the voxel centres along one axis (``[size]``)."""
    if size == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.linspace(-1.0, 1.0, size, dtype=dtype, device=device)


def identity_coords(
    shape: Sequence[int], *, batch: int = 1, dtype=torch.float32, device=None
) -> torch.Tensor:
    """The identity coordinate field ``[batch, 3, D, H, W]`` of a grid of ``shape`` (D, H, W)."""
    d, h, w = _shape3(shape)
    axes = [axis_positions(s, dtype=dtype, device=device) for s in (d, h, w)]
    field = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return field.unsqueeze(0).expand(batch, 3, d, h, w).contiguous()


def to_grid(coords: torch.Tensor) -> torch.Tensor:
    """Coordinate field ``[N, 3, d, h, w]`` (D, H, W order) -> ``grid_sample`` grid ``[N, d, h, w, 3]`` (x, y, z)."""
    if coords.dim() != 5 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape [N, 3, d, h, w], got {tuple(coords.shape)}")
    return coords.permute(0, 2, 3, 4, 1).flip(-1)


def from_grid(grid: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` grid ``[N, d, h, w, 3]`` (x, y, z) -> coordinate field ``[N, 3, d, h, w]`` (D, H, W)."""
    if grid.dim() != 5 or grid.shape[-1] != 3:
        raise ValueError(f"grid must have shape [N, d, h, w, 3], got {tuple(grid.shape)}")
    return grid.flip(-1).permute(0, 4, 1, 2, 3)


def _per_channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def _half_extent(shape: Sequence[int]) -> list[float]:
    """(size - 1) / 2 per axis: voxels per normalised unit."""
    return [(s - 1) / 2.0 for s in _shape3(shape)]


def normalized_to_voxel(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Normalised positions -> voxel indices of a volume with spatial ``shape`` (D, H, W)."""
    half = _half_extent(shape)
    return (coords + 1.0) * _per_channel(half, coords)


def voxel_to_normalized(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices -> normalised positions for a volume with spatial ``shape``; size-1 axes map to 0."""
    half = _half_extent(shape)
    inverse = [1.0 / h if h > 0 else 0.0 for h in half]
    offset = [1.0 if h > 0 else 0.0 for h in half]
    return coords * _per_channel(inverse, coords) - _per_channel(offset, coords)


def displacement_to_voxel(disp: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Normalised displacement -> displacement in voxels of a volume with spatial ``shape``."""
    return disp * _per_channel(_half_extent(shape), disp)


def displacement_to_normalized(disp: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Displacement in voxels -> normalised displacement; size-1 axes give 0."""
    inverse = [1.0 / h if h > 0 else 0.0 for h in _half_extent(shape)]
    return disp * _per_channel(inverse, disp)
