"""benchmarks/loss_memory.py: the allocation replay finds the peak and what is live at it; the script runs."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from loss_memory import peak_by_site  # noqa: E402


def test_replay_finds_the_peak_and_what_is_live_there():
    mib = 1 << 18  # float32 elements per MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        a = torch.empty(4 * mib)
        b = torch.empty(8 * mib)
        del a
        c = torch.empty(2 * mib)  # below the peak of a + b
        del b, c
    peak, by_site = peak_by_site(prof, torch.device("cpu"))
    assert peak == 12 * 2**20
    assert sum(by_site.values()) == peak
    assert all("aten::empty" in site for site in by_site)


def test_script_runs_on_a_tiny_pair():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--side", "12", "--template", "8",
         "--features", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss side's peak on cpu: 2 exams at 12^3, 3 feature channels" in proc.stdout
    assert "| volumes | MiB | allocated at |" in proc.stdout
    assert "backward of" in proc.stdout
