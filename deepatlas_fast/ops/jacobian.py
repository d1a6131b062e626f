"""``jacobian_det`` and ``jacobian_var``: determinant of d field / d voxel index and its statistics."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._common import EagerOp, backend, backward_backend, forward_backend
from .validation import FULL_DTYPES, check_finite, check_scale, check_tensor


def _check(field) -> None:
    check_tensor("field", field, ndim=5, channels=3, dtypes=FULL_DTYPES, min_spatial=2)


def _det_forward(field, scale):
    return backend("jacobian_det", field).jacobian_det(field.contiguous(), scale)


@torch.library.custom_op("deepatlas_fast::jacobian_det", mutates_args=())
def _det_op(field: Tensor, scale: Optional[list[float]]) -> Tensor:
    _check(field)
    return _det_forward(field, scale)


@_det_op.register_fake
def _(field, scale):
    _check(field)
    return field.new_empty((field.shape[0], 1, *field.shape[2:]))


def _det_backward(grad, field, scale, backend_name):
    return backward_backend(backend_name, "jacobian_det").jacobian_det_backward(grad.contiguous(), field.contiguous(), scale)


@torch.library.custom_op("deepatlas_fast::jacobian_det_backward", mutates_args=())
def _det_backward_op(grad: Tensor, field: Tensor, scale: Optional[list[float]], backend_name: str) -> Tensor:
    return _det_backward(grad, field, scale, backend_name)


@_det_backward_op.register_fake
def _(grad, field, scale, backend_name):
    return field.new_empty(field.shape)


def _var_forward(field, scale, normalized):
    return backend("jacobian_var", field).jacobian_var(field.contiguous(), scale, normalized)


@torch.library.custom_op("deepatlas_fast::jacobian_var", mutates_args=())
def _var_op(field: Tensor, scale: Optional[list[float]], normalized: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(var, folding, stats): stats ``[N, 2]`` float64 (per batch element the mean and variance of det) are
    for the backward, which then needs no second pass over the field; the public function drops them."""
    _check(field)
    return _var_forward(field, scale, normalized)


@_var_op.register_fake
def _(field, scale, normalized):
    _check(field)
    return field.new_empty(()), field.new_empty(()), field.new_empty((field.shape[0], 2), dtype=torch.float64)


def _var_backward(grad_var, field, stats, scale, normalized, backend_name):
    impl = backward_backend(backend_name, "jacobian_var")
    return impl.jacobian_var_backward(grad_var.contiguous(), field.contiguous(), stats.contiguous(), scale, normalized)


@torch.library.custom_op("deepatlas_fast::jacobian_var_backward", mutates_args=())
def _var_backward_op(
    grad_var: Tensor, field: Tensor, stats: Tensor, scale: Optional[list[float]], normalized: bool, backend_name: str
) -> Tensor:
    return _var_backward(grad_var, field, stats, scale, normalized, backend_name)


@_var_backward_op.register_fake
def _(grad_var, field, stats, scale, normalized, backend_name):
    return field.new_empty(field.shape)


def _det_setup(ctx, inputs, output):
    field, ctx.scale = inputs
    ctx.save_for_backward(field)
    ctx.backend = forward_backend("jacobian_det", field)


def _det_gradient(ctx, needs, backward, grad):
    (field,) = ctx.saved_tensors
    return backward(grad, field, ctx.scale, ctx.backend), None


def _var_setup(ctx, inputs, output):
    field, ctx.scale, ctx.normalized = inputs
    ctx.save_for_backward(field, output[2])
    ctx.backend = forward_backend("jacobian_var", field)
    ctx.mark_non_differentiable(output[1], output[2])


def _var_gradient(ctx, needs, backward, grad_var, _grad_folding, _grad_stats):
    field, stats = ctx.saved_tensors
    return backward(grad_var, field, stats, ctx.scale, ctx.normalized, ctx.backend), None, None


JACOBIAN_DET = EagerOp("jacobian_det", _det_forward, _det_setup, _det_gradient, _det_backward)
JACOBIAN_VAR = EagerOp("jacobian_var", _var_forward, _var_setup, _var_gradient, _var_backward)
_det_op.register_autograd(JACOBIAN_DET.formula, setup_context=JACOBIAN_DET.setup)
_var_op.register_autograd(JACOBIAN_VAR.formula, setup_context=JACOBIAN_VAR.setup)


def jacobian_det(field: Tensor, scale: Optional[Union[Sequence[float], Tensor]] = None) -> Tensor:
    """Determinant of the Jacobian of ``field`` with respect to voxel index.

    ``J[k][j] = d field_k / d index_j`` (D, H, W order), with ``torch.gradient`` finite differences
    (edge_order=1): central inside, one-sided at the borders.

    Args:
        field: ``[N, 3, d, h, w]`` float32/float64, every spatial size >= 2. For a normalised
            coordinate field, ``scale=[(D-1)/2, (H-1)/2, (W-1)/2]`` of the sampled volume gives
            the determinant in voxel units (1 for the identity).
        scale: 3 numbers multiplying the channels first, or None.

    Returns:
        ``[N, 1, d, h, w]``, differentiable w.r.t. ``field``.
    """
    _check(field)
    scale = check_scale("scale", scale)
    check_finite("field", field)
    return JACOBIAN_DET(field, scale)


def jacobian_var(
    field: Tensor,
    scale: Optional[Union[Sequence[float], Tensor]] = None,
    normalized: bool = False,
    return_folding: bool = False,
):
    """Variance over voxels of :func:`jacobian_det`, averaged over the batch (a regulariser).

    The population variance (divides by the voxel count); with ``normalized`` it is divided by
    ``max(mean(det)^2, 1e-12)`` per batch element, which makes it scale-free.

    Args:
        field, scale: as :func:`jacobian_det`.
        normalized: divide by the squared mean determinant.
        return_folding: also return the folding fraction (share of voxels with det <= 0, averaged
            over the batch; not differentiable), computed in the same pass.

    Returns:
        A scalar tensor, or ``(variance, folding_fraction)`` when ``return_folding``.
    """
    _check(field)
    scale = check_scale("scale", scale)
    if not isinstance(normalized, bool):
        raise TypeError(f"normalized must be a bool, got {type(normalized).__name__}")
    check_finite("field", field)
    var, folding, _ = JACOBIAN_VAR(field, scale, normalized)
    return (var, folding) if return_folding else var
