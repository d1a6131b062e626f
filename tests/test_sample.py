"""sample / warp against F.grid_sample (the contract), forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords, to_grid
from helpers import rand_coords

size = st.integers(1, 33)
shapes = st.tuples(size, size, size)


def grid_sample(vol, coords, padding):
    return F.grid_sample(vol, to_grid(coords), mode="bilinear", padding_mode=padding, align_corners=True)


def tolerances(dtype):
    return {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]


def check_against_grid_sample(vol, coords, padding):
    vol_a = vol.detach().clone().requires_grad_()
    coords_a = coords.detach().clone().requires_grad_()
    vol_b = vol.detach().clone().requires_grad_()
    coords_b = coords.detach().clone().requires_grad_()
    out = da.sample(vol_a, coords_a, padding)
    expected = grid_sample(vol_b, coords_b, padding)
    tol = tolerances(vol.dtype)
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(vol_a.grad, vol_b.grad, **tol)
    torch.testing.assert_close(coords_a.grad, coords_b.grad, **tol)


@given(src=shapes, dst=shapes, n=st.integers(1, 2), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       padding=st.sampled_from(["border", "zeros"]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sample_matches_grid_sample(src, dst, n, c, seed, padding, dtype):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(n, c, *src, generator=g, dtype=dtype)
    coords = rand_coords(n, dst, g, dtype=dtype)
    check_against_grid_sample(vol, coords, padding)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_sample_at_voxel_centres_and_far_outside(padding):
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(1, 2, 5, 6, 7, generator=g, dtype=torch.float64)
    ident = identity_coords((5, 6, 7), dtype=torch.float64)
    torch.testing.assert_close(da.sample(vol, ident, padding), vol)
    far = torch.full((1, 3, 2, 2, 2), 50.0, dtype=torch.float64)
    far[:, :, 0] = -1e6
    check_against_grid_sample(vol, far, padding)
    check_against_grid_sample(vol, ident, padding)


def test_sample_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(2, 9, 8, 4, 3, generator=g).permute(0, 1, 4, 3, 2)[:, ::3]  # [2, 3, 3, 4, 8], strided
    coords = rand_coords(2, (6, 5, 4), g, dtype=torch.float32).transpose(3, 4).contiguous().transpose(3, 4)
    coords = torch.cat([coords, coords], dim=2)[:, :, ::2]
    assert not vol.is_contiguous() and not coords.is_contiguous()
    for padding in ("border", "zeros"):
        check_against_grid_sample(vol, coords, padding)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_half_volume(dtype):
    g = torch.Generator().manual_seed(2)
    vol = torch.randn(1, 4, 7, 8, 9, generator=g)
    coords = rand_coords(1, (5, 6, 7), g, dtype=torch.float32)
    out = da.sample(vol.to(dtype), coords)
    assert out.dtype == dtype
    expected = grid_sample(vol.to(dtype).float(), coords, "border")
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    c = coords.clone().requires_grad_()
    da.sample(vol.to(dtype), c).float().sum().backward()
    assert c.grad.dtype == torch.float32 and torch.isfinite(c.grad).all()


def test_coords_only_backward_skips_volume_gradient(monkeypatch):
    from deepatlas_fast.ops import backend_reference

    calls = []
    original = backend_reference.sample_backward

    def spy(grad, vol, coords, padding, need_vol, need_coords):
        calls.append((need_vol, need_coords))
        return original(grad, vol, coords, padding, need_vol, need_coords)

    monkeypatch.setattr(backend_reference, "sample_backward", spy)
    da.set_backend("reference")  # the spied backend (conftest restores the default)
    g = torch.Generator().manual_seed(3)
    vol = torch.randn(1, 2, 6, 6, 6, generator=g)
    coords = rand_coords(1, (4, 4, 4), g, dtype=torch.float32).requires_grad_()
    da.sample(vol, coords).sum().backward()
    assert calls == [(False, True)]
    vol.requires_grad_()
    da.sample(vol, coords.detach()).sum().backward()
    assert calls[-1] == (True, False)


@given(src=shapes, dst=shapes, seed=st.integers(0, 2**31 - 1), padding=st.sampled_from(["border", "zeros"]))
def test_warp_is_sample_at_identity_plus_displacement(src, dst, seed, padding):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(2, 2, *src, generator=g, dtype=torch.float64)
    disp = rand_coords(2, dst, g, spread=0.4, borders=False)
    vol_a, disp_a = vol.clone().requires_grad_(), disp.clone().requires_grad_()
    out = da.warp(vol_a, disp_a, padding)
    vol_b, disp_b = vol.clone().requires_grad_(), disp.clone().requires_grad_()
    expected = grid_sample(vol_b, identity_coords(dst, dtype=torch.float64) + disp_b, padding)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(vol_a.grad, vol_b.grad)
    torch.testing.assert_close(disp_a.grad, disp_b.grad)

