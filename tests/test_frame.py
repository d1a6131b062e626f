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


# ------------------------------------------------------------------------------------- the "affine" frame


def _body(shape, seed=0):
    """An asymmetric body with edges ``[1, 1, *shape]``: overlapping ellipsoids of different brightness
    (local NCC needs edges: smooth blobs look like ramps, which correlate at any shift)."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    gen = g(seed)
    body = torch.zeros(shape)
    for _ in range(8):
        centre = (torch.rand(3, generator=gen) - 0.5) * 0.9
        width = 0.12 + 0.25 * torch.rand(3, generator=gen)
        r2 = sum(((x - c) / w) ** 2 for x, c, w in zip(grids, centre.tolist(), width.tolist()))
        body += (0.3 + torch.rand(1, generator=gen)) * (r2 <= 1).float()
    return body[None, None]


def _affine(angle, scale, shift):
    """``[1, 3, 4]``: rotation by ``angle`` in the (H, W) plane, per-axis scale, then shift."""
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[1.0, 0, 0], [0, cos, -sin], [0, sin, cos]])
    return torch.cat([rotation @ torch.diag(torch.tensor(scale)), torch.tensor(shift)[:, None]], dim=1)[None]


def test_affine_frame_recovers_the_affine_that_made_the_exam():
    """An exam that is the template read through a known affine map gets that map back from a start ~0.15
    away (the identity) to ~0.002; the default start is the exam's moments frame."""
    from deepatlas_fast.frame import TEMPLATE_SIDE, affine_frame

    template = _body((TEMPLATE_SIDE,) * 3)
    truth = _affine(0.15, [0.9, 1.1, 0.95], [0.05, -0.08, 0.06])
    shape = (24, 28, 26)
    exam = da.sample(template, _frame_positions(truth, shape))
    start = identity_frame(1)
    fitted = affine_frame(exam, template, init=start)
    error = (_frame_positions(fitted, shape) - _frame_positions(truth, shape)).abs().max()
    start_error = (_frame_positions(start, shape) - _frame_positions(truth, shape)).abs().max()
    assert error < 0.01 and error < start_error / 20, (float(error), float(start_error))
    # under no_grad (inference) it still fits, and no gradient leaks to the inputs
    with torch.no_grad():
        again = affine_frame(exam.requires_grad_(), template, init=start)
    assert not again.requires_grad and torch.allclose(again, fitted, atol=1e-5)
    assert torch.equal(affine_frame(exam, template, steps=0), moment_frame(exam))


def test_recentred_frame_keeps_the_centre_with_grid_axes_at_unit_scale():
    from deepatlas_fast.frame import recentred_frame

    frames = torch.cat([_affine(0.7, [1.4, 0.8, 1.1], [0.2, -0.3, 0.1]), _affine(-0.2, [0.9, 1.2, 1.0], [0.0, 0.1, -0.4])])
    centres = -torch.linalg.solve(frames[:, :, :3], frames[:, :, 3:])  # exam positions sent to the cube's centre
    recentred = recentred_frame(frames)
    torch.testing.assert_close(recentred[:, :, :3], torch.eye(3).expand(2, 3, 3))
    torch.testing.assert_close(apply_frame(recentred, centres.view(2, 3, 1, 1, 1)).view(2, 3), torch.zeros(2, 3),
                               atol=1e-6, rtol=0)
    singular = torch.zeros(1, 3, 4)
    assert torch.isfinite(recentred_frame(singular)).all()


def test_affine_frame_escapes_a_start_whose_fit_is_caught_in_a_local_optimum(monkeypatch):
    """From a start rotated by 0.9 rad and stretched 1.5x along one axis the fit alone settles far from the
    truth (max error > 0.5 of the cube); the second, recentred start (grid axes, unit scale) reaches it."""
    import deepatlas_fast.frame as frames
    from deepatlas_fast.frame import TEMPLATE_SIDE, affine_frame

    template = _body((TEMPLATE_SIDE,) * 3)
    truth = _affine(0.0, [1.0, 1.0, 1.0], [0.0, 0.0, 0.1])
    shape = (24, 28, 26)
    exam = da.sample(template, _frame_positions(truth, shape))
    start = _affine(0.9, [1.0, 1.0, 1.5], [0.0, 0.0, 0.1])

    def error(frame):
        return float((_frame_positions(frame, shape) - _frame_positions(truth, shape)).abs().max())

    assert error(affine_frame(exam, template, init=start)) < 0.01
    monkeypatch.setattr(frames, "recentred_frame", lambda frame: frame)  # both starts the given one
    assert error(affine_frame(exam, template, init=start)) > 0.5


def test_affine_frame_keeps_its_start_where_the_fit_cannot_improve():
    from deepatlas_fast.frame import affine_frame

    template = _body((16, 16, 16))
    flat = torch.zeros(2, 1, 12, 12, 12)  # no structure (not even at the zero-padded border): NCC is flat
    start = identity_frame(2)
    assert torch.equal(affine_frame(flat, template, init=start, steps=20), start)
    with pytest.raises(ValueError, match="template must be"):
        affine_frame(flat, template[0])
    with pytest.raises(ValueError, match="images must be"):
        affine_frame(flat[0], template)


def test_template_places_shifted_copies_of_a_body_consistently():
    """Exams of one body at different places and sizes in the field of view: after building the template,
    their affine frames send the same anatomy to the same template coordinates (the moments frames of
    bodies cut by the field of view do not)."""
    from deepatlas_fast.frame import affine_frame, build_template

    big = _body((40, 40, 40), seed=3)
    exams = [big[..., 2:34, 4:36, 3:35], big[..., 8:40, 0:32, 6:38], big[..., 5:37, 7:39, 0:32],
             big[..., 0:32, 2:34, 8:40]]
    offsets = [(2, 4, 3), (8, 0, 6), (5, 7, 0), (0, 2, 8)]
    messages = []
    template = build_template([x[0, 0] for x in exams], side=24, rounds=2, progress=messages.append)
    assert template.shape == (1, 1, 24, 24, 24) and torch.isfinite(template).all()
    assert messages == ["frame template: round 1/2 (4 exams)", "frame template: round 2/2 (4 exams)"]
    frames = affine_frame(torch.cat(exams), template)
    # template coordinates of the big volume's voxel (20, 20, 20) seen from each exam
    spread = []
    for frame_set in (frames, moment_frame(torch.cat(exams))):
        points = []
        for k, off in enumerate(offsets):
            p = torch.tensor([(20 - o) / 31 * 2 - 1 for o in off])
            points.append(frame_set[k, :, :3] @ p + frame_set[k, :, 3])
        points = torch.stack(points)
        spread.append(float((points - points.mean(0)).norm(dim=1).max()))
    assert spread[0] < 0.05 and spread[0] < spread[1] / 2, spread
    with pytest.raises(ValueError, match="at least one image"):
        build_template([])


def test_affine_coordnet_needs_its_template_then_starts_at_the_affine_frame(tmp_path):
    from deepatlas_fast.checkpoint import load_model, save_model
    from deepatlas_fast.frame import affine_frame

    exams = [_body((20, 22, 18), seed=s)[0, 0] for s in (4, 5, 6)]
    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8), frame="affine")
    x = torch.stack(exams[:2])[:, None]
    with pytest.raises(RuntimeError, match="needs its template"):
        model(x)
    with pytest.raises(ValueError, match='"affine" frame'):
        CoordNet(base=4, levels=2, frame="moments").build_frame_template(exams)
    model.coordnet.build_frame_template(exams)
    assert bool(model.coordnet.frame_template_built)
    with torch.no_grad():
        out = model(x)
    expected = affine_frame(x, model.coordnet.frame_template)
    torch.testing.assert_close(out["frame"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["coords_raw"], _frame_positions(expected, x.shape[2:]), atol=1e-5, rtol=0)
    path = save_model(tmp_path / "model.pt", model, preprocessing={"spacing": 4.0})
    loaded = load_model(path)
    assert loaded.coordnet.frame == "affine" and bool(loaded.coordnet.frame_template_built)
    assert torch.equal(loaded.coordnet.frame_template, model.coordnet.frame_template)
