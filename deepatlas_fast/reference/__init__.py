"""Pure-PyTorch reference of every op: float32/float64, the oracle for all tests.

Forwards are differentiable by autograd (any order); each op also has an explicit ``*_backward``
(what the kernels implement), tested against autograd through the forward. These functions do no
argument checking: call the public ops in :mod:`deepatlas_fast` instead.
"""

from .inversion import invert, invert_backward, invert_displacement, invert_displacement_backward
from .jacobian import jacobian_det, jacobian_det_backward, jacobian_var, jacobian_var_backward
from .similarity import lncc, lncc_backward, lncc_map, window_weights
from .sampling import sample, sample_backward, warp, warp_backward

__all__ = [
    "sample",
    "sample_backward",
    "warp",
    "warp_backward",
    "lncc",
    "lncc_backward",
    "lncc_map",
    "window_weights",
    "jacobian_det",
    "jacobian_det_backward",
    "jacobian_var",
    "jacobian_var_backward",
    "invert",
    "invert_backward",
    "invert_displacement",
    "invert_displacement_backward",
]
