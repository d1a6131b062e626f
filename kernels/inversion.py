"""Triton kernels for ``invert`` and ``invert_displacement`` (semantics: reference/inversion.py).

All kernels run one program per block of points of one batch item (grid ``(blocks, N)``):

* ``_splat_kernel`` (coordinate maps only), one launch per pyramid level: per source voxel, read
  its 3 target coordinates and atomically add (weight, weight * source position) to the 8 cells
  around it: up to 32 relaxed atomics per source voxel and level (zero weights skipped, so a
  source exactly on target nodes costs 4). Coarse levels have few cells that every source voxel
  hits; to avoid long same-address atomic chains their accumulators get R replicas (program
  ``pid`` adds into replica ``pid % R``, about 1k adds per address and replica), summed by one
  ``torch.sum`` before use. Atomic order makes the guess non-bitwise-deterministic.
* ``_resolve_kernel``: one level's guess ``[N, 3, cells]`` from its accumulators and the next
  coarser guess (trilinear upsampling, align_corners), coarse to fine, for every level but the
  finest. Those levels hold ~1/7 of the target's cells: little traffic.
* ``_newton_kernel``: everything per target point in registers: the initial guess (the finest
  level resolved in place, so its guess is never stored; or ``clamp(id - disp)``), ``iters``
  damped Newton steps (8 corner gathers x 3 channels from the clamped cell, value + analytic 3x3
  Jacobian, cofactor solve with the reference's singular fallback, step capped at 4 source voxels
  per axis, clamp to [-1, 1]), the final residual, then ``inverse`` (``p - id`` for displacements)
  and ``valid``. Streams 16 B in (accumulators; 12 B of disp) and 13 B out per target point in
  fp32; the gathers are cached re-reads of the field. For displacements ``id + disp`` is never
  built: value ``p + disp(p)``, Jacobian ``I + Jdisp(p)``.
* ``_backward_kernel``: per target point one transposed 3x3 solve at the solution
  (``lambda = J^-T g``, zero where invalid or singular), then ``-w * lambda`` atomically added to
  the 8 corners of the cell: 24 atomics per valid point, none for invalid ones; not deterministic.

Extra memory: the pyramid accumulators (4 values per cell, all levels ~1.15x the target's cells;
coarse replicas add at most ~3 % of the source's size) and the coarse guesses; the backward only
its zero-initialised output. No host sync: every launch decision comes from shapes. Indices are
clamped before any address is formed, so non-finite inputs give invalid points, never a wild access.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

from ..reference.inversion import MAX_NEWTON_STEP_VOXELS, SINGULAR_BACKWARD, SINGULAR_FORWARD, SPLAT_WEIGHT_TRUSTED
from ._common import block, compute_dtype, new_empty, tl_dtype
from ._math import cofactors3

MAX_STEP = tl.constexpr(MAX_NEWTON_STEP_VOXELS)
TRUSTED = tl.constexpr(SPLAT_WEIGHT_TRUSTED)
_SINGULAR_FORWARD = tl.constexpr(SINGULAR_FORWARD)
_SINGULAR_BACKWARD = tl.constexpr(SINGULAR_BACKWARD)
ATOMICS_PER_ADDRESS = 1024  # same-address atomics per replica of a pyramid level's accumulators
CONVERGED_STEP_EPS = tl.constexpr(8.0)  # the C++ kernels' kConvergedStepEps (see _newton_kernel)


# ----------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _linspace(i, size, DTYPE: tl.constexpr):
    """``torch.linspace(-1, 1, size)[i]``, same formula (values agree bit for bit on the CPU)."""
    step = 2.0 / (size - 1).to(DTYPE)
    return tl.where(i < size // 2, -1.0 + step * i.to(DTYPE), 1.0 - step * (size - 1 - i).to(DTYPE))


@triton.jit
def _epsilon(DTYPE: tl.constexpr):
    """Machine epsilon of the compute dtype."""
    if DTYPE == tl.float64:
        return 2.220446049250313e-16
    else:
        return 1.1920928955078125e-07


@triton.jit
def _unflatten(t, S1, S2):
    """Flat index -> (D, H, W) indices."""
    return t // (S1 * S2), (t // S2) % S1, t % S2


@triton.jit
def _cell(p, size, DTYPE: tl.constexpr):
    """Clamped trilinear cell along one axis for normalised ``p``: (lower index in [0, size-2],
    fraction). NaN positions are mapped to 0 first so that no address is ever out of range."""
    x = (p + 1) / 2 * (size - 1).to(DTYPE)
    x = tl.where(x == x, x, 0.0)
    low = tl.minimum(tl.maximum(tl.floor(x), 0.0), (size - 2).to(DTYPE))
    return low.to(tl.int32), x - low


@triton.jit
def _splat_cell(x, L, DTYPE: tl.constexpr):
    """Unclamped cell of normalised target position ``x`` in a grid of L cells (the reference
    splat: voxel position clamped to [-2, L+1]; NaN to -2): (lower index, fraction)."""
    v = (x + 1) / 2 * (L - 1).to(DTYPE)
    v = tl.minimum(tl.maximum(tl.where(v == v, v, -2.0), -2.0), (L + 1).to(DTYPE))
    low = tl.floor(v)
    return low.to(tl.int32), v - low


@triton.jit
def _corner(CORNER: tl.constexpr, l0, f0, l1, f1, l2, f2, S0, S1, S2, BOUNDED: tl.constexpr):
    """Corner ``CORNER`` (bits: D, H, W step) of the cell with lower indices ``l`` and fractions
    ``f``: (flat index, whether it lies inside the grid, weight, the weight's derivatives w.r.t.
    the three voxel positions). BOUNDED: the cell may stick out of the grid (the splat), so each
    axis index is clamped into it; otherwise the cell is known to be inside (inside is True)."""
    if (CORNER >> 2) & 1:
        a0, s0, i0 = f0, 1.0, l0 + 1
    else:
        a0, s0, i0 = 1 - f0, -1.0, l0
    if (CORNER >> 1) & 1:
        a1, s1, i1 = f1, 1.0, l1 + 1
    else:
        a1, s1, i1 = 1 - f1, -1.0, l1
    if CORNER & 1:
        a2, s2, i2 = f2, 1.0, l2 + 1
    else:
        a2, s2, i2 = 1 - f2, -1.0, l2
    if BOUNDED:
        inside = (i0 >= 0) & (i0 < S0) & (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2)
        i0 = tl.minimum(tl.maximum(i0, 0), S0 - 1)
        i1 = tl.minimum(tl.maximum(i1, 0), S1 - 1)
        i2 = tl.minimum(tl.maximum(i2, 0), S2 - 1)
    else:
        inside = True
    flat = (i0 * S1 + i1) * S2 + i2
    return flat, inside, a0 * a1 * a2, s0 * a1 * a2, a0 * s1 * a2, a0 * a1 * s2


@triton.jit
def _trilinear_vj(ptr, p0, p1, p2, S0, S1, S2, mask, DTYPE: tl.constexpr):
    """Trilinear value (3 channels) of the field at ``ptr`` (``[3, S0, S1, S2]``) at normalised
    ``p`` and its Jacobian w.r.t. ``p`` (``jKA = d value_K / d p_A``), clamped cell."""
    l0, f0 = _cell(p0, S0, DTYPE)
    l1, f1 = _cell(p1, S1, DTYPE)
    l2, f2 = _cell(p2, S2, DTYPE)
    stride = S0 * S1 * S2
    v0 = tl.zeros_like(p0)
    v1 = tl.zeros_like(p0)
    v2 = tl.zeros_like(p0)
    j00 = tl.zeros_like(p0)
    j01 = tl.zeros_like(p0)
    j02 = tl.zeros_like(p0)
    j10 = tl.zeros_like(p0)
    j11 = tl.zeros_like(p0)
    j12 = tl.zeros_like(p0)
    j20 = tl.zeros_like(p0)
    j21 = tl.zeros_like(p0)
    j22 = tl.zeros_like(p0)
    for c in tl.static_range(8):
        flat, _in, w, d0, d1, d2 = _corner(c, l0, f0, l1, f1, l2, f2, S0, S1, S2, False)
        c0 = tl.load(ptr + flat, mask=mask, other=0.0).to(DTYPE)
        c1 = tl.load(ptr + stride + flat, mask=mask, other=0.0).to(DTYPE)
        c2 = tl.load(ptr + 2 * stride + flat, mask=mask, other=0.0).to(DTYPE)
        v0 += w * c0
        v1 += w * c1
        v2 += w * c2
        j00 += d0 * c0
        j01 += d1 * c0
        j02 += d2 * c0
        j10 += d0 * c1
        j11 += d1 * c1
        j12 += d2 * c1
        j20 += d0 * c2
        j21 += d1 * c2
        j22 += d2 * c2
    # d voxel position / d normalised p
    h0 = (S0 - 1).to(DTYPE) / 2
    h1 = (S1 - 1).to(DTYPE) / 2
    h2 = (S2 - 1).to(DTYPE) / 2
    return v0, v1, v2, j00 * h0, j01 * h1, j02 * h2, j10 * h0, j11 * h1, j12 * h2, j20 * h0, j21 * h1, j22 * h2


@triton.jit
def _solve3(m00, m01, m02, m10, m11, m12, m20, m21, m22, r0, r1, r2, TRANSPOSE: tl.constexpr, THRESHOLD: tl.constexpr):
    """Solve ``m x = r`` (``m^T x = r`` when TRANSPOSE) by cofactors. Returns ``(x, singular)``;
    where ``m`` is numerically singular, ``x`` is the finite step ``m^T r / |m|_F^2``."""
    if TRANSPOSE:
        m01, m10 = m10, m01
        m02, m20 = m20, m02
        m12, m21 = m21, m12
    c00, c01, c02, c10, c11, c12, c20, c21, c22, det = cofactors3(m00, m01, m02, m10, m11, m12, m20, m21, m22)
    norm2 = m00 * m00 + m01 * m01 + m02 * m02 + m10 * m10 + m11 * m11 + m12 * m12 + m20 * m20 + m21 * m21 + m22 * m22
    norm2 = tl.maximum(norm2, 1e-30)
    singular = tl.abs(det) <= THRESHOLD * (norm2 * tl.sqrt(norm2))
    det = tl.where(singular, 1.0, det)
    x0 = tl.where(singular, (m00 * r0 + m10 * r1 + m20 * r2) / norm2, (c00 * r0 + c10 * r1 + c20 * r2) / det)
    x1 = tl.where(singular, (m01 * r0 + m11 * r1 + m21 * r2) / norm2, (c01 * r0 + c11 * r1 + c21 * r2) / det)
    x2 = tl.where(singular, (m02 * r0 + m12 * r1 + m22 * r2) / norm2, (c02 * r0 + c12 * r1 + c22 * r2) / det)
    return x0, x1, x2, singular


@triton.jit
def _upsample_cell(i, L, C, DTYPE: tl.constexpr):
    """Cell (lower index in [0, C-2], fraction) of output index ``i`` when upsampling C -> L cells
    along one axis as ``F.interpolate(mode="trilinear", align_corners=True)``."""
    x = (C - 1).to(DTYPE) / (L - 1).to(DTYPE) * i.to(DTYPE)
    low = tl.minimum(tl.floor(x), (C - 2).to(DTYPE))
    return low.to(tl.int32), x - low


@triton.jit
def _resolve_guess(acc_ptr, coarse_ptr, t, mask, L0, L1, L2, C0, C1, C2,
                   HAS_COARSE: tl.constexpr, DTYPE: tl.constexpr):
    """Guess at cells ``t`` of one pyramid level: the splatted mean where the splatted weight is
    trusted, else the next coarser level's guess upsampled (the coarsest: weight > 0, else 0).
    ``acc_ptr``: this item's ``[4, L]`` accumulators; ``coarse_ptr``: its ``[3, C]`` guess."""
    cells = L0 * L1 * L2
    weight = tl.load(acc_ptr + t, mask=mask, other=0.0)
    t0 = tl.load(acc_ptr + cells + t, mask=mask, other=0.0)
    t1 = tl.load(acc_ptr + 2 * cells + t, mask=mask, other=0.0)
    t2 = tl.load(acc_ptr + 3 * cells + t, mask=mask, other=0.0)
    norm = tl.maximum(weight, 1e-12)
    if HAS_COARSE:
        i0, i1, i2 = _unflatten(t, L1, L2)
        a0, f0 = _upsample_cell(i0, L0, C0, DTYPE)
        a1, f1 = _upsample_cell(i1, L1, C1, DTYPE)
        a2, f2 = _upsample_cell(i2, L2, C2, DTYPE)
        cstride = C0 * C1 * C2
        g0 = tl.zeros(t.shape, DTYPE)
        g1 = tl.zeros(t.shape, DTYPE)
        g2 = tl.zeros(t.shape, DTYPE)
        for c in tl.static_range(8):
            flat, _in, w, _d0, _d1, _d2 = _corner(c, a0, f0, a1, f1, a2, f2, C0, C1, C2, False)
            g0 += w * tl.load(coarse_ptr + flat, mask=mask, other=0.0)
            g1 += w * tl.load(coarse_ptr + cstride + flat, mask=mask, other=0.0)
            g2 += w * tl.load(coarse_ptr + 2 * cstride + flat, mask=mask, other=0.0)
        trusted = weight > TRUSTED
    else:
        g0 = tl.zeros(t.shape, DTYPE)
        g1 = tl.zeros(t.shape, DTYPE)
        g2 = tl.zeros(t.shape, DTYPE)
        trusted = weight > 0
    return tl.where(trusted, t0 / norm, g0), tl.where(trusted, t1 / norm, g1), tl.where(trusted, t2 / norm, g2)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _splat_kernel(coords_ptr, acc_ptr, S0, S1, S2, L0, L1, L2, R,
                  DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Adds (weight, weight * source position) of every source voxel to the 8 cells around its
    target position in one pyramid level ``L``; ``acc_ptr``: ``[N, R, 4, L]`` zeros, program
    ``pid`` adds into replica ``pid % R``."""
    n = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    points = S0 * S1 * S2
    cells = L0 * L1 * L2
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < points
    s = tl.minimum(offs, points - 1)
    i0, i1, i2 = _unflatten(s, S1, S2)
    q0 = _linspace(i0, S0, DTYPE)
    q1 = _linspace(i1, S1, DTYPE)
    q2 = _linspace(i2, S2, DTYPE)
    src = coords_ptr + n * 3 * points + s
    l0, f0 = _splat_cell(tl.load(src, mask=mask, other=0.0).to(DTYPE), L0, DTYPE)
    l1, f1 = _splat_cell(tl.load(src + points, mask=mask, other=0.0).to(DTYPE), L1, DTYPE)
    l2, f2 = _splat_cell(tl.load(src + 2 * points, mask=mask, other=0.0).to(DTYPE), L2, DTYPE)
    acc = acc_ptr + (n * R + pid % R) * 4 * cells
    for c in tl.static_range(8):
        flat, inside, w, _d0, _d1, _d2 = _corner(c, l0, f0, l1, f1, l2, f2, L0, L1, L2, True)
        live = mask & inside & (w != 0)  # sources on grid nodes (identity-like maps) skip 7 of 8
        tl.atomic_add(acc + flat, w, mask=live, sem="relaxed")
        tl.atomic_add(acc + cells + flat, w * q0, mask=live, sem="relaxed")
        tl.atomic_add(acc + 2 * cells + flat, w * q1, mask=live, sem="relaxed")
        tl.atomic_add(acc + 3 * cells + flat, w * q2, mask=live, sem="relaxed")


@triton.jit
def _resolve_kernel(acc_ptr, coarse_ptr, guess_ptr, L0, L1, L2, C0, C1, C2,
                    HAS_COARSE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One pyramid level's guess ``[N, 3, L]`` (see :func:`_resolve_guess`)."""
    n = tl.program_id(1).to(tl.int64)
    cells = L0 * L1 * L2
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cells
    t = tl.minimum(offs, cells - 1)
    g0, g1, g2 = _resolve_guess(acc_ptr + n * 4 * cells, coarse_ptr + n * 3 * (C0 * C1 * C2), t, mask,
                                L0, L1, L2, C0, C1, C2, HAS_COARSE, DTYPE)
    out = guess_ptr + n * 3 * cells + t
    tl.store(out, g0, mask=mask)
    tl.store(out + cells, g1, mask=mask)
    tl.store(out + 2 * cells, g2, mask=mask)


@triton.jit
def _newton_kernel(field_ptr, acc_ptr, coarse_ptr, out_ptr, valid_ptr, tol: tl.float64, iters,
                   S0, S1, S2, T0, T1, T2, C0, C1, C2,
                   DISP: tl.constexpr, HAS_COARSE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Solves ``field(p) = u`` (``p + field(p) = u`` when DISP) at every target grid point ``u``:
    initial guess, ``iters`` damped Newton steps, residual test; writes ``p`` (``p - u``) and valid."""
    n = tl.program_id(1).to(tl.int64)
    cells = T0 * T1 * T2
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cells
    t = tl.minimum(offs, cells - 1)
    i0, i1, i2 = _unflatten(t, T1, T2)
    u0 = _linspace(i0, T0, DTYPE)
    u1 = _linspace(i1, T1, DTYPE)
    u2 = _linspace(i2, T2, DTYPE)
    field = field_ptr + n * 3 * (S0 * S1 * S2)
    if DISP:  # target grid == source grid; start at id - disp
        p0 = u0 - tl.load(field + t, mask=mask, other=0.0).to(DTYPE)
        p1 = u1 - tl.load(field + cells + t, mask=mask, other=0.0).to(DTYPE)
        p2 = u2 - tl.load(field + 2 * cells + t, mask=mask, other=0.0).to(DTYPE)
    else:
        p0, p1, p2 = _resolve_guess(acc_ptr + n * 4 * cells, coarse_ptr + n * 3 * (C0 * C1 * C2), t, mask,
                                    T0, T1, T2, C0, C1, C2, HAS_COARSE, DTYPE)
    p0 = tl.minimum(tl.maximum(p0, -1.0), 1.0)
    p1 = tl.minimum(tl.maximum(p1, -1.0), 1.0)
    p2 = tl.minimum(tl.maximum(p2, -1.0), 1.0)
    # largest step per axis, normalised units
    m0 = MAX_STEP / ((S0 - 1).to(DTYPE) / 2)
    m1 = MAX_STEP / ((S1 - 1).to(DTYPE) / 2)
    m2 = MAX_STEP / ((S2 - 1).to(DTYPE) / 2)
    # Per point, the C++ kernels' two early exits (csrc/include/deepatlas_fast/inversion.h, newton_solve):
    # a step that leaves p unchanged, or one of at most CONVERGED_STEP_EPS machine epsilons on every axis,
    # is that point's last (later steps would repeat it / only move p within rounding). The block stops
    # iterating once all its points have stopped: smooth fields need ~4 steps of the default 8.
    small_step = CONVERGED_STEP_EPS * _epsilon(DTYPE)
    active = mask
    it = 0
    while (it < iters) & (tl.max(active.to(tl.int32), axis=0) > 0):
        v0, v1, v2, j00, j01, j02, j10, j11, j12, j20, j21, j22 = _trilinear_vj(
            field, p0, p1, p2, S0, S1, S2, mask, DTYPE)
        if DISP:
            v0, v1, v2 = v0 + p0, v1 + p1, v2 + p2
            j00, j11, j22 = j00 + 1, j11 + 1, j22 + 1
        s0, s1, s2, _singular = _solve3(j00, j01, j02, j10, j11, j12, j20, j21, j22, v0 - u0, v1 - u1, v2 - u2, False, _SINGULAR_FORWARD)
        n0 = tl.minimum(tl.maximum(p0 - tl.minimum(tl.maximum(s0, -m0), m0), -1.0), 1.0)
        n1 = tl.minimum(tl.maximum(p1 - tl.minimum(tl.maximum(s1, -m1), m1), -1.0), 1.0)
        n2 = tl.minimum(tl.maximum(p2 - tl.minimum(tl.maximum(s2, -m2), m2), -1.0), 1.0)
        moved = (n0 != p0) | (n1 != p1) | (n2 != p2)
        small = (tl.abs(s0) <= small_step) & (tl.abs(s1) <= small_step) & (tl.abs(s2) <= small_step)
        p0 = tl.where(active, n0, p0)
        p1 = tl.where(active, n1, p1)
        p2 = tl.where(active, n2, p2)
        active = active & moved & (small == 0)
        it += 1
    v0, v1, v2, _j00, _j01, _j02, _j10, _j11, _j12, _j20, _j21, _j22 = _trilinear_vj(
        field, p0, p1, p2, S0, S1, S2, mask, DTYPE)
    if DISP:
        v0, v1, v2 = v0 + p0, v1 + p1, v2 + p2
    e0 = (v0 - u0) * ((T0 - 1).to(DTYPE) / 2)
    e1 = (v1 - u1) * ((T1 - 1).to(DTYPE) / 2)
    e2 = (v2 - u2) * ((T2 - 1).to(DTYPE) / 2)
    residual = tl.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
    valid = residual <= (tl.zeros_like(residual) + tol).to(DTYPE)  # tol rounded to DTYPE, as the reference
    if DISP:
        p0, p1, p2 = p0 - u0, p1 - u1, p2 - u2
    out = out_ptr + n * 3 * cells + t
    tl.store(out, p0, mask=mask)
    tl.store(out + cells, p1, mask=mask)
    tl.store(out + 2 * cells, p2, mask=mask)
    tl.store(valid_ptr + n * cells + t, valid.to(tl.uint8), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, field_ptr, inverse_ptr, valid_ptr, out_ptr, S0, S1, S2, T0, T1, T2,
                     DISP: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[corners of p] -= w * J(p)^-T g`` per valid, non-singular target point; ``out``: zeros
    shaped like the field. With DISP, ``inverse`` holds ``p - u`` and the map is ``id + field``."""
    n = tl.program_id(1).to(tl.int64)
    cells = T0 * T1 * T2
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cells
    t = tl.minimum(offs, cells - 1)
    at = n * 3 * cells + t
    g0 = tl.load(grad_ptr + at, mask=mask, other=0.0).to(DTYPE)
    g1 = tl.load(grad_ptr + cells + at, mask=mask, other=0.0).to(DTYPE)
    g2 = tl.load(grad_ptr + 2 * cells + at, mask=mask, other=0.0).to(DTYPE)
    p0 = tl.load(inverse_ptr + at, mask=mask, other=0.0).to(DTYPE)
    p1 = tl.load(inverse_ptr + cells + at, mask=mask, other=0.0).to(DTYPE)
    p2 = tl.load(inverse_ptr + 2 * cells + at, mask=mask, other=0.0).to(DTYPE)
    if DISP:
        i0, i1, i2 = _unflatten(t, T1, T2)
        p0 += _linspace(i0, T0, DTYPE)
        p1 += _linspace(i1, T1, DTYPE)
        p2 += _linspace(i2, T2, DTYPE)
    valid = tl.load(valid_ptr + n * cells + t, mask=mask, other=0) != 0
    points = S0 * S1 * S2
    field = field_ptr + n * 3 * points
    _v0, _v1, _v2, j00, j01, j02, j10, j11, j12, j20, j21, j22 = _trilinear_vj(
        field, p0, p1, p2, S0, S1, S2, mask, DTYPE)
    if DISP:
        j00, j11, j22 = j00 + 1, j11 + 1, j22 + 1
    lam0, lam1, lam2, singular = _solve3(j00, j01, j02, j10, j11, j12, j20, j21, j22, g0, g1, g2, True, _SINGULAR_BACKWARD)
    live = mask & valid & (singular == 0)
    l0, f0 = _cell(p0, S0, DTYPE)
    l1, f1 = _cell(p1, S1, DTYPE)
    l2, f2 = _cell(p2, S2, DTYPE)
    out = out_ptr + n * 3 * points
    for c in tl.static_range(8):
        flat, _in, w, _d0, _d1, _d2 = _corner(c, l0, f0, l1, f1, l2, f2, S0, S1, S2, False)
        tl.atomic_add(out + flat, -w * lam0, mask=live, sem="relaxed")
        tl.atomic_add(out + points + flat, -w * lam1, mask=live, sem="relaxed")
        tl.atomic_add(out + 2 * points + flat, -w * lam2, mask=live, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# host side


def _pyramid(out_shape):
    """Target grid, then halved (ceil, at least 2) until every size is 2, as the reference."""
    shapes = [tuple(out_shape)]
    while max(shapes[-1]) > 2:
        shapes.append(tuple(max(2, (s + 1) // 2) for s in shapes[-1]))
    return shapes


def _splat_pyramid(coords: torch.Tensor, out_shape, dtype):
    """Splats every pyramid level and resolves the guesses of all levels but the finest. Returns
    (finest level's accumulators ``[N, 4, cells]``, next coarser guess or None, its shape)."""
    n, _, *src = coords.shape
    points = src[0] * src[1] * src[2]
    size = block(256, 16384)
    programs = triton.cdiv(points, size)
    ty = tl_dtype(dtype)
    coarse, coarse_shape = None, (2, 2, 2)
    shapes = _pyramid(out_shape)
    for level, shape in enumerate(reversed(shapes)):
        cells = shape[0] * shape[1] * shape[2]
        replicas = max(1, min(programs, 8 * points // (cells * ATOMICS_PER_ADDRESS)))
        acc = torch.zeros((n, replicas, 4, cells), dtype=dtype, device=coords.device)
        _splat_kernel[(programs, n)](coords, acc, *src, *shape, replicas, DTYPE=ty, BLOCK=size)
        acc = acc.sum(dim=1) if replicas > 1 else acc
        if level == len(shapes) - 1:
            return acc, coarse, coarse_shape
        guess = new_empty((n, 3, cells), dtype=dtype, device=coords.device)
        rsize = block(512, 16384)
        _resolve_kernel[(triton.cdiv(cells, rsize), n)](
            acc, guess if coarse is None else coarse, guess, *shape, *coarse_shape,
            HAS_COARSE=coarse is not None, DTYPE=ty, BLOCK=rsize)
        coarse, coarse_shape = guess, shape


def _solve(field, out_shape, iters, tol, disp):
    n, _, *src = field.shape
    dtype = compute_dtype(field)
    cells = out_shape[0] * out_shape[1] * out_shape[2]
    if disp:
        acc, coarse, coarse_shape = field, None, (2, 2, 2)
    else:
        acc, coarse, coarse_shape = _splat_pyramid(field, out_shape, dtype)
    inverse = new_empty((n, 3, *out_shape), dtype=field.dtype, device=field.device)
    valid = new_empty((n, 1, *out_shape), dtype=torch.bool, device=field.device)
    size = block(128, 8192)
    _newton_kernel[(triton.cdiv(cells, size), n)](
        field, acc, field if coarse is None else coarse, inverse, valid.view(torch.uint8), float(tol), int(iters),
        *src, *out_shape, *coarse_shape,
        DISP=disp, HAS_COARSE=coarse is not None, DTYPE=tl_dtype(dtype), BLOCK=size)
    return inverse, valid


def _backward(grad, field, inverse, valid, disp):
    n, _, *src = field.shape
    out_shape = inverse.shape[2:]
    cells = out_shape[0] * out_shape[1] * out_shape[2]
    dtype = compute_dtype(field)
    out = torch.zeros(field.shape, dtype=dtype, device=field.device)
    size = block(128, 8192)
    _backward_kernel[(triton.cdiv(cells, size), n)](
        grad, field, inverse, valid.view(torch.uint8), out, *src, *out_shape,
        DISP=disp, DTYPE=tl_dtype(dtype), BLOCK=size)
    return out.to(field.dtype)


def invert(coords, out_shape, iters, tol):
    """``(inverse [N, 3, *out_shape] in coords' dtype, valid [N, 1, *out_shape] bool)``."""
    return _solve(coords, tuple(int(s) for s in out_shape), iters, tol, disp=False)


def invert_backward(grad, coords, inverse, valid):
    """Implicit-function gradient w.r.t. ``coords`` (atomics: not bitwise deterministic)."""
    return _backward(grad, coords, inverse, valid, disp=False)


def invert_displacement(disp, iters, tol):
    """``(inverse_disp, valid)`` of the same-grid displacement ``disp``, started at ``-disp``."""
    return _solve(disp, tuple(disp.shape[2:]), iters, tol, disp=True)


def invert_displacement_backward(grad, disp, inverse_disp, valid):
    """Implicit-function gradient w.r.t. ``disp`` (the map ``id + disp`` at ``id + inverse_disp``)."""
    return _backward(grad, disp, inverse_disp, valid, disp=True)
