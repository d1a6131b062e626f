// CUDA kernels of sample / warp: the CPU kernels' algorithm (cpu/sampling.cpp) on the shared per-point math
// (include/deepatlas_fast/trilinear.h). One thread per output point: corners once, reused over channels.
// Backward: coordinate gradient gathered (no atomics); volume gradient (only when asked) splatted with
// atomicAdd into a zeroed buffer, so it is not bitwise reproducible: under
// torch.use_deterministic_algorithms(True) it raises, as torch's own non-deterministic kernels do.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/trilinear.h"

namespace deepatlas_fast {
namespace {

using namespace sampling;

template <typename T, bool WARP>
__global__ void forward_kernel(const T* __restrict__ vol, const T* __restrict__ field, T* __restrict__ out,
                               const Geometry g, const bool zeros) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.n * g.points) return;
  const int64_t b = i / g.points, p = i % g.points;
  SamplePoint<T> point;
  sample_field_point<T, WARP>(field, g, b, p, zeros, point);
  const Corners<T>& k = point.corners;
  for (int64_t ch = 0; ch < g.c; ++ch)
    out[(b * g.c + ch) * g.points + p] = corner_value(vol + (b * g.c + ch) * g.volume, k);
}

template <typename T, bool WARP, bool NEED_VOL, bool NEED_FIELD>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ vol, const T* __restrict__ field,
                                T* __restrict__ grad_field, T* __restrict__ grad_vol, const Geometry g,
                                const bool zeros) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.n * g.points) return;
  const int64_t b = i / g.points, p = i % g.points;
  SamplePoint<T> point;
  sample_field_point<T, WARP>(field, g, b, p, zeros, point);
  const Corners<T>& k = point.corners;
  T d_pos[3] = {0, 0, 0};
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const T up = grad[(b * g.c + ch) * g.points + p];
    if (NEED_FIELD) add_position_gradient(vol + (b * g.c + ch) * g.volume, k, up, d_pos);
    if (NEED_VOL) {
      T* plane = grad_vol + (b * g.c + ch) * g.volume;
      DA_UNROLL
      for (int j = 0; j < 8; ++j)
        if (k.inside[j]) atomicAdd(plane + k.index[j], up * k.weight[j]);
    }
  }
  if (NEED_FIELD) {
    T* out = grad_field + b * 3 * g.points + p;
    DA_UNROLL
    for (int a = 0; a < 3; ++a) out[a * g.points] = d_pos[a] * point.slope[a];
  }
}

template <bool WARP>
at::Tensor forward(const at::Tensor& vol, const at::Tensor& field, c10::string_view padding) {
  const Geometry g = check_forward(vol, field, WARP);
  const c10::cuda::CUDAGuard guard(vol.device());
  const bool zeros = zeros_padding(padding);
  at::Tensor out = new_output({g.n, g.c, g.out_size[0], g.out_size[1], g.out_size[2]}, vol.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample", [&] {
    forward_kernel<scalar_t, WARP><<<blocks_for(g.n * g.points), kThreads, 0, current_stream()>>>(
        vol.const_data_ptr<scalar_t>(), field.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, zeros);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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
      const unsigned int blocks = blocks_for(g.n * g.points);
      cudaStream_t stream = current_stream();
      if (need_vol && need_field) {
        backward_kernel<T, WARP, true, true><<<blocks, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
      } else if (need_vol) {
        backward_kernel<T, WARP, true, false><<<blocks, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
      } else {
        backward_kernel<T, WARP, false, true><<<blocks, kThreads, 0, stream>>>(up, v, f, gf, gv, g, zeros);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return requested_gradients(need_vol, grad_vol, need_field, grad_field);
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SAMPLING_IMPL(CUDA)
