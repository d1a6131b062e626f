// Host side of jacobian_det / jacobian_var shared by cpu/jacobian.cpp and cuda/jacobian.cu: the checks of
// the raw torch.ops.deepatlas_fast_C ops (the Python layer validates too), the field's geometry and the
// scale factor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "host.h"
#include "jacobian.h"

namespace deepatlas_fast {
namespace jacobian {

// field [N, 3, D, H, W], every spatial size >= 2; returns its geometry.
inline Geometry check_field(const at::Tensor& field) {
  check_input(field, "field", 5);
  TORCH_CHECK(field.size(1) == 3, "deepatlas_fast: field must have 3 channels (D, H, W components), got shape ",
              field.sizes());
  Geometry g;
  g.n = field.size(0);
  for (int a = 0; a < 3; ++a) {
    g.size[a] = field.size(2 + a);
    TORCH_CHECK(g.size[a] >= 2, "deepatlas_fast: field must have every spatial size >= 2, got shape ", field.sizes());
  }
  g.plane = g.size[1] * g.size[2];
  g.voxels = g.size[0] * g.plane;
  return g;
}

// prod(scale): the factor of det (jacobian.h).
inline double scale_factor(const std::optional<at::ArrayRef<double>>& scale) {
  if (!scale.has_value()) return 1.0;
  TORCH_CHECK(scale->size() == 3, "deepatlas_fast: scale must have 3 entries (one per channel), got ", scale->size());
  return (*scale)[0] * (*scale)[1] * (*scale)[2];
}

// jacobian_det_backward's grad: the det map's gradient [N, 1, D, H, W] of field (checked: g).
inline void check_det_grad(const at::Tensor& grad, const at::Tensor& field, const Geometry& g) {
  check_input(grad, "grad", 5);
  check_same_dtype(field, "field", grad, "grad");
  check_device(grad, "grad", field, "field");
  TORCH_CHECK(grad.size(0) == g.n && grad.size(1) == 1 && grad.size(2) == g.size[0] && grad.size(3) == g.size[1] &&
                  grad.size(4) == g.size[2],
              "deepatlas_fast: grad must have shape [N, 1, D, H, W] of field ", field.sizes(), ", got ", grad.sizes());
}

// jacobian_var_backward's grad_var: one value of field's dtype.
inline void check_var_grad(const at::Tensor& grad_var, const at::Tensor& field) {
  TORCH_CHECK(grad_var.numel() == 1,
              "deepatlas_fast: grad_var must hold one value (the variance's gradient), got shape ", grad_var.sizes());
  check_same_dtype(field, "field", grad_var, "grad_var");
  check_device(grad_var, "grad_var", field, "field");
}

// jacobian_var's per-batch statistics [N, 2] float64 (mean, population variance of the scaled det), which
// its backward takes from the forward instead of a second pass over the field.
inline void check_stats(const at::Tensor& stats, const at::Tensor& field, const Geometry& g) {
  check_input(stats, "stats", 2);
  TORCH_CHECK(stats.scalar_type() == at::kDouble, "deepatlas_fast: stats must be float64, got ", stats.scalar_type());
  check_device(stats, "stats", field, "field");
  TORCH_CHECK(stats.size(0) == g.n && stats.size(1) == 2,
              "deepatlas_fast: stats must have shape [N, 2] (jacobian_var's third output) of field ", field.sizes(),
              ", got ", stats.sizes());
}

}  // namespace jacobian
}  // namespace deepatlas_fast

// Registers the ops for dispatch key KEY (CPU or CUDA), one list for both backends: cpu/jacobian.cpp and
// cuda/jacobian.cu each define jacobian_det, jacobian_var, det_backward<TILED> and var_backward<TILED> (TILED:
// the tiled backward of jacobian_tile.h; on the CPU its serial emulation) in namespace deepatlas_fast and end
// with DEEPATLAS_FAST_JACOBIAN_IMPL(CPU), resp. (CUDA).
#define DEEPATLAS_FAST_JACOBIAN_IMPL(KEY)                                               \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {                                        \
    m.impl("jacobian_det", &deepatlas_fast::jacobian_det);                              \
    m.impl("jacobian_det_backward", &deepatlas_fast::det_backward<false>);              \
    m.impl("jacobian_det_backward_tiled", &deepatlas_fast::det_backward<true>);         \
    m.impl("jacobian_var", &deepatlas_fast::jacobian_var);                              \
    m.impl("jacobian_var_backward", &deepatlas_fast::var_backward<false>);              \
    m.impl("jacobian_var_backward_tiled", &deepatlas_fast::var_backward<true>);         \
  }
