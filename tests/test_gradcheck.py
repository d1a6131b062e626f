"""float64 gradcheck of every op: through the public ops (custom op + backend backward) and on the
reference functions themselves."""

import pytest
import torch
from torch.autograd import gradcheck

import deepatlas_fast as da
from deepatlas_fast import reference
from helpers import covering_map, g, rand_coords, smooth_displacement


@pytest.mark.parametrize("impl", [da.sample, reference.sample], ids=["op", "reference"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_sample(impl, padding):
    vol = torch.randn(2, 2, 4, 5, 3, generator=g(0), dtype=torch.float64, requires_grad=True)
    coords = rand_coords(2, (3, 2, 4), g(1), spread=1.2, borders=False).requires_grad_()
    assert gradcheck(lambda v, c: impl(v, c, padding), (vol, coords))
    assert gradcheck(lambda c: impl(vol.detach(), c, padding), (coords,))


@pytest.mark.parametrize("impl", [da.warp, reference.warp], ids=["op", "reference"])
def test_warp(impl):
    vol = torch.randn(1, 2, 4, 5, 3, generator=g(2), dtype=torch.float64, requires_grad=True)
    disp = rand_coords(1, (3, 4, 3), g(3), spread=0.4, borders=False).requires_grad_()
    assert gradcheck(lambda v, d: impl(v, d, "zeros"), (vol, disp))


@pytest.mark.parametrize("impl", [da.lncc, reference.lncc], ids=["op", "reference"])
@pytest.mark.parametrize("kernel,reduction", [("box", "mean"), ("gaussian", "none")])
def test_lncc(impl, kernel, reduction):
    a = torch.randn(1, 2, 5, 4, 6, generator=g(4), dtype=torch.float64, requires_grad=True)
    b = (0.5 * a.detach() + torch.randn(1, 2, 5, 4, 6, generator=g(5), dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda x, y: impl(x, y, 3, kernel, 1e-5, reduction), (a, b))


@pytest.mark.parametrize("impl", [da.jacobian_det, reference.jacobian_det], ids=["op", "reference"])
def test_jacobian_det(impl):
    field = torch.randn(2, 3, 3, 4, 2, generator=g(6), dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda f: impl(f, [1.0, -2.0, 0.5]), (field,))


@pytest.mark.parametrize("normalized", [False, True])
def test_jacobian_var(normalized):
    field = torch.randn(2, 3, 4, 3, 5, generator=g(7), dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda f: da.jacobian_var(f, None, normalized), (field,))
    assert gradcheck(lambda f: reference.jacobian_var(f, None, normalized)[0], (field,))


@pytest.mark.parametrize("impl", [da.invert, reference.invert], ids=["op", "reference"])
def test_invert(impl):
    coords = covering_map((5, 6, 4), g(8), batch=2).requires_grad_()

    def inverse(c):
        out, valid = impl(c, (4, 5, 4), 16, 0.05)
        assert valid.all()
        return out

    assert gradcheck(inverse, (coords,), atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("impl", [da.invert_displacement, reference.invert_displacement], ids=["op", "reference"])
def test_invert_displacement(impl):
    disp = smooth_displacement((5, 4, 6), g(9), 0.1, batch=2).requires_grad_()
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))

    def inverse(d):
        out, valid = impl(d, 16, 0.05)
        assert valid[interior].all()
        return out[interior]

    assert gradcheck(inverse, (disp,), atol=1e-6, rtol=1e-5, fast_mode=True)
