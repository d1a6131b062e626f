"""invert's CUDA backward with warp-merged adds (DEEPATLAS_FAST_CUDA_INVERT_SPLAT=merged, cuda/inversion.cu's
backward_kernel<MERGE> on warp_merge.cuh) against the reference's backward. Lanes hold consecutive target
points; where the source cell of a point's solution shares its x1 corners with the next lane's x0 corners
(smooth maps onto a grid as fine as the source), the two adds become one. Cases: smooth maps (merges
almost everywhere), a coarse target on a fine source (hardly any), invalid and degenerate points (which take
part in the shuffles with nothing to add), a partial last warp, displacements, both dtypes.

The merge is CUDA code (warp shuffles) with no CPU emulation: these tests need a GPU, except the check of
the variable's values."""

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords
from deepatlas_fast.ops import _cpp
from conftest import cuda_with_setting
from helpers import check_invert_backward, check_invert_displacement_backward, g, smooth_map

OP = "invert"


@pytest.fixture
def cuda(cpp_device, monkeypatch):
    """The CUDA kernels with DEEPATLAS_FAST_CUDA_INVERT_SPLAT=merged."""
    return cuda_with_setting(cpp_device, monkeypatch, _cpp.INVERT_SPLAT_CUDA_VARIABLE, "merged", "the merged backward")


def ops():
    return torch.ops.deepatlas_fast_C


def check_map(coords, out_shape, seed, min_valid=0.2):
    """The merged backward of invert(coords, out_shape) against the reference's, at the reference's solution."""
    return check_invert_backward(ops().invert_backward, coords, out_shape, seed, "cuda", min_valid)


def check_displacement(disp, seed):
    check_invert_displacement_backward(ops().invert_displacement_backward, disp, seed, "cuda")


def test_the_variable_takes_merged():
    """"merged" is a value of DEEPATLAS_FAST_CUDA_INVERT_SPLAT (checked in Python, then read by the launcher)."""
    assert "merged" in _cpp.INVERT_SPLAT_CUDA_IMPLEMENTATIONS
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(_cpp.INVERT_SPLAT_CUDA_VARIABLE, "merged")
        assert _cpp.invert_splat_cuda_implementation() == "merged"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_shape", [(13, 17, 41), (9, 8, 21), (2, 2, 2)])
def test_smooth_maps(cuda, dtype, out_shape):
    """Odd grids (rows ending inside warps, a partial last warp), batch 2, target grids as fine as the source
    and coarser, part of the target beyond the map's image (invalid points)."""
    coords = smooth_map(2, (13, 17, 41), 1, 0.08, dtype, stretch=0.95)
    check_map(coords, out_shape, 2)


def test_coarse_target_on_a_fine_source(cuda):
    coords = smooth_map(1, (40, 36, 44), 3, 0.05, torch.float64, stretch=1.1)
    check_map(coords, (5, 5, 5), 4)


def test_degenerate_and_invalid_points_pass_nothing(cuda):
    """A map squashed flat along W over part of the grid (invalid or singular there), and one flattened
    everywhere (valid points with a singular Jacobian: no gradient at all)."""
    coords = smooth_map(1, (12, 10, 20), 5, 0.05, torch.float64)
    coords[:, 2, :, :, 8:14] = coords[:, 2, :, :, 8:9]
    check_map(coords, (12, 10, 20), 6)
    flat = identity_coords((9, 10, 7), dtype=torch.float64).clone()
    flat[:, 2] *= 1e-5
    assert not check_map(flat, (9, 10, 7), 17, min_valid=0.1).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_displacement(cuda, dtype):
    disp = smooth_map(2, (11, 14, 37), 7, 0.1, torch.float64) - identity_coords((11, 14, 37), batch=2)
    check_displacement(disp.to(dtype), 8)


def test_public_api_against_the_plain_atomics(cuda, monkeypatch):
    """Through autograd, both ops, at the training's shapes in small (a 2 x 64^3 map onto 32^3)."""
    coords = smooth_map(2, (64, 64, 64), 13, 0.05, torch.float32, stretch=0.9).cuda()
    disp = (coords - identity_coords((64, 64, 64), batch=2, device="cuda")).contiguous()
    weight = torch.randn(2, 3, 64, 64, 64, generator=g(14)).cuda()
    cases = [(lambda x: da.invert(x, (32, 32, 32))[0], coords, weight[..., :32, :32, :32]),
             (lambda x: da.invert_displacement(x)[0], disp, weight)]
    with da.use_backend("cuda"):
        for fn, field, w in cases:
            grads = {}
            for choice in ("atomic", "merged"):
                monkeypatch.setenv(_cpp.INVERT_SPLAT_CUDA_VARIABLE, choice)
                leaf = field.clone().requires_grad_()
                grads[choice] = torch.autograd.grad((fn(leaf) * w).sum(), leaf)[0]
            scale = grads["atomic"].abs().max().item()
            torch.testing.assert_close(grads["merged"], grads["atomic"], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_realistic_size(cuda, dtype):
    """A 96 x 80 x 112 displacement."""
    shape = (96, 80, 112)
    disp = smooth_map(1, shape, 15, 0.03, torch.float64) - identity_coords(shape)
    check_displacement(disp.to(dtype), 16)
