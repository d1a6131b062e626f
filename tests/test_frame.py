"""Anatomical frames (deepatlas_fast.frame) and the "moments" frame in CoordNet, DeepAtlas and the objective."""

import math

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.frame import apply_frame, identity_frame, invert_frame, moment_frame
from deepatlas_fast.model import CoordNet, DeepAtlas
from deepatlas_fast.objective import deepatlas_loss
from helpers import g


def _box(shape, centre, half, angle=0.0):
    """A uniform box (1 inside, 0 outside) ``[1, 1, *shape]`` with half-sides ``half`` (voxels) around
    ``centre`` (voxel index), rotated by ``angle`` in the (H, W) plane."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    d, h, w = (grid - c for grid, c in zip(grids, centre))
    cos, sin = math.cos(angle), math.sin(angle)
    h, w = cos * h + sin * w, -sin * h + cos * w
    inside = (d.abs() <= half[0]) & (h.abs() <= half[1]) & (w.abs() <= half[2])
    return inside.float()[None, None]


def _frame_positions(frame, shape):
    return apply_frame(frame, da.identity_coords(shape))


def test_moment_frame_centres_and_scales_an_axis_aligned_box():
    shape = (41, 33, 29)
    centre, half = (17.0, 20.0, 12.0), (12, 6, 9)
    image = _box(shape, centre, half)
    frame = moment_frame(image, spread=2.0)
    coords = _frame_positions(frame, shape)[0]
    inside = image[0, 0] > 0
    for axis in range(3):
        values = coords[axis][inside]
        assert abs(float(values.mean())) < 1e-5
        # a uniform box of 2n+1 voxels has variance n(n+1)/3: its faces land at n / (2 sqrt(n(n+1)/3))
        n = half[axis]
        expected = n / (2 * math.sqrt(n * (n + 1) / 3))
        assert float(values.max()) == pytest.approx(expected, rel=1e-4)
        assert float(values.min()) == pytest.approx(-expected, rel=1e-4)
    linear = frame[0, :, :3]
    assert torch.allclose(linear - torch.diag(torch.diagonal(linear)), torch.zeros(3, 3), atol=1e-6)
    assert (torch.diagonal(linear) > 0).all()  # no flip


def test_moment_frame_follows_the_body_when_it_moves_in_the_field_of_view():
    shape = (31, 37, 35)
    half = (8, 10, 6)
    first = _box(shape, (14.0, 15.0, 16.0), half, angle=0.3)
    second = _box(shape, (17.0, 20.0, 13.0), half, angle=0.3)
    a = _frame_positions(moment_frame(first), shape)[0]
    b = _frame_positions(moment_frame(second), shape)[0]
    # the same body voxel (shifted by (3, 5, -3)) gets the same frame coordinate
    torch.testing.assert_close(a[:, :-3, :-5, 3:], b[:, 3:, 5:, :-3], atol=1e-4, rtol=0)


def test_moment_frame_undoes_a_modest_rotation_without_swapping_axes():
    shape = (25, 45, 45)
    image = _box(shape, (12.0, 22.0, 22.0), (8, 14, 6), angle=math.radians(25))
    linear = moment_frame(image)[0, :, :3]
    # the body's long in-plane axis (rotated 25 degrees) becomes the frame's H axis
    rows = linear / linear.norm(dim=1, keepdim=True)
    angle = math.degrees(math.atan2(float(rows[1, 2]), float(rows[1, 1])))
    assert angle == pytest.approx(25.0, abs=1.5)
    assert float(rows[0, 0]) == pytest.approx(1.0, abs=1e-4)
    assert (torch.diagonal(linear) > 0).all()


def test_moment_frame_of_an_empty_image_is_the_identity_and_frames_invert():
    images = torch.zeros(2, 1, 9, 10, 11)
    images[1, 0, 2:7, 3:9, 1:10] = torch.rand(5, 6, 9, generator=g(3)) + 0.5
    images[0] -= 1.0  # no positive intensity at all
    frames = moment_frame(images)
    torch.testing.assert_close(frames[0], identity_frame(1)[0])
    points = torch.rand(2, 3, 4, 5, 6, generator=g(4)) * 2 - 1
    torch.testing.assert_close(apply_frame(invert_frame(frames), apply_frame(frames, points)), points, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="images must be a tensor"):
        moment_frame(torch.zeros(9, 10, 11))
    with pytest.raises(ValueError, match="spread must be > 0"):
        moment_frame(images, spread=0.0)


@pytest.mark.parametrize("grid", ["corners", "strided"])
def test_fresh_coordnet_returns_exactly_its_moment_frame(grid):
    torch.manual_seed(0)
    shape = (13, 17, 11)
    x = torch.rand(2, 1, *shape, generator=g(1))
    net = CoordNet(base=4, levels=3, frame="moments", grid=grid)
    out = net(x, bound=False)
    torch.testing.assert_close(out, _frame_positions(moment_frame(x), shape), atol=1e-6, rtol=0)
    assert torch.equal(CoordNet(base=4, levels=3)(x), da.identity_coords(shape, batch=2))
    with pytest.raises(ValueError, match="frame must be one of"):
        CoordNet(frame="pca")


def test_regularisers_measure_the_map_relative_to_its_frame():
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 16, 18, 14)
    x[0, 0, 3:12, 4:15, 2:11] = 1.0
    x[1, 0, 5:15, 2:12, 4:13] = 0.8
    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8), frame="moments")
    model.init_atlas(x)
    _, terms = deepatlas_loss(model, x, {"implicit": 0.0})
    for name in ("jacobian", "logdet", "folding", "collapse"):
        assert float(terms[name]) == pytest.approx(0.0, abs=1e-8), name
    assert float(terms["det_mean"]) == pytest.approx(1.0, abs=1e-5)


def test_moment_atlas_init_splats_the_exams_at_their_frame():
    x = torch.zeros(2, 1, 12, 12, 12)
    x[:, 0, 2:10, 3:9, 2:11] = 0.7
    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(10, 10, 10), frame="moments")
    model.init_atlas(x)
    atlas = model.atlas.detach()[0, 0]
    assert bool(model.atlas_initialized)
    # the body (0.7) fills the template's centre; the corners, reached by air or by no exam, are darker
    assert float(atlas[5, 5, 5]) == pytest.approx(0.7, abs=1e-5)
    assert float(atlas[0, 0, 0]) < 0.35
    assert torch.isfinite(atlas).all()


def test_model_files_keep_their_frame(tmp_path):
    from deepatlas_fast.checkpoint import load_model, read_model, save_model

    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8), frame="moments")
    path = save_model(tmp_path / "model.pt", model, preprocessing={"spacing": 4.0})
    assert load_model(path).coordnet.frame == "moments"
    payload = read_model(path)
    del payload["model_config"]["frame"]  # as written by earlier versions
    torch.save(payload, path)
    assert load_model(path).coordnet.frame == "grid"
