"""The README's commands and examples are what CI runs and what works."""

import os
import re
import warnings

import pytest

import deepatlas_fast as da

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read(path):
    with open(os.path.join(ROOT, path)) as handle:
        return handle.read()


def test_ci_runs_the_readme_test_command():
    readme = read("README.md")
    bash_blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_command = next(block.strip() for block in bash_blocks if "pytest" in block)
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert test_command in ci_lines


def test_the_first_command_installs_and_runs_the_demo():
    """The README's first command is the main job: ``deepatlas-fast demo`` (tests/test_demo.py runs it)."""
    first = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)[0].strip()
    assert first.startswith("python3 -m venv .venv") and first.endswith(".venv/bin/deepatlas-fast demo")


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", read("README.md")))))
def test_readme_python_examples_run(index):
    block = re.findall(r"```python\n(.*?)```", read("README.md"), flags=re.S)[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", da.BackendFallbackWarning)
        exec(compile(block, f"README.md python block {index}", "exec"), {})


def test_ops_tour_runs_and_reports_sound_numbers():
    from deepatlas_fast.cli import main
    from deepatlas_fast.tour import run_tour

    lines = []
    results = run_tour(size=16, echo=lines.append)
    assert results["sample_max_diff_vs_grid_sample"] < 1e-5
    assert results["folding"] == 0.0 and results["det_min"] > 0
    assert 0.2 < results["valid_fraction"] <= 1.0 and results["inverse_max_error_voxels"] <= 0.05
    assert results["lncc_after_unwarp"] < results["lncc_before"]  # unwarping restores similarity
    assert any(line.startswith("invert") for line in lines)
    assert main(["ops-tour", "--size", "12"]) == 0
    assert main(["info"]) == 0
