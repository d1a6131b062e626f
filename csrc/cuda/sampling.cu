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
#include "deepatlas_fast/trilinear.h"

namespace deepatlas_fast {
namespace {

struct Geometry {
  int64_t n, c, size[3], volume, points, out_size[3];
};

Geometry geometry(const at::Tensor& vol, const at::Tensor& field) {
  Geometry g;
  g.n = vol.size(0);
  g.c = vol.size(1);
  g.volume = 1;
  g.points = 1;
  for (int a = 0; a < 3; ++a) {
    g.size[a] = vol.size(2 + a);
    g.out_size[a] = field.size(2 + a);
    g.volume *= g.size[a];
    g.points *= g.out_size[a];
  }
  return g;
}

template <typename T, bool WARP>
__device__ __forceinline__ void point_coords(const T* __restrict__ field, const Geometry& g, int64_t b, int64_t p,
                                             T coord[3]) {
  const T* base = field + b * 3 * g.points + p;
  DA_UNROLL
  for (int a = 0; a < 3; ++a) coord[a] = base[a * g.points];
  if (WARP) {
    const int64_t w = p % g.out_size[2], h = (p / g.out_size[2]) % g.out_size[1], d = p / (g.out_size[1] * g.out_size[2]);
    coord[0] += identity_coordinate<T>(d, g.out_size[0]);
    coord[1] += identity_coordinate<T>(h, g.out_size[1]);
    coord[2] += identity_coordinate<T>(w, g.out_size[2]);
  }
}

template <typename T, bool WARP>
__global__ void forward_kernel(const T* __restrict__ vol, const T* __restrict__ field, T* __restrict__ out,
                               const Geometry g, const bool zeros) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.n * g.points) return;
  const int64_t b = i / g.points, p = i % g.points;
  T coord[3];
  point_coords<T, WARP>(field, g, b, p, coord);
  SamplePoint<T> point;
  sample_point(coord, g.size, zeros, point);
  const Corners<T>& k = point.corners;
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const T* plane = vol + (b * g.c + ch) * g.volume;
    T acc = 0;
    DA_UNROLL
    for (int j = 0; j < 8; ++j) acc += k.inside[j] ? __ldg(plane + k.index[j]) * k.weight[j] : T(0);
    out[(b * g.c + ch) * g.points + p] = acc;
  }
}

template <typename T, bool WARP, bool NEED_VOL, bool NEED_FIELD>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ vol, const T* __restrict__ field,
                                T* __restrict__ grad_field, T* __restrict__ grad_vol, const Geometry g,
                                const bool zeros) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.n * g.points) return;
  const int64_t b = i / g.points, p = i % g.points;
  T coord[3];
  point_coords<T, WARP>(field, g, b, p, coord);
  SamplePoint<T> point;
  sample_point(coord, g.size, zeros, point);
  const Corners<T>& k = point.corners;
  T d_pos[3] = {0, 0, 0};
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const T up = grad[(b * g.c + ch) * g.points + p];
    if (NEED_FIELD) {
      const T* plane = vol + (b * g.c + ch) * g.volume;
      T dot[3] = {0, 0, 0};
      DA_UNROLL
      for (int j = 0; j < 8; ++j) {
        const T v = k.inside[j] ? __ldg(plane + k.index[j]) : T(0);
        dot[0] += v * k.d_weight[j][0];
        dot[1] += v * k.d_weight[j][1];
        dot[2] += v * k.d_weight[j][2];
      }
      DA_UNROLL
      for (int a = 0; a < 3; ++a) d_pos[a] += up * dot[a];
    }
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

bool zeros_padding(c10::string_view padding) {
  TORCH_CHECK(padding == "zeros" || padding == "border", "deepatlas_fast: padding must be 'border' or 'zeros'");
  return padding == "zeros";
}

template <bool WARP>
at::Tensor forward(const at::Tensor& vol, const at::Tensor& field, c10::string_view padding) {
  check_input(vol, "vol", 5);
  check_input(field, WARP ? "disp" : "coords", 5);
  check_same_dtype(vol, "vol", field, WARP ? "disp" : "coords");
  const c10::cuda::CUDAGuard guard(vol.device());
  const bool zeros = zeros_padding(padding);
  const Geometry g = geometry(vol, field);
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
  check_input(grad, "grad", 5);
  check_input(vol, "vol", 5);
  check_input(field, WARP ? "disp" : "coords", 5);
  check_same_dtype(vol, "vol", field, WARP ? "disp" : "coords");
  check_same_dtype(vol, "vol", grad, "grad");
  const c10::cuda::CUDAGuard guard(vol.device());
  const bool zeros = zeros_padding(padding);
  const Geometry g = geometry(vol, field);
  std::vector<at::Tensor> grads;
  if (!need_vol && !need_field) return grads;
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
  if (need_vol) grads.push_back(grad_vol);
  if (need_field) grads.push_back(grad_field);
  return grads;
}

}  // namespace
}  // namespace deepatlas_fast

TORCH_LIBRARY_IMPL(deepatlas_fast_C, CUDA, m) {
  m.impl("sample", &deepatlas_fast::forward<false>);
  m.impl("sample_backward", &deepatlas_fast::backward<false>);
  m.impl("warp", &deepatlas_fast::forward<true>);
  m.impl("warp_backward", &deepatlas_fast::backward<true>);
}
