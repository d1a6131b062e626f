"""The DeepATLAS objective (deepatlas_fast.objective): every term finite, decreasing on a toy problem,
zero gradient where it must be, guards firing, and fused == stock."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import deepatlas_fast as da
import deepatlas_fast.objective as objective
from deepatlas_fast.model import DeepAtlas
from deepatlas_fast.objective import (
    TERMS,
    LossWeights,
    bound_term,
    collapse_term,
    deepatlas_loss,
    explicit_term,
    implicit_term,
    jacobian_terms,
    reconstruction_loss,
    recomputed_when_saved,
)
from deepatlas_fast.stock import get_ops
from helpers import g

S = 12


def _blobs(shape, seed, pad=4):
    """A smooth random image larger than ``shape`` by ``pad`` per side, [1, 1, ...]."""
    gen = g(seed)
    big = tuple(s + 2 * pad for s in shape)
    return F.interpolate(torch.rand(1, 1, 5, 5, 5, generator=gen), size=big, mode="trilinear", align_corners=True)


def _shifted_pair(shift=(2, 1, 0), size=S, seed=0):
    """Exams a and b = a shifted by ``shift`` voxels: b(p) = a(p - shift)."""
    big = _blobs((size,) * 3, seed)
    pad = 4
    a = big[:, :, pad : pad + size, pad : pad + size, pad : pad + size]
    d, h, w = (pad - s for s in shift)
    b = big[:, :, d : d + size, h : h + size, w : w + size]
    return torch.cat([a, b])


def _model(features=0, template=(S, S, S), seed=0, residual_scale=0.05, **kw):
    torch.manual_seed(seed)
    return DeepAtlas(base=4, levels=2, features=features, feature_width=4, template_shape=template,
                     residual_scale=residual_scale, **kw)


def _perturb_heads(model, std=0.05, seed=1):
    gen = g(seed)
    with torch.no_grad():
        for p in model.coordnet.heads.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


def test_loss_weights_validation_and_dict_round_trip():
    w = LossWeights(jacobian=0.5, kernel_size=5)
    assert LossWeights.from_dict(w.to_dict()) == w
    with pytest.raises(ValueError, match="unknown loss weight key.*jacobain"):
        LossWeights.from_dict({"jacobain": 1.0})
    with pytest.raises(ValueError, match="kernel_size"):
        LossWeights(kernel_size=4)
    with pytest.raises(ValueError, match="LossWeights.folding"):
        LossWeights(folding=-1)
    with pytest.raises(ValueError, match="LossWeights.invert_tol"):
        LossWeights(invert_tol=0)


def test_terms_finite_and_regularisers_zero_at_identity():
    model = _model(features=2)
    x = _shifted_pair()
    model.init_atlas(x)
    model.freeze_features()
    total, terms = deepatlas_loss(model, x, LossWeights(kernel_size=5))
    assert set(TERMS) <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    assert total.requires_grad and torch.isfinite(total)
    for name in ("jacobian", "logdet", "folding", "collapse", "bound"):
        assert abs(float(terms[name])) < 1e-8, name
    assert -1 <= float(terms["explicit"]) < -0.3 and -1 <= float(terms["implicit"]) < -0.1
    assert float(terms["valid_fraction"]) == 1.0 and abs(float(terms["det_mean"]) - 1) < 1e-5


def test_regularisers_have_zero_gradient_at_identity():
    coords = da.identity_coords((S, S, S), batch=2).requires_grad_()
    w = LossWeights()
    jac = jacobian_terms(coords, w)
    total = jac["jacobian"] + jac["logdet"] + jac["folding"] + collapse_term(coords) + bound_term(coords)
    (grad,) = torch.autograd.grad(total, coords)
    assert grad.abs().max() < 1e-6


def test_explicit_term_decreases_on_shifted_copy():
    """Atlas = exam a (fixed); exam b is a shifted: the explicit term (with the Jacobian terms) must
    fall and b's coordinates must move by the shift."""
    x = _shifted_pair((2, 1, 0), size=14)
    model = _model(template=(14, 14, 14))
    with torch.no_grad():
        model.atlas.copy_(x[:1])
    model.atlas.requires_grad_(False)
    w = LossWeights(implicit=0, kernel_size=5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(25):
        total, terms = deepatlas_loss(model, x, w)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(terms["explicit"]))
    assert history[-1] < history[0] - 0.05
    disp = (model.coordinates(x).detach() - da.identity_coords((14,) * 3)) * 6.5  # voxels
    moved = disp[1, :, 4:-4, 4:-4, 4:-4].mean(dim=(1, 2, 3))
    assert moved[0] < -0.5 and moved[1] < -0.2  # towards (-2, -1, 0)


def test_implicit_term_decreases_on_shifted_pair():
    x = _shifted_pair((2, 0, 0), size=12, seed=3)
    model = _model(template=(8, 8, 8))
    w = LossWeights(explicit=0, kernel_size=5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(15):
        total, terms = deepatlas_loss(model, x, w)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(terms["implicit"]))
    assert all(torch.isfinite(torch.tensor(history)))
    assert min(history[-5:]) < history[0] - 0.02


def test_jacobian_terms_decrease_from_a_rough_map():
    model = _model()
    _perturb_heads(model, 1.0)
    x = _shifted_pair()
    w = LossWeights(explicit=0, implicit=0)
    opt = torch.optim.Adam(model.coordnet.parameters(), lr=3e-3)
    first = last = None
    for step in range(15):
        total, terms = deepatlas_loss(model, x, w)
        opt.zero_grad()
        total.backward()
        opt.step()
        value = float(terms["jacobian"] + terms["logdet"] + terms["folding"])
        first = value if first is None else first
        last = value
    assert first > 0 and last < 0.5 * first


def test_implicit_no_gradient_through_invalid_points():
    w = LossWeights(kernel_size=3)
    shape = (S, S, S)
    ca = da.identity_coords(shape).clone()
    cb = da.identity_coords(shape) * 0.5  # exam b covers only the central half of the template
    coords = torch.cat([ca, cb]).requires_grad_()
    feats = torch.cat([_blobs(shape, 5, pad=0), _blobs(shape, 6, pad=0)])
    pairs = torch.tensor([1, 0])
    loss, valid_fraction = implicit_term(coords, feats, shape, w, pairs=pairs, return_valid_fraction=True)
    assert torch.isfinite(loss) and 0 < float(valid_fraction) < 1
    (grad,) = torch.autograd.grad(loss, coords)
    outside = (ca.abs() > 0.5 + 2 / (S - 1)).any(dim=1, keepdim=True).expand(-1, 3, -1, -1, -1)
    assert grad[:1][outside].abs().max() == 0  # exam a's voxels mapped where b has no anatomy
    assert grad[:1][~outside].abs().max() > 0
    # disjoint template regions: nothing valid at all -> loss 0 and no gradient anywhere
    ident = da.identity_coords(shape)
    far = torch.cat([0.25 * ident - 0.75, 0.25 * ident + 0.75]).requires_grad_()
    loss, frac = implicit_term(far, feats, shape, w, pairs=pairs, return_valid_fraction=True)
    (grad,) = torch.autograd.grad(loss, far, allow_unused=True)
    assert float(frac) == 0 and float(loss.detach()) == 0 and (grad is None or grad.abs().max() == 0)


def test_frozen_features_get_no_gradient_from_the_objective():
    model = _model(features=2)
    x = _shifted_pair()
    model.init_atlas(x)
    model.freeze_features()
    _perturb_heads(model)
    total, _ = deepatlas_loss(model, x, LossWeights(kernel_size=5))
    total.backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert model.atlas.grad is not None and model.atlas.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.coordnet.parameters())


def test_collapse_guard_fires_on_collapsed_map():
    ident = da.identity_coords((S, S, S), batch=2)
    assert float(collapse_term(ident)) == 0
    assert float(collapse_term(0.6 * ident)) == 0  # a smaller but healthy spread (0.36 of the variance)
    collapsed = 0.05 * ident
    assert float(collapse_term(collapsed)) > 0.05
    plane = ident.clone()
    plane[:, 2] = 0.0  # every voxel on one plane
    assert float(collapse_term(plane)) > 0.01
    c = collapsed.clone().requires_grad_()
    (grad,) = torch.autograd.grad(collapse_term(c), c)
    # the gradient pushes coordinates outwards (spreads them)
    assert float((grad * c.detach()).sum()) < 0


def test_folding_and_bound_terms_fire():
    ident = da.identity_coords((S, S, S), batch=1)
    folded = ident.clone()
    folded[:, 0, 4:8] = folded[:, 0, 4:8].flip(1)  # reverse a slab along D: det < 0 there
    jac = jacobian_terms(folded, LossWeights())
    assert float(jac["folding"]) > 0 and float(jac["folding_fraction"]) > 0
    outside = ident * 1.5
    assert float(bound_term(outside)) > 0 and float(bound_term(ident)) == 0


def test_bound_term_matches_its_formula_and_gradient():
    from deepatlas_fast.objective import _BoundLoss

    c = (1.5 * torch.randn(2, 3, 5, 6, 7, generator=g(8), dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(_BoundLoss.apply, (c,))
    expected = F.relu(c.abs() - 1).pow(2).mean()
    torch.testing.assert_close(_BoundLoss.apply(c), expected)
    torch.testing.assert_close(torch.autograd.grad(_BoundLoss.apply(c), c)[0], torch.autograd.grad(expected, c)[0])


def _implicit_batched(coords, feats, shape, w, ops, pairs):
    """The implicit term as DESIGN §5 writes it, on whole batches (permuted copies of the features)."""
    ops = get_ops(ops)
    psi, valid = ops.invert(coords, shape, w.invert_iters, w.invert_tol)
    mask = ops.sample(valid[pairs].to(coords.dtype), coords.detach(), "zeros") >= 0.5
    target = ops.sample(psi[pairs], coords)
    target = torch.where(mask, target, target.detach())
    warped = ops.sample(feats[pairs].detach(), target)
    ncc = ops.lncc(feats, warped, w.kernel_size, w.kernel, w.eps, "none")
    return -(ncc * mask).sum() / (mask.sum() * feats.shape[1]).clamp_min(1)


@pytest.mark.parametrize("ops", ["fused", "stock"])
def test_implicit_term_equals_the_batched_formula(ops, monkeypatch):
    """One exam (and group of channels) at a time on batch views, the sampled features recomputed for the
    backward: the loss and gradient of the batched formula, for the default pairs (b = a + 1) and a given
    permutation."""
    n, shape = 3, (S, S, S)
    monkeypatch.setattr(objective, "LNCC_GROUP_ELEMENTS", 3 * S**3)
    coords = (da.identity_coords(shape, batch=n) * 0.9 + 0.03 * torch.randn(n, 3, *shape, generator=g(9)))
    coords = coords.requires_grad_()
    feats = torch.rand(n, 5, *shape, generator=g(10))  # (in channel groups of 3 and 2)
    w = LossWeights(invert_iters=4)
    for pairs in (None, torch.tensor([2, 0, 1])):
        expected = _implicit_batched(coords, feats, shape, w, ops, torch.roll(torch.arange(n), -1) if pairs is None else pairs)
        loss, frac = implicit_term(coords, feats, shape, w, ops, pairs=pairs, return_valid_fraction=True)
        assert float(frac) > 0.5
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, coords)[0], torch.autograd.grad(expected, coords)[0])
    with pytest.raises(ValueError, match="pairs must hold exam indices"):
        implicit_term(coords, feats, shape, w, ops, pairs=torch.tensor([0, 1, 3]))


@pytest.mark.parametrize("ops", ["fused", "stock"])
def test_recomputed_when_saved_frees_the_tensor_and_keeps_the_gradients(ops):
    """The LNCC terms' sampled volumes are not held for the backward (rebuilt from their recipe there); the
    gradients equal those of holding them."""
    ops_ = get_ops(ops)
    vol = torch.rand(2, 3, 7, 8, 9, generator=g(11), requires_grad=True)
    coords = (da.identity_coords((6, 7, 8), batch=2) + 0.1 * torch.randn(2, 3, 6, 7, 8, generator=g(12)))
    coords.requires_grad_()
    feats = torch.rand(2, 3, 6, 7, 8, generator=g(13), requires_grad=True)
    plain = ops_.lncc(feats, ops_.sample(vol, coords), 3, "box", 1e-5, "mean")
    expected = torch.autograd.grad(plain, (vol, coords, feats))
    warped = ops_.sample(vol, coords)
    held = weakref.ref(warped)
    with recomputed_when_saved(warped, lambda: ops_.sample(vol.detach(), coords.detach())):
        loss = ops_.lncc(feats, warped, 3, "box", 1e-5, "mean")
    del warped
    gc.collect()
    assert held() is None, "the sampled volume outlived the forward"
    torch.testing.assert_close(loss, plain)
    for ours, theirs in zip(torch.autograd.grad(loss, (vol, coords, feats)), expected):
        torch.testing.assert_close(ours, theirs)


def test_fused_and_stock_give_the_same_loss():
    model = _model(features=2, template=(10, 10, 10))
    x = _shifted_pair(size=S)
    model.init_atlas(x)
    model.freeze_features()
    _perturb_heads(model, 0.3)
    w = LossWeights(kernel_size=5, implicit=0)
    out = model(x)
    tf, terms_f = deepatlas_loss(model, x, w, ops="fused", outputs=out)
    ts, terms_s = deepatlas_loss(model, x, w, ops="stock", outputs=out)
    # float32 LNCC of the stock ops (conv window sums, E[x^2]-E[x]^2) is off by ~1e-4 relative on these
    # smooth images (measured: stock -6.7e-5, reference backend -8.8e-5, cpu kernels +2.6e-8 from float64),
    # so the explicit term and the total agree to 3e-4, the other terms to 1e-4
    for name in ("explicit", "jacobian", "logdet", "folding", "collapse", "bound"):
        rtol = 3e-4 if name == "explicit" else 1e-4
        torch.testing.assert_close(terms_f[name], terms_s[name], rtol=rtol, atol=1e-6)
    torch.testing.assert_close(tf, ts, rtol=3e-4, atol=1e-6)
    # gradients: equal up to float32 rounding, which the LNCC variance (a difference of window sums)
    # amplifies on these very smooth images, most for the atlas
    for param, tol in ((model.atlas, 3e-2), (model.coordnet.heads[0].weight, 1e-3)):
        gf = torch.autograd.grad(tf, param, retain_graph=True)[0]
        gs = torch.autograd.grad(ts, param, retain_graph=True)[0]
        assert float((gf - gs).norm() / gf.norm()) < tol
    # implicit term: both inversions are approximate (different solvers); on a smooth, unfolded map
    # they agree to the solver tolerance (on rough, folding maps the validity masks drift apart)
    model = _model(features=2, template=(10, 10, 10))
    model.init_atlas(x)
    model.freeze_features()
    _perturb_heads(model, 0.1)
    out = model(x)
    w = LossWeights(kernel_size=5, explicit=0)
    _, terms_f = deepatlas_loss(model, x, w, ops="fused", outputs=out)
    _, terms_s = deepatlas_loss(model, x, w, ops="stock", outputs=out)
    assert float(terms_f["folding_fraction"]) == 0 and 0.9 < float(terms_f["valid_fraction"]) < 1
    assert abs(float(terms_f["valid_fraction"]) - float(terms_s["valid_fraction"])) < 0.005
    assert abs(float(terms_f["implicit"]) - float(terms_s["implicit"])) < 1e-3


def test_zero_weights_skip_terms_and_errors():
    model = _model()
    x = _shifted_pair()
    w = LossWeights(**{name: 0 for name in TERMS})
    total, terms = deepatlas_loss(model, x, w)
    assert float(total.detach()) == 0 and total.requires_grad
    with pytest.raises(ValueError, match="images must hold at least 2"):
        deepatlas_loss(model, x[:1])
    deepatlas_loss(model, x[:1], LossWeights(implicit=0))  # one exam is fine without the implicit term
    with pytest.raises(ValueError, match="ops must be one of"):
        deepatlas_loss(model, x, ops="fast")
    with pytest.raises(ValueError, match="unknown loss weight"):
        deepatlas_loss(model, x, {"explicitt": 1})
    with pytest.raises(ValueError, match="images"):
        deepatlas_loss(model, x[0])


def test_loss_under_bf16_autocast_is_float32():
    model = _model()
    x = _shifted_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = deepatlas_loss(model, x, LossWeights(kernel_size=5))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()


def test_reconstruction_loss_trains_the_autoencoder():
    model = _model(features=3)
    x = _shifted_pair(size=8)
    opt = torch.optim.Adam(model.features.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        loss = reconstruction_loss(model, x, noise_std=0.02, generator=g(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in model.coordnet.parameters())
    with pytest.raises(ValueError, match="features=0"):
        reconstruction_loss(_model(features=0), x)


@pytest.mark.parametrize("ops", ["fused", "stock"])
def test_explicit_term_equals_the_batched_formula(ops, monkeypatch):
    """One exam and one group of channels at a time, sampled again for the backward: the loss and gradients
    of lncc(features, sample(atlas, coords)) over every channel and exam at once."""
    n, shape = 2, (S, S - 1, S + 1)
    monkeypatch.setattr(objective, "LNCC_GROUP_ELEMENTS", 3 * S**3)
    ops_ = get_ops(ops)
    coords = (da.identity_coords(shape, batch=n) * 0.9 + 0.03 * torch.randn(n, 3, *shape, generator=g(33)))
    coords = coords.requires_grad_()
    feats = torch.rand(n, 7, *shape, generator=g(34))  # groups of 3, 3 and 1 channels
    atlas = torch.rand(1, 7, 9, 10, 8, generator=g(35), requires_grad=True)
    w = LossWeights(kernel_size=5)
    expected = ops_.lncc(feats, ops_.sample(atlas.expand(n, -1, -1, -1, -1), coords), 5, "box", w.eps, "mean")
    loss = explicit_term(coords, feats, atlas, w, ops)
    torch.testing.assert_close(loss, expected)
    for ours, theirs in zip(torch.autograd.grad(loss, (coords, atlas)), torch.autograd.grad(expected, (coords, atlas))):
        torch.testing.assert_close(ours, theirs)


def _framed_map(n, shape, seed):
    """A smooth map and an affine frame (rotation, anisotropic scale, a reflection in the second exam)."""
    coords = da.identity_coords(shape, batch=n) * 0.8 + 0.05 * torch.randn(n, 3, *shape, generator=g(seed))
    frame = torch.zeros(n, 3, 4)
    for i in range(n):
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g(seed + 1 + i)))
        frame[i, :, :3] = q @ torch.diag(torch.tensor([0.7, 1.1, 0.9]) * (1 if i == 0 else -1))
        frame[i, :, 3] = 0.1 * torch.randn(3, generator=g(seed + 5 + i))
    return coords.requires_grad_(), frame


def test_regularisers_of_the_map_relative_to_its_frame_without_making_it():
    """jacobian_terms / collapse_term given the frame = the terms of frame^-1(c) made explicitly, values and
    gradients (det J divided by the frame's determinant; variances from the map's covariance)."""
    from deepatlas_fast.frame import apply_frame, invert_frame

    coords, frame = _framed_map(2, (9, 10, 11), 36)
    w = LossWeights()
    ours, theirs = jacobian_terms(coords, w, frame=frame), jacobian_terms(apply_frame(invert_frame(frame), coords), w)
    for name in ("jacobian", "logdet", "folding", "det_mean", "folding_fraction"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    assert theirs["jacobian"].item() > 0 and theirs["logdet"].item() > 0
    a = torch.autograd.grad(ours["jacobian"] + ours["logdet"], coords)[0]
    b = torch.autograd.grad(theirs["jacobian"] + theirs["logdet"], coords)[0]
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())
    for ratio in (0.25, 0.9):  # (0.9: the guard fires on these maps)
        ours, theirs = collapse_term(coords, ratio, frame), collapse_term(apply_frame(invert_frame(frame), coords), ratio)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert theirs.item() > 0
    a, b = torch.autograd.grad(ours, coords)[0], torch.autograd.grad(theirs, coords)[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_channel_groups():
    from deepatlas_fast.objective import LNCC_GROUP_ELEMENTS, _channel_group

    assert _channel_group(9, 256**3) == 3 and _channel_group(9, 160**3) == 9 and _channel_group(9, 512**3) == 1
    assert _channel_group(2, 8) == 2 and LNCC_GROUP_ELEMENTS == 3 * 256**3


def test_spatial_covariance_matches_autograd():
    from deepatlas_fast.objective import _SpatialCovariance

    x = torch.randn(2, 3, 40, generator=g(37), dtype=torch.float64, requires_grad=True)
    centred = x - x.mean(dim=2, keepdim=True)
    expected = centred @ centred.transpose(1, 2) / x.shape[2]
    ours = _SpatialCovariance.apply(x)
    torch.testing.assert_close(ours, expected)
    up = torch.randn(2, 3, 3, generator=g(38), dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ours, x, up)[0], torch.autograd.grad(expected, x, up)[0])
    assert torch.autograd.gradcheck(_SpatialCovariance.apply, (x,))


def test_spatial_variance_matches_autograd_var():
    from deepatlas_fast.objective import _SpatialVariance

    x = torch.randn(2, 3, 50, generator=g(31), dtype=torch.float64, requires_grad=True)
    expected = x.var(dim=2, unbiased=False)
    ours = _SpatialVariance.apply(x)
    torch.testing.assert_close(ours, expected)
    up = torch.randn(2, 3, generator=g(32), dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ours, x, up)[0], torch.autograd.grad(expected, x, up)[0])
    assert torch.autograd.gradcheck(_SpatialVariance.apply, (x,))


def test_recomputation_skips_the_finiteness_checks():
    """The forward validated the inputs: the backward's recomputation runs without the checks (a host sync
    each on a GPU), and they are on again afterwards."""
    from deepatlas_fast.ops.validation import check_finite_enabled

    seen = []
    x = torch.rand(4, requires_grad=True)
    y = x * 2.0

    def make():
        seen.append(check_finite_enabled())
        return x.detach() * 2.0

    with recomputed_when_saved(y, make):
        loss = (y * y).sum()  # mul saves y
    loss.backward()
    assert seen == [False] and check_finite_enabled()
    torch.testing.assert_close(x.grad, 8.0 * x.detach())


def test_a_tensor_saved_twice_is_remade_once_and_let_go_after_its_last_use():
    """y * y saves y twice (an in-place activation and the next convolution do too): one recomputation serves
    both, and nothing keeps it once both have used it, even with the graph retained."""
    x = torch.rand(4, requires_grad=True)
    y = x * 2.0
    made = []

    def make():
        made.append(x.detach() * 2.0)
        return made[-1]

    with recomputed_when_saved(y, make):
        loss = (y * y).sum()
    loss.backward(retain_graph=True)
    assert len(made) == 1
    first = weakref.ref(made.pop())
    gc.collect()
    assert first() is None, "the recomputed tensor outlived its last use"
    loss.backward()  # the retained graph remakes it again
    assert len(made) == 1
    torch.testing.assert_close(x.grad, 16.0 * x.detach())


def test_implicit_term_inverts_the_raw_maps():
    """deepatlas_loss's implicit term is implicit_term of the raw maps, not of the maps clamped to the template
    cube: where the clamp binds a map's Jacobian is singular, and inverting the clamped maps of a trained model
    gave a few voxels on the cube's faces 99 % of the term's gradient (benchmarks/results/2026-11-27-loss-memory.md)."""
    from deepatlas_fast.model import bound_coords

    shape = (S, S, S)
    raw = da.identity_coords(shape, batch=2) * 1.3 + 0.03 * torch.randn(2, 3, *shape, generator=g(40))
    raw.requires_grad_()
    feats = torch.rand(2, 2, *shape, generator=g(41))
    model = _model(template=(10, 10, 10))
    outputs = {"coords": bound_coords(raw), "coords_raw": raw, "features": feats, "atlas": model.atlas}
    w = LossWeights(explicit=0, jacobian=0, logdet=0, folding=0, collapse=0, bound=0)
    total, _ = deepatlas_loss(model, torch.rand(2, 1, *shape), w, outputs=outputs)
    expected = implicit_term(raw, feats, (10, 10, 10), w)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(torch.autograd.grad(total, raw)[0], torch.autograd.grad(expected, raw)[0])
    clamped = implicit_term(bound_coords(raw), feats, (10, 10, 10), w)
    assert abs(clamped.item() - expected.item()) > 1e-4
