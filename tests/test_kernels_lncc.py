"""The kernel backends of lncc (triton, and the C++ cpu / cuda kernels where built) against the reference
backend (the oracle), forward and backward through the public API; tests using ``kernels.*`` are
Triton-specific, tests named ``test_cpu_*`` exercise the C++ cpu kernels.

On CPU the Triton kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1 and poisons kernel
outputs with NaN); on CUDA the same tests run the compiled kernels. The interpreter's cost grows with
the number of planes times programs, so volumes keep D small.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from conftest import DEVICES
from deepatlas_fast.kernels import similarity as kernels
from deepatlas_fast.kernels._common import INTERPRET
from deepatlas_fast.ops import registry
from deepatlas_fast.reference import similarity as reference
from deepatlas_fast.reference.sampling import compute_dtype
from helpers import g

OP = "lncc"  # which op the backend fixture checks availability for
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


def run(backend, a, b, k, kernel, reduction, needs=(True, True), grad=None, eps=1e-5):
    """lncc on ``backend`` through the public API: (output, [requested grads]) for the upstream ``grad``."""
    leaves = [x.detach().clone().requires_grad_(need) for x, need in zip((a, b), needs)]
    with da.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", registry.BackendFallbackWarning)  # the backend itself must run
        out = da.lncc(*leaves, k, kernel, eps, reduction)
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = list(torch.autograd.grad(out, wanted, grad)) if wanted else []
    return out.detach(), grads


def check(backend, a, b, k, kernel, reduction, needs=NEEDS, rel=1e-9, seed=0, eps=1e-5):
    """Forward and the requested gradients of ``backend`` against the reference on the same inputs
    (float64 reference for float32 inputs, so that only our rounding is measured)."""
    oracle = torch.float64
    grad = upstream(reduction, a.shape, seed, torch.float64, a.device)
    for need in needs:
        ours, grads = run(backend, a, b, k, kernel, reduction, need, grad.to(compute_dtype(a)), eps)
        expected, expected_grads = run("reference", a.to(oracle), b.to(oracle), k, kernel, reduction, need, grad, eps)
        assert ours.dtype == reference.lncc(a, b, k, kernel, eps, reduction).dtype
        assert_close(ours.to(oracle), expected, rel)
        assert len(grads) == len(expected_grads) == sum(need)
        for x, y in zip(grads, expected_grads):
            assert x.dtype == a.dtype
            assert_close(x.to(oracle), y, rel)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10)
@given(d=st.integers(1, 5), h=st.integers(1, 17), w=st.integers(1, 17), n=st.integers(1, 2), c=st.integers(1, 2),
       k=st.sampled_from([1, 3, 5, 9]), kernel=st.sampled_from(KERNELS), reduction=st.sampled_from(["mean", "none"]),
       seed=st.integers(0, 2**31 - 1))
def test_float64_forward_and_gradients_match_reference(backend, device, d, h, w, n, c, k, kernel, reduction, seed):
    a, b = pair((n, c, d, h, w), seed, device=device)
    check(backend, a, b, k, kernel, reduction, needs=[NEEDS[seed % 3]], seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_21_taps_on_a_volume_smaller_than_the_window(backend, device, kernel):
    a, b = pair((1, 2, 3, 24, 13), 1, device=device)
    check(backend, a, b, 21, kernel, "none", needs=[(True, True)], seed=1)


@pytest.mark.triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplane,k,expected", [("auto", 9, "dot"), ("auto", 11, "dot"), ("auto", 13, "scratch"),
                                                ("dot", 21, "dot"), ("scratch", 3, "scratch"), ("dot", 3, "dot")])
def test_in_plane_mode_by_window_size(device, monkeypatch, inplane, k, expected):
    """"auto": matrix products up to 11 taps, scratch passes above; "dot"/"scratch" force one: all match."""
    monkeypatch.setattr(kernels, "INPLANE", inplane)
    assert kernels._Plan((1, 1, 3, 9, 9), k).inplane == expected
    a, b = pair((1, 1, 3, 14, 9), 14, device=device)
    check("triton", a, b, k, "gaussian", "none", needs=[(True, True)], seed=14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_within_1e5_of_float64(backend, device, reduction):
    a, b = pair((2, 1, 4, 11, 13), 2, torch.float32, device)
    check(backend, a, b, 5, "gaussian", reduction, rel=1e-5, seed=2)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_accurate_on_bright_images(backend, device):
    """a + 1000: the shifted-frame sums stay accurate where the plain float32 formula cancels
    (in windows away from the zero padding, whose variance is large)."""
    a, b = pair((1, 1, 4, 12, 12), 3, torch.float32, device, offset=1000.0)
    exact = reference.lncc(a.double(), b.double(), 3, "box", reduction="none")
    ours, _ = run(backend, a, b, 3, "box", "none", needs=(False, False))
    plain = reference.lncc(a, b, 3, "box", reduction="none")
    ours_error = (ours.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    assert ours_error < 1e-5 and plain_error > 100 * ours_error
    check(backend, a, b, 3, "box", "mean", needs=[(True, True)], rel=1e-5, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_flat_images_are_finite_and_match_reference(backend, device, kernel):
    shape = (1, 1, 5, 10, 9)
    textured = torch.randn(shape, generator=g(4)).to(device)
    for a, b in [
        (torch.full(shape, 3.0, device=device), torch.full(shape, -2.0, device=device)),
        (torch.zeros(shape, device=device), torch.zeros(shape, device=device)),
        (torch.zeros(shape, device=device), textured),
        (textured, torch.full(shape, 7.0, device=device)),
    ]:
        check(backend, a, b, 5, kernel, "none", needs=[(True, True)], rel=1e-5)
    # nearly flat: some window variances fall below eps (the floor's gradient is 0) while ncc is not 0
    faint = 6e-4 * torch.randn(shape, generator=g(5), dtype=torch.float64).to(device)
    check(backend, faint, textured.double(), 5, kernel, "none", needs=[(True, True)])
    # constant bright images (CT air): finite everywhere, exactly 0 inside
    for dtype in (torch.float32, torch.float64):
        air = torch.full(shape, -1000.0, dtype=dtype, device=device)
        ncc, grads = run(backend, air, air + 1, 5, kernel, "none", grad=torch.ones(shape, dtype=dtype, device=device))
        assert torch.isfinite(ncc).all() and (ncc[..., 2:-2, 2:-2, 2:-2] == 0).all()
        assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(backend, device, dtype):
    a, b = pair((1, 2, 3, 9, 10), 5, dtype, device)
    loss, _ = run(backend, a, b, 5, "box", "mean", needs=(False, False))
    assert loss.dtype == torch.float32
    single, _ = run(backend, a.float(), b.float(), 5, "box", "mean", needs=(False, False))
    torch.testing.assert_close(loss, single, rtol=1e-6, atol=1e-7)
    check(backend, a, b, 5, "box", "none", needs=[(True, True)], rel=1e-2)  # gradients rounded to half


@pytest.mark.triton
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
    check("triton", a, b, 3, "gaussian", "none", needs=[(True, True)], seed=6)


def _tf32(x):
    """Round float32 to TF32 (10 mantissa bits, to nearest, ties away: the GPU's cvt.rna.tf32.f32)."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _emulated_tensor_core_dot(monkeypatch, split: bool):
    """The interpreter's tl.dot with the GPU's float32 input precisions: TF32 products, and with
    ``split`` the TF32x3 scheme (hi*hi + hi*lo + lo*hi); plain fp32 matmul otherwise (ignores them)."""
    import numpy as np
    from triton.runtime import interpreter

    plain = interpreter.InterpreterBuilder.create_dot

    def dot(self, a, b, d, precision, imprecise):
        if a.data.dtype != np.float32:
            return plain(self, a, b, d, precision, imprecise)
        assert str(precision).endswith("TF32x3")  # what kernels/similarity.py asks for in float32
        a_hi, b_hi = _tf32(a.data), _tf32(b.data)
        out = np.matmul(a_hi, b_hi)
        if split:
            out += np.matmul(a_hi, _tf32(b.data - b_hi)) + np.matmul(_tf32(a.data - a_hi), b_hi)
        return interpreter.TensorHandle(out.astype(np.float32) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)


@pytest.mark.triton
@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_window_products_need_the_tf32x3_split(kernel, monkeypatch):
    """The in-plane window sums run as tl.dot on tensor cores in float32. With the TF32x3 split the
    interpreter, emulating the GPU's rounding, stays within 1e-5 of float64 (bright images included);
    plain TF32 products do not (which is why the kernels ask for the split)."""
    monkeypatch.setattr(kernels, "INPLANE", "dot")
    if torch.cuda.is_available() and not INTERPRET:
        pytest.skip("emulates the GPU's products in the Triton interpreter (CPU); on the GPU the float32 tests "
                    "check the real ones")
    a, b = pair((1, 1, 4, 12, 13), 12, torch.float32, offset=300.0)
    _emulated_tensor_core_dot(monkeypatch, split=True)
    check("triton", a, b, 5, kernel, "none", needs=[(True, True)], rel=1e-5, seed=12)
    _emulated_tensor_core_dot(monkeypatch, split=False)
    with pytest.raises(AssertionError):
        check("triton", a, b, 5, kernel, "none", needs=[(True, True)], rel=1e-5, seed=12)


@pytest.mark.triton
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=6)
@given(d=st.integers(1, 4), h=st.integers(1, 17), w=st.integers(1, 17), c=st.integers(1, 2),
       k=st.sampled_from([1, 3, 5, 9, 11]), kernel=st.sampled_from(KERNELS),
       reduction=st.sampled_from(["mean", "none"]), seed=st.integers(0, 2**31 - 1))
def test_dot_inplane_passes_match_reference(device, d, h, w, c, k, kernel, reduction, seed):
    """The in-plane passes as banded matrix products (INPLANE "dot", to be measured against the scratch
    passes on the GPU): float64 and float32 against the reference, flat and bright images included."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "INPLANE", "dot")
        a, b = pair((1, c, d, h, w), seed, device=device)
        check("triton", a, b, k, kernel, reduction, needs=[NEEDS[seed % 3]], seed=seed)
        # float32 on volumes smaller than the window is ill-conditioned: a single voxel with k=3 has 26 of its 27
        # taps in the zero padding, its variance 1/27 of its second moment, and float32 gradients off by 2e-5
        # where the float64 one is 0 (hypothesis found it; the scratch passes give the same digits)
        check("triton", a.float(), b.float(), k, kernel, reduction, needs=[(True, True)], rel=1e-4, seed=seed)
        flat = torch.full(a.shape, -1000.0, dtype=torch.float64, device=device)
        check("triton", flat, b, k, kernel, reduction, needs=[(True, True)], rel=1e-5, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_routes_forward_and_autograd_to_the_backend(backend, device):
    a, b = pair((2, 2, 3, 7, 6), 7, device=device)
    with da.use_backend(backend):
        assert da.get_backend("lncc", device) == backend
    ours = run(backend, a, b, 3, "gaussian", "mean", grad=torch.tensor(1.0, dtype=a.dtype, device=device))
    expected = run("reference", a, b, 3, "gaussian", "mean", grad=torch.tensor(1.0, dtype=a.dtype, device=device))
    assert_close(ours[0], expected[0], 1e-9)
    for x, y in zip(ours[1], expected[1]):
        assert_close(x, y, 1e-9)


def test_window_parameters_are_the_reference_taps():
    for k in (1, 5, 21):
        for kernel in KERNELS:
            for dtype in (torch.float32, torch.float64):
                prm = kernels.params(k, kernel, 1e-5, dtype, "cpu")
                taps = reference.window_weights(k, kernel, dtype=dtype)
                assert torch.equal(prm[:k], taps)
                assert prm[k] == taps.sum() ** 3 and prm[k + 1] == torch.tensor(1e-5, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_no_gradient_requested_returns_nothing(backend, device):
    a, b = pair((1, 1, 2, 3, 4), 8, device=device)
    grad = torch.tensor(1.0, dtype=a.dtype, device=device)
    assert registry.backend_module(backend, OP).lncc_backward(grad, a, b, 3, "box", 1e-5, "mean", False, False) == []


# --------------------------------------------------------------------------- the C++ cpu kernels specifically


@pytest.fixture
def cpu_kernels():
    """The raw kernels of the cpu backend (torch.ops.deepatlas_fast_C), skipped where they are not built."""
    reason = registry.unavailable_reason("cpu", OP, "cpu")
    if reason is not None:
        pytest.skip(reason)
    return torch.ops.deepatlas_fast_C


@pytest.mark.parametrize("k,kernel", [(3, "box"), (9, "box"), (9, "gaussian"), (21, "box")])
@pytest.mark.parametrize("channels", [2, 17])
def test_cpu_many_slabs_match_reference(cpu_kernels, k, kernel, channels):
    """D = 37: several work units along z (3 slabs per channel, 2 with 17 channels), whose sliding sums restart
    and whose backward halos overlap."""
    a, b = pair((1, channels, 37, 6, 7), 9)
    check("cpu", a, b, k, kernel, "none", seed=9)
    check("cpu", a, b, k, kernel, "mean", needs=[(True, True)], seed=10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_result_independent_of_thread_count(cpu_kernels, reduction):
    a, b = pair((2, 1, 40, 9, 11), 11, torch.float32)
    grad = upstream(reduction, a.shape, 11, torch.float32, "cpu")
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = cpu_kernels.lncc(a, b, 5, "box", 1e-5, reduction)
            results.append([out, *cpu_kernels.lncc_backward(grad, a, b, 5, "box", 1e-5, reduction, True, True)])
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


@pytest.mark.parametrize("kernel", KERNELS)
def test_cpu_bright_images(cpu_kernels, kernel):
    """a + 1000 with a 9-voxel window: float32 within 1e-5 of the float64 reference; float64 within 1e-8
    (the float64 reference itself cancels to ~1e-10 relative on these images)."""
    a, b = pair((1, 2, 20, 16, 18), 12, offset=1000.0)
    check("cpu", a.float(), b.float(), 9, kernel, "none", needs=[(True, True)], rel=1e-5, seed=12)
    check("cpu", a.float(), b.float(), 9, kernel, "mean", needs=[(True, True)], rel=1e-5, seed=13)
    check("cpu", a, b, 9, kernel, "none", needs=[(True, True)], rel=1e-8, seed=12)


def test_cpu_raw_op_rejects_bad_inputs(cpu_kernels):
    a, b = pair((1, 1, 4, 5, 6), 13)
    lncc, backward = cpu_kernels.lncc, cpu_kernels.lncc_backward
    cases = [
        (lambda: lncc(a[0], b[0], 3, "box", 1e-5, "mean"), "a must have 5 dimensions"),
        (lambda: lncc(a, b.transpose(2, 4), 3, "box", 1e-5, "mean"), "b must be contiguous"),
        (lambda: lncc(a.int(), b.int(), 3, "box", 1e-5, "mean"), "a must be float32 or float64"),
        (lambda: lncc(a, b.float(), 3, "box", 1e-5, "mean"), "b must have the dtype of a"),
        (lambda: lncc(a, b[..., :5].contiguous(), 3, "box", 1e-5, "mean"), "b must have the shape of a"),
        (lambda: lncc(a[:, :, :0], b[:, :, :0], 3, "box", 1e-5, "mean"), "a must not be empty"),
        (lambda: lncc(a, b, 4, "box", 1e-5, "mean"), "kernel_size must be a positive odd integer"),
        (lambda: lncc(a, b, -3, "box", 1e-5, "mean"), "kernel_size must be a positive odd integer"),
        (lambda: lncc(a, b, 3, "triangle", 1e-5, "mean"), "kernel must be 'box' or 'gaussian'"),
        (lambda: lncc(a, b, 3, "box", 0.0, "mean"), "eps must be > 0"),
        (lambda: lncc(a, b, 3, "box", 1e-5, "sum"), "reduction must be 'mean' or 'none'"),
        (lambda: backward(torch.ones(2, dtype=a.dtype), a, b, 3, "box", 1e-5, "mean", True, True),
         "grad must have one element"),
        (lambda: backward(torch.ones_like(a)[..., :5], a, b, 3, "box", 1e-5, "none", True, True), "grad must"),
        (lambda: backward(torch.ones_like(a).float(), a, b, 3, "box", 1e-5, "none", True, True),
         "grad must have the dtype of a"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_gradcheck(cpu_kernels, kernel, reduction):
    a, b = pair((1, 2, 4, 3, 5), 14)
    with da.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, y: da.lncc(x, y, 3, kernel, 1e-5, reduction),
                                        (a.requires_grad_(), b.requires_grad_()))


SCRATCH = "DEEPATLAS_FAST_LNCC_SCRATCH_ELEMENTS"  # lncc_host.h's scratch budget of the C++ kernels


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_separable_passes_in_channel_groups_and_chunks(reduction, monkeypatch):
    """The CUDA separable kernels under small scratch budgets: groups of 4 and 2 of 6 channels whole (two
    buffers of 5 moment maps per channel), then one channel at a time in z-chunks with halos; channels with
    different shifts, float64 and float32 against the float64 reference."""
    if not torch.cuda.is_available() or registry.unavailable_reason("cuda", OP, "cuda") is not None:
        pytest.skip("needs a GPU and the C++ cuda kernels")
    a, b = pair((2, 3, 21, 10, 17), 15, device="cuda")
    bright = torch.tensor([0.0, 1000.0, -500.0], dtype=a.dtype, device="cuda").view(1, 3, 1, 1, 1)
    monkeypatch.setenv("DEEPATLAS_FAST_CUDA_LNCC", "separable")
    for budget in (4 * 10 * 21 * 10 * 17, 10 * 12 * 10 * 17):
        monkeypatch.setenv(SCRATCH, str(budget))
        check("cuda", a, b, 5, "gaussian", reduction, seed=15)
        check("cuda", (a + bright).float(), (b + bright).float(), 5, "gaussian", reduction, rel=1e-4, seed=15,
              needs=[(True, True)])


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_a_channel_sum_is_not_materialised_and_matches_reference(backend, device):
    """lncc "none" -> sum over channels -> weighted sum (the implicit term's pattern): autograd hands the
    backward a map expanded over the channels; the C++ backends take it unexpanded ([N, 1, ...])."""
    a, b = pair((2, 3, 5, 9, 11), 21, device=device)
    weight = torch.rand(2, 1, 5, 9, 11, generator=g(22), dtype=torch.float64).to(device)
    grads = {}
    for name in (backend, "reference"):
        leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        with da.use_backend(name):
            out = (da.lncc(*leaves, 5, "gaussian", 1e-5, "none").sum(dim=1, keepdim=True) * weight).sum()
            grads[name] = torch.autograd.grad(out, leaves)
    for ours, theirs in zip(grads[backend], grads["reference"]):
        assert_close(ours, theirs, 1e-9)


def test_cpu_raw_backward_takes_a_map_shared_by_the_channels(cpu_kernels):
    """[N, 1, ...] gives bitwise the gradients of that map repeated over the channels; other channel counts
    are refused."""
    a, b = pair((2, 3, 4, 6, 5), 23)
    shared = torch.randn(2, 1, 4, 6, 5, generator=g(24), dtype=torch.float64)
    ops = torch.ops.deepatlas_fast_C
    ours = ops.lncc_backward(shared, a, b, 3, "box", 1e-5, "none", True, True)
    full = ops.lncc_backward(shared.expand(2, 3, 4, 6, 5).contiguous(), a, b, 3, "box", 1e-5, "none", True, True)
    for x, y in zip(ours, full):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match=r"or \[2, 1, \*a.shape\[2:\]\]"):
        ops.lncc_backward(shared.expand(2, 2, 4, 6, 5).contiguous(), a, b, 3, "box", 1e-5, "none", True, True)
