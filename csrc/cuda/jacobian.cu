// CUDA kernels of jacobian_det / jacobian_var: the Triton kernels' algorithm (kernels/jacobian.py) on the
// shared per-voxel math (include/deepatlas_fast/jacobian.h).
// * forward_kernel: one thread per voxel (kVoxelsPerThread of them, strided), det0 from the 18 axis
//   neighbours; writes the det map (jacobian_det) or, per block, the partials (count, mean, M2, folds) of
//   jacobian_var (block M2 two-pass, in double; the det map is never written).
// * combine_kernel: one block merges the partials of each batch element in a fixed order (Chan) and writes
//   the statistics (and the per-batch stats the backward takes): on the device, no host sync.
// * coefficient_kernel: the backward's per-batch coefficients of g from those stats and grad_var.
// * backward_kernel: the gather of jacobian.h (six taps, U recomputed at each), no atomics.
// * tiled_backward_kernel (the *_backward_tiled ops): the same gather by tiles, U made once per voxel in
//   shared memory (jacobian_tile.h), one block per unit.
// All on the current stream, with allocations sized by the shapes only: CUDA-graph capturable.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/jacobian.h"
#include "deepatlas_fast/jacobian_host.h"
#include "deepatlas_fast/jacobian_tile.h"

namespace deepatlas_fast {
namespace {

using namespace jacobian;

constexpr int kForwardThreads = 256;
constexpr int kVoxelsPerThread = 4;
constexpr int kForwardVoxels = kForwardThreads * kVoxelsPerThread;  // voxels per forward block (one partial)
constexpr int kBackwardThreads = 128;
constexpr int kCombineThreads = 256;
constexpr int kPartialFields = 4;  // count, mean, M2, folds

// (d, h, w) of flat voxel p. In 32 bits where a batch element's voxels fit (up to ~1600^3): a 64-bit
// division is a software routine of ~100 instructions, two per voxel, the order of the kernels' arithmetic.
__device__ __forceinline__ void voxel_index(int64_t p, const Geometry& g, int64_t idx[3]) {
  if (g.voxels <= int64_t(UINT32_MAX)) {
    const uint32_t q = uint32_t(p), plane = uint32_t(g.plane), w = uint32_t(g.size[2]);
    const uint32_t d = q / plane, rest = q - d * plane, h = rest / w;
    idx[0] = d;
    idx[1] = h;
    idx[2] = rest - h * w;
    return;
  }
  idx[0] = p / g.plane;
  const int64_t rest = p - idx[0] * g.plane;
  idx[1] = rest / g.size[2];
  idx[2] = rest - idx[1] * g.size[2];
}

// Sum over the block, in a fixed order (deterministic), returned to every thread.
template <int THREADS>
__device__ double block_sum(double v, double* shared) {
  static_assert(THREADS % 32 == 0, "whole warps");
  DA_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
  DA_UNROLL
  for (int w = 0; w < THREADS / 32; ++w) total += shared[w];
  __syncthreads();  // shared is reused by the next call
  return total;
}

template <typename T, bool STATS>
__global__ void __launch_bounds__(kForwardThreads)
    forward_kernel(const T* __restrict__ field, T* __restrict__ det, double* __restrict__ partials, const Geometry g,
                   const T s) {
  const int64_t b = blockIdx.y;
  const T* f = field + b * 3 * g.voxels;
  const int64_t start = int64_t(blockIdx.x) * kForwardVoxels;
  T v[kVoxelsPerThread];
  DA_UNROLL
  for (int i = 0; i < kVoxelsPerThread; ++i) {
    const int64_t p = start + i * kForwardThreads + threadIdx.x;
    if (p >= g.voxels) continue;
    int64_t idx[3];
    voxel_index(p, g, idx);
    v[i] = s * det_at(f, g.voxels, p, voxel_stencil<T>(idx, g.size));
    if (!STATS) det[b * g.voxels + p] = v[i];
  }
  if (!STATS) return;

  __shared__ double shared[kForwardThreads / 32];
  const int64_t count = g.voxels - start < kForwardVoxels ? g.voxels - start : kForwardVoxels;
  double sum = 0, folds = 0;
  DA_UNROLL
  for (int i = 0; i < kVoxelsPerThread; ++i) {
    if (start + i * kForwardThreads + threadIdx.x < g.voxels) {
      sum += double(v[i]);
      folds += v[i] <= T(0) ? 1.0 : 0.0;
    }
  }
  const double mean = block_sum<kForwardThreads>(sum, shared) / double(count);
  folds = block_sum<kForwardThreads>(folds, shared);
  double m2 = 0;
  DA_UNROLL
  for (int i = 0; i < kVoxelsPerThread; ++i) {
    if (start + i * kForwardThreads + threadIdx.x < g.voxels) m2 += (double(v[i]) - mean) * (double(v[i]) - mean);
  }
  m2 = block_sum<kForwardThreads>(m2, shared);
  if (threadIdx.x == 0) {
    double* out = partials + (b * gridDim.x + blockIdx.x) * kPartialFields;
    out[0] = double(count);
    out[1] = mean;
    out[2] = m2;
    out[3] = folds;
  }
}

// Per batch element, merges its `blocks` partials (thread t takes t, t + THREADS, ..., then a tree: a
// fixed order) and writes its stats row (jacobian.h, store_stats); then the batch means of the variance
// statistic and of the folding fraction to *var and *folding.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const double* __restrict__ partials, const int64_t blocks, const Geometry g, const bool normalized,
                   double* __restrict__ stats, T* __restrict__ var, T* __restrict__ folding) {
  __shared__ Moments moments[kCombineThreads];
  __shared__ double folds[kCombineThreads];
  const int t = threadIdx.x;
  double var_sum = 0, folding_sum = 0;
  for (int64_t b = 0; b < g.n; ++b) {
    Moments m{0, 0, 0};
    double f = 0;
    for (int64_t i = t; i < blocks; i += kCombineThreads) {
      const double* p = partials + (b * blocks + i) * kPartialFields;
      m = merge_moments(m, Moments{p[0], p[1], p[2]});
      f += p[3];
    }
    moments[t] = m;
    folds[t] = f;
    __syncthreads();
    for (int stride = kCombineThreads / 2; stride > 0; stride /= 2) {
      if (t < stride) {
        moments[t] = merge_moments(moments[t], moments[t + stride]);
        folds[t] += folds[t + stride];
      }
      __syncthreads();
    }
    if (t == 0) {
      store_stats(moments[0], stats + 2 * b);
      var_sum += variance_statistic(moments[0], normalized);
      folding_sum += folds[0] / double(g.voxels);
    }
    __syncthreads();  // moments[0] is overwritten by the next batch element
  }
  if (t == 0) {
    *var = T(var_sum / double(g.n));
    *folding = T(folding_sum / double(g.n));
  }
}

// coef[2b], coef[2b+1] (jacobian.h, variance_coefficients) of batch element b for the incoming *grad_var.
template <typename T>
__global__ void coefficient_kernel(const double* __restrict__ stats, const Geometry g, const bool normalized,
                                   const double s, const T* __restrict__ grad_var, T* __restrict__ coef) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= g.n) return;
  double a, c;
  variance_coefficients(stats_moments(stats + 2 * b, g.voxels), normalized, double(*grad_var) / double(g.n), s, a, c);
  coef[2 * b] = T(a);
  coef[2 * b + 1] = T(c);
}

// grad_field at one voxel per thread: the gather of jacobian.h, g = a * (AFFINE ? det0 : x) + b with
// (a, b) = (coef[2b], coef[2b+1]) (AFFINE) or (s, 0).
// No __launch_bounds__ here: with it ptxas picks either 56 registers and spills (double) or ~250.
template <typename T, bool AFFINE>
__global__ void backward_kernel(const T* __restrict__ field, const T* __restrict__ x, const T* __restrict__ coef,
                    T* __restrict__ grad_field, const Geometry g, const T s) {
  const int64_t b = blockIdx.y;
  const int64_t p = int64_t(blockIdx.x) * kBackwardThreads + threadIdx.x;
  if (p >= g.voxels) return;
  const T* f = field + b * 3 * g.voxels;
  const T* xb = AFFINE ? nullptr : x + b * g.voxels;
  const T a = AFFINE ? coef[2 * b] : s;
  const T offset = AFFINE ? coef[2 * b + 1] : T(0);
  auto column = [&](const int64_t q[3], int j, T u[3]) {
    const int64_t center = q[0] * g.plane + q[1] * g.size[2] + q[2];
    T w[3][3];
    weighted_cofactors<T, AFFINE>(f, g.voxels, center, voxel_stencil<T>(q, g.size), a, offset,
                                  AFFINE ? T(0) : xb[center], w);
    DA_UNROLL
    for (int k = 0; k < 3; ++k) u[k] = w[k][j];
  };
  int64_t idx[3];
  voxel_index(p, g, idx);
  T out[3];
  gather_gradient<T>(idx, g.size, column, out);
  T* o = grad_field + b * 3 * g.voxels + p;
  DA_UNROLL
  for (int k = 0; k < 3; ++k) o[k * g.voxels] = out[k];
}

// The phases of a unit spread over the block's threads; sync() is the block barrier.
struct BlockExec {
  template <typename F>
  __device__ __forceinline__ void for_each(int n, F&& f) const {
    for (int i = threadIdx.x; i < n; i += tile::kThreads) f(i);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

// One block per unit: blockIdx.x the tile, blockIdx.y the run of planes, blockIdx.z the batch element;
// g as backward_kernel.
template <typename T, bool AFFINE>
__global__ void __launch_bounds__(tile::kThreads)
    tiled_backward_kernel(const T* __restrict__ field, const T* __restrict__ x, const T* __restrict__ coef,
                          T* __restrict__ grad_field, const Geometry g, const T s, const tile::Units units) {
  __shared__ T scratch[tile::kScratchElements];
  const int64_t b = blockIdx.z;
  const int64_t p0 = int64_t(blockIdx.y) * tile::kPlanesPerUnit;
  const int64_t p1 = p0 + tile::kPlanesPerUnit < g.size[0] ? p0 + tile::kPlanesPerUnit : g.size[0];
  tile::backward_unit<T, AFFINE>(BlockExec{}, scratch, field + b * 3 * g.voxels,
                                 AFFINE ? nullptr : x + b * g.voxels, AFFINE ? coef[2 * b] : s,
                                 AFFINE ? coef[2 * b + 1] : T(0), grad_field + b * 3 * g.voxels, g,
                                 int64_t(blockIdx.x) / units.x, int64_t(blockIdx.x) % units.x, p0, p1);
}

// ---------------------------------------------------------------------------------------------------
// host

// The shared checks (jacobian_host.h), and what the launches need: a CUDA field, the batch on grid.y.
Geometry check_cuda_field(const at::Tensor& field) {
  const Geometry g = check_field(field);
  TORCH_CHECK(field.is_cuda(), "deepatlas_fast: field must be a CUDA tensor");
  TORCH_CHECK(g.n <= 65535, "deepatlas_fast: field batch size must be at most 65535 (grid y), got ", g.n);
  return g;
}

dim3 forward_grid(const Geometry& g) {
  return dim3(blocks_for(g.voxels, kForwardVoxels), static_cast<unsigned int>(g.n));
}

// Partials [N, blocks, 4] of the scaled det (forward_kernel in STATS mode).
template <typename T>
at::Tensor launch_statistics(const at::Tensor& field, const Geometry& g, double s) {
  const dim3 grid = forward_grid(g);
  at::Tensor partials = at::empty({g.n, int64_t(grid.x), kPartialFields}, field.options().dtype(at::kDouble));
  forward_kernel<T, true><<<grid, kForwardThreads, 0, current_stream()>>>(
      field.const_data_ptr<T>(), nullptr, partials.mutable_data_ptr<double>(), g, T(s));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

template <typename T, bool AFFINE, bool TILED>
void launch_backward(const at::Tensor& field, const T* x, const T* coef, at::Tensor& grad_field, const Geometry& g,
                     double s) {
  if (TILED) {
    const tile::Units units = tile::units_of(g);
    TORCH_CHECK(units.tiles() <= std::numeric_limits<int32_t>::max() && units.runs <= 65535,
                "deepatlas_fast: field too large for the tiled Jacobian backward, got ", field.sizes());
    const dim3 grid(static_cast<unsigned int>(units.tiles()), static_cast<unsigned int>(units.runs),
                    static_cast<unsigned int>(g.n));
    tiled_backward_kernel<T, AFFINE><<<grid, tile::kThreads, 0, current_stream()>>>(
        field.const_data_ptr<T>(), x, coef, grad_field.mutable_data_ptr<T>(), g, T(s), units);
  } else {
    const dim3 grid(blocks_for(g.voxels, kBackwardThreads), static_cast<unsigned int>(g.n));
    backward_kernel<T, AFFINE><<<grid, kBackwardThreads, 0, current_stream()>>>(
        field.const_data_ptr<T>(), x, coef, grad_field.mutable_data_ptr<T>(), g, T(s));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor jacobian_det(const at::Tensor& field, std::optional<at::ArrayRef<double>> scale) {
  const Geometry g = check_cuda_field(field);
  const double s = scale_factor(scale);
  const c10::cuda::CUDAGuard guard(field.device());
  at::Tensor det = new_output({g.n, 1, g.size[0], g.size[1], g.size[2]}, field.options());
  if (det.numel() == 0) return det;
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_det", [&] {
    forward_kernel<scalar_t, false><<<forward_grid(g), kForwardThreads, 0, current_stream()>>>(
        field.const_data_ptr<scalar_t>(), det.mutable_data_ptr<scalar_t>(), nullptr, g, scalar_t(s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return det;
}

template <bool TILED>
at::Tensor det_backward(const at::Tensor& grad, const at::Tensor& field, std::optional<at::ArrayRef<double>> scale) {
  const Geometry g = check_cuda_field(field);
  check_det_grad(grad, field, g);
  const double s = scale_factor(scale);
  const c10::cuda::CUDAGuard guard(field.device());
  at::Tensor grad_field = new_output(field.sizes(), field.options());
  if (grad_field.numel() == 0) return grad_field;
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_det_backward", [&] {
    launch_backward<scalar_t, false, TILED>(field, grad.const_data_ptr<scalar_t>(), nullptr, grad_field, g, s);
  });
  return grad_field;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobian_var(const at::Tensor& field,
                                                            std::optional<at::ArrayRef<double>> scale,
                                                            bool normalized) {
  const Geometry g = check_cuda_field(field);
  const double s = scale_factor(scale);
  const c10::cuda::CUDAGuard guard(field.device());
  at::Tensor var = new_output({}, field.options());
  at::Tensor folding = new_output({}, field.options());
  at::Tensor stats = new_output({g.n, 2}, field.options().dtype(at::kDouble));
  if (g.n == 0) {  // the mean over an empty batch, as the reference
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    folding.fill_(std::numeric_limits<double>::quiet_NaN());
    return {var, folding, stats};
  }
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_var", [&] {
    const at::Tensor partials = launch_statistics<scalar_t>(field, g, s);
    combine_kernel<scalar_t><<<1, kCombineThreads, 0, current_stream()>>>(
        partials.const_data_ptr<double>(), partials.size(1), g, normalized, stats.mutable_data_ptr<double>(),
        var.mutable_data_ptr<scalar_t>(), folding.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {var, folding, stats};
}

template <bool TILED>
at::Tensor var_backward(const at::Tensor& grad_var, const at::Tensor& field, const at::Tensor& stats,
                        std::optional<at::ArrayRef<double>> scale, bool normalized) {
  const Geometry g = check_cuda_field(field);
  check_var_grad(grad_var, field);
  check_stats(stats, field, g);
  const double s = scale_factor(scale);
  const c10::cuda::CUDAGuard guard(field.device());
  at::Tensor grad_field = new_output(field.sizes(), field.options());
  if (grad_field.numel() == 0) return grad_field;
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_var_backward", [&] {
    at::Tensor coef = at::empty({g.n, 2}, field.options());
    coefficient_kernel<scalar_t><<<blocks_for(g.n, kCombineThreads), kCombineThreads, 0, current_stream()>>>(
        stats.const_data_ptr<double>(), g, normalized, s, grad_var.const_data_ptr<scalar_t>(),
        coef.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_backward<scalar_t, true, TILED>(field, nullptr, coef.const_data_ptr<scalar_t>(), grad_field, g, s);
  });
  return grad_field;
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_JACOBIAN_IMPL(CUDA)
