"""Helpers shared by the Triton kernels: output allocation, launch sizes, dtypes.

* Outputs come from :func:`new_empty`. With ``DEEPATLAS_FAST_POISON=1`` (the test suite sets it)
  they are filled with NaN (floating) or -1/True (integer/bool) before the kernels run, so an element
  a kernel forgot to write shows up as a mismatch instead of passing by luck.
* Under ``TRITON_INTERPRET=1`` every program instance costs ~25 ms of Python, so launches use the
  largest blocks there (:func:`block`).
* Kernels compute in float32, or in float64 when any input is float64 (the test oracle dtype);
  half inputs are loaded and widened to float32.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from ..reference.sampling import compute_dtype  # noqa: F401 - the one dtype rule, re-exported for the kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def poison_enabled() -> bool:
    return os.environ.get("DEEPATLAS_FAST_POISON", "0") == "1"


def new_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, poisoned when ``DEEPATLAS_FAST_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        elif out.dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(-1)
    return out


def block(gpu: int, interpret: int) -> int:
    """Block size: ``gpu`` when compiled, ``interpret`` (larger) under the interpreter."""
    return interpret if INTERPRET else gpu


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype for a torch floating dtype (for ``tl.constexpr`` compute types)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
