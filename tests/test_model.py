"""CoordNet, FeatureNet and DeepAtlas (deepatlas_fast.model)."""

import io

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.model import CoordNet, DeepAtlas, FeatureNet, _ConvBlock, bound_coords
from helpers import g


def _perturb(module, std, seed=0):
    gen = g(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("shape", [(16, 16, 16), (13, 17, 11), (5, 9, 7)])
def test_coordnet_starts_exactly_at_identity(shape):
    torch.manual_seed(0)
    net = CoordNet(base=4, levels=3)
    x = torch.rand(2, 1, *shape, generator=g(1))
    out = net(x)
    assert out.shape == (2, 3, *shape) and out.dtype == torch.float32
    assert torch.equal(out, da.identity_coords(shape, batch=2))
    for levels in (1, 2):
        assert torch.equal(net(x, levels=levels), out)


def test_coordnet_levels_and_return_levels():
    torch.manual_seed(0)
    net = CoordNet(base=4, levels=3)
    _perturb(net.heads, 0.05)
    x = torch.rand(1, 1, 13, 10, 9, generator=g(2))
    out, maps = net(x, return_levels=True)
    assert [tuple(m.shape[2:]) for m in maps] == [(4, 3, 3), (7, 5, 5), (13, 10, 9)]
    _, maps1 = net(x, levels=1, return_levels=True)
    assert len(maps1) == 1
    # levels=k ignores the finer heads: changing them leaves the output unchanged, and they get no gradient
    coarse = net(x, levels=2)
    with torch.no_grad():
        net.heads[0].weight.add_(1.0)
    torch.testing.assert_close(net(x, levels=2), coarse)
    assert not torch.equal(net(x, levels=3), out)
    net.zero_grad()
    net(x, levels=2, bound=False).sum().backward()
    assert net.heads[0].weight.grad is None and net.decoders[0][0].weight.grad is None
    assert net.heads[1].weight.grad is not None and net.heads[1].weight.grad.abs().sum() > 0
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match="levels"):
            net(x, levels=bad)


def test_coordnet_output_bounded_with_straight_through_gradient():
    torch.manual_seed(0)
    net = CoordNet(base=4, levels=2)
    _perturb(net.heads, 2.0, seed=3)
    x = torch.rand(1, 1, 8, 8, 8, generator=g(3))
    raw = net(x, bound=False)
    out = net(x)
    assert raw.abs().max() > 1.0  # the raw map leaves the cube ...
    assert out.abs().max() <= 1.0  # ... the output does not
    torch.testing.assert_close(out, raw.clamp(-1, 1))
    r = torch.tensor([-3.0, -1.0, 0.5, 2.0], requires_grad=True)
    bound_coords(r).sum().backward()
    assert torch.equal(r.grad, torch.ones(4))  # gradient passes even outside the cube


def test_coordnet_rejects_bad_input():
    net = CoordNet(base=4, levels=2)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="spatial size"):
        net(torch.rand(1, 1, 8, 1, 8))
    with pytest.raises(ValueError, match="levels"):
        CoordNet(levels=0)
    with pytest.raises(ValueError, match="residual_scale"):
        CoordNet(residual_scale=0)


def test_featurenet_shapes():
    net = FeatureNet(features=5, width=4)
    x = torch.rand(2, 1, 9, 7, 11, generator=g(4))
    assert net.encode(x).shape == (2, 5, 9, 7, 11)
    assert net(x).shape == x.shape


def test_deepatlas_forward_config_and_round_trip():
    torch.manual_seed(0)
    model = DeepAtlas(base=4, levels=2, features=3, feature_width=4, template_shape=(8, 9, 10),
                      preprocessing={"spacing": 2.0})
    assert model.atlas.shape == (1, 4, 8, 9, 10) and model.feature_channels == 4
    assert model.atlas.std() > 0  # never a constant atlas
    x = torch.rand(2, 1, 10, 10, 10, generator=g(5))
    out = model(x)
    assert set(out) == {"coords_raw", "coords", "features", "atlas", "frame"} and out["frame"] is None
    assert out["features"].shape == (2, 4, 10, 10, 10)
    torch.testing.assert_close(out["features"][:, 3:], x)  # last channel: the intensity
    _perturb(model.coordnet.heads, 0.05)
    model.init_atlas(x)
    assert bool(model.atlas_initialized)
    model.freeze_features()
    buffer = io.BytesIO()
    torch.save({"config": model.config, "state": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    rebuilt = DeepAtlas(**saved["config"])
    rebuilt.load_state_dict(saved["state"])
    assert bool(rebuilt.features_frozen) and not any(p.requires_grad for p in rebuilt.features.parameters())
    torch.testing.assert_close(rebuilt.coordinates(x), model.coordinates(x))
    torch.testing.assert_close(rebuilt.atlas, model.atlas)
    assert rebuilt.config["preprocessing"] == {"spacing": 2.0}


def test_frozen_features_get_no_gradient():
    torch.manual_seed(0)
    model = DeepAtlas(base=4, levels=2, features=3, feature_width=4, template_shape=(6, 6, 6))
    model.freeze_features()
    model.train()
    assert not model.features.training  # stays in eval mode
    x = torch.rand(2, 1, 8, 8, 8, generator=g(6))
    out = model(x)
    assert not out["features"].requires_grad
    (out["coords"].sum() + (out["features"].sum() * 0) + model.atlas.sum()).backward()
    assert all(p.grad is None for p in model.features.parameters())


def test_intensity_only_model():
    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(6, 6, 6))
    assert model.features is None and model.atlas.shape[1] == 1
    x = torch.rand(2, 1, 8, 8, 8, generator=g(7))
    assert torch.equal(model(x)["features"], x)


def test_deepatlas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="template_shape"):
        DeepAtlas(template_shape=(8, 8))
    with pytest.raises(ValueError, match="features"):
        DeepAtlas(features=-1)
    with pytest.raises(ValueError, match="images must have shape"):
        DeepAtlas(base=4, levels=2, features=2, template_shape=(4, 4, 4)).feature_stack(torch.rand(1, 8, 8, 8))


def test_anchor_shift_follows_the_heatmap_and_is_zero_when_flat():
    from deepatlas_fast.model import anchor_shift

    grid = da.identity_coords((5, 6, 7), batch=2)
    assert anchor_shift(torch.zeros(2, 1, 5, 6, 7), grid).abs().max() == 0
    logits = torch.full((2, 1, 5, 6, 7), -1e4)
    logits[0, 0, 4, 0, 3] = 0.0  # a peak: the centroid is that grid point
    logits[1, 0, 1, 5, 6] = 0.0
    shift = anchor_shift(logits, grid)
    centre = grid.flatten(2).mean(2)
    assert torch.allclose(shift[0].flatten(), grid[0, :, 4, 0, 3] - centre[0], atol=1e-6)
    assert torch.allclose(shift[1].flatten(), grid[1, :, 1, 5, 6] - centre[1], atol=1e-6)
    # moving the peak by one cell moves the shift by one cell: what makes the map follow the anatomy
    moved = torch.roll(logits, 1, dims=2)
    step = 2.0 / (5 - 1)
    assert torch.allclose(anchor_shift(moved, grid)[1, 0] - shift[1, 0], torch.tensor(step), atol=1e-6)


def test_anchor_head_moves_the_whole_map_and_can_be_turned_off():
    x = torch.rand(1, 1, 16, 16, 16)
    net = CoordNet(base=4, levels=3)
    with torch.no_grad():
        net.locator.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    anchored = net(x, bound=False)
    # without residual heads the map is the identity minus one constant offset per axis
    offset = anchored - da.identity_coords((16, 16, 16))
    assert offset.flatten(2).std(dim=2).max() < 1e-5 and offset.abs().max() > 1e-3
    plain = CoordNet(base=4, levels=3, locate=False)
    assert plain.locator is None
    assert torch.equal(plain(x), da.identity_coords((16, 16, 16)))


def test_model_files_from_before_the_anchor_head_still_load(tmp_path):
    from deepatlas_fast.checkpoint import load_model, read_model, save_model

    old = DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8), locate=False)
    path = save_model(tmp_path / "model.pt", old, preprocessing={"spacing": 4.0})
    payload = read_model(path)
    del payload["model_config"]["locate"]  # as written by earlier versions
    torch.save(payload, path)
    model = load_model(path)
    assert model.coordnet.locator is None


# ------------------------------------------------------------------------------ level geometry ("grid")
SIZES = [(16, 16, 16), (13, 17, 11), (6, 9, 12), (33, 10, 7)]


@pytest.mark.parametrize("shape", SIZES)
def test_strided_levels_sit_on_the_input_voxels_the_convolutions_centre(shape):
    """Level l's voxel j is the input's voxel j * 2^l for every input size: each level's identity map is
    the input's identity read every 2^l voxels (with "corners" only for sizes k * 2^l + 1)."""
    net = CoordNet(base=4, levels=3, grid="strided")
    x = torch.rand(1, 1, *shape, generator=g(4))
    out, maps = net(x, return_levels=True)
    full = da.identity_coords(shape)
    for level, m in zip((2, 1, 0), maps):
        step = 2**level
        torch.testing.assert_close(m, full[:, :, ::step, ::step, ::step], atol=1e-6, rtol=0)
    assert torch.equal(out, full)


@pytest.mark.parametrize("shape", SIZES)
def test_strided_upsampling_keeps_linear_fields_exactly_linear(shape):
    from deepatlas_fast.model import _upsample_strided

    gen = g(5)
    matrix, offset = torch.randn(3, 3, generator=gen), torch.randn(3, generator=gen)
    linear = torch.einsum("ij,njdhw->nidhw", matrix, da.identity_coords(shape)) + offset.view(1, 3, 1, 1, 1)
    coarse = linear[:, :, ::2, ::2, ::2]
    torch.testing.assert_close(_upsample_strided(coarse, shape), linear, atol=2e-6, rtol=0)
    features = torch.randn(2, 5, *coarse.shape[2:], generator=gen)
    up = _upsample_strided(features, shape)
    assert up.shape == (2, 5, *shape)
    torch.testing.assert_close(up[:, :, ::2, ::2, ::2], features)  # coarse voxel i sits on fine voxel 2 i


@pytest.mark.parametrize("grid", ["corners", "strided"])
@pytest.mark.parametrize("shape", SIZES)
def test_init_replaces_the_coarsest_map_and_the_finer_levels_refine_it(shape, grid):
    """The cascade's fine pass: with zero refinement heads a linear ``init`` comes back exactly, on any
    size; the anchor and coarsest head are not used; finer heads refine it."""
    torch.manual_seed(0)
    net = CoordNet(base=4, levels=3, grid=grid)
    with torch.no_grad():
        net.locator.weight.normal_(0, 1.0, generator=g(6))
        net.heads[2].bias.fill_(5.0)  # the coarsest head: ignored with init
    x = torch.rand(1, 1, *shape, generator=g(7))
    init = 0.8 * da.identity_coords(shape).flip(1) + 0.1
    torch.testing.assert_close(net(x, bound=False, init=init), init, atol=2e-6, rtol=0)
    _perturb(net.heads[0], 0.05)
    refined = net(x, bound=False, init=init)
    assert (refined - init).abs().max() > 1e-4
    for bad in (init[:, :2], init[..., :-1], "coords"):
        with pytest.raises(ValueError, match="init must be coordinates"):
            net(x, init=bad)
    # from init_level 1 the coarsest two levels come from init; only the finest head refines
    _perturb(net.heads[1], 0.05, seed=1)
    finest_only = net(x, bound=False, init=init, init_level=1)
    with torch.no_grad():
        net.heads[0].weight.zero_()
        net.heads[0].bias.zero_()
    torch.testing.assert_close(net(x, bound=False, init=init, init_level=1), init, atol=2e-6, rtol=0)
    assert (finest_only - init).abs().max() > 1e-4
    with pytest.raises(ValueError, match="init_level needs init"):
        net(x, init_level=1)
    for bad in (-1, 3, 1.0):
        with pytest.raises(ValueError, match="init_level must be an int in"):
            net(x, init=init, init_level=bad)


def test_model_files_from_before_the_grid_option_load_with_their_geometry(tmp_path):
    from deepatlas_fast.checkpoint import load_model, read_model, save_model

    assert DeepAtlas(base=4, levels=2, features=0).config["grid"] == "corners"
    old = DeepAtlas(base=4, levels=3, features=0, template_shape=(8, 8, 8), grid="corners")
    _perturb(old.coordnet.heads, 0.05)
    x = torch.rand(1, 1, 12, 10, 14, generator=g(8))
    expected = old.coordnet(x)
    path = save_model(tmp_path / "model.pt", old, preprocessing={"spacing": 4.0})
    payload = read_model(path)
    del payload["model_config"]["grid"]  # as written by earlier versions
    torch.save(payload, path)
    model = load_model(path)
    assert model.coordnet.grid == "corners"
    torch.testing.assert_close(model.coordnet(x), expected)
    with pytest.raises(ValueError, match="grid must be one of"):
        CoordNet(grid="centres")


def test_low_precision_group_norm_is_group_norm_outside_autocast_and_keeps_autocast_dtype_inside():
    """Same parameters and state dict as nn.GroupNorm; outside autocast the same output and gradients;
    under autocast a bfloat16 input stays bfloat16 (CUDA's autocast would run the norm in float32 and hold
    float32 copies), normalised with float32 statistics, and the float32 parameters get gradients."""
    from deepatlas_fast.model import LowPrecisionGroupNorm

    torch.manual_seed(0)
    ours, plain = LowPrecisionGroupNorm(4, 8), torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(plain.state_dict())
    x = (3.0 * torch.randn(2, 8, 5, 6, 7) + 1.0).requires_grad_()
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    g_ours = torch.autograd.grad(ours(x).square().sum(), (x, ours.weight, ours.bias))
    g_plain = torch.autograd.grad(plain(x).square().sum(), (x, plain.weight, plain.bias))
    for a, b in zip(g_ours, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(xb)
    assert y.dtype == torch.bfloat16
    exact = torch.nn.functional.group_norm(xb.detach().double(), 4, ours.weight.double(), ours.bias.double())
    torch.testing.assert_close(y.double(), exact, rtol=2e-2, atol=2e-2)  # bfloat16 rounding of the output
    y.float().sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an input not in autocast's dtype: the plain norm
        torch.testing.assert_close(ours(x.detach()), plain(x.detach()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA autocast runs group_norm in float32")
def test_coordnet_activations_stay_bfloat16_under_cuda_autocast():
    """Every norm of the CoordNet outputs bfloat16 under CUDA autocast (nn.GroupNorm would give float32)."""
    net = CoordNet(base=4, levels=2).cuda()
    seen = []
    for module in net.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        net(torch.rand(1, 1, 12, 12, 12, device="cuda")).sum().backward()
    assert seen and set(seen) == {torch.bfloat16}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.nn.GroupNorm(2, 4).cuda()(torch.rand(1, 4, 3, 3, 3, device="cuda").bfloat16()).dtype == torch.float32


def test_conv_block_on_parts_equals_the_block_on_their_concatenation():
    """block(a, b, c) == block(cat([a, b, c])) (the first convolution split along its input channels), with
    the same gradients to the parts and the weights; a wrong channel count is refused."""

    torch.manual_seed(0)
    block = _ConvBlock(7, 8).double()
    parts = [torch.randn(2, c, 5, 6, 7, dtype=torch.float64, requires_grad=True) for c in (4, 2, 1)]
    whole = block(torch.cat(parts, dim=1))
    split = block(*parts)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    weights = [block[0].weight, block[0].bias, block[1].weight]
    expected = torch.autograd.grad(whole.square().sum(), parts + weights)
    for ours, theirs in zip(torch.autograd.grad(split.square().sum(), parts + weights), expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="parts must have 7 channels"):
        block(parts[0], parts[1])


@pytest.mark.parametrize("autocast", [False, True])
def test_coordnet_gradients_do_not_depend_on_recomputing_saved_activations(monkeypatch, autocast):
    """The decoders' upsampled inputs and every block's first activation are made again in the backward
    instead of held: bitwise the gradients of holding them, also under (CPU, bfloat16) autocast, whose
    low-precision norm the recomputation must repeat."""
    import contextlib

    import deepatlas_fast.model as model_module

    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.float64
    net = CoordNet(base=4, levels=3).to(dtype)
    _perturb(net, 0.05)
    x = torch.rand(1, 1, 12, 13, 11, generator=g(41), dtype=torch.float64).to(dtype)

    def gradients():
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x)
        out.float().square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    recomputed = gradients()
    monkeypatch.setattr(model_module, "recomputed_when_saved", lambda tensor, make: contextlib.nullcontext())
    held = gradients()
    assert all(torch.equal(a, b) for a, b in zip(recomputed, held))


def test_blocks_remake_the_image_convolution_only_where_it_is_cheap(monkeypatch):
    """A block whose first convolution reads an image (<= 2 channels) registers its output as remade in the
    backward, next to its first activation; a block on features registers the activation only."""
    import deepatlas_fast.model as model_module

    registered = []
    real = model_module.recomputed_when_saved

    def recording(tensor, make):
        registered.append(tuple(tensor.shape))
        return real(tensor, make)

    monkeypatch.setattr(model_module, "recomputed_when_saved", recording)
    _ConvBlock(1, 8)(torch.rand(1, 1, 6, 6, 6)).sum().backward()
    assert registered == [(1, 8, 6, 6, 6)] * 2
    registered.clear()
    _ConvBlock(4, 8)(torch.rand(1, 4, 6, 6, 6, requires_grad=True)).sum().backward()
    assert registered == [(1, 8, 6, 6, 6)]
