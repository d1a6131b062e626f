"""Reference approximate inversion of coordinate maps and displacement fields.

``coords`` ``[N, 3, d, h, w]`` maps each source voxel to a normalised target position. For every
point ``u`` of a target grid, ``inverse(u)`` is the normalised source position ``p`` with
``trilinear(coords, p) = u``. The solve is

1. an initial guess: the source positions splatted (trilinear weights) into the target grid and
   normalised by the splatted weight, on a pyramid of grids so that holes left by a sparse source
   are filled from coarser levels (``-disp`` for the displacement case);
2. ``iters`` pointwise Newton steps ``p <- p - J(p)^-1 (coords(p) - u)`` with ``J`` the analytic
   Jacobian of the trilinear interpolant in the cell holding ``p``; ``p`` stays in the source
   domain ``[-1, 1]^3``;
3. ``valid``: the final residual ``|coords(p) - u|`` is at most ``tol`` target voxels (Euclidean).
   Target points outside the region the source covers keep a large residual and are invalid.

The backward is the exact implicit-function gradient at the solution: with ``g = dL/dp``,
``lambda = J^-T g`` and ``dL/dcoords = -splat(lambda at p)``. Invalid points pass no gradient, nor do
points where ``J`` is degenerate (``|det J| <= SINGULAR_BACKWARD |J|_F^3``), whose ``lambda`` would be
huge and meaningless.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..coords import identity_coords
from .jacobian import cofactors3
from .sampling import compute_dtype, trilinear_corners

MAX_NEWTON_STEP_VOXELS = 4.0  # per axis and iteration, in source voxels: damps steps from a bad linearisation
SPLAT_WEIGHT_TRUSTED = 0.5  # below this splatted weight, the coarser level's guess is used instead
SINGULAR_FORWARD = 1e-10  # |det J| <= this * |J|_F^3: a Newton step falls back to least squares
# |det J| <= this * |J|_F^3 at the solution: the point passes no gradient. Such a J is degenerate
# (e.g. ~3500:1 anisotropy), so J^-T g is enormous and meaningless; a trained map clamped at the
# template border produced gradient norms ~1e6 through a handful of such points.
SINGULAR_BACKWARD = 1e-4


def _cell_corners(p: torch.Tensor, sizes: Sequence[int]):
    """Corners of the trilinear cell holding normalised points ``p`` ``[N, 3, P]``: yields
    ``(flat_index, weight, d_weight)`` with ``d_weight`` w.r.t. normalised ``p``. The cell is clamped
    into the grid, so value and derivative stay continuous up to the border."""
    positions = [(p[:, k : k + 1] + 1) / 2 * (size - 1) for k, size in enumerate(sizes)]
    scales = [(size - 1) / 2 for size in sizes]
    for flat, weight, d_weight, _ in trilinear_corners(positions, sizes, clamp_cell=True):
        yield flat, weight, [dw * scale for dw, scale in zip(d_weight, scales)]


def trilinear_value_and_jacobian(field: torch.Tensor, p: torch.Tensor):
    """Trilinear value ``[N, C, P]`` of ``field`` at normalised ``p`` ``[N, 3, P]`` and its
    Jacobian ``[N, C, 3, P]`` with respect to ``p``."""
    n, c = field.shape[:2]
    values = field.reshape(n, c, -1)
    value = 0
    jac = [0, 0, 0]
    for flat, weight, d_weight in _cell_corners(p, field.shape[2:]):
        corner = torch.gather(values, 2, flat.expand(n, c, -1))
        value = value + weight * corner
        jac = [j + dw * corner for j, dw in zip(jac, d_weight)]
    return value, torch.stack(jac, dim=2)


def _solve3(m: torch.Tensor, r: torch.Tensor, transpose: bool = False, threshold: float = SINGULAR_FORWARD):
    """Solve ``m x = r`` (or ``m^T x = r``) per point; m ``[N, 3, 3, P]``, r ``[N, 3, P]``.

    Returns ``(x, singular)``; where ``m`` is numerically singular ``x`` is the least-squares-like
    step ``m^T r / |m|_F^2`` (``m r / |m|_F^2`` when transposed), which stays finite.
    """
    if transpose:
        m = m.transpose(1, 2)
    a = [[m[:, i, j] for j in range(3)] for i in range(3)]
    cof = cofactors3(a)
    det = a[0][0] * cof[0][0] + a[0][1] * cof[0][1] + a[0][2] * cof[0][2]
    norm2 = (m * m).sum(dim=(1, 2))
    singular = det.abs() <= threshold * norm2.clamp_min(1e-30) ** 1.5
    safe_det = torch.where(singular, torch.ones_like(det), det)
    # inverse = adjugate / det, adjugate[i][j] = cof[j][i]
    newton = torch.stack([sum(cof[j][i] * r[:, j] for j in range(3)) / safe_det for i in range(3)], dim=1)
    fallback = torch.einsum("nijp,nip->njp", m, r) / norm2.clamp_min(1e-30).unsqueeze(1)
    return torch.where(singular.unsqueeze(1), fallback, newton), singular


def _voxel_scale(sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(size - 1) / 2 per axis as ``[1, 3, 1]``: voxels per normalised unit."""
    return torch.tensor([(s - 1) / 2 for s in sizes], dtype=like.dtype, device=like.device).view(1, 3, 1)


def newton_solve(coords: torch.Tensor, u: torch.Tensor, p: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` damped Newton steps for ``trilinear(coords, p) = u``; p, u ``[N, 3, P]`` normalised."""
    max_step = MAX_NEWTON_STEP_VOXELS / _voxel_scale(coords.shape[2:], p)
    for _ in range(iters):
        value, jac = trilinear_value_and_jacobian(coords, p)
        step, _ = _solve3(jac, value - u)
        step = torch.maximum(torch.minimum(step, max_step), -max_step)
        p = (p - step).clamp(-1, 1)
    return p


def residual_voxels(coords: torch.Tensor, p: torch.Tensor, u: torch.Tensor, out_shape: Sequence[int]):
    """Euclidean ``|coords(p) - u|`` in target voxels, ``[N, 1, P]``."""
    value, _ = trilinear_value_and_jacobian(coords, p)
    return ((value - u) * _voxel_scale(out_shape, u)).norm(dim=1, keepdim=True)


def splat(positions: torch.Tensor, values: torch.Tensor, shape: Sequence[int]):
    """Trilinear splat of ``values`` ``[N, C, P]`` at normalised ``positions`` ``[N, 3, P]`` into a
    grid of ``shape``: returns (weight ``[N, 1, prod(shape)]``, weighted sum ``[N, C, prod(shape)]``)."""
    n, c = values.shape[:2]
    sizes = list(shape)
    voxels = [((positions[:, k : k + 1] + 1) / 2 * (sizes[k] - 1)).clamp(-2, sizes[k] + 1) for k in range(3)]
    cells = sizes[0] * sizes[1] * sizes[2]
    weight = values.new_zeros(n, 1, cells)
    total = values.new_zeros(n, c, cells)
    for flat, w, _, inside in trilinear_corners(voxels, sizes):
        w = w * inside
        weight.scatter_add_(2, flat, w)
        total.scatter_add_(2, flat.expand(n, c, -1), values * w)
    return weight, total


def splat_initial_guess(coords: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """Source positions splatted into the target grid, holes filled coarse-to-fine: ``[N, 3, P_out]``."""
    n = coords.shape[0]
    source = identity_coords(coords.shape[2:], dtype=coords.dtype, device=coords.device).reshape(1, 3, -1)
    targets = coords.reshape(n, 3, -1)
    shapes = [tuple(out_shape)]
    while max(shapes[-1]) > 2:
        shapes.append(tuple(max(2, (s + 1) // 2) for s in shapes[-1]))
    guess = None
    for shape in reversed(shapes):
        weight, total = splat(targets, source.expand(n, 3, -1), shape)
        local = total / weight.clamp_min(1e-12)
        if guess is None:
            guess = torch.where(weight > 0, local, torch.zeros_like(local))
        else:
            coarse = F.interpolate(guess, size=shape, mode="trilinear", align_corners=True).reshape(n, 3, -1)
            guess = torch.where(weight > SPLAT_WEIGHT_TRUSTED, local, coarse)
        guess = guess.reshape(n, 3, *shape)
    return guess.reshape(n, 3, -1).clamp(-1, 1)


def invert_backward(grad: torch.Tensor, coords: torch.Tensor, inverse: torch.Tensor, valid: torch.Tensor):
    """Implicit-function gradient of ``inverse`` with respect to ``coords`` (see module docstring)."""
    n, _, *src = coords.shape
    p = inverse.reshape(n, 3, -1).to(coords.dtype)
    g = grad.reshape(n, 3, -1).to(coords.dtype) * valid.reshape(n, 1, -1)
    _, jac = trilinear_value_and_jacobian(coords, p)
    lam, singular = _solve3(jac, g, transpose=True, threshold=SINGULAR_BACKWARD)
    lam = torch.where(singular.unsqueeze(1), torch.zeros_like(lam), lam)
    grad_coords = torch.zeros_like(coords).reshape(n, 3, -1)
    for flat, weight, _ in _cell_corners(p, src):
        grad_coords.scatter_add_(2, flat.expand(n, 3, -1), -weight * lam)
    return grad_coords.reshape(coords.shape)


def _solve_inverse(coords, out_shape, initial, iters, tol):
    n = coords.shape[0]
    u = identity_coords(out_shape, dtype=coords.dtype, device=coords.device).reshape(1, 3, -1)
    p = newton_solve(coords, u, initial, iters)
    valid = residual_voxels(coords, p, u, out_shape) <= tol
    return p.reshape(n, 3, *out_shape), valid.reshape(n, 1, *out_shape)


def invert_forward(coords: torch.Tensor, out_shape: Sequence[int], iters: int, tol: float):
    """The solve of :func:`invert` without autograd (float32/float64 ``coords``)."""
    initial = splat_initial_guess(coords, out_shape)
    return _solve_inverse(coords, tuple(out_shape), initial, iters, tol)


def _displacement_as_map(disp: torch.Tensor):
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    return identity, identity + disp


def invert_displacement_forward(disp: torch.Tensor, iters: int, tol: float):
    """The solve of :func:`invert_displacement` without autograd: ``(v, valid)``, started at ``-disp``."""
    identity, coords = _displacement_as_map(disp)
    initial = (identity - disp).clamp(-1, 1).reshape(disp.shape[0], 3, -1)
    inverse, valid = _solve_inverse(coords, tuple(disp.shape[2:]), initial, iters, tol)
    return inverse - identity, valid


def invert_displacement_backward(grad, disp, inverse_disp, valid):
    """Implicit gradient of ``v`` w.r.t. ``disp``: that of the map ``id + disp`` at ``p = id + v``."""
    identity, coords = _displacement_as_map(disp)
    return invert_backward(grad, coords, identity + inverse_disp, valid)


class _Invert(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coords, out_shape, iters, tol):
        work = coords.detach().to(compute_dtype(coords))
        inverse, valid = invert_forward(work, out_shape, iters, tol)
        ctx.save_for_backward(work, inverse, valid)
        ctx.mark_non_differentiable(valid)
        return inverse.to(coords.dtype), valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_inverse, _grad_valid):
        coords, inverse, valid = ctx.saved_tensors
        return invert_backward(grad_inverse, coords, inverse, valid), None, None, None


class _InvertDisplacement(torch.autograd.Function):
    @staticmethod
    def forward(ctx, disp, iters, tol):
        work = disp.detach().to(compute_dtype(disp))
        inverse_disp, valid = invert_displacement_forward(work, iters, tol)
        ctx.save_for_backward(work, inverse_disp, valid)
        ctx.mark_non_differentiable(valid)
        return inverse_disp.to(disp.dtype), valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_inverse, _grad_valid):
        disp, inverse_disp, valid = ctx.saved_tensors
        return invert_displacement_backward(grad_inverse, disp, inverse_disp, valid), None, None


def invert(coords: torch.Tensor, out_shape: Sequence[int], iters: int = 8, tol: float = 0.05):
    """``(inverse [N, 3, *out_shape], valid [N, 1, *out_shape] bool)``; differentiable w.r.t. ``coords``."""
    return _Invert.apply(coords, tuple(int(s) for s in out_shape), int(iters), float(tol))


def invert_displacement(disp: torch.Tensor, iters: int = 8, tol: float = 0.05):
    """Inverse of the same-grid displacement ``disp`` (normalised units): ``(v, valid)`` with
    ``(id + disp) o (id + v) = id`` on valid points; differentiable w.r.t. ``disp``."""
    return _InvertDisplacement.apply(disp, int(iters), float(tol))
