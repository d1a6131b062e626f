"""invert_backward_tiled / invert_displacement_backward_tiled (include/deepatlas_fast/invert_backward_tile.h):
invert's implicit backward splatted by tiles of target points, against the reference's backward: the CUDA
kernel's algorithm (cuda/splat_tiled.cu), which the CPU runs serially (cpu/splat_tiled.cpp) so that these
tests check the GPU's code here. On a GPU, invert's backward through it (DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled)
is tested too.

A tile (4 x 4 x 16 target points) goes through the block's shared buffer when the source nodes around its
solutions fit in it (smooth maps), else straight to global memory (a coarse target grid on a fine source,
whose tile's solutions spread over the whole source); invalid and degenerate points pass nothing."""

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords
from conftest import skip_if_cpp_errors_kill_cuda_processes
from helpers import check_invert_backward, check_invert_displacement_backward, g, smooth_map

OP = "invert"
VARIABLE = "DEEPATLAS_FAST_CUDA_INVERT_SPLAT"


@pytest.fixture
def device(cpp_device):
    """The CPU emulation, and the CUDA kernel where a GPU is."""
    return cpp_device


def ops():
    return torch.ops.deepatlas_fast_C


def check_map(coords, out_shape, seed, device, min_valid=0.2):
    """The tiled backward of invert(coords, out_shape) against the reference's, at the reference's solution."""
    return check_invert_backward(ops().invert_backward_tiled, coords, out_shape, seed, device, min_valid)


def check_displacement(disp, seed, device):
    check_invert_displacement_backward(ops().invert_displacement_backward_tiled, disp, seed, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_shape", [(13, 17, 11), (9, 8, 21), (2, 2, 2)])
def test_smooth_map_through_the_shared_buffer(device, dtype, out_shape):
    """Odd grids (partial tiles), batch 2, target grids as fine as the source and coarser, part of the
    target beyond the map's image (invalid points)."""
    coords = smooth_map(2, (13, 17, 11), 1, 0.08, dtype, stretch=0.95)
    check_map(coords, out_shape, 2, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coarse_target_on_a_fine_source_falls_back_to_global_adds(device, dtype):
    """A 5^3 target grid in one tile whose solutions spread over a 40 x 36 x 44 source: the box of source
    nodes (~63 000) exceeds the buffer (4096 float32 / 2048 float64 values)."""
    coords = smooth_map(1, (40, 36, 44), 3, 0.05, dtype, stretch=1.1)
    check_map(coords, (5, 5, 5), 4, device)


def test_folding_map_passes_nothing_from_degenerate_points(device):
    """A map squashed flat along W over part of the grid: its points there are invalid or have a singular
    Jacobian and pass no gradient, as in the reference."""
    coords = smooth_map(1, (12, 10, 20), 5, 0.05, torch.float64)
    coords[:, 2, :, :, 8:14] = coords[:, 2, :, :, 8:9]
    check_map(coords, (12, 10, 20), 6, device)


def test_valid_points_with_a_degenerate_jacobian_pass_nothing(device):
    """A map flattened along W (scale 1e-5): the target's middle W plane is solved exactly (valid) but J is
    singular there, |det J| <= 1e-4 |J|_F^3, so no point passes a gradient."""
    coords = identity_coords((9, 10, 7), dtype=torch.float64).clone()
    coords[:, 2] *= 1e-5
    ours = check_map(coords, (9, 10, 7), 17, device, min_valid=0.1)
    assert not ours.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_displacement(device, dtype):
    disp = (smooth_map(2, (11, 14, 37), 7, 0.1, torch.float64) - identity_coords((11, 14, 37), batch=2))
    check_displacement(disp.to(dtype), 8, device)


def test_same_gradient_as_the_backend_backward(device):
    """Against the backend's own raw backward at the backend's own solution (float64: equal to rounding)."""
    coords = smooth_map(2, (15, 12, 18), 9, 0.06, torch.float64).to(device)
    inverse, valid = ops().invert(coords, [10, 11, 19], 8, 0.05)
    grad = torch.randn(inverse.shape, generator=g(10), dtype=torch.float64).to(device)
    ours = ops().invert_backward_tiled(grad, coords, inverse, valid)
    theirs = ops().invert_backward(grad, coords, inverse, valid)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * theirs.abs().max().item())


def test_rejects_bad_inputs(device):
    skip_if_cpp_errors_kill_cuda_processes(device)
    coords = smooth_map(1, (4, 5, 6), 11, 0.05, torch.float64).to(device)
    inverse, valid = ops().invert(coords, [4, 4, 4], 4, 0.25)
    grad = torch.randn(inverse.shape, generator=g(12), dtype=torch.float64).to(device)
    cases = [
        (lambda: ops().invert_backward_tiled(grad, coords[:, :2].contiguous(), inverse, valid),
         "coords must have 3 channels"),
        (lambda: ops().invert_backward_tiled(grad[..., :3].contiguous(), coords, inverse, valid),
         "grad must have the shape of inverse"),
        (lambda: ops().invert_backward_tiled(grad, coords, inverse, valid.float()), "valid must be bool"),
        (lambda: ops().invert_displacement_backward_tiled(grad, coords, inverse, valid),
         "inverse_disp must have the shape of disp"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_invert_backward_through_the_tiled_splat(device, dtype, monkeypatch):
    """DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled: invert's and invert_displacement's backward by tiles, through
    the public API, against the atomic backward at the training's shapes in small (a 2 x 64^3 map onto 32^3)."""
    if device != "cuda":
        pytest.skip("CUDA only: the backward's switch is in the CUDA launcher")
    coords = smooth_map(2, (64, 64, 64), 13, 0.05, dtype, stretch=0.9).to(device)
    disp = (coords - identity_coords((64, 64, 64), batch=2, dtype=dtype, device=device)).contiguous()
    weight = torch.randn(2, 3, 64, 64, 64, generator=g(14), dtype=dtype).to(device)
    cases = [(lambda x: da.invert(x, (32, 32, 32))[0], coords, weight[..., :32, :32, :32]),
             (lambda x: da.invert_displacement(x)[0], disp, weight)]
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    with da.use_backend("cuda"):
        for fn, field, w in cases:
            grads = {}
            for choice in ("atomic", "tiled"):
                monkeypatch.setenv(VARIABLE, choice)
                leaf = field.clone().requires_grad_()
                grads[choice] = torch.autograd.grad((fn(leaf) * w).sum(), leaf)[0]
            scale = grads["atomic"].abs().max().item()
            torch.testing.assert_close(grads["tiled"], grads["atomic"], rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_realistic_size(device, dtype):
    """A 96 x 80 x 112 displacement (the smooth case: the shared buffer)."""
    if device != "cuda":
        pytest.skip("CUDA only: the CPU emulation runs these sizes too slowly for CI")
    shape = (96, 80, 112)
    disp = smooth_map(1, shape, 15, 0.03, torch.float64) - identity_coords(shape)
    check_displacement(disp.to(dtype), 16, device)
