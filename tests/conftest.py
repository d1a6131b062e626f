import functools
import os
import subprocess
import sys

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
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("default")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def cuda_with_setting(device, monkeypatch, variable, value, what):
    """``device`` ("cuda") with the environment variable set to value for the test; on the CPU a skip: ``what``
    is CUDA code (warp shuffles) with no CPU emulation."""
    if device != "cuda":
        pytest.skip(f"{what} is CUDA code (warp shuffles, no CPU emulation): needs a GPU")
    monkeypatch.setenv(variable, value)
    return device


# torch's own C++ error (a bad view) raised after CUDA is initialised, in a process of its own: exit 0 when it
# arrives as a RuntimeError, a signal when the process dies instead.
_CPP_ERROR_PROBE = """
import torch
torch.zeros(1, device="cuda")
try:
    torch.zeros(2).view(3)
except RuntimeError:
    raise SystemExit(0)
raise SystemExit(3)
"""


@functools.lru_cache(maxsize=None)
def _cpp_errors_kill_cuda_processes() -> bool:
    proc = subprocess.run([sys.executable, "-c", _CPP_ERROR_PROBE], capture_output=True, timeout=300)
    return proc.returncode < 0


def skip_if_cpp_errors_kill_cuda_processes(device) -> None:
    """Tests that make our CUDA ops throw (bad inputs to the raw ops) skip on a machine where *any* C++
    exception after CUDA initialisation kills the process, torch's own included: there the crash says nothing
    about our code (benchmarks/raw_op_errors.py --controls shows which case a machine is). Where torch's own
    errors arrive, ours must too: the tests run and a crash fails them."""
    if device == "cuda" and _cpp_errors_kill_cuda_processes():
        pytest.skip("on this machine any C++ exception after CUDA initialisation kills the process (torch's own "
                    "too: a bad view crashed a probe), so bad inputs to CUDA code cannot be tested here")


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """Each test starts and ends with the default backend choice and finiteness checks on."""
    import deepatlas_fast as da

    yield
    da.set_backend(None)
    da.set_check_finite(True)


@pytest.fixture
def one_thread():
    """Tiny volumes: one intra-op thread is faster than two (no OpenMP hand-offs) and immune to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KERNEL_BACKENDS = ("triton", "cpu", "cuda")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Each kernel backend in turn, for tests comparing a backend with the reference; skipped where that
    backend cannot run here on the test's ``device`` (C++ kernels not built, Triton without a GPU or the
    interpreter, cpu kernels on a CUDA device and vice versa). The module's ``OP`` names the op checked."""
    from deepatlas_fast.ops import registry

    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device", "cpu") if callspec else "cpu"
    op = getattr(request.module, "OP", None)
    if op is None:
        raise RuntimeError(f"{request.module.__name__} uses the backend fixture: define OP (the op it checks)")
    reason = registry.unavailable_reason(request.param, op, device)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=DEVICES)
def cpp_device(request):
    """Each device whose C++ kernels of the module's ``OP`` are built here: "cpu" (the C++ cpu kernels, and
    the CPU emulations of the CUDA tile kernels) and, with a GPU, "cuda"."""
    from deepatlas_fast.ops import registry

    reason = registry.unavailable_reason("cpu" if request.param == "cpu" else "cuda", request.module.OP,
                                         request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def phantom(request):
    """A phantom as stored in files, of the test module's ``SHAPE`` and ``SPACING``: ``(image, labels, affine)``."""
    from helpers import phantom_arrays

    return phantom_arrays(request.module.SHAPE, request.module.SPACING)


@pytest.fixture
def files(tmp_path, phantom, request):
    """That phantom written as a labelled reference plus an identity model at the module's ``SPACING``
    (``helpers.reference_files``)."""
    from helpers import reference_files

    return reference_files(tmp_path, *phantom, request.module.SPACING)
