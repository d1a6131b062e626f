"""The triton backend of lncc against the reference backend (the oracle), forward and backward.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1 and poisons kernel
outputs with NaN); on CUDA the same tests run the compiled kernels. The interpreter's cost grows with
the number of planes times programs, so volumes keep D small.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from conftest import DEVICES
from deepatlas_fast.kernels import similarity as kernels
from deepatlas_fast.reference import similarity as reference
from helpers import g

NEEDS = [(True, True), (True, False), (False, True)]
KERNELS = ["box", "gaussian"]


def pair(shape, seed, dtype=torch.float64, device="cpu", offset=0.0):
    """Correlated random images (a, b)."""
    gen = g(seed)
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    b = 0.6 * a + torch.randn(*shape, generator=gen, dtype=torch.float64) + 0.5
    return (a + offset).to(device, dtype), (b + offset).to(device, dtype)


def upstream(reduction, shape, seed, dtype, device):
    """A random upstream gradient: a scalar for "mean", a map for "none"."""
    size = () if reduction == "mean" else shape
    return (torch.randn(size, generator=g(seed), dtype=torch.float64) + 0.5).to(device, dtype)


def assert_close(ours, expected, rel):
    """Relative to the largest magnitude of ``expected`` (at least 1)."""
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(ours, expected, rtol=rel, atol=rel * scale)


def check(a, b, k, kernel, reduction, needs=NEEDS, rel=1e-9, seed=0, eps=1e-5):
    """Forward and the requested gradients of the triton backend against the reference on the
    same inputs (float64 reference for float32 inputs, so that only our rounding is measured)."""
    oracle = torch.float64
    ours = kernels.lncc(a, b, k, kernel, eps, reduction)
    expected = reference.lncc(a.to(oracle), b.to(oracle), k, kernel, eps, reduction)
    assert ours.dtype == reference.lncc(a, b, k, kernel, eps, reduction).dtype
    assert_close(ours.to(oracle), expected, rel)
    grad = upstream(reduction, a.shape, seed, ours.dtype, a.device)
    for need in needs:
        got = kernels.lncc_backward(grad, a, b, k, kernel, eps, reduction, *need)
        want = reference.lncc_backward(grad.to(oracle), a.to(oracle), b.to(oracle), k, kernel, eps, reduction, *need)
        assert len(got) == sum(need)
        for x, y in zip(got, want):
            assert x.dtype == a.dtype
            assert_close(x.to(oracle), y, rel)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10)
@given(d=st.integers(1, 5), h=st.integers(1, 17), w=st.integers(1, 17), n=st.integers(1, 2), c=st.integers(1, 2),
       k=st.sampled_from([1, 3, 5, 9]), kernel=st.sampled_from(KERNELS), reduction=st.sampled_from(["mean", "none"]),
       seed=st.integers(0, 2**31 - 1))
def test_float64_forward_and_gradients_match_reference(device, d, h, w, n, c, k, kernel, reduction, seed):
    a, b = pair((n, c, d, h, w), seed, device=device)
    check(a, b, k, kernel, reduction, needs=[NEEDS[seed % 3]], seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_21_taps_on_a_volume_smaller_than_the_window(device, kernel):
    a, b = pair((1, 2, 3, 24, 13), 1, device=device)
    check(a, b, 21, kernel, "none", needs=[(True, True)], seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_within_1e5_of_float64(device, reduction):
    a, b = pair((2, 1, 4, 11, 13), 2, torch.float32, device)
    check(a, b, 5, "gaussian", reduction, rel=1e-5, seed=2)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_accurate_on_bright_images(device):
    """a + 1000: the shifted-frame sums stay accurate where the plain float32 formula cancels
    (in windows away from the zero padding, whose variance is large)."""
    a, b = pair((1, 1, 4, 12, 12), 3, torch.float32, device, offset=1000.0)
    exact = reference.lncc(a.double(), b.double(), 3, "box", reduction="none")
    ours = kernels.lncc(a, b, 3, "box", 1e-5, "none")
    plain = reference.lncc(a, b, 3, "box", reduction="none")
    ours_error = (ours.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    assert ours_error < 1e-5 and plain_error > 100 * ours_error
    check(a, b, 3, "box", "mean", needs=[(True, True)], rel=1e-5, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_flat_images_are_finite_and_match_reference(device, kernel):
    shape = (1, 1, 5, 10, 9)
    textured = torch.randn(shape, generator=g(4)).to(device)
    for a, b in [
        (torch.full(shape, 3.0, device=device), torch.full(shape, -2.0, device=device)),
        (torch.zeros(shape, device=device), torch.zeros(shape, device=device)),
        (torch.zeros(shape, device=device), textured),
        (textured, torch.full(shape, 7.0, device=device)),
    ]:
        check(a, b, 5, kernel, "none", needs=[(True, True)], rel=1e-5)
    # nearly flat: some window variances fall below eps (the floor's gradient is 0) while ncc is not 0
    faint = 6e-4 * torch.randn(shape, generator=g(5), dtype=torch.float64).to(device)
    check(faint, textured.double(), 5, kernel, "none", needs=[(True, True)])
    # constant bright images (CT air): finite everywhere, exactly 0 inside
    for dtype in (torch.float32, torch.float64):
        air = torch.full(shape, -1000.0, dtype=dtype, device=device)
        ncc = kernels.lncc(air, air + 1, 5, kernel, 1e-5, "none")
        assert torch.isfinite(ncc).all() and (ncc[..., 2:-2, 2:-2, 2:-2] == 0).all()
        for x in kernels.lncc_backward(torch.ones_like(ncc), air, air + 1, 5, kernel, 1e-5, "none", True, True):
            assert torch.isfinite(x).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(device, dtype):
    a, b = pair((1, 2, 3, 9, 10), 5, dtype, device)
    loss = kernels.lncc(a, b, 5, "box", 1e-5, "mean")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kernels.lncc(a.float(), b.float(), 5, "box", 1e-5, "mean"), rtol=1e-6, atol=1e-7)
    check(a, b, 5, "box", "none", needs=[(True, True)], rel=1e-2)  # gradients rounded to half


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_geometry_and_chunked_backward(device, monkeypatch):
    """The compiled-GPU launch geometry (32^2 regions, several tiles per plane, one plane per
    program) and a backward split into z-chunks whose adjoint halos overlap."""
    monkeypatch.setattr(kernels, "block", lambda gpu, interpret: gpu)
    monkeypatch.setattr(kernels, "MIN_CHUNK", 2)
    monkeypatch.setattr(kernels, "ALPHA_VOLUMES", 0)
    plan = kernels._Plan((1, 1, 5, 33, 31), 3)
    assert (plan.rh, plan.n_ty, plan.n_tx) == (32, 2, 2) and plan.runs(5)[1] == (4, 5, 1)
    a, b = pair((1, 1, 5, 33, 31), 6, device=device)
    check(a, b, 3, "gaussian", "none", needs=[(True, True)], seed=6)


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_routes_forward_and_autograd_to_triton(device):
    a, b = pair((2, 2, 3, 7, 6), 7, device=device)
    results = []
    for name in ("triton", "reference"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        with da.use_backend(name):
            loss = da.lncc(x, y, 3, "gaussian")
            loss.backward()
        results.append((loss, x.grad, y.grad))
    for ours, expected in zip(*results):
        assert_close(ours, expected, 1e-9)


def test_window_parameters_are_the_reference_taps():
    for k in (1, 5, 21):
        for kernel in KERNELS:
            for dtype in (torch.float32, torch.float64):
                prm = kernels.params(k, kernel, 1e-5, dtype, "cpu")
                taps = reference.window_weights(k, kernel, dtype=dtype)
                assert torch.equal(prm[:k], taps)
                assert prm[k] == taps.sum() ** 3 and prm[k + 1] == torch.tensor(1e-5, dtype=dtype)


def test_no_gradient_requested_returns_nothing():
    a, b = pair((1, 1, 2, 3, 4), 8)
    assert kernels.lncc_backward(torch.tensor(1.0, dtype=a.dtype), a, b, 3, "box", 1e-5, "mean", False, False) == []
