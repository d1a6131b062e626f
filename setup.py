"""Build script: the Python package always installs; the C++ extension is optional.

* `kernels/` (Triton) installs as `deepatlas_fast.kernels`.
* `csrc/` builds `deepatlas_fast._C` where a C++ compiler and torch are present, with the CUDA
  sources added only where torch itself has CUDA. A failed or impossible build prints why and
  leaves a pure-Python install: every op then runs on its reference/Triton backends.
* Set DEEPATLAS_FAST_NO_EXTENSION=1 to skip the extension on purpose.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["deepatlas_fast", "deepatlas_fast.ops", "deepatlas_fast.reference", "deepatlas_fast.data",
            "deepatlas_fast.commands", "deepatlas_fast.kernels"]
PACKAGE_DIR = {"deepatlas_fast.kernels": "kernels"}


def _say(message):
    print(f"deepatlas-fast setup: {message}", file=sys.stderr)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension_and_builder():
    """Return ([extension], build_ext class), or ([], plain build_ext) with the reason printed."""
    if os.environ.get("DEEPATLAS_FAST_NO_EXTENSION", "0") not in ("", "0"):
        _say("DEEPATLAS_FAST_NO_EXTENSION is set: skipping the C++ extension")
        return [], build_ext
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found: skipping the C++ extension (pure-Python install)")
        return [], build_ext
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time (use --no-build-isolation): skipping the C++ extension")
        return [], build_ext

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # nvcc's standard: C++20, as the .cpp files, libtorch itself and torch's own extension default since
    # torch 2.12 (torch's headers use C++20 features: nvcc warns on them under C++17). cuda_sm90.py compiles
    # with it too.
    cuda_standard = "-std=c++20"
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"]  # C++20: as torch's headers; OpenMP: at::parallel_for
    if platform.machine().lower() in ("x86_64", "amd64"):
        # SSE4.1 (every x86-64 CPU since 2008): floor() is one instruction instead of a mask sequence; the
        # CPU sample and invert kernels, which floor every coordinate, run 15-20 % faster with it.
        cxx_flags.append("-msse4.1")
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "deepatlas_fast._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("DEEPATLAS_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", cuda_standard]},
            extra_link_args=["-fopenmp"],
        )
    else:
        if cuda_sources:
            _say("torch has no CUDA (or CUDA_HOME is unset): building the CPU part only")
        extension = cpp_extension.CppExtension(
            "deepatlas_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the extension, but never fail the install because of it."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any build failure leaves a pure-Python install
                _say(f"C++ extension build failed, continuing without it: {error}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                _say(f"C++ extension {ext.name} failed to build, continuing without it: {error}")

    return [extension], OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, builder = _extension_and_builder()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass={"build_ext": builder},
    zip_safe=False,
)
