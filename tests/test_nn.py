"""Modules for other frameworks: MONAI's LNCC loss, VoxelMorph's SpatialTransformer, the Jacobian regulariser."""

import pytest
import torch
import torch.nn.functional as F

import deepatlas_fast as da
from deepatlas_fast.nn import JacobianVarianceLoss, LNCCLoss, SpatialTransformer
from helpers import smooth_displacement

monai_losses = pytest.importorskip("monai.losses", reason="MONAI is a test dependency (pip install -e '.[test]')")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kernel_type", ["rectangular", "gaussian"])
def test_lncc_loss_is_a_drop_in_for_monai(reduction, kernel_type):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 9, 10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = (pred.detach() + torch.randn(pred.shape, generator=g, dtype=torch.float64)).requires_grad_()
    kwargs = dict(spatial_dims=3, kernel_size=5, kernel_type=kernel_type, reduction=reduction, smooth_dr=1e-4)
    ours = LNCCLoss(**kwargs)(pred, target)
    pred2, target2 = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    theirs = monai_losses.LocalNormalizedCrossCorrelationLoss(**kwargs)(pred2, target2)
    # MONAI builds its Gaussian window in float32: compare to 1e-6 of each tensor's magnitude.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())
    ours.sum().backward()
    theirs.sum().backward()
    for x, y in ((pred.grad, pred2.grad), (target.grad, target2.grad)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * y.abs().max().item())


def test_lncc_loss_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="spatial_dims must be 3"):
        LNCCLoss(spatial_dims=2)
    with pytest.raises(ValueError, match="kernel_type must be one of"):
        LNCCLoss(kernel_type="triangular")
    with pytest.raises(ValueError, match="smooth_nr must be 0"):
        LNCCLoss(smooth_nr=1e-5)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        LNCCLoss(kernel_size=4)


def voxelmorph_spatial_transformer(src, flow, mode="bilinear"):
    """VoxelMorph's SpatialTransformer, as its documentation describes it (voxel flow, zero padding)."""
    shape = flow.shape[2:]
    vectors = [torch.arange(0, s, dtype=flow.dtype) for s in shape]
    grid = torch.stack(torch.meshgrid(vectors, indexing="ij")).unsqueeze(0)
    new_locs = grid + flow
    new_locs = torch.stack([2 * (new_locs[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], dim=1)
    new_locs = new_locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
    return F.grid_sample(src, new_locs, align_corners=True, mode=mode)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_spatial_transformer_matches_voxelmorph(mode):
    g = torch.Generator().manual_seed(1)
    shape = (9, 11, 10)
    src = torch.randn(2, 2, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    flow = (torch.randn(2, 3, *shape, generator=g, dtype=torch.float64) * 2.5).requires_grad_()
    ours = SpatialTransformer(shape, mode=mode)(src, flow)
    src2, flow2 = src.detach().clone().requires_grad_(), flow.detach().clone().requires_grad_()
    theirs = voxelmorph_spatial_transformer(src2, flow2, mode)
    torch.testing.assert_close(ours, theirs)
    if mode == "bilinear":
        ours.sum().backward()
        theirs.sum().backward()
        torch.testing.assert_close(src.grad, src2.grad)
        torch.testing.assert_close(flow.grad, flow2.grad)


def test_spatial_transformer_checks_its_size():
    with pytest.raises(ValueError, match="flow must have spatial shape"):
        SpatialTransformer((4, 4, 4))(torch.zeros(1, 1, 5, 5, 5), torch.zeros(1, 3, 5, 5, 5))
    with pytest.raises(ValueError, match="mode must be"):
        SpatialTransformer(mode="bicubic")


def test_jacobian_variance_loss():
    g = torch.Generator().manual_seed(2)
    shape = (8, 9, 7)
    field = (da.identity_coords(shape, dtype=torch.float64) + smooth_displacement(shape, g, 0.2)).requires_grad_()
    scale = [(s - 1) / 2 for s in shape]
    module = JacobianVarianceLoss(scale=scale)
    value = module(field)
    var, folding = da.jacobian_var(field, scale, return_folding=True)
    torch.testing.assert_close(value, var)
    torch.testing.assert_close(module.last_folding_fraction, folding)
    value.backward()
    assert field.grad is not None and torch.isfinite(field.grad).all()
