// sample_splat_tiled, invert_splat_tiled and invert_*backward_tiled on the CPU: the CUDA tile algorithms
// (include/deepatlas_fast/splat_tile.h, invert_splat_tile.h, invert_backward_tile.h, on box_splat.h) run
// serially, tile after tile, one loop standing in for the block's threads. They exist so that the CPU tests
// check the code the CUDA kernels run; the cpu backend's volume gradient, pyramid and invert backward are
// cpu/sampling.cpp's and cpu/inversion.cpp's.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "deepatlas_fast/inversion_host.h"
#include "deepatlas_fast/invert_backward_tile.h"
#include "deepatlas_fast/invert_splat_tile.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/splat_tile.h"

namespace deepatlas_fast {
namespace {

using namespace sampling;
using namespace sampling::splat;

// The CUDA grid's stand-in: tile_fn(block, box_sums, tile, b) for every tile of every batch item in [0, n), one
// after the other, with one block of kThreads serial threads (states of type State) and one box buffer.
template <typename State, typename T, typename TileFn>
void each_tile_serially(int64_t n, const box::Tiles& tiles, TileFn&& tile_fn) {
  std::vector<State> states(box::kThreads);
  std::vector<T> box_sums(box::box_capacity<T>());
  const box::SerialBlock<State> block{&states};
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t tile = 0; tile < tiles.count(); ++tile) tile_fn(block, box_sums.data(), tile, b);
  }
}

at::Tensor splat_tiled(const at::Tensor& grad, const at::Tensor& field, at::IntArrayRef vol_size,
                       c10::string_view padding, bool warp) {
  const Geometry g = check_splat(grad, field, vol_size, warp);
  const bool zeros = zeros_padding(padding);
  at::Tensor grad_vol = at::zeros({g.n, g.c, g.size[0], g.size[1], g.size[2]}, grad.options());
  if (g.n * g.c * g.points == 0) return grad_vol;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "deepatlas_fast_sample_splat_tiled", [&] {
    using T = scalar_t;
    const Tiles tiles = tiles_of(g);
    each_tile_serially<PointState<T, int64_t>, T>(g.n, tiles, [&](const auto& block, T* box_sums, int64_t tile,
                                                                   int64_t b) {
      if (warp) {
        splat_tile<T, true>(block, grad.const_data_ptr<T>(), field.const_data_ptr<T>(), grad_vol.mutable_data_ptr<T>(),
                            box_sums, g, tiles, zeros, tile, b);
      } else {
        splat_tile<T, false>(block, grad.const_data_ptr<T>(), field.const_data_ptr<T>(), grad_vol.mutable_data_ptr<T>(),
                             box_sums, g, tiles, zeros, tile, b);
      }
    });
  });
  return grad_vol;
}

// One level of invert's initial guess: the source tiles one after the other, the index type the CUDA kernel
// takes for these sizes.
at::Tensor invert_splat_tiled(const at::Tensor& coords, at::IntArrayRef level_shape) {
  const inversion::Grid level = inversion::check_splat_level(coords, level_shape);
  const inversion::Grid src = inversion::spatial_grid(coords);
  const int64_t n = coords.size(0);
  at::Tensor acc = at::zeros({n, level.cells, 4}, coords.options());
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "deepatlas_fast_invert_splat_tiled", [&] {
    using T = scalar_t;
    const auto run = [&](auto index) {
      using I = decltype(index);
      const box::Tiles tiles = box::tiles_of(src.size);
      const inversion::GridOf<I> src_i = inversion::narrow_grid<I>(src), level_i = inversion::narrow_grid<I>(level);
      each_tile_serially<inversion::SourceState<T, I>, T>(n, tiles, [&](const auto& block, T* box_sums, int64_t tile,
                                                                           int64_t b) {
        inversion::splat_source_tile<T, I>(block, coords.const_data_ptr<T>(), acc.mutable_data_ptr<T>(), box_sums,
                                           src_i, src.size, level_i, tiles, tile, I(b));
      });
    };
    inversion::fits_int32(n, 4, src, level) ? run(int32_t(0)) : run(int64_t(0));
  });
  return acc;
}

// invert's backward: the target tiles one after the other, the index type the CUDA kernel takes for these sizes.
template <bool DISP>
at::Tensor invert_backward_tiled(const at::Tensor& grad, const at::Tensor& field, const at::Tensor& inverse,
                                 const at::Tensor& valid) {
  const inversion::Grid target = inversion::check_backward_tiled(grad, field, inverse, valid, DISP);
  const inversion::Grid src = inversion::spatial_grid(field);
  const int64_t n = field.size(0);
  at::Tensor out = at::zeros(field.sizes(), field.options());
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_invert_backward_tiled", [&] {
    using T = scalar_t;
    const auto run = [&](auto index) {
      using I = decltype(index);
      const box::Tiles tiles = box::tiles_of(target.size);
      const inversion::GridOf<I> src_i = inversion::narrow_grid<I>(src), target_i = inversion::narrow_grid<I>(target);
      each_tile_serially<inversion::TargetState<T, I>, T>(n, tiles, [&](const auto& block, T* box_sums, int64_t tile,
                                                                           int64_t b) {
        inversion::backward_tile<T, DISP, I>(block, grad.const_data_ptr<T>(), field.const_data_ptr<T>(),
                                             inverse.const_data_ptr<T>(), valid.const_data_ptr<bool>(),
                                             out.mutable_data_ptr<T>(), box_sums, src_i, target_i, target.size, tiles,
                                             tile, I(b));
      });
    };
    inversion::fits_int32(n, 3, src, target) ? run(int32_t(0)) : run(int64_t(0));
  });
  return out;
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SPLAT_TILED_IMPL(CPU)
