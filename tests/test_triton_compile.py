"""Every Triton kernel compiles for sm_90 (H100) ahead of time, without a GPU: catches code the
interpreter runs but the GPU compiler rejects, and prints register/spill use (benchmarks/triton_sm90.py)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_sm90.py")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    variants = int(result.stdout.split("compile for sm_90, ")[1].split()[0])
    assert variants >= 20  # each op's kernels, in float32 and float64
