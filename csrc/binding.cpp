// Entry point of the deepatlas_fast._C extension.
//
// Ops defined here live in the `deepatlas_fast_C` namespace: they are backend kernels that the
// Python dispatch layer (deepatlas_fast/ops) calls, not the public `deepatlas_fast::` ops.
// Only light headers are included on purpose: <torch/extension.h> costs ~40 s per translation unit.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace deepatlas_fast {

std::string build_info() {
  std::string info = "cxx=" __VERSION__;
#ifdef _OPENMP
  info += " openmp=" + std::to_string(_OPENMP);
#else
  info += " openmp=0";
#endif
#ifdef DEEPATLAS_FAST_WITH_CUDA
  info += " cuda=1";
#else
  info += " cuda=0";
#endif
  return info;
}

}  // namespace deepatlas_fast

TORCH_LIBRARY(deepatlas_fast_C, m) {
  m.def("build_info() -> str", &deepatlas_fast::build_info);
}

// A plain module object so that `import deepatlas_fast._C` loads the library and runs the
// registration above; no Python functions are exported through pybind11.
static struct PyModuleDef extension_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&extension_module); }
