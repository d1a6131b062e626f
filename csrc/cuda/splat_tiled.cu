// CUDA kernel of sample_splat_tiled: the tile algorithm of include/deepatlas_fast/splat_tile.h, one block
// of splat::kThreads threads per tile of output points and batch item, the box buffer in shared memory.
// Atomic adds (shared, then global for the box's nonzero voxels): not bitwise reproducible. The caller's
// stream, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/splat_tile.h"

namespace deepatlas_fast {
namespace {

using namespace sampling;
using namespace sampling::splat;

constexpr int kWarp = 32;

// The block's threads, each with its own state (registers).
template <typename T, typename I>
struct Block {
  PointState<T, I>& state;

  template <typename F>
  __device__ __forceinline__ void each_thread(F&& f) const {
    f(int(threadIdx.x), state);
  }
  template <typename F>
  __device__ __forceinline__ void for_each(int64_t n, F&& f) const {
    for (int64_t i = threadIdx.x; i < n; i += splat::kThreads) f(i);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  // The union of the threads' boxes: a warp reduction per bound, then one shared atomic per warp.
  template <typename F>
  __device__ Box reduce_box(F&& f) const {
    __shared__ int bounds[6];
    Box mine = empty_box();
    f(state, mine);
    if (threadIdx.x < 6) bounds[threadIdx.x] = threadIdx.x < 3 ? kIntMax : -kIntMax;
    __syncthreads();
    DA_UNROLL
    for (int a = 0; a < 3; ++a) {
      const int lo = __reduce_min_sync(0xffffffffu, mine.lo[a]);
      const int hi = __reduce_max_sync(0xffffffffu, mine.hi[a]);
      if (threadIdx.x % kWarp == 0) {
        atomicMin(bounds + a, lo);
        atomicMax(bounds + 3 + a, hi);
      }
    }
    __syncthreads();
    return Box{{bounds[0], bounds[1], bounds[2]}, {bounds[3], bounds[4], bounds[5]}};
  }
  __device__ __forceinline__ void shared_add(T* p, T v) const { atomicAdd(p, v); }
  __device__ __forceinline__ void global_add(T* p, T v) const { atomicAdd(p, v); }
};

// Launch bounds of 2 blocks per SM (at most 128 registers): without them ptxas spilled the int64 kernels.
template <typename T, bool WARP, typename I>
__global__ void __launch_bounds__(splat::kThreads, 2)
    splat_kernel(const T* __restrict__ grad, const T* __restrict__ field, T* __restrict__ grad_vol, const Geometry g,
                 const Tiles tiles, const bool zeros) {
  __shared__ T box_sums[box_capacity<T>()];
  PointState<T, I> state;
  const Block<T, I> block{state};
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

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SPLAT_TILED_IMPL(CUDA)
