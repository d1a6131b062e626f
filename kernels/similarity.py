"""Triton LNCC: fused forward and backward of :func:`deepatlas_fast.reference.similarity.lncc`.

Design (``h = kernel_size // 2``, ``K = kernel_size`` taps, a constexpr; ``w`` the 1-D window):

* A program owns one **tile**: an ``RH x RW`` in-plane region (power-of-two sides) of one ``(n, c)``
  channel whose inner ``(RH - 2h) x (RW - 2h)`` voxels are its outputs, and a run of ``z_step``
  planes that it walks through one plane at a time. Nothing is carried from plane to plane, so runs
  have no warm-up and can be short (parallelism comes from tiles x runs x channels).
* Per plane, the window sums are separable passes over the region: a **z pass** straight from global
  memory (K loads per input per region voxel, neighbouring planes hit L1/L2) that builds the moments
  ``a, b, a^2, b^2, ab`` on the fly (no moment volume is ever written), then the **x and y passes**
  (``INPLANE``): as tap sums through a per-program scratch area in global memory with a
  ``tl.debug_barrier`` between passes ("scratch", the measured default), or ("dot", new, not yet
  measured on a GPU) as two matrix products with the window's banded matrix, ``by @ (U @ bx)``, on
  tensor cores (float32 as TF32x3: three TF32 products, ~fp32 accurate; tested against an emulation of
  the GPU's rounding) with the operands in registers/shared memory: no scratch traffic, no barriers of
  ours, no scratch buffer (but 255 registers and 130-510 B of spills per thread at k=9).
* ``_stats_kernel`` finishes the window statistics and, per voxel, either writes the NCC map, adds it
  to a per-program partial sum (``reduction="mean"``: ``-sum(partials) / numel``, deterministic, no
  host sync), or (backward) computes the 3 or 5 **adjoint maps** ``alpha`` = d ncc / d S[.] scaled
  by the upstream gradient, and writes them to a buffer.
* ``_grad_kernel`` takes the same three window passes over the adjoint maps (the zero-padded
  symmetric window is its own transpose) and combines them with ``a``, ``b`` into the gradients:
  ``grad_a = W(alpha_a) + 2 a W(alpha_aa) + b W(alpha_ab)`` (likewise ``b``).

Numerics. The moments are summed in a frame shifted by a per-program constant ``c`` (the mean of the
region's in-volume values at the run's first plane, a typical local value): the zero-padded image
becomes ``a_pad - c`` everywhere (``-c`` outside the volume), and ``var = S[a'^2] - S[a']^2 / V`` and
``cross`` are exactly shift-invariant, so bright images (CT air at -1000, ``a + 1000``) do not cancel
catastrophically in float32 and constant regions give exactly 0. ``alpha_a``, ``alpha_b`` are stored
in the frame of the channel's mean (one device-side constant per ``(n, c)``, shared by both kernels).

Memory (extra, fp32, 256^3, C=1, k=9). Scratch ("scratch" only): programs x 10 R^2 values, ~40 MiB (the
GPU launch aims at ~2^20 / R^2 programs). Forward: scratch + one partial per program (+ the map for "none").
Backward: scratch + the adjoint buffer, 3 or 5 channels over a chunk of planes plus an h halo each
side; the backward runs chunk by chunk along z so that the buffer stays <= ``ALPHA_VOLUMES`` (2)
volumes (recomputing the moments in each chunk's halo planes): ~2.6 volumes (~170 MiB) in all.
DRAM traffic per voxel: forward reads a, b (+ writes the map); backward reads a, b twice, writes and
re-reads the 3-5 adjoint channels, writes the gradients. Everything else is L1/L2 traffic.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._common import block, compute_dtype, new_empty, tl_dtype

# The in-plane window passes (see _inplane): "scratch", "dot" (banded matrix products), or "auto": "dot" up to
# DOT_MAX_TAPS taps (32^2 regions), "scratch" above (at 64^2 the products' operands spill 2-3 KB per thread
# in the sm_90 compile, the scratch passes <= 248 B: benchmarks/results/2026-11-27-triton-sm90-resources.md).
# "scratch" is the default: the GPU report timed "dot" slower on an H200 (256^3, k=9: 16.5 vs 15.3 ms fwd+bwd,
# benchmarks/results/2026-11-27-h200-kernels.md).
INPLANE = "scratch"
DOT_MAX_TAPS = 11
# No software pipelining of the plane loop: it would multi-buffer the K unrolled tap loads of both inputs in
# shared memory (172-393 KB per block with the default 3 stages, over an H100's 227 KB: no launch).
STAGES = 1
ALPHA_VOLUMES = 2  # the backward adjoint buffer stays below this many input volumes ...
MIN_CHUNK = 32  # ... unless the chunk would be shorter than this many planes (small volumes)


@triton.jit
def _tile(pid_t, n_tx, H, W, HALF: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
    """In-plane offsets (clamped into the plane), in-volume mask and output mask of a region."""
    ty = pid_t // n_tx
    tx = pid_t - ty * n_tx
    y0 = ty * (RH - 2 * HALF)
    x0 = tx * (RW - 2 * HALF)
    r = tl.arange(0, RH)[:, None]
    c = tl.arange(0, RW)[None, :]
    y = y0 - HALF + r
    x = x0 - HALF + c
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    valid = inside & (r >= HALF) & (r < RH - HALF) & (c >= HALF) & (c < RW - HALF)
    off = tl.minimum(tl.maximum(y, 0), H - 1) * W + tl.minimum(tl.maximum(x, 0), W - 1)
    return off, inside, valid


@triton.jit
def _plane(base, z, HW):
    """Offset of plane ``z`` of a channel starting at ``base`` (``HW`` is int64)."""
    return base + z * HW


@triton.jit
def _region_mean(ptr, inside, DT: tl.constexpr):
    """Mean of the in-volume values of a region (the moments' shift: a typical local value)."""
    total = tl.sum(tl.sum(tl.load(ptr, mask=inside, other=0.0).to(DT), axis=1), axis=0)
    return total / tl.sum(tl.sum(inside.to(DT), axis=1), axis=0)


@triton.jit
def _put(ptr, loc, stride, mask, v0, v1, v2, v3, v4, NCH: tl.constexpr):
    """Store 3 or 5 channels ``stride`` apart."""
    tl.store(ptr + loc, v0, mask=mask)
    tl.store(ptr + stride + loc, v1, mask=mask)
    tl.store(ptr + 2 * stride + loc, v2, mask=mask)
    if NCH == 5:
        tl.store(ptr + 3 * stride + loc, v3, mask=mask)
        tl.store(ptr + 4 * stride + loc, v4, mask=mask)


@triton.jit
def _moments_z(a_ptr, b_ptr, base, off, inside, z, D, HW, ca, cb, prm_ptr,
               K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, DT: tl.constexpr):
    """z-window sums of the shifted moments a', b', a'^2, b'^2, a'b' (a' = a_pad - ca) at plane z."""
    sa = tl.zeros([RH, RW], DT)
    sb = tl.zeros([RH, RW], DT)
    saa = tl.zeros([RH, RW], DT)
    sbb = tl.zeros([RH, RW], DT)
    sab = tl.zeros([RH, RW], DT)
    for j in tl.static_range(K):
        zz = z + (j - K // 2)
        ptr = _plane(base, tl.minimum(tl.maximum(zz, 0), D - 1), HW) + off
        m = inside & (zz >= 0) & (zz < D)
        av = tl.load(a_ptr + ptr, mask=m, other=0.0).to(DT) - ca
        bv = tl.load(b_ptr + ptr, mask=m, other=0.0).to(DT) - cb
        w = tl.load(prm_ptr + j)
        wa = w * av
        wb = w * bv
        sa += wa
        sb += wb
        saa += wa * av
        sbb += wb * bv
        sab += wa * bv
    return sa, sb, saa, sbb, sab


@triton.jit
def _adjoints_z(al_ptr, base, off, inside, z, p0, p1, HW, stride, prm_ptr, NA: tl.constexpr,
                K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, DT: tl.constexpr):
    """z-window sums (zero padded) of the NA adjoint channels stored for planes [p0, p1)."""
    u0 = tl.zeros([RH, RW], DT)
    u1 = tl.zeros([RH, RW], DT)
    u2 = tl.zeros([RH, RW], DT)
    u3 = tl.zeros([RH, RW], DT)
    u4 = tl.zeros([RH, RW], DT)
    for j in tl.static_range(K):
        zz = z + (j - K // 2)
        ptr = al_ptr + _plane(base, tl.minimum(tl.maximum(zz, p0), p1 - 1) - p0, HW) + off
        m = inside & (zz >= p0) & (zz < p1)
        w = tl.load(prm_ptr + j)
        u0 += w * tl.load(ptr, mask=m, other=0.0)
        u1 += w * tl.load(ptr + stride, mask=m, other=0.0)
        u2 += w * tl.load(ptr + 2 * stride, mask=m, other=0.0)
        if NA == 5:
            u3 += w * tl.load(ptr + 3 * stride, mask=m, other=0.0)
            u4 += w * tl.load(ptr + 4 * stride, mask=m, other=0.0)
    return u0, u1, u2, u3, u4


@triton.jit
def _pass(src, prm_ptr, STEP: tl.constexpr, NCH: tl.constexpr,
          K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, DT: tl.constexpr):
    """Window sums, taps STEP apart (1: along x, RW: along y), of NCH region-shaped channels stored
    R^2 apart at ``src``. Tap addresses are one pointer plus constants (no clamping, so no per-tap
    address registers): at region edges they run up to h rows/columns past the channel, which only
    edge outputs (masked by every caller) read; the scratch has that much slack at both ends."""
    ptr = src + tl.arange(0, RH)[:, None] * RW + tl.arange(0, RW)[None, :]
    u0 = tl.zeros([RH, RW], DT)
    u1 = tl.zeros([RH, RW], DT)
    u2 = tl.zeros([RH, RW], DT)
    u3 = tl.zeros([RH, RW], DT)
    u4 = tl.zeros([RH, RW], DT)
    for j in tl.static_range(K):
        w = tl.load(prm_ptr + j)
        tap = ptr + (j - K // 2) * STEP
        u0 += w * tl.load(tap)
        u1 += w * tl.load(tap + RH * RW)
        u2 += w * tl.load(tap + 2 * RH * RW)
        if NCH == 5:
            u3 += w * tl.load(tap + 3 * RH * RW)
            u4 += w * tl.load(tap + 4 * RH * RW)
    return u0, u1, u2, u3, u4


@triton.jit
def _bands(prm_ptr, K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
    """The window as banded matrices: x pass ``U @ bx`` (``bx[i, j] = w[i - j + h]``), y pass ``by @ U``
    (``by[i, j] = w[j - i + h]``); zero outside the band, so sums stop at the region's edges (whose
    outputs every caller masks)."""
    i = tl.arange(0, RW)[:, None] - tl.arange(0, RW)[None, :] + K // 2
    bx = tl.load(prm_ptr + tl.minimum(tl.maximum(i, 0), K - 1), mask=(i >= 0) & (i < K), other=0.0)
    j = tl.arange(0, RH)[None, :] - tl.arange(0, RH)[:, None] + K // 2
    by = tl.load(prm_ptr + tl.minimum(tl.maximum(j, 0), K - 1), mask=(j >= 0) & (j < K), other=0.0)
    return bx, by


@triton.jit
def _window_xy(u, bx, by, PREC: tl.constexpr):
    """x- then y-window sums of one region-shaped channel, as two matrix products."""
    return tl.dot(by, tl.dot(u, bx, input_precision=PREC), input_precision=PREC)


@triton.jit
def _inplane(scr, bx, by, u0, u1, u2, u3, u4, prm_ptr, NCH: tl.constexpr, INPLANE: tl.constexpr,
             PREC: tl.constexpr, K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, DT: tl.constexpr):
    """x- then y-window sums of NCH region-shaped channels. INPLANE "dot": banded matrix products in
    registers (the compiler moves the operands through shared memory); "scratch": tap sums through the
    program's scratch area in global memory (the barriers make one pass's stores visible to the other
    threads of the program)."""
    if INPLANE == "dot":
        u0 = _window_xy(u0, bx, by, PREC)
        u1 = _window_xy(u1, bx, by, PREC)
        u2 = _window_xy(u2, bx, by, PREC)
        if NCH == 5:
            u3 = _window_xy(u3, bx, by, PREC)
            u4 = _window_xy(u4, bx, by, PREC)
        return u0, u1, u2, u3, u4
    else:
        loc = tl.arange(0, RH)[:, None] * RW + tl.arange(0, RW)[None, :]
        _put(scr, loc, RH * RW, loc >= 0, u0, u1, u2, u3, u4, NCH)
        tl.debug_barrier()
        u0, u1, u2, u3, u4 = _pass(scr, prm_ptr, 1, NCH, K, RH, RW, DT)
        scr = scr + NCH * RH * RW
        _put(scr, loc, RH * RW, loc >= 0, u0, u1, u2, u3, u4, NCH)
        tl.debug_barrier()
        return _pass(scr, prm_ptr, RW, NCH, K, RH, RW, DT)


@triton.jit
def _inplane_setup(scr_ptr, slot, prm_ptr, INPLANE: tl.constexpr, K: tl.constexpr, RH: tl.constexpr,
                   RW: tl.constexpr):
    """What ``_inplane`` needs: the band matrices ("dot") or this program's scratch slot ("scratch")."""
    if INPLANE == "dot":
        bx, by = _bands(prm_ptr, K, RH, RW)
        return scr_ptr, bx, by
    else:
        return scr_ptr + (K // 2) * (RW + 1) + slot * (10 * RH * RW), 0.0, 0.0


@triton.jit
def _program(n_tx, D, H, W, z_lo, z_hi, z_step, K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
    """This program's tile, plane run [z0, z1), channel base offset and scratch slot."""
    pid_t = tl.program_id(0)
    pid_z = tl.program_id(1)
    nc = tl.program_id(2)
    HW = tl.cast(H, tl.int64) * W  # H may be specialised to a constexpr (H == 1)
    base = nc * D * HW
    off, inside, valid = _tile(pid_t, n_tx, H, W, K // 2, RH, RW)
    z0 = z_lo + pid_z * z_step
    z1 = tl.minimum(z0 + z_step, z_hi)
    slot = (nc * tl.num_programs(1) + pid_z).to(tl.int64) * tl.num_programs(0) + pid_t
    return nc, HW, base, off, inside, valid, z0, z1, slot


@triton.jit
def _stats_kernel(a_ptr, b_ptr, prm_ptr, mu_ptr, g_ptr, out_ptr, scr_ptr,
                  D, H, W, n_tx, z_lo, z_hi, z_step, P,
                  K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, ADJOINT: tl.constexpr,
                  MEAN: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, NA: tl.constexpr,
                  INPLANE: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    """Window statistics at planes [z_lo, z_hi). Forward: NCC map (or per-program partial sums when
    MEAN) into out. ADJOINT: the adjoint channels [ab, (a, aa), (b, bb)] into out, a buffer of P
    planes per channel whose plane 0 is z_lo."""
    nc, HW, base, off, inside, valid, z0, z1, slot = _program(n_tx, D, H, W, z_lo, z_hi, z_step, K, RH, RW)
    scr, bx, by = _inplane_setup(scr_ptr, slot, prm_ptr, INPLANE, K, RH, RW)
    ca = _region_mean(a_ptr + _plane(base, z0, HW) + off, inside, DT)
    cb = _region_mean(b_ptr + _plane(base, z0, HW) + off, inside, DT)
    volume = tl.load(prm_ptr + K)
    eps = tl.load(prm_ptr + K + 1)
    if ADJOINT:
        # alpha_a / alpha_b live in the frame of the channel's mean (shared with _grad_kernel)
        da0 = ca - tl.load(mu_ptr + 2 * nc)
        db0 = cb - tl.load(mu_ptr + 2 * nc + 1)
        if MEAN:
            g = tl.load(g_ptr).to(DT)
    acc = tl.zeros([RH, RW], DT)
    for z in range(z0, z1):
        sa, sb, saa, sbb, sab = _moments_z(a_ptr, b_ptr, base, off, inside, z, D, HW, ca, cb, prm_ptr, K, RH, RW, DT)
        sa, sb, saa, sbb, sab = _inplane(scr, bx, by, sa, sb, saa, sbb, sab, prm_ptr, 5, INPLANE, PREC, K, RH, RW, DT)
        ma = sa / volume
        mb = sb / volume
        var_a = saa - ma * sa
        var_b = sbb - mb * sb
        cross = sab - mb * sa
        fa = tl.maximum(var_a, eps)
        fb = tl.maximum(var_b, eps)
        q = fa * fb
        ncc = cross * cross / q
        vox = _plane(base, z, HW) + off
        if ADJOINT:
            if not MEAN:
                g = tl.load(g_ptr + vox, mask=valid, other=0.0).to(DT)
            g_cross = 2 * g * cross / q
            g_va = tl.where(var_a >= eps, -g * ncc / fa, 0.0)
            g_vb = tl.where(var_b >= eps, -g * ncc / fb, 0.0)
            mean_a = ma + da0
            mean_b = mb + db0
            alpha_a = -(g_cross * mean_b + 2 * g_va * mean_a)
            alpha_b = -(g_cross * mean_a + 2 * g_vb * mean_b)
            dst = out_ptr + _plane(nc * NA * P * HW, z - z_lo, HW)
            if NEED_A and NEED_B:
                _put(dst, off, P * HW, valid, g_cross, alpha_a, g_va, alpha_b, g_vb, 5)
            elif NEED_A:
                _put(dst, off, P * HW, valid, g_cross, alpha_a, g_va, g_va, g_va, 3)
            else:
                _put(dst, off, P * HW, valid, g_cross, alpha_b, g_vb, g_vb, g_vb, 3)
        elif MEAN:
            acc += tl.where(valid, ncc, 0.0)
        else:
            tl.store(out_ptr + vox, ncc, mask=valid)
    if MEAN and not ADJOINT:
        tl.store(out_ptr + slot, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _grad_kernel(al_ptr, a_ptr, b_ptr, prm_ptr, mu_ptr, ga_ptr, gb_ptr, scr_ptr,
                 D, H, W, n_tx, z_lo, z_hi, z_step, p0, p1, P,
                 K: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, NEED_A: tl.constexpr,
                 NEED_B: tl.constexpr, NA: tl.constexpr, INPLANE: tl.constexpr, PREC: tl.constexpr,
                 DT: tl.constexpr):
    """Gradients at planes [z_lo, z_hi) from the adjoint buffer holding planes [p0, p1)."""
    nc, HW, base, off, inside, valid, z0, z1, slot = _program(n_tx, D, H, W, z_lo, z_hi, z_step, K, RH, RW)
    scr, bx, by = _inplane_setup(scr_ptr, slot, prm_ptr, INPLANE, K, RH, RW)
    a0 = tl.load(mu_ptr + 2 * nc)
    b0 = tl.load(mu_ptr + 2 * nc + 1)
    al_base = nc * NA * P * HW
    for z in range(z0, z1):
        u0, u1, u2, u3, u4 = _adjoints_z(al_ptr, al_base, off, inside, z, p0, p1, HW, P * HW, prm_ptr,
                                         NA, K, RH, RW, DT)
        w_ab, w_x, w_xx, w_y, w_yy = _inplane(scr, bx, by, u0, u1, u2, u3, u4, prm_ptr, NA, INPLANE, PREC, K, RH, RW, DT)
        vox = _plane(base, z, HW) + off
        ap = tl.load(a_ptr + vox, mask=valid, other=0.0).to(DT) - a0
        bp = tl.load(b_ptr + vox, mask=valid, other=0.0).to(DT) - b0
        if NEED_A:
            grad = w_x + 2 * ap * w_xx + bp * w_ab
            tl.store(ga_ptr + vox, grad.to(ga_ptr.dtype.element_ty), mask=valid)
        if NEED_B:
            if NEED_A:
                grad = w_y + 2 * bp * w_yy + ap * w_ab
            else:
                grad = w_x + 2 * bp * w_xx + ap * w_ab
            tl.store(gb_ptr + vox, grad.to(gb_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------- host


@contextlib.contextmanager
def inplane_mode(mode: str):
    """Run with :data:`INPLANE` set to ``mode`` ("scratch", "dot" or "auto"), restored on exit; it is read
    when an op's launch is planned, so a backward run later by autograd must be inside too."""
    global INPLANE
    before, INPLANE = INPLANE, mode
    try:
        yield
    finally:
        INPLANE = before


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def params(kernel_size: int, kernel: str, eps: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``[w_0 .. w_{K-1}, V, eps]`` built on the device (no host-to-device copy, so no stream sync):
    the taps of :func:`deepatlas_fast.reference.similarity.window_weights`, ``V = (sum w)^3``."""
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    if kernel == "box":
        w = torch.ones_like(x)
    else:
        sigma = kernel_size / 3.0
        w = torch.exp(-0.5 / (sigma * sigma) * x**2)
    w = w.to(dtype)
    return torch.cat([w, (w.sum() ** 3).reshape(1), torch.full((1,), eps, dtype=dtype, device=device)])


class _Plan:
    """Launch geometry: region side R (power of two, >= 2h + 1), tiles per plane, warps."""

    def __init__(self, shape, kernel_size: int):
        n, c, self.d, self.h, self.w = shape
        self.nc = n * c
        self.half = half = kernel_size // 2
        gpu = max(32, min(64, _pow2(6 * half)))
        if gpu - 2 * half < 8:
            gpu = _pow2(2 * half + 8)
        self.rh = block(gpu, max(_pow2(min(self.h + 2 * half, 128)), _pow2(2 * half + 1)))
        self.rw = block(gpu, max(_pow2(min(self.w + 2 * half, 128)), _pow2(2 * half + 1)))
        self.n_ty = -(-self.h // (self.rh - 2 * half))
        self.n_tx = -(-self.w // (self.rw - 2 * half))
        self.warps = max(1, min(16, self.rh * self.rw // 256))  # 8 values per thread
        self.inplane = INPLANE if INPLANE != "auto" else ("dot" if kernel_size <= DOT_MAX_TAPS else "scratch")

    def runs(self, planes: int) -> tuple[int, tuple[int, int, int]]:
        """(planes per program, grid) for a run of ``planes`` planes: on the GPU about 2^20 / R^2
        programs (enough to fill an H100, scratch ~40 MiB in float32); interpreted, one run."""
        tiles = self.n_ty * self.n_tx
        z_step = block(max(1, -(-planes * tiles * self.nc * self.rh * self.rw // 2**20)), planes)
        return z_step, (tiles, -(-planes // z_step), self.nc)

    def scratch(self, grids, dtype, device) -> torch.Tensor:
        """The programs' scratch areas (in-plane mode "scratch"; a placeholder for "dot")."""
        if self.inplane == "dot":
            return new_empty((1,), dtype=dtype, device=device)
        programs = max(g[0] * g[1] * g[2] for g in grids)
        slack = self.half * (self.rw + 1)  # see _pass
        return new_empty((programs * 10 * self.rh * self.rw + 2 * slack,), dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 window sums on tensor cores as three TF32 products (hi*hi +
    hi*lo + lo*hi, ~fp32 accuracy; plain TF32 would round the moments to 11 bits); float64 exact."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _stats(plan, k, a, b, prm, mu, g, out, scr, z_lo, z_hi, P=1, *, adjoint=False, mean=False, need=(False, False), na=3):
    z_step, grid = plan.runs(z_hi - z_lo)
    _stats_kernel[grid](
        a, b, prm, mu, g, out, scr, plan.d, plan.h, plan.w, plan.n_tx, z_lo, z_hi, z_step, P,
        K=k, RH=plan.rh, RW=plan.rw, ADJOINT=adjoint, MEAN=mean, NEED_A=need[0], NEED_B=need[1],
        NA=na, INPLANE=plan.inplane, PREC=_precision(prm.dtype), DT=tl_dtype(prm.dtype), num_warps=plan.warps,
        num_stages=STAGES,
    )


def lncc(a: torch.Tensor, b: torch.Tensor, kernel_size: int, kernel: str, eps: float, reduction: str) -> torch.Tensor:
    dtype = compute_dtype(a, b)
    plan = _Plan(a.shape, kernel_size)
    prm = params(kernel_size, kernel, eps, dtype, a.device)
    grid = plan.runs(plan.d)[1]
    scr = plan.scratch([grid], dtype, a.device)
    mean = reduction == "mean"
    out = new_empty((grid[0] * grid[1] * grid[2],) if mean else a.shape, dtype=dtype, device=a.device)
    _stats(plan, kernel_size, a, b, prm, prm, prm, out, scr, 0, plan.d, mean=mean)  # mu, g unused
    return -(out.sum() / a.numel()) if mean else out


def lncc_backward(grad, a, b, kernel_size: int, kernel: str, eps: float, reduction: str, need_a: bool, need_b: bool):
    if not (need_a or need_b):
        return []
    dtype = compute_dtype(a, b)
    plan = _Plan(a.shape, kernel_size)
    prm = params(kernel_size, kernel, eps, dtype, a.device)
    mean = reduction == "mean"
    g = (grad.to(dtype) * (-1.0 / a.numel())).reshape(1) if mean else grad
    # per-(n, c) means of a and b, [NC, 2]: the frame of the adjoints alpha_a, alpha_b
    mu = torch.stack([x.mean((2, 3, 4), dtype=dtype).reshape(-1) for x in (a, b)], 1).contiguous()
    na = 1 + 2 * (need_a + need_b)
    d, half = plan.d, plan.half
    chunk = min(d, max(ALPHA_VOLUMES * d // na - 2 * half, MIN_CHUNK))
    P = min(d, chunk + 2 * half)  # adjoint planes per chunk: its own plus an h halo each side
    alpha = new_empty((plan.nc, na, P, plan.h, plan.w), dtype=dtype, device=a.device)
    spans = [(z0, min(z0 + chunk, d)) for z0 in range(0, d, chunk)]
    halos = [(max(z0 - half, 0), min(z1 + half, d)) for z0, z1 in spans]
    scr = plan.scratch([plan.runs(hi - lo)[1] for lo, hi in spans + halos], dtype, a.device)
    grad_a = new_empty(a.shape, dtype=a.dtype, device=a.device) if need_a else a
    grad_b = new_empty(b.shape, dtype=b.dtype, device=b.device) if need_b else b
    for (z0, z1), (p0, p1) in zip(spans, halos):
        _stats(plan, kernel_size, a, b, prm, mu, g, alpha, scr, p0, p1, P, adjoint=True, mean=mean, need=(need_a, need_b), na=na)
        z_step, grid = plan.runs(z1 - z0)
        _grad_kernel[grid](
            alpha, a, b, prm, mu, grad_a, grad_b, scr, plan.d, plan.h, plan.w, plan.n_tx, z0, z1, z_step, p0, p1, P,
            K=kernel_size, RH=plan.rh, RW=plan.rw, NEED_A=need_a, NEED_B=need_b, NA=na, INPLANE=plan.inplane,
            PREC=_precision(dtype), DT=tl_dtype(dtype), num_warps=plan.warps, num_stages=STAGES,
        )
    return [x for need, x in ((need_a, grad_a), (need_b, grad_b)) if need]
