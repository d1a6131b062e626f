"""``lncc``: local normalised cross-correlation (MONAI 1.6 semantics)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.similarity import KERNELS
from ..reference.sampling import compute_dtype
from ._common import EagerOp, backend, backward_backend, empty_grads, forward_backend, spread_grads
from .validation import check_choice, check_finite, check_int, check_positive_float, check_same_device, check_tensor

REDUCTIONS = ("mean", "none")


def _check(a, b, kernel_size, kernel, eps, reduction) -> None:
    check_tensor("a", a, ndim=5)
    check_tensor("b", b, ndim=5)
    if b.shape != a.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    check_same_device("b", b, "a", a)
    check_int("kernel_size", kernel_size, minimum=1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    check_choice("kernel", kernel, KERNELS)
    check_positive_float("eps", eps)
    check_choice("reduction", reduction, REDUCTIONS)


def _forward(a, b, kernel_size, kernel, eps, reduction):
    return backend("lncc", a).lncc(a.contiguous(), b.contiguous(), kernel_size, kernel, eps, reduction)


@torch.library.custom_op("deepatlas_fast::lncc", mutates_args=())
def _lncc_op(a: Tensor, b: Tensor, kernel_size: int, kernel: str, eps: float, reduction: str) -> Tensor:
    _check(a, b, kernel_size, kernel, eps, reduction)
    return _forward(a, b, kernel_size, kernel, eps, reduction)


@_lncc_op.register_fake
def _(a, b, kernel_size, kernel, eps, reduction):
    _check(a, b, kernel_size, kernel, eps, reduction)
    shape = () if reduction == "mean" else a.shape
    return a.new_empty(shape, dtype=compute_dtype(a))


def _shared_over_channels(grad: Tensor) -> bool:
    """A gradient map expanded over the channels (stride 0): the gradient of a channel sum."""
    return grad.dim() == 5 and grad.shape[1] > 1 and grad.stride(1) == 0


def _backward(grad, a, b, kernel_size, kernel, eps, reduction, need_a, need_b, backend_name):
    impl = backward_backend(backend_name, "lncc")
    if reduction == "none" and getattr(impl, "LNCC_SHARED_GRAD", False) and _shared_over_channels(grad):
        grad = grad.narrow(1, 0, 1)  # one map per item: not materialised over the C channels
    return impl.lncc_backward(
        grad.contiguous(), a.contiguous(), b.contiguous(), kernel_size, kernel, eps, reduction, need_a, need_b
    )


@torch.library.custom_op("deepatlas_fast::lncc_backward", mutates_args=())
def _lncc_backward_op(
    grad: Tensor, a: Tensor, b: Tensor, kernel_size: int, kernel: str, eps: float, reduction: str, need_a: bool, need_b: bool,
    backend_name: str,
) -> list[Tensor]:
    return _backward(grad, a, b, kernel_size, kernel, eps, reduction, need_a, need_b, backend_name)


@_lncc_backward_op.register_fake
def _(grad, a, b, kernel_size, kernel, eps, reduction, need_a, need_b, backend_name):
    return empty_grads([(need_a, a), (need_b, b)])


def _setup(ctx, inputs, output):
    a, b, *ctx.options = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = forward_backend("lncc", a)


def _gradient(ctx, needs, backward, grad):
    a, b = ctx.saved_tensors
    needs = needs[:2]
    return spread_grads(backward(grad, a, b, *ctx.options, *needs, ctx.backend), needs, 4)


LNCC = EagerOp("lncc", _forward, _setup, _gradient, _backward)
_lncc_op.register_autograd(LNCC.formula, setup_context=LNCC.setup)


def lncc(
    a: Tensor, b: Tensor, kernel_size: int = 9, kernel: str = "box", eps: float = 1e-5, reduction: str = "mean"
) -> Tensor:
    """Local normalised cross-correlation of ``a`` and ``b``, per channel, zero padding.

    Numerically MONAI 1.6's ``LocalNormalizedCrossCorrelationLoss(spatial_dims=3,
    kernel_size=kernel_size, kernel_type="rectangular" | "gaussian", smooth_dr=eps)``: the squared
    correlation of each window, with variances floored at ``eps`` inside a max (so flat regions
    give finite values, never NaN).

    Args:
        a, b: ``[N, C, D, H, W]``, same shape and dtype (half inputs are accumulated in float32).
        kernel_size: odd window size in voxels along each axis.
        kernel: ``"box"`` (MONAI ``"rectangular"``) or ``"gaussian"`` (sigma = kernel_size / 3).
        eps: variance floor (MONAI ``smooth_dr``).
        reduction: ``"mean"`` returns the loss ``-mean(ncc)`` (a scalar); ``"none"`` the NCC map
            ``[N, C, D, H, W]`` (positive, in [0, 1] up to the floor).

    Returns:
        float32 (float64 for float64 inputs). Gradients flow to both ``a`` and ``b``.
    """
    _check(a, b, kernel_size, kernel, eps, reduction)
    check_finite("a", a)
    check_finite("b", b)
    return LNCC(a, b, kernel_size, kernel, float(eps), reduction)
