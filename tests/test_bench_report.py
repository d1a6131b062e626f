"""The GPU kernel report's plumbing, on the CPU at tiny sizes: implementation filters, the incremental
report files and --merge (timings themselves are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"


def report(tmp_path, name, *args):
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--ops", "jacobian_var", "--reps", "1",
         "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_filters_and_merge(tmp_path):
    stock = report(tmp_path, "stock", "--impls", "stock")
    ours = report(tmp_path, "ours", "--skip-impls", "stock")
    rows = json.loads((stock / "report.json").read_text())["rows"]
    assert rows and {r["impl"] for r in rows} == {"stock"}
    assert "stock" not in {r["impl"] for r in json.loads((ours / "report.json").read_text())["rows"]}

    merged = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--merge", str(stock / "report.json"), str(ours / "report.json"),
         "--out", str(merged)], capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((merged / "report.json").read_text())["rows"]
    ours_rows = json.loads((ours / "report.json").read_text())["rows"]
    assert len(rows) == len(json.loads((stock / "report.json").read_text())["rows"]) + len(ours_rows)
    # each case's rows are together, and ours carry the ratio to the stock row of the other run
    cases = [r["case"] for r in rows]
    blocks = [c for i, c in enumerate(cases) if i == 0 or cases[i - 1] != c]
    assert len(blocks) == len(set(cases))
    assert all("speedup_vs_stock" in r for r in rows if "error" not in r)
    assert "| jacobian_var |" in (merged / "report.md").read_text()


def test_points_choose_the_cases(tmp_path):
    out = report(tmp_path, "points", "--points", "160x2,200x1", "--no-multichannel", "--impls", "stock")
    cases = [r["case"] for r in json.loads((out / "report.json").read_text())["rows"]]
    assert cases == ["2x16³", "1x20³"]  # --quick divides the sides by 10
    bad = subprocess.run([sys.executable, str(SCRIPT), "--points", "256"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "--points" in bad.stderr


def test_triton_lncc_variant_sets_the_in_plane_passes_for_forward_and_backward(monkeypatch):
    """The report's "triton (dot in-plane)" row: the setting holds for the whole measurement, including
    the backward that autograd runs after the forward's call returned, and is restored afterwards."""
    import torch

    from deepatlas_fast import bench
    from deepatlas_fast.kernels import similarity

    available = {"triton": ["lncc"]}
    (name, fn), = bench._triton_lncc_variant("dot", available).items()
    assert name == "triton (dot in-plane)" and bench._triton_lncc_variant("dot", {}) == {}
    seen = []  # the in-plane mode of every launch plan (forward, then backward)

    class Plan(similarity._Plan):
        def __init__(self, *args):
            super().__init__(*args)
            seen.append(self.inplane)

    monkeypatch.setattr(similarity, "_Plan", Plan)
    a = torch.randn(1, 1, 3, 10, 10, requires_grad=True)
    b = torch.randn(1, 1, 3, 10, 10)
    before = similarity.INPLANE
    with fn.context():
        out = fn(a, b)
        torch.autograd.grad(out, [a])
    assert seen == ["dot", "dot"]
    assert similarity.INPLANE == before == "scratch"


def test_cuda_jacobian_variant_selects_the_tiled_backward_for_the_measurement(monkeypatch):
    """The report's "cuda (tiled)" jacobian_var row: DEEPATLAS_FAST_CUDA_JACOBIAN=tiled while it is measured,
    the default afterwards; no row without the cuda backend."""
    from deepatlas_fast import bench
    from deepatlas_fast.ops import _cpp

    monkeypatch.delenv(_cpp.JACOBIAN_CUDA_VARIABLE, raising=False)
    (name, fn), = bench._cuda_jacobian_variant("tiled", {"cuda": ["jacobian_var"]}).items()
    assert name == "cuda (tiled)" and bench.backend_of(name) == "cuda"
    assert bench._cuda_jacobian_variant("tiled", {"cuda": ["lncc"]}) == {}
    with fn.context():
        assert _cpp.jacobian_cuda_implementation() == "tiled"
    assert _cpp.jacobian_cuda_implementation() == "gather"


def test_cuda_invert_splat_variant_selects_the_tiled_backward_for_the_measurement(monkeypatch):
    """The report's "cuda (tiled splat)" invert_displacement row: DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled while
    it is measured (its backward's splat), the default afterwards."""
    from deepatlas_fast import bench
    from deepatlas_fast.ops import _cpp

    monkeypatch.delenv(_cpp.INVERT_SPLAT_CUDA_VARIABLE, raising=False)
    (name, fn), = bench._cuda_invert_splat_variant("tiled", {"cuda": ["invert_displacement"]}).items()
    assert name == "cuda (tiled splat)" and bench._cuda_invert_splat_variant("tiled", {}) == {}
    with fn.context():
        assert _cpp.invert_splat_cuda_implementation() == "tiled"
    assert _cpp.invert_splat_cuda_implementation() == "atomic"


def test_cuda_lncc_variant_with_one_z_plane_sets_both_variables(monkeypatch):
    """The report's "cuda (tiled, 1 z-plane)" lncc row: the tiled kernels with one plane per step while it is
    measured, both variables restored afterwards; its setting names both (gpu_check's skips match either)."""
    import os

    from deepatlas_fast import bench
    from deepatlas_fast.ops import _cpp

    monkeypatch.delenv(_cpp.LNCC_CUDA_VARIABLE, raising=False)
    monkeypatch.setenv("DEEPATLAS_FAST_LNCC_Z_PLANES", "2")
    (name, fn), = bench._cuda_lncc_variant("tiled", {"cuda": ["lncc"]}, "1").items()
    assert name == "cuda (tiled, 1 z-plane)"
    assert fn.setting == "DEEPATLAS_FAST_CUDA_LNCC=tiled DEEPATLAS_FAST_LNCC_Z_PLANES=1"
    with fn.context():
        assert _cpp.lncc_cuda_implementation() == "tiled" and os.environ["DEEPATLAS_FAST_LNCC_Z_PLANES"] == "1"
    assert _cpp.lncc_cuda_implementation() == "separable" and os.environ["DEEPATLAS_FAST_LNCC_Z_PLANES"] == "2"


def test_pick_defaults_names_the_winner_and_its_setting(tmp_path):
    """benchmarks/pick_defaults.py on a report: our implementations ranked per case (failed rows, the
    reference and stock left out), and per op the winner at the largest side with the setting its rows
    recorded; the variant rows of a real report carry that setting."""
    from deepatlas_fast import bench

    def row(op, case, impl, ms, side, **extra):
        return {"op": op, "case": case, "impl": impl, "fwd_bwd_ms": ms, "side": side, "batch": 1, "channels": 1,
                **extra}

    tiled = "DEEPATLAS_FAST_CUDA_LNCC=tiled"
    rows = [row("lncc", "1x256³", "cuda", 7.3, 256), row("lncc", "1x256³", "cuda (tiled)", 1.2, 256, setting=tiled),
            row("lncc", "1x256³", "stock", 90.0, 256), row("lncc", "1x160³", "cuda", 0.4, 160),
            row("lncc", "1x160³", "cuda (tiled)", 0.5, 160, setting=tiled),
            row("jacobian_var", "1x256³", "triton", 2.4, 256), row("jacobian_var", "1x256³", "cuda", 1.6, 256),
            row("jacobian_var", "1x256³", "reference", 0.1, 256), {"op": "sample", "case": "x", "impl": "cuda",
                                                                   "error": "RuntimeError: boom"}]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"environment": {}, "rows": rows}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pick_defaults.py"), str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "| lncc | 1x160³ | cuda 0.400 (1.00x), cuda (tiled) 0.500 (1.25x) |" in proc.stdout
    assert "lncc: cuda (tiled) wins at 1x256³ (1.200 ms)" in proc.stdout and tiled in proc.stdout
    assert "jacobian_var: cuda wins at 1x256³ (1.600 ms); DEFAULT_ORDER['cuda'] order for it: ['cuda', 'triton']" \
        in proc.stdout
    assert "stock" not in proc.stdout and "reference" not in proc.stdout and "sample" not in proc.stdout
    (name, fn), = bench._cuda_jacobian_variant("tiled", {"cuda": ["jacobian_var"]}).items()
    assert fn.setting == "DEEPATLAS_FAST_CUDA_JACOBIAN=tiled"


def test_skipped_matches_names_and_variant_settings():
    """gpu_check leaves out the variants whose tests failed by their variable ("VAR="), other rows by name."""
    from deepatlas_fast import bench

    (name, fn), = bench._cuda_invert_splat_variant("tiled", {"cuda": ["invert_displacement"]}).items()
    plain = bench._with_backend("cuda", lambda d: d)
    assert bench.skipped(name, fn, ["DEEPATLAS_FAST_CUDA_INVERT_SPLAT="])
    assert not bench.skipped(name, fn, ["DEEPATLAS_FAST_CUDA_SPLAT="])  # sample's variable, not a prefix of it
    assert not bench.skipped("cuda", plain, ["DEEPATLAS_FAST_CUDA_INVERT_SPLAT=", ""])
    assert bench.skipped("reference", plain, ["reference"]) and not bench.skipped(name, fn, [""])


def test_kernel_profile_runs_on_the_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_profile.py"), "--side", "10", "--device", "cpu",
         "--backends", "reference", "--iters", "1", "--rows", "2", "--skip", "DEEPATLAS_FAST_CUDA_LNCC="],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    for op in ("sample", "lncc", "jacobian_var", "invert_displacement"):
        assert f"## {op} " in proc.stdout


def test_raw_op_errors_all_raise_on_the_cpu():
    """The GPU session's crash check (benchmarks/raw_op_errors.py) passes on the CPU kernels."""
    from deepatlas_fast._extension import load_extension

    if load_extension()[0] is None:
        pytest.skip("the C++ extension is not built")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "raw_op_errors.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = proc.stdout.splitlines()
    assert len(cases) >= 6 and all(line.endswith("| raised") for line in cases)


def test_segv_locator_names_the_faulting_library(tmp_path):
    """raw_op_errors --locate: the preloaded handler prints the crash's library and re-raises the signal."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import raw_op_errors

    library = raw_op_errors.build_locator(str(tmp_path))
    if library is None:
        pytest.skip("no C compiler (cc/gcc) to build benchmarks/segv_locator.c")
    proc = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, LD_PRELOAD=library))
    assert proc.returncode == -11, proc.stderr
    assert "segv_locator: pc " in proc.stderr and "libc" in proc.stderr, proc.stderr


def test_extension_stamp_matches_its_own_tree_only(tmp_path):
    """gpu_check uses a prebuilt library only when its stamp (sources, Python, torch) still matches."""
    script = str(ROOT / "benchmarks" / "extension_stamp.py")
    here = subprocess.run([sys.executable, script], capture_output=True, text=True, check=True).stdout.strip()
    assert here.startswith("python=") and f"torch={torch.__version__}" in here
    recorded = tmp_path / "_C.prebuilt"
    recorded.write_text(here + "\n")
    assert subprocess.run([sys.executable, script, "--check", str(recorded)]).returncode == 0
    recorded.write_text(here.replace("sources=", "sources=0"))
    assert subprocess.run([sys.executable, script, "--check", str(recorded)], capture_output=True).returncode == 1
    assert subprocess.run([sys.executable, script, "--check", str(tmp_path / "none")],
                          capture_output=True).returncode == 1

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import extension_stamp

    copy = tmp_path / "tree"
    (copy / "csrc").mkdir(parents=True)
    (copy / "csrc" / "a.cu").write_text("x")
    (copy / "setup.py").write_text("y")
    before = extension_stamp.source_digest(copy)
    (copy / "csrc" / "README.md").write_text("notes")  # not compiled: the library it stamps is the same
    assert extension_stamp.source_digest(copy) == before
    (copy / "csrc" / "a.cu").write_text("z")
    assert extension_stamp.source_digest(copy) != before


def test_gpu_check_gates_each_opt_in_kernel_by_an_existing_test_file():
    """gpu_check.sh's map from test file to setting: every file exists and every setting VAR=value is one of
    ops/_cpp.py's choices for VAR (a typo would leave a kernel out of the report without a word)."""
    import re

    from deepatlas_fast.ops import _cpp

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    block = script[script.index("declare -A TILED_VARIABLE=("):]
    entries = re.findall(r"\[(tests/[\w.]+)\]=(\w+)=(\w+)", block[:block.index("\n)\n")])
    assert len(entries) >= 7
    choices = {_cpp.LNCC_CUDA_VARIABLE: _cpp.LNCC_CUDA_IMPLEMENTATIONS,
               _cpp.SPLAT_CUDA_VARIABLE: _cpp.SPLAT_CUDA_IMPLEMENTATIONS,
               _cpp.INVERT_SPLAT_CUDA_VARIABLE: _cpp.INVERT_SPLAT_CUDA_IMPLEMENTATIONS,
               _cpp.JACOBIAN_CUDA_VARIABLE: _cpp.JACOBIAN_CUDA_IMPLEMENTATIONS}
    for path, variable, value in entries:
        assert (ROOT / path).is_file(), path
        assert value in choices[variable][1:], (variable, value)  # an opt-in value, not the default


def test_memory_breakdown_replays_the_allocator_trace():
    """train_step_gpu --memory-breakdown: the live bytes at the trace's peak, by allocating line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step_gpu

    def frames(name):
        return [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "conv"},
                {"filename": f"/x/deepatlas_fast/{name}.py", "line": 7, "name": name}]

    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("model")},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames("objective")},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 30, "frames": frames("objective")},
        {"action": "alloc", "addr": 4, "size": 10, "frames": []},
    ]
    peak, by_site = train_step_gpu.peak_allocations(events, train_step_gpu.deepatlas_frame)
    assert peak == 150 and by_site == {"model.py:7 model": 100, "objective.py:7 objective": 50}


def test_cpu_raw_ops_times_every_kernel_call(tmp_path):
    """benchmarks/cpu_raw_ops.py (the build-vs-build comparison of the C++ cpu kernels) runs every row and writes
    them as JSON; it names the tree whose package it imported."""
    from deepatlas_fast.ops import registry

    reason = registry.unavailable_reason("cpu", "sample", "cpu")
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_raw_ops.py"), "--side", "9", "--repeats", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 12 and all(ms > 0 for ms in rows.values())
    assert "sample backward C=9 both" in rows and f"tree {ROOT}" in proc.stdout
