"""Training configuration, the staged loop, exact resume, stopping, metrics, the GPU benchmark script."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepatlas_fast.train import ConfigError, Stage, TrainConfig, config_differences, resolve_images

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ config
def test_config_yaml_round_trip(tmp_path):
    config = TrainConfig(
        stages=[{"steps": 3, "size": 16, "spacing": 4.0, "levels": 2}, Stage(steps=5, size=(16, 20, 24), lr=5e-4)],
        model={"base": 8}, loss={"jacobian": 0.5}, amp="off", seed=7,
    )
    assert config.stages[0].size == (16, 16, 16) and isinstance(config.stages[1], Stage)
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    back = TrainConfig.from_yaml(path)
    assert back == config
    assert back.total_steps == config.feature_steps + 8
    assert config_differences(back, config) == []


def test_config_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nstages:\n  - {steps: 4, size: 16}\n")
    config = TrainConfig.from_yaml(path)
    assert config.seed == 3 and config.lr == TrainConfig().lr and config.stages == [Stage(steps=4, size=(16, 16, 16))]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"learning_rate": 1e-3}, r"unknown key\(s\) \['learning_rate'\]"),
        ({"stages": [{"steps": 2, "sise": 16}]}, r"unknown key\(s\) \['sise'\] in config.stages\[0\]"),
        ({"stages": [{"size": 16}]}, r"config.stages\[0\] is missing required key\(s\) \['steps'\]"),
        ({"stages": [{"steps": 0}]}, r"config.stages\[0\].steps must be >= 1"),
        ({"stages": [{"steps": 2, "size": [16, 16]}]}, r"config.stages\[0\].size must be"),
        ({"stages": [{"steps": 2, "size": 4}]}, r"config.stages\[0\].size must be >= 8"),
        ({"stages": []}, r"config.stages must be a non-empty list"),
        ({"amp": "fp16"}, r"config.amp must be one of"),
        ({"memory_format": "nhwc"}, r"config.memory_format must be one of"),
        ({"batch_size": 1}, r"config.batch_size must be >= 2"),
        ({"spacing": -1}, r"config.spacing must be > 0"),
        ({"lr": "fast"}, r"config.lr must be a number"),
        ({"augment": "yes"}, r"config.augment must be true or false"),
        ({"model": [1, 2]}, r"config.model must be a mapping"),
        ({"atlas_momentum": 1.0}, r"config.atlas_momentum must be in \[0, 1\)"),
        ({"atlas_momentum": -0.5}, r"config.atlas_momentum must be >= 0"),
        ({"stages": [{"steps": 2, "size": None}]}, r"config.stages\[0\].size must be set \(null is for whole-exam"),
        ({"stages": [{"steps": 2, "whole": "yes"}]}, r"config.stages\[0\].whole must be true or false"),
    ],
)
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_whole_exam_stage_round_trips_with_a_null_size(tmp_path):
    config = TrainConfig(stages=[{"steps": 2, "size": 16}, {"steps": 3, "size": None, "whole": True}])
    assert config.stages[1] == Stage(steps=3, size=None, whole=True) and not config.stages[0].whole
    config.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config


def test_memory_format_choice():
    from deepatlas_fast.model import DeepAtlas, preferred_memory_format, set_convolution_memory_format

    assert preferred_memory_format("cpu") == torch.channels_last_3d
    assert preferred_memory_format("cuda") == torch.contiguous_format
    assert preferred_memory_format("cuda", "channels_last") == torch.channels_last_3d
    assert preferred_memory_format("cpu", "contiguous") == torch.contiguous_format
    model = DeepAtlas(base=4, levels=2, features=2, feature_width=4, template_shape=(8, 8, 8))
    x = torch.rand(1, 1, 12, 10, 14)
    with torch.no_grad():
        before = model(x)["coords"]
        set_convolution_memory_format(model, torch.channels_last_3d)
        after = model(x)["coords"]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
    assert model.atlas.is_contiguous()  # only the convolutions change layout
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(listy)


def test_config_differences_names_keys():
    a = TrainConfig(stages=[{"steps": 2, "size": 16}])
    b = TrainConfig(stages=[{"steps": 3, "size": 16}], log_every=1, model={"base": 4})
    assert config_differences(a, b) == ["model.base", "stages[0].steps"]


# ------------------------------------------------------------------------------------------- data
def test_resolve_images_files_folders_globs(tmp_path):
    for name in ("b.nii.gz", "a.nii", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "d.nii.gz").write_bytes(b"")
    assert [p.name for p in resolve_images(tmp_path)] == ["a.nii", "b.nii.gz"]
    assert [p.name for p in resolve_images(str(tmp_path / "*.nii*"))] == ["a.nii", "b.nii.gz"]
    assert [p.name for p in resolve_images([sub / "d.nii.gz", tmp_path / "a.nii", tmp_path / "a.nii"])] == [
        "d.nii.gz", "a.nii"]
    with pytest.raises(ValueError, match="no such file or folder"):
        resolve_images([tmp_path / "nope.nii.gz"])
    with pytest.raises(ValueError, match="matches no files"):
        resolve_images(str(tmp_path / "*.mha"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .nii"):
        resolve_images(empty)
    with pytest.raises(ValueError, match="images: no input files"):
        resolve_images([])


# --------------------------------------------------------------------------------------- training
def tiny_config(**overrides) -> dict:
    """A run that takes seconds on 2 CPU cores: 16^3 phantoms at 24 mm, a 3-level CoordNet."""
    config = dict(
        stages=[{"steps": 3, "size": 16, "spacing": 48.0, "levels": 2}, {"steps": 3, "size": 16}],
        spacing=24.0, phantom_shape=[16, 16, 16],
        model={"base": 4, "levels": 3, "features": 2, "feature_width": 4, "template_shape": [8, 8, 8]},
        loss={"kernel_size": 5}, feature_steps=2, log_every=2, checkpoint_every=3, seed=1, amp="off",
        warmup_steps=2,
    )
    config.update(overrides)
    return config


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted tiny run (8 steps), every checkpoint kept as ``checkpoint-<step>.pt``."""
    import shutil
    from unittest import mock

    import deepatlas_fast.checkpoint as ckpt
    from deepatlas_fast.train import train

    real_save = ckpt.save_checkpoint

    def save_and_keep(path, **state):
        real_save(path, **state)
        shutil.copy(path, Path(path).with_name(f"checkpoint-{state['step']}.pt"))

    out = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.object(ckpt, "save_checkpoint", save_and_keep):
            result = train(TrainConfig.from_dict(tiny_config()), phantoms=3, out_dir=out, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out, result


def _same_rows(a, b):
    ra, rb = _rows(a), _rows(b)
    for row in ra + rb:
        del row["time"], row["sec_per_step"]
    return ra == rb


def _same_state(a, b):
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_writes_run_folder(straight_run):
    from deepatlas_fast.checkpoint import load_model, read_model
    from deepatlas_fast.model import DeepAtlas

    out, result = straight_run
    assert result.status == "completed" and result.step == result.total_steps == 8
    assert TrainConfig.from_yaml(out / "config.yaml") == TrainConfig.from_dict(tiny_config())
    rows = _rows(out / "metrics.csv")
    # rows at every log step and at every phase end; features first, then stages 1 and 2
    assert [int(r["step"]) for r in rows] == [2, 4, 5, 6, 8]
    assert [(r["phase"], r["stage"]) for r in rows] == [
        ("features", "0"), ("coords", "1"), ("coords", "1"), ("coords", "2"), ("coords", "2")]
    for name in ("loss", "lr", "grad_norm", "time", "sec_per_step", "explicit", "implicit", "jacobian", "folding",
                 "collapse"):
        assert all(r[name] != "" for r in rows[1:]), name
    assert float(rows[0]["reconstruction"]) > 0
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    # model.pt: plain types, everything inference needs
    bundle = read_model(out / "model.pt")
    assert bundle["preprocessing"]["spacing"] == 24.0 and bundle["preprocessing"]["modality"] == "ct"
    assert bundle["model_config"]["preprocessing"] == bundle["preprocessing"]
    assert bundle["template_shape"] == [8, 8, 8] and bundle["metadata"]["complete"] is True
    model, info = load_model(out / "model.pt", with_metadata=True)
    assert isinstance(model, DeepAtlas) and not model.training
    assert bool(model.features_frozen) and bool(model.atlas_initialized)
    trained = _state(out / "model.pt")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    fresh = DeepAtlas(**tiny_config()["model"])
    assert not torch.equal(fresh.coordnet.heads[0].weight, model.coordnet.heads[0].weight)  # it trained
    assert not torch.equal(fresh.features.code[-1].weight, model.features.code[-1].weight)
    with torch.no_grad():
        coords = model.coordinates(torch.rand(1, 1, 16, 16, 16))
    assert coords.shape == (1, 3, 16, 16, 16) and coords.abs().max() <= 1
    assert info["preprocessing"] == model.preprocessing


def test_resume_continues_exactly(straight_run, tmp_path):
    from deepatlas_fast.train import train

    straight, result = straight_run
    out = tmp_path / "b"
    first = train(TrainConfig.from_dict(tiny_config()), phantoms=3, out_dir=out, quiet=True, max_steps=4)
    assert first.status == "max_steps" and first.step == 4
    assert not _same_state(out / "model.pt", straight / "model.pt")
    second = train(None, out_dir=out, quiet=True, resume=True)  # config and data from the run
    assert second.status == "completed" and second.step == result.step == 8
    assert _same_state(out / "model.pt", straight / "model.pt"), "parameters differ after resume"
    assert _same_rows(out / "metrics.csv", straight / "metrics.csv")
    sa = torch.load(straight / "checkpoint.pt", weights_only=True)
    sb = torch.load(out / "checkpoint.pt", weights_only=True)
    for group in ("features", "coords"):
        for key, value in sa["optimizers"][group]["state"].items():
            for name, tensor in value.items():
                assert torch.equal(tensor, sb["optimizers"][group]["state"][key][name])
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])


def test_a_completed_run_extended_is_the_run_with_the_longer_last_stage(straight_run, tmp_path):
    from deepatlas_fast.train import train

    straight, result = straight_run
    out = tmp_path / "short"
    short = tiny_config(stages=[tiny_config()["stages"][0], {"steps": 1, "size": 16}])
    first = train(TrainConfig.from_dict(short), phantoms=3, out_dir=out, quiet=True)
    assert first.status == "completed" and first.step == 6
    again = train(None, out_dir=out, quiet=True, resume=True)  # nothing left to do without the extension
    assert again.step == 6
    extended = train(None, out_dir=out, quiet=True, resume=True, extend_steps=2)
    assert extended.status == "completed" and extended.step == extended.total_steps == result.step == 8
    assert _same_state(out / "model.pt", straight / "model.pt"), "the extension is not the longer run"
    assert _same_rows(out / "metrics.csv", straight / "metrics.csv")
    assert TrainConfig.from_yaml(out / "config.yaml").stages[-1].steps == 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["stages"][-1]["steps"] == 3
    # a given config must match the run's own schedule as it stands, before this extension
    with pytest.raises(ConfigError, match=r"differing keys: \['stages\[1\].steps'\]"):
        train(TrainConfig.from_dict(short), out_dir=out, quiet=True, resume=True, extend_steps=1)
    once_more = train(TrainConfig.from_yaml(out / "config.yaml"), out_dir=out, quiet=True, resume=True, extend_steps=1)
    assert once_more.step == 9
    with pytest.raises(ValueError, match="extend_steps lengthens a run being resumed"):
        train(TrainConfig.from_dict(short), phantoms=3, out_dir=tmp_path / "new", quiet=True, extend_steps=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="extend_steps must be a positive integer"):
            train(None, out_dir=out, quiet=True, resume=True, extend_steps=bad)


def test_a_run_given_a_whole_exam_stage_on_resume_is_the_run_that_had_it_from_the_start(tmp_path):
    from deepatlas_fast.train import train

    straight = tmp_path / "straight"
    whole = {"steps": 2, "size": None, "whole": True}
    config = tiny_config(stages=tiny_config()["stages"] + [dict(whole, spacing=None, levels=None)])
    train(TrainConfig.from_dict(config), phantoms=3, out_dir=straight, quiet=True)
    out = tmp_path / "appended"
    train(TrainConfig.from_dict(tiny_config()), phantoms=3, out_dir=out, quiet=True)
    result = train(None, out_dir=out, quiet=True, resume=True, whole_steps=2)
    assert result.status == "completed" and result.step == 10
    assert TrainConfig.from_yaml(out / "config.yaml") == TrainConfig.from_dict(config)
    assert _same_state(out / "model.pt", straight / "model.pt"), "the appended stage is not the longer run"
    assert _same_rows(out / "metrics.csv", straight / "metrics.csv")
    with pytest.raises(ConfigError, match="already ends with a whole-exam stage .2 steps.; lengthen it with extend"):
        train(None, out_dir=out, quiet=True, resume=True, whole_steps=1)
    with pytest.raises(ValueError, match="extend_steps and whole_steps: give one of them"):
        train(None, out_dir=out, quiet=True, resume=True, whole_steps=1, extend_steps=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="whole_steps must be a positive integer"):
            train(None, out_dir=out, quiet=True, resume=True, whole_steps=bad)


def test_moments_training_hands_each_crop_its_whole_exam_frame(tmp_path, monkeypatch):
    from deepatlas_fast.model import DeepAtlas
    from deepatlas_fast.train import train

    seen = []
    original = DeepAtlas.forward

    def spy(self, images, levels=None, frame=None):
        seen.append((images.detach().clone(), frame))
        return original(self, images, levels=levels, frame=frame)

    monkeypatch.setattr(DeepAtlas, "forward", spy)
    config = tiny_config(stages=[{"steps": 2, "size": 12}], phantom_shape=[16, 16, 16], feature_steps=0,
                         model=dict(tiny_config()["model"], features=0, frame="moments"))
    train(TrainConfig.from_dict(config), phantoms=2, out_dir=tmp_path / "run", quiet=True)
    assert len(seen) == 2
    for images, frame in seen:
        assert frame is not None and frame.shape == (2, 3, 4)
        # not the frame of the crop's own content (the crop is smaller than the exam)
        assert not torch.allclose(frame, DeepAtlas(frame="moments").coordnet.frame_of(images), atol=1e-3)


def test_runs_from_before_the_frame_option_resume_with_the_grid_frame(tmp_path):
    from deepatlas_fast.checkpoint import load_model
    from deepatlas_fast.train import train

    config = tiny_config(model=dict(tiny_config()["model"], frame="grid"), stages=[{"steps": 4, "size": 16}])
    out = tmp_path / "old"
    train(TrainConfig.from_dict(config), phantoms=2, out_dir=out, quiet=True, max_steps=3)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["model"]["frame"]  # as written before the option existed
    torch.save(state, out / "checkpoint.pt")
    assert TrainConfig().model["frame"] == "affine"  # today's default ...
    result = train(None, out_dir=out, quiet=True, resume=True)
    assert result.status == "completed"
    assert load_model(out / "model.pt").coordnet.frame == "grid"  # ... is not forced on an old run


def test_resume_from_mid_interval_checkpoint(straight_run, tmp_path):
    """A run that died after its step-3 checkpoint (mid logging interval) resumes from it exactly:
    the metric accumulators come back, and metric rows written after the checkpoint are dropped."""
    import shutil

    from deepatlas_fast.train import train

    straight, result = straight_run
    out = tmp_path / "b"
    shutil.copytree(straight, out)
    assert len(_rows(out / "metrics.csv")) == 5
    shutil.copy(out / "checkpoint-3.pt", out / "checkpoint.pt")  # the crash: back to step 3
    (out / "model.pt").unlink()
    resumed = train(None, out_dir=out, quiet=True, resume=True)
    assert resumed.step == result.step
    assert _same_state(out / "model.pt", straight / "model.pt")
    assert _same_rows(out / "metrics.csv", straight / "metrics.csv")


def test_run_folder_and_resume_errors(tmp_path):
    from deepatlas_fast.train import train

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="holds no checkpoint.pt"):
        train(None, out_dir=out, resume=True, quiet=True)
    with pytest.raises(ValueError, match="images: no training data"):
        train(TrainConfig.from_dict(tiny_config()), out_dir=out, quiet=True)
    with pytest.raises(ValueError, match="not both"):
        train(None, images=["a.nii"], phantoms=2, out_dir=out, quiet=True)
    with pytest.raises(ValueError, match="phantoms must be an integer >= 2"):
        train(None, phantoms=1, out_dir=out, quiet=True)
    with pytest.raises(ValueError, match="ops must be one of"):
        train(None, phantoms=2, out_dir=out, ops="fast", quiet=True)
    train(TrainConfig.from_dict(tiny_config()), phantoms=2, out_dir=out, quiet=True, max_steps=1)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(TrainConfig.from_dict(tiny_config()), phantoms=2, out_dir=out, quiet=True)
    with pytest.raises(ConfigError, match=r"differing keys: \['seed', 'stages\[1\].steps'\]"):
        train(TrainConfig.from_dict(tiny_config(seed=2, stages=[tiny_config()["stages"][0], {"steps": 9, "size": 16}])),
              out_dir=out, resume=True, quiet=True)
    with pytest.raises(ValueError, match="the data differ from the run's own"):
        train(None, phantoms=3, out_dir=out, resume=True, quiet=True)
    # log_every / checkpoint_every may change
    result = train(TrainConfig.from_dict(tiny_config(log_every=1)), out_dir=out, resume=True, quiet=True, max_steps=2)
    assert result.step == 2


def test_model_and_loss_config_errors(tmp_path):
    from deepatlas_fast.train import train

    with pytest.raises(ConfigError, match="config.model"):
        train(TrainConfig.from_dict(tiny_config(model={"widthh": 3})), phantoms=2, out_dir=tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="config.loss"):
        train(TrainConfig.from_dict(tiny_config(loss={"explict": 1.0})), phantoms=2, out_dir=tmp_path / "b", quiet=True)
    with pytest.raises(ConfigError, match=r"config.stages\[0\].levels = 5 exceeds"):
        train(TrainConfig.from_dict(tiny_config(stages=[{"steps": 1, "size": 16, "levels": 5}])), phantoms=2,
              out_dir=tmp_path / "c", quiet=True)
    model = dict(tiny_config()["model"], features=0)
    with pytest.raises(ConfigError, match="set feature_steps: 0"):
        train(TrainConfig.from_dict(tiny_config(model=model)), phantoms=2, out_dir=tmp_path / "d", quiet=True)


def test_intensity_only_model_stock_ops_accumulation(tmp_path):
    """features=0 (no autoencoder), --ops stock and gradient accumulation run and learn something."""
    from deepatlas_fast.train import train

    config = tiny_config(model=dict(tiny_config()["model"], features=0), feature_steps=0, grad_accumulation=2,
                         stages=[{"steps": 3, "size": 16}], log_every=1)
    result = train(TrainConfig.from_dict(config), phantoms=2, out_dir=tmp_path / "run", ops="stock", quiet=True)
    assert result.status == "completed" and result.step == 3
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 3 and "reconstruction" not in rows[0]
    assert all(float(r["grad_norm"]) > 0 for r in rows)


def test_update_atlas_moves_reached_voxels_towards_the_splatted_exams():
    from deepatlas_fast.coords import identity_coords
    from deepatlas_fast.model import DeepAtlas
    from deepatlas_fast.train import update_atlas

    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(6, 7, 5))
    before = model.atlas.detach().clone()
    features = torch.rand(2, 1, 6, 7, 5, generator=torch.Generator().manual_seed(1))
    coords = identity_coords((6, 7, 5), batch=3)
    coords[1:, 0] = -5.0  # two exams land outside the template: they add nothing
    features = torch.cat([features, features[:1]])
    update_atlas(model, [coords[:1], coords[1:]], [features[:1], features[1:]], momentum=0.25)
    # exam 1 alone reaches each voxel with weight 1 < 0.5 per exam x 3 exams: nothing moves
    torch.testing.assert_close(model.atlas.detach(), before)
    update_atlas(model, [coords[:1]], [features[:1]], momentum=0.25)
    torch.testing.assert_close(model.atlas.detach(), 0.25 * before + 0.75 * features[:1])


def test_running_mean_atlas_gets_no_gradient_and_follows_the_exams(tmp_path):
    from deepatlas_fast.checkpoint import load_model
    from deepatlas_fast.train import train

    config = tiny_config(model=dict(tiny_config()["model"], features=0, frame="moments"), feature_steps=0,
                         stages=[{"steps": 3, "size": 16}], log_every=1, atlas_momentum=0.5)
    atlases = []
    for steps in (1, 3):
        out = tmp_path / f"run{steps}"
        result = train(TrainConfig.from_dict(config), phantoms=2, out_dir=out, max_steps=steps, quiet=True)
        assert result.step == steps
        model = load_model(out / "model.pt")
        assert model.coordnet.frame == "moments"
        atlases.append(model.atlas.detach())
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        groups = state["optimizers"]["coords"]["param_groups"]
        assert len(groups) == 1  # the atlas is not an optimised parameter
    assert torch.isfinite(atlases[1]).all()
    assert not torch.allclose(atlases[0], atlases[1])  # ... but it moves with the exams


def test_max_minutes_stops_and_checkpoints(tmp_path):
    from deepatlas_fast.train import train

    # the moments frame: no template to build, which would use up most of the 1.2 s budget (setup counts)
    config = TrainConfig.from_dict(tiny_config(stages=[{"steps": 10000, "size": 16}],
                                               model=dict(tiny_config()["model"], frame="moments")))
    result = train(config, phantoms=2, out_dir=tmp_path / "run", quiet=True, max_minutes=0.02)
    assert result.status == "max_minutes" and 0 < result.step < 10002
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == result.step


def test_crops_are_a_function_of_step_and_rank():
    from deepatlas_fast.train import _StageData

    volumes = [torch.rand(20, 20, 20) for _ in range(3)]
    data = _StageData(volumes, (16, 16, 16), 1.0, True, 0, 0, frames="moments")
    again = _StageData(volumes, (16, 16, 16), 1.0, True, 0, 0, frames="moments")

    def crops(*args):
        return data.batch(*args)[0]

    assert torch.equal(crops(2, 5, 0, 0), again.batch(2, 5, 0, 0)[0])
    assert torch.equal(data.batch(2, 5, 0, 0)[1], again.batch(2, 5, 0, 0)[1])  # frames too
    assert not torch.equal(crops(2, 5, 0, 0), crops(2, 5, 1, 0))  # ranks see different crops
    assert not torch.equal(crops(2, 5, 0, 0), crops(2, 6, 0, 0))
    images, frames = data.batch(4, 0, 0, 0)
    assert images.shape == (4, 1, 16, 16, 16) and frames.shape == (4, 3, 4)  # more exams than volumes: repeats
    assert _StageData(volumes, (16, 16, 16), 1.0, True, 0, 0).batch(2, 5, 0, 0)[1] is None


def test_a_whole_exam_stage_gives_every_exam_whole_centred_and_reordered_each_step():
    from deepatlas_fast.data.dataset import _crop_pad
    from deepatlas_fast.train import _StageData

    g = torch.Generator().manual_seed(3)
    volumes = [torch.rand(shape, generator=g) + 0.5 for shape in ((9, 12, 10), (11, 8, 10), (10, 10, 13), (8, 9, 9))]
    data = _StageData(volumes, None, 1.0, True, 0, 0, frames="moments", parts=1)
    assert data.size == (11, 12, 13) and data.cropped == 0  # the smallest grid holding every exam
    orders = []
    for step in range(6):
        images, frames = data.batch(2, step, 0, 0)  # the batch size does not apply
        assert images.shape == (4, 1, 11, 12, 13) and frames.shape == (4, 3, 4)
        order = [next(i for i, v in enumerate(volumes) if torch.isclose(image.sum(), v.sum())) for image in images]
        orders.append(order)
        for image, frame, i in zip(images, frames, order):  # the exam itself, centred, not augmented
            start = [math.floor((n - 1) / 2 - (o - 1) / 2 + 0.5) for n, o in zip(volumes[i].shape, data.size)]
            assert torch.equal(image[0], _crop_pad(volumes[i], start, data.size))
            # its frame places each voxel where the whole exam's frame places it
            voxel = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
            in_exam = voxel / (torch.tensor(volumes[i].shape) - 1) * 2 - 1
            in_crop = (voxel - torch.tensor(start)) / (torch.tensor(data.size) - 1) * 2 - 1
            whole = data.dataset.frames[i].double()
            torch.testing.assert_close(frame.double() @ torch.cat([in_crop, torch.ones(1)]),
                                       whole @ torch.cat([in_exam, torch.ones(1, dtype=torch.float64)]), atol=1e-5, rtol=0)
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # pairs of the implicit term change between steps
    assert torch.equal(data.batch(2, 4, 0, 0)[0], data.batch(9, 4, 0, 0)[0])  # a pure function of the step
    # shares of micro-batches and processes partition the exams, from the same order
    split = _StageData(volumes, None, 1.0, True, 0, 0, parts=4)
    shares = [split.batch(2, 4, rank, micro, accumulation=2)[0] for rank in (0, 1) for micro in (0, 1)]
    assert [s.shape[0] for s in shares] == [1, 1, 1, 1]
    assert torch.equal(torch.cat(shares), data.batch(2, 4, 0, 0)[0])
    # a whole-exam stage smaller than an exam crops it around its foreground
    small = _StageData(volumes, (10, 10, 10), 1.0, True, 0, 0, parts=1)
    assert small.cropped == 3 and small.batch(2, 0, 0, 0)[0].shape == (4, 1, 10, 10, 10)


def test_training_with_a_whole_exam_last_stage(tmp_path, monkeypatch):
    from deepatlas_fast.checkpoint import read_model
    from deepatlas_fast.model import DeepAtlas
    from deepatlas_fast.train import train

    seen = []
    original = DeepAtlas.forward

    def spy(self, images, levels=None, frame=None):
        seen.append((tuple(images.shape), None if frame is None else tuple(frame.shape)))
        return original(self, images, levels=levels, frame=frame)

    monkeypatch.setattr(DeepAtlas, "forward", spy)
    config = tiny_config(stages=[{"steps": 2, "size": 12}, {"steps": 2, "size": None, "whole": True}],
                         feature_steps=0, model=dict(tiny_config()["model"], features=0, frame="moments"))
    messages = []
    result = train(TrainConfig.from_dict(config), phantoms=3, out_dir=tmp_path / "run", echo=messages.append)
    assert result.status == "completed" and result.step == 4
    assert seen[:2] == [((2, 1, 12, 12, 12), (2, 3, 4))] * 2  # cropped pairs, then every exam whole
    assert seen[2:] == [((3, 1, 16, 16, 16), (3, 3, 4))] * 2
    assert any("stage 2 takes all 3 exams whole every step, centred in [16, 16, 16] at 24 mm" in m for m in messages)
    assert read_model(tmp_path / "run" / "model.pt")["preprocessing"]["size"] == [16, 16, 16]
    with pytest.raises(ConfigError, match=r"config.stages\[1\].whole: 3 exams split over 2 micro-batch\(es\)"):
        train(TrainConfig.from_dict(dict(config, grad_accumulation=2)), phantoms=3, out_dir=tmp_path / "acc", quiet=True)


def test_uneven_whole_exam_shares_weigh_every_exam_the_same(tmp_path, monkeypatch):
    """5 exams over 2 micro-batches: shares of 3 and 2 exams weigh 0.6 and 0.4 of the step (not 0.5 each)."""
    import deepatlas_fast.objective as objective
    from deepatlas_fast.train import _StageData, train

    volumes = [torch.rand(6, 6, 6) for _ in range(5)]
    split = _StageData(volumes, None, 1.0, False, 0, 0, parts=2)
    counts = [split.batch(2, 0, 0, micro, accumulation=2)[0].shape[0] for micro in (0, 1)]
    assert sorted(counts) == [2, 3]
    assert [split.share_weight(c) for c in (3, 2)] == [1.2, 0.8]
    assert _StageData(volumes, (4, 4, 4), 1.0, False, 0, 0).share_weight(2) == 1.0  # cropped stages: equal shares

    real = objective.deepatlas_loss
    atlas_grads = []

    def exams_as_loss(model, images, *args, **kwargs):
        """The objective's graph, valued at the share's exam count, with that count as the atlas's gradient."""
        loss, terms = real(model, images, *args, **kwargs)
        if not atlas_grads:
            model.atlas.register_post_accumulate_grad_hook(lambda p: atlas_grads.append(p.grad.sum().item()))
        mean = model.atlas.mean()
        return loss * 0 + images.shape[0] * (1 + mean - mean.detach()), terms

    monkeypatch.setattr(objective, "deepatlas_loss", exams_as_loss)
    config = tiny_config(stages=[{"steps": 1, "size": 12}, {"steps": 1, "size": None, "whole": True}],
                         feature_steps=0, grad_accumulation=2, log_every=1,
                         model=dict(tiny_config()["model"], features=0))
    result = train(TrainConfig.from_dict(config), phantoms=5, out_dir=tmp_path / "run", quiet=True)
    assert result.status == "completed"
    # the atlas gradient after each micro-batch: cropped pairs (0.5 each), then the whole-exam shares of 3 and 2
    assert atlas_grads == pytest.approx([0.5 * 2, 2 * 0.5 * 2, 0.6 * 3, 0.6 * 3 + 0.4 * 2])
    # the logged loss is the mean over the step's exams
    assert [float(row["loss"]) for row in _rows(tmp_path / "run" / "metrics.csv")] == pytest.approx([2.0, 13 / 5])


def test_activation_checkpointing_same_gradients():
    from deepatlas_fast.model import DeepAtlas
    from deepatlas_fast.objective import deepatlas_loss
    from deepatlas_fast.train import enable_activation_checkpointing

    torch.manual_seed(0)
    model = DeepAtlas(**tiny_config()["model"])
    with torch.no_grad():  # leave the identity so every gradient is non-trivial
        for head in model.coordnet.heads:
            head.weight.normal_(0, 0.01)
    images = torch.rand(2, 1, 16, 16, 16)
    model.freeze_features()
    grads = []
    for checkpointed in (False, True):
        if checkpointed:
            enable_activation_checkpointing(model)
        model.zero_grad()
        loss, _ = deepatlas_loss(model, images, {"kernel_size": 5})
        loss.backward()
        grads.append([p.grad.clone() for p in model.coordnet.parameters()])
    state_keys = set(model.state_dict())
    assert not any("checkpoint" in k for k in state_keys)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_step_is_finite(tmp_path):
    from deepatlas_fast.train import train

    config = tiny_config(amp="bf16", feature_steps=1, stages=[{"steps": 1, "size": 16}], log_every=1)
    result = train(TrainConfig.from_dict(config), phantoms=2, out_dir=tmp_path / "run", quiet=True)
    assert result.step == 2
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in _rows(tmp_path / "run" / "metrics.csv"))


def test_non_finite_steps_are_skipped(tmp_path, monkeypatch):
    import deepatlas_fast.objective as objective
    from deepatlas_fast.train import train

    real = objective.deepatlas_loss
    calls = {"n": 0}

    def flaky(model, images, *args, **kwargs):
        total, terms = real(model, images, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(objective, "deepatlas_loss", flaky)
    config = tiny_config(feature_steps=0, stages=[{"steps": 2, "size": 16}], log_every=2)
    result = train(TrainConfig.from_dict(config), phantoms=2, out_dir=tmp_path / "run", quiet=True)
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert result.step == 2 and rows[-1]["skipped"] == "1"


# ------------------------------------------------------------------------------------------ signal
SIGNAL_SCRIPT = """
import sys
from deepatlas_fast.train import TrainConfig, train
config = TrainConfig.from_dict({config!r})
result = train(config, phantoms=2, out_dir={out!r}, quiet=True)
print("RESULT", result.status, result.step, flush=True)
"""


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    config = tiny_config(feature_steps=0, stages=[{"steps": 100000, "size": 16}], log_every=1,
                         checkpoint_every=100000)
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT.format(config=config, out=str(out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "metrics.csv").is_file() and len(_rows(out / "metrics.csv")) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.communicate()}")
            time.sleep(0.1)
        else:
            pytest.fail("training did not start within 120 s")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    status, step = stdout.split("RESULT")[1].split()
    assert status == "interrupted" and 1 <= int(step) < 100000
    assert "SIGTERM received" in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == int(step)
    assert torch.load(out / "model.pt", weights_only=True)["metadata"]["complete"] is False


# --------------------------------------------------------------------------------------- benchmark
def test_train_step_benchmark_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step_gpu.py"), "--quick", "--device", "cpu",
         "--time-breakdown", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for word in ("fused", "stock", "fp32", "bf16", "largest cube", "loss side", "loss side's time by kernel",
                 "deepatlas_fast_C::lncc"):
        assert word in text, word
    assert "nan" not in text.lower().replace("n/a", "")


def test_prefetching_thread_gives_the_same_batches():
    from deepatlas_fast.train import _Prefetcher, _StageData

    data = _StageData([torch.rand(20, 20, 20) for _ in range(3)], (16, 16, 16), 1.0, True, 0, 0, frames="moments")
    plain = _Prefetcher(lambda step: data, 2, 0, 2, 4, torch.device("cpu"), threaded=False)
    ahead = _Prefetcher(lambda step: data, 2, 0, 2, 4, torch.device("cpu"), threaded=True)
    try:
        for step in range(4):
            for micro in range(2):
                (a, frames_a), (b, frames_b) = plain.get(step, micro), ahead.get(step, micro)
                assert torch.equal(a, b) and torch.equal(frames_a, frames_b)
        assert not ahead.pending  # nothing fetched past the last step
    finally:
        ahead.close()


def test_affine_frame_training_builds_the_template_once_and_resumes_with_it(tmp_path, monkeypatch):
    from deepatlas_fast import frame as frames
    from deepatlas_fast.checkpoint import load_model
    from deepatlas_fast.model import DeepAtlas
    from deepatlas_fast.train import train

    builds, seen = [], []
    original_build, original_forward = frames.build_template, DeepAtlas.forward
    monkeypatch.setattr("deepatlas_fast.model.build_template",
                        lambda *a, **k: builds.append(1) or original_build(*a, **k))

    def spy(self, images, levels=None, frame=None):
        seen.append(frame)
        return original_forward(self, images, levels=levels, frame=frame)

    monkeypatch.setattr(DeepAtlas, "forward", spy)
    config = tiny_config(stages=[{"steps": 4, "size": 12}], phantom_shape=[16, 16, 16], feature_steps=0,
                         model=dict(tiny_config()["model"], features=0, frame="affine"))
    out = tmp_path / "run"
    train(TrainConfig.from_dict(config), phantoms=3, out_dir=out, quiet=True, max_steps=2)
    model = load_model(out / "model.pt")
    assert model.coordnet.frame == "affine" and bool(model.coordnet.frame_template_built)
    assert builds == [1] and all(f is not None and f.shape == (2, 3, 4) for f in seen)
    result = train(None, out_dir=out, quiet=True, resume=True)
    assert result.status == "completed" and builds == [1]  # the checkpoint's template, not a new one
    assert torch.equal(load_model(out / "model.pt").coordnet.frame_template, model.coordnet.frame_template)
