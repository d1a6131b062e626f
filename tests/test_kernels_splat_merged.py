"""The warp-merged volume gradient of the CUDA sample / warp backward (DEEPATLAS_FAST_CUDA_SPLAT=merged,
cuda/sampling.cu's WarpMerge) against the reference. Lanes hold consecutive points: where a point's x1
corners are the next lane's x0 corners (near-identity maps) the two adds become one, else each lane adds its
own. Cases: maps that merge almost everywhere (identity, smooth), maps that hardly merge (scattered points),
rows that end inside a warp (odd widths), a partial last warp, points beyond the borders (both paddings),
NaN coordinates, both ops, both dtypes, with and without the coordinate gradient.

WarpMerge is CUDA code (warp shuffles) with no CPU emulation: these tests need a GPU, except the check of
the variable's values."""

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.ops import _cpp
from deepatlas_fast.reference import sampling as reference
from conftest import cuda_with_setting
from helpers import cuda_and_reference_gradients, g, rand_coords, smooth_map

OP = "sample"


@pytest.fixture
def cuda(cpp_device, monkeypatch):
    """The CUDA kernels with DEEPATLAS_FAST_CUDA_SPLAT=merged."""
    return cuda_with_setting(cpp_device, monkeypatch, _cpp.SPLAT_CUDA_VARIABLE, "merged", "the merged splat")


def check(field, vol_size, c, padding, warp, seed, dtype, need_field=True):
    """The raw op's gradients (volume, and the field's when asked) against the float64 reference."""
    n = field.shape[0]
    grad = torch.randn(n, c, *field.shape[2:], generator=g(seed), dtype=torch.float64)
    vol = torch.randn(n, c, *vol_size, generator=g(seed + 1), dtype=torch.float64)
    raw = torch.ops.deepatlas_fast_C.warp_backward if warp else torch.ops.deepatlas_fast_C.sample_backward
    ours = raw(grad.to("cuda", dtype), vol.to("cuda", dtype), field.to("cuda", dtype), padding, True, need_field)
    backward = reference.warp_backward if warp else reference.sample_backward
    theirs = [t for t in backward(grad, vol, field.double(), padding, True, need_field) if t is not None]
    assert len(ours) == len(theirs) == 1 + int(need_field)
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    for x, y in zip(ours, theirs):
        assert x.dtype == dtype and x.shape == y.shape
        torch.testing.assert_close(x.double().cpu(), y, rtol=rel, atol=rel * max(y.abs().max().item(), 1.0))


def test_the_variable_takes_merged():
    """"merged" is a value of DEEPATLAS_FAST_CUDA_SPLAT (checked in Python, then read by the CUDA launcher)."""
    assert "merged" in _cpp.SPLAT_CUDA_IMPLEMENTATIONS
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(_cpp.SPLAT_CUDA_VARIABLE, "merged")
        assert _cpp.splat_cuda_implementation() == "merged"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("warp", [False, True])
@pytest.mark.parametrize("need_field", [True, False])
def test_smooth_maps(cuda, dtype, padding, warp, need_field):
    """Near-identity maps, width 37 (rows end inside warps), some points beyond the borders."""
    field = smooth_map(2, (7, 9, 37), 1, 0.15, dtype, displacement=warp)
    check(field, (7, 9, 37), 3, padding, warp, 2, dtype, need_field)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_identity_map_merges_every_shared_corner(cuda, padding):
    """The identity: every point's x1 corners are the next point's x0 corners, except at row ends."""
    field = reference.identity_coords((5, 6, 45), dtype=torch.float64).expand(2, -1, -1, -1, -1).contiguous()
    check(field, (5, 6, 45), 2, padding, False, 3, torch.float64)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_scattered_points(cuda, padding):
    """Uniform random coordinates, some beyond the volume: neighbouring lanes rarely share a corner."""
    field = rand_coords(2, (6, 5, 17), g(5), dtype=torch.float64, spread=1.2)
    check(field, (9, 8, 7), 2, padding, False, 6, torch.float64)


def test_partial_last_warp_and_single_points(cuda):
    """105 points (a last warp of 9 lanes), a single point, volumes of one voxel."""
    check(smooth_map(1, (3, 5, 7), 7, 0.1, torch.float64), (3, 5, 7), 2, "zeros", False, 8, torch.float64)
    check(rand_coords(1, (1, 1, 1), g(9), dtype=torch.float64), (2, 3, 4), 1, "border", False, 10, torch.float64)
    check(smooth_map(1, (4, 3, 5), 11, 0.2, torch.float64), (1, 1, 1), 2, "zeros", False, 12, torch.float64)


def test_nan_coordinates_match_the_plain_atomics(cuda, monkeypatch):
    """A NaN coordinate makes NaN weights: the same voxels get NaN as without merging."""
    field = smooth_map(1, (5, 6, 20), 13, 0.1, torch.float64)
    field[0, 1, 2, 3, 4] = float("nan")
    grad = torch.randn(1, 2, 5, 6, 20, generator=g(14), dtype=torch.float64).cuda()
    vol = torch.zeros(1, 2, 5, 6, 20, dtype=torch.float64).cuda()
    merged = torch.ops.deepatlas_fast_C.sample_backward(grad, vol, field.cuda(), "zeros", True, False)[0].cpu()
    monkeypatch.setenv(_cpp.SPLAT_CUDA_VARIABLE, "atomic")
    plain = torch.ops.deepatlas_fast_C.sample_backward(grad, vol, field.cuda(), "zeros", True, False)[0].cpu()
    assert torch.isnan(merged).any()
    torch.testing.assert_close(merged, plain, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_the_cuda_backend_switch(cuda):
    """Through the public API (autograd), both ops, against the reference backend."""
    vol = torch.randn(1, 3, 20, 24, 28, generator=g(15)).cuda()
    for op, field in ((da.sample, smooth_map(1, (20, 24, 28), 16, 0.1, torch.float32)),
                      (da.warp, smooth_map(1, (20, 24, 28), 17, 0.1, torch.float32, displacement=True))):
        for ours, theirs in zip(*cuda_and_reference_gradients(op, vol, field.to("cuda"))):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_realistic_size(cuda, dtype):
    """96 x 80 x 112 points, 8 channels, into the same grid (smooth map) and into a 32^3 atlas."""
    field = smooth_map(1, (96, 80, 112), 18, 0.05, dtype)
    check(field, (96, 80, 112), 8, "zeros", False, 19, dtype, need_field=False)
    check(field, (32, 32, 32), 8, "border", False, 20, dtype)
