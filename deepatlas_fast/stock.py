"""Stock-PyTorch versions of the hot ops, for ``--ops stock`` comparisons on the same model.

Each function has the signature and semantics of its :mod:`deepatlas_fast` namesake but is written
the way a user of plain PyTorch / MONAI would write it, with autograd doing every backward pass:

* :func:`sample` / :func:`warp`: ``F.grid_sample(..., mode="bilinear", align_corners=True)``
  (``warp`` materialises the identity grid);
* :func:`lncc`: MONAI 1.6 ``LocalNormalizedCrossCorrelationLoss`` written out: five zero-padded
  separable ``conv3d`` window sums, variances floored inside a max;
* :func:`jacobian_det` / :func:`jacobian_var`: ``torch.gradient`` + ``torch.linalg.det``;
* :func:`invert` / :func:`invert_displacement`: a fixed-point initial guess then damped Newton
  steps, every value and Jacobian read with ``grid_sample`` (the Jacobian is the ``torch.gradient``
  field, interpolated), backward by autograd through the unrolled iterations. No splatting (too
  slow in stock PyTorch) and no custom kernels.

``sample``, ``warp``, ``lncc``, ``jacobian_det`` and ``jacobian_var`` agree with the fused ops to
float rounding. ``invert`` solves the same equation (``sample(coords, inverse) == u``) from another
starting point and with an interpolated instead of the analytic cell Jacobian, so on smooth,
invertible maps the two inverses agree to within the solver tolerance (``tol`` target voxels on
points both call valid); the validity masks can differ by a few points at the coverage border, and
the gradients differ (autograd through the unrolled solve vs the exact implicit gradient).

:data:`OPS` maps ``"fused"`` and ``"stock"`` to namespaces with the same attribute names, and
:func:`get_ops` validates a name.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .coords import identity_coords, to_grid
from .reference.jacobian import NORMALIZE_FLOOR
from .reference.sampling import compute_dtype

OP_FUNCTIONS = ("sample", "warp", "lncc", "jacobian_det", "jacobian_var", "invert", "invert_displacement")

__all__ = [
    *OP_FUNCTIONS,
    "OPS",
    "OPS_NAMES",
    "get_ops",
]

MAX_STEP_VOXELS = 4.0  # Newton step limit per axis and iteration, in source voxels (as the fused solver)


def _check5(name: str, x, channels: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{name} must be a 5-D tensor [N, C, D, H, W], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels in dim 1, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# sample / warp


def sample(vol: Tensor, coords: Tensor, padding: str = "border") -> Tensor:
    """``F.grid_sample(vol, to_grid(coords), "bilinear", padding, align_corners=True)``.

    Args:
        vol: ``[N, C, D, H, W]``.
        coords: ``[N, 3, d, h, w]`` normalised positions (D, H, W channel order), cast to ``vol.dtype``.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        ``[N, C, d, h, w]`` in ``vol.dtype``.
    """
    _check5("vol", vol)
    _check5("coords", coords, 3)
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be one of ('border', 'zeros'), got {padding!r}")
    if coords.shape[0] != vol.shape[0]:
        raise ValueError(f"coords must have the batch size of vol ({vol.shape[0]}), got shape {tuple(coords.shape)}")
    grid = to_grid(coords).to(vol.dtype)
    return F.grid_sample(vol, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def warp(vol: Tensor, disp: Tensor, padding: str = "border") -> Tensor:
    """``sample(vol, identity_coords(disp grid) + disp)`` with the identity materialised."""
    _check5("disp", disp, 3)
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    return sample(vol, identity + disp, padding)


# ----------------------------------------------------------------------------------------------
# lncc (MONAI 1.6 LocalNormalizedCrossCorrelationLoss, spatial_dims=3, smooth_nr=0)


def _window(kernel_size: int, kernel: str, dtype, device) -> Tensor:
    if kernel == "box":
        return torch.ones(kernel_size, dtype=dtype, device=device)
    if kernel == "gaussian":
        sigma = kernel_size / 3.0
        x = torch.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=torch.float64)
        return torch.exp(-0.5 * x**2 / sigma**2).to(dtype=dtype, device=device)
    raise ValueError(f"kernel must be one of ('box', 'gaussian'), got {kernel!r}")


def _separable_filter(x: Tensor, weights: Tensor) -> Tensor:
    """Zero-padded separable window sum of every channel (grouped conv3d, MONAI ``separable_filtering``)."""
    c = x.shape[1]
    k = weights.numel()
    for axis in range(3):
        shape = [c, 1, 1, 1, 1]
        shape[2 + axis] = k
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k // 2
        x = F.conv3d(F.pad(x, pad), weights.view(1, 1, *shape[2:]).expand(shape), groups=c)
    return x


def lncc(
    a: Tensor, b: Tensor, kernel_size: int = 9, kernel: str = "box", eps: float = 1e-5, reduction: str = "mean"
) -> Tensor:
    """Local normalised cross-correlation, per channel, zero padding (MONAI's formula).

    Args:
        a, b: ``[N, C, D, H, W]`` of equal shape (half inputs are computed in float32).
        kernel_size: odd window side in voxels. kernel: ``"box"`` or ``"gaussian"`` (sigma = size / 3).
        eps: variance floor (MONAI ``smooth_dr``). reduction: ``"mean"`` -> ``-mean(ncc)``;
            ``"none"`` -> the NCC map ``[N, C, D, H, W]``.
    """
    _check5("a", a)
    _check5("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'none'), got {reduction!r}")
    dtype = compute_dtype(a, b)
    pred, target = a.to(dtype), b.to(dtype)
    weights = _window(kernel_size, kernel, dtype, a.device)
    kernel_vol = weights.sum() ** 3
    t2, p2, tp = target * target, pred * pred, target * pred
    t_sum, p_sum = _separable_filter(target, weights), _separable_filter(pred, weights)
    t2_sum, p2_sum, tp_sum = (_separable_filter(x, weights) for x in (t2, p2, tp))
    t_avg, p_avg = t_sum / kernel_vol, p_sum / kernel_vol
    cross = tp_sum - p_avg * t_sum
    floor = torch.as_tensor(eps, dtype=dtype, device=a.device)
    t_var = torch.max(t2_sum - t_avg * t_sum, floor)
    p_var = torch.max(p2_sum - p_avg * p_sum, floor)
    ncc = cross * cross / (t_var * p_var)
    return -ncc.mean() if reduction == "mean" else ncc


# ----------------------------------------------------------------------------------------------
# Jacobian determinant and its variance


def _scaled(field: Tensor, scale) -> Tensor:
    if scale is None:
        return field
    scale = torch.as_tensor(scale, dtype=field.dtype, device=field.device).reshape(1, 3, 1, 1, 1)
    return field * scale


def jacobian_matrix(field: Tensor, scale=None) -> Tensor:
    """``J[n, ..., k, j] = d field_k / d index_j`` as ``[N, d, h, w, 3, 3]`` (``torch.gradient``, edge_order=1)."""
    _check5("field", field, 3)
    if min(field.shape[2:]) < 2:
        raise ValueError(f"field must have every spatial size >= 2, got spatial shape {tuple(field.shape[2:])}")
    grads = torch.gradient(_scaled(field, scale), dim=(2, 3, 4))
    return torch.stack(grads, dim=2).permute(0, 3, 4, 5, 1, 2)


def jacobian_det(field: Tensor, scale: Optional[Union[Sequence[float], Tensor]] = None) -> Tensor:
    """det(d field / d voxel index) ``[N, 1, d, h, w]`` via ``torch.gradient`` + ``torch.linalg.det``."""
    return torch.linalg.det(jacobian_matrix(field, scale)).unsqueeze(1)


def jacobian_var(field: Tensor, scale=None, normalized: bool = False, return_folding: bool = False):
    """Population variance over voxels of :func:`jacobian_det`, mean over the batch (÷ max(mean², 1e-12)
    per element when ``normalized``); with ``return_folding`` also the share of voxels with det <= 0."""
    det = jacobian_det(field, scale).flatten(1)
    mean = det.mean(dim=1, keepdim=True)
    var = ((det - mean) ** 2).mean(dim=1)
    if normalized:
        var = var / (mean.squeeze(1) ** 2).clamp_min(NORMALIZE_FLOOR)
    var = var.mean()
    if not return_folding:
        return var
    return var, (det.detach() <= 0).to(det.dtype).mean(dim=1).mean()


# ----------------------------------------------------------------------------------------------
# inversion


def _solve3(m: Tensor, r: Tensor) -> Tensor:
    """``m^-1 r`` per point via the adjugate; m ``[N, P, 3, 3]``, r ``[N, P, 3]``; singular -> 0 step."""
    a = m
    c00 = a[..., 1, 1] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 1]
    c01 = a[..., 1, 2] * a[..., 2, 0] - a[..., 1, 0] * a[..., 2, 2]
    c02 = a[..., 1, 0] * a[..., 2, 1] - a[..., 1, 1] * a[..., 2, 0]
    c10 = a[..., 0, 2] * a[..., 2, 1] - a[..., 0, 1] * a[..., 2, 2]
    c11 = a[..., 0, 0] * a[..., 2, 2] - a[..., 0, 2] * a[..., 2, 0]
    c12 = a[..., 0, 1] * a[..., 2, 0] - a[..., 0, 0] * a[..., 2, 1]
    c20 = a[..., 0, 1] * a[..., 1, 2] - a[..., 0, 2] * a[..., 1, 1]
    c21 = a[..., 0, 2] * a[..., 1, 0] - a[..., 0, 0] * a[..., 1, 2]
    c22 = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    det = a[..., 0, 0] * c00 + a[..., 0, 1] * c01 + a[..., 0, 2] * c02
    norm = (m * m).sum(dim=(-1, -2))
    singular = det.abs() <= 1e-10 * norm.clamp_min(1e-30) ** 1.5
    inv_det = torch.where(singular, torch.zeros_like(det), 1.0 / torch.where(singular, torch.ones_like(det), det))
    x0 = c00 * r[..., 0] + c10 * r[..., 1] + c20 * r[..., 2]
    x1 = c01 * r[..., 0] + c11 * r[..., 1] + c21 * r[..., 2]
    x2 = c02 * r[..., 0] + c12 * r[..., 1] + c22 * r[..., 2]
    return torch.stack([x0, x1, x2], dim=-1) * inv_det.unsqueeze(-1)


def _half(shape, like: Tensor) -> Tensor:
    return torch.tensor([(s - 1) / 2 for s in shape], dtype=like.dtype, device=like.device)


def _solve(coords: Tensor, out_shape, initial: Tensor, iters: int, tol: float):
    """Damped Newton for ``sample(coords, p) == u`` on the target grid; returns (p, valid)."""
    n = coords.shape[0]
    src = coords.shape[2:]
    u = identity_coords(out_shape, batch=n, dtype=coords.dtype, device=coords.device)
    # d coords_k / d (normalised source position)_j, interpolated like the values: [N, 9, *src]
    src_half = _half(src, coords).view(1, 1, 3, 1, 1, 1)
    jac_field = (torch.stack(torch.gradient(coords, dim=(2, 3, 4)), dim=2) * src_half).reshape(n, 9, *src)
    max_step = (MAX_STEP_VOXELS / _half(src, coords).clamp_min(1e-12)).view(1, 3, 1, 1, 1)
    p = initial
    for _ in range(iters):
        residual = sample(coords, p) - u
        jac = sample(jac_field, p).reshape(n, 3, 3, -1).permute(0, 3, 1, 2)
        step = _solve3(jac, residual.reshape(n, 3, -1).transpose(1, 2)).transpose(1, 2).reshape(p.shape)
        step = torch.maximum(torch.minimum(step, max_step), -max_step)
        p = (p - step).clamp(-1, 1)
    out_half = _half(out_shape, coords).view(1, 3, 1, 1, 1)
    error = ((sample(coords, p) - u) * out_half).norm(dim=1, keepdim=True)
    valid = (error <= tol) & torch.isfinite(error)
    p = torch.where(valid, p, p.detach())  # no gradient through points the solve did not reach
    return p, valid


def invert(coords: Tensor, out_shape: Optional[Sequence[int]] = None, iters: int = 8, tol: float = 0.05):
    """Stock inverse of a coordinate map: ``(inverse [N, 3, *out_shape], valid [N, 1, *out_shape] bool)``.

    Initial guess: two fixed-point steps ``p <- u - (coords - id)(p)`` from ``p = u`` (exact for a
    translation); then ``iters`` damped Newton steps with the interpolated ``torch.gradient``
    Jacobian. ``valid``: final residual at most ``tol`` target voxels. Gradients by autograd
    through the unrolled iterations; none through invalid points.

    Args:
        coords: ``[N, 3, d, h, w]`` (source grid -> normalised target positions), sizes >= 2.
        out_shape: target grid (D, H, W); default the source grid.
        iters: Newton steps. tol: validity threshold in target voxels.
    """
    _check5("coords", coords, 3)
    if min(coords.shape[2:]) < 2:
        raise ValueError(f"coords must have every spatial size >= 2, got spatial shape {tuple(coords.shape[2:])}")
    out_shape = tuple(int(s) for s in (coords.shape[2:] if out_shape is None else out_shape))
    if len(out_shape) != 3 or min(out_shape) < 2:
        raise ValueError(f"out_shape must be 3 sizes >= 2 (D, H, W), got {out_shape}")
    n = coords.shape[0]
    u = identity_coords(out_shape, batch=n, dtype=coords.dtype, device=coords.device)
    disp = coords - identity_coords(coords.shape[2:], dtype=coords.dtype, device=coords.device)
    p = u
    for _ in range(2):
        p = (u - sample(disp, p)).clamp(-1, 1)
    return _solve(coords, out_shape, p, iters, tol)


def invert_displacement(disp: Tensor, iters: int = 8, tol: float = 0.05):
    """Stock inverse of a same-grid displacement (normalised units): ``(v, valid)`` with
    ``(id + disp)(id + v) = id`` on valid points; started at ``-disp`` as the fused op."""
    _check5("disp", disp, 3)
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    p, valid = _solve(identity + disp, tuple(disp.shape[2:]), (identity - disp).clamp(-1, 1), iters, tol)
    return p - identity, valid


# ----------------------------------------------------------------------------------------------
# the two op sets


def _namespace(name: str, functions) -> SimpleNamespace:
    """``name`` plus the seven op functions looked up in ``functions`` (a module or a dict)."""
    get = functions.get if isinstance(functions, dict) else lambda op: getattr(functions, op)
    return SimpleNamespace(name=name, **{op: get(op) for op in OP_FUNCTIONS})


def _fused_namespace() -> SimpleNamespace:
    from . import ops

    return _namespace("fused", ops)


_STOCK = _namespace("stock", globals())

OPS_NAMES = ("fused", "stock")
OPS = {"fused": _fused_namespace(), "stock": _STOCK}


def get_ops(ops: Union[str, SimpleNamespace] = "fused") -> SimpleNamespace:
    """The op namespace for ``ops`` (``"fused"``: the package's ops on the registry's backend;
    ``"stock"``: this module). A namespace is returned as is."""
    if isinstance(ops, SimpleNamespace):
        return ops
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS_NAMES}, got {ops!r}")
    return OPS[ops]
