"""Anatomical frames: where a fresh CoordNet places an exam in the template cube.

A *frame* is a batch of affine maps ``[N, 3, 4]`` taking normalised positions of an exam's grid
(:mod:`deepatlas_fast.coords`) to template coordinates: ``c = L p + t`` with ``L = frame[:, :, :3]``,
``t = frame[:, :, 3]``. The "grid" frame is the identity (the exam's field of view fills the cube).
The "moments" frame (:func:`moment_frame`) is computed from the image itself: its intensity-weighted
centre goes to the cube's centre and its principal axes, each scaled by its spread, to the cube's axes,
so the starting map already undoes the body's position, size and (modest) rotation in the field of view.
The "affine" frame (:func:`affine_frame`) fits an affine map of the exam onto an intensity **frame template**
(``[1, 1, T, T, T]`` on the cube, :func:`build_template`: the mean of the training exams at their frames,
rebuilt after each round of fits, so a groupwise affine atlas) by local NCC, from two starts (the moments
frame and that frame recentred, :func:`recentred_frame`), keeping the better fit: more robust than raw
moments to what the field of view cuts off (CT copies cut at different heights: one-shot Dice 0.36 -> 0.68,
benchmarks/results/2026-11-27-affine-frame.md).
The network then learns the rest. The objective's regularisers measure the map relative to the frame
(:func:`invert_frame`).
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FRAMES", "apply_frame", "invert_frame", "moment_frame", "identity_frame", "recentred_frame", "affine_frame",
           "build_template", "shape_groups", "TEMPLATE_SIDE"]

FRAMES = ("grid", "moments", "affine")
"""Frames a :class:`~deepatlas_fast.model.CoordNet` can start from."""

TEMPLATE_SIDE = 32
"""Side of the "affine" frame's intensity template (voxels on the cube)."""
FIT_SIDE = 32
"""Exams are fitted to the template on a copy with at most this many voxels per side."""
FIT_STEPS = 100
FIT_LR = 0.02
FIT_WINDOW = 5  # LNCC window of the fit (voxels of the fitting copy)

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


def recentred_frame(frame: Tensor) -> Tensor:
    """``frame [N, 3, 4]`` reduced to its centre: the exam position it sends to the cube's centre still goes
    there, with the grid's axes at unit scale (the field of view fills the cube, as with the "grid" frame,
    but centred on that position). A frame with a singular linear part is recentred on its least-squares
    centre."""
    linear, shift = frame[:, :, :3].double(), frame[:, :, 3:].double()
    centre = -(torch.linalg.pinv(linear) @ shift)  # [N, 3, 1]
    eye = torch.eye(3, dtype=torch.float64, device=frame.device).expand(frame.shape[0], 3, 3)
    return torch.cat([eye, -centre], dim=2).to(frame.dtype)


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


def shape_groups(tensors: Sequence[Tensor]) -> list:
    """Indices of ``tensors`` grouped by shape (first-seen order): each group can go through a frame
    computation as one batch."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return list(groups.values())


def _fitting_copy(images: Tensor) -> Tensor:
    """``images [N, C, D, H, W]`` channel 0, smoothed and resampled (corner-aligned, like the normalised
    coordinates) to at most :data:`FIT_SIDE` voxels per side; unchanged when already that small."""
    x = images[:, :1].float()
    size = [min(s, FIT_SIDE) for s in x.shape[2:]]
    if list(x.shape[2:]) == size:
        return x
    factor = max(s / t for s, t in zip(x.shape[2:], size))
    width = max(1, int(round(factor))) | 1  # odd box width, about the downsampling factor
    x = F.avg_pool3d(x, width, stride=1, padding=width // 2, count_include_pad=False)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)


def _fit_loss(template: Tensor, images: Tensor, grid: Tensor, frames: Tensor) -> Tensor:
    """Per-exam fit loss ``[N]``: -mean local NCC of the exam and the template read at its frame
    (``grid``: the identity coordinates of the exams' grid)."""
    from .ops import lncc, sample

    moved = sample(template.expand(images.shape[0], -1, -1, -1, -1), apply_frame(frames, grid), padding="zeros")
    return -lncc(moved, images, FIT_WINDOW, reduction="none").mean(dim=(1, 2, 3, 4))


def affine_frame(images: Tensor, template: Tensor, init: Optional[Tensor] = None, steps: Optional[int] = None) -> Tensor:
    """The "affine" frame ``[N, 3, 4]`` of ``images [N, C, D, H, W]`` (channel 0): ``steps`` (default
    :data:`FIT_STEPS`) Adam steps, learning rate decaying linearly from :data:`FIT_LR` to 0, on the 12 affine
    parameters of each exam so that ``template`` (``[1, 1, T, T, T]``) read at the frame's coordinates
    matches the exam (local NCC, on a copy of at most :data:`FIT_SIDE` voxels per side).

    The fit runs from two starts, ``init`` (default: :func:`moment_frame`) and ``init`` recentred
    (:func:`recentred_frame`), and each exam keeps the one of the two fitted frames and ``init`` with the best
    fit (``init`` on ties: an exam the fit does not improve keeps it). A single start gets caught in local
    optima: the moments of a head whose field of view stops short stretch that axis by 1.4-1.5, and the fit
    from there settled at NCC 0.47-0.50 where the recentred start reaches 0.61-0.62 (one-shot Dice of such
    brains 0.04-0.06 against about 0.5; ``benchmarks/results/2026-11-28-brain-frames.md``); the recentred
    start alone misses others. ``steps=0`` returns ``init``. Runs with gradients enabled whatever the caller's
    mode; no gradient flows to the inputs."""
    if not isinstance(images, Tensor) or images.dim() != 5:
        raise ValueError(f"images must be a tensor [N, C, D, H, W], got {getattr(images, 'shape', type(images))}")
    if not isinstance(template, Tensor) or template.dim() != 5 or template.shape[:2] != (1, 1):
        raise ValueError(f"template must be a tensor [1, 1, T, T, T], got {getattr(template, 'shape', type(template))}")
    from .coords import identity_coords

    steps = FIT_STEPS if steps is None else int(steps)
    start = (moment_frame(images) if init is None else init).detach().float()
    if steps <= 0:
        return start
    n = start.shape[0]
    starts = torch.cat([start, recentred_frame(start)])  # [2N]: every exam fitted from both starts at once
    with torch.enable_grad():
        x = _fitting_copy(images.detach()).clone()
        both = x.repeat(2, 1, 1, 1, 1)
        ref = template.detach().float().to(x.device)
        grid = identity_coords(x.shape[2:], device=x.device)
        delta = torch.zeros_like(starts, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=FIT_LR)
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = FIT_LR * (1.0 - step / steps)  # decays to 0: settles in the optimum
            loss = _fit_loss(ref, both, grid, starts + delta).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            candidates = torch.cat([start, starts + delta]).view(3, n, 3, 4)
            losses = torch.cat([_fit_loss(ref, x, grid, start), _fit_loss(ref, both, grid, starts + delta)]).view(3, n)
            # the first of equal losses: init when nothing improves on it (and never a fit whose loss is NaN)
            best = torch.nan_to_num(losses, nan=float("inf")).argmin(dim=0)
    return candidates[best, torch.arange(n, device=start.device)].detach()


def _template_of(images: Sequence[Tensor], frames: Sequence[Tensor], side: int) -> Tensor:
    """Mean of the exams (``[1, 1, D, H, W]`` each) read at the cube points their frames reach."""
    from .coords import identity_coords
    from .ops import sample

    device = frames[0].device
    cube = identity_coords((side,) * 3, device=device)
    total = torch.zeros(1, 1, side, side, side, device=device)
    count = torch.zeros_like(total)
    for image, frame in zip(images, frames):
        where = apply_frame(invert_frame(frame), cube)  # cube -> exam positions
        inside = (where.abs() <= 1).all(dim=1, keepdim=True).float()
        total += sample(image.float(), where, padding="zeros") * inside
        count += inside
    return total / count.clamp_min(1.0)


@torch.no_grad()
def build_template(images: Sequence[Tensor], side: int = TEMPLATE_SIDE, rounds: int = 2,
                   progress: Optional[Callable[[str], None]] = None) -> Tensor:
    """The "affine" frame's intensity template ``[1, 1, side, side, side]`` from training exams
    (``[D, H, W]`` or ``[1, 1, D, H, W]`` tensors, intensities normalised as for training): the mean of the
    exams at their moments frames, then ``rounds`` times: fit every exam's affine frame to it
    (:func:`affine_frame`, exams of one shape in one batch) and rebuild it from those frames.
    ``progress(message)`` is called once per round."""
    if len(images) == 0:
        raise ValueError("build_template needs at least one image")
    if isinstance(side, bool) or not isinstance(side, int) or side < 4:
        raise ValueError(f"side must be an int >= 4, got {side!r}")
    exams = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() not in (3, 5):
            raise ValueError(f"images[{i}] must be a [D, H, W] or [1, 1, D, H, W] tensor")
        exams.append(_fitting_copy(image.reshape(1, 1, *image.shape[-3:])))
    frames = [moment_frame(x) for x in exams]
    template = _template_of(exams, frames, side)
    groups = shape_groups(exams)
    for round_no in range(rounds):
        for members in groups:
            fitted = affine_frame(torch.cat([exams[i] for i in members]), template,
                                  init=torch.cat([frames[i] for i in members]))
            for k, i in enumerate(members):
                frames[i] = fitted[k:k + 1]
        template = _template_of(exams, frames, side)
        if progress is not None:
            progress(f"frame template: round {round_no + 1}/{rounds} ({len(exams)} exams)")
    return template
