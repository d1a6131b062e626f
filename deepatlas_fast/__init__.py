"""deepatlas-fast: DeepATLAS dense anatomical coordinates on fused kernels.

The four ops (and their variants) are available as functions here, as ``torch.ops.deepatlas_fast.*``
for ``torch.compile`` / export / TorchScript, and as modules in :mod:`deepatlas_fast.nn`::

    import deepatlas_fast as da
    out = da.sample(vol, coords)                    # == F.grid_sample(..., align_corners=True)
    loss = da.lncc(a, b, kernel_size=9)             # == MONAI LNCC loss
    det = da.jacobian_det(field)                    # det(d field / d voxel index)
    inverse, valid = da.invert(coords, out_shape)   # approximate, differentiable inverse
"""

from __future__ import annotations

import platform

import torch

from ._version import __version__
from .coords import (
    axis_positions,
    displacement_to_normalized,
    displacement_to_voxel,
    from_grid,
    identity_coords,
    normalized_to_voxel,
    to_grid,
    voxel_to_normalized,
)
from .ops import (
    BACKENDS,
    OPS,
    BackendFallbackWarning,
    available_backends,
    finite_checks,
    get_backend,
    invert,
    invert_displacement,
    jacobian_det,
    jacobian_var,
    lncc,
    sample,
    set_backend,
    set_check_finite,
    use_backend,
    warp,
)


def build_info() -> dict:
    """Versions, the compiled extension's state and the backend each op uses, for bug reports."""
    from ._extension import load_extension

    module, reason = load_extension()
    extension = torch.ops.deepatlas_fast_C.build_info() if module is not None else f"not built ({reason})"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "deepatlas_fast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": extension,
        "backends": {device: {op: get_backend(op, device) for op in OPS} for device in devices},
    }


__all__ = [
    "__version__",
    "build_info",
    "sample",
    "warp",
    "lncc",
    "jacobian_det",
    "jacobian_var",
    "invert",
    "invert_displacement",
    "identity_coords",
    "axis_positions",
    "to_grid",
    "from_grid",
    "voxel_to_normalized",
    "normalized_to_voxel",
    "displacement_to_normalized",
    "displacement_to_voxel",
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
