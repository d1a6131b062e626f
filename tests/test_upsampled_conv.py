"""upsampled_conv3d: a decoder's resize + first convolution by slabs of planes, against the two stock ops."""

import pytest
import torch
import torch.nn.functional as F

from deepatlas_fast.model import CoordNet, _ConvBlock
from deepatlas_fast.upsampled_conv import Upsampled, slab_rows, upsampled_conv3d


def g(seed):
    return torch.Generator().manual_seed(seed)


def reference(h, weight, size, align_corners=True):
    return F.conv3d(F.interpolate(h, size=size, mode="trilinear", align_corners=align_corners), weight, padding=1)


CASES = [  # coarse grid, fine grid, planes per slab
    ((3, 4, 5), (5, 7, 9), 1),
    ((4, 4, 4), (7, 8, 7), 2),
    ((6, 5, 3), (11, 9, 6), 3),
    ((5, 5, 5), (5, 5, 5), 2),  # no resize at all
    ((2, 3, 2), (9, 5, 4), 4),
    ((4, 3, 3), (8, 6, 6), 5),  # a last slab thinner than the others
    ((3, 3, 3), (6, 5, 5), 6),  # one slab
    ((1, 2, 2), (3, 4, 4), 1),  # a single coarse plane
]


@pytest.mark.parametrize("coarse,fine,rows", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("align_corners", [True, False])
def test_matches_resize_then_convolution_forward_and_backward(coarse, fine, rows, channels_last, align_corners):
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    h = torch.randn(2, 3, *coarse, generator=g(1), dtype=torch.float64).contiguous(memory_format=layout)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g(2), dtype=torch.float64).contiguous(memory_format=layout)
    h.requires_grad_()
    weight.requires_grad_()
    expected = reference(h, weight, fine, align_corners)
    out = upsampled_conv3d(h, weight, fine, rows=rows, align_corners=align_corners)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(expected.shape, generator=g(3), dtype=torch.float64)
    for ours, theirs in zip(torch.autograd.grad(out, (h, weight), grad), torch.autograd.grad(expected, (h, weight), grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("align_corners", [True, False])
def test_gradcheck(rows, align_corners):
    h = torch.randn(1, 2, 3, 2, 3, generator=g(4), dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, 3, generator=g(5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: upsampled_conv3d(a, b, (5, 4, 5), rows=rows, align_corners=align_corners), (h, weight))


@pytest.mark.parametrize("need", ["h", "weight"])
def test_one_gradient_only(need):
    h = torch.randn(1, 2, 3, 3, 3, generator=g(6), dtype=torch.float64, requires_grad=need == "h")
    weight = torch.randn(3, 2, 3, 3, 3, generator=g(7), dtype=torch.float64, requires_grad=need == "weight")
    wanted = h if need == "h" else weight
    ours = torch.autograd.grad(upsampled_conv3d(h, weight, (6, 5, 5), rows=2).sum(), wanted)[0]
    theirs = torch.autograd.grad(reference(h, weight, (6, 5, 5)).sum(), wanted)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)


def test_saves_the_coarse_input_and_the_weight_only():
    """The point of it: what the backward holds is h and the weight, never the resized tensor."""
    h = torch.randn(2, 4, 6, 6, 6, generator=g(8), requires_grad=True)
    weight = torch.randn(2, 4, 3, 3, 3, generator=g(9), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        upsampled_conv3d(h, weight, (11, 11, 11), rows=3)
    assert sorted(saved) == sorted([h.numel(), weight.numel()])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        reference(h, weight, (11, 11, 11))
    assert max(saved) == 2 * 4 * 11**3  # (the stock pair holds the resized input)


def test_bfloat16_autocast_follows_the_stock_pair():
    """Under CPU autocast the convolution runs in bfloat16 as the stock pair's does; the resize is not rounded
    more than once (its weights stay float32)."""
    h = torch.randn(2, 8, 5, 6, 5, generator=g(10)).requires_grad_()
    weight = torch.randn(4, 8, 3, 3, 3, generator=g(11)).requires_grad_()
    size = (9, 11, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = upsampled_conv3d(h, weight, size, rows=3)
        theirs = reference(h, weight, size)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    exact = reference(h.double(), weight.double(), size)
    scale = exact.abs().max()
    assert (ours.double() - exact).abs().max() / scale < 2e-2
    assert (ours.double() - exact).abs().max() <= 1.5 * (theirs.double() - exact).abs().max() + 1e-3 * scale
    grads = [torch.autograd.grad(y.float().square().sum(), (h, weight)) for y in (ours, theirs)]
    for a, b in zip(*grads):
        assert (a - b).abs().max() / b.abs().max() < 3e-2
        assert a.dtype == b.dtype == torch.float32


def test_bad_inputs_name_the_argument():
    h = torch.randn(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="h must"):
        upsampled_conv3d(h[0], torch.randn(1, 2, 3, 3, 3), (5, 5, 5))
    with pytest.raises(ValueError, match="weight must"):
        upsampled_conv3d(h, torch.randn(1, 3, 3, 3, 3), (5, 5, 5))
    with pytest.raises(ValueError, match="weight must"):
        upsampled_conv3d(h, torch.randn(1, 2, 1, 1, 1), (5, 5, 5))
    with pytest.raises(ValueError, match="size must"):
        upsampled_conv3d(h, torch.randn(1, 2, 3, 3, 3), (5, 5))
    with pytest.raises(ValueError, match="rows must"):
        upsampled_conv3d(h, torch.randn(1, 2, 3, 3, 3), (5, 5, 5), rows=0)


def test_slab_rows():
    assert slab_rows(8) == 16 and slab_rows(64) == 16 and slab_rows(256) == 32 and slab_rows(257) == 33


def test_block_with_an_upsampled_part_equals_the_block_on_the_resized_tensor():
    block = _ConvBlock(4 + 3 + 2, 5).double()
    coarse = torch.randn(2, 4, 4, 5, 3, generator=g(12), dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 3, 7, 9, 6, generator=g(13), dtype=torch.float64, requires_grad=True)
    extra = torch.randn(2, 2, 7, 9, 6, generator=g(14), dtype=torch.float64, requires_grad=True)
    lazy = block(Upsampled(coarse, (7, 9, 6)), skip, extra)
    made = block(F.interpolate(coarse, size=(7, 9, 6), mode="trilinear", align_corners=True), skip, extra)
    torch.testing.assert_close(lazy, made, rtol=1e-12, atol=1e-12)
    inputs = [coarse, skip, extra] + list(block.parameters())
    for ours, theirs in zip(torch.autograd.grad(lazy.square().sum(), inputs), torch.autograd.grad(made.square().sum(), inputs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_coordnet_decoders_convolve_their_upsampled_input_by_slabs(monkeypatch):
    """The "corners" CoordNet hands its decoders the coarser features unmade; the result and every gradient
    are those of resizing them first (float64)."""
    import deepatlas_fast.model as model_module

    torch.manual_seed(0)
    net = CoordNet(base=4, levels=3).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g(15), dtype=p.dtype))
    x = torch.rand(1, 1, 19, 13, 11, generator=g(16), dtype=torch.float64)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return upsampled_conv3d(*args, rows=3, **kwargs)

    def outputs():
        net.zero_grad()
        out = net(x)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in net.parameters()]

    monkeypatch.setattr(model_module, "upsampled_conv3d", counted)
    slabs = outputs()
    assert calls == [(10, 7, 6), (19, 13, 11)]
    monkeypatch.setattr(model_module, "upsampled_conv3d", lambda h, w, size, **_: reference(h, w, size))
    whole = outputs()
    for a, b in zip(slabs, whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (cuDNN convolutions, CUDA autocast)")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_resize_then_convolution(channels_last, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # both sides in float32 proper
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    h = torch.randn(2, 16, 33, 40, 36, generator=g(17)).cuda().contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(8, 16, 3, 3, 3, generator=g(18)).cuda().contiguous(memory_format=layout).requires_grad_()
    size = (65, 80, 71)
    ours, theirs = upsampled_conv3d(h, weight, size), reference(h, weight, size)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    grad = torch.randn(theirs.shape, generator=g(19)).cuda()
    for a, b in zip(torch.autograd.grad(ours, (h, weight), grad), torch.autograd.grad(theirs, (h, weight), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low, stock = upsampled_conv3d(h.bfloat16(), weight, size), reference(h.bfloat16(), weight, size)
    assert low.dtype == stock.dtype == torch.bfloat16
    assert (low.float() - theirs).abs().max() <= 1.5 * (stock.float() - theirs).abs().max() + 1e-3 * theirs.abs().max()
    assert torch.autograd.grad(low.float().sum(), weight)[0].dtype == torch.float32


def test_feature_encoder_equals_its_concatenated_formula():
    """FeatureNet.encode = code(cat([fine, resize(coarse)])) (align_corners=False), made without either."""
    from deepatlas_fast.model import FeatureNet

    torch.manual_seed(0)
    net = FeatureNet(features=3, width=4).double()
    x = torch.rand(2, 1, 9, 12, 11, generator=g(20), dtype=torch.float64)

    def concatenated(x):
        fine = net.fine(x)
        coarse = F.interpolate(net.coarse(fine), size=x.shape[2:], mode="trilinear", align_corners=False)
        return net.code(torch.cat([fine, coarse], dim=1))

    ours, theirs = net.encode(x), concatenated(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    params = list(net.fine.parameters()) + list(net.coarse.parameters()) + list(net.code.parameters())
    for a, b in zip(torch.autograd.grad(ours.square().sum(), params), torch.autograd.grad(theirs.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_benchmark_script_runs_on_the_cpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "upsampled_conv_bench.py"), "--device", "cpu", "--side", "9",
         "--cin", "4", "--cout", "2", "--reps", "1"],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "| fp32 | resize + conv3d |" in proc.stdout and "| bf16 | slabs 2 |" in proc.stdout
