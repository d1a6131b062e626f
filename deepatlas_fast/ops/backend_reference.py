"""The ``reference`` backend: the pure-PyTorch ops of :mod:`deepatlas_fast.reference` with their
explicit backward passes. Inputs arrive validated and contiguous.

Every backend module offers these functions with these signatures; ``*_backward`` of an op with
several differentiable inputs returns the gradients that were asked for, in argument order.
"""

from __future__ import annotations

import torch

from ..coords import identity_coords
from ..reference import inversion as _invert
from ..reference import jacobian as _jacobian
from ..reference import similarity as _lncc
from ..reference import sampling as _sample
from ..reference.sampling import compute_dtype

DEVICES = None  # any device torch runs on
IMPLEMENTS = frozenset(("sample", "warp", "lncc", "jacobian_det", "jacobian_var", "invert", "invert_displacement"))

sample = _sample.sample
sample_backward = _sample.sample_backward
warp = _sample.warp
warp_backward = _sample.warp_backward
lncc = _lncc.lncc
lncc_backward = _lncc.lncc_backward
jacobian_det = _jacobian.jacobian_det
jacobian_det_backward = _jacobian.jacobian_det_backward
jacobian_var = _jacobian.jacobian_var
jacobian_var_backward = _jacobian.jacobian_var_backward


def invert(coords, out_shape: list[int], iters: int, tol: float):
    with torch.no_grad():
        return _invert.invert(coords, out_shape, iters, tol)


def invert_backward(grad, coords, inverse, valid):
    work = coords.to(compute_dtype(coords))
    return _invert.invert_backward(grad, work, inverse, valid).to(coords.dtype)


def invert_displacement(disp, iters: int, tol: float):
    with torch.no_grad():
        return _invert.invert_displacement(disp, iters, tol)


def invert_displacement_backward(grad, disp, inverse_disp, valid):
    dtype = compute_dtype(disp)
    identity = identity_coords(disp.shape[2:], dtype=dtype, device=disp.device)
    coords = identity + disp.to(dtype)
    return _invert.invert_backward(grad, coords, identity + inverse_disp.to(dtype), valid).to(disp.dtype)
