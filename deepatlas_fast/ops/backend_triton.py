"""The ``triton`` backend: fused Triton kernels from :mod:`deepatlas_fast.kernels`.

Runs on CUDA devices; on the CPU only under ``TRITON_INTERPRET=1`` (the Triton interpreter, for
tests: slow). Signatures are those of :mod:`deepatlas_fast.ops.backend_reference`; inputs arrive
validated and contiguous. Importing fails (and the registry falls back with a warning) when
Triton is not installed.
"""

from __future__ import annotations

import os

from ..kernels import inversion as _invert
from ..kernels import jacobian as _jacobian
from ..kernels import sampling as _sample
from ..kernels import similarity as _lncc

DEVICES = frozenset({"cuda", "cpu"} if os.environ.get("TRITON_INTERPRET", "0") == "1" else {"cuda"})
IMPLEMENTS = frozenset(("sample", "warp", "lncc", "jacobian_det", "jacobian_var", "invert", "invert_displacement"))

sample = _sample.sample
sample_backward = _sample.sample_backward
warp = _sample.warp
warp_backward = _sample.warp_backward
lncc = _lncc.lncc
lncc_backward = _lncc.lncc_backward
jacobian_det = _jacobian.jacobian_det
jacobian_det_backward = _jacobian.jacobian_det_backward
jacobian_var = _jacobian.jacobian_var
jacobian_var_backward = _jacobian.jacobian_var_backward
invert = _invert.invert
invert_backward = _invert.invert_backward
invert_displacement = _invert.invert_displacement
invert_displacement_backward = _invert.invert_displacement_backward
