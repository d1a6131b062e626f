"""The kernel backends of sample / warp (triton, and the C++ cpu / cuda kernels where built) against the
reference backend (the oracle), forward and backward; tests using ``kernels.*`` are Triton-specific.

On CPU the Triton kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1 and poisons kernel
outputs with NaN); on CUDA the same tests run the compiled kernels.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from conftest import DEVICES, skip_if_cpp_errors_kill_cuda_processes
from deepatlas_fast.coords import identity_coords
from deepatlas_fast.kernels import sampling as kernels
from deepatlas_fast.reference import sampling as reference
from helpers import g, rand_coords

OP = "sample"  # which op the backend fixture checks availability for (warp comes with it)
NEEDS = [(True, True), (True, False), (False, True)]
shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
paddings = st.sampled_from(["border", "zeros"])


def assert_close(ours, expected, dtype=None, rel=None):
    """Relative to the largest magnitude of ``expected``: 1e-9 in float64, 1e-5 in float32."""
    rel = rel or {torch.float64: 1e-9, torch.float32: 1e-5}[dtype or expected.dtype]
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(ours, expected, rtol=rel, atol=rel * scale)


def run(backend, op, vol, field, padding, needs, grad=None):
    """``op`` on ``backend`` through the public API: (output, [requested grads]) for an output grad."""
    leaves = [x.detach().clone().requires_grad_(need) for x, need in zip((vol, field), needs)]
    with da.use_backend(backend):
        out = op(*leaves, padding)
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = list(torch.autograd.grad(out, wanted, grad)) if wanted else []
    return out.detach(), grads


def check(backend, op, vol, field, padding, needs=(True, True), seed=0, dtype=None, rel=None):
    grad = torch.randn(vol.shape[:2] + field.shape[2:], generator=g(seed), dtype=torch.float64).to(vol)
    out, grads = run(backend, op, vol, field, padding, needs, grad)
    expected, expected_grads = run("reference", op, vol, field, padding, needs, grad)
    assert_close(out, expected, dtype, rel)
    assert len(grads) == len(expected_grads) == sum(needs)
    for ours, theirs in zip(grads, expected_grads):
        assert_close(ours, theirs, dtype, rel)
    return out, grads


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


class LaunchSpy:
    """Stands in for a Triton kernel and records the constexpr flags of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append({k: v for k, v in kwargs.items() if k.startswith("NEED")})
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12)
@given(src=shapes, dst=shapes, n=st.integers(1, 2), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       padding=paddings, dtype=st.sampled_from([torch.float32, torch.float64]), needs=st.sampled_from(NEEDS))
def test_sample_matches_reference(backend, device, src, dst, n, c, seed, padding, dtype, needs):
    gen = g(seed)
    vol = torch.randn(n, c, *src, generator=gen, dtype=dtype).to(device)
    coords = rand_coords(n, dst, gen, dtype=dtype, device=device)
    check(backend, da.sample, vol, coords, padding, needs, seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=6)
@given(src=shapes, dst=shapes, seed=st.integers(0, 2**31 - 1), padding=paddings,
       dtype=st.sampled_from([torch.float32, torch.float64]), needs=st.sampled_from(NEEDS))
def test_warp_matches_reference_and_sample(backend, device, src, dst, seed, padding, dtype, needs):
    gen = g(seed)
    vol = torch.randn(2, 2, *src, generator=gen, dtype=dtype).to(device)
    disp = rand_coords(2, dst, gen, spread=0.6, dtype=dtype, device=device)
    out, grads = check(backend, da.warp, vol, disp, padding, needs, seed)
    # the in-kernel identity equals identity_coords: warp == sample(identity + disp), gradients included
    coords = identity_coords(dst, dtype=dtype, device=device) + disp
    grad = torch.randn(out.shape, generator=g(seed), dtype=torch.float64).to(vol)
    out_w, grads_w = run(backend, da.warp, vol, disp, padding, needs, grad)
    out_s, grads_s = run(backend, da.sample, vol, coords, padding, needs, grad)
    assert_close(out_w, out_s)
    for ours, theirs in zip(grads_w, grads_s):
        assert_close(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels,dtype", [(1, torch.float64), (16, torch.float32), (17, torch.float64)])
def test_channels(backend, device, channels, dtype):
    """C=16 fills a channel block; C=17 needs a second one."""
    gen = g(channels)
    vol = torch.randn(2, channels, 5, 4, 6, generator=gen, dtype=dtype).to(device)
    coords = rand_coords(2, (3, 5, 4), gen, dtype=dtype, device=device)
    for padding in ("border", "zeros"):
        check(backend, da.sample, vol, coords, padding)
        check(backend, da.warp, vol, 0.3 * coords, padding)


@pytest.mark.parametrize("device", DEVICES)
def test_many_points_and_channels(backend, device):
    """Output runs longer than the cpu kernels' blocks of 128 points (the last one partial), two items."""
    gen = g(7)
    vol = torch.randn(2, 3, 6, 5, 7, generator=gen).to(device)
    coords = rand_coords(2, (7, 9, 11), gen, device=device)
    for padding in ("border", "zeros"):
        for needs in NEEDS:
            check(backend, da.sample, vol, coords, padding, needs, 7)
        check(backend, da.warp, vol, 0.3 * coords, padding)


def border_values(size):
    """Coordinates on, just inside, just outside and far beyond the borders, and on voxel centres."""
    step = 2.0 / max(size - 1, 1)
    values = [-40.0, -1.0 - step, -1.0 - 0.5 * step, -1.0 - 1e-12, -1.0, -1.0 + 1e-12, -0.3, 0.0,
              1.0 - step, 1.0 - 1e-12, 1.0, 1.0 + 1e-12, 1.0 + 0.5 * step, 1.0 + step, 1e30]
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_borders_and_out_of_range(backend, device, padding):
    sizes = (4, 1, 5)
    vol = torch.randn(1, 2, *sizes, generator=g(5), dtype=torch.float64).to(device)
    # every combination of the special values of the D and W axes, the H axis (size 1) cycling through its own
    vz, vy, vx = border_values(4), border_values(1), border_values(5)
    zz, xx = torch.meshgrid(vz, vx, indexing="ij")
    yy = vy.repeat(len(vz) * len(vx) // len(vy) + 1)[: zz.numel()].view_as(zz)
    coords = torch.stack([zz, yy, xx]).unsqueeze(2).unsqueeze(0).to(device)  # [1, 3, 1, 15, 15]
    out, (grad_vol, grad_coords) = check(backend, da.sample, vol, coords, padding)
    if padding == "border":  # no coordinate gradient on or beyond the border
        on_or_beyond = coords.abs() >= 1
        assert (grad_coords[on_or_beyond] == 0).all() and (grad_coords[~on_or_beyond] != 0).any()
    else:  # more than one voxel outside everything reads 0
        far = (coords[:, 0].abs() > 1.0 + 2.0 / 3) | (coords[:, 2].abs() > 1.0 + 0.5)
        assert (out[:, :, far[0]] == 0).all() and (out[:, :, ~far[0]] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src,dst", [((1, 1, 1), (2, 3, 1)), ((1, 5, 1), (3, 1, 4)), ((4, 1, 3), (1, 1, 1)), ((2, 3, 4), (1, 6, 1))])
def test_size_one_axes(backend, device, src, dst):
    gen = g(7)
    vol = torch.randn(2, 3, *src, generator=gen, dtype=torch.float64).to(device)
    coords = rand_coords(2, dst, gen, device=device)
    for padding in ("border", "zeros"):
        check(backend, da.sample, vol, coords, padding)
        check(backend, da.warp, vol, 0.4 * coords, padding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 4, 3), (3, 1, 1)])
def test_warp_zero_displacement_is_identity(backend, device, shape):
    """The identity generated in the kernel hits voxel centres exactly (also along size-1 axes)."""
    vol = torch.randn(1, 2, *shape, generator=g(8), dtype=torch.float64).to(device)
    with da.use_backend(backend):
        for padding in ("border", "zeros"):
            torch.testing.assert_close(da.warp(vol, torch.zeros(1, 3, *shape, dtype=torch.float64, device=device), padding),
                                       vol, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_volume(backend, device):
    vol = torch.full((2, 2, 5, 4, 3), 2.5, dtype=torch.float64, device=device)
    coords = rand_coords(2, (4, 4, 4), g(9), device=device)
    out, (grad_vol, grad_coords) = check(backend, da.sample, vol, coords, "border")
    assert (out - 2.5).abs().max() < 1e-14 and grad_coords.abs().max() < 1e-14
    check(backend, da.sample, vol, coords, "zeros")  # not flat near the borders: the zeros outside are read


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,coords_dtype", [(torch.float16, "vol"), (torch.float16, torch.float32),
                                                (torch.bfloat16, "vol"), (torch.bfloat16, torch.float64)])
def test_half_volume(backend, device, dtype, coords_dtype):
    """Half volumes accumulate in float32: compared with the reference on the same values in float32."""
    gen = g(10)
    coords_dtype = dtype if coords_dtype == "vol" else coords_dtype
    vol = torch.randn(2, 3, 6, 5, 7, generator=gen).to(device=device, dtype=dtype)
    coords = rand_coords(2, (4, 5, 3), gen, device=device, dtype=coords_dtype)
    grad = torch.randn(2, 3, 4, 5, 3, generator=gen).to(device=device, dtype=dtype)
    wide = torch.float64 if coords_dtype == torch.float64 else torch.float32
    for op, field in ((da.sample, coords), (da.warp, 0.3 * coords)):
        for padding in ("border", "zeros"):
            out, (grad_vol, grad_field) = run(backend, op, vol, field, padding, (True, True), grad)
            assert (out.dtype, grad_vol.dtype, grad_field.dtype) == (dtype, dtype, coords_dtype)
            expected, (ref_vol, ref_field) = run("reference", op, vol.to(wide), field.to(wide), padding, (True, True), grad.to(wide))
            assert_close(out.to(wide), expected, rel=2e-2)
            assert_close(grad_vol.to(wide), ref_vol, rel=2e-2)
            assert_close(grad_field.to(wide), ref_field, rel=2e-2)


@pytest.mark.triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward,op", [(kernels.sample_backward, reference.sample_backward),
                                         (kernels.warp_backward, reference.warp_backward)])
def test_backward_computes_only_what_is_asked(device, monkeypatch, backward, op):
    gen = g(11)
    vol = torch.randn(2, 3, 5, 6, 4, generator=gen, dtype=torch.float64).to(device)
    coords = rand_coords(2, (3, 4, 5), gen, device=device)
    grad = torch.randn(2, 3, 3, 4, 5, generator=gen, dtype=torch.float64).to(device)
    spy = LaunchSpy(kernels._backward_kernel)
    monkeypatch.setattr(kernels, "_backward_kernel", spy)
    monkeypatch.setattr(kernels, "deterministic_volume_gradient", None)  # would fail if called
    for needs, flags in [((False, True), {"NEED_VOL": False, "NEED_COORDS": True}),
                         ((True, False), {"NEED_VOL": True, "NEED_COORDS": False}),
                         ((True, True), {"NEED_VOL": True, "NEED_COORDS": True})]:
        ours = backward(grad, vol, coords, "zeros", *needs)
        assert spy.calls.pop() == flags and not spy.calls
        theirs = op(grad, vol, coords, "zeros", *needs)
        assert len(ours) == len(theirs) == sum(needs)
        for a, b in zip(ours, theirs):
            assert_close(a, b)
    assert backward(grad, vol, coords, "zeros", False, False) == [] and not spy.calls
    # through autograd: a volume that needs no gradient gets none computed
    with da.use_backend("triton"):
        da.sample(vol, coords.clone().requires_grad_()).sum().backward()
    assert spy.calls == [{"NEED_VOL": False, "NEED_COORDS": True}]


def clustered_coords(n, shape, generator, device):
    """Points piled into a few cells (long runs per cell), some beyond the borders."""
    centres = torch.tensor([[-0.95, 0.1, 0.5], [0.33, -1.2, 1.0]], dtype=torch.float64)
    pick = torch.randint(0, 2, (n, 1, *shape), generator=generator)
    base = torch.where(pick.bool(), centres[1].view(1, 3, 1, 1, 1), centres[0].view(1, 3, 1, 1, 1))
    return (base + 0.01 * torch.rand(n, 3, *shape, generator=generator, dtype=torch.float64)).to(device)


@pytest.mark.triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_deterministic_volume_gradient(device, padding, deterministic, monkeypatch):
    gather = LaunchSpy(kernels._splat_gather_kernel)
    atomic = LaunchSpy(kernels._backward_kernel)
    monkeypatch.setattr(kernels, "_splat_gather_kernel", gather)
    monkeypatch.setattr(kernels, "_backward_kernel", atomic)
    gen = g(12)
    cases = [(1, (5, 4, 6), (4, 5, 3), torch.float64, "spread", "sample"),
             (17, (3, 3, 2), (3, 2, 3), torch.float64, "spread", "warp"),  # two channel chunks
             (3, (5, 4, 6), (4, 5, 3), torch.float32, "spread", "sample"),
             (2, (4, 4, 4), (3, 2, 2), torch.float64, "piled", "sample")]  # several points per cell
    for c, src, dst, dtype, where, op in cases:
        vol = torch.randn(2, c, *src, generator=gen, dtype=dtype).to(device)
        grad = torch.randn(2, c, *dst, generator=gen, dtype=dtype).to(device)
        coords = (rand_coords(2, dst, gen, device=device) if where == "spread" else clustered_coords(2, dst, gen, device)).to(dtype)
        ours = kernels.sample_backward if op == "sample" else kernels.warp_backward
        theirs = reference.sample_backward if op == "sample" else reference.warp_backward
        field = coords if op == "sample" else 0.4 * coords
        first = ours(grad, vol, field, padding, True, True)
        second = ours(grad, vol, field, padding, True, True)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        for a, b in zip(first, theirs(grad, vol, field, padding, True, True)):
            assert_close(a, b)
    # the volume gradient came from the gather kernel, never from atomics
    assert len(gather.calls) == 2 * len(cases) and all(not call["NEED_VOL"] for call in atomic.calls)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_backend_takes_the_deterministic_volume_gradient_from_triton(device, deterministic, monkeypatch):
    """The CUDA kernels splat the volume gradient with atomics (their raw op raises under deterministic
    algorithms), so the cuda backend asks the Triton sort-then-gather for it there, and the C++ kernel for
    the coordinate gradient alone. Without a GPU its Python layer runs on CPU tensors (the C++ op dispatches
    to the cpu kernels, Triton runs in the interpreter)."""
    from deepatlas_fast.kernels._common import INTERPRET
    from deepatlas_fast.ops import _cpp, backend_cuda

    if not hasattr(torch.ops.deepatlas_fast_C, "sample_backward"):
        pytest.skip("the C++ extension is not built")
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)")
    gen = g(16)
    vol = torch.randn(1, 2, 4, 5, 6, generator=gen, dtype=torch.float64).to(device)
    coords = rand_coords(1, (5, 3, 4), gen, device=device)
    grad = torch.randn(1, 2, 5, 3, 4, generator=gen, dtype=torch.float64).to(device)
    asked, original = [], _cpp.sample_backward
    monkeypatch.setattr(_cpp, "sample_backward", lambda *args: asked.append(args[-2:]) or original(*args))
    for padding in ("zeros", "border"):
        grad_vol, grad_coords = backend_cuda.sample_backward(grad, vol, coords, padding, True, True)
        expected = reference.sample_backward(grad, vol, coords, padding, True, True)
        assert_close(grad_vol, expected[0])
        assert_close(grad_coords, expected[1])
    assert asked == [(False, True)] * 2  # the C++ kernel never computes the volume gradient here
    only_vol = backend_cuda.warp_backward(grad, vol, 0.5 * coords, "zeros", True, False)
    assert len(only_vol) == 1
    assert_close(only_vol[0], reference.warp_backward(grad, vol, 0.5 * coords, "zeros", True, False)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_reject_bad_inputs(device):
    """The C++ ops check their inputs themselves (they are callable without the Python layer), so no call
    reads outside its tensors: wrong channels, batch, empty volume, dtype, padding, gradient shape."""
    skip_if_cpp_errors_kill_cuda_processes(device)
    from deepatlas_fast.ops import registry

    reason = registry.unavailable_reason("cpu" if device == "cpu" else "cuda", OP, device)
    if reason is not None:
        pytest.skip(reason)
    ops = torch.ops.deepatlas_fast_C
    vol = torch.randn(2, 2, 4, 5, 3, generator=g(20), dtype=torch.float64).to(device)
    coords = rand_coords(2, (3, 4, 5), g(21), device=device)
    grad = torch.randn(2, 2, 3, 4, 5, generator=g(22), dtype=torch.float64).to(device)
    calls = [
        (lambda: ops.sample(vol, coords[:, :2].contiguous(), "zeros"), "coords must have 3 channels"),
        (lambda: ops.warp(vol, coords[:1].contiguous(), "zeros"), "disp must have the batch size of vol"),
        (lambda: ops.sample(vol[:, :, :0].contiguous(), coords, "zeros"), "vol must have every spatial size >= 1"),
        (lambda: ops.sample(vol.float(), coords, "zeros"), "coords must have the dtype of vol"),
        (lambda: ops.sample(vol, coords, "reflect"), "padding must be"),
        (lambda: ops.sample_backward(grad[:, :1].contiguous(), vol, coords, "zeros", True, True),
         "grad must have the output's shape"),
        (lambda: ops.warp_backward(grad[..., :4].contiguous(), vol, coords, "border", False, True),
         "grad must have the output's shape"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_through_autograd(backend, device, deterministic):
    vol = torch.randn(1, 2, 4, 5, 6, generator=g(13), dtype=torch.float64).to(device)
    coords = rand_coords(1, (5, 3, 4), g(14), device=device)
    check(backend, da.sample, vol, coords, "border")
    check(backend, da.warp, vol, 0.5 * coords, "zeros", needs=(True, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_non_finite_coordinates_do_not_crash(backend, device, padding):
    """With finiteness checks off: inf is clamped like any far coordinate (matches the reference);
    NaN gives NaN at that point only and never addresses memory out of bounds."""
    da.set_check_finite(False)
    gen = g(15)
    vol = torch.randn(2, 2, 4, 5, 3, generator=gen, dtype=torch.float64).to(device)
    coords = rand_coords(2, (3, 4, 5), gen, device=device)
    flat = coords.view(-1)
    flat[::7], flat[3::11] = float("inf"), float("-inf")
    check(backend, da.sample, vol, coords, padding)
    nan_at = torch.zeros(2, 1, 3, 4, 5, dtype=torch.bool, device=device)
    nan_at[0, 0, 1, 2, 3] = nan_at[1, 0, 2, 0, 0] = True
    coords = coords.masked_fill(nan_at & (torch.arange(3, device=device) == 1).view(1, 3, 1, 1, 1), float("nan"))
    grad = torch.randn(2, 2, 3, 4, 5, generator=gen, dtype=torch.float64).to(device)
    out, (grad_vol, grad_coords) = run(backend, da.sample, vol, coords, padding, (True, True), grad)
    expected, (_, ref_coords) = run("reference", da.sample, vol, coords, padding, (True, True), grad)
    assert torch.isnan(out).eq(nan_at.expand_as(out)).all()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, equal_nan=True)
    keep = ~nan_at.expand_as(coords)
    torch.testing.assert_close(grad_coords[keep], ref_coords[keep], rtol=1e-9, atol=1e-9)
    assert grad_vol.shape == vol.shape
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.sample_backward(grad, vol, coords, padding, True, False)[0].shape == vol.shape
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("warp", [False, True])
@pytest.mark.parametrize("items, channels", [(2, 5), (1, 1), (1, 2)])
def test_cpu_volume_gradient_same_bits_for_any_thread_count(warp, items, channels):
    """The cpu kernels' volume gradient by (item, channel group, slab of D planes) tasks, without atomics and
    without torch.use_deterministic_algorithms: the tasks follow the thread count (2 x 5 channels: groups of
    5, 5, 3, 2 and 1 channels; 1 x 1 and 1 x 2: slabs of the 6 planes; one task per item fuses the
    coordinate gradient into the same pass), the bits do not."""
    from deepatlas_fast.ops import registry

    reason = registry.unavailable_reason("cpu", OP, "cpu")
    if reason is not None:
        pytest.skip(reason)
    backward = torch.ops.deepatlas_fast_C.warp_backward if warp else torch.ops.deepatlas_fast_C.sample_backward
    vol = torch.randn(items, channels, 6, 7, 8, generator=g(30), dtype=torch.float64)
    field = 0.3 * rand_coords(items, (5, 9, 7), g(31)) if warp else rand_coords(items, (5, 9, 7), g(31))
    grad = torch.randn(items, channels, 5, 9, 7, generator=g(32), dtype=torch.float64)
    previous = torch.get_num_threads()
    both, vol_only = [], []  # zeros padding, both gradients; border padding, the volume gradient alone
    try:
        for threads in (1, 2, 3, 5, 11):
            torch.set_num_threads(threads)
            both.append(backward(grad, vol, field, "zeros", True, True))
            vol_only.append(backward(grad, vol, field, "border", True, False)[0])
    finally:
        torch.set_num_threads(previous)
    for other in both[1:]:
        assert all(torch.equal(x, y) for x, y in zip(both[0], other))
    assert all(torch.equal(vol_only[0], other) for other in vol_only[1:])
    ref_backward = reference.warp_backward if warp else reference.sample_backward
    for ours, theirs in zip(both[0], ref_backward(grad, vol, field, "zeros", True, True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vol_only[0], ref_backward(grad, vol, field, "border", True, False)[0],
                               rtol=1e-12, atol=1e-12)
