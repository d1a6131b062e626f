// Host side of invert / invert_displacement shared by cpu/inversion.cpp and cuda/inversion.cu: the checks
// of the raw torch.ops.deepatlas_fast_C ops (the Python layer validates too), the grids, the splat pyramid's
// levels and the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "box_splat.h"
#include "host.h"
#include "inversion.h"

namespace deepatlas_fast {
namespace inversion {

inline Grid spatial_grid(const at::Tensor& field) { return make_grid(field.size(2), field.size(3), field.size(4)); }

// The splat pyramid, finest (the target grid) first.
inline std::vector<Grid> pyramid(const Grid& target) {
  std::vector<Grid> levels{target};
  while (has_coarser(levels.back())) levels.push_back(coarser(levels.back()));
  return levels;
}

// ---- checks -----------------------------------------------------------------------------------------

inline void check_field(const at::Tensor& field, const char* name) {
  check_input(field, name, 5);
  TORCH_CHECK(field.size(1) == 3, "deepatlas_fast: ", name, " must have 3 channels, got shape ", field.sizes());
  TORCH_CHECK(field.size(2) >= 2 && field.size(3) >= 2 && field.size(4) >= 2, "deepatlas_fast: ", name,
              " must have every spatial size >= 2, got shape ", field.sizes());
}

inline void check_options(int64_t iters, double tol) {
  TORCH_CHECK(iters >= 0, "deepatlas_fast: iters must be >= 0, got ", iters);
  TORCH_CHECK(tol > 0, "deepatlas_fast: tol must be positive, got ", tol);
}

inline Grid check_out_shape(at::IntArrayRef out_shape) {
  TORCH_CHECK(out_shape.size() == 3 && out_shape[0] >= 2 && out_shape[1] >= 2 && out_shape[2] >= 2,
              "deepatlas_fast: out_shape must be 3 sizes (D, H, W), each >= 2, got ", out_shape);
  return make_grid(out_shape[0], out_shape[1], out_shape[2]);
}

// invert's arguments; returns the target grid (out_shape).
inline Grid check_invert(const at::Tensor& coords, at::IntArrayRef out_shape, int64_t iters, double tol) {
  check_field(coords, "coords");
  check_options(iters, tol);
  return check_out_shape(out_shape);
}

// invert_displacement's arguments; returns the grid of disp (source and target alike).
inline Grid check_invert_displacement(const at::Tensor& disp, int64_t iters, double tol) {
  check_field(disp, "disp");
  check_options(iters, tol);
  return spatial_grid(disp);
}

// The backward's arguments: field (coords, or disp with `disp`), the forward's inverse (inverse_disp)
// [N, 3, *target] and valid [N, 1, *target] bool, grad of the inverse's shape and field's dtype, all on
// field's device; inverse_disp has the shape of disp. Returns the target grid.
inline Grid check_backward(const at::Tensor& grad, const at::Tensor& field, const at::Tensor& inverse,
                           const at::Tensor& valid, bool disp) {
  const char* field_name = disp ? "disp" : "coords";
  const char* inverse_name = disp ? "inverse_disp" : "inverse";
  check_field(field, field_name);
  check_field(inverse, inverse_name);
  check_same_dtype(field, field_name, inverse, inverse_name);
  TORCH_CHECK(inverse.size(0) == field.size(0), "deepatlas_fast: ", inverse_name, " must have the batch size of ",
              field_name, " (", field.size(0), "), got shape ", inverse.sizes());
  check_input(grad, "grad", 5);
  check_same_dtype(field, field_name, grad, "grad");
  TORCH_CHECK(grad.sizes() == inverse.sizes(), "deepatlas_fast: grad must have the shape of ", inverse_name, " ",
              inverse.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool, "deepatlas_fast: valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK(valid.is_contiguous(), "deepatlas_fast: valid must be contiguous");
  TORCH_CHECK(valid.dim() == 5 && valid.size(0) == inverse.size(0) && valid.size(1) == 1 &&
                  valid.sizes().slice(2) == inverse.sizes().slice(2),
              "deepatlas_fast: valid must have shape [N, 1, *", inverse_name, ".shape[2:]], got ", valid.sizes());
  check_device(grad, "grad", field, field_name);
  check_device(inverse, inverse_name, field, field_name);
  check_device(valid, "valid", field, field_name);
  TORCH_CHECK(!disp || inverse.sizes() == field.sizes(), "deepatlas_fast: inverse_disp must have the shape of disp ",
              field.sizes(), ", got ", inverse.sizes());
  return spatial_grid(inverse);
}

// The tiled backward's arguments: the backward's, and tiles of the target grid numbered in 32 bits
// (box_splat.h's tile_point), the batch on a CUDA grid's y.
inline Grid check_backward_tiled(const at::Tensor& grad, const at::Tensor& field, const at::Tensor& inverse,
                                 const at::Tensor& valid, bool disp) {
  const Grid target = check_backward(grad, field, inverse, valid, disp);
  TORCH_CHECK(box::tiles_of(target.size).count() < (int64_t(1) << 31) && field.size(0) < 65536,
              "deepatlas_fast: invert backward (tiled): too many points, got ", inverse.sizes());
  return target;
}

// invert_splat_tiled's arguments: coords as invert's, level_shape 3 sizes >= 2, tiles of the source grid
// numbered in 32 bits (box_splat.h's tile_point); returns the level's grid.
inline Grid check_splat_level(const at::Tensor& coords, at::IntArrayRef level_shape) {
  check_field(coords, "coords");
  TORCH_CHECK(level_shape.size() == 3 && level_shape[0] >= 2 && level_shape[1] >= 2 && level_shape[2] >= 2,
              "deepatlas_fast: level_shape must be 3 sizes (D, H, W), each >= 2, got ", level_shape);
  const Grid src = spatial_grid(coords);
  TORCH_CHECK(box::tiles_of(src.size).count() < (int64_t(1) << 31) && coords.size(0) < 65536,
              "deepatlas_fast: invert_splat_tiled: too many points, got ", coords.sizes());
  return make_grid(level_shape[0], level_shape[1], level_shape[2]);
}

// ---- outputs ----------------------------------------------------------------------------------------

// The forward's outputs on the target grid: inverse [N, 3, *target] in field's dtype (poisoned under
// DEEPATLAS_FAST_POISON=1, see host.h) and valid [N, 1, *target] bool.
struct Outputs {
  at::Tensor inverse, valid;
};

inline Outputs new_outputs(const at::Tensor& field, const Grid& target) {
  const int64_t n = field.size(0);
  return {new_output({n, 3, target.size[0], target.size[1], target.size[2]}, field.options()),
          at::empty({n, 1, target.size[0], target.size[1], target.size[2]}, field.options().dtype(at::kBool))};
}

}  // namespace inversion
}  // namespace deepatlas_fast

// Registers the ops for dispatch key KEY (CPU or CUDA), one list for both backends: cpu/inversion.cpp and
// cuda/inversion.cu each define invert, invert_displacement and backward<DISP> in namespace deepatlas_fast
// and end with DEEPATLAS_FAST_INVERSION_IMPL(CPU), resp. (CUDA).
#define DEEPATLAS_FAST_INVERSION_IMPL(KEY)                                   \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {                             \
    m.impl("invert", &deepatlas_fast::invert);                               \
    m.impl("invert_backward", &deepatlas_fast::backward<false>);             \
    m.impl("invert_displacement", &deepatlas_fast::invert_displacement);     \
    m.impl("invert_displacement_backward", &deepatlas_fast::backward<true>); \
  }
