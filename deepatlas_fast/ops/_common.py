"""Small helpers shared by the op definitions."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .registry import backend_for, backend_module, backend_name


def backend(op: str, tensor: torch.Tensor):
    """The backend module that runs ``op`` for inputs on ``tensor``'s device."""
    return backend_for(op, tensor.device.type)


def forward_backend(op: str, tensor: torch.Tensor) -> str:
    """Name of the backend running ``op``'s forward now, recorded by ``setup_context``: the backward
    runs on the same backend, whatever choice is in force when autograd calls it (typically after
    the ``use_backend`` block that ran the forward has closed)."""
    return backend_name(op, tensor.device.type)


def backward_backend(name: str, op: str):
    """The module of the backend the forward used (see :func:`forward_backend`)."""
    return backend_module(name, op)


def spread_grads(grads: Sequence[torch.Tensor], needs: Sequence[bool], trailing: int) -> tuple[Optional[torch.Tensor], ...]:
    """Map the list returned by a ``*_backward`` op (only the requested gradients) back to one
    slot per differentiable input, then ``trailing`` Nones for the non-tensor arguments."""
    it = iter(grads)
    return tuple(next(it) if need else None for need in needs) + (None,) * trailing


def empty_grads(needs_and_likes) -> list[torch.Tensor]:
    """Fake outputs of a ``*_backward`` op: one contiguous empty tensor per requested gradient."""
    return [like.new_empty(like.shape) for need, like in needs_and_likes if need]

