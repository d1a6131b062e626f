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

// The kernels' schemas, mirroring the Python backend signatures (deepatlas_fast/ops/backend_reference.py).
// Inputs arrive validated, contiguous and float32/float64 (halves are widened by the Python shim);
// cpu/*.cpp and cuda/*.cu register implementations for the CPU and CUDA dispatch keys. An op defined here
// without an implementation for a key is reported unavailable for that device by the registry.
TORCH_LIBRARY(deepatlas_fast_C, m) {
  m.def("build_info() -> str", &deepatlas_fast::build_info);
  m.def("sample(Tensor vol, Tensor coords, str padding) -> Tensor");
  m.def("sample_backward(Tensor grad, Tensor vol, Tensor coords, str padding, bool need_vol, bool need_coords)"
        " -> Tensor[]");
  m.def("warp(Tensor vol, Tensor disp, str padding) -> Tensor");
  m.def("warp_backward(Tensor grad, Tensor vol, Tensor disp, str padding, bool need_vol, bool need_disp) -> Tensor[]");
  m.def("lncc(Tensor a, Tensor b, int kernel_size, str kernel, float eps, str reduction) -> Tensor");
  m.def("lncc_backward(Tensor grad, Tensor a, Tensor b, int kernel_size, str kernel, float eps, str reduction,"
        " bool need_a, bool need_b) -> Tensor[]");
  // the volume gradient of sample / warp by tiles (splat_tile.h): CUDA kernels, and their emulation on the CPU
  m.def("sample_splat_tiled(Tensor grad, Tensor field, int[] vol_size, str padding, bool warp) -> Tensor");
  // one level of invert's splatted initial guess by tiles (invert_splat_tile.h): [N, cells, 4] accumulators
  m.def("invert_splat_tiled(Tensor coords, int[] level_shape) -> Tensor");
  // invert's backward splat by tiles of target points (invert_backward_tile.h)
  m.def("invert_backward_tiled(Tensor grad, Tensor coords, Tensor inverse, Tensor valid) -> Tensor");
  m.def("invert_displacement_backward_tiled(Tensor grad, Tensor disp, Tensor inverse_disp, Tensor valid) -> Tensor");
  // the tile algorithm of lncc (lncc_tile.h): CUDA kernels, and their serial emulation on the CPU
  m.def("lncc_tiled(Tensor a, Tensor b, int kernel_size, str kernel, float eps, str reduction) -> Tensor");
  m.def("lncc_tiled_backward(Tensor grad, Tensor a, Tensor b, int kernel_size, str kernel, float eps,"
        " str reduction, bool need_a, bool need_b) -> Tensor[]");
  m.def("jacobian_det(Tensor field, float[]? scale) -> Tensor");
  m.def("jacobian_det_backward(Tensor grad, Tensor field, float[]? scale) -> Tensor");
  // (var, folding, stats): stats [N, 2] float64, per batch element the mean and variance of det, for the backward
  m.def("jacobian_var(Tensor field, float[]? scale, bool normalized) -> (Tensor, Tensor, Tensor)");
  m.def("jacobian_var_backward(Tensor grad_var, Tensor field, Tensor stats, float[]? scale, bool normalized)"
        " -> Tensor");
  // the backward by tiles of the CUDA kernels (jacobian_tile.h), and their serial emulation on the CPU
  m.def("jacobian_det_backward_tiled(Tensor grad, Tensor field, float[]? scale) -> Tensor");
  m.def("jacobian_var_backward_tiled(Tensor grad_var, Tensor field, Tensor stats, float[]? scale, bool normalized)"
        " -> Tensor");
  m.def("invert(Tensor coords, int[] out_shape, int iters, float tol) -> (Tensor, Tensor)");
  m.def("invert_backward(Tensor grad, Tensor coords, Tensor inverse, Tensor valid) -> Tensor");
  m.def("invert_displacement(Tensor disp, int iters, float tol) -> (Tensor, Tensor)");
  m.def("invert_displacement_backward(Tensor grad, Tensor disp, Tensor inverse_disp, Tensor valid) -> Tensor");
}

// A plain module object so that `import deepatlas_fast._C` loads the library and runs the
// registration above; no Python functions are exported through pybind11.
static struct PyModuleDef extension_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&extension_module); }
