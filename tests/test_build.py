"""Packaging: the compiled extension builds where a compiler exists; Triton kernels install as
deepatlas_fast.kernels; build_info reports the state for bug reports."""

import os
import shutil

import pytest

import deepatlas_fast as da


def test_kernels_package_is_installed_under_deepatlas_fast():
    import deepatlas_fast.kernels as kernels

    assert kernels.__name__ == "deepatlas_fast.kernels"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine: the pure-Python install is expected")
@pytest.mark.skipif(os.environ.get("DEEPATLAS_FAST_NO_EXTENSION", "0") not in ("", "0"), reason="extension disabled on purpose")
def test_extension_was_built_and_loads():
    from deepatlas_fast._extension import load_extension

    module, reason = load_extension()
    assert module is not None, f"C++ extension missing although a compiler exists: {reason}"
    info = da.build_info()
    assert info["extension"].startswith("cxx=")


def test_build_info_names_a_backend_per_op():
    info = da.build_info()
    assert info["deepatlas_fast"] == da.__version__
    assert set(info["backends"]["cpu"]) == set(da.OPS)
