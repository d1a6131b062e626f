"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda`` (extension ``deepatlas_fast._C``, built where
torch has CUDA). Implements the ops this build registered for CUDA (:data:`IMPLEMENTS`).
Signatures: :mod:`deepatlas_fast.ops.backend_reference`.
"""

from __future__ import annotations

import torch

from ..reference.sampling import compute_dtype
from . import _cpp
from ._cpp import *  # noqa: F401,F403 - the op functions (sample_backward and warp_backward below)

DEVICES = frozenset({"cuda"})
IMPLEMENTS = _cpp.load_kernels("CUDA")


def _sampling_backward(cpp_backward, warp, grad, vol, field, padding, need_vol, need_field):
    """The CUDA kernels' backward, except under ``torch.use_deterministic_algorithms(True)``: their volume
    gradient is splatted with atomics (the raw op raises there), so it comes from the Triton kernels'
    sort-then-gather instead, bitwise reproducible, as the triton backend does. With
    ``DEEPATLAS_FAST_CUDA_SPLAT=tiled`` the volume gradient is ``sample_splat_tiled``'s; "merged" is read by
    the CUDA launcher itself."""
    if not need_vol:
        return cpp_backward(grad, vol, field, padding, need_vol, need_field)
    if not torch.are_deterministic_algorithms_enabled():
        if _cpp.splat_cuda_implementation() in ("atomic", "merged"):
            return cpp_backward(grad, vol, field, padding, need_vol, need_field)
        dtype = compute_dtype(vol, field)
        grad_vol = torch.ops.deepatlas_fast_C.sample_splat_tiled(
            grad.to(dtype).contiguous(), field.to(dtype).contiguous(), list(vol.shape[2:]), padding, warp)
        rest = cpp_backward(grad, vol, field, padding, False, need_field) if need_field else []
        return [grad_vol.to(vol.dtype), *rest]
    try:
        from ..kernels.sampling import deterministic_volume_gradient
    except ImportError as error:
        raise RuntimeError(
            "deepatlas_fast: the cuda backend's volume gradient under torch.use_deterministic_algorithms(True) "
            f"needs triton ({error}); use the triton backend or leave deterministic algorithms off") from error
    dtype = compute_dtype(vol, field)
    grad_vol = deterministic_volume_gradient(grad.to(dtype), vol.to(dtype), field.to(dtype), padding, warp)
    rest = cpp_backward(grad, vol, field, padding, False, need_field) if need_field else []
    return [grad_vol.to(vol.dtype), *rest]


def sample_backward(grad, vol, coords, padding, need_vol, need_coords):
    return _sampling_backward(_cpp.sample_backward, False, grad, vol, coords, padding, need_vol, need_coords)


def warp_backward(grad, vol, disp, padding, need_vol, need_disp):
    return _sampling_backward(_cpp.warp_backward, True, grad, vol, disp, padding, need_vol, need_disp)
