"""Random inputs shared by the tests (CPU generators, moved to the device afterwards)."""

from __future__ import annotations

import math

import torch

from deepatlas_fast.coords import identity_coords


def g(seed: int) -> torch.Generator:
    """A seeded CPU generator (tests draw on the CPU and move tensors afterwards)."""
    return torch.Generator().manual_seed(seed)


def rand_coords(n, shape, generator, *, spread=1.3, dtype=torch.float64, device="cpu", borders=True):
    """Coordinates uniform in [-spread, spread] (out of range included), with some exact borders."""
    coords = (torch.rand(n, 3, *shape, generator=generator, dtype=dtype) * 2 - 1) * spread
    if borders:
        flat = coords.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 10),), generator=generator)
        flat[picks] = torch.tensor([-1.0, 1.0], dtype=dtype)[torch.randint(0, 2, picks.shape, generator=generator)]
    return coords.to(device)


def rotation(angles):
    """3x3 rotation from three angles (radians) about the D, H, W axes."""
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=torch.float64)
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]], dtype=torch.float64)
    return rx @ ry @ rz


def affine_coords(matrix, offset, shape, dtype=torch.float64):
    """coords(p) = matrix @ p + offset on the source grid ``shape`` (normalised units)."""
    ident = identity_coords(shape, dtype=torch.float64)
    field = torch.einsum("ij,njdhw->nidhw", matrix, ident) + torch.as_tensor(offset, dtype=torch.float64).view(1, 3, 1, 1, 1)
    return field.to(dtype)


def smooth_displacement(shape, generator, amplitude, *, batch=1, waves=3, dtype=torch.float64):
    """A sum of low-frequency sinusoids, ``[batch, 3, *shape]``, max amplitude about ``amplitude``."""
    ident = identity_coords(shape, batch=batch, dtype=torch.float64)
    disp = torch.zeros_like(ident)
    for _ in range(waves):
        freq = torch.rand(batch, 3, 3, generator=generator, dtype=torch.float64) * 2.0 + 0.5
        phase = torch.rand(batch, 3, 1, 1, 1, generator=generator, dtype=torch.float64) * 2 * math.pi
        arg = torch.einsum("nkj,njdhw->nkdhw", freq, ident) + phase
        disp = disp + torch.sin(arg) * (amplitude / waves)
    return disp.to(dtype)


def covering_map(src, generator, *, batch=1, amplitude=0.03, dtype=torch.float64):
    """A smooth map whose image strictly contains the target cube [-1, 1]^3 (every target point valid)."""
    base = affine_coords(rotation([0.05, -0.04, 0.03]) * 1.3, [0.02, -0.03, 0.01], src)
    return (base.expand(batch, -1, -1, -1, -1) + smooth_displacement(src, generator, amplitude, batch=batch)).to(dtype)
