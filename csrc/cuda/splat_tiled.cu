// CUDA kernels of sample_splat_tiled, invert_splat_tiled and invert_*backward_tiled: the tiled box splat of
// include/deepatlas_fast/box_splat.h over output points (splat_tile.h), source points (invert_splat_tile.h) or
// target points (invert_backward_tile.h), one block of box::kThreads threads per tile and batch item, the box
// buffer in shared memory.
// Atomic adds (shared, then global for the box's nonzero voxels): not bitwise reproducible. The caller's
// stream, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/inversion_host.h"
#include "deepatlas_fast/invert_backward_tile.h"
#include "deepatlas_fast/invert_splat_tile.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/splat_tile.h"
#include "box_block.cuh"
#include "invert_splat.cuh"

namespace deepatlas_fast {
namespace {

using namespace sampling;
using namespace sampling::splat;

// Launch bounds of 2 blocks per SM (at most 128 registers): without them ptxas spilled the int64 kernels.
template <typename T, bool WARP, typename I>
__global__ void __launch_bounds__(splat::kThreads, 2)
    splat_kernel(const T* __restrict__ grad, const T* __restrict__ field, T* __restrict__ grad_vol, const Geometry g,
                 const Tiles tiles, const bool zeros) {
  __shared__ T box_sums[box_capacity<T>()];
  PointState<T, I> state;
  const box::CudaBlock<PointState<T, I>> block{state};
  splat_tile<T, WARP>(block, grad, field, grad_vol, box_sums, g, tiles, zeros, int64_t(blockIdx.x),
                      static_cast<I>(blockIdx.y));
}

at::Tensor splat_tiled(const at::Tensor& grad, const at::Tensor& field, at::IntArrayRef vol_size,
                       c10::string_view padding, bool warp) {
  const Geometry g = check_splat(grad, field, vol_size, warp);
  const bool zeros = zeros_padding(padding);
  const c10::cuda::CUDAGuard guard(field.device());
  at::globalContext().alertNotDeterministic("deepatlas_fast sample_splat_tiled (atomic adds)");
  at::Tensor grad_vol = at::zeros({g.n, g.c, g.size[0], g.size[1], g.size[2]}, grad.options());
  if (g.n * g.c * g.points == 0) return grad_vol;
  const Tiles tiles = tiles_of(g);
  TORCH_CHECK(g.n < 65536, "deepatlas_fast: sample_splat_tiled: batch too large for one launch, got ", field.sizes());
  const dim3 grid(static_cast<unsigned int>(tiles.count()), static_cast<unsigned int>(g.n));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "deepatlas_fast_sample_splat_tiled", [&] {
    using T = scalar_t;
    const T* up = grad.const_data_ptr<T>();
    const T* f = field.const_data_ptr<T>();
    T* out = grad_vol.mutable_data_ptr<T>();
    cudaStream_t stream = current_stream();
    const auto launch = [&](auto index) {
      using I = decltype(index);
      if (warp) {
        splat_kernel<T, true, I><<<grid, splat::kThreads, 0, stream>>>(up, f, out, g, tiles, zeros);
      } else {
        splat_kernel<T, false, I><<<grid, splat::kThreads, 0, stream>>>(up, f, out, g, tiles, zeros);
      }
    };
    if (fits_int32(g)) {
      launch(int32_t(0));
    } else {
      launch(int64_t(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_vol;
}

// One block per tile of source points and batch item (invert_splat_tile.h); launch bounds as splat_kernel.
template <typename T, typename I>
__global__ void __launch_bounds__(box::kThreads, 2)
    invert_splat_kernel(const T* __restrict__ coords, T* __restrict__ acc, const inversion::GridOf<I> src,
                        const inversion::GridOf<I> level, const box::Tiles tiles) {
  __shared__ T box_sums[box::box_capacity<T>()];
  inversion::SourceState<T, I> state;
  const box::CudaBlock<inversion::SourceState<T, I>> block{state};
  const int64_t src_size[3] = {src.size[0], src.size[1], src.size[2]};
  inversion::splat_source_tile<T, I>(block, coords, acc, box_sums, src, src_size, level, tiles, int64_t(blockIdx.x),
                                     static_cast<I>(blockIdx.y));
}

at::Tensor invert_splat_tiled(const at::Tensor& coords, at::IntArrayRef level_shape) {
  const inversion::Grid level = inversion::check_splat_level(coords, level_shape);
  const c10::cuda::CUDAGuard guard(coords.device());
  at::globalContext().alertNotDeterministic("deepatlas_fast invert_splat_tiled (atomic adds)");
  const int64_t n = coords.size(0);
  at::Tensor acc = at::zeros({n, level.cells, 4}, coords.options());
  if (n == 0) return acc;
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "deepatlas_fast_invert_splat_tiled", [&] {
    using T = scalar_t;
    inversion::splat_level_tiled<T>(coords.const_data_ptr<T>(), acc.mutable_data_ptr<T>(), n,
                                    inversion::spatial_grid(coords), level, current_stream());
  });
  return acc;
}

// One block per tile of target points and batch item (invert_backward_tile.h); launch bounds as splat_kernel.
template <typename T, bool DISP, typename I>
__global__ void __launch_bounds__(box::kThreads, 2)
    invert_backward_kernel(const T* __restrict__ grad, const T* __restrict__ field, const T* __restrict__ inverse,
                           const bool* __restrict__ valid, T* __restrict__ out, const inversion::GridOf<I> src,
                           const inversion::GridOf<I> target, const box::Tiles tiles) {
  __shared__ T box_sums[box::box_capacity<T>()];
  inversion::TargetState<T, I> state;
  const box::CudaBlock<inversion::TargetState<T, I>> block{state};
  const int64_t target_size[3] = {target.size[0], target.size[1], target.size[2]};
  inversion::backward_tile<T, DISP, I>(block, grad, field, inverse, valid, out, box_sums, src, target, target_size,
                                       tiles, int64_t(blockIdx.x), static_cast<I>(blockIdx.y));
}

template <bool DISP>
at::Tensor invert_backward_tiled(const at::Tensor& grad, const at::Tensor& field, const at::Tensor& inverse,
                                 const at::Tensor& valid) {
  const inversion::Grid target = inversion::check_backward_tiled(grad, field, inverse, valid, DISP);
  const c10::cuda::CUDAGuard guard(field.device());
  at::globalContext().alertNotDeterministic("deepatlas_fast invert backward (tiled splat, atomic adds)");
  at::Tensor out = at::zeros(field.sizes(), field.options());
  if (field.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_invert_backward_tiled", [&] {
    using T = scalar_t;
    inversion::backward_tiled<T, DISP>(grad.const_data_ptr<T>(), field.const_data_ptr<T>(), inverse.const_data_ptr<T>(),
                                       valid.const_data_ptr<bool>(), out.mutable_data_ptr<T>(), field.size(0),
                                       inversion::spatial_grid(field), target, current_stream());
  });
  return out;
}

}  // namespace

namespace inversion {

template <typename T, bool DISP>
void backward_tiled(const T* grad, const T* field, const T* inverse, const bool* valid, T* out, int64_t n,
                    const Grid& src, const Grid& target, cudaStream_t stream) {
  const box::Tiles tiles = box::tiles_of(target.size);
  const dim3 grid(static_cast<unsigned int>(tiles.count()), static_cast<unsigned int>(n));
  const auto launch = [&](auto index) {
    using I = decltype(index);
    invert_backward_kernel<T, DISP, I><<<grid, box::kThreads, 0, stream>>>(grad, field, inverse, valid, out,
                                                                           narrow_grid<I>(src),
                                                                           narrow_grid<I>(target), tiles);
  };
  fits_int32(n, 3, src, target) ? launch(int32_t(0)) : launch(int64_t(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DEEPATLAS_FAST_BACKWARD_TILED(T, DISP)                                                                   \
  template void backward_tiled<T, DISP>(const T*, const T*, const T*, const bool*, T*, int64_t, const Grid&, \
                                        const Grid&, cudaStream_t);
DEEPATLAS_FAST_BACKWARD_TILED(float, false)
DEEPATLAS_FAST_BACKWARD_TILED(float, true)
DEEPATLAS_FAST_BACKWARD_TILED(double, false)
DEEPATLAS_FAST_BACKWARD_TILED(double, true)
#undef DEEPATLAS_FAST_BACKWARD_TILED

template <typename T>
void splat_level_tiled(const T* coords, T* acc, int64_t n, const Grid& src, const Grid& level, cudaStream_t stream) {
  const box::Tiles tiles = box::tiles_of(src.size);
  const dim3 grid(static_cast<unsigned int>(tiles.count()), static_cast<unsigned int>(n));
  const auto launch = [&](auto index) {
    using I = decltype(index);
    invert_splat_kernel<T, I><<<grid, box::kThreads, 0, stream>>>(coords, acc, narrow_grid<I>(src),
                                                                   narrow_grid<I>(level), tiles);
  };
  fits_int32(n, 4, src, level) ? launch(int32_t(0)) : launch(int64_t(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void splat_level_tiled<float>(const float*, float*, int64_t, const Grid&, const Grid&, cudaStream_t);
template void splat_level_tiled<double>(const double*, double*, int64_t, const Grid&, const Grid&, cudaStream_t);

}  // namespace inversion
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SPLAT_TILED_IMPL(CUDA)
