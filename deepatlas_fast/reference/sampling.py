"""Reference trilinear sampling, written out corner by corner so that it is an independent oracle
for ``F.grid_sample`` (bilinear, ``align_corners=True``) and differentiable to any order.

The index math mirrors ``grid_sample`` exactly, including its gradient conventions:
* ``padding="border"`` clips the voxel position to ``[0, size-1]`` and passes no gradient to the
  coordinate when the position is on or beyond a border;
* ``padding="zeros"`` reads 0 for corners outside the volume.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..coords import identity_coords


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are accumulated in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def source_index(coord: torch.Tensor, size: int, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised coordinate -> (padded voxel position, d position / d coord) along one axis."""
    scale = (size - 1) / 2
    x = ((coord + 1) / 2) * (size - 1)
    if padding == "border":
        inside = (x > 0) & (x < size - 1)
        position = torch.where(inside, x, x.detach().clamp(0, size - 1))
        return position, inside * scale
    # zeros: beyond one voxel outside every corner reads 0; clamping keeps floor() in int range.
    # (Where the clamp is active every corner is outside, so the slope there never matters.)
    return x.clamp(-2, size + 1), torch.full_like(x, scale)


def trilinear_corners(positions: list[torch.Tensor], sizes: Sequence[int], clamp_cell: bool = False):
    """The 8 corners around voxel positions (3 tensors, D, H, W order) and their weights.

    Yields ``(flat_index, weight, d_weight, in_bounds)``: ``d_weight`` holds the 3 partial
    derivatives of ``weight`` w.r.t. the positions; indices are clamped into the volume so that they
    can be gathered, and ``in_bounds`` says which corners really lie inside it. ``clamp_cell``
    keeps the cell's lower index in ``[0, size-2]`` (a point on the upper border uses the last cell
    with fraction 1), as the inversion needs; without it the cell is ``floor(position)`` as in
    ``grid_sample``.
    """
    lows, fracs = [], []
    for x, size in zip(positions, sizes):
        low = torch.floor(x)
        if clamp_cell:
            low = low.clamp(0, max(size - 2, 0))
        lows.append(low.long())
        fracs.append(x - low)
    for corner in range(8):
        steps = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
        factors = [f if step else 1 - f for f, step in zip(fracs, steps)]
        slopes = [1.0 if step else -1.0 for step in steps]
        flat, valid = 0, True
        for low, size, step in zip(lows, sizes, steps):
            index = low + step
            valid = valid & (index >= 0) & (index < size)
            flat = flat * size + index.clamp(0, size - 1)
        weight = factors[0] * factors[1] * factors[2]
        d_weight = [
            slopes[0] * factors[1] * factors[2],
            factors[0] * slopes[1] * factors[2],
            factors[0] * factors[1] * slopes[2],
        ]
        yield flat, weight, d_weight, valid


def _positions(coords: torch.Tensor, sizes: Sequence[int], padding: str, dtype: torch.dtype):
    n = coords.shape[0]
    pairs = [source_index(coords[:, k].to(dtype).reshape(n, 1, -1), sizes[k], padding) for k in range(3)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def sample(vol: torch.Tensor, coords: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``F.grid_sample(vol, to_grid(coords), "bilinear", padding, align_corners=True)``.

    vol ``[N, C, D, H, W]``, coords ``[N, 3, d, h, w]`` -> ``[N, C, d, h, w]`` in ``vol.dtype``.
    """
    n, c = vol.shape[:2]
    sizes = list(vol.shape[2:])
    dtype = compute_dtype(vol, coords)
    values = vol.to(dtype).reshape(n, c, -1)
    positions, _ = _positions(coords, sizes, padding, dtype)
    out = 0
    for flat, weight, _, valid in trilinear_corners(positions, sizes):
        gathered = torch.gather(values, 2, flat.expand(n, c, -1))
        out = out + gathered * (weight * valid)
    return out.reshape(n, c, *coords.shape[2:]).to(vol.dtype)


def sample_backward(grad, vol, coords, padding: str, need_vol: bool, need_coords: bool) -> list[torch.Tensor]:
    """Explicit backward of :func:`sample`: the requested gradients, in argument order.

    The volume gradient is the trilinear splat (transpose) of ``grad``; the coordinate gradient is
    ``sum_c grad_c * d sample_c / d position`` times the padding's slope. Neither needs the other.
    """
    n, c = vol.shape[:2]
    sizes = list(vol.shape[2:])
    dtype = compute_dtype(vol, coords)
    g = grad.to(dtype).reshape(n, c, -1)
    values = vol.to(dtype).reshape(n, c, -1)
    positions, slopes = _positions(coords, sizes, padding, dtype)
    grad_vol = torch.zeros_like(values) if need_vol else None
    grad_pos = [0, 0, 0]
    for flat, weight, d_weight, valid in trilinear_corners(positions, sizes):
        index = flat.expand(n, c, -1)
        if need_vol:
            grad_vol.scatter_add_(2, index, g * (weight * valid))
        if need_coords:
            dot = (g * torch.gather(values, 2, index)).sum(dim=1, keepdim=True) * valid
            grad_pos = [acc + dot * dw for acc, dw in zip(grad_pos, d_weight)]
    grads = []
    if need_vol:
        grads.append(grad_vol.reshape(vol.shape).to(vol.dtype))
    if need_coords:
        grad_coords = torch.cat([gp * slope for gp, slope in zip(grad_pos, slopes)], dim=1)
        grads.append(grad_coords.reshape(coords.shape).to(coords.dtype))
    return grads


def warp(vol: torch.Tensor, disp: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Sample ``vol`` at identity + ``disp``; the identity is that of ``disp``'s grid (normalised units)."""
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    return sample(vol, identity + disp, padding)


def warp_backward(grad, vol, disp, padding: str, need_vol: bool, need_disp: bool) -> list[torch.Tensor]:
    """Explicit backward of :func:`warp` (the displacement gradient is the coordinate gradient)."""
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    return sample_backward(grad, vol, identity + disp, padding, need_vol, need_disp)
