"""Data-parallel training on CPU: torchrun with 2 gloo processes ends with identical parameters (cropped
stages, then a whole-exam stage whose exams the two processes share)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config():
    return dict(
        stages=[{"steps": 2, "size": 16, "spacing": 48.0, "levels": 2}, {"steps": 2, "size": 16},
                {"steps": 1, "size": None, "whole": True}],
        spacing=24.0, phantom_shape=[16, 16, 16],
        model={"base": 4, "levels": 3, "features": 2, "feature_width": 4, "template_shape": [8, 8, 8]},
        loss={"kernel_size": 5}, feature_steps=1, log_every=1, checkpoint_every=100, seed=3, amp="off",
    )


RANK_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
import deepatlas_fast.train as T
from deepatlas_fast.train import TrainConfig, train

rank = int(os.environ["RANK"])
# every rank dumps its final parameters (the library itself writes files on rank 0 only)
captured = {{}}
real_build = T._build_model
def build(config):
    model = real_build(config)
    captured["model"] = model
    return model
T._build_model = build
result = train(TrainConfig.from_dict({config!r}), phantoms=4, out_dir={out!r}, device="cpu", quiet=True)
assert not dist.is_initialized(), "train() must tear down the process group it created"
torch.save({{k: v.detach().clone() for k, v in captured["model"].state_dict().items()}},
           os.path.join({dump!r}, f"rank{{rank}}.pt"))
print("RANK", rank, result.status, result.step, result.model_path, flush=True)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_identical(tmp_path):
    out = tmp_path / "run"
    dump = tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(RANK_SCRIPT.format(config=_config(), out=str(out), dump=str(dump)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={_free_port()}", str(script)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK"))
    assert lines == [f"RANK 0 completed 6 {out / 'model.pt'}", "RANK 1 completed 6 None"]
    a = torch.load(dump / "rank0.pt", weights_only=True)
    b = torch.load(dump / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "ranks diverged: gradients were not averaged"
    # rank 0 wrote the run; what it saved is what both ranks hold
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["metadata"]["world_size"] == 2
    assert all(torch.equal(saved["state_dict"][k], a[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.csv", "model.pt"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # header + one row per step, written once
    # it trained: the coordinate heads left their zero initialisation
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("coordnet.heads"))
