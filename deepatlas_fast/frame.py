"""Anatomical frames: where a fresh CoordNet places an exam in the template cube.

A *frame* is a batch of affine maps ``[N, 3, 4]`` taking normalised positions of an exam's grid
(:mod:`deepatlas_fast.coords`) to template coordinates: ``c = L p + t`` with ``L = frame[:, :, :3]``,
``t = frame[:, :, 3]``. The "grid" frame is the identity (the exam's field of view fills the cube).
The "moments" frame (:func:`moment_frame`) is computed from the image itself: its intensity-weighted
centre goes to the cube's centre and its principal axes, each scaled by its spread, to the cube's axes,
so the starting map already undoes the body's position, size and (modest) rotation in the field of view.
The network then learns the rest. The objective's regularisers measure the map relative to the frame
(:func:`invert_frame`).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["FRAMES", "apply_frame", "invert_frame", "moment_frame", "identity_frame"]

FRAMES = ("grid", "moments")
"""Frames a :class:`~deepatlas_fast.model.CoordNet` can start from."""

_PERMUTATIONS = list(itertools.permutations(range(3)))


def identity_frame(batch: int, device=None) -> Tensor:
    """``[batch, 3, 4]`` identity maps (the "grid" frame)."""
    frame = torch.zeros(batch, 3, 4, device=device)
    frame[:, :, :3] = torch.eye(3, device=device)
    return frame


def apply_frame(frame: Tensor, points: Tensor) -> Tensor:
    """``frame [N, 3, 4]`` applied to ``points [N or 1, 3, *S]`` -> ``[N, 3, *S]`` (float32)."""
    n = frame.shape[0]
    flat = points.float().reshape(points.shape[0], 3, -1).expand(n, 3, -1)
    out = torch.baddbmm(frame[:, :, 3:].float(), frame[:, :, :3].float(), flat)
    return out.reshape(n, 3, *points.shape[2:])


def invert_frame(frame: Tensor) -> Tensor:
    """The inverse maps ``[N, 3, 4]`` (template coordinates -> normalised exam positions)."""
    linear = torch.linalg.inv(frame[:, :, :3].double())
    shift = -(linear @ frame[:, :, 3:].double())
    return torch.cat([linear, shift], dim=2).to(frame.dtype)


def _centred_axis(size: int, device) -> Tensor:
    return torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0


@torch.no_grad()
def moment_frame(images: Tensor, spread: float = 2.0, eigen_floor: float = 1e-3) -> Tensor:
    """The "moments" frame ``[N, 3, 4]`` of ``images [N, C, D, H, W]`` (channel 0, negative values as 0).

    The weighted mean ``mu`` and covariance ``Σ = R diag(λ) R^T`` of the voxel positions (in voxels, so
    the axes share one unit) give ``c = diag(λ)^(-1/2) R^T (x - mu) / spread``: a body whose intensity is
    spread evenly over ``±a`` along an axis (``σ = a / √3``) lands on ``±√3 / spread`` (0.87 for the
    default 2). Among the eigenvector orderings and signs, ``R`` is the one closest to the grid's own
    axes (no axis swap or flip for a body lying as in the training data). Eigenvalues are floored at
    ``eigen_floor`` times the largest (a flat object does not blow up one axis). An image with no positive
    intensity gets the identity frame. Computed from the image's 2-D marginal sums in float64 (no
    per-voxel temporary), without gradient.
    """
    if not isinstance(images, Tensor) or images.dim() != 5:
        raise ValueError(f"images must be a tensor [N, C, D, H, W], got {getattr(images, 'shape', type(images))}")
    if not spread > 0:
        raise ValueError(f"spread must be > 0, got {spread!r}")
    n, device = images.shape[0], images.device
    sizes = images.shape[2:]
    weight = images[:, 0].float().clamp_min(0.0)
    dh = weight.sum(dim=3).double()  # [N, D, H]
    dw = weight.sum(dim=2).double()  # [N, D, W]
    hw = weight.sum(dim=1).double()  # [N, H, W]
    axes = [_centred_axis(s, device) for s in sizes]
    total = dh.sum(dim=(1, 2))
    safe = total.clamp_min(1e-30)
    marginals = [dh.sum(dim=2), dh.sum(dim=1), dw.sum(dim=1)]  # [N, D], [N, H], [N, W]
    mean = torch.stack([m @ a for m, a in zip(marginals, axes)], dim=1) / safe[:, None]
    second = torch.empty(n, 3, 3, dtype=torch.float64, device=device)
    for k in range(3):
        second[:, k, k] = marginals[k] @ axes[k].square() / safe
    for (i, j), plane in (((0, 1), dh), ((0, 2), dw), ((1, 2), hw)):
        second[:, i, j] = second[:, j, i] = torch.einsum("nab,a,b->n", plane, axes[i], axes[j]) / safe
    cov = second - mean[:, :, None] * mean[:, None, :]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    largest = eigvals[:, -1:]
    eigvals = torch.maximum(eigvals, eigen_floor * largest)
    # the ordering of the eigenvectors closest to the grid's axes, then signs making the diagonal >= 0
    candidates = torch.stack([eigvecs[:, :, list(p)] for p in _PERMUTATIONS])  # [6, N, 3, 3]
    scores = torch.diagonal(candidates, dim1=-2, dim2=-1).abs().sum(dim=-1)  # [6, N]
    best = scores.argmax(dim=0)
    rotation = candidates[best, torch.arange(n, device=device)]
    values = torch.stack([eigvals[:, list(p)] for p in _PERMUTATIONS])[best, torch.arange(n, device=device)]
    signs = torch.where(torch.diagonal(rotation, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(rotation.dtype)
    rotation = rotation * signs[:, None, :]
    to_frame = (rotation.transpose(1, 2) / values.clamp_min(1e-30).sqrt()[:, :, None]) / spread  # voxels -> cube
    half = torch.tensor([(s - 1) / 2.0 for s in sizes], dtype=torch.float64, device=device)
    linear = to_frame * half[None, None, :]  # normalised positions -> cube
    shift = -(to_frame @ mean[:, :, None])
    frame = torch.cat([linear, shift], dim=2).float()
    usable = (total > 0) & (largest[:, 0] > 0)
    return torch.where(usable[:, None, None], frame, identity_frame(n, device))
