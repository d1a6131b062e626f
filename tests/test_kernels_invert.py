"""The kernel backends of invert / invert_displacement (triton, and the C++ cpu / cuda kernels where
built) against the reference backend (the oracle); tests using ``kernels.*`` are Triton-specific, those
calling ``torch.ops.deepatlas_fast_C`` C++-specific.

On the CPU the Triton kernels run in the Triton interpreter (conftest), ~25 ms per program instance:
volumes stay small and example counts low.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from deepatlas_fast.coords import identity_coords
from deepatlas_fast.kernels import inversion as kernels
from deepatlas_fast.reference import inversion as reference
from conftest import DEVICES, skip_if_cpp_errors_kill_cuda_processes
from helpers import affine_coords, covering_map, g, rand_coords, rotation, smooth_displacement

pytestmark = pytest.mark.filterwarnings("error::deepatlas_fast.ops.registry.BackendFallbackWarning")

OP = "invert"  # which op the backend fixture checks availability for (invert_displacement comes with it)

TOL = 0.05
# where both are valid, |inverse_backend - inverse_reference| in normalised units
ATOL = {torch.float64: 1e-8, torch.float32: 2e-5}
# valid masks may differ only where the reference residual is this close to tol (target voxels)
MARGIN = {torch.float64: 1e-7, torch.float32: 1e-3}


def on(backend, fn, *args, **kwargs):
    with da.use_backend(backend):
        return fn(*args, **kwargs)


def residual_voxels(coords, inverse, out_shape):
    """Euclidean |sample(coords, inverse) - u| in target voxels, ``[N, 1, *out_shape]`` (reference ops)."""
    u = identity_coords(out_shape, dtype=coords.dtype, device=coords.device)
    back = on("reference", da.sample, coords, inverse)
    scale = torch.tensor([(s - 1) / 2 for s in out_shape], dtype=coords.dtype, device=coords.device).view(1, 3, 1, 1, 1)
    return ((back - u) * scale).norm(dim=1, keepdim=True)


def random_affine(seed, src, batch, dtype):
    """Batch of random rotation/scale/offset maps: far from identity, partly covering the target."""
    gen = g(seed)
    maps = []
    for _ in range(batch):
        angles = ((torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 0.8).tolist()
        scales = 0.8 + 0.5 * torch.rand(3, generator=gen, dtype=torch.float64)
        offset = (torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 0.6
        maps.append(affine_coords(rotation(angles) @ torch.diag(scales), offset, src))
    return torch.cat(maps).to(dtype)


def check_against_reference(backend, coords, out_shape, iters, device):
    """``backend`` vs reference invert on ``coords``; returns the backend's result."""
    dtype = coords.dtype
    coords = coords.to(device)
    inverse, valid = on(backend, da.invert, coords, out_shape, iters=iters, tol=TOL)
    ref, ref_valid = on("reference", da.invert, coords, out_shape, iters=iters, tol=TOL)
    assert inverse.shape == ref.shape and inverse.dtype == dtype and valid.dtype == torch.bool
    assert valid.shape == ref_valid.shape
    ref_residual = residual_voxels(coords, ref, out_shape)
    differ = valid != ref_valid
    assert ((ref_residual[differ] - TOL).abs() <= MARGIN[dtype]).all(), f"{differ.sum()} valid flags differ"
    both = (valid & ref_valid).expand_as(inverse)
    torch.testing.assert_close(inverse[both], ref[both], atol=ATOL[dtype], rtol=0)
    if iters > 0:  # the accuracy contract
        assert (residual_voxels(coords, inverse, out_shape)[valid] <= TOL).all()
    return inverse, valid


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=3)
@given(
    src=st.tuples(st.integers(5, 11), st.integers(5, 11), st.integers(5, 11)),
    dst=st.tuples(st.integers(4, 12), st.integers(4, 12), st.integers(4, 12)),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_affine_maps_match_reference(backend, device, src, dst, seed, dtype):
    _, valid = check_against_reference(backend, random_affine(seed, src, 2, dtype), dst, 8, device)
    assert valid.shape == (2, 1, *dst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smooth_covering_maps_match_reference(backend, device, dtype):
    coords = covering_map((12, 10, 11), g(3), batch=2, amplitude=0.05).to(dtype)
    _, valid = check_against_reference(backend, coords, (9, 13, 8), 8, device)
    assert valid.all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converged_points_stop(backend, device, dtype):
    """A point's Newton solve ends at a step that leaves it unchanged or is a few epsilons small, and it
    stays there (the kernels stop iterating once every point has): 8 or 40 allowed steps give the same
    bits on a smooth coordinate map, where the plain iteration keeps moving p within its rounding noise
    (~3000 of 2 x 936 x 3 values differed before the Triton kernel had the exits). On the GPU, where the
    guess itself varies in its last bits between calls, they agree to a few stopping steps."""
    coords = covering_map((12, 10, 11), g(15), batch=2, amplitude=0.05).to(dtype).to(device)
    few, few_valid = on(backend, da.invert, coords, (9, 13, 8), iters=8)
    many, many_valid = on(backend, da.invert, coords, (9, 13, 8), iters=40)
    assert torch.equal(few_valid, many_valid) and few_valid.all()
    if device == "cpu":
        assert torch.equal(few, many)
    else:  # the GPU splats the initial guess with float atomics: each call's guess differs in the last bits,
        # and a solve stops once its step is <= 8 eps, so two calls agree to a few times that
        torch.testing.assert_close(few, many, rtol=0, atol=32 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
def test_initial_guess_alone_matches_reference(backend, device):
    """iters=0 returns the splatted pyramid guess; a target finer than the source leaves holes in the
    finest level, so the coarse levels and their upsampling are used."""
    coords = random_affine(5, (7, 6, 8), 2, torch.float64).to(device)
    inverse, _ = on(backend, da.invert, coords, (15, 13, 16), iters=0)
    ref, _ = on("reference", da.invert, coords, (15, 13, 16), iters=0)
    torch.testing.assert_close(inverse, ref, atol=1e-12, rtol=0)
    # a 2x2x2 target is a single pyramid level
    inverse, _ = on(backend, da.invert, coords, (2, 2, 2), iters=0)
    torch.testing.assert_close(inverse, on("reference", da.invert, coords, (2, 2, 2), iters=0)[0], atol=1e-12, rtol=0)
    # a small source in a corner of the target: the coarsest level has a cell with weight 0.045
    corner = affine_coords(torch.eye(3, dtype=torch.float64) * 0.1, [0.85, 0.8, 0.85], (4, 5, 4)).to(device)
    inverse, _ = on(backend, da.invert, corner, (5, 6, 7), iters=0)
    torch.testing.assert_close(inverse, on("reference", da.invert, corner, (5, 6, 7), iters=0)[0], atol=1e-12, rtol=0)


@pytest.mark.triton
@pytest.mark.parametrize("device", DEVICES)
def test_many_programs_and_replicated_accumulators(device, monkeypatch):
    """Small blocks: several programs per item, partial last blocks, and coarse pyramid levels
    splatted into several replicas (as on the GPU) give the reference result."""
    monkeypatch.setattr(kernels, "block", lambda gpu, interpret: 256)
    monkeypatch.setattr(kernels, "ATOMICS_PER_ADDRESS", 4)  # 8 replicas at the coarsest level
    coords = covering_map((11, 9, 10), g(8), batch=2, amplitude=0.05).to(device)
    inverse, valid = kernels.invert(coords, (5, 7, 6), 3, TOL)
    ref, ref_valid = reference.invert_forward(coords, (5, 7, 6), 3, TOL)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(inverse, ref, atol=1e-12, rtol=0)
    grad = torch.randn(inverse.shape, generator=g(9), dtype=torch.float64).to(device)
    torch.testing.assert_close(
        kernels.invert_backward(grad, coords, ref, ref_valid),
        reference.invert_backward(grad, coords, ref, ref_valid), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_singular_map_uses_the_reference_fallback(backend, device):
    """Two equal rows make every Jacobian singular (and not symmetric): the least-squares step as
    in the reference, nothing valid, and no gradient."""
    matrix = torch.tensor([[0.5, 0.3, -0.2], [0.5, 0.3, -0.2], [0.2, -0.4, 0.9]], dtype=torch.float64)
    coords = affine_coords(matrix, [0.1, 0.0, -0.1], (8, 7, 6)).expand(2, -1, -1, -1, -1).contiguous()
    coords = coords.to(device).requires_grad_()
    with da.use_backend(backend):
        inverse, valid = da.invert(coords, (6, 7, 5), iters=4)
        inverse.sum().backward()
    ref, _ = on("reference", da.invert, coords.detach(), (6, 7, 5), iters=4)
    torch.testing.assert_close(inverse.detach(), ref, atol=1e-12, rtol=0)
    assert not valid.any()
    assert coords.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_folding_maps_follow_the_reference_trajectory(backend, device):
    """Random (folding) maps: Newton steps hit the step cap and the domain clamp; after a few
    steps every point, valid or not, is where the reference puts it."""
    coords = rand_coords(2, (6, 7, 5), g(51), spread=1.2).to(device)
    inverse, _ = on(backend, da.invert, coords, (7, 5, 6), iters=3)
    ref, _ = on("reference", da.invert, coords, (7, 5, 6), iters=3)
    # rounding differences (e.g. FMA contraction on a GPU) grow where J is nearly singular
    torch.testing.assert_close(inverse, ref, atol=1e-6, rtol=0)
    disp = (rand_coords(2, (6, 7, 5), g(52), spread=0.5) + smooth_displacement((6, 7, 5), g(53), 1.0, batch=2)).to(device)
    v, _ = on(backend, da.invert_displacement, disp, iters=3)
    torch.testing.assert_close(v, on("reference", da.invert_displacement, disp, iters=3)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_invert_displacement_matches_reference_and_round_trips(backend, device, dtype):
    shape = (9, 11, 8)
    disp = smooth_displacement(shape, g(13), 0.2, batch=2).to(dtype).to(device)
    v, valid = on(backend, da.invert_displacement, disp)
    ref, ref_valid = on("reference", da.invert_displacement, disp)
    assert v.shape == disp.shape and v.dtype == dtype and valid.shape == (2, 1, *shape)
    ident = identity_coords(shape, batch=2, dtype=dtype, device=device)
    ref_residual = residual_voxels(ident + disp, ident + ref, shape)
    differ = valid != ref_valid
    assert ((ref_residual[differ] - TOL).abs() <= MARGIN[dtype]).all()
    both = (valid & ref_valid).expand_as(v)
    torch.testing.assert_close(v[both], ref[both], atol=ATOL[dtype], rtol=0)
    # (id + disp) o (id + v) = id on valid points, and most points are valid
    assert (residual_voxels(ident + disp, ident + v, shape)[valid] <= TOL).all()
    assert valid.double().mean().item() > 0.5
    # iters=0 is clamp(id - disp, -1, 1) - id
    v0, _ = on(backend, da.invert_displacement, disp, iters=0)
    torch.testing.assert_close(v0, (ident - disp).clamp(-1, 1) - ident, atol=ATOL[dtype] / 10, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_kernels_match_reference(backend, device):
    """Same (inverse, valid) in, same gradient out; partial coverage so invalid points are present."""
    ops = torch.ops.deepatlas_fast
    coords = random_affine(21, (8, 9, 7), 2, torch.float64).to(device)
    inverse, valid = reference.invert_forward(coords, (9, 6, 10), 8, TOL)
    assert valid.any() and not valid.all()
    grad = torch.randn(inverse.shape, generator=g(22), dtype=torch.float64).to(device)
    expected = reference.invert_backward(grad, coords, inverse, valid)
    assert expected.abs().max().item() > 0
    torch.testing.assert_close(ops.invert_backward(grad, coords, inverse, valid, backend), expected, atol=1e-12, rtol=0)

    disp = smooth_displacement((8, 7, 9), g(23), 0.25, batch=2).to(device)
    v, v_valid = reference.invert_displacement_forward(disp, 8, TOL)
    assert v_valid.any() and not v_valid.all()
    grad = torch.randn(v.shape, generator=g(24), dtype=torch.float64).to(device)
    torch.testing.assert_close(
        ops.invert_displacement_backward(grad, disp, v, v_valid, backend),
        reference.invert_displacement_backward(grad, disp, v, v_valid), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autograd_matches_reference(backend, device, dtype):
    """Through the public API: forward and backward routed to the kernels."""
    coords = covering_map((8, 9, 7), g(31), batch=2).to(dtype).to(device)
    weights = torch.randn(2, 3, 7, 6, 8, generator=g(32), dtype=torch.float64).to(dtype).to(device)
    ident = identity_coords((7, 8, 6), dtype=torch.float64)
    window = (1 - ident**2).prod(dim=1, keepdim=True)  # zero on the border: every point has an inverse
    disp = (smooth_displacement((7, 8, 6), g(33), 0.3, batch=2) * window).to(dtype).to(device)
    disp_weights = torch.randn(disp.shape, generator=g(34), dtype=torch.float64).to(dtype).to(device)
    grads = {}
    for name in (backend, "reference"):
        c, d = coords.clone().requires_grad_(), disp.clone().requires_grad_()
        with da.use_backend(name):
            inverse, valid = da.invert(c, (7, 6, 8))
            v, v_valid = da.invert_displacement(d)
            ((inverse * weights).sum() + (v * disp_weights).sum()).backward()
        assert valid.all() and v_valid.all()
        grads[name] = (c.grad, d.grad)
    atol = 1e-10 if dtype == torch.float64 else 1e-3
    for mine, ref in zip(grads[backend], grads["reference"]):
        assert ref.abs().max().item() > 0.1
        torch.testing.assert_close(mine, ref, atol=atol, rtol=0 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_points_pass_no_gradient(backend, device):
    coords = affine_coords(torch.eye(3, dtype=torch.float64) * 0.5, [0.6, 0.0, 0.0], (7, 8, 6))
    coords = coords.expand(2, -1, -1, -1, -1).contiguous().to(device).requires_grad_()
    with da.use_backend(backend):
        inverse, valid = da.invert(coords, (8, 7, 9))
        assert valid.any() and not valid.all()
        (inverse * ~valid).sum().backward(retain_graph=True)
        assert coords.grad.abs().max().item() == 0.0
        coords.grad = None
        (inverse * valid).sum().backward()
        assert coords.grad.abs().max().item() > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_input_does_not_crash(backend, device):
    """With finiteness checks off, NaN/inf/huge values give invalid points, never a bad access."""
    da.set_check_finite(False)
    coords = covering_map((9, 8, 10), g(41), batch=2)
    coords[0, :, 2:4] = float("nan")
    coords[1, 0, 5, 5, 5] = float("inf")
    coords[1, 1, 1] = -1e30
    coords = coords.to(device).requires_grad_()
    with da.use_backend(backend):
        inverse, valid = da.invert(coords, (7, 9, 8))
        (inverse * valid).sum().backward()
    assert not (valid & inverse.isnan().any(dim=1, keepdim=True)).any()
    assert valid[1].any()
    assert coords.grad.isfinite().all()  # invalid points are skipped, not multiplied by 0
    disp = torch.randn(2, 3, 6, 7, 5, generator=g(42), dtype=torch.float64)
    disp[0, 0, 1] = float("nan")
    disp[1, 2, 2] = 1e300
    v, v_valid = on(backend, da.invert_displacement, disp.to(device))
    assert not (v_valid & v.isnan().any(dim=1, keepdim=True)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_jacobian_passes_no_gradient_on_both_backends(backend, device):
    """A map squashed 10^5:1 along x: the target column u_x = 0 still inverts (valid), but there
    J^-T g would be ~10^5 g; such points pass no gradient (reference and kernels alike)."""
    src = (7, 8, 9)
    coords = affine_coords(torch.diag(torch.tensor([1.2, 1.2, 1.2e-5], dtype=torch.float64)), [0.0, 0.0, 0.0], src)
    coords = coords.to(device)
    grads = {}
    for name in ("reference", backend):
        leaf = coords.clone().requires_grad_()
        with da.use_backend(name):
            inverse, valid = da.invert(leaf, (6, 7, 7))
            assert valid[..., 3].all() and not valid[..., 0].any()
            (inverse * torch.linspace(-1, 1, inverse.numel(), dtype=inverse.dtype, device=device).view_as(inverse)).sum().backward()
        grads[name] = leaf.grad
    assert grads["reference"].abs().max() < 1e3
    torch.testing.assert_close(grads[backend], grads["reference"], rtol=1e-9, atol=1e-9)


# ---- the C++ kernels (torch.ops.deepatlas_fast_C) ------------------------------------------------


def cpp_kernels(device):
    """The raw C++ ops, skipping where this build has no C++ kernels of invert for ``device``."""
    from deepatlas_fast.ops import registry

    reason = registry.unavailable_reason("cpu" if device == "cpu" else "cuda", OP, device)
    if reason is not None:
        pytest.skip(reason)
    return torch.ops.deepatlas_fast_C


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_cpu_results_do_not_depend_on_thread_count(restore_threads):
    """The splats (pyramid initial guess, backward) sum every node in point order on any thread count:
    bitwise equal results (float32, where the summation order would show)."""
    ops = cpp_kernels("cpu")
    coords = covering_map((13, 11, 12), g(61), batch=2, amplitude=0.08).to(torch.float32)
    disp = smooth_displacement((12, 9, 11), g(62), 0.3, batch=2).to(torch.float32)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        guess, _ = ops.invert(coords, [14, 9, 13], 0, TOL)
        inverse, valid = ops.invert(coords, [14, 9, 13], 4, TOL)
        grad_coords = ops.invert_backward(torch.randn(inverse.shape, generator=g(63)), coords, inverse, valid)
        v, v_valid = ops.invert_displacement(disp, 8, TOL)
        grad_disp = ops.invert_displacement_backward(torch.randn(v.shape, generator=g(64)), disp, v, v_valid)
        runs.append((guess, inverse, valid, grad_coords, v, v_valid, grad_disp))
    assert runs[0][3].abs().max() > 0 and runs[0][6].abs().max() > 0
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_reject_bad_inputs(device):
    """The C++ ops check their inputs themselves (they are callable without the Python layer)."""
    skip_if_cpp_errors_kill_cuda_processes(device)
    ops = cpp_kernels(device)
    coords = covering_map((5, 6, 4), g(65), batch=2).to(device)
    inverse, valid = ops.invert(coords, [4, 5, 7], 2, TOL)
    grad = torch.ones_like(inverse)
    disp = 0.1 * coords
    v, v_valid = ops.invert_displacement(disp, 2, TOL)
    calls = [
        (lambda: ops.invert(coords[:, :2].contiguous(), [4, 5, 7], 2, TOL), "coords must have 3 channels"),
        (lambda: ops.invert(coords[0], [4, 5, 7], 2, TOL), "coords must have 5 dimensions"),
        (lambda: ops.invert(coords.transpose(2, 4), [4, 5, 7], 2, TOL), "coords must be contiguous"),
        (lambda: ops.invert(coords.int(), [4, 5, 7], 2, TOL), "coords must be float32 or float64"),
        (lambda: ops.invert(coords[:, :, :1].contiguous(), [4, 5, 7], 2, TOL), "every spatial size >= 2"),
        (lambda: ops.invert(coords, [4, 5], 2, TOL), "out_shape must be 3 sizes"),
        (lambda: ops.invert(coords, [4, 1, 7], 2, TOL), "out_shape must be 3 sizes"),
        (lambda: ops.invert(coords, [4, 5, 7], -1, TOL), "iters must be >= 0"),
        (lambda: ops.invert(coords, [4, 5, 7], 2, 0.0), "tol must be positive"),
        (lambda: ops.invert_displacement(disp.float(), 2, float("nan")), "tol must be positive"),
        (lambda: ops.invert_displacement(disp[:, :, :, :1].contiguous(), 2, TOL), "disp must have every spatial"),
        (lambda: ops.invert_backward(grad, coords, inverse, valid.double()), "valid must be bool"),
        (lambda: ops.invert_backward(grad, coords, inverse, valid[..., :3].contiguous()), "valid must have shape"),
        (lambda: ops.invert_backward(grad[..., :3].contiguous(), coords, inverse, valid), "grad must have the shape"),
        (lambda: ops.invert_backward(grad.float(), coords, inverse, valid), "grad must have the dtype of coords"),
        (lambda: ops.invert_backward(grad, coords, inverse.float(), valid), "inverse must have the dtype of coords"),
        (lambda: ops.invert_backward(grad[:1], coords, inverse[:1], valid[:1]), "inverse must have the batch size"),
        (lambda: ops.invert_displacement_backward(grad, disp, inverse, valid), "inverse_disp must have the shape"),
        (lambda: ops.invert_displacement_backward(v, disp, v, v_valid.transpose(2, 3)), "valid must be contiguous"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25)
@given(
    src=st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(2, 12)),
    dst=st.tuples(st.integers(2, 14), st.integers(2, 14), st.integers(2, 14)),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    iters=st.sampled_from([0, 8]),
    affine=st.booleans(),
)
def test_cpp_kernels_match_reference_on_many_shapes(device, src, dst, seed, dtype, iters, affine):
    """The C++ kernels are fast enough for many examples: forward and backward of both ops, sizes from 2."""
    cpp_kernels(device)
    backend = "cpu" if device == "cpu" else "cuda"
    ops = torch.ops.deepatlas_fast
    rel = 1e-9 if dtype == torch.float64 else 1e-4

    def check_backward(ours, expected):
        torch.testing.assert_close(ours, expected, atol=rel * max(expected.abs().max().item(), 1.0), rtol=0)

    coords = random_affine(seed, src, 2, dtype) if affine else covering_map(src, g(seed), batch=2, amplitude=0.1)
    coords = coords.to(dtype).to(device)
    check_against_reference(backend, coords, dst, iters, device)
    ref, ref_valid = reference.invert_forward(coords, dst, iters, TOL)
    grad = torch.randn(ref.shape, generator=g(seed), dtype=dtype).to(device)
    check_backward(ops.invert_backward(grad, coords, ref, ref_valid, backend),
                   reference.invert_backward(grad, coords, ref, ref_valid))

    disp = smooth_displacement(src, g(seed + 1), 0.3, batch=2).to(dtype).to(device)
    v, valid = on(backend, da.invert_displacement, disp, iters=iters)
    ref, ref_valid = reference.invert_displacement_forward(disp, iters, TOL)
    ident = identity_coords(src, batch=2, dtype=dtype, device=device)
    differ = valid != ref_valid
    assert ((residual_voxels(ident + disp, ident + ref, src)[differ] - TOL).abs() <= MARGIN[dtype]).all()
    both = (valid & ref_valid).expand_as(v)
    torch.testing.assert_close(v[both], ref[both], atol=ATOL[dtype], rtol=0)
    grad = torch.randn(ref.shape, generator=g(seed + 2), dtype=dtype).to(device)
    check_backward(ops.invert_displacement_backward(grad, disp, ref, ref_valid, backend),
                   reference.invert_displacement_backward(grad, disp, ref, ref_valid))
