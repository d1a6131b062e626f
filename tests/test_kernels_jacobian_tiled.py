"""jacobian_det_backward_tiled / jacobian_var_backward_tiled (include/deepatlas_fast/jacobian_tile.h) against
the reference: the CUDA kernel's tile algorithm (cuda/jacobian.cu, tiled_backward_kernel), which the CPU runs
serially (cpu/jacobian.cpp) so that these tests check the GPU's code here. On a GPU the same tests run the
CUDA kernel, and the cuda backend's switch to it (DEEPATLAS_FAST_CUDA_JACOBIAN=tiled) is tested too.

Units are 8 x 32 in-plane tiles over runs of 16 planes, with U made once per voxel into a ring of planes: the
sizes below cover partial tiles and runs, several of each, and axes of 2 (both neighbours one-sided)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.ops import _cpp
from deepatlas_fast.reference import jacobian as reference
from conftest import skip_if_cpp_errors_kill_cuda_processes
from helpers import g, smooth_displacement

OP = "jacobian_var"
SCALES = [None, [0.5, 2.0, -1.5]]


@pytest.fixture
def device(cpp_device):
    """The CPU emulation, and the CUDA kernel where a GPU is."""
    return cpp_device


def ops():
    return torch.ops.deepatlas_fast_C


def field_of(shape, seed, kind="random", batch=1):
    """[batch, 3, *shape] float64: independent noise (every stencil tap matters) or identity + a smooth
    displacement (the regulariser's case: det near 1)."""
    if kind == "random":
        return torch.randn(batch, 3, *shape, generator=g(seed), dtype=torch.float64)
    ident = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    return ident.expand(batch, -1, -1, -1, -1) + smooth_displacement(shape, g(seed), 2.0, batch=batch)


def assert_near(ours, expected, dtype):
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    scale = max(expected.abs().max().item(), 1.0)
    assert ours.dtype == dtype and ours.shape == expected.shape
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=rel, atol=rel * scale)


def check_det(field, scale, seed, device, dtype):
    grad = torch.randn(field.shape[0], 1, *field.shape[2:], generator=g(seed), dtype=torch.float64)
    ours = ops().jacobian_det_backward_tiled(grad.to(device, dtype), field.to(device, dtype), scale)
    assert_near(ours, reference.jacobian_det_backward(grad, field, scale), dtype)
    return ours


def stats_of(field, scale):
    """jacobian_var's third output (the backward's per-batch mean and variance of det)."""
    return ops().jacobian_var(field, scale, False)[2]


def check_var(field, scale, normalized, device, dtype, grad_var=1.7):
    grad = torch.tensor(grad_var, dtype=torch.float64)
    field_d = field.to(device, dtype)
    ours = ops().jacobian_var_backward_tiled(grad.to(device, dtype), field_d, stats_of(field_d, scale), scale,
                                             normalized)
    assert_near(ours, reference.jacobian_var_backward(grad, field, scale, normalized), dtype)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", SCALES)
def test_det_backward_over_several_tiles_and_runs(device, dtype, scale):
    """3 runs of planes (the last partial), 3 tile rows, 3 tile columns (the last ones partial), batch 2."""
    field = field_of((37, 19, 70), 1, batch=2)
    check_det(field, scale, 2, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_var_backward_over_several_tiles_and_runs(device, dtype, normalized, kind):
    field = field_of((33, 17, 40), 3, kind, batch=2)
    check_var(field, SCALES[1], normalized, device, dtype)


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 9, 33), (17, 2, 5), (16, 8, 32), (18, 3, 2)])
def test_smallest_axes_and_exact_tiles(device, shape):
    """Axes of 2 (one-sided differences on both sides), exact multiples of the tile and the run, one
    plane past a run."""
    field = field_of(shape, 4)
    check_det(field, None, 5, device, torch.float64)
    check_var(field, None, True, device, torch.float64)


def test_same_values_as_the_untiled_kernels(device):
    """The same U and the same sums in the same order as the backend's own backward: bitwise on the CPU;
    on CUDA within rounding (the compiler may contract the two kernels' arithmetic differently)."""
    field = field_of((21, 11, 45), 6, batch=2).to(device)
    grad = torch.randn(2, 1, 21, 11, 45, generator=g(7), dtype=torch.float64).to(device)
    grad_var = torch.tensor(0.3, dtype=torch.float64, device=device)
    pairs = [
        (ops().jacobian_det_backward_tiled(grad, field, SCALES[1]), ops().jacobian_det_backward(grad, field, SCALES[1])),
        (ops().jacobian_var_backward_tiled(grad_var, field, stats_of(field, None), None, True),
         ops().jacobian_var_backward(grad_var, field, stats_of(field, None), None, True)),
    ]
    for tiled, untiled in pairs:
        if device == "cpu":
            assert torch.equal(tiled, untiled)
        else:
            torch.testing.assert_close(tiled, untiled, rtol=1e-13, atol=1e-13 * untiled.abs().max().item())


def test_nan_stays_where_the_untiled_kernels_put_it(device):
    """A NaN in the field reaches the gradient of the voxels whose gather reads it, as with the gather."""
    field = field_of((9, 10, 34), 8)
    field[0, 1, 4, 5, 31] = float("nan")
    grad = torch.randn(1, 1, 9, 10, 34, generator=g(9), dtype=torch.float64)
    ours = ops().jacobian_det_backward_tiled(grad.to(device), field.to(device), None).cpu()
    theirs = reference.jacobian_det_backward(grad, field, None)
    assert torch.isnan(ours).any()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(2, 35), st.integers(2, 19), st.integers(2, 70)),
    batch=st.integers(1, 2),
    smooth=st.booleans(),
    scale=st.sampled_from(SCALES),
    normalized=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_many_shapes(device, shape, batch, smooth, scale, normalized, seed):
    field = field_of(shape, seed, "smooth" if smooth else "random", batch)
    check_det(field, scale, seed + 1, device, torch.float64)
    check_var(field, scale, normalized, device, torch.float64)


def test_rejects_bad_inputs(device):
    skip_if_cpp_errors_kill_cuda_processes(device)
    field = field_of((4, 5, 6), 10, batch=2).to(device)
    grad = torch.randn(2, 1, 4, 5, 6, generator=g(11), dtype=torch.float64).to(device)
    one = torch.tensor(1.0, dtype=torch.float64, device=device)
    stats = stats_of(field, None)
    det = ops().jacobian_det_backward_tiled
    var = lambda grad_var, f, scale, normalized, s=stats: ops().jacobian_var_backward_tiled(  # noqa: E731
        grad_var, f, s, scale, normalized)
    cases = [
        (lambda: det(grad, field[:, :2].contiguous(), None), "field must have 3 channels"),
        (lambda: det(grad, field[..., :1].contiguous(), None), "every spatial size >= 2"),
        (lambda: det(grad[:, :, :3].contiguous(), field, None), "grad must have shape"),
        (lambda: det(grad.float(), field, None), "dtype"),
        (lambda: det(grad, field, [1.0, 2.0]), "scale must have 3 entries"),
        (lambda: var(one.expand(2).contiguous(), field, None, False), "grad_var must hold one value"),
        (lambda: var(one.float(), field, None, False), "dtype"),
        (lambda: var(one, field, None, False, stats[:1].contiguous()), "stats must have shape"),
        (lambda: var(one, field, None, False, stats.float()), "stats must be float64"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_the_cuda_backend_switch(device, monkeypatch):
    """DEEPATLAS_FAST_CUDA_JACOBIAN=tiled: the cuda backend's Jacobian backward is the tiled kernel's (on a
    GPU: through the public API, both ops, against the reference)."""
    monkeypatch.setenv(_cpp.JACOBIAN_CUDA_VARIABLE, "fast")
    with pytest.raises(ValueError, match="DEEPATLAS_FAST_CUDA_JACOBIAN must be one of"):
        _cpp.jacobian_cuda_implementation()
    monkeypatch.setenv(_cpp.JACOBIAN_CUDA_VARIABLE, "")
    assert _cpp.jacobian_cuda_implementation() == "gather"
    if device != "cuda":
        return
    monkeypatch.setenv(_cpp.JACOBIAN_CUDA_VARIABLE, "tiled")
    field = field_of((20, 24, 40), 12, "smooth").float().to(device)
    weight = torch.randn(1, 1, 20, 24, 40, generator=g(13)).to(device)
    fns = (lambda f: (da.jacobian_det(f) * weight).sum(), lambda f: da.jacobian_var(f, normalized=True))
    for fn in fns:
        grads = {}
        for backend in ("cuda", "reference"):
            leaf = field.clone().requires_grad_()
            with da.use_backend(backend):
                grads[backend] = torch.autograd.grad(fn(leaf), leaf)[0]
        theirs = grads["reference"]
        torch.testing.assert_close(grads["cuda"], theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_realistic_size(device, dtype):
    """96 x 80 x 112 voxels, batch 2: 6 runs, 10 x 4 tiles per plane."""
    if device != "cuda":
        pytest.skip("CUDA only: the CPU emulation runs these sizes too slowly for CI")
    field = field_of((96, 80, 112), 14, "smooth", batch=2)
    check_det(field, SCALES[1], 15, device, dtype)
    check_var(field, None, True, device, dtype)
