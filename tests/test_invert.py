"""invert / invert_displacement: accuracy contract, validity (coverage) and gradients."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords
from helpers import affine_coords, covering_map, rotation, smooth_displacement

size = st.integers(8, 22)
shapes = st.tuples(size, size, size)


def voxel_scale(shape, dtype=torch.float64):
    return torch.tensor([(s - 1) / 2 for s in shape], dtype=dtype).view(1, 3, 1, 1, 1)


def residual_voxels(coords, inverse, out_shape):
    """|sample(coords, inverse) - u| in target voxels, [N, 1, *out_shape]."""
    u = identity_coords(out_shape, dtype=coords.dtype)
    back = da.sample(coords, inverse)
    return ((back - u) * voxel_scale(out_shape, coords.dtype)).norm(dim=1, keepdim=True)


def voxel_det(coords, out_shape):
    """det J of the map in voxel units (target voxels per source voxel)."""
    return da.jacobian_det(coords, [(s - 1) / 2 for s in out_shape])


@given(src=shapes, dst=shapes, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_affine_maps_far_from_identity(src, dst, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 1.0  # up to ~29 degrees per axis
    scales = 0.75 + 0.6 * torch.rand(3, generator=g, dtype=torch.float64)
    matrix = rotation(angles.tolist()) @ torch.diag(scales)
    offset = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 0.5
    coords = affine_coords(matrix, offset, src, dtype)
    det = voxel_det(coords.double(), dst)
    assume(0.5 <= det.min().item() and det.max().item() <= 2.0)

    inverse, valid = da.invert(coords, dst)
    assert inverse.shape == (1, 3, *dst) and valid.shape == (1, 1, *dst) and valid.dtype == torch.bool
    residual = residual_voxels(coords, inverse, dst)
    assert residual[valid].max().item() <= 0.05 if valid.any() else True

    # The analytic inverse p* = A^-1 (u - t) decides coverage.
    u = identity_coords(dst, dtype=torch.float64)
    exact = torch.einsum("ij,njdhw->nidhw", torch.linalg.inv(matrix), u - offset.view(1, 3, 1, 1, 1))
    margin = 1.0 / voxel_scale(src)  # one source voxel, in normalised units
    inside = ((exact.abs() <= 1 - 0.5 * margin).all(dim=1, keepdim=True))
    outside = ((exact.abs() >= 1 + 0.5 * margin).any(dim=1, keepdim=True))
    assert valid[inside].all(), f"{(~valid[inside]).sum()} covered target points marked invalid"
    assert not valid[outside].any(), f"{valid[outside].sum()} uncovered target points marked valid"
    error = ((inverse.double() - exact) * voxel_scale(src)).norm(dim=1, keepdim=True)
    assert error[inside].max().item() <= 0.05


@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_affine_plus_smooth_maps_with_partial_coverage(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    src, dst = (18, 16, 20), (17, 19, 15)
    angles = ((torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 1.0).tolist()
    offset = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 0.6
    coords = affine_coords(rotation(angles) * 0.95, offset, src) + smooth_displacement(src, g, 0.05)
    det = voxel_det(coords, dst)
    assume(0.5 <= det.min().item() and det.max().item() <= 2.0)
    inverse, valid = da.invert(coords.to(dtype), dst)
    assert residual_voxels(coords.to(dtype), inverse, dst)[valid].max().item() <= 0.05
    # Every target voxel nearest to the image of a source point 2+ voxels inside must be found.
    inner = coords[:, :, 2:-2, 2:-2, 2:-2].reshape(3, -1)
    nearest = torch.round((inner + 1) * voxel_scale(dst).view(3, 1)).long()
    inside = ((nearest >= 0) & (nearest < torch.tensor(dst).view(3, 1))).all(dim=0)
    d, h, w = nearest[:, inside]
    assert valid[0, 0, d, h, w].all(), f"{(~valid[0, 0, d, h, w]).sum()} covered target voxels marked invalid"


def test_partial_coverage_is_reported():
    coords = affine_coords(rotation([0.3, -0.2, 0.25]) * 0.9, [0.35, -0.3, 0.0], (16, 14, 18))
    inverse, valid = da.invert(coords, (20, 18, 15))
    fraction = valid.double().mean().item()
    assert 0.2 < fraction < 0.9
    assert residual_voxels(coords, inverse, (20, 18, 15))[valid].max().item() <= 0.05


@pytest.mark.parametrize("seed", range(3))
def test_smooth_maps_cover_the_whole_target(seed):
    g = torch.Generator().manual_seed(seed)
    src, dst = (24, 22, 23), (19, 16, 18)
    coords = covering_map(src, g, batch=2, amplitude=0.05)
    det = voxel_det(coords, dst)
    assert 0.5 <= det.min().item() and det.max().item() <= 2.0
    for dtype in (torch.float64, torch.float32):
        inverse, valid = da.invert(coords.to(dtype), dst)
        assert valid.all()
        assert residual_voxels(coords.to(dtype), inverse, dst).max().item() <= 0.05


def test_initial_guess_alone_is_within_a_voxel_or_two():
    coords = affine_coords(rotation([0.4, 0.1, -0.3]) * 1.3, [0.0, 0.0, 0.0], (16, 16, 16))
    guess, _ = da.invert(coords, (16, 16, 16), iters=0)
    solved, valid = da.invert(coords, (16, 16, 16))
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert valid[interior].all()
    assert residual_voxels(coords, guess, (16, 16, 16))[interior].max().item() < 2.0
    assert residual_voxels(coords, solved, (16, 16, 16))[interior].max().item() < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_invert_displacement_composes_to_identity(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (17, 19, 16)
    disp = smooth_displacement(shape, g, 0.15, batch=2)  # ~1.2-1.4 voxels
    det = voxel_det(identity_coords(shape, batch=2, dtype=torch.float64) + disp, shape)
    assert 0.5 <= det.min().item() and det.max().item() <= 2.0
    v, valid = da.invert_displacement(disp)
    ident = identity_coords(shape, batch=2, dtype=torch.float64)
    residual = residual_voxels(ident + disp, ident + v, shape)
    assert residual[valid].max().item() <= 0.05
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert valid[interior].all()
    via_coords, valid_coords = da.invert(ident + disp, shape)
    both = valid & valid_coords
    torch.testing.assert_close((via_coords - ident)[both.expand_as(v)], v[both.expand_as(v)], atol=1e-6, rtol=0)


def test_zero_displacement_inverts_to_zero():
    v, valid = da.invert_displacement(torch.zeros(2, 3, 5, 6, 7))
    assert valid.all() and v.abs().max().item() < 1e-6


def test_uncovered_target_is_all_invalid():
    coords = affine_coords(torch.eye(3, dtype=torch.float64) * 0.2, [3.0, 3.0, 3.0], (6, 6, 6))
    _, valid = da.invert(coords, (8, 8, 8))
    assert not valid.any()


def test_gradient_is_zero_on_invalid_points():
    coords = affine_coords(torch.eye(3, dtype=torch.float64) * 0.5, [0.6, 0.0, 0.0], (8, 8, 8)).requires_grad_()
    inverse, valid = da.invert(coords, (8, 8, 8))
    assert valid.any() and not valid.all()
    (inverse * (~valid)).sum().backward()
    assert coords.grad.abs().max().item() == 0.0


def test_implicit_gradient_matches_finite_differences_of_a_loss():
    g = torch.Generator().manual_seed(11)
    src = (7, 8, 6)
    coords = covering_map(src, g)
    weights = torch.randn(1, 3, 6, 7, 5, generator=g, dtype=torch.float64)

    def loss(c):
        inverse, valid = da.invert(c, (6, 7, 5), iters=12)
        assert valid.all()
        return (weights * inverse).sum()

    c = coords.clone().requires_grad_()
    loss(c).backward()
    direction = torch.randn(coords.shape, generator=g, dtype=torch.float64)
    step = 1e-6
    numeric = (loss(coords + step * direction) - loss(coords - step * direction)) / (2 * step)
    assert math.isclose((c.grad * direction).sum().item(), numeric.item(), rel_tol=1e-6, abs_tol=1e-9)
