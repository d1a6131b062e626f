"""The ``reference`` backend: the pure-PyTorch ops of :mod:`deepatlas_fast.reference` with their
explicit backward passes. Inputs arrive validated and contiguous.

Every backend module offers these functions with these signatures; ``*_backward`` of an op with
several differentiable inputs returns the gradients that were asked for, in argument order.
"""

from __future__ import annotations

from ..reference import inversion as _invert
from ..reference import jacobian as _jacobian
from ..reference import similarity as _lncc
from ..reference import sampling as _sample

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
jacobian_var = _jacobian.jacobian_var_with_stats  # (var, folding, stats [N, 2] float64: mean and variance of det)


def jacobian_var_backward(grad_var, field, stats, scale, normalized):
    """The forward's ``stats`` go unused: the reference makes det again for its per-voxel gradient."""
    return _jacobian.jacobian_var_backward(grad_var, field, scale, normalized)


invert = _invert.invert_forward
invert_backward = _invert.invert_backward
invert_displacement = _invert.invert_displacement_forward
invert_displacement_backward = _invert.invert_displacement_backward
