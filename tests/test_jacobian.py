"""jacobian_det / jacobian_var against a NumPy oracle (np.gradient + np.linalg.det)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords
from helpers import smooth_displacement

size = st.integers(2, 33)


def numpy_det(field, scale=None):
    f = field.detach().cpu().numpy().astype(np.float64)
    if scale is not None:
        f = f * np.asarray(scale, dtype=np.float64).reshape(1, 3, 1, 1, 1)
    # jac[n, k, j, ...] = d f_k / d index_j
    jac = np.stack([np.stack(np.gradient(f[:, k], axis=(1, 2, 3), edge_order=1), axis=1) for k in range(3)], axis=1)
    return np.linalg.det(np.moveaxis(jac, (1, 2), (-2, -1)))[:, None]


@given(d=size, h=size, w=size, n=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
       with_scale=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_det_matches_numpy(d, h, w, n, seed, with_scale, dtype):
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(n, 3, d, h, w, generator=g, dtype=torch.float64)
    scale = [0.5, 2.0, -1.5] if with_scale else None
    det = da.jacobian_det(field.to(dtype), scale)
    assert det.shape == (n, 1, d, h, w) and det.dtype == dtype
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(det.double().numpy(), numpy_det(field, scale), **tol)


@given(d=size, h=size, w=size, n=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), normalized=st.booleans())
def test_var_and_folding_match_numpy(d, h, w, n, seed, normalized):
    g = torch.Generator().manual_seed(seed)
    field = identity_coords((d, h, w), batch=n, dtype=torch.float64) + 0.3 * torch.randn(
        n, 3, d, h, w, generator=g, dtype=torch.float64
    )
    det = numpy_det(field).reshape(n, -1)
    var = det.var(axis=1)
    if normalized:
        var = var / np.maximum(det.mean(axis=1) ** 2, 1e-12)
    folding = (det <= 0).mean(axis=1)
    ours, ours_folding = da.jacobian_var(field, normalized=normalized, return_folding=True)
    np.testing.assert_allclose(ours.item(), var.mean(), rtol=1e-9)
    np.testing.assert_allclose(ours_folding.item(), folding.mean(), rtol=1e-12)
    assert not ours_folding.requires_grad


def test_identity_field_in_voxel_units():
    shape = (5, 9, 7)
    ident = identity_coords(shape, dtype=torch.float64)
    half = [(s - 1) / 2 for s in shape]
    torch.testing.assert_close(da.jacobian_det(ident, half), torch.ones(1, 1, *shape, dtype=torch.float64))
    torch.testing.assert_close(
        da.jacobian_det(ident), torch.full((1, 1, *shape), 1 / (half[0] * half[1] * half[2]), dtype=torch.float64)
    )
    var, folding = da.jacobian_var(ident, half, return_folding=True)
    assert abs(var.item()) < 1e-20 and folding.item() == 0.0


def test_folding_detected_on_a_mirrored_field():
    ident = identity_coords((6, 6, 6), dtype=torch.float64)
    mirrored = ident.clone()
    mirrored[:, 2] = -mirrored[:, 2]
    _, folding = da.jacobian_var(mirrored, return_folding=True)
    assert folding.item() == 1.0


def test_normalized_var_is_scale_free_and_finite_when_degenerate():
    g = torch.Generator().manual_seed(3)
    field = identity_coords((8, 8, 8), dtype=torch.float64) + smooth_displacement((8, 8, 8), g, 0.1)
    a = da.jacobian_var(field, normalized=True)
    b = da.jacobian_var(3.0 * field, normalized=True)
    torch.testing.assert_close(a, b)
    constant = torch.ones(1, 3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    value = da.jacobian_var(constant, normalized=True)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(constant.grad).all()


def test_det_gradient_matches_autograd_of_torch_gradient():
    g = torch.Generator().manual_seed(4)
    field = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=torch.float64)
    a = field.clone().requires_grad_()
    b = field.clone().requires_grad_()
    ours = da.jacobian_det(a, [1.0, 2.0, 3.0])
    scaled = b * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    jac = [[torch.gradient(scaled[:, k], dim=1 + j)[0] for j in range(3)] for k in range(3)]
    theirs = torch.linalg.det(torch.stack([torch.stack(row, -1) for row in jac], -2)).unsqueeze(1)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("shape", [(1, 4, 4), (4, 4, 1)])
def test_size_one_axis_is_rejected(shape):
    with pytest.raises(ValueError, match="field must have every spatial size >= 2"):
        da.jacobian_det(torch.zeros(1, 3, *shape))
