"""lncc against MONAI 1.6's LocalNormalizedCrossCorrelationLoss, forward and both gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepatlas_fast as da

monai_losses = pytest.importorskip("monai.losses", reason="MONAI is a test dependency (pip install -e '.[test]')")

MONAI_KERNEL = {"box": "rectangular", "gaussian": "gaussian"}
size = st.integers(1, 33)


def monai_loss(kernel_size, kernel, eps=1e-5, reduction="mean"):
    return monai_losses.LocalNormalizedCrossCorrelationLoss(
        spatial_dims=3, kernel_size=kernel_size, kernel_type=MONAI_KERNEL[kernel], smooth_dr=eps, reduction=reduction
    )


def correlated_pair(shape, generator, dtype):
    a = torch.randn(*shape, generator=generator, dtype=dtype)
    b = 0.6 * a + torch.randn(*shape, generator=generator, dtype=dtype) + 2.0
    return a, b


@given(d=size, h=size, w=size, n=st.integers(1, 2), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       kernel_size=st.sampled_from([1, 3, 5, 7, 9, 21]), kernel=st.sampled_from(["box", "gaussian"]))
def test_lncc_matches_monai(d, h, w, n, c, seed, kernel_size, kernel):
    g = torch.Generator().manual_seed(seed)
    a, b = correlated_pair((n, c, d, h, w), g, torch.float64)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours = da.lncc(a1, b1, kernel_size, kernel)
    theirs = monai_loss(kernel_size, kernel)(a2, b2)  # MONAI: pred=a, target=b
    # MONAI builds its Gaussian window in float32 even for float64 inputs: ~1e-8 relative apart.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-12)
    ours.backward()
    theirs.backward()
    for ours_grad, their_grad in ((a1.grad, a2.grad), (b1.grad, b2.grad)):
        scale = their_grad.abs().max().item()
        # Where the true gradient is 0 (e.g. a 1-voxel volume: the variance floor is active) both sides are
        # float64 rounding noise of the window sums, which grows with the window volume and the intensities'
        # square (4.4e-11 for a 1-voxel volume of intensity ~3 in a 21³ box).
        noise = 1e-14 * kernel_size**3 * (1.0 + b.abs().max().item() ** 2) + 1e-12
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-6, atol=1e-6 * scale + noise)


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
@pytest.mark.parametrize("kernel_size", [3, 9])
def test_lncc_float32_loss_within_1e5_of_monai(kernel, kernel_size):
    g = torch.Generator().manual_seed(kernel_size)
    a, b = correlated_pair((2, 3, 19, 17, 21), g, torch.float32)
    ours = da.lncc(a, b, kernel_size, kernel)
    theirs = monai_loss(kernel_size, kernel)(a, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)


def test_lncc_map_is_monai_none_negated():
    g = torch.Generator().manual_seed(4)
    a, b = correlated_pair((1, 2, 9, 10, 11), g, torch.float64)
    ours = da.lncc(a, b, 5, "gaussian", reduction="none")
    theirs = monai_loss(5, "gaussian", reduction="none")(a, b)
    assert ours.shape == a.shape
    torch.testing.assert_close(ours, -theirs)
    assert (ours >= 0).all() and (ours <= 1 + 1e-9).all()


def test_lncc_custom_eps_matches_monai_smooth_dr():
    g = torch.Generator().manual_seed(5)
    a, b = correlated_pair((1, 1, 8, 8, 8), g, torch.float64)
    torch.testing.assert_close(da.lncc(a, b, 3, "box", eps=0.5), monai_loss(3, "box", eps=0.5)(a, b))


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_constant_images_are_finite(kernel):
    for dtype in (torch.float32, torch.float64):
        a = torch.full((1, 2, 12, 12, 12), 1000.0, dtype=dtype, requires_grad=True)
        b = torch.full((1, 2, 12, 12, 12), -3.0, dtype=dtype, requires_grad=True)
        loss = da.lncc(a, b, 9, kernel)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        assert torch.isfinite(da.lncc(a, b, 9, kernel, reduction="none")).all()
    # one constant, one textured image
    g = torch.Generator().manual_seed(6)
    textured = torch.randn(1, 1, 12, 12, 12, generator=g).requires_grad_()
    flat = torch.zeros(1, 1, 12, 12, 12, requires_grad=True)
    loss = da.lncc(flat, textured, 5, kernel)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(flat.grad).all() and torch.isfinite(textured.grad).all()


def test_lncc_identical_images_give_minus_one_inside():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(1, 1, 16, 16, 16, generator=g, dtype=torch.float64)
    ncc = da.lncc(a, 3 * a + 1, 5, reduction="none")
    torch.testing.assert_close(ncc[..., 2:-2, 2:-2, 2:-2], torch.ones_like(ncc[..., 2:-2, 2:-2, 2:-2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lncc_half_inputs_accumulate_in_float32(dtype):
    g = torch.Generator().manual_seed(8)
    a, b = correlated_pair((1, 2, 10, 11, 12), g, torch.float32)
    a16, b16 = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    loss = da.lncc(a16, b16, 5)
    assert loss.dtype == torch.float32
    expected = da.lncc(a.to(dtype).float(), b.to(dtype).float(), 5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert a16.grad.dtype == dtype and torch.isfinite(a16.grad.float()).all()
