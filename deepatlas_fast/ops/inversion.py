"""``invert`` and ``invert_displacement``: approximate, differentiable inverses of maps."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import EagerOp, backend, backward_backend, forward_backend
from .validation import FULL_DTYPES, check_finite, check_int, check_positive_float, check_shape3, check_tensor


def _check_field(name: str, field) -> None:
    check_tensor(name, field, ndim=5, channels=3, dtypes=FULL_DTYPES, min_spatial=2)


def _check_options(iters, tol) -> None:
    check_int("iters", iters, minimum=0)
    check_positive_float("tol", tol)


def _invert_forward(coords, out_shape, iters, tol):
    return backend("invert", coords).invert(coords.contiguous(), list(out_shape), iters, tol)


@torch.library.custom_op("deepatlas_fast::invert", mutates_args=())
def _invert_op(coords: Tensor, out_shape: list[int], iters: int, tol: float) -> tuple[Tensor, Tensor]:
    _check_field("coords", coords)
    return _invert_forward(coords, out_shape, iters, tol)


@_invert_op.register_fake
def _(coords, out_shape, iters, tol):
    _check_field("coords", coords)
    n = coords.shape[0]
    return coords.new_empty((n, 3, *out_shape)), coords.new_empty((n, 1, *out_shape), dtype=torch.bool)


def _invert_backward(grad, coords, inverse, valid, backend_name):
    impl = backward_backend(backend_name, "invert")
    return impl.invert_backward(grad.contiguous(), coords.contiguous(), inverse.contiguous(), valid.contiguous())


@torch.library.custom_op("deepatlas_fast::invert_backward", mutates_args=())
def _invert_backward_op(grad: Tensor, coords: Tensor, inverse: Tensor, valid: Tensor, backend_name: str) -> Tensor:
    return _invert_backward(grad, coords, inverse, valid, backend_name)


@_invert_backward_op.register_fake
def _(grad, coords, inverse, valid, backend_name):
    return coords.new_empty(coords.shape)


def _invert_disp_forward(disp, iters, tol):
    return backend("invert_displacement", disp).invert_displacement(disp.contiguous(), iters, tol)


@torch.library.custom_op("deepatlas_fast::invert_displacement", mutates_args=())
def _invert_disp_op(disp: Tensor, iters: int, tol: float) -> tuple[Tensor, Tensor]:
    _check_field("disp", disp)
    return _invert_disp_forward(disp, iters, tol)


@_invert_disp_op.register_fake
def _(disp, iters, tol):
    _check_field("disp", disp)
    return disp.new_empty(disp.shape), disp.new_empty((disp.shape[0], 1, *disp.shape[2:]), dtype=torch.bool)


def _invert_disp_backward(grad, disp, inverse_disp, valid, backend_name):
    impl = backward_backend(backend_name, "invert_displacement")
    return impl.invert_displacement_backward(
        grad.contiguous(), disp.contiguous(), inverse_disp.contiguous(), valid.contiguous()
    )


@torch.library.custom_op("deepatlas_fast::invert_displacement_backward", mutates_args=())
def _invert_disp_backward_op(
    grad: Tensor, disp: Tensor, inverse_disp: Tensor, valid: Tensor, backend_name: str
) -> Tensor:
    return _invert_disp_backward(grad, disp, inverse_disp, valid, backend_name)


@_invert_disp_backward_op.register_fake
def _(grad, disp, inverse_disp, valid, backend_name):
    return disp.new_empty(disp.shape)


def _setup(op):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], *output)
        ctx.mark_non_differentiable(output[1])
        ctx.backend = forward_backend(op, inputs[0])

    return setup_context


def _gradient(trailing: int):
    def gradient(ctx, needs, backward, grad, _grad_valid):
        field, inverse, valid = ctx.saved_tensors
        return (backward(grad, field, inverse, valid, ctx.backend),) + (None,) * trailing

    return gradient


INVERT = EagerOp("invert", _invert_forward, _setup("invert"), _gradient(3), _invert_backward)
INVERT_DISPLACEMENT = EagerOp("invert_displacement", _invert_disp_forward, _setup("invert_displacement"), _gradient(2),
                              _invert_disp_backward)
_invert_op.register_autograd(INVERT.formula, setup_context=INVERT.setup)
_invert_disp_op.register_autograd(INVERT_DISPLACEMENT.formula, setup_context=INVERT_DISPLACEMENT.setup)


def invert(
    coords: Tensor, out_shape: Optional[Sequence[int]] = None, iters: int = 8, tol: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Approximate inverse of a coordinate map, differentiable w.r.t. ``coords``.

    ``coords`` maps each voxel of a source grid to a normalised position in a target volume. For
    each point ``u`` of the target grid ``out_shape``, ``inverse(u)`` is the normalised source
    position ``p`` with ``sample(coords, p) == u``: a splatted initial guess refined by ``iters``
    pointwise Newton steps. The backward is the exact implicit-function gradient.

    Args:
        coords: ``[N, 3, d, h, w]`` float32/float64, every spatial size >= 2.
        out_shape: target grid (D, H, W), sizes >= 2; default: the source grid's shape.
        iters: Newton steps (0 returns the splatted guess).
        tol: a target point is ``valid`` when ``|sample(coords, inverse) - u|`` is at most ``tol``
            target voxels.

    Returns:
        ``(inverse [N, 3, *out_shape], valid [N, 1, *out_shape] bool)``. ``valid`` is False where
        the source does not cover the target (and where the solve did not converge); no gradient
        flows through invalid points.
    """
    _check_field("coords", coords)
    out_shape = check_shape3("out_shape", tuple(coords.shape[2:]) if out_shape is None else out_shape, minimum=2)
    _check_options(iters, tol)
    check_finite("coords", coords)
    return INVERT(coords, list(out_shape), iters, float(tol))


def invert_displacement(disp: Tensor, iters: int = 8, tol: float = 0.05) -> tuple[Tensor, Tensor]:
    """Inverse of a same-grid displacement field (normalised units), differentiable w.r.t. ``disp``.

    Returns ``(v, valid)`` with ``(id + disp)(id + v) = id``, i.e. ``v(x) = -disp(x + v(x))``,
    solved pointwise from ``-disp`` by ``iters`` Newton steps; ``valid`` as in :func:`invert`.

    Args:
        disp: ``[N, 3, d, h, w]`` float32/float64, every spatial size >= 2.
    """
    _check_field("disp", disp)
    _check_options(iters, tol)
    check_finite("disp", disp)
    return INVERT_DISPLACEMENT(disp, iters, float(tol))
