"""The ``cpu`` backend: the C++/OpenMP kernels of ``csrc/cpu`` (extension ``deepatlas_fast._C``).

Implements the ops whose kernels this build registered for the CPU (:data:`IMPLEMENTS`); the registry
falls back to the reference for the others. Signatures: :mod:`deepatlas_fast.ops.backend_reference`.
"""

from __future__ import annotations

from . import _cpp
from ._cpp import *  # noqa: F401,F403 - the op functions

DEVICES = frozenset({"cpu"})
IMPLEMENTS = _cpp.load_kernels("CPU")
