import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton kernels must see this before they are imported: without a GPU they run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN so that an element a kernel never writes fails the comparison.
os.environ.setdefault("DEEPATLAS_FAST_POISON", "1")

settings.register_profile(
    "default", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "20")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """Each test starts and ends with the default backend choice and finiteness checks on."""
    import deepatlas_fast as da

    yield
    da.set_backend(None)
    da.set_check_finite(True)
