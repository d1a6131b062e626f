"""Stock-PyTorch ops (deepatlas_fast.stock) against the fused ops and their own contracts."""

import pytest
import torch
import torch.nn.functional as F

import deepatlas_fast as da
from deepatlas_fast import stock
from helpers import g


def _smooth_map(shape, seed, scale=0.9, amplitude=0.04, batch=2):
    gen = g(seed)
    noise = torch.randn(batch, 3, 4, 4, 4, generator=gen, dtype=torch.float64)
    noise = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True) * amplitude
    return da.identity_coords(shape, batch=batch, dtype=torch.float64) * scale + noise


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_sample_and_warp_match_fused(padding):
    gen = g(1)
    vol = torch.rand(2, 2, 9, 10, 8, generator=gen, dtype=torch.float64)
    coords = (torch.rand(2, 3, 5, 6, 7, generator=gen, dtype=torch.float64) * 2 - 1) * 1.2
    torch.testing.assert_close(stock.sample(vol, coords, padding), da.sample(vol, coords, padding), rtol=0, atol=1e-12)
    disp = 0.1 * torch.randn(2, 3, 9, 10, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(stock.warp(vol, disp, padding), da.warp(vol, disp, padding), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_matches_fused_values_and_gradients(kernel):
    gen = g(2)
    a = torch.rand(2, 2, 8, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 2, 8, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    s = stock.lncc(a, b, 5, kernel)
    f = da.lncc(a, b, 5, kernel)
    torch.testing.assert_close(s, f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stock.lncc(a, b, 3, kernel, reduction="none"), da.lncc(a, b, 3, kernel, reduction="none"))
    gs = torch.autograd.grad(s, (a, b))
    gf = torch.autograd.grad(f, (a, b))
    for x, y in zip(gs, gf):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


def test_lncc_flat_region_is_finite():
    a = torch.ones(1, 1, 6, 6, 6)
    out = stock.lncc(a, a.clone(), 3)
    assert torch.isfinite(out)


def test_jacobian_matches_fused():
    field = _smooth_map((9, 8, 10), 3, amplitude=0.1).requires_grad_()
    scale = [(s - 1) / 2 for s in field.shape[2:]]
    torch.testing.assert_close(stock.jacobian_det(field, scale), da.jacobian_det(field, scale), rtol=1e-10, atol=1e-12)
    vs, fs = stock.jacobian_var(field, scale, return_folding=True)
    vf, ff = da.jacobian_var(field, scale, return_folding=True)
    torch.testing.assert_close(vs, vf)
    assert fs == ff
    torch.testing.assert_close(stock.jacobian_var(field, scale, normalized=True), da.jacobian_var(field, scale, normalized=True))
    gs = torch.autograd.grad(vs, field)[0]
    gf = torch.autograd.grad(vf, field)[0]
    torch.testing.assert_close(gs, gf, rtol=1e-8, atol=1e-10)


def test_jacobian_identity_is_one():
    shape = (6, 7, 5)
    det = stock.jacobian_det(da.identity_coords(shape, dtype=torch.float64), [(s - 1) / 2 for s in shape])
    torch.testing.assert_close(det, torch.ones_like(det))


def test_invert_close_to_fused_and_round_trips():
    coords = _smooth_map((14, 12, 13), 4)
    out_shape = (12, 12, 12)
    inv_s, valid_s = stock.invert(coords, out_shape)
    inv_f, valid_f = da.invert(coords, out_shape)
    assert valid_s.shape == valid_f.shape == (2, 1, *out_shape)
    assert valid_s.float().mean() > 0.5
    # masks agree except perhaps at the coverage border
    assert (valid_s != valid_f).float().mean() < 0.02
    both = (valid_s & valid_f).expand(-1, 3, -1, -1, -1)
    half = torch.tensor([(s - 1) / 2 for s in coords.shape[2:]], dtype=torch.float64).view(1, 3, 1, 1, 1)
    assert ((inv_s - inv_f) * half)[both].abs().max() < 0.1  # source voxels
    # contract: round trip within 0.05 target voxel on valid points
    u = da.identity_coords(out_shape, batch=2, dtype=torch.float64)
    err = ((stock.sample(coords, inv_s) - u) * torch.tensor([(s - 1) / 2 for s in out_shape], dtype=torch.float64).view(1, 3, 1, 1, 1)).norm(dim=1, keepdim=True)
    assert err[valid_s].max() <= 0.05


def test_invert_no_gradient_through_invalid_points():
    coords = _smooth_map((10, 10, 10), 5, scale=0.6, batch=1).requires_grad_()  # covers only the centre
    inverse, valid = stock.invert(coords, (10, 10, 10))
    assert 0 < valid.float().mean() < 1
    weight = (~valid).to(inverse.dtype)  # a loss on the invalid points only
    (grad,) = torch.autograd.grad((inverse * weight).sum(), coords, allow_unused=True)
    assert grad is None or grad.abs().max() == 0


def test_invert_displacement_matches_fused():
    disp = _smooth_map((10, 11, 9), 6, scale=0.0, amplitude=0.05)
    vs, valid_s = stock.invert_displacement(disp)
    vf, valid_f = da.invert_displacement(disp)
    assert (valid_s != valid_f).float().mean() < 0.02
    both = (valid_s & valid_f).expand(-1, 3, -1, -1, -1)
    assert both.float().mean() > 0.5
    torch.testing.assert_close(vs[both], vf[both], rtol=0, atol=1e-6)


def test_ops_table_and_errors():
    assert set(stock.OPS) == {"fused", "stock"}
    for name in ("sample", "warp", "lncc", "jacobian_det", "jacobian_var", "invert", "invert_displacement"):
        assert callable(getattr(stock.OPS["fused"], name))
        assert callable(getattr(stock.OPS["stock"], name))
    assert stock.get_ops("stock") is stock.OPS["stock"]
    with pytest.raises(ValueError, match="ops"):
        stock.get_ops("fast")
    with pytest.raises(ValueError, match="coords"):
        stock.sample(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="b must have the shape"):
        stock.lncc(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        stock.lncc(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), kernel_size=4)
    with pytest.raises(ValueError, match="field"):
        stock.jacobian_det(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="out_shape"):
        stock.invert(torch.zeros(1, 3, 4, 4, 4), (4, 4))
