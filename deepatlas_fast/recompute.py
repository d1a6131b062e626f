"""Saved tensors that autograd rebuilds in the backward instead of holding (recomputation of cheap results)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import Tensor

from .ops.validation import finite_checks

__all__ = ["recomputed_when_saved"]


class _Recompute:
    """What autograd keeps instead of a saved tensor that :func:`recomputed_when_saved` rebuilds."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


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

    def pack(saved):
        return _Recompute(make) if saved is target() else saved

    def unpack(saved):
        if not isinstance(saved, _Recompute):
            return saved
        # the forward validated the inputs: no second finiteness check (a host synchronisation on a GPU,
        # here in the middle of the backward)
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False), finite_checks(False):
            return saved.make()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
