"""Triton backend of invert / invert_displacement against the reference backend (the oracle).

On the CPU the kernels run in the Triton interpreter (conftest), ~25 ms per program instance:
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
from conftest import DEVICES
from helpers import affine_coords, covering_map, g, rand_coords, rotation, smooth_displacement

pytestmark = pytest.mark.filterwarnings("error::deepatlas_fast.ops.registry.BackendFallbackWarning")

TOL = 0.05
# where both are valid, |inverse_triton - inverse_reference| in normalised units
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


def check_against_reference(coords, out_shape, iters, device):
    """Triton vs reference invert on ``coords``; returns the triton result."""
    dtype = coords.dtype
    coords = coords.to(device)
    inverse, valid = on("triton", da.invert, coords, out_shape, iters=iters, tol=TOL)
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
def test_affine_maps_match_reference(device, src, dst, seed, dtype):
    _, valid = check_against_reference(random_affine(seed, src, 2, dtype), dst, 8, device)
    assert valid.shape == (2, 1, *dst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smooth_covering_maps_match_reference(device, dtype):
    coords = covering_map((12, 10, 11), g(3), batch=2, amplitude=0.05).to(dtype)
    _, valid = check_against_reference(coords, (9, 13, 8), 8, device)
    assert valid.all()


@pytest.mark.parametrize("device", DEVICES)
def test_initial_guess_alone_matches_reference(device):
    """iters=0 returns the splatted pyramid guess; a target finer than the source leaves holes in the
    finest level, so the coarse levels and their upsampling are used."""
    coords = random_affine(5, (7, 6, 8), 2, torch.float64).to(device)
    inverse, _ = on("triton", da.invert, coords, (15, 13, 16), iters=0)
    ref, _ = on("reference", da.invert, coords, (15, 13, 16), iters=0)
    torch.testing.assert_close(inverse, ref, atol=1e-12, rtol=0)
    # a 2x2x2 target is a single pyramid level
    inverse, _ = on("triton", da.invert, coords, (2, 2, 2), iters=0)
    torch.testing.assert_close(inverse, on("reference", da.invert, coords, (2, 2, 2), iters=0)[0], atol=1e-12, rtol=0)
    # a small source in a corner of the target: the coarsest level has a cell with weight 0.045
    corner = affine_coords(torch.eye(3, dtype=torch.float64) * 0.1, [0.85, 0.8, 0.85], (4, 5, 4)).to(device)
    inverse, _ = on("triton", da.invert, corner, (5, 6, 7), iters=0)
    torch.testing.assert_close(inverse, on("reference", da.invert, corner, (5, 6, 7), iters=0)[0], atol=1e-12, rtol=0)


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
def test_singular_map_uses_the_reference_fallback(device):
    """Two equal rows make every Jacobian singular (and not symmetric): the least-squares step as
    in the reference, nothing valid, and no gradient."""
    matrix = torch.tensor([[0.5, 0.3, -0.2], [0.5, 0.3, -0.2], [0.2, -0.4, 0.9]], dtype=torch.float64)
    coords = affine_coords(matrix, [0.1, 0.0, -0.1], (8, 7, 6)).expand(2, -1, -1, -1, -1).contiguous()
    coords = coords.to(device).requires_grad_()
    with da.use_backend("triton"):
        inverse, valid = da.invert(coords, (6, 7, 5), iters=4)
        inverse.sum().backward()
    ref, _ = on("reference", da.invert, coords.detach(), (6, 7, 5), iters=4)
    torch.testing.assert_close(inverse.detach(), ref, atol=1e-12, rtol=0)
    assert not valid.any()
    assert coords.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_folding_maps_follow_the_reference_trajectory(device):
    """Random (folding) maps: Newton steps hit the step cap and the domain clamp; after a few
    steps every point, valid or not, is where the reference puts it."""
    coords = rand_coords(2, (6, 7, 5), g(51), spread=1.2).to(device)
    inverse, _ = on("triton", da.invert, coords, (7, 5, 6), iters=3)
    ref, _ = on("reference", da.invert, coords, (7, 5, 6), iters=3)
    # rounding differences (e.g. FMA contraction on a GPU) grow where J is nearly singular
    torch.testing.assert_close(inverse, ref, atol=1e-6, rtol=0)
    disp = (rand_coords(2, (6, 7, 5), g(52), spread=0.5) + smooth_displacement((6, 7, 5), g(53), 1.0, batch=2)).to(device)
    v, _ = on("triton", da.invert_displacement, disp, iters=3)
    torch.testing.assert_close(v, on("reference", da.invert_displacement, disp, iters=3)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_invert_displacement_matches_reference_and_round_trips(device, dtype):
    shape = (9, 11, 8)
    disp = smooth_displacement(shape, g(13), 0.2, batch=2).to(dtype).to(device)
    v, valid = on("triton", da.invert_displacement, disp)
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
    v0, _ = on("triton", da.invert_displacement, disp, iters=0)
    torch.testing.assert_close(v0, (ident - disp).clamp(-1, 1) - ident, atol=ATOL[dtype] / 10, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_kernels_match_reference(device):
    """Same (inverse, valid) in, same gradient out; partial coverage so invalid points are present."""
    coords = random_affine(21, (8, 9, 7), 2, torch.float64).to(device)
    inverse, valid = reference.invert_forward(coords, (9, 6, 10), 8, TOL)
    assert valid.any() and not valid.all()
    grad = torch.randn(inverse.shape, generator=g(22), dtype=torch.float64).to(device)
    expected = reference.invert_backward(grad, coords, inverse, valid)
    assert expected.abs().max().item() > 0
    torch.testing.assert_close(kernels.invert_backward(grad, coords, inverse, valid), expected, atol=1e-12, rtol=0)

    disp = smooth_displacement((8, 7, 9), g(23), 0.25, batch=2).to(device)
    v, v_valid = reference.invert_displacement_forward(disp, 8, TOL)
    assert v_valid.any() and not v_valid.all()
    grad = torch.randn(v.shape, generator=g(24), dtype=torch.float64).to(device)
    torch.testing.assert_close(
        kernels.invert_displacement_backward(grad, disp, v, v_valid),
        reference.invert_displacement_backward(grad, disp, v, v_valid), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autograd_matches_reference(device, dtype):
    """Through the public API: forward and backward routed to the kernels."""
    coords = covering_map((8, 9, 7), g(31), batch=2).to(dtype).to(device)
    weights = torch.randn(2, 3, 7, 6, 8, generator=g(32), dtype=torch.float64).to(dtype).to(device)
    ident = identity_coords((7, 8, 6), dtype=torch.float64)
    window = (1 - ident**2).prod(dim=1, keepdim=True)  # zero on the border: every point has an inverse
    disp = (smooth_displacement((7, 8, 6), g(33), 0.3, batch=2) * window).to(dtype).to(device)
    disp_weights = torch.randn(disp.shape, generator=g(34), dtype=torch.float64).to(dtype).to(device)
    grads = {}
    for backend in ("triton", "reference"):
        c, d = coords.clone().requires_grad_(), disp.clone().requires_grad_()
        with da.use_backend(backend):
            inverse, valid = da.invert(c, (7, 6, 8))
            v, v_valid = da.invert_displacement(d)
            ((inverse * weights).sum() + (v * disp_weights).sum()).backward()
        assert valid.all() and v_valid.all()
        grads[backend] = (c.grad, d.grad)
    atol = 1e-10 if dtype == torch.float64 else 1e-3
    for mine, ref in zip(grads["triton"], grads["reference"]):
        assert ref.abs().max().item() > 0.1
        torch.testing.assert_close(mine, ref, atol=atol, rtol=0 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_points_pass_no_gradient(device):
    coords = affine_coords(torch.eye(3, dtype=torch.float64) * 0.5, [0.6, 0.0, 0.0], (7, 8, 6))
    coords = coords.expand(2, -1, -1, -1, -1).contiguous().to(device).requires_grad_()
    with da.use_backend("triton"):
        inverse, valid = da.invert(coords, (8, 7, 9))
        assert valid.any() and not valid.all()
        (inverse * ~valid).sum().backward(retain_graph=True)
        assert coords.grad.abs().max().item() == 0.0
        coords.grad = None
        (inverse * valid).sum().backward()
        assert coords.grad.abs().max().item() > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_input_does_not_crash(device):
    """With finiteness checks off, NaN/inf/huge values give invalid points, never a bad access."""
    da.set_check_finite(False)
    coords = covering_map((9, 8, 10), g(41), batch=2)
    coords[0, :, 2:4] = float("nan")
    coords[1, 0, 5, 5, 5] = float("inf")
    coords[1, 1, 1] = -1e30
    coords = coords.to(device).requires_grad_()
    with da.use_backend("triton"):
        inverse, valid = da.invert(coords, (7, 9, 8))
        (inverse * valid).sum().backward()
    assert not (valid & inverse.isnan().any(dim=1, keepdim=True)).any()
    assert valid[1].any()
    assert coords.grad.isfinite().all()  # invalid points are skipped, not multiplied by 0
    disp = torch.randn(2, 3, 6, 7, 5, generator=g(42), dtype=torch.float64)
    disp[0, 0, 1] = float("nan")
    disp[1, 2, 2] = 1e300
    v, v_valid = on("triton", da.invert_displacement, disp.to(device))
    assert not (v_valid & v.isnan().any(dim=1, keepdim=True)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_jacobian_passes_no_gradient_on_both_backends(device):
    """A map squashed 10^5:1 along x: the target column u_x = 0 still inverts (valid), but there
    J^-T g would be ~10^5 g; such points pass no gradient (reference and triton alike)."""
    src = (7, 8, 9)
    coords = affine_coords(torch.diag(torch.tensor([1.2, 1.2, 1.2e-5], dtype=torch.float64)), [0.0, 0.0, 0.0], src)
    coords = coords.to(device)
    grads = {}
    for name in ("reference", "triton"):
        leaf = coords.clone().requires_grad_()
        with da.use_backend(name):
            inverse, valid = da.invert(leaf, (6, 7, 7))
            assert valid[..., 3].all() and not valid[..., 0].any()
            (inverse * torch.linspace(-1, 1, inverse.numel(), dtype=inverse.dtype, device=device).view_as(inverse)).sum().backward()
        grads[name] = leaf.grad
    assert grads["reference"].abs().max() < 1e3
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-9, atol=1e-9)
