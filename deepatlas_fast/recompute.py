"""Saved tensors that autograd rebuilds in the backward instead of holding (recomputation of cheap results)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import Tensor

from .ops.validation import finite_checks

__all__ = ["recomputed_when_saved"]


class _Recompute:
    """What autograd keeps instead of a saved tensor that :func:`recomputed_when_saved` rebuilds.

    One per block, however many times the tensor is saved (an in-place activation and the next convolution
    both save it): the first unpacking makes it, the others get that copy, the last one lets it go.
    """

    __slots__ = ("make", "saves", "remaining", "value")

    def __init__(self, make):
        self.make, self.saves, self.remaining, self.value = make, 0, 0, None

    def get(self, device_type: str) -> Tensor:
        value = self.value
        if value is None:
            # the forward validated the inputs: no second finiteness check (a host synchronisation on a GPU,
            # here in the middle of the backward)
            with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False), finite_checks(False):
                value = self.make()
            self.remaining = self.saves
        self.remaining -= 1
        self.value = value if self.remaining > 0 else None
        return value


@contextmanager
def recomputed_when_saved(tensor: Tensor, make):
    """Inside the block, autograd saves ``tensor`` for a backward as the recipe ``make`` (a function
    returning the same values, e.g. the ``sample`` call that produced it) and runs ``make()`` when the
    backward needs it, so the tensor itself is freed once the forward is done with it.

    The objective's LNCC terms save their sampled feature volumes (C channels per exam) for the LNCC backward:
    sampling them again costs a gather, holding them the largest share of the objective's memory. A CoordNet
    block saves its first activation this way, and in the "strided" grid a decoder its upsampled input (both
    cheap to remake). ``make`` must not hold ``tensor`` itself; under ``torch.compile`` the block does nothing.
    """
    if torch.compiler.is_compiling():
        yield
        return
    target = weakref.ref(tensor)
    device_type = tensor.device.type
    recipe = _Recompute(make)

    def pack(saved):
        if saved is not target():
            return saved
        recipe.saves += 1
        return recipe

    def unpack(saved):
        return saved.get(device_type) if isinstance(saved, _Recompute) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
