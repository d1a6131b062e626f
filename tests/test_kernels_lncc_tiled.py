"""lncc_tiled (include/deepatlas_fast/lncc_tile.h) against the reference: the tile algorithm of the CUDA
kernels (cuda/lncc_tiled.cu), which the CPU runs serially (cpu/lncc_tiled.cpp) so that these tests check the
GPU's code on a machine without one. On a GPU the same tests run the CUDA kernels, and the public API's
switch to them (DEEPATLAS_FAST_CUDA_LNCC=tiled) is tested too.

Sizes cover partial tiles (tiles are 16 x 32 in-plane), several runs of planes per unit (16 planes) and
several backward chunks and channel groups (forced by a small scratch budget), windows from 1 to 31 taps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.ops import _cpp
from deepatlas_fast.reference import similarity as reference
from conftest import skip_if_cpp_errors_kill_cuda_processes
from helpers import g

OP = "lncc"
NEEDS = [(True, True), (True, False), (False, True)]


@pytest.fixture
def device(cpp_device):
    """The CPU emulation, and the CUDA kernels where a GPU is."""
    return cpp_device


def ops():
    return torch.ops.deepatlas_fast_C


def pair(shape, seed, dtype=torch.float64, device="cpu", offset=0.0):
    gen = g(seed)
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    b = 0.6 * a + torch.randn(*shape, generator=gen, dtype=torch.float64) + 0.5
    return (a + offset).to(device, dtype), (b + offset).to(device, dtype)


def check(a, b, k, kernel, reduction, seed, rel, needs=NEEDS, eps=1e-5):
    """Forward and every requested backward of lncc_tiled against the float64 reference."""
    a64, b64 = a.double().cpu(), b.double().cpu()
    out = ops().lncc_tiled(a, b, k, kernel, eps, reduction)
    expected = reference.lncc(a64, b64, k, kernel, eps, reduction)
    assert out.dtype == a.dtype and out.shape == expected.shape and out.device == a.device
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=rel, atol=rel * scale)
    grad64 = torch.randn(expected.shape, generator=g(seed), dtype=torch.float64) + 0.5
    for need_a, need_b in needs:
        ours = ops().lncc_tiled_backward(grad64.to(a.device, a.dtype), a, b, k, kernel, eps, reduction, need_a,
                                         need_b)
        theirs = reference.lncc_backward(grad64, a64, b64, k, kernel, eps, reduction, need_a, need_b)
        theirs = [t for t in theirs if t is not None]
        assert len(ours) == len(theirs) == int(need_a) + int(need_b)
        for x, y in zip(ours, theirs):
            scale = max(y.abs().max().item(), 1.0)
            torch.testing.assert_close(x.double().cpu(), y, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("k,kernel", [(1, "box"), (3, "gaussian"), (9, "box"), (9, "gaussian"), (31, "box")])
def test_matches_reference_float64(device, k, kernel, reduction):
    """D = 37: three runs of planes; 37 x 40 in-plane: partial tiles along both axes."""
    a, b = pair((1, 2, 37, 19, 40), k, device=device)
    check(a, b, k, kernel, reduction, seed=k, rel=1e-9)


@settings(max_examples=15)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 20), st.integers(1, 35),
                    st.integers(1, 40)),
    k=st.sampled_from([1, 3, 5, 7, 9, 11]),
    kernel=st.sampled_from(["box", "gaussian"]),
    reduction=st.sampled_from(["mean", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_many_shapes(device, shape, k, kernel, reduction, seed):
    """Sizes from 1 voxel (windows wider than the volume) to more than a tile, both dtypes."""
    a, b = pair(shape, seed, device=device)
    check(a, b, k, kernel, reduction, seed, rel=1e-9, needs=[NEEDS[seed % 3]])
    check(a.float(), b.float(), k, kernel, reduction, seed, rel=2e-4, needs=[NEEDS[(seed + 1) % 3]])


SCRATCH = "DEEPATLAS_FAST_LNCC_SCRATCH_ELEMENTS"  # lncc_host.h's scratch budget, overridden


def test_backward_in_several_chunks(device, monkeypatch):
    """D = 60 with both gradients (5 adjoint maps), a scratch budget of 32 planes of the 5 maps: chunks of
    24 output planes with halos of 4."""
    a, b = pair((1, 1, 60, 9, 12), 3, device=device)
    monkeypatch.setenv(SCRATCH, str(5 * 32 * 9 * 12))
    check(a, b, 9, "box", "none", seed=3, rel=1e-9, needs=[(True, True)])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_in_channel_groups(device, monkeypatch, reduction):
    """2 x 3 channels, a budget of 4 whole channels of the adjoint maps: groups of 4 and 2 channels (each
    with its own shifts, upstream gradient and outputs), whole depth; then 1 channel at a time in chunks."""
    a, b = pair((2, 3, 13, 10, 17), 8, device=device)
    bright = torch.tensor([0.0, 1000.0, -500.0], dtype=a.dtype, device=device).view(1, 3, 1, 1, 1)
    a32, b32 = (a + bright).float(), (b + bright).float()  # each channel needs its own shifts in float32
    for budget in (4 * 5 * 13 * 10 * 17, 5 * 10 * 10 * 17):
        monkeypatch.setenv(SCRATCH, str(budget))
        check(a, b, 5, "gaussian", reduction, seed=8, rel=1e-9)
        check(a32, b32, 5, "gaussian", reduction, seed=8, rel=1e-4)


@pytest.mark.parametrize("k,kernel", [(3, "box"), (9, "gaussian"), (13, "box")])
def test_one_and_two_planes_per_step_agree_bitwise(device, monkeypatch, k, kernel):
    """DEEPATLAS_FAST_LNCC_Z_PLANES=1 (one output plane per step of the tile) and the default two (the planes of
    a step share their input loads) add the same taps in the same order: bitwise equal, forward and both
    gradients, with runs of planes of odd length (D = 21: runs of 16 and 5). k = 13 takes the generic path,
    one plane either way."""
    for dtype in (torch.float32, torch.float64):
        a, b = pair((1, 2, 21, 19, 40), k, dtype=dtype, device=device)
        grad = torch.randn(a.shape, generator=g(k), dtype=dtype).to(device)
        results = {}
        for planes in ("1", "2"):
            monkeypatch.setenv("DEEPATLAS_FAST_LNCC_Z_PLANES", planes)
            results[planes] = [ops().lncc_tiled(a, b, k, kernel, 1e-5, "none"),
                               *ops().lncc_tiled_backward(grad, a, b, k, kernel, 1e-5, "none", True, True)]
        for one, two in zip(results["1"], results["2"]):
            assert torch.equal(one, two)
    monkeypatch.setenv("DEEPATLAS_FAST_LNCC_Z_PLANES", "3")
    with pytest.raises(RuntimeError, match="DEEPATLAS_FAST_LNCC_Z_PLANES must be 1 or 2"):
        ops().lncc_tiled(a, b, 9, kernel, 1e-5, "none")


def test_scratch_budget_must_be_positive(device, monkeypatch):
    a, b = pair((1, 1, 5, 6, 7), 9, device=device)
    monkeypatch.setenv(SCRATCH, "lots")
    with pytest.raises(RuntimeError, match=SCRATCH):
        ops().lncc_tiled_backward(torch.ones_like(a), a, b, 3, "box", 1e-5, "none", True, True)


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_bright_images_float32(device, kernel):
    """a + 1000: the per-channel shift keeps float32 sums accurate, sliding over runs of 16 planes too."""
    a, b = pair((1, 2, 40, 16, 45), 12, torch.float32, device, offset=1000.0)
    check(a, b, 9, kernel, "none", seed=12, rel=1e-4, needs=[(True, True)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_images(device, dtype):
    """Constant images: windows wholly inside have no variance, NCC exactly 0 there (the zero padding makes
    border windows perfectly correlated, NCC 1, as in the reference); nothing NaN."""
    a = torch.full((1, 1, 7, 9, 33), 3.0, dtype=dtype, device=device)
    b = torch.full_like(a, -2.0)
    check(a, b, 5, "gaussian", "none", seed=4, rel=1e-5 if dtype == torch.float32 else 1e-9, needs=[(True, True)])
    out = ops().lncc_tiled(a, b, 5, "gaussian", 1e-5, "none")
    inside = out[..., 2:-2, 2:-2, 2:-2]
    assert torch.equal(inside, torch.zeros_like(inside))
    grads = ops().lncc_tiled_backward(torch.ones_like(a), a, b, 5, "gaussian", 1e-5, "none", True, True)
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_deterministic(device):
    a, b = pair((2, 1, 20, 17, 35), 5, torch.float32, device)
    first = [ops().lncc_tiled(a, b, 9, "box", 1e-5, "mean"),
             *ops().lncc_tiled_backward(torch.ones((), dtype=a.dtype, device=device), a, b, 9, "box", 1e-5, "mean",
                                        True, True)]
    second = [ops().lncc_tiled(a, b, 9, "box", 1e-5, "mean"),
              *ops().lncc_tiled_backward(torch.ones((), dtype=a.dtype, device=device), a, b, 9, "box", 1e-5,
                                         "mean", True, True)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_rejects_bad_inputs(device):
    skip_if_cpp_errors_kill_cuda_processes(device)
    a, b = pair((1, 1, 4, 5, 6), 13, device=device)
    cases = [
        (lambda: ops().lncc_tiled(a, b, 33, "box", 1e-5, "mean"),
         "kernel_size must be a positive odd integer <= 31 for lncc_tiled"),
        (lambda: ops().lncc_tiled(a, b, 4, "box", 1e-5, "mean"), "kernel_size must be a positive odd integer"),
        (lambda: ops().lncc_tiled(a.int(), b.int(), 3, "box", 1e-5, "mean"), "a must be float32 or float64"),
        (lambda: ops().lncc_tiled(a, b[..., :5].contiguous(), 3, "box", 1e-5, "mean"), "b must have the shape of a"),
        (lambda: ops().lncc_tiled_backward(torch.ones(2, dtype=a.dtype, device=device), a, b, 3, "box", 1e-5,
                                           "mean", True, True), "grad must have one element"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_public_api_selects_the_tiled_kernels_on_cuda(device, monkeypatch):
    """DEEPATLAS_FAST_CUDA_LNCC=tiled sends the cuda backend's lncc to lncc_tiled (windows up to 31 taps)."""
    monkeypatch.setenv(_cpp.LNCC_CUDA_VARIABLE, "tiled")
    a = torch.zeros(1, 1, 2, 2, 2, device=device)
    assert _cpp._lncc_kernels(a, 9)[0] is (ops().lncc_tiled if device == "cuda" else ops().lncc)
    assert _cpp._lncc_kernels(a, 33)[0] is ops().lncc
    monkeypatch.setenv(_cpp.LNCC_CUDA_VARIABLE, "")
    assert _cpp._lncc_kernels(a, 9)[0] is ops().lncc
    monkeypatch.setenv(_cpp.LNCC_CUDA_VARIABLE, "fast")
    with pytest.raises(ValueError, match="DEEPATLAS_FAST_CUDA_LNCC must be one of"):
        _cpp.lncc_cuda_implementation()
    if device != "cuda":
        return
    monkeypatch.setenv(_cpp.LNCC_CUDA_VARIABLE, "tiled")
    a, b = pair((1, 2, 24, 20, 36), 7, torch.float32, device)
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    with da.use_backend("cuda"):
        loss = da.lncc(*leaves, 9, "box")
        grads = torch.autograd.grad(loss, leaves)
    expected = reference.lncc(a.double(), b.double(), 9, "box", 1e-5, "mean")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    ref_grads = reference.lncc_backward(torch.ones((), dtype=torch.float64, device=device), a.double(), b.double(),
                                        9, "box", 1e-5, "mean", True, True)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_cuda_no_host_sync_and_graph_capture(device):
    """Forward and backward without a host synchronisation; a captured CUDA graph replays them on new
    values in the captured inputs."""
    if device != "cuda":
        pytest.skip("CUDA only: the CPU emulation has no stream to capture")
    a, b = pair((1, 2, 40, 33, 70), 21, torch.float32, device)
    one = torch.ones((), device=device)

    def both():
        return [ops().lncc_tiled(a, b, 9, "box", 1e-5, "mean"),
                *ops().lncc_tiled_backward(one, a, b, 9, "box", 1e-5, "mean", True, True)]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        both()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            both()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = both()
    torch.cuda.current_stream().wait_stream(stream)
    a.mul_(0.9).add_(0.3)
    b.mul_(1.1)
    graph.replay()
    expected = both()
    torch.cuda.synchronize()
    for x, y in zip(captured, expected):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_realistic_size(device, dtype):
    """96 x 80 x 112, two channels (dozens of blocks per axis, several backward chunks), k = 9 and 13
    (register-blocked and run-time window sizes), against the float64 reference."""
    if device != "cuda":
        pytest.skip("CUDA only: the CPU emulation runs these sizes too slowly for CI")
    rel = 1e-9 if dtype == torch.float64 else 2e-4
    a, b = pair((1, 2, 96, 80, 112), 31, dtype, device)
    check(a, b, 9, "box", "mean", seed=31, rel=rel, needs=[(True, True), (False, True)])
    check(a, b, 13, "gaussian", "none", seed=32, rel=rel, needs=[(True, False)])


@pytest.mark.parametrize("budget", [None, 4 * 5 * 6 * 7 * 9, 5 * 3 * 7 * 9])
def test_backward_takes_a_map_shared_by_the_channels(device, monkeypatch, budget):
    """grad [N, 1, ...] (one map per item for its C channels) gives bitwise the gradients of that map repeated
    over the channels: whole, in groups of channels that straddle items (4 of 2 x 3), in chunks of planes."""
    if budget is not None:
        monkeypatch.setenv(SCRATCH, str(budget))
    a, b = pair((2, 3, 6, 7, 9), 25, device=device)
    shared = torch.randn(2, 1, 6, 7, 9, generator=g(26), dtype=torch.float64).to(device)
    ours = ops().lncc_tiled_backward(shared, a, b, 3, "gaussian", 1e-5, "none", True, True)
    full = ops().lncc_tiled_backward(shared.expand(2, 3, 6, 7, 9).contiguous(), a, b, 3, "gaussian", 1e-5, "none",
                                     True, True)
    for x, y in zip(ours, full):
        assert torch.equal(x, y)
