"""Backend registry: selection, context manager, environment variable, fallback warnings."""

import subprocess
import sys
import warnings

import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.ops import registry


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "PROVIDERS", dict(registry.PROVIDERS))
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setattr(registry, "_warned", set())
    import spy_backend

    spy_backend.calls.clear()
    return registry


def inputs():
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(1, 1, 4, 4, 4, generator=g)
    coords = (torch.rand(1, 3, 3, 3, 3, generator=g) * 2 - 1).requires_grad_()
    return vol, coords


def test_default_is_reference_on_cpu():
    assert da.get_backend("sample", "cpu") == ("cpu" if "sample" in da.available_backends("cpu")["cpu"] else "reference")
    assert da.available_backends("cpu")["reference"] == list(registry.OPS)


def test_set_and_context_manager_priorities(fresh_registry):
    fresh_registry.PROVIDERS["cpu"] = "spy_backend"
    da.set_backend("reference")
    assert da.get_backend("sample") == "reference"
    with da.use_backend("cpu", ops="sample"):
        assert da.get_backend("sample") == "cpu"
        with da.use_backend("reference"):
            assert da.get_backend("sample") == "reference"
        assert da.get_backend("sample") == "cpu"
    assert da.get_backend("sample") == "reference"
    da.set_backend(None)
    assert da.get_backend("sample") == "cpu"  # the default order puts "cpu" first on cpu


def test_requested_backend_really_runs(fresh_registry):
    import spy_backend

    fresh_registry.PROVIDERS["cpu"] = "spy_backend"
    vol, coords = inputs()
    expected = da.reference.sample(vol, coords.detach())
    with da.use_backend("cpu"):
        out = da.sample(vol, coords)
        out.sum().backward()
    assert spy_backend.calls == ["sample", ("sample_backward", False, True)]
    torch.testing.assert_close(out, expected)


def test_backward_runs_on_the_forward_backend_after_the_context_closes(fresh_registry):
    """Users write ``with use_backend(...): loss = f(x)`` then ``loss.backward()`` outside the block:
    the backward must still run on the backend that ran the forward (and vice versa)."""
    import spy_backend

    fresh_registry.PROVIDERS["cpu"] = "spy_backend"
    spy_backend.calls.clear()
    vol, coords = inputs()
    with da.use_backend("cpu"):
        out = da.sample(vol, coords)
    with da.use_backend("reference"):
        out.sum().backward()
    assert spy_backend.calls == ["sample", ("sample_backward", False, True)]
    spy_backend.calls.clear()
    with da.use_backend("reference"):
        out = da.sample(vol, coords.detach().requires_grad_())
    with da.use_backend("cpu"):
        out.sum().backward()
    assert spy_backend.calls == []


def test_missing_backend_falls_back_with_one_warning(fresh_registry):
    fresh_registry.PROVIDERS.pop("cuda")  # as in a build without the C++ extension
    vol, coords = inputs()
    with pytest.warns(da.BackendFallbackWarning, match="'cuda' is not part of this build"):
        with da.use_backend("cuda"):
            out = da.sample(vol, coords)
    torch.testing.assert_close(out, da.reference.sample(vol, coords))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with da.use_backend("cuda"):
            da.sample(vol, coords)  # same op, backend, device and reason: no second warning


def test_backend_without_the_op_falls_back(fresh_registry):
    fresh_registry.PROVIDERS["cpu"] = "spy_backend"
    a = torch.randn(1, 1, 5, 5, 5)
    with pytest.warns(da.BackendFallbackWarning, match="does not implement lncc"):
        with da.use_backend("cpu"):
            assert da.get_backend("lncc") == "reference"
            da.lncc(a, a, 3)


def test_broken_default_backend_warns_and_falls_back(fresh_registry):
    fresh_registry.PROVIDERS["cpu"] = "no_such_module_for_deepatlas_tests"
    with pytest.warns(da.BackendFallbackWarning, match="failed to load"):
        assert da.get_backend("sample", "cpu") == ("cpu" if "sample" in da.available_backends("cpu")["cpu"] else "reference")


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="name must name a backend"):
        da.set_backend("tritonn")
    with pytest.raises(ValueError, match="ops must name ops"):
        da.set_backend("reference", ops=["samples"])
    with pytest.raises(ValueError, match="op must be one of"):
        da.get_backend("conv")


def test_parse_env():
    assert registry.parse_env("triton") == {op: "triton" for op in registry.OPS}
    assert registry.parse_env(" lncc=triton, sample=cuda ") == {"lncc": "triton", "sample": "cuda"}
    assert registry.parse_env("") == {}
    with pytest.raises(ValueError, match="DEEPATLAS_FAST_BACKEND must name a backend"):
        registry.parse_env("lncc=fast")
    with pytest.raises(ValueError, match="unknown op"):
        registry.parse_env("lnc=triton")


def test_environment_variable_is_read_at_import():
    code = "import deepatlas_fast as da; print(da.get_backend('lncc'), da.get_backend('sample'))"
    env = {"DEEPATLAS_FAST_BACKEND": "lncc=cuda,sample=reference", "PATH": ""}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    # the cuda backend cannot run on the CPU, so lncc falls back to the CPU default (the request was read,
    # as the explicit sample=reference shows)
    default = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                             env={"PATH": ""}).stdout.split()
    assert result.stdout.split() == [default[0], "reference"]
    assert "backend 'cuda'" in subprocess.run(
        [sys.executable, "-c", code.replace("print(", "import torch; da.lncc(torch.ones(1,1,3,3,3), torch.ones(1,1,3,3,3), 3); print(")],
        capture_output=True, text=True, env=env,
    ).stderr


def test_triton_runs_on_the_cpu_only_under_the_interpreter():
    code = "import deepatlas_fast as da; print(da.available_backends('cpu')['triton'])"
    for interpret, expected in [("0", "[]"), ("1", str(list(registry.OPS)))]:
        env = {"TRITON_INTERPRET": interpret, "PATH": ""}
        result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_cuda_default_order_follows_the_measured_tables():
    """Measured on an H200 (benchmarks/results/2026-11-27-h200-kernels.md): the C++ cuda kernels, then
    triton, then the reference on CUDA; on the CPU triton only runs in the (slow) interpreter, so it is
    never chosen by default there."""
    assert registry.DEFAULT_ORDER["cuda"] == ("cuda", "triton", "reference")
    assert "triton" not in registry.DEFAULT_ORDER["cpu"]
    assert da.get_backend("sample", "cpu") == ("cpu" if "sample" in da.available_backends("cpu")["cpu"] else "reference")
