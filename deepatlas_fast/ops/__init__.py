"""Public op functions, their ``torch.ops.deepatlas_fast`` registrations and the backend registry."""

from .inversion import invert, invert_displacement
from .jacobian import jacobian_det, jacobian_var
from .registry import (
    BACKENDS,
    OPS,
    BackendFallbackWarning,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .sampling import sample, warp
from .similarity import lncc
from .validation import finite_checks, set_check_finite

__all__ = [
    "sample",
    "warp",
    "lncc",
    "jacobian_det",
    "jacobian_var",
    "invert",
    "invert_displacement",
    "BACKENDS",
    "OPS",
    "BackendFallbackWarning",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "set_check_finite",
    "finite_checks",
]
