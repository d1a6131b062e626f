"""The kernel backends of ``jacobian_det`` / ``jacobian_var`` (triton, and the C++ cpu / cuda kernels where
built) against the reference backend, forward and backward; ``test_cpu_*`` check properties of the C++ cpu
kernels only, ``test_cuda_*`` run on CUDA devices only.

On a CPU-only machine the Triton kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1);
kernel outputs are poisoned with NaN, so an element a kernel never writes fails the comparison. The
``blocks`` context shrinks the Triton block sizes (many programs per batch element); the C++ kernels
ignore it.
"""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import deepatlas_fast as da
import deepatlas_fast.kernels.jacobian as kernels
from conftest import DEVICES
from deepatlas_fast.coords import identity_coords
from deepatlas_fast.ops import registry
from helpers import g, smooth_displacement

OP = "jacobian_var"  # which op the backend fixture checks availability for (jacobian_det comes with it)
size = st.integers(2, 17)
dtypes = st.sampled_from([torch.float32, torch.float64])
scales = st.sampled_from([None, [0.5, 2.0, -1.5], [3.0, 0.7, 1.3]])


pytestmark = pytest.mark.parametrize("device", DEVICES)


@contextmanager
def kernel_backend(backend, device):
    """``backend``, asserted to really serve both ops on ``device`` (a fallback to the reference would
    make every comparison pass trivially)."""
    for op in ("jacobian_det", "jacobian_var"):
        assert registry.unavailable_reason(backend, op, torch.device(device).type) is None
    with da.use_backend(backend):
        yield


@contextmanager
def blocks(forward, backward):
    """Smaller blocks: many programs per batch element, the last one partial."""
    with mock.patch.object(kernels, "FORWARD_BLOCK", forward), mock.patch.object(kernels, "BACKWARD_BLOCK", backward):
        yield


def run(backend, fn, field, grad_out):
    """``fn(field)`` on ``backend`` (float64 inputs for the reference), and the gradient of
    ``sum(grad_out * first output)`` with respect to ``field``."""
    x = field.detach().to(torch.float64 if backend == "reference" else field.dtype).requires_grad_()
    with da.use_backend("reference") if backend == "reference" else kernel_backend(backend, x.device):
        out = fn(x)
        first = out[0] if isinstance(out, tuple) else out
        first.backward(grad_out.to(first.dtype))
    return out, x.grad


def check(ours, ref, dtype):
    """float64: ~1e-9; float32: ~1e-5 relative to the largest reference magnitude."""
    ours, ref = ours.detach(), ref.detach()
    assert ours.dtype == dtype and ours.shape == ref.shape
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1e-30)))


def compare(backend, fn, field, grad_out):
    out, grad = run(backend, fn, field, grad_out)
    ref_out, ref_grad = run("reference", fn, field, grad_out)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref_out if isinstance(ref_out, tuple) else (ref_out,)):
        check(a, b, field.dtype)
    check(grad, ref_grad, field.dtype)
    return out, ref_out


def index_grid(shape, batch, device):
    """The identity in voxel index units, exact: channel k holds index k."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij"))
    return grid.expand(batch, -1, -1, -1, -1).clone().to(device)


def near_identity(n, shape, seed, noise, dtype, device):
    """Identity in voxel units plus Gaussian noise (folds where noise is large)."""
    half = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    field = identity_coords(shape, batch=n, dtype=torch.float64) * half
    return (field + noise * torch.randn(field.shape, generator=g(seed), dtype=torch.float64)).to(dtype).to(device)


@settings(max_examples=6)
@given(d=size, h=size, w=size, n=st.integers(1, 2), seed=st.integers(0, 2**31 - 1), scale=scales, dtype=dtypes)
def test_det_matches_reference(backend, device, d, h, w, n, seed, scale, dtype):
    field = torch.randn(n, 3, d, h, w, generator=g(seed), dtype=torch.float64).to(dtype).to(device)
    grad = torch.randn(n, 1, d, h, w, generator=g(seed + 1), dtype=torch.float64).to(device)
    compare(backend, lambda x: da.jacobian_det(x, scale), field, grad)


@settings(max_examples=6)
@given(d=size, h=size, w=size, n=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), scale=scales,
       normalized=st.booleans(), dtype=dtypes)
def test_var_matches_reference(backend, device, d, h, w, n, seed, scale, normalized, dtype):
    field = near_identity(n, (d, h, w), seed, 0.6, dtype, device)
    grad_var = torch.tensor(1.7, device=device)
    out, _ = compare(backend, lambda x: da.jacobian_var(x, scale, normalized, return_folding=True), field, grad_var)
    assert out[0].shape == () and out[1].shape == ()


def test_forward_stats_for_the_backward(backend, device):
    """A backend's jacobian_var also returns what its backward takes instead of a second pass: per batch
    element the mean and population variance of det, float64, whether normalized or not."""
    scale = [1.0, -2.0, 0.5]
    field = near_identity(2, (7, 9, 11), 3, 0.6, torch.float64, device)
    det = da.reference.jacobian_det(field.cpu(), scale).flatten(1)
    expected = torch.stack([det.mean(1), det.var(1, unbiased=False)], 1)
    for name in (backend, "reference"):
        module = registry.backend_module(name, "jacobian_var")
        for normalized in (False, True):
            stats = module.jacobian_var(field, scale, normalized)[2]
            assert stats.dtype == torch.float64 and stats.shape == (2, 2) and stats.device == field.device
            torch.testing.assert_close(stats.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_sizes_two_and_large_volume_with_many_programs(backend, device):
    """Size-2 axes, and 24x20x28 cut into 14 (forward) / 4 (backward) Triton programs per batch element:
    the partials and their combination across programs (the cpu kernels' chunks: see the thread test)."""
    for shape, seed in (((2, 9, 2), 0), ((24, 20, 28), 1)):
        field = near_identity(2, shape, seed, 0.6, torch.float64, device)
        grad = torch.randn(2, 1, *shape, generator=g(seed + 7), dtype=torch.float64).to(device)
        with blocks(1024, 4096):
            compare(backend, lambda x: da.jacobian_det(x, [1.0, -2.0, 0.5]), field, grad)
            compare(backend, lambda x: da.jacobian_var(x, [1.0, -2.0, 0.5], True, return_folding=True), field,
                    grad.new_tensor(0.9))


def test_folding_fraction_counts_zero_and_scale_sign(backend, device):
    """Batch element 0: f = (d, h, min(w, 3)) in voxel index units on W = 8, so det = 1 for w < 3,
    1/2 at w = 3 and exactly 0 for w >= 4 (folded: det <= 0); element 1: the identity, det = 1."""
    field = index_grid((5, 6, 8), 2, device)
    field[0, 2] = field[0, 2].clamp_max(3.0)
    with kernel_backend(backend, device):
        _, folding = da.jacobian_var(field, return_folding=True)
        _, folding_flipped = da.jacobian_var(field, [1.0, 1.0, -1.0], return_folding=True)
        _, folding_zero = da.jacobian_var(field, [1.0, 0.0, 1.0], return_folding=True)
    assert folding.item() == (0.5 + 0.0) / 2
    assert folding_flipped.item() == (1.0 + 1.0) / 2
    assert folding_zero.item() == 1.0
    compare(backend, lambda x: da.jacobian_var(x, None, False, return_folding=True), field, field.new_tensor(1.0))


def test_normalized_floor_per_batch_element(backend, device):
    """f = (d, h, (w - c)^2 + eps w): det = antisymmetric(w) + eps, so mean det = eps. eps = 5e-7 puts
    mean^2 below the 1e-12 floor (the floor's gradient rule applies), 2e-6 just above it."""
    shape = (4, 5, 8)
    field = index_grid(shape, 2, device)
    w = field[:, 2]
    field[:, 2] = (w - 3.5) ** 2 + torch.tensor([5e-7, 2e-6], dtype=torch.float64, device=device).view(2, 1, 1, 1) * w
    with da.use_backend("reference"):
        det = da.jacobian_det(field).flatten(1)
    assert (det.mean(1) ** 2 < 1e-12).tolist() == [True, False]
    for normalized in (True, False):
        compare(backend, lambda x: da.jacobian_var(x, [1.0, 1.0, 1.0], normalized, return_folding=True), field,
                field.new_tensor(1.0))
    constant = torch.ones(1, 3, 3, 4, 2, dtype=torch.float64, device=device)
    out, _ = compare(backend, lambda x: da.jacobian_var(x, None, True, return_folding=True), constant,
                     constant.new_tensor(1.0))
    assert out[0].item() == 0.0 and out[1].item() == 1.0


def test_float32_variance_is_stable(backend, device):
    """det = 1 +- 3e-3 (var ~ 2e-6): E[det^2] - E[det]^2 in float32 is off by ~6 % here; the
    two-pass block M2 merged with Chan's formula stays within 1e-4 of the float64 result."""
    shape = (24, 20, 28)
    half = [(s - 1) / 2 for s in shape]
    field = identity_coords(shape, batch=2, dtype=torch.float64) + smooth_displacement(shape, g(5), 1e-3, batch=2)
    field32 = field.float().to(device)
    with blocks(1024, 2048), kernel_backend(backend, device):
        ours = da.jacobian_var(field32, half)
    with da.use_backend("reference"):
        ref = da.jacobian_var(field32.double(), half)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) <= 1e-4 * ref.item()


def cpu_kernels(device):
    """The raw C++ ops, skipping unless the cpu backend serves both ops here."""
    if device != "cpu":
        pytest.skip("the cpu backend runs on the CPU")
    reason = registry.unavailable_reason("cpu", OP, "cpu")
    if reason is not None:
        pytest.skip(reason)
    return torch.ops.deepatlas_fast_C


@contextmanager
def num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_cpu_results_do_not_depend_on_the_thread_count(device):
    """The variance is merged from fixed chunks of rows (16384 voxels) in order and the backward is a
    gather: bitwise equal results on 1 and 2 threads, on 3 chunks per batch element (which also match
    the reference)."""
    ops = cpu_kernels(device)
    shape, scale = (40, 36, 30), [1.0, -2.0, 0.5]
    field = near_identity(2, shape, 3, 0.6, torch.float32, device)
    grad = torch.randn(2, 1, *shape, generator=g(4)).to(device)
    for dtype in (torch.float32, torch.float64):
        compare("cpu", lambda x: da.jacobian_var(x, scale, True, return_folding=True), field.to(dtype),
                field.new_tensor(1.3))
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            var, folding, stats = ops.jacobian_var(field, scale, True)
            results.append([var, folding, stats,
                            ops.jacobian_var_backward(var.new_tensor(1.3), field, stats, scale, True),
                            ops.jacobian_det(field, scale), ops.jacobian_det_backward(grad, field, scale)])
    for one, two in zip(*results):
        assert torch.equal(one, two)


def _bad_calls(field, grad):
    """(call, message) pairs: raw C++ ops with one bad argument each."""
    ops = torch.ops.deepatlas_fast_C
    one = field.new_tensor(1.0)
    stats = torch.zeros(field.shape[0], 2, dtype=torch.float64, device=field.device)
    return [
        (lambda: ops.jacobian_det(field[0], None), "field must have 5 dimensions"),
        (lambda: ops.jacobian_var(field[:, :2].contiguous(), None, False), "field must have 3 channels"),
        (lambda: ops.jacobian_det(field[:, :, :1].contiguous(), None), "every spatial size >= 2"),
        (lambda: ops.jacobian_var(field.transpose(2, 4), None, False), "field must be contiguous"),
        (lambda: ops.jacobian_det(field.int(), None), "field must be float32 or float64"),
        (lambda: ops.jacobian_var(field, [1.0, 2.0], False), "scale must have 3 entries"),
        (lambda: ops.jacobian_det_backward(grad.float(), field, None), "grad must have the dtype of field"),
        (lambda: ops.jacobian_det_backward(grad[:, :, 1:].contiguous(), field, None), "grad must have shape"),
        (lambda: ops.jacobian_det_backward(grad, field, [1.0]), "scale must have 3 entries"),
        (lambda: ops.jacobian_var_backward(one.expand(2).contiguous(), field, stats, None, False),
         "grad_var must hold one value"),
        (lambda: ops.jacobian_var_backward(one.float(), field, stats, None, False),
         "grad_var must have the dtype of field"),
        (lambda: ops.jacobian_var_backward(one, field[:, :, :, :1].contiguous(), stats, None, True),
         "every spatial size >= 2"),
        (lambda: ops.jacobian_var_backward(one, field, stats[:1].contiguous(), None, True), "stats must have shape"),
        (lambda: ops.jacobian_var_backward(one, field, stats.float(), None, True), "stats must be float64"),
    ]


def test_cpu_bad_inputs_raise(device):
    cpu_kernels(device)
    field = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64)
    grad = torch.randn(2, 1, 4, 3, 5, dtype=torch.float64)
    for call, message in _bad_calls(field, grad):
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("normalized", [False, True])
def test_cpu_gradcheck(device, normalized):
    cpu_kernels(device)
    field = near_identity(2, (3, 4, 2), 5, 0.3, torch.float64, device).requires_grad_()
    with da.use_backend("cpu"):
        assert gradcheck(lambda f: da.jacobian_det(f, [1.0, -2.0, 0.5]), (field,))
        assert gradcheck(lambda f: da.jacobian_var(f, [0.5, 2.0, 1.5], normalized), (field,))


def test_cuda_no_host_sync_and_graph_capture(backend, device):
    """Forward and backward of both ops without a host synchronisation (the statistics are combined on
    the device), and a captured CUDA graph replays them on new values in the captured input."""
    if device != "cuda":
        pytest.skip("CUDA only")

    def loss_and_grad(x):
        loss = da.jacobian_var(x, [1.0, -2.0, 0.5], True) + da.jacobian_det(x, [2.0, 1.0, 1.0]).square().mean()
        return loss, torch.autograd.grad(loss, x)[0]

    field = near_identity(2, (12, 10, 14), 6, 0.3, torch.float32, device).requires_grad_()
    with kernel_backend(backend, device), da.finite_checks(False):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss_and_grad(field)  # warm-up on the capture stream (Triton compilation may synchronise)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss_and_grad(field)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = loss_and_grad(field)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            field.mul_(0.97).add_(0.01)  # new values in the captured buffer: the replay must see them
        graph.replay()
        expected = loss_and_grad(field)
        torch.cuda.synchronize()
    for ours, theirs in zip(captured, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
