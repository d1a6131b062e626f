"""``sample`` and ``warp``: trilinear sampling at coordinates or at identity + displacement."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import EagerOp, backend, backward_backend, empty_grads, forward_backend, spread_grads
from .validation import FULL_DTYPES, check_batch, check_choice, check_finite, check_same_device, check_tensor

PADDINGS = ("border", "zeros")


def _check(vol, field, padding: str, field_name: str) -> None:
    check_tensor("vol", vol, ndim=5)
    check_tensor(field_name, field, ndim=5, channels=3, dtypes=tuple(dict.fromkeys(FULL_DTYPES + (vol.dtype,))))
    check_same_device(field_name, field, "vol", vol)
    check_batch(field_name, field, "vol", vol)
    check_choice("padding", padding, PADDINGS)


def _kernel_calls(op: str):
    """The forward and backward kernel calls of ``op`` ("sample" or "warp"), on contiguous inputs."""

    def forward(vol, field, padding):
        return getattr(backend(op, vol), op)(vol.contiguous(), field.contiguous(), padding)

    def backward(grad, vol, field, padding, need_vol, need_field, backend_name):
        impl = backward_backend(backend_name, op)
        return getattr(impl, op + "_backward")(grad.contiguous(), vol.contiguous(), field.contiguous(), padding,
                                               need_vol, need_field)

    return forward, backward


_sample_forward, _sample_backward = _kernel_calls("sample")
_warp_forward, _warp_backward = _kernel_calls("warp")


@torch.library.custom_op("deepatlas_fast::sample", mutates_args=())
def _sample_op(vol: Tensor, coords: Tensor, padding: str) -> Tensor:
    _check(vol, coords, padding, "coords")
    return _sample_forward(vol, coords, padding)


@_sample_op.register_fake
def _(vol, coords, padding):
    _check(vol, coords, padding, "coords")
    return vol.new_empty((vol.shape[0], vol.shape[1], *coords.shape[2:]))


@torch.library.custom_op("deepatlas_fast::sample_backward", mutates_args=())
def _sample_backward_op(
    grad: Tensor, vol: Tensor, coords: Tensor, padding: str, need_vol: bool, need_coords: bool, backend_name: str
) -> list[Tensor]:
    return _sample_backward(grad, vol, coords, padding, need_vol, need_coords, backend_name)


@_sample_backward_op.register_fake
def _(grad, vol, coords, padding, need_vol, need_coords, backend_name):
    return empty_grads([(need_vol, vol), (need_coords, coords)])


@torch.library.custom_op("deepatlas_fast::warp", mutates_args=())
def _warp_op(vol: Tensor, disp: Tensor, padding: str) -> Tensor:
    _check(vol, disp, padding, "disp")
    return _warp_forward(vol, disp, padding)


@_warp_op.register_fake
def _(vol, disp, padding):
    _check(vol, disp, padding, "disp")
    return vol.new_empty((vol.shape[0], vol.shape[1], *disp.shape[2:]))


@torch.library.custom_op("deepatlas_fast::warp_backward", mutates_args=())
def _warp_backward_op(
    grad: Tensor, vol: Tensor, disp: Tensor, padding: str, need_vol: bool, need_disp: bool, backend_name: str
) -> list[Tensor]:
    return _warp_backward(grad, vol, disp, padding, need_vol, need_disp, backend_name)


@_warp_backward_op.register_fake
def _(grad, vol, disp, padding, need_vol, need_disp, backend_name):
    return empty_grads([(need_vol, vol), (need_disp, disp)])


def _save_inputs(op):
    def setup_context(ctx, inputs, output):
        vol, field, padding = inputs
        ctx.save_for_backward(vol, field)
        ctx.padding = padding
        ctx.backend = forward_backend(op, vol)

    return setup_context


def _gradient(ctx, needs, backward, grad):
    vol, field = ctx.saved_tensors
    needs = needs[:2]
    return spread_grads(backward(grad, vol, field, ctx.padding, *needs, ctx.backend), needs, 1)


SAMPLE = EagerOp("sample", _sample_forward, _save_inputs("sample"), _gradient, _sample_backward)
WARP = EagerOp("warp", _warp_forward, _save_inputs("warp"), _gradient, _warp_backward)
_sample_op.register_autograd(SAMPLE.formula, setup_context=SAMPLE.setup)
_warp_op.register_autograd(WARP.formula, setup_context=WARP.setup)


def sample(vol: Tensor, coords: Tensor, padding: str = "border") -> Tensor:
    """Trilinear sampling of ``vol`` at normalised coordinates.

    Equal to ``F.grid_sample(vol, to_grid(coords), mode="bilinear", padding_mode=padding,
    align_corners=True)``, gradients included.

    Args:
        vol: ``[N, C, D, H, W]`` float16/bfloat16/float32/float64.
        coords: ``[N, 3, d, h, w]``, channel k addresses spatial dim k of ``vol`` (D, H, W order),
            in ``[-1, 1]`` with ``align_corners=True`` semantics; float32/float64 or ``vol.dtype``.
        padding: ``"border"`` (clamp to the edge voxel) or ``"zeros"`` (0 outside).

    Returns:
        ``[N, C, d, h, w]`` in ``vol.dtype``. Gradients flow to ``vol`` and ``coords``; only the
        ones required are computed.
    """
    _check(vol, coords, padding, "coords")
    check_finite("coords", coords)
    return SAMPLE(vol, coords, padding)


def warp(vol: Tensor, disp: Tensor, padding: str = "border") -> Tensor:
    """Sample ``vol`` at identity + ``disp`` without materialising the identity grid.

    Args:
        vol: ``[N, C, D, H, W]``.
        disp: ``[N, 3, d, h, w]`` displacement in normalised units (D, H, W channel order). The
            identity is that of ``disp``'s grid, so the output has ``disp``'s spatial shape.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        ``[N, C, d, h, w]`` in ``vol.dtype``; equal to ``sample(vol, identity_coords(d, h, w) + disp)``.
    """
    _check(vol, disp, padding, "disp")
    check_finite("disp", disp)
    return WARP(vol, disp, padding)
