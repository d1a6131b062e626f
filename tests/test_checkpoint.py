"""Checkpoint files: weights_only loading, RNG state round trip, atomic writes, clear errors."""

import random

import numpy as np
import pytest
import torch

from deepatlas_fast import checkpoint as ckpt


def _draws():
    return (torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(2).tolist(),
            np.random.randn(1).tolist())


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn(1)  # and in NumPy's
    ckpt.save_checkpoint(tmp_path / "c.pt", rng=ckpt.get_rng_state(), step=7)
    expected = _draws()
    _draws()  # move every generator on
    state = ckpt.load_checkpoint(tmp_path / "c.pt")
    assert state["step"] == 7 and state["format"] == ckpt.CHECKPOINT_FORMAT
    ckpt.set_rng_state(state["rng"])
    assert _draws() == expected


def test_checkpoint_holds_only_plain_types(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path / "c.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                                config={"stages": [{"steps": 2, "size": [8, 8, 8]}]}, rng=ckpt.get_rng_state())
    loaded = torch.load(path, weights_only=True)
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(loaded["model"])
    assert torch.equal(fresh.weight, model.weight)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, step=1)
    with pytest.raises(Exception):
        ckpt.save_checkpoint(path, step=2, bad=lambda: None)  # a lambda cannot be pickled
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        ckpt.load_checkpoint(junk)
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a deepatlas-fast file"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    ckpt.save_checkpoint(tmp_path / "c.pt", step=1)
    with pytest.raises(ValueError, match="expected 'deepatlas-fast/model'"):
        ckpt.read_model(tmp_path / "c.pt")


def test_plain_rejects_objects_weights_only_cannot_load():
    assert ckpt._plain({"a": (1, 2), "b": np.float32(1.5)}) == {"a": [1, 2], "b": 1.5}
    with pytest.raises(TypeError, match="cannot store"):
        ckpt._plain({"a": object()})
