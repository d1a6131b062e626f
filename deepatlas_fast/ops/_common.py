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


# ---------------------------------------------------------------------------------------------- eager path
# Every op is a torch.library custom op (what torch.compile, fake tensors and export see). In an eager call
# the same forward kernel, setup_context, gradient formula and backward kernel run through one
# torch.autograd.Function instead, skipping the custom-op dispatch layers: about 40 % less Python per
# forward + backward (measured on the CPU: sample at 4^3, 168 -> 102 us; F.grid_sample 53 us), which is
# what a GPU waits for at moderate sizes. Its separate setup_context also lets torch.func.grad through.
EAGER_FAST_PATH = True  # tests switch it off to compare both paths


def _plain(x) -> bool:
    return type(x) in (torch.Tensor, torch.nn.Parameter)


def plain_eager(tensors) -> bool:
    """An ordinary eager call (torch.func transforms included): not traced or compiled, no dispatch or
    function mode active (fake tensors, export, debug modes), no tensor subclass among the inputs."""
    return (
        EAGER_FAST_PATH
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and all(_plain(t) for t in tensors)
    )


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, *inputs):
        output = op.forward(*inputs)
        op.setup(ctx, inputs, output)
        ctx.op = op
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.op.gradient(ctx, ctx.needs_input_grad[1:], ctx.op.backward, *grads))


class _FunctorchFunction(torch.autograd.Function):
    """The same with a separate setup_context, which torch.func transforms require (and which costs about
    30 us more per forward + backward, so plain calls take _EagerFunction)."""

    @staticmethod
    def forward(op, *inputs):
        return op.forward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, *rest = inputs
        op.setup(ctx, tuple(rest), output)
        ctx.op = op

    backward = staticmethod(_EagerFunction.backward)


class EagerOp:
    """One op's pieces, shared by its custom op and the eager path.

    Args:
        name: the custom op's name in ``torch.ops.deepatlas_fast`` (its backward is ``name + "_backward"``).
        forward: the forward kernel call on checked inputs (the custom op's body after its checks).
        setup: ``setup_context(ctx, inputs, output)``.
        gradient: ``gradient(ctx, needs, backward, *grads)``: one gradient slot per input, calling
            ``backward`` (the registered backward op, or its kernel call on the eager path) with the
            backward op's arguments.
        backward: the backward op's kernel call.
    """

    def __init__(self, name, forward, setup, gradient, backward):
        self.name, self.forward, self.setup, self.gradient, self.backward = name, forward, setup, gradient, backward

    def formula(self, ctx, *grads):
        """The custom op's autograd formula (register_autograd)."""
        return self.gradient(ctx, ctx.needs_input_grad, getattr(torch.ops.deepatlas_fast, self.name + "_backward"), *grads)

    def __call__(self, *inputs):
        """Run the op on inputs the public function has checked."""
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if not plain_eager(tensors):
            return getattr(torch.ops.deepatlas_fast, self.name)(*inputs)
        if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
            return _FunctorchFunction.apply(self, *inputs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _EagerFunction.apply(self, *inputs)
        return self.forward(*inputs)  # nothing to differentiate (as the custom op's autograd decides too)
