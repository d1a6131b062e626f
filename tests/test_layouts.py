"""Every op gives the same result for non-contiguous / channels-last inputs as for contiguous ones,
and the same on every available device as on the CPU."""

import pytest
import torch

import deepatlas_fast as da
from conftest import DEVICES
from helpers import covering_map, g, rand_coords, smooth_displacement


def strided(x):
    """The same values as ``x`` in a non-contiguous layout."""
    wide = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    assert not wide.is_contiguous()
    return wide


def op_cases():
    vol = torch.randn(2, 3, 7, 6, 8, generator=g(0))
    coords = rand_coords(2, (5, 6, 4), g(1), dtype=torch.float32)
    field = torch.randn(2, 3, 5, 6, 4, generator=g(2))
    cover = covering_map((6, 5, 7), g(3), dtype=torch.float32)
    disp = smooth_displacement((6, 7, 5), g(4), 0.1, dtype=torch.float32)
    return {
        "sample": (lambda v, c: da.sample(v, c, "zeros"), (vol, coords)),
        "warp": (lambda v, d: da.warp(v, d), (vol, 0.3 * coords)),
        "lncc": (lambda a, b: da.lncc(a, b, 5, "gaussian"), (vol, vol.flip(2).contiguous())),
        "jacobian_det": (lambda f: da.jacobian_det(f, [2.0, 1.0, 3.0]), (field,)),
        "jacobian_var": (lambda f: da.jacobian_var(f, normalized=True), (field,)),
        "invert": (lambda c: da.invert(c, (5, 6, 4))[0], (cover,)),
        "invert_displacement": (lambda d: da.invert_displacement(d)[0], (disp,)),
    }


def run(fn, inputs):
    leaves = [x.detach().requires_grad_() for x in inputs]  # fresh leaves, layout kept
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("name", list(op_cases()))
@pytest.mark.parametrize("layout", ["strided", "channels_last"])
def test_layout_does_not_change_results(name, layout):
    fn, inputs = op_cases()[name]
    expected, expected_grads = run(fn, inputs)
    if layout == "strided":
        others = [strided(x) for x in inputs]
    else:
        others = [x.contiguous(memory_format=torch.channels_last_3d) for x in inputs]
    out, grads = run(fn, others)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for x, y in zip(grads, expected_grads):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(op_cases()))
def test_every_device_matches_cpu(device, name):
    fn, inputs = op_cases()[name]
    expected, expected_grads = run(fn, inputs)
    out, grads = run(fn, [x.to(device) for x in inputs])
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
    for x, y in zip(grads, expected_grads):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-4)
