// Host-only helpers of the C++ ops (CPU and CUDA launchers): output allocation, checks and results.
// The per-op host code shared by cpu/ and cuda/ (argument checks of the raw torch.ops.deepatlas_fast_C
// ops, geometry from the shapes, option parsing) is in sampling_host.h, inversion_host.h, jacobian_host.h
// and lncc_host.h. Host-only, but compiled by nvcc too (C++20, as the .cpp files).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace deepatlas_fast {

// Kernel outputs are poisoned with NaN when DEEPATLAS_FAST_POISON=1 (the tests set it), so an element a
// kernel never writes fails the comparison with the reference instead of passing by luck.
inline bool poison_outputs() {
  const char* value = std::getenv("DEEPATLAS_FAST_POISON");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs() && at::isFloatingType(out.scalar_type())) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

inline void check_input(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "deepatlas_fast: ", name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "deepatlas_fast: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "deepatlas_fast: ", name,
              " must be float32 or float64 (the Python layer widens halves), got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "deepatlas_fast: ", b_name, " must have the dtype of ", a_name,
              " (", a.scalar_type(), "), got ", b.scalar_type());
}

// The dispatcher sends a call to the CUDA kernels when any argument is on a GPU, so the CUDA side checks
// that the others are on the same device; on the CPU (every argument on the CPU) this never fails.
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), "deepatlas_fast: ", name, " must be on the device of ", like_name, " (",
              like.device(), "), got ", t.device());
}

// What a backward op with two optional gradients returns: those asked for, in order.
inline std::vector<at::Tensor> requested_gradients(bool need_first, const at::Tensor& first, bool need_second,
                                                   const at::Tensor& second) {
  std::vector<at::Tensor> grads;
  if (need_first) grads.push_back(first);
  if (need_second) grads.push_back(second);
  return grads;
}

}  // namespace deepatlas_fast
