"""Coordinate helpers: identity, grid conversion, voxel/normalised units."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import deepatlas_fast as da


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 4, 3), (2, 1, 1)])
def test_identity_matches_affine_grid(shape):
    ident = da.identity_coords(shape, batch=2, dtype=torch.float64)
    theta = torch.eye(3, 4, dtype=torch.float64).unsqueeze(0).expand(2, 3, 4)
    with pytest.warns(UserWarning) if 1 in shape else contextlib.nullcontext():
        grid = F.affine_grid(theta, (2, 1, *shape), align_corners=True)
    torch.testing.assert_close(da.to_grid(ident), grid)
    torch.testing.assert_close(da.from_grid(grid), ident)


def test_voxel_round_trips():
    g = torch.Generator().manual_seed(0)
    shape = (5, 9, 1)
    coords = torch.rand(2, 3, 4, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    coords[:, 2] = 0  # a size-1 axis has the single position 0
    vox = da.normalized_to_voxel(coords, shape)
    torch.testing.assert_close(da.voxel_to_normalized(vox, shape), coords)
    torch.testing.assert_close(vox[:, 0], (coords[:, 0] + 1) * 2)
    disp = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    back = da.displacement_to_normalized(da.displacement_to_voxel(disp, shape), shape)
    torch.testing.assert_close(back[:, :2], disp[:, :2])
    assert (back[:, 2] == 0).all()


def test_identity_voxel_positions_are_indices():
    shape = (4, 6, 3)
    vox = da.normalized_to_voxel(da.identity_coords(shape, dtype=torch.float64), shape)
    for k, size in enumerate(shape):
        index = torch.arange(size, dtype=torch.float64).view([-1 if j == k else 1 for j in range(3)])
        torch.testing.assert_close(vox[0, k], index.expand(shape))


def test_shape_errors():
    with pytest.raises(ValueError, match="shape must be 3 positive sizes"):
        da.identity_coords((4, 4))
    with pytest.raises(ValueError, match=r"coords must have shape \[N, 3, d, h, w\]"):
        da.to_grid(torch.zeros(1, 2, 3, 3, 3))
