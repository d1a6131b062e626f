"""Triton kernels for ``jacobian_det`` and ``jacobian_var`` (semantics: ``reference/jacobian.py``).

``J[k][j] = d f_k / d index_j`` with ``torch.gradient`` (edge_order=1) differences: along an axis of
length n >= 2, index i uses ``(f[hi] - f[lo]) / (hi - lo)`` with ``lo = max(i-1, 0)``,
``hi = min(i+1, n-1)`` (central inside, one-sided at the borders). The determinant is multilinear in
the rows, so ``scale`` enters only as the factor ``s = prod(scale)``: ``det = s * det0`` with ``det0``
the determinant of the unscaled field, and ``d det / d f = s * cof0`` (cofactors of the unscaled J).

Kernels (grid ``(cdiv(M, BLOCK), N)``, M = d*h*w; one program = BLOCK consecutive voxels of one batch
element; indices are clamped before any address is formed, so masked lanes stay in bounds):

* ``_forward_kernel``: J, cofactors and det per voxel from the 6 axis neighbours of each channel
  (18 loads, neighbours mostly hit L1/L2: ~12 B/voxel of DRAM reads in fp32). ``WRITE_DET`` stores the
  det map (``jacobian_det``, +4 B/voxel); ``STATS`` writes per-program partials
  ``(count, block mean, block M2, count of det <= 0)`` instead (``jacobian_var``; the det map is never
  written). Block M2 is two-pass in registers (stable); the partials, ``[N, P, 4]``, are merged with
  Chan's parallel formula in a few torch ops on the device (no host sync, no atomics, deterministic).
* ``_backward_kernel``: gather form of the transposed stencil, no atomics. For output voxel p,
  ``grad[c, p] = sum_j sum_{q in p, p±e_j} coef_j(q, p) g(q) cof0[c][j](q)``, where
  ``coef_j(p±e_j, p) = ∓1 / (hi - lo)(q)`` and ``coef_j(p, p) = ([i=n-1] - [i=0]) / (hi - lo)(p)``.
  Cofactors at the 7 positions q are recomputed from the field (7 x 18 cached loads per voxel, all
  three channels of the output at once): DRAM traffic is one read of the field (+ the det-map
  gradient) and one write of the field gradient, and nothing but the input is saved for backward.
  ``g(q) = a_n * X(q) + b_n`` with per-batch scalars: ``AFFINE=False`` reads X from the incoming
  det-map gradient (``jacobian_det``, a = s, b unused); ``AFFINE=True`` uses the recomputed ``det0(q)``
  (``jacobian_var``: a, b come from the statistics, the forward's third output ``stats``: per batch
  element the mean and variance of det, so the backward makes no second statistics pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.jacobian import NORMALIZE_FLOOR
from ._common import block, compute_dtype, new_empty
from ._math import cofactors3

# Voxels per program, read at call time (the tests shrink them to exercise many programs). On sm_90
# (ptxas, fp32) these use 48 registers (forward) and 56-72 (backward) per thread, no spills.
FORWARD_BLOCK, FORWARD_WARPS = block(512, 16384), 8
BACKWARD_BLOCK, BACKWARD_WARPS = block(128, 16384), 4


@triton.jit
def _stencil(i, n):
    """torch.gradient stencil at index i of an axis of length n: (lo, hi, 1 / (hi - lo))."""
    lo = tl.maximum(i - 1, 0)
    hi = tl.minimum(i + 1, n - 1)
    return lo, hi, tl.where(hi - lo == 2, 0.5, 1.0)


@triton.jit
def _voxels(pid, M, H, W, BLOCK: tl.constexpr):
    """The program's flat voxel indices, clamped into [0, M), as (d, h, w), and the validity mask."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    offs = tl.minimum(offs, M - 1)
    d = offs // (H * W)
    rest = offs - d * (H * W)
    h = rest // W
    return d, h, rest - h * W, mask


@triton.jit
def _row(ptr, o_dl, o_dh, o_hl, o_hh, o_wl, o_wh, sd, sh, sw, mask):
    """One row of J: differences of one channel along D, H, W."""
    gd = (tl.load(ptr + o_dh, mask=mask, other=0.0) - tl.load(ptr + o_dl, mask=mask, other=0.0)) * sd
    gh = (tl.load(ptr + o_hh, mask=mask, other=0.0) - tl.load(ptr + o_hl, mask=mask, other=0.0)) * sh
    gw = (tl.load(ptr + o_wh, mask=mask, other=0.0) - tl.load(ptr + o_wl, mask=mask, other=0.0)) * sw
    return gd, gh, gw


@triton.jit
def _cofactors_at(base, M, d, h, w, D, H, W, mask):
    """Cofactors ``cof[k][j] = d det / d J[k][j]`` of the unscaled J at (d, h, w), and det0."""
    dl, dh, sd = _stencil(d, D)
    hl, hh, sh = _stencil(h, H)
    wl, wh, sw = _stencil(w, W)
    o = (d * H + h) * W + w
    o_dl = o + (dl - d) * (H * W)
    o_dh = o + (dh - d) * (H * W)
    o_hl = o + (hl - h) * W
    o_hh = o + (hh - h) * W
    o_wl = o + (wl - w)
    o_wh = o + (wh - w)
    j00, j01, j02 = _row(base, o_dl, o_dh, o_hl, o_hh, o_wl, o_wh, sd, sh, sw, mask)
    j10, j11, j12 = _row(base + M, o_dl, o_dh, o_hl, o_hh, o_wl, o_wh, sd, sh, sw, mask)
    j20, j21, j22 = _row(base + 2 * M, o_dl, o_dh, o_hl, o_hh, o_wl, o_wh, sd, sh, sw, mask)
    c00, c01, c02, c10, c11, c12, c20, c21, c22, det = cofactors3(j00, j01, j02, j10, j11, j12, j20, j21, j22)
    return c00, c01, c02, c10, c11, c12, c20, c21, c22, det


@triton.jit
def _forward_kernel(field_ptr, s_ptr, det_ptr, part_ptr, M, D, H, W, P,
                    WRITE_DET: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    d, h, w, mask = _voxels(pid, M, H, W, BLOCK)
    c00, c01, c02, c10, c11, c12, c20, c21, c22, det = _cofactors_at(field_ptr + n * 3 * M, M, d, h, w, D, H, W, mask)
    det = det * tl.load(s_ptr)
    if WRITE_DET:
        tl.store(det_ptr + n * M + (d * H + h) * W + w, det, mask=mask)
    if STATS:
        count = tl.sum(mask.to(det.dtype), axis=0)
        mean = tl.sum(tl.where(mask, det, 0.0), axis=0) / count
        dev = tl.where(mask, det - mean, 0.0)
        folds = tl.sum((mask & (det <= 0.0)).to(det.dtype), axis=0)
        out = part_ptr + (n * P + pid) * 4
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, tl.sum(dev * dev, axis=0))
        tl.store(out + 3, folds)


@triton.jit
def _weighted_cofactors(base, g_ptr, a, b, M, d, h, w, D, H, W, mask, AFFINE: tl.constexpr):
    """``g(q) * cof0[k][j](q)`` at q = (d, h, w), with ``g(q) = a * X(q) + b`` (module docstring)."""
    c00, c01, c02, c10, c11, c12, c20, c21, c22, det = _cofactors_at(base, M, d, h, w, D, H, W, mask)
    if AFFINE:
        g = a * det + b
    else:
        g = a * tl.load(g_ptr + (d * H + h) * W + w, mask=mask, other=0.0)
    return g * c00, g * c01, g * c02, g * c10, g * c11, g * c12, g * c20, g * c21, g * c22


@triton.jit
def _backward_kernel(field_ptr, g_ptr, a_ptr, b_ptr, out_ptr, M, D, H, W,
                     AFFINE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    d, h, w, mask = _voxels(pid, M, H, W, BLOCK)
    base = field_ptr + n * 3 * M
    g_base = g_ptr + n * M
    a = tl.load(a_ptr + n)
    b = tl.load(b_ptr + n)

    # q = p: coefficient ([i = n-1] - [i = 0]) / (hi - lo)(p) along each axis.
    t00, t01, t02, t10, t11, t12, t20, t21, t22 = _weighted_cofactors(
        base, g_base, a, b, M, d, h, w, D, H, W, mask, AFFINE)
    _, _, sd = _stencil(d, D)
    _, _, sh = _stencil(h, H)
    _, _, sw = _stencil(w, W)
    k0 = (tl.where(d == D - 1, 1.0, 0.0) - tl.where(d == 0, 1.0, 0.0)) * sd
    k1 = (tl.where(h == H - 1, 1.0, 0.0) - tl.where(h == 0, 1.0, 0.0)) * sh
    k2 = (tl.where(w == W - 1, 1.0, 0.0) - tl.where(w == 0, 1.0, 0.0)) * sw
    acc0 = k0 * t00 + k1 * t01 + k2 * t02
    acc1 = k0 * t10 + k1 * t11 + k2 * t12
    acc2 = k0 * t20 + k1 * t21 + k2 * t22

    # q = p + STEP * e_AXIS: coefficient -STEP / (hi - lo)(q), zero where q leaves the volume. Only
    # column AXIS of the cofactors is used (in the det-map mode the compiler drops the other loads).
    for AXIS in tl.static_range(3):
        for STEP in tl.static_range(-1, 2, 2):
            if AXIS == 0:
                i = d + STEP
                size = D
            elif AXIS == 1:
                i = h + STEP
                size = H
            else:
                i = w + STEP
                size = W
            inside = (i >= 0) & (i < size)
            i = tl.minimum(tl.maximum(i, 0), size - 1)
            m = mask & inside
            if AXIS == 0:
                t00, t01, t02, t10, t11, t12, t20, t21, t22 = _weighted_cofactors(
                    base, g_base, a, b, M, i, h, w, D, H, W, m, AFFINE)
                t0, t1, t2 = t00, t10, t20
            elif AXIS == 1:
                t00, t01, t02, t10, t11, t12, t20, t21, t22 = _weighted_cofactors(
                    base, g_base, a, b, M, d, i, w, D, H, W, m, AFFINE)
                t0, t1, t2 = t01, t11, t21
            else:
                t00, t01, t02, t10, t11, t12, t20, t21, t22 = _weighted_cofactors(
                    base, g_base, a, b, M, d, h, i, D, H, W, m, AFFINE)
                t0, t1, t2 = t02, t12, t22
            _, _, si = _stencil(i, size)
            coef = tl.where(inside, -STEP * si, 0.0)
            acc0 += coef * t0
            acc1 += coef * t1
            acc2 += coef * t2

    out = out_ptr + n * 3 * M + (d * H + h) * W + w
    tl.store(out, acc0, mask=mask)
    tl.store(out + M, acc1, mask=mask)
    tl.store(out + 2 * M, acc2, mask=mask)


def _factor(scale, dtype, device) -> torch.Tensor:
    """``prod(scale)`` as a 1-element device tensor (a fill, no host-to-device copy)."""
    s = 1.0 if scale is None else scale[0] * scale[1] * scale[2]
    return torch.full((1,), s, dtype=dtype, device=device)


def _launch_forward(field, s, det=None):
    """Run the forward kernel; returns the partials ``[N, P, 4]`` when ``det`` is None."""
    n, _, d, h, w = field.shape
    m = d * h * w
    blk = FORWARD_BLOCK
    p = triton.cdiv(m, blk)
    part = None if det is not None else new_empty((n, p, 4), dtype=field.dtype, device=field.device)
    _forward_kernel[(p, n)](
        field, s, field if det is None else det, field if part is None else part, m, d, h, w, p,
        WRITE_DET=det is not None, STATS=det is None, BLOCK=blk, num_warps=FORWARD_WARPS,
    )
    return part


def _statistics(field, scale):
    """Per batch element (mean, population variance, folding fraction) of the scaled det, ``[N]`` each."""
    part = _launch_forward(field, _factor(scale, field.dtype, field.device))
    count, block_mean, block_m2, folds = part.unbind(-1)
    voxels = field[0, 0].numel()
    mean = (count * block_mean).sum(1) / voxels
    m2 = block_m2.sum(1) + (count * (block_mean - mean[:, None]) ** 2).sum(1)  # Chan et al.
    return mean, m2 / voxels, folds.sum(1) / voxels


def _launch_backward(field, g, a, b, affine):
    n, _, d, h, w = field.shape
    m = d * h * w
    out = new_empty(field.shape, dtype=field.dtype, device=field.device)
    blk = BACKWARD_BLOCK
    _backward_kernel[(triton.cdiv(m, blk), n)](
        field, g, a, b, out, m, d, h, w, AFFINE=affine, BLOCK=blk, num_warps=BACKWARD_WARPS,
    )
    return out


def jacobian_det(field, scale=None):
    n, _, d, h, w = field.shape
    det = new_empty((n, 1, d, h, w), dtype=field.dtype, device=field.device)
    _launch_forward(field, _factor(scale, field.dtype, field.device), det)
    return det


def jacobian_det_backward(grad, field, scale=None):
    dtype = compute_dtype(grad, field)
    field = field.to(dtype)
    a = _factor(scale, dtype, field.device).expand(field.shape[0]).contiguous()
    return _launch_backward(field, grad.to(dtype).contiguous(), a, a, affine=False)


def jacobian_var(field, scale=None, normalized=False):
    """(var, folding, stats): stats ``[N, 2]`` float64, per batch element the mean and variance of det, which
    the backward takes instead of running the statistics again."""
    mean, var, folding = _statistics(field, scale)
    stats = torch.stack([mean, var], dim=1).to(torch.float64)
    if normalized:
        var = var / (mean * mean).clamp_min(NORMALIZE_FLOOR)
    return var.mean(), folding.mean(), stats


def jacobian_var_backward(grad_var, field, stats, scale=None, normalized=False):
    """g(det) = alpha (det - mean) + correction, folded with the scale into ``a det0 + b`` per batch."""
    n = field.shape[0]
    voxels = field[0, 0].numel()
    mean, var = stats.to(field.dtype).unbind(1)
    weight = grad_var.to(field.dtype) / n
    alpha = 2 * weight / voxels * torch.ones_like(mean)
    beta = -alpha * mean
    if normalized:
        square = mean * mean
        q = square.clamp_min(NORMALIZE_FLOOR)
        alpha = alpha / q
        beta = beta / q - weight * var / (q * q) * (2 * mean / voxels) * (square >= NORMALIZE_FLOOR)
    s = _factor(scale, field.dtype, field.device)
    return _launch_backward(field, field, (alpha * s * s).contiguous(), (beta * s).contiguous(), affine=True)
