// CUDA kernels of sample / warp: the CPU kernels' algorithm (cpu/sampling.cpp) on the shared per-point math
// (include/deepatlas_fast/trilinear.h). One thread per output point: corners once, reused over channels.
// Backward: coordinate gradient gathered (no atomics); volume gradient (only when asked) splatted with
// atomicAdd into a zeroed buffer, so it is not bitwise reproducible: under
// torch.use_deterministic_algorithms(True) it raises, as torch's own non-deterministic kernels do. With
// DEEPATLAS_FAST_CUDA_SPLAT=merged the adds that neighbouring lanes share are merged first (WarpMerge).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/trilinear.h"
#include "warp_merge.cuh"

namespace deepatlas_fast {
namespace {

using namespace sampling;

// Thread (blockIdx.x, threadIdx.x) of grid row b = blockIdx.y handles point p of batch item b. I: the index
// type, int32_t where the call fits (fits_int32: fewer registers and cheaper index math), else int64_t.
template <typename I>
__device__ __forceinline__ I point_of_thread() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}

template <typename T, bool WARP, typename I>
__global__ void forward_kernel(const T* __restrict__ vol, const T* __restrict__ field, T* __restrict__ out,
                               const Geometry g, const bool zeros) {
  const I p = point_of_thread<I>(), points = static_cast<I>(g.points);
  if (p >= points) return;
  const I b = static_cast<I>(blockIdx.y), c = static_cast<I>(g.c), volume = static_cast<I>(g.volume);
  SamplePoint<T, I> point;
  sample_field_point<T, WARP>(field, g, b, p, zeros, point);
  for (I ch = 0; ch < c; ++ch) out[(b * c + ch) * points + p] = corner_value(vol + (b * c + ch) * volume, point.corners);
}

template <typename T, bool WARP, bool NEED_VOL, bool NEED_FIELD, bool MERGE, typename I>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ vol, const T* __restrict__ field,
                                T* __restrict__ grad_field, T* __restrict__ grad_vol, const Geometry g,
                                const bool zeros) {
  const I p = point_of_thread<I>(), points = static_cast<I>(g.points);
  // every thread of a block reaches the ballot: blocks are whole warps (kThreads)
  const unsigned lanes = MERGE ? __ballot_sync(0xffffffffu, p < points) : 0u;
  if (p >= points) return;
  const I b = static_cast<I>(blockIdx.y), c = static_cast<I>(g.c), volume = static_cast<I>(g.volume);
  SamplePoint<T, I> point;
  sample_field_point<T, WARP>(field, g, b, p, zeros, point);
  const Corners<T, I>& k = point.corners;
  const WarpMerge merge = MERGE ? WarpMerge::of(k, lanes) : WarpMerge{};
  T d_pos[3] = {0, 0, 0};
  for (I ch = 0; ch < c; ++ch) {
    const T up = grad[(b * c + ch) * points + p];
    if (NEED_FIELD) add_position_gradient(vol + (b * c + ch) * volume, k, up, d_pos);
    if (NEED_VOL) {
      T* plane = grad_vol + (b * c + ch) * volume;
      if (MERGE) {
        merge.add(plane, k, up);
      } else {
        DA_UNROLL
        for (int j = 0; j < 8; ++j)
          if (k.inside[j]) atomicAdd(plane + k.index[j], up * k.weight[j]);
      }
    }
  }
  if (NEED_FIELD) {
    T* out = grad_field + b * 3 * points + p;
    DA_UNROLL
    for (int a = 0; a < 3; ++a) out[a * points] = d_pos[a] * point.slope[a];
  }
}

template <bool WARP>
at::Tensor forward(const at::Tensor& vol, const at::Tensor& field, c10::string_view padding) {
  const Geometry g = check_forward(vol, field, WARP);
  const c10::cuda::CUDAGuard guard(vol.device());
  const bool zeros = zeros_padding(padding);
  at::Tensor out = new_output({g.n, g.c, g.out_size[0], g.out_size[1], g.out_size[2]}, vol.options());
  if (out.numel() == 0) return out;
  const dim3 grid = point_grid(g.points, g.n);
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample", [&] {
    const scalar_t* v = vol.const_data_ptr<scalar_t>();
    const scalar_t* f = field.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (fits_int32(g)) {
      forward_kernel<scalar_t, WARP, int32_t><<<grid, kThreads, 0, current_stream()>>>(v, f, o, g, zeros);
    } else {
      forward_kernel<scalar_t, WARP, int64_t><<<grid, kThreads, 0, current_stream()>>>(v, f, o, g, zeros);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// DEEPATLAS_FAST_CUDA_SPLAT (ops/_cpp.py): "merged" merges the volume gradient's adds within warps; "atomic"
// (the default) and "tiled" (whose volume gradient is sample_splat_tiled's, called from Python) add every
// corner. Read at each call.
bool merged_splat() {
  const char* value = std::getenv("DEEPATLAS_FAST_CUDA_SPLAT");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "atomic") == 0 || std::strcmp(value, "tiled") == 0) {
    return false;
  }
  TORCH_CHECK(std::strcmp(value, "merged") == 0,
              "deepatlas_fast: DEEPATLAS_FAST_CUDA_SPLAT must be 'atomic', 'merged' or 'tiled', got '", value, "'");
  return true;
}

template <bool WARP>
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& vol, const at::Tensor& field,
                                 c10::string_view padding, bool need_vol, bool need_field) {
  const Geometry g = check_backward(grad, vol, field, WARP);
  const c10::cuda::CUDAGuard guard(vol.device());
  const bool zeros = zeros_padding(padding);
  if (!need_vol && !need_field) return {};
  if (need_vol) at::globalContext().alertNotDeterministic("deepatlas_fast sample/warp backward (volume gradient)");
  at::Tensor grad_vol = need_vol ? at::zeros(vol.sizes(), vol.options()) : at::Tensor();
  at::Tensor grad_field = need_field ? new_output(field.sizes(), field.options()) : at::Tensor();
  if (g.n * g.points > 0) {
    AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample_backward", [&] {
      using T = scalar_t;
      const T* up = grad.const_data_ptr<T>();
      const T* v = vol.const_data_ptr<T>();
      const T* f = field.const_data_ptr<T>();
      T* gf = need_field ? grad_field.mutable_data_ptr<T>() : nullptr;
      T* gv = need_vol ? grad_vol.mutable_data_ptr<T>() : nullptr;
      const dim3 grid = point_grid(g.points, g.n);
      cudaStream_t stream = current_stream();
      const bool merged = need_vol && merged_splat();
      const auto launch = [&](auto index) {
        using I = decltype(index);
        if (need_vol && need_field && merged) {
          backward_kernel<T, WARP, true, true, true, I><<<grid, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
        } else if (need_vol && need_field) {
          backward_kernel<T, WARP, true, true, false, I><<<grid, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
        } else if (need_vol && merged) {
          backward_kernel<T, WARP, true, false, true, I><<<grid, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
        } else if (need_vol) {
          backward_kernel<T, WARP, true, false, false, I><<<grid, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
        } else {
          backward_kernel<T, WARP, false, true, false, I><<<grid, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
        }
      };
      if (fits_int32(g)) {
        launch(int32_t(0));
      } else {
        launch(int64_t(0));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return requested_gradients(need_vol, grad_vol, need_field, grad_field);
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SAMPLING_IMPL(CUDA)
