"""Triton kernels for ``sample`` / ``warp`` (trilinear, ``align_corners=True``, border/zeros padding).

Semantics are those of :mod:`deepatlas_fast.reference.sampling` (= ``F.grid_sample``), gradient
conventions included. ``warp`` runs the same kernels with ``WARP=True``: the identity coordinate of
output voxel ``q`` (``torch.linspace(-1, 1, s)`` per axis, 0 when ``s == 1``) is generated from ``q``
inside the kernel and added to the displacement; the identity grid never exists in memory.

Kernels (grid ``(blocks of output points, N)`` unless stated; one program = ``BLOCK_V`` points):

* ``_forward_kernel``: loads each point's 3 coordinates (coalesced), computes its cell and fractions,
  then for each channel chunk gathers the 8 corners as ``[BLOCK_C, BLOCK_V]`` tiles (voxel axis
  contiguous) and writes the output once. The per-corner index/weight math does not depend on the
  channel chunk and is hoisted out of the chunk loop (checked in the TTGIR), so it runs once per point
  whatever C is. Traffic: 3 coordinate reads + C writes per point, 8 gathers per channel.
* ``_backward_kernel`` (constexpr ``NEED_VOL`` / ``NEED_COORDS``: what is not asked for is not even
  compiled). Coordinate gradient = gather, no atomics: per chunk it accumulates
  ``sum_corners vol * d weight / d position`` for the 3 axes and contracts it with the grad tile over
  channels. Volume gradient = trilinear splat with relaxed ``atomic_add`` into a zeroed float32/64
  buffer (``grad_vol`` itself when ``vol`` has the compute dtype; else one extra volume, cast at
  the end). A coordinates-only backward reads grad, coords and vol and writes grad_coords, nothing else.
* Deterministic volume gradient (when ``torch.are_deterministic_algorithms_enabled()``), no float
  atomics: ``_cell_key_kernel`` writes for every point the id of the cell it falls in (lower corner
  in ``[-1, size-1]`` per axis; a sentinel past the last cell when no corner is in bounds);
  ``torch.sort(stable=True)`` orders the points by cell and ``torch.searchsorted`` gives each cell's
  run (all on the device). ``_splat_gather_kernel`` (grid over volume voxels) writes each voxel once:
  for each of the 8 cells touching it, it walks that cell's points up to the longest run in its block
  (masked), recomputing each point's weight from its coordinates, in a fixed order (bitwise
  reproducible). Extra memory: int32 key + int64 order per point (+ the sorted keys while sorting),
  int32 start per cell (about one volume; twice while searching). Cost grows with the longest run:
  points piled into one cell are walked one after the other by its 8 voxels.

Compute dtype: float64 when vol or coords is float64, else float32 (halves are widened on load, and
results are narrowed to a half dtype through float32).
Offsets of batch and channel planes are int64; flat indices inside one ``D*H*W`` volume and inside one
output grid are int32 (each must stay below 2**31 elements). Coordinates are clamped before they
become indices, so NaN/inf coordinates cannot address memory out of bounds (NaN propagates to the
output through the weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, compute_dtype, new_empty, tl_dtype

# ----------------------------------------------------------------------------- index math (shared)


@triton.jit
def _identity(i, s, DT: tl.constexpr):
    """``torch.linspace(-1, 1, s)[i]`` (same two-sided formula), 0 when ``s == 1``."""
    before = i.to(DT)
    after = (s - 1 - i).to(DT)
    span = before + after  # s - 1, as a tensor of the compute dtype
    step = 2.0 / tl.maximum(span, 1.0)
    value = tl.where(i < s // 2, -1.0 + step * before, 1.0 - step * after)
    return tl.where(span > 0, value, 0.0)


@triton.jit
def _axis(field_ptr, q, mask, grid_index, grid_size, size, ZEROS: tl.constexpr, WARP: tl.constexpr, DT: tl.constexpr):
    """One axis of one point: (lower corner index, fraction, d position / d coordinate)."""
    coord = tl.load(field_ptr + q, mask=mask, other=0.0).to(DT)
    if WARP:
        coord += _identity(grid_index, grid_size, DT)
    x = ((coord + 1.0) * 0.5) * (size - 1)
    scale = (size - 1) * 0.5
    if ZEROS:
        # beyond one voxel outside every corner reads 0; the clamp keeps the index in int range
        pos = tl.minimum(tl.maximum(x, -2.0), size + 1)
        slope = tl.zeros_like(x) + scale
    else:
        pos = tl.minimum(tl.maximum(x, 0.0), size - 1)
        slope = tl.where((x > 0) & (x < size - 1), scale, 0.0)
    pos = tl.where(x == x, pos, x)  # min/max may drop a NaN: keep it for the weights ...
    low = tl.floor(tl.where(pos == pos, pos, 0.0))  # ... but never for the index
    return low.to(tl.int32), pos - low, slope


@triton.jit
def _locate(field_ptr, q, mask, P, od, oh, ow, D, H, W, ZEROS: tl.constexpr, WARP: tl.constexpr, DT: tl.constexpr):
    """Cell, fractions and slopes of points ``q`` (any shape) of one batch's field ``[3, P]``."""
    iz = q // (oh * ow)
    iy = (q // ow) % oh
    ix = q % ow
    lz, fz, sz = _axis(field_ptr, q, mask, iz, od, D, ZEROS, WARP, DT)
    ly, fy, sy = _axis(field_ptr + P, q, mask, iy, oh, H, ZEROS, WARP, DT)
    lx, fx, sx = _axis(field_ptr + 2 * P, q, mask, ix, ow, W, ZEROS, WARP, DT)
    return lz, fz, sz, ly, fy, sy, lx, fx, sx


@triton.jit
def _factor(frac, bit: tl.constexpr):
    """Linear weight of the corner at offset ``bit`` (0 or 1) from the lower one along one axis."""
    if bit:
        w = frac
    else:
        w = 1.0 - frac
    return w


@triton.jit
def _corner_index(low, bit: tl.constexpr, size):
    """Index along one axis (clamped into the volume) and whether it is really inside."""
    i = low + bit
    return tl.minimum(tl.maximum(i, 0), size - 1), (i >= 0) & (i < size)


@triton.jit
def _corner(k: tl.constexpr, lz, fz, ly, fy, lx, fx, D, H, W):
    """Corner ``k = 4 dz + 2 dy + dx`` of each point: (flat index, in bounds, z/y/x factors)."""
    iz, vz = _corner_index(lz, (k >> 2) & 1, D)
    iy, vy = _corner_index(ly, (k >> 1) & 1, H)
    ix, vx = _corner_index(lx, k & 1, W)
    flat = (iz * H + iy) * W + ix
    return flat, vz & vy & vx, _factor(fz, (k >> 2) & 1), _factor(fy, (k >> 1) & 1), _factor(fx, k & 1)


@triton.jit
def _channels(c0, C, BLOCK_C: tl.constexpr):
    """Channel chunk: int64 channel indices ``[BLOCK_C]`` (to scale by a plane size) and mask."""
    c = c0 + tl.arange(0, BLOCK_C)
    return c.to(tl.int64), c < C


@triton.jit
def _store(ptr, value, mask):
    """Store in ``ptr``'s dtype; a half dtype is reached through float32 (the interpreter's direct
    float64 -> bfloat16 cast is wrong)."""
    ty = ptr.dtype.element_ty
    if ty.is_fp16() or ty.is_bf16():
        value = value.to(tl.float32)
    tl.store(ptr, value.to(ty), mask=mask)


@triton.jit
def _voxels(BLOCK_V: tl.constexpr, count):
    """This program's voxel indices (clamped to 0 past ``count``) and mask."""
    q = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = q < count
    return tl.where(mask, q, 0), mask


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(
    vol_ptr, field_ptr, out_ptr, C, D, H, W, od, oh, ow,
    ZEROS: tl.constexpr, WARP: tl.constexpr, DT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    P = od * oh * ow
    DHW = D * H * W
    q, mask = _voxels(BLOCK_V, P)
    lz, fz, sz, ly, fy, sy, lx, fx, sx = _locate(field_ptr + n * 3 * P, q, mask, P, od, oh, ow, D, H, W, ZEROS, WARP, DT)
    vol_n = vol_ptr + n * C * DHW
    out_n = out_ptr + n * C * P
    for c0 in range(0, C, BLOCK_C):
        c, cmask = _channels(c0, C, BLOCK_C)
        acc = tl.zeros([BLOCK_C, BLOCK_V], DT)
        for k in tl.static_range(8):
            flat, inside, wz, wy, wx = _corner(k, lz, fz, ly, fy, lx, fx, D, H, W)
            v = tl.load(vol_n + c[:, None] * DHW + flat[None, :], mask=cmask[:, None] & (inside & mask)[None, :], other=0.0)
            acc += v.to(DT) * (wz * wy * wx)[None, :]
        _store(out_n + c[:, None] * P + q[None, :], acc, cmask[:, None] & mask[None, :])


@triton.jit
def _backward_kernel(
    grad_ptr, vol_ptr, field_ptr, gvol_ptr, gfield_ptr, C, D, H, W, od, oh, ow,
    ZEROS: tl.constexpr, WARP: tl.constexpr, NEED_VOL: tl.constexpr, NEED_COORDS: tl.constexpr,
    DT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    P = od * oh * ow
    DHW = D * H * W
    q, mask = _voxels(BLOCK_V, P)
    lz, fz, sz, ly, fy, sy, lx, fx, sx = _locate(field_ptr + n * 3 * P, q, mask, P, od, oh, ow, D, H, W, ZEROS, WARP, DT)
    # d sample_c / d position = sum over corners of vol_c * d weight / d position; then sum_c grad_c * that
    gz = tl.zeros([BLOCK_V], DT)
    gy = tl.zeros([BLOCK_V], DT)
    gx = tl.zeros([BLOCK_V], DT)
    for c0 in range(0, C, BLOCK_C):
        c, cmask = _channels(c0, C, BLOCK_C)
        g = tl.load(grad_ptr + n * C * P + c[:, None] * P + q[None, :], mask=cmask[:, None] & mask[None, :], other=0.0)
        g = g.to(DT)
        dz = tl.zeros([BLOCK_C, BLOCK_V], DT)
        dy = tl.zeros([BLOCK_C, BLOCK_V], DT)
        dx = tl.zeros([BLOCK_C, BLOCK_V], DT)
        for k in tl.static_range(8):
            flat, inside, wz, wy, wx = _corner(k, lz, fz, ly, fy, lx, fx, D, H, W)
            offsets = n * C * DHW + c[:, None] * DHW + flat[None, :]
            cmask2 = cmask[:, None] & (inside & mask)[None, :]
            if NEED_VOL:
                tl.atomic_add(gvol_ptr + offsets, g * (wz * wy * wx)[None, :], mask=cmask2, sem="relaxed")
            if NEED_COORDS:
                v = tl.load(vol_ptr + offsets, mask=cmask2, other=0.0).to(DT)
                # d factor / d position is +1 for the upper corner, -1 for the lower one
                dz += v * ((2 * ((k >> 2) & 1) - 1) * wy * wx)[None, :]
                dy += v * (wz * (2 * ((k >> 1) & 1) - 1) * wx)[None, :]
                dx += v * (wz * wy * (2 * (k & 1) - 1))[None, :]
        if NEED_COORDS:
            gz += tl.sum(g * dz, axis=0)
            gy += tl.sum(g * dy, axis=0)
            gx += tl.sum(g * dx, axis=0)
    if NEED_COORDS:
        gfield_n = gfield_ptr + n * 3 * P + q
        _store(gfield_n, gz * sz, mask)
        _store(gfield_n + P, gy * sy, mask)
        _store(gfield_n + 2 * P, gx * sx, mask)


@triton.jit
def _cell_key_kernel(
    field_ptr, key_ptr, D, H, W, od, oh, ow, cells,
    ZEROS: tl.constexpr, WARP: tl.constexpr, DT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    P = od * oh * ow
    q, mask = _voxels(BLOCK_V, P)
    lz, fz, sz, ly, fy, sy, lx, fx, sx = _locate(field_ptr + n * 3 * P, q, mask, P, od, oh, ow, D, H, W, ZEROS, WARP, DT)
    # a cell touches the volume iff its lower corner is in [-1, size-1] on every axis
    touches = (lz >= -1) & (lz < D) & (ly >= -1) & (ly < H) & (lx >= -1) & (lx < W)
    cell = ((lz + 1) * (H + 1) + (ly + 1)) * (W + 1) + (lx + 1)
    key = tl.where(touches, n * cells + cell, tl.num_programs(1).to(tl.int64) * cells)
    tl.store(key_ptr + n * P + q, key.to(key_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splat_gather_kernel(
    grad_ptr, field_ptr, order_ptr, start_ptr, gvol_ptr, C, D, H, W, od, oh, ow, cells,
    ZEROS: tl.constexpr, WARP: tl.constexpr, DT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    P = od * oh * ow
    DHW = D * H * W
    v, vmask = _voxels(BLOCK_V, DHW)
    z = v // (H * W)
    y = (v // W) % H
    x = v % W
    field_n = field_ptr + n * 3 * P
    for c0 in range(0, C, BLOCK_C):
        c, cmask = _channels(c0, C, BLOCK_C)
        acc = tl.zeros([BLOCK_C, BLOCK_V], DT)
        for k in tl.static_range(8):
            # voxel v is corner k = (dz, dy, dx) of the cell whose lower corner is v - (dz, dy, dx)
            cell = n * cells + ((z - ((k >> 2) & 1) + 1) * (H + 1) + (y - ((k >> 1) & 1) + 1)) * (W + 1) + (x - (k & 1) + 1)
            start = tl.load(start_ptr + cell, mask=vmask, other=0).to(tl.int64)
            run = tl.load(start_ptr + cell + 1, mask=vmask, other=0).to(tl.int64) - start
            for j in range(0, tl.max(run, axis=0).to(tl.int32)):
                active = j < run
                point = tl.load(order_ptr + start + j, mask=active, other=0) - n * P
                point = tl.where(active, point, 0).to(tl.int32)
                lz, fz, sz, ly, fy, sy, lx, fx, sx = _locate(field_n, point, active, P, od, oh, ow, D, H, W, ZEROS, WARP, DT)
                weight = _factor(fz, (k >> 2) & 1) * _factor(fy, (k >> 1) & 1) * _factor(fx, k & 1)
                g = tl.load(grad_ptr + n * C * P + c[:, None] * P + point[None, :],
                            mask=cmask[:, None] & active[None, :], other=0.0)
                acc += g.to(DT) * weight[None, :]
        _store(gvol_ptr + n * C * DHW + c[:, None] * DHW + v[None, :], acc, cmask[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------- launchers


def _blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_V). On GPU a [BLOCK_C, BLOCK_V] tile of 128 elements: one per thread of 4 warps,
    so each thread has its 8 corner gathers in flight at 48-80 registers (float32; measured with
    ptxas for sm_90). Interpreted: ~16k elements per program."""
    block_c = min(triton.next_power_of_2(channels), block(8, 16))
    return block_c, block(max(16, 128 // block_c), max(1024, 16384 // block_c))


def _sizes(vol: torch.Tensor, field: torch.Tensor) -> dict:
    n, c, d, h, w = vol.shape
    return dict(C=c, D=d, H=h, W=w, od=field.shape[2], oh=field.shape[3], ow=field.shape[4])


def _points(field: torch.Tensor) -> int:
    return field.shape[2] * field.shape[3] * field.shape[4]


def _forward(vol, field, padding: str, warp: bool) -> torch.Tensor:
    out = new_empty((vol.shape[0], vol.shape[1], *field.shape[2:]), dtype=vol.dtype, device=vol.device)
    block_c, block_v = _blocks(vol.shape[1])
    _forward_kernel[(triton.cdiv(_points(field), block_v), vol.shape[0])](
        vol, field, out, **_sizes(vol, field), ZEROS=padding == "zeros", WARP=warp,
        DT=tl_dtype(compute_dtype(vol, field)), BLOCK_C=block_c, BLOCK_V=block_v,
    )
    return out


def deterministic_volume_gradient(grad, vol, field, padding: str, warp: bool) -> torch.Tensor:
    """Volume gradient without float atomics: sort points by cell, then one gather per voxel."""
    n, _, d, h, w = vol.shape
    points = _points(field)
    cells = (d + 1) * (h + 1) * (w + 1)
    small = n * cells < 2**31 - 1 and n * points < 2**31
    key_dtype = torch.int32 if small else torch.int64
    flags = dict(ZEROS=padding == "zeros", WARP=warp, DT=tl_dtype(compute_dtype(vol, field)))
    sizes = _sizes(vol, field)
    geometry = {k: v for k, v in sizes.items() if k != "C"}

    keys = new_empty((n, points), dtype=key_dtype, device=vol.device)
    block_v = block(256, 16384)
    _cell_key_kernel[(triton.cdiv(points, block_v), n)](field, keys, **geometry, cells=cells, BLOCK_V=block_v, **flags)
    sorted_keys, order = torch.sort(keys.view(-1), stable=True)
    bounds = torch.arange(n * cells + 1, dtype=key_dtype, device=vol.device)
    starts = torch.searchsorted(sorted_keys, bounds, out_int32=small)
    del sorted_keys, bounds

    grad_vol = new_empty(vol.shape, dtype=vol.dtype, device=vol.device)
    block_c, block_v = _blocks(vol.shape[1])
    _splat_gather_kernel[(triton.cdiv(d * h * w, block_v), n)](
        grad, field, order, starts, grad_vol, **sizes, cells=cells, BLOCK_C=block_c, BLOCK_V=block_v, **flags
    )
    return grad_vol


def _backward(grad, vol, field, padding: str, warp: bool, need_vol: bool, need_field: bool) -> list:
    if not (need_vol or need_field):
        return []
    dtype = compute_dtype(vol, field)
    deterministic = need_vol and torch.are_deterministic_algorithms_enabled()
    atomic_vol = need_vol and not deterministic
    grad_vol = None
    if atomic_vol:
        grad_vol = torch.zeros(vol.shape, dtype=dtype, device=vol.device)
    grad_field = new_empty(field.shape, dtype=field.dtype, device=field.device) if need_field else None
    if atomic_vol or need_field:
        block_c, block_v = _blocks(vol.shape[1])
        _backward_kernel[(triton.cdiv(_points(field), block_v), vol.shape[0])](
            grad, vol, field, grad_vol if atomic_vol else grad, grad_field if need_field else grad,
            **_sizes(vol, field), ZEROS=padding == "zeros", WARP=warp, NEED_VOL=atomic_vol, NEED_COORDS=need_field,
            DT=tl_dtype(dtype), BLOCK_C=block_c, BLOCK_V=block_v,
        )
    if deterministic:
        grad_vol = deterministic_volume_gradient(grad, vol, field, padding, warp)
    grads = []
    if need_vol:
        grads.append(grad_vol.to(vol.dtype))
    if need_field:
        grads.append(grad_field)
    return grads


# ----------------------------------------------------------------------------- backend functions


def sample(vol: torch.Tensor, coords: torch.Tensor, padding: str) -> torch.Tensor:
    return _forward(vol, coords, padding, warp=False)


def sample_backward(grad, vol, coords, padding: str, need_vol: bool, need_coords: bool) -> list:
    return _backward(grad, vol, coords, padding, False, need_vol, need_coords)


def warp(vol: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    return _forward(vol, disp, padding, warp=True)


def warp_backward(grad, vol, disp, padding: str, need_vol: bool, need_disp: bool) -> list:
    return _backward(grad, vol, disp, padding, True, need_vol, need_disp)
