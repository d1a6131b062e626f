"""torch.library registration: opcheck, torch.compile(fullgraph=True), TorchScript."""

import pytest
import torch

import deepatlas_fast as da
from helpers import covering_map, g, rand_coords, smooth_displacement

ops = torch.ops.deepatlas_fast


def cases():
    vol = torch.randn(2, 3, 5, 6, 4, generator=g(0), requires_grad=True)
    coords = rand_coords(2, (3, 4, 5), g(1), dtype=torch.float32).requires_grad_()
    a = torch.randn(1, 2, 6, 5, 7, generator=g(2), requires_grad=True)
    b = torch.randn(1, 2, 6, 5, 7, generator=g(3), requires_grad=True)
    field = torch.randn(2, 3, 4, 5, 3, generator=g(4), requires_grad=True)
    cover = covering_map((6, 5, 7), g(5), dtype=torch.float32).requires_grad_()
    disp = smooth_displacement((5, 6, 4), g(6), 0.1, dtype=torch.float32).requires_grad_()
    grad_vol_out = torch.randn(2, 3, 3, 4, 5, generator=g(7))
    return {
        "sample": (ops.sample.default, (vol, coords, "border")),
        "sample_zeros": (ops.sample.default, (vol, coords, "zeros")),
        "sample_backward": (ops.sample_backward.default, (grad_vol_out, vol.detach(), coords.detach(), "zeros", True, True, "reference")),
        "sample_backward_coords_only": (
            ops.sample_backward.default, (grad_vol_out, vol.detach(), coords.detach(), "border", False, True, "reference")
        ),
        "warp": (ops.warp.default, (vol, coords * 0.3, "zeros")),
        "lncc_mean": (ops.lncc.default, (a, b, 3, "box", 1e-5, "mean")),
        "lncc_none": (ops.lncc.default, (a, b, 5, "gaussian", 1e-5, "none")),
        "jacobian_det": (ops.jacobian_det.default, (field, [1.0, 2.0, 3.0])),
        "jacobian_det_noscale": (ops.jacobian_det.default, (field, None)),
        "jacobian_var": (ops.jacobian_var.default, (field, None, True)),
        "invert": (ops.invert.default, (cover, [5, 4, 6], 8, 0.05)),
        "invert_displacement": (ops.invert_displacement.default, (disp, 8, 0.05)),
        "warp_backward": (ops.warp_backward.default, (grad_vol_out, vol.detach(), 0.3 * coords.detach(), "border", True, True, "reference")),
        "lncc_backward": (ops.lncc_backward.default, (torch.tensor(1.0), a.detach(), b.detach(), 3, "box", 1e-5, "mean", True, True, "reference")),
        "jacobian_det_backward": (ops.jacobian_det_backward.default, (torch.randn(2, 1, 4, 5, 3, generator=g(8)), field.detach(), None, "reference")),
        "jacobian_var_backward": (ops.jacobian_var_backward.default, (torch.tensor(1.0), field.detach(), ops.jacobian_var(field.detach(), [1.0, 2.0, 3.0], False)[2], [1.0, 2.0, 3.0], False, "reference")),
        "invert_backward": (ops.invert_backward.default, (torch.randn(1, 3, 5, 4, 6, generator=g(9)), cover.detach(), *ops.invert(cover.detach(), [5, 4, 6], 8, 0.05), "reference")),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_opcheck(name):
    op, args = cases()[name]
    torch.library.opcheck(op, args)


def all_ops_loss(vol, coords, disp, features):
    """A DeepATLAS-shaped function that calls every op."""
    warped = da.sample(vol, coords)
    moved = da.warp(vol, disp, "zeros")
    similarity = da.lncc(warped, moved, 5) + da.lncc(features, warped.expand_as(features), 3, "gaussian")
    regulariser = da.jacobian_var(coords, normalized=True) + da.jacobian_det(coords).mean()
    inverse, valid = da.invert(coords, (6, 7, 5))
    inv_disp, valid_disp = da.invert_displacement(disp)
    round_trip = da.sample(coords, inverse) * valid
    return similarity + regulariser + round_trip.mean() + (inv_disp * valid_disp).mean()


def all_ops_inputs():
    vol = torch.randn(1, 1, 9, 8, 10, generator=g(10))
    coords = covering_map((7, 8, 6), g(11), dtype=torch.float32).requires_grad_()
    disp = smooth_displacement((7, 8, 6), g(12), 0.1, dtype=torch.float32).requires_grad_()
    features = torch.randn(1, 2, 7, 8, 6, generator=g(13), requires_grad=True)
    return vol, coords, disp, features


@pytest.mark.slow
def test_torch_compile_fullgraph_calls_every_op():
    torch._dynamo.reset()
    eager_inputs = all_ops_inputs()
    compiled_inputs = all_ops_inputs()
    expected = all_ops_loss(*eager_inputs)
    expected.backward()
    compiled = torch.compile(all_ops_loss, fullgraph=True)
    got = compiled(*compiled_inputs)
    got.backward()
    torch.testing.assert_close(got, expected)
    for x, y in zip(compiled_inputs[1:], eager_inputs[1:]):
        torch.testing.assert_close(x.grad, y.grad)


def test_torch_export_captures_the_ops():
    class Register(torch.nn.Module):
        def forward(self, vol, coords):
            return da.lncc(vol, da.sample(vol, coords), 3) + da.jacobian_var(coords)

    vol = torch.randn(1, 1, 6, 6, 6, generator=g(16))
    coords = rand_coords(1, (6, 6, 6), g(17), dtype=torch.float32, spread=0.9)
    exported = torch.export.export(Register(), (vol, coords))
    called = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert ops.sample.default in called and ops.lncc.default in called
    torch.testing.assert_close(exported.module()(vol, coords), Register()(vol, coords))


def test_torchscript_can_call_the_ops():
    @torch.jit.script
    def scripted(vol: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return torch.ops.deepatlas_fast.sample(vol, coords, "border").sum() + torch.ops.deepatlas_fast.lncc(
            vol, vol, 3, "box", 1e-5, "mean"
        )

    vol = torch.randn(1, 1, 5, 5, 5, generator=g(14))
    coords = rand_coords(1, (5, 5, 5), g(15), dtype=torch.float32)
    torch.testing.assert_close(scripted(vol, coords), da.sample(vol, coords).sum() + da.lncc(vol, vol, 3))


def _run_all_ops(fast: bool, monkeypatch):
    from deepatlas_fast.ops import _common

    monkeypatch.setattr(_common, "EAGER_FAST_PATH", fast)
    calls = []
    forward = _common._EagerFunction.forward
    monkeypatch.setattr(_common._EagerFunction, "forward",
                        staticmethod(lambda ctx, op, *inputs: calls.append(op.name) or forward(ctx, op, *inputs)))
    inputs = all_ops_inputs()
    loss = all_ops_loss(*inputs)
    loss.backward()
    return loss.detach(), [x.grad for x in inputs[1:]], calls


def test_eager_path_runs_the_same_kernels_as_the_registered_ops(monkeypatch):
    """A plain eager call runs each op through one autograd.Function (less Python per call) with the
    custom op's own forward, setup, gradient formula and backward: the same bits as the registered op."""
    fast, fast_grads, fast_calls = _run_all_ops(True, monkeypatch)
    slow, slow_grads, slow_calls = _run_all_ops(False, monkeypatch)
    assert sorted(set(fast_calls)) == ["invert", "invert_displacement", "jacobian_det", "jacobian_var", "lncc",
                                       "sample", "warp"]
    assert slow_calls == []
    assert torch.equal(fast, slow)
    for x, y in zip(fast_grads, slow_grads):
        assert torch.equal(x, y)


def test_dispatch_modes_and_no_grad_calls_see_the_registered_ops():
    """Under a dispatch mode (as fake tensors, export and debugging tools install) the custom op runs, so
    the mode sees deepatlas_fast ops; without gradients the eager path calls the forward kernel alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    vol = torch.randn(1, 1, 5, 5, 5, generator=g(18))
    coords = rand_coords(1, (4, 5, 3), g(19), dtype=torch.float32).requires_grad_()
    expected = da.sample(vol, coords)
    with Record() as mode:
        got = da.sample(vol, coords)
        got.sum().backward()
    assert "deepatlas_fast.sample.default" in mode.seen and "deepatlas_fast.sample_backward.default" in mode.seen
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(da.sample(vol, coords), expected)
    assert not da.sample(vol, coords.detach()).requires_grad


def test_torch_func_grad_differentiates_the_ops():
    """torch.func.grad (functional autograd) runs through the eager path's autograd.Function and gives the
    gradients of ordinary autograd."""
    vol = torch.randn(1, 2, 6, 5, 7, generator=g(23), dtype=torch.float64)
    coords = covering_map((5, 6, 4), g(24))

    def loss(c):
        warped = da.sample(vol, c)
        return da.lncc(warped, warped.flip(2), 3) + da.jacobian_var(c) + da.invert(c, (4, 5, 6))[0].square().mean()

    got = torch.func.grad(loss)(coords)
    leaf = coords.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(got, expected)
