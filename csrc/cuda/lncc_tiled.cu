// CUDA kernels of lncc_tiled: the tile algorithm of include/deepatlas_fast/lncc_tile.h, one block of
// 32 x 8 threads per unit (tile x channel x run of planes), its scratch in dynamic shared memory. Forward:
// one kernel (NCC map, or a partial sum per block reduced by one block in a fixed order); backward, per
// chunk of planes: the adjoint maps into a buffer, then their window sums combined into the gradients.
// No atomics (bitwise reproducible), no host synchronisation (CUDA-graph capturable), the caller's stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/lncc_tile_host.h"
#include "lncc_common.cuh"

namespace deepatlas_fast {
namespace {

using namespace lncc::tile;
using lncc_cuda::kBlockX;
using lncc_cuda::kBlockY;
using lncc_cuda::kReduceThreads;

constexpr unsigned int kMaxGridYZ = 65535;
// Blocks per SM the register allocation must allow (at most 128 registers a thread): without this bound
// ptxas chose 48 to 64 registers and spilled in the float64 combine kernels.
constexpr int kMinBlocks = 2;

// The phases of a unit spread over the block's threads; sync() is the block barrier.
struct BlockExec {
  template <typename F>
  __device__ __forceinline__ void for_each(int n, F&& f) const {
    for (int i = threadIdx.y * kBlockX + threadIdx.x; i < n; i += kReduceThreads) f(i);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

template <typename T>
__device__ T* shared_scratch() {
  extern __shared__ __align__(16) unsigned char scratch[];
  return reinterpret_cast<T*>(scratch);
}

// The taps in shared memory: indexing the kernel argument by a runtime tap index would copy it to local
// memory (a per-thread stack); the copy loop's indices are compile-time.
template <typename T>
__device__ const T* shared_taps(const Taps<T>& taps) {
  __shared__ T shared[kMaxKernelSize];
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    DA_UNROLL
    for (int j = 0; j < kMaxKernelSize; ++j) shared[j] = taps.tap[j];
  }
  __syncthreads();
  return shared;
}

template <int P, typename T>
__device__ PlaneTile<T> block_tile(const Volume<T>& v) {
  return plane_tile(shared_scratch<T>(), int(blockIdx.y), int(blockIdx.x), v.h, v.w, v.half, P);
}

template <int K, int P, typename T>
__global__ void __launch_bounds__(kReduceThreads, kMinBlocks)
    forward_kernel(Volume<T> v, Taps<T> taps, Plan plan, T* __restrict__ map, T* __restrict__ partials) {
  const Unit u = unit_of(plan, int(blockIdx.x), int(blockIdx.y), blockIdx.z, 0, v.d);
  const T partial = forward_unit<K, P>(BlockExec{}, block_tile<P>(v), v, shared_taps(taps), u.c, u.p0, u.p1, map);
  if (partials != nullptr) {
    const T total = lncc_cuda::block_sum(partial);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      partials[(int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = total;
    }
  }
}

template <int K, int P, typename T>
__global__ void __launch_bounds__(kReduceThreads, kMinBlocks) adjoint_kernel(Volume<T> v, Chunk<T> ch, Taps<T> taps, Plan plan) {
  const Unit u = unit_of(plan, int(blockIdx.x), int(blockIdx.y), blockIdx.z, ch.h0, ch.planes);
  adjoint_unit<K, P>(BlockExec{}, block_tile<P>(v), v, ch, shared_taps(taps), u.c, u.p0, u.p1);
}

template <int MAPS, int K, int P, typename T>
__global__ void __launch_bounds__(kReduceThreads, kMinBlocks)
    combine_kernel(Volume<T> v, Chunk<T> ch, Taps<T> taps, Plan plan, int64_t z0, int64_t planes,
                   T* __restrict__ grad_a, T* __restrict__ grad_b) {
  const Unit u = unit_of(plan, int(blockIdx.x), int(blockIdx.y), blockIdx.z, z0, planes);
  combine_unit<MAPS, K, P>(BlockExec{}, block_tile<P>(v), v, ch, shared_taps(taps), u.c, u.p0, u.p1, grad_a, grad_b);
}

// Launches kernel on plan's grid with the unit scratch (z sums of P planes) in dynamic shared memory. Static and
// dynamic shared memory together may exceed 48 KB only when opted in; the static part (taps, block_sum) is
// under 3 KB.
template <int P, typename T, typename Kernel, typename... Args>
void launch(Kernel kernel, const Volume<T>& v, const Plan& plan, int64_t z_units, Args... args) {
  if (z_units == 0) return;
  const size_t bytes = size_t(scratch_elements(v.half, P)) * sizeof(T);
  if (bytes > 45 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
  const dim3 grid(static_cast<unsigned int>(plan.tiles_x), static_cast<unsigned int>(plan.tiles_y),
                  static_cast<unsigned int>(z_units));
  kernel<<<grid, dim3(kBlockX, kBlockY), bytes, current_stream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The Runner of lncc_tile_host.h: kernel launches on the current stream.
template <typename T>
struct BlockRunner {
  static constexpr int64_t kMaxZUnits = kMaxGridYZ;

  // grid.y covers the tile rows; grid.z channels x plane runs (at least one run per channel)
  static void check(const at::Tensor& a) {
    TORCH_CHECK((a.size(3) + kTileY - 1) / kTileY <= int64_t(kMaxGridYZ) &&
                    a.size(0) * a.size(1) <= int64_t(kMaxGridYZ),
                "deepatlas_fast: lncc_tiled: input too large for the CUDA kernels, got shape ", a.sizes());
  }
  explicit BlockRunner(const at::Tensor& a) : guard(a.device()) {}
  c10::cuda::CUDAGuard guard;

  at::Tensor shifts(const at::Tensor& a, const at::Tensor& b, int64_t nc) {
    return lncc_cuda::channel_shifts<T>(a, b, nc, nc > 0 ? a.numel() / nc : 0);
  }

  at::Tensor cover(const Volume<T>& v, const Taps<T>& taps) {
    at::Tensor out = at::empty({v.d + v.h + v.w}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)
                                                      .device(at::kCUDA, c10::cuda::current_device()));
    lncc_cuda::coverage_kernel<<<blocks_for(v.d + v.h + v.w), kThreads, 0, current_stream()>>>(
        out.mutable_data_ptr<T>(), v.d, int64_t(v.h), int64_t(v.w), taps, 2 * v.half + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  void forward(const Volume<T>& v, const Taps<T>& taps, const Plan& plan, T* map, T* partials) {
    with_window_and_planes(2 * v.half + 1, [&](auto window, auto planes) {
      constexpr int K = decltype(window)::value, P = decltype(planes)::value;
      launch<P>(forward_kernel<K, P, T>, v, plan, v.nc * plan.runs, v, taps, plan, map, partials);
    });
  }

  void mean(const T* partials, int64_t n, T numel, T* out) {
    lncc_cuda::mean_kernel<T><<<1, dim3(kBlockX, kBlockY), 0, current_stream()>>>(partials, n, numel, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void adjoints(const Volume<T>& v, const Chunk<T>& ch, const Taps<T>& taps, const Plan& plan) {
    with_window_and_planes(2 * v.half + 1, [&](auto window, auto planes) {
      constexpr int K = decltype(window)::value, P = decltype(planes)::value;
      launch<P>(adjoint_kernel<K, P, T>, v, plan, v.nc * plan.runs, v, ch, taps, plan);
    });
  }

  void combine(const Volume<T>& v, const Chunk<T>& ch, const Taps<T>& taps, const Plan& plan, int64_t z0,
               int64_t planes, T* grad_a, T* grad_b) {
    with_window_and_planes(2 * v.half + 1, [&](auto window, auto z_planes) {
      constexpr int K = decltype(window)::value, P = decltype(z_planes)::value;
      const int64_t z_units = v.nc * plan.runs;
      if (ch.needs.maps() == kMaxMaps) {
        launch<P>(combine_kernel<kMaxMaps, K, P, T>, v, plan, z_units, v, ch, taps, plan, z0, planes, grad_a, grad_b);
      } else {
        launch<P>(combine_kernel<3, K, P, T>, v, plan, z_units, v, ch, taps, plan, z0, planes, grad_a, grad_b);
      }
    });
  }
};

}  // namespace deepatlas_fast

DEEPATLAS_FAST_LNCC_TILED_IMPL(CUDA, BlockRunner)
