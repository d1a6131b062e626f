"""sample_splat_tiled (include/deepatlas_fast/splat_tile.h), the volume gradient of sample / warp by tiles of
output points, against the reference: the CUDA kernel's algorithm (cuda/splat_tiled.cu), which the CPU runs
serially (cpu/splat_tiled.cpp) so that these tests check the GPU's code here. On a GPU the same tests run
the CUDA kernel, and the cuda backend's switch to it (DEEPATLAS_FAST_CUDA_SPLAT=tiled) is tested too.

A tile's points go through the block's shared buffer when the voxels they touch fit in it (smooth maps, a
small atlas sampled on a large grid), else straight to global memory (scattered points): fields of both
kinds below; tiles are 4 x 4 x 16 output points, the buffer holds 4096 float32 / 2048 float64 voxels."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.ops import _cpp
from deepatlas_fast.reference import sampling as reference
from conftest import skip_if_cpp_errors_kill_cuda_processes
from helpers import cuda_and_reference_gradients, g, rand_coords, smooth_map

OP = "sample"


@pytest.fixture
def device(cpp_device):
    """The CPU emulation, and the CUDA kernels where a GPU is."""
    return cpp_device


def splat(grad, field, vol_size, padding, warp):
    return torch.ops.deepatlas_fast_C.sample_splat_tiled(grad, field, list(vol_size), padding, warp)


def check(field, vol_size, c, padding, warp, seed, device, dtype):
    n = field.shape[0]
    grad = torch.randn(n, c, *field.shape[2:], generator=g(seed), dtype=torch.float64).to(dtype)
    vol = torch.zeros(n, c, *vol_size, dtype=dtype)
    ours = splat(grad.to(device), field.to(device), vol_size, padding, warp)
    backward = reference.warp_backward if warp else reference.sample_backward
    expected = backward(grad.double(), vol.double(), field.double(), padding, True, False)[0]
    assert ours.dtype == dtype and ours.shape == expected.shape
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("warp", [False, True])
def test_smooth_map_through_the_shared_buffer(device, dtype, padding, warp):
    """Near-identity maps on odd grids (partial tiles), some points beyond the borders."""
    field = smooth_map(2, (7, 9, 37), 1, 0.15, dtype, displacement=warp)
    check(field, (7, 9, 37), 3, padding, warp, 2, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_atlas_on_a_large_grid(device, dtype):
    """The explicit term's case: a 6 x 5 x 7 atlas sampled at 20 x 24 x 40 points (~60 per voxel)."""
    field = smooth_map(1, (20, 24, 40), 3, 0.1, dtype)
    check(field, (6, 5, 7), 2, "border", False, 4, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_scattered_points_fall_back_to_global_adds(device, dtype, padding):
    """Uniform random coordinates over a 20^3 volume: a tile touches more voxels than the buffer holds."""
    field = rand_coords(2, (6, 5, 17), g(5), dtype=dtype)
    check(field, (20, 20, 20), 2, padding, False, 6, device, dtype)


def test_sizes_of_one_voxel(device):
    field = rand_coords(1, (3, 4, 5), g(7), spread=1.5)
    check(field, (1, 3, 1), 2, "zeros", False, 8, device, torch.float64)
    check(field, (1, 1, 1), 1, "border", False, 9, device, torch.float64)


def test_nan_coordinates_match_the_atomic_kernels(device):
    """A NaN coordinate makes NaN weights: the same voxels get NaN as with the backend's own kernels."""
    field = smooth_map(1, (5, 6, 20), 10, 0.1, torch.float64)
    field[0, 1, 2, 3, 4] = float("nan")
    grad = torch.randn(1, 2, 5, 6, 20, generator=g(11), dtype=torch.float64)
    vol = torch.zeros(1, 2, 5, 6, 20, dtype=torch.float64)
    ours = splat(grad.to(device), field.to(device), (5, 6, 20), "zeros", False).cpu()
    theirs = torch.ops.deepatlas_fast_C.sample_backward(grad.to(device), vol.to(device), field.to(device), "zeros",
                                                         True, False)[0].cpu()
    assert torch.isnan(ours).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)


@settings(max_examples=15)
@given(
    out=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 40)),
    vol=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    smooth=st.booleans(),
    warp=st.booleans(),
    padding=st.sampled_from(["zeros", "border"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_many_shapes(device, out, vol, smooth, warp, padding, seed):
    if warp:
        vol = out  # warp samples the grid it displaces
    field = smooth_map(2, out, seed, 0.2, torch.float64, displacement=warp) if smooth else rand_coords(2, out, g(seed))
    check(field, vol, 2, padding, warp, seed, device, torch.float64)


def test_rejects_bad_inputs(device):
    skip_if_cpp_errors_kill_cuda_processes(device)
    field = rand_coords(2, (3, 4, 5), g(12), device=device)
    grad = torch.randn(2, 2, 3, 4, 5, generator=g(13), dtype=torch.float64).to(device)
    cases = [
        (lambda: splat(grad, field[:, :2].contiguous(), (4, 4, 4), "zeros", False), "coords must have 3 channels"),
        (lambda: splat(grad[..., :4].contiguous(), field, (4, 4, 4), "zeros", False), "grad must have the shape"),
        (lambda: splat(grad[:1].contiguous(), field, (4, 4, 4), "zeros", True), "grad must have the shape"),
        (lambda: splat(grad.float(), field, (4, 4, 4), "zeros", False), "grad must have the dtype of coords"),
        (lambda: splat(grad, field, (4, 4), "zeros", False), "vol_size must be 3 sizes"),
        (lambda: splat(grad, field, (4, 0, 4), "zeros", False), "vol_size must be 3 sizes"),
        (lambda: splat(grad, field, (4, 4, 4), "reflect", False), "padding must be"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_the_cuda_backend_switch(device, monkeypatch):
    """DEEPATLAS_FAST_CUDA_SPLAT=tiled: the cuda backend's volume gradient comes from sample_splat_tiled
    (on a GPU: through the public API, both ops, compared with the reference)."""
    monkeypatch.setenv(_cpp.SPLAT_CUDA_VARIABLE, "fast")
    with pytest.raises(ValueError, match="DEEPATLAS_FAST_CUDA_SPLAT must be one of"):
        _cpp.splat_cuda_implementation()
    monkeypatch.setenv(_cpp.SPLAT_CUDA_VARIABLE, "")
    assert _cpp.splat_cuda_implementation() == "atomic"
    if device != "cuda":
        return
    monkeypatch.setenv(_cpp.SPLAT_CUDA_VARIABLE, "tiled")
    vol = torch.randn(1, 3, 20, 24, 28, generator=g(14)).to(device)
    for op, field in ((da.sample, smooth_map(1, (20, 24, 28), 15, 0.1, torch.float32)),
                      (da.warp, smooth_map(1, (20, 24, 28), 16, 0.1, torch.float32, displacement=True))):
        for ours, theirs in zip(*cuda_and_reference_gradients(op, vol, field.to(device))):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_realistic_size(device, dtype):
    """96 x 80 x 112 points, 8 channels, into the same grid (smooth map) and into a 32^3 atlas."""
    if device != "cuda":
        pytest.skip("CUDA only: the CPU emulation runs these sizes too slowly for CI")
    field = smooth_map(1, (96, 80, 112), 17, 0.05, dtype)
    check(field, (96, 80, 112), 8, "zeros", False, 18, device, dtype)
    check(field, (32, 32, 32), 8, "border", False, 19, device, dtype)
