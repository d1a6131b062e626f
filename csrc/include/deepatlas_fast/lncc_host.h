// Host side of lncc shared by cpu/lncc.cpp and cuda/lncc.cu: the checks of the raw torch.ops.deepatlas_fast_C
// ops (the Python layer validates too) and their options (kernel, kernel_size, eps, reduction).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "host.h"
#include "lncc.h"

namespace deepatlas_fast {
namespace lncc {

// The options of an lncc call, checked.
struct Options {
  int k;          // kernel_size: taps of the window along each axis (odd)
  bool gaussian;  // kernel == "gaussian", else "box"
  bool mean;      // reduction == "mean", else "none"
  double eps;
};

// a and b: 5-D, one dtype, device and shape, not empty; the options. max_kernel_size: the backend's
// limit, named in the message (with limit_note, e.g. "on CUDA") when limit_note is given.
inline Options check_arguments(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                               double eps, c10::string_view reduction, int64_t max_kernel_size,
                               const char* limit_note = nullptr) {
  check_input(a, "a", 5);
  check_input(b, "b", 5);
  check_same_dtype(a, "a", b, "b");
  check_device(b, "b", a, "a");
  TORCH_CHECK(a.sizes() == b.sizes(), "deepatlas_fast: b must have the shape of a ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.numel() > 0, "deepatlas_fast: a must not be empty, got shape ", a.sizes());
  const bool odd = kernel_size >= 1 && kernel_size % 2 == 1 && kernel_size <= max_kernel_size;
  if (limit_note != nullptr) {
    TORCH_CHECK(odd, "deepatlas_fast: kernel_size must be a positive odd integer <= ", max_kernel_size, " ",
                limit_note, ", got ", kernel_size);
  } else {
    TORCH_CHECK(odd, "deepatlas_fast: kernel_size must be a positive odd integer, got ", kernel_size);
  }
  TORCH_CHECK(kernel == "box" || kernel == "gaussian", "deepatlas_fast: kernel must be 'box' or 'gaussian', got '",
              kernel, "'");
  TORCH_CHECK(eps > 0, "deepatlas_fast: eps must be > 0, got ", eps);
  TORCH_CHECK(reduction == "mean" || reduction == "none", "deepatlas_fast: reduction must be 'mean' or 'none', got '",
              reduction, "'");
  return Options{static_cast<int>(kernel_size), kernel == "gaussian", reduction == "mean", eps};
}

// The backward's grad: one element for reduction="mean" (mean), else the shape of a; a's dtype and device.
inline void check_grad(const at::Tensor& grad, const at::Tensor& a, bool mean) {
  check_same_dtype(a, "a", grad, "grad");
  check_device(grad, "grad", a, "a");
  if (mean) {
    TORCH_CHECK(grad.numel() == 1, "deepatlas_fast: grad must have one element for reduction='mean', got shape ",
                grad.sizes());
  } else {
    check_input(grad, "grad", 5);
    TORCH_CHECK(grad.sizes() == a.sizes(), "deepatlas_fast: grad must have the shape of a ", a.sizes(), ", got ",
                grad.sizes());
  }
}

}  // namespace lncc
}  // namespace deepatlas_fast

// Registers the ops for dispatch key KEY (CPU or CUDA), one list for both backends: cpu/lncc.cpp and
// cuda/lncc.cu each define lncc_forward and lncc_backward in namespace deepatlas_fast and end with
// DEEPATLAS_FAST_LNCC_IMPL(CPU), resp. (CUDA).
#define DEEPATLAS_FAST_LNCC_IMPL(KEY)                        \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {             \
    m.impl("lncc", &deepatlas_fast::lncc_forward);           \
    m.impl("lncc_backward", &deepatlas_fast::lncc_backward); \
  }
