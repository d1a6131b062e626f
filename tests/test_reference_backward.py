"""The explicit backward passes of the reference (what kernels implement) against autograd
through the differentiable reference forwards, on random sizes, borders and flat regions."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from deepatlas_fast import reference
from helpers import covering_map, rand_coords

size = st.integers(1, 17)
size2 = st.integers(2, 17)


def autograd_grads(fn, inputs, needs, grad):
    leaves = [x.detach().clone().requires_grad_(need) for x, need in zip(inputs, needs)]
    out = fn(*leaves)
    wanted = [leaf for leaf, need in zip(leaves, needs) if need]
    return list(torch.autograd.grad(out, wanted, grad)) if wanted else []


def assert_grads_close(ours, theirs):
    assert len(ours) == len(theirs)
    for x, y in zip(ours, theirs):
        scale = y.abs().max().item()
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10 * max(scale, 1.0))


@given(src=st.tuples(size, size, size), dst=st.tuples(size, size, size), seed=st.integers(0, 2**31 - 1),
       padding=st.sampled_from(["border", "zeros"]), needs=st.sampled_from([(True, True), (False, True), (True, False)]))
def test_sample_backward(src, dst, seed, padding, needs):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(2, 2, *src, generator=g, dtype=torch.float64)
    coords = rand_coords(2, dst, g)
    grad = torch.randn(2, 2, *dst, generator=g, dtype=torch.float64)
    ours = reference.sample_backward(grad, vol, coords, padding, *needs)
    theirs = autograd_grads(lambda v, c: reference.sample(v, c, padding), (vol, coords), needs, grad)
    assert_grads_close(ours, theirs)


@given(dst=st.tuples(size, size, size), seed=st.integers(0, 2**31 - 1))
def test_warp_backward(dst, seed):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(1, 3, 6, 5, 7, generator=g, dtype=torch.float64)
    disp = rand_coords(1, dst, g, spread=0.5)
    grad = torch.randn(1, 3, *dst, generator=g, dtype=torch.float64)
    ours = reference.warp_backward(grad, vol, disp, "zeros", True, True)
    theirs = autograd_grads(lambda v, d: reference.warp(v, d, "zeros"), (vol, disp), (True, True), grad)
    assert_grads_close(ours, theirs)


@given(shape=st.tuples(size, size, size), seed=st.integers(0, 2**31 - 1), kernel_size=st.sampled_from([1, 3, 5, 9]),
       kernel=st.sampled_from(["box", "gaussian"]), reduction=st.sampled_from(["mean", "none"]),
       needs=st.sampled_from([(True, True), (False, True), (True, False)]), flat=st.booleans())
def test_lncc_backward(shape, seed, kernel_size, kernel, reduction, needs, flat):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 2, *shape, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(2, 2, *shape, generator=g, dtype=torch.float64)
    if flat:  # a flat block exercises the variance floor
        a[..., : shape[0] // 2 + 1, :, :] = 3.0
    grad = torch.randn(() if reduction == "mean" else a.shape, generator=g, dtype=torch.float64)
    ours = reference.lncc_backward(grad, a, b, kernel_size, kernel, 1e-5, reduction, *needs)
    fn = lambda x, y: reference.lncc(x, y, kernel_size, kernel, 1e-5, reduction)  # noqa: E731
    theirs = autograd_grads(fn, (a, b), needs, grad)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9 * max(y.abs().max().item(), 1.0))


@given(shape=st.tuples(size2, size2, size2), seed=st.integers(0, 2**31 - 1), with_scale=st.booleans())
def test_jacobian_det_backward(shape, seed, with_scale):
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    scale = [0.5, -2.0, 1.5] if with_scale else None
    grad = torch.randn(2, 1, *shape, generator=g, dtype=torch.float64)
    ours = [reference.jacobian_det_backward(grad, field, scale)]
    theirs = autograd_grads(lambda f: reference.jacobian_det(f, scale), (field,), (True,), grad)
    assert_grads_close(ours, theirs)


@given(shape=st.tuples(size2, size2, size2), seed=st.integers(0, 2**31 - 1), normalized=st.booleans())
def test_jacobian_var_backward(shape, seed, normalized):
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(3, 3, *shape, generator=g, dtype=torch.float64)
    grad = torch.randn((), generator=g, dtype=torch.float64)
    ours = [reference.jacobian_var_backward(grad, field, None, normalized)]
    theirs = autograd_grads(lambda f: reference.jacobian_var(f, None, normalized)[0], (field,), (True,), grad)
    assert_grads_close(ours, theirs)


def test_invert_backward_is_the_implicit_gradient_of_the_residual():
    # At the solution, coords(p*) = u, so d/dcoords [sum lambda . coords(p)] at fixed p, pulled back
    # through J^-T, must equal the gradient of the inverse: check against the linearised solve.
    g = torch.Generator().manual_seed(3)
    coords = covering_map((6, 5, 7), g)
    inverse, valid = reference.invert(coords, (5, 6, 4), 16)
    assert valid.all()
    grad = torch.randn(inverse.shape, generator=g, dtype=torch.float64)
    ours = reference.invert_backward(grad, coords, inverse, valid)
    direction = torch.randn(coords.shape, generator=g, dtype=torch.float64)
    step = 1e-6
    plus, _ = reference.invert(coords + step * direction, (5, 6, 4), 16)
    minus, _ = reference.invert(coords - step * direction, (5, 6, 4), 16)
    numeric = ((plus - minus) / (2 * step) * grad).sum()
    torch.testing.assert_close((ours * direction).sum(), numeric, rtol=1e-6, atol=1e-9)
