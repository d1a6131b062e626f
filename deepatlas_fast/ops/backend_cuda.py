"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda`` (extension ``deepatlas_fast._C``, built where
torch has CUDA). Implements the ops this build registered for CUDA (:data:`IMPLEMENTS`).
Signatures: :mod:`deepatlas_fast.ops.backend_reference`.
"""

from __future__ import annotations

from . import _cpp
from ._cpp import *  # noqa: F401,F403 - the op functions

DEVICES = frozenset({"cuda"})
IMPLEMENTS = _cpp.load_kernels("CUDA")
