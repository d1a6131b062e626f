"""Reference Jacobian determinant of a field with respect to voxel index, and its statistics.

Derivatives follow ``torch.gradient(edge_order=1)`` with unit spacing: central differences inside,
one-sided differences at the borders; every spatial size must be at least 2.
``J[k][j] = d field_k / d index_j`` with both k and j in (D, H, W) order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

NORMALIZE_FLOOR = 1e-12  # floor of mean(det)^2 when normalising, so a degenerate field gives no NaN


def axis_gradient(f: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.gradient(f, dim=dim, edge_order=1)[0]`` written with slices (differentiable, any order)."""
    n = f.shape[dim]
    first = f.narrow(dim, 1, 1) - f.narrow(dim, 0, 1)
    last = f.narrow(dim, n - 1, 1) - f.narrow(dim, n - 2, 1)
    central = (f.narrow(dim, 2, n - 2) - f.narrow(dim, 0, n - 2)) / 2
    return torch.cat([first, central, last], dim=dim)


def axis_gradient_adjoint(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Transpose of :func:`axis_gradient`: ``sum(g * axis_gradient(f)) == sum(f * adjoint(g))``.

    In gather form (what a kernel computes), for ``n >= 4``: ``out[i] = (g[i-1] - g[i+1]) / 2`` for
    ``2 <= i <= n-3``; ``out[0] = -g[0] - g[1]/2``, ``out[1] = g[0] - g[2]/2``,
    ``out[n-2] = g[n-3]/2 - g[n-1]``, ``out[n-1] = g[n-2]/2 + g[n-1]``.
    """
    n = g.shape[dim]
    out = torch.zeros_like(g)
    out.narrow(dim, 1, 1).add_(g.narrow(dim, 0, 1))
    out.narrow(dim, 0, 1).sub_(g.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).add_(g.narrow(dim, n - 1, 1))
    out.narrow(dim, n - 2, 1).sub_(g.narrow(dim, n - 1, 1))
    inner = g.narrow(dim, 1, n - 2) / 2
    out.narrow(dim, 2, n - 2).add_(inner)
    out.narrow(dim, 0, n - 2).sub_(inner)
    return out


def cofactors3(m):
    """Cofactor matrix of a 3x3 matrix given as nested lists of broadcastable tensors:
    ``cof[i][j] = d det / d m[i][j]``, and ``inverse[i][j] = cof[j][i] / det``."""
    return [
        [m[1][1] * m[2][2] - m[1][2] * m[2][1], m[1][2] * m[2][0] - m[1][0] * m[2][2], m[1][0] * m[2][1] - m[1][1] * m[2][0]],
        [m[0][2] * m[2][1] - m[0][1] * m[2][2], m[0][0] * m[2][2] - m[0][2] * m[2][0], m[0][1] * m[2][0] - m[0][0] * m[2][1]],
        [m[0][1] * m[1][2] - m[0][2] * m[1][1], m[0][2] * m[1][0] - m[0][0] * m[1][2], m[0][0] * m[1][1] - m[0][1] * m[1][0]],
    ]


def _scaled(field: torch.Tensor, scale: Optional[Sequence[float]]) -> torch.Tensor:
    if scale is None:
        return field
    return field * torch.tensor(list(scale), dtype=field.dtype, device=field.device).view(1, 3, 1, 1, 1)


def _jacobian(field: torch.Tensor):
    return [[axis_gradient(field[:, k], 1 + j) for j in range(3)] for k in range(3)]


def jacobian_det(field: torch.Tensor, scale: Optional[Sequence[float]] = None) -> torch.Tensor:
    """det(d field / d index) ``[N, 1, d, h, w]``; ``scale`` (3 numbers) multiplies the channels first."""
    jac = _jacobian(_scaled(field, scale))
    cof = cofactors3(jac)
    return (jac[0][0] * cof[0][0] + jac[0][1] * cof[0][1] + jac[0][2] * cof[0][2]).unsqueeze(1)


def jacobian_det_backward(grad: torch.Tensor, field: torch.Tensor, scale: Optional[Sequence[float]] = None):
    """Explicit backward of :func:`jacobian_det`: ``grad_field_k = sum_j D_j^T (grad * cof_kj)``,
    with ``D_j`` the finite-difference operator along axis j and ``cof`` the cofactors of J."""
    cof = cofactors3(_jacobian(_scaled(field, scale)))
    g = grad[:, 0]
    rows = [sum(axis_gradient_adjoint(g * cof[k][j], 1 + j) for j in range(3)) for k in range(3)]
    return _scaled(torch.stack(rows, dim=1), scale)


def jacobian_var(
    field: torch.Tensor, scale: Optional[Sequence[float]] = None, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance of det over voxels, fraction of voxels with det <= 0), each averaged over the batch.

    The variance is the population variance (divides by the voxel count); with ``normalized`` it is
    divided by ``max(mean(det)^2, 1e-12)`` per batch element.
    """
    var, folding, _ = jacobian_var_with_stats(field, scale, normalized)
    return var, folding


def jacobian_var_with_stats(field: torch.Tensor, scale: Optional[Sequence[float]] = None, normalized: bool = False):
    """:func:`jacobian_var` and its ``stats``: ``[N, 2]`` float64, per batch element the mean and the
    population variance of det (not divided), which the backends' backward takes from the forward."""
    det = jacobian_det(field, scale).flatten(1)
    mean = det.mean(dim=1, keepdim=True)
    spread = ((det - mean) ** 2).mean(dim=1)
    var = spread / (mean.squeeze(1) ** 2).clamp_min(NORMALIZE_FLOOR) if normalized else spread
    folding = (det <= 0).to(det.dtype).mean(dim=1)
    stats = torch.stack([mean.squeeze(1), spread], dim=1).detach().to(torch.float64)
    return var.mean(), folding.mean(), stats


def jacobian_var_backward(grad_var, field, scale: Optional[Sequence[float]] = None, normalized: bool = False):
    """Explicit backward of the variance returned by :func:`jacobian_var`.

    Per batch element with ``M`` voxels: ``d var / d det = 2 (det - mean) / M``; normalised,
    ``r = var / q`` with ``q = max(mean^2, floor)`` adds ``-var / q^2 * 2 mean / M`` where the floor
    is not active. The batch mean divides by ``N``; then :func:`jacobian_det_backward`.
    """
    n = field.shape[0]
    det = jacobian_det(field, scale).flatten(1)
    voxels = det.shape[1]
    mean = det.mean(dim=1, keepdim=True)
    g_det = 2 * (det - mean) / voxels
    if normalized:
        square = mean * mean
        q = square.clamp_min(NORMALIZE_FLOOR)
        var = ((det - mean) ** 2).mean(dim=1, keepdim=True)
        g_det = g_det / q - (var / (q * q)) * (2 * mean / voxels) * (square >= NORMALIZE_FLOOR)
    g_det = g_det * (grad_var / n)
    return jacobian_det_backward(g_det.reshape(n, 1, *field.shape[2:]), field, scale)
