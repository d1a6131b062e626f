// sample_splat_tiled on the CPU: the CUDA tile algorithm (include/deepatlas_fast/splat_tile.h) run serially,
// tile after tile, one loop standing in for the block's threads. It exists so that the CPU tests check the
// code the CUDA kernel runs; the cpu backend's volume gradient is cpu/sampling.cpp's.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/splat_tile.h"

namespace deepatlas_fast {
namespace {

using namespace sampling;
using namespace sampling::splat;

// The block's threads one after the other: their states side by side, plain adds for the atomic ones.
template <typename T, typename I>
struct SerialBlock {
  std::vector<PointState<T, I>>* states;

  template <typename F>
  void each_thread(F&& f) const {
    for (int tid = 0; tid < kThreads; ++tid) f(tid, (*states)[tid]);
  }
  template <typename F>
  void for_each(int64_t n, F&& f) const {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  void sync() const {}
  template <typename F>
  Box reduce_box(F&& f) const {
    Box box = empty_box();
    for (const auto& st : *states) f(st, box);
    return box;
  }
  void shared_add(T* p, T v) const { *p += v; }
  void global_add(T* p, T v) const { *p += v; }
};

at::Tensor splat_tiled(const at::Tensor& grad, const at::Tensor& field, at::IntArrayRef vol_size,
                       c10::string_view padding, bool warp) {
  const Geometry g = check_splat(grad, field, vol_size, warp);
  const bool zeros = zeros_padding(padding);
  at::Tensor grad_vol = at::zeros({g.n, g.c, g.size[0], g.size[1], g.size[2]}, grad.options());
  if (g.n * g.c * g.points == 0) return grad_vol;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "deepatlas_fast_sample_splat_tiled", [&] {
    using T = scalar_t;
    std::vector<PointState<T, int64_t>> states(kThreads);
    std::vector<T> box_sums(box_capacity<T>());
    const SerialBlock<T, int64_t> block{&states};
    const Tiles tiles = tiles_of(g);
    for (int64_t b = 0; b < g.n; ++b) {
      for (int64_t tile = 0; tile < tiles.count(); ++tile) {
        if (warp) {
          splat_tile<T, true>(block, grad.const_data_ptr<T>(), field.const_data_ptr<T>(), grad_vol.mutable_data_ptr<T>(),
                              box_sums.data(), g, tiles, zeros, tile, b);
        } else {
          splat_tile<T, false>(block, grad.const_data_ptr<T>(), field.const_data_ptr<T>(),
                               grad_vol.mutable_data_ptr<T>(), box_sums.data(), g, tiles, zeros, tile, b);
        }
      }
    }
  });
  return grad_vol;
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SPLAT_TILED_IMPL(CPU)
