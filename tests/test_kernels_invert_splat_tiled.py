"""invert_splat_tiled (include/deepatlas_fast/invert_splat_tile.h): one level of invert's splatted initial
guess by tiles of source points, against the reference's splat: the CUDA kernel's algorithm
(cuda/splat_tiled.cu), which the CPU runs serially (cpu/splat_tiled.cpp) so that these tests check the GPU's
code here. On a GPU, invert's pyramid through it (DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled) is tested too.

A tile (4 x 4 x 16 source points) goes through the block's shared buffer when the nodes it touches fit in it
(smooth maps; a fine source grid splatted into a coarse level), else straight to global memory (scattered
points); the buffer holds 4096 float32 / 2048 float64 values, 4 per node, one channel at a time."""

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords
from deepatlas_fast.reference import inversion as reference
from conftest import skip_if_cpp_errors_kill_cuda_processes
from helpers import g, smooth_map

OP = "invert"
VARIABLE = "DEEPATLAS_FAST_CUDA_INVERT_SPLAT"


@pytest.fixture
def device(cpp_device):
    """The CPU emulation, and the CUDA kernel where a GPU is."""
    return cpp_device


def splat(coords, level):
    return torch.ops.deepatlas_fast_C.invert_splat_tiled(coords, list(level))


def check(coords, level, device):
    """The accumulators [N, cells, 4] (weight, weighted source coordinates) against reference.splat."""
    n, dtype = coords.shape[0], coords.dtype
    ours = splat(coords.to(device), level)
    source = identity_coords(coords.shape[2:], dtype=torch.float64).reshape(1, 3, -1).expand(n, 3, -1)
    weight, total = reference.splat(coords.double().reshape(n, 3, -1), source, level)
    expected = torch.cat([weight, total], dim=1).transpose(1, 2)
    assert ours.dtype == dtype and ours.shape == expected.shape and ours.device.type == device
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("level", [(9, 8, 10), (5, 5, 5), (2, 2, 2), (16, 15, 17)])
def test_smooth_map_matches_the_reference_splat(device, dtype, level):
    """Odd source grids (partial tiles), batch 2, levels coarser and finer than the source, some source
    points beyond the cube (cells partly outside the level)."""
    coords = smooth_map(2, (13, 17, 11), 1, 0.08, dtype, stretch=1.05)
    check(coords, level, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scattered_points_fall_back_to_global_adds(device, dtype):
    """Uniform random positions on a fine level: a tile's box exceeds the shared buffer."""
    coords = (2.4 * torch.rand(1, 3, 9, 10, 33, generator=g(2), dtype=torch.float64) - 1.2).to(dtype)
    check(coords, (40, 41, 39), device)


def test_many_points_per_node(device):
    """A 40 x 36 x 44 source on a 3 x 4 x 5 level: hundreds of points add into each node."""
    check(smooth_map(1, (40, 36, 44), 3, 0.05, torch.float64), (3, 4, 5), device)


def test_nan_positions_are_dropped(device):
    coords = smooth_map(1, (6, 7, 18), 4, 0.05, torch.float64)
    coords[0, 1, 2, 3, 4] = float("nan")
    coords[0, 0, 5, 6, 17] = float("nan")
    ours = splat(coords.to(device), (5, 5, 5))
    assert torch.isfinite(ours).all()
    keep = torch.isfinite(coords).all(dim=1, keepdim=True)
    check(torch.where(keep, coords, torch.full_like(coords, 100.0)), (5, 5, 5), device)  # far outside: dropped too
    torch.testing.assert_close(ours.cpu(), splat(torch.where(keep, coords, torch.full_like(coords, 100.0)).to(device),
                                                 (5, 5, 5)).cpu())


def test_rejects_bad_inputs(device):
    skip_if_cpp_errors_kill_cuda_processes(device)
    coords = smooth_map(1, (4, 5, 6), 5, 0.05, torch.float32).to(device)
    with pytest.raises(RuntimeError, match="coords must have 3 channels"):
        splat(coords[:, :2].contiguous(), (3, 3, 3))
    with pytest.raises(RuntimeError, match="level_shape must be 3 sizes"):
        splat(coords, (3, 1, 3))
    with pytest.raises(RuntimeError, match="level_shape must be 3 sizes"):
        splat(coords, (3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_invert_through_the_tiled_pyramid(device, dtype, monkeypatch):
    """invert with DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled (every pyramid level by tiles) against the atomic
    pyramid at the training's shapes in small: a 2 x 64^3 map inverted onto 32^3; the initial guesses differ in
    rounding only, so the Newton solves agree to the contract's tolerance."""
    if device != "cuda":
        pytest.skip("CUDA only: the pyramid's switch is in the CUDA launcher")
    coords = smooth_map(2, (64, 64, 64), 6, 0.05, dtype, stretch=0.9).to(device)
    with da.use_backend("cuda"):
        monkeypatch.setenv(VARIABLE, "atomic")
        atomic, atomic_valid = da.invert(coords, (32, 32, 32))
        monkeypatch.setenv(VARIABLE, "tiled")
        tiled, tiled_valid = da.invert(coords, (32, 32, 32))
        assert atomic_valid.float().mean() > 0.5 and torch.equal(atomic_valid, tiled_valid)
        torch.testing.assert_close(tiled, atomic, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-9)
        monkeypatch.setenv(VARIABLE, "fast")
        with pytest.raises(ValueError, match=VARIABLE):
            da.invert(coords, (32, 32, 32))
        with pytest.raises(RuntimeError, match=VARIABLE):  # the raw op checks too
            torch.ops.deepatlas_fast_C.invert(coords, [32, 32, 32], 4, 0.25)
