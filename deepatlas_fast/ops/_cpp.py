"""The C++ backends' shared shim: ``cpu`` and ``cuda`` call the kernels of the extension
``deepatlas_fast._C`` (``torch.ops.deepatlas_fast_C.*``), registered per dispatch key by ``csrc/cpu`` and
``csrc/cuda``. Signatures are those of :mod:`deepatlas_fast.ops.backend_reference`.

The kernels take float32/float64 with matching dtypes; this layer widens half inputs and mixed
dtypes to the compute dtype (the reference's rule) and narrows results back, as the other backends do.
"""

from __future__ import annotations

import os

import torch

from .._extension import load_extension
from ..reference.sampling import compute_dtype

OPS = ("sample", "warp", "lncc", "jacobian_det", "jacobian_var", "invert", "invert_displacement")


def load_kernels(dispatch_key: str) -> frozenset:
    """The ops whose forward and backward kernels are registered for ``dispatch_key`` ("CPU" / "CUDA");
    raises ImportError (the registry then reports the backend unavailable) without the extension."""
    module, reason = load_extension()
    if module is None:
        raise ImportError(f"the C++ extension deepatlas_fast._C is not built: {reason}")
    has = torch._C._dispatch_has_kernel_for_dispatch_key

    def registered(name: str) -> bool:
        try:
            return has(f"deepatlas_fast_C::{name}", dispatch_key)
        except RuntimeError:  # op not defined in this build
            return False

    return frozenset(op for op in OPS if registered(op) and registered(f"{op}_backward"))


def _kernels():
    return torch.ops.deepatlas_fast_C


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _narrowed(grads, pairs):
    """The kernel's gradients (only the requested ones) in the dtypes of their inputs."""
    likes = [t for t, need in pairs if need]
    return [g.to(like.dtype) for g, like in zip(grads, likes)]


def sample(vol, coords, padding):
    dtype = compute_dtype(vol, coords)
    return _kernels().sample(_as(vol, dtype), _as(coords, dtype), padding).to(vol.dtype)


def sample_backward(grad, vol, coords, padding, need_vol, need_coords):
    dtype = compute_dtype(vol, coords)
    grads = _kernels().sample_backward(_as(grad, dtype), _as(vol, dtype), _as(coords, dtype), padding, need_vol, need_coords)
    return _narrowed(grads, ((vol, need_vol), (coords, need_coords)))


def warp(vol, disp, padding):
    dtype = compute_dtype(vol, disp)
    return _kernels().warp(_as(vol, dtype), _as(disp, dtype), padding).to(vol.dtype)


def warp_backward(grad, vol, disp, padding, need_vol, need_disp):
    dtype = compute_dtype(vol, disp)
    grads = _kernels().warp_backward(_as(grad, dtype), _as(vol, dtype), _as(disp, dtype), padding, need_vol, need_disp)
    return _narrowed(grads, ((vol, need_vol), (disp, need_disp)))


#: The CUDA lncc implementation: "separable" (cuda/lncc.cu, one kernel per axis: the default, measured
#: on a GPU) or "tiled" (cuda/lncc_tiled.cu: the in-plane passes in shared memory, windows of at most
#: LNCC_TILED_MAX_KERNEL_SIZE taps; larger windows stay separable). Read from the environment at each call.
LNCC_CUDA_VARIABLE = "DEEPATLAS_FAST_CUDA_LNCC"
LNCC_CUDA_IMPLEMENTATIONS = ("separable", "tiled")
LNCC_TILED_MAX_KERNEL_SIZE = 31  # lncc_tile.h kMaxKernelSize

#: The CUDA volume gradient of sample / warp: "atomic" (cuda/sampling.cu, 8 global atomic adds per point
#: and channel: the default, measured on a GPU), "tiled" (cuda/splat_tiled.cu: per tile of points, in
#: shared memory first) or "merged" (cuda/warp_merge.cuh's WarpMerge: the adds that neighbouring lanes share
#: merged by warp shuffles first, about 4 per point for near-identity maps; read by the CUDA launcher).
#: Read from the environment at each call.
SPLAT_CUDA_VARIABLE = "DEEPATLAS_FAST_CUDA_SPLAT"
SPLAT_CUDA_IMPLEMENTATIONS = ("atomic", "tiled", "merged")

#: How the CUDA invert splats the levels of its initial-guess pyramid (coordinate maps) and its backward (both
#: ops): "atomic" (cuda/inversion.cu's splat_kernel and backward_kernel: the default, measured on a GPU),
#: "tiled" (invert_splat_tile.h, invert_backward_tile.h: per tile of source, resp. target points in shared
#: memory first) or "merged" (the atomic pyramid; the backward's adds merged within warps first,
#: cuda/warp_merge.cuh). Read by the CUDA launchers at each call; checked here first.
INVERT_SPLAT_CUDA_VARIABLE = "DEEPATLAS_FAST_CUDA_INVERT_SPLAT"
INVERT_SPLAT_CUDA_IMPLEMENTATIONS = ("atomic", "tiled", "merged")


#: The CUDA backward of jacobian_det / jacobian_var: "gather" (cuda/jacobian.cu's backward_kernel, one thread per
#: voxel making U at its six taps: the default, measured on a GPU) or "tiled" (jacobian_tile.h: U made once per
#: voxel in shared memory). Read from the environment at each call.
JACOBIAN_CUDA_VARIABLE = "DEEPATLAS_FAST_CUDA_JACOBIAN"
JACOBIAN_CUDA_IMPLEMENTATIONS = ("gather", "tiled")


def _environment_choice(variable: str, choices: tuple) -> str:
    choice = os.environ.get(variable, "") or choices[0]
    if choice not in choices:
        raise ValueError(f"{variable} must be one of {choices}, got {choice!r}")
    return choice


def lncc_cuda_implementation() -> str:
    """The CUDA lncc implementation :data:`LNCC_CUDA_VARIABLE` selects (default "separable")."""
    return _environment_choice(LNCC_CUDA_VARIABLE, LNCC_CUDA_IMPLEMENTATIONS)


def splat_cuda_implementation() -> str:
    """The CUDA sampling volume gradient :data:`SPLAT_CUDA_VARIABLE` selects (default "atomic")."""
    return _environment_choice(SPLAT_CUDA_VARIABLE, SPLAT_CUDA_IMPLEMENTATIONS)


def invert_splat_cuda_implementation() -> str:
    """The CUDA invert pyramid's splat :data:`INVERT_SPLAT_CUDA_VARIABLE` selects (default "atomic")."""
    return _environment_choice(INVERT_SPLAT_CUDA_VARIABLE, INVERT_SPLAT_CUDA_IMPLEMENTATIONS)


def jacobian_cuda_implementation() -> str:
    """The CUDA Jacobian backward :data:`JACOBIAN_CUDA_VARIABLE` selects (default "gather")."""
    return _environment_choice(JACOBIAN_CUDA_VARIABLE, JACOBIAN_CUDA_IMPLEMENTATIONS)


def _lncc_kernels(a, kernel_size):
    """(forward, backward) raw ops of lncc for a on this call."""
    ops = _kernels()
    if a.is_cuda and kernel_size <= LNCC_TILED_MAX_KERNEL_SIZE and lncc_cuda_implementation() == "tiled":
        return ops.lncc_tiled, ops.lncc_tiled_backward
    return ops.lncc, ops.lncc_backward


def lncc(a, b, kernel_size, kernel, eps, reduction):
    dtype = compute_dtype(a, b)
    forward, _ = _lncc_kernels(a, kernel_size)
    return forward(_as(a, dtype), _as(b, dtype), kernel_size, kernel, eps, reduction)


#: The C++ lncc backward takes, for reduction="none", a gradient map [N, 1, D, H, W] shared by the C channels
#: (what autograd makes of a channel sum, as a stride-0 expansion): the Python layer passes it unexpanded.
LNCC_SHARED_GRAD = True


def lncc_backward(grad, a, b, kernel_size, kernel, eps, reduction, need_a, need_b):
    dtype = compute_dtype(a, b)
    _, backward = _lncc_kernels(a, kernel_size)
    grads = backward(_as(grad, dtype), _as(a, dtype), _as(b, dtype), kernel_size, kernel, eps, reduction, need_a,
                     need_b)
    return _narrowed(grads, ((a, need_a), (b, need_b)))


def jacobian_det(field, scale):
    return _kernels().jacobian_det(field, scale)


def _jacobian_tiled(field) -> bool:
    return field.is_cuda and jacobian_cuda_implementation() == "tiled"


def jacobian_det_backward(grad, field, scale):
    ops = _kernels()
    backward = ops.jacobian_det_backward_tiled if _jacobian_tiled(field) else ops.jacobian_det_backward
    return backward(_as(grad, field.dtype), field, scale)


def jacobian_var(field, scale, normalized):
    return _kernels().jacobian_var(field, scale, normalized)


def jacobian_var_backward(grad_var, field, stats, scale, normalized):
    ops = _kernels()
    backward = ops.jacobian_var_backward_tiled if _jacobian_tiled(field) else ops.jacobian_var_backward
    return backward(_as(grad_var, field.dtype), field, stats, scale, normalized)


def invert(coords, out_shape, iters, tol):
    if coords.is_cuda:
        invert_splat_cuda_implementation()  # a bad value raises here, naming the variable
    return _kernels().invert(coords, list(out_shape), iters, tol)


def invert_backward(grad, coords, inverse, valid):
    if coords.is_cuda:
        invert_splat_cuda_implementation()  # a bad value raises here, naming the variable
    return _kernels().invert_backward(_as(grad, coords.dtype), coords, inverse, valid)


def invert_displacement(disp, iters, tol):
    return _kernels().invert_displacement(disp, iters, tol)


def invert_displacement_backward(grad, disp, inverse_disp, valid):
    if disp.is_cuda:
        invert_splat_cuda_implementation()
    return _kernels().invert_displacement_backward(_as(grad, disp.dtype), disp, inverse_disp, valid)
