// Host side of sample / warp shared by cpu/sampling.cpp and cuda/sampling.cu: the checks of the raw
// torch.ops.deepatlas_fast_C ops (the Python layer validates too), the padding option and the geometry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "host.h"
#include "splat_tile.h"
#include "trilinear.h"

namespace deepatlas_fast {
namespace sampling {

inline const char* field_name(bool warp) { return warp ? "disp" : "coords"; }

// n items of c channels, a volume of vol_size (D, H, W) sampled at the points of field [n, 3, d, h, w].
inline Geometry geometry(int64_t n, int64_t c, at::IntArrayRef vol_size, const at::Tensor& field) {
  Geometry g;
  g.n = n;
  g.c = c;
  g.volume = 1;
  g.points = 1;
  for (int a = 0; a < 3; ++a) {
    g.size[a] = vol_size[a];
    g.out_size[a] = field.size(2 + a);
    g.volume *= g.size[a];
    g.points *= g.out_size[a];
  }
  return g;
}

inline bool zeros_padding(c10::string_view padding) {
  TORCH_CHECK(padding == "zeros" || padding == "border", "deepatlas_fast: padding must be 'border' or 'zeros'");
  return padding == "zeros";
}

// vol [n, c, D, H, W] and the field [n, 3, d, h, w] (coords or, warp, disp) of vol's dtype and device;
// returns the geometry.
inline Geometry check_forward(const at::Tensor& vol, const at::Tensor& field, bool warp) {
  const char* name = field_name(warp);
  check_input(vol, "vol", 5);
  check_input(field, name, 5);
  check_same_dtype(vol, "vol", field, name);
  check_device(field, name, vol, "vol");
  TORCH_CHECK(field.size(1) == 3, "deepatlas_fast: ", name, " must have 3 channels, got shape ", field.sizes());
  TORCH_CHECK(field.size(0) == vol.size(0), "deepatlas_fast: ", name, " must have the batch size of vol (",
              vol.size(0), "), got shape ", field.sizes());
  TORCH_CHECK(vol.size(2) > 0 && vol.size(3) > 0 && vol.size(4) > 0,
              "deepatlas_fast: vol must have every spatial size >= 1, got shape ", vol.sizes());
  return geometry(vol.size(0), vol.size(1), vol.sizes().slice(2), field);
}

// As check_forward, and grad (the output's gradient) [n, c, d, h, w] of vol's dtype and device.
inline Geometry check_backward(const at::Tensor& grad, const at::Tensor& vol, const at::Tensor& field, bool warp) {
  check_input(grad, "grad", 5);
  const Geometry g = check_forward(vol, field, warp);
  check_same_dtype(vol, "vol", grad, "grad");
  check_device(grad, "grad", vol, "vol");
  TORCH_CHECK(grad.size(0) == g.n && grad.size(1) == g.c && grad.size(2) == g.out_size[0] &&
                  grad.size(3) == g.out_size[1] && grad.size(4) == g.out_size[2],
              "deepatlas_fast: grad must have the output's shape [", g.n, ", ", g.c, ", ", g.out_size[0], ", ",
              g.out_size[1], ", ", g.out_size[2], "], got ", grad.sizes());
  return g;
}

// sample_splat_tiled's arguments: grad [n, c, d, h, w] (the output's gradient) and the field [n, 3, d, h, w]
// of one float dtype and device, vol_size = (D, H, W) of the volume, each >= 1, tiles numbered in 32 bits;
// returns the geometry.
inline Geometry check_splat(const at::Tensor& grad, const at::Tensor& field, at::IntArrayRef vol_size, bool warp) {
  const char* name = field_name(warp);
  check_input(grad, "grad", 5);
  check_input(field, name, 5);
  check_same_dtype(field, name, grad, "grad");
  check_device(grad, "grad", field, name);
  TORCH_CHECK(field.size(1) == 3, "deepatlas_fast: ", name, " must have 3 channels, got shape ", field.sizes());
  TORCH_CHECK(grad.size(0) == field.size(0) && grad.sizes().slice(2) == field.sizes().slice(2),
              "deepatlas_fast: grad must have the shape [", field.size(0), ", C, *", name, ".shape[2:]], got ",
              grad.sizes());
  TORCH_CHECK(vol_size.size() == 3 && vol_size[0] >= 1 && vol_size[1] >= 1 && vol_size[2] >= 1,
              "deepatlas_fast: vol_size must be 3 sizes (D, H, W), each >= 1, got ", vol_size);
  const Geometry g = geometry(field.size(0), grad.size(1), vol_size, field);
  TORCH_CHECK(splat::tiles_of(g).count() < (int64_t(1) << 31),  // splat::tile_point's 32-bit tile numbers
              "deepatlas_fast: sample_splat_tiled: too many points, got ", field.sizes());
  return g;
}

}  // namespace sampling
}  // namespace deepatlas_fast

// Registers the ops for dispatch key KEY (CPU or CUDA), one list for both backends: cpu/sampling.cpp and
// cuda/sampling.cu each define forward<WARP> and backward<WARP> in namespace deepatlas_fast and end with
// DEEPATLAS_FAST_SAMPLING_IMPL(CPU), resp. (CUDA).
#define DEEPATLAS_FAST_SAMPLING_IMPL(KEY)                        \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {                 \
    m.impl("sample", &deepatlas_fast::forward<false>);           \
    m.impl("sample_backward", &deepatlas_fast::backward<false>); \
    m.impl("warp", &deepatlas_fast::forward<true>);              \
    m.impl("warp_backward", &deepatlas_fast::backward<true>);    \
  }

// Registers sample_splat_tiled, invert_splat_tiled and invert(_displacement)_backward_tiled for dispatch key
// KEY: cpu/splat_tiled.cpp and cuda/splat_tiled.cu each define splat_tiled, invert_splat_tiled and
// invert_backward_tiled<DISP> in namespace deepatlas_fast.
#define DEEPATLAS_FAST_SPLAT_TILED_IMPL(KEY)                                                         \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {                                                     \
    m.impl("sample_splat_tiled", &deepatlas_fast::splat_tiled);                                      \
    m.impl("invert_splat_tiled", &deepatlas_fast::invert_splat_tiled);                               \
    m.impl("invert_backward_tiled", &deepatlas_fast::invert_backward_tiled<false>);                  \
    m.impl("invert_displacement_backward_tiled", &deepatlas_fast::invert_backward_tiled<true>);      \
  }
