// CUDA pieces shared by the two lncc implementations (cuda/lncc.cu: one kernel per axis; cuda/lncc_tiled.cu:
// tiles in shared memory): the frame's channel shifts, the window coverage and the mean's final reduction.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/lncc.h"

namespace deepatlas_fast {
namespace lncc_cuda {

constexpr int kBlockX = 32, kBlockY = 8;  // blocks of these kernels (and of the lncc kernels): 32 x 8 threads
constexpr int kReduceThreads = kBlockX * kBlockY;

// The sum of `value` over the block's kReduceThreads threads, in a fixed order; every thread must call it.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T shared[kReduceThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  shared[tid] = value;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) shared[tid] += shared[tid + stride];
    __syncthreads();
  }
  return shared[0];
}

// The shifts (lncc.h) in two steps, fixed order: blocks (channel and input, slice) sum a slice of the samples
// each, then one thread per (channel, input) adds its slices. One block per (channel, input) before: its
// 65536 scattered loads, 256 per thread, took 0.195 ms at 256^3 on an H200 (ncu), twice per fwd+bwd.
constexpr int kShiftSlices = 32;

// partials[i][s] = the sum of slice s of the samples of (channel, input) i = 2 c + (0: a, 1: b).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) shift_partials_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                                          double* __restrict__ partials, int64_t volume) {
  const int64_t channel = blockIdx.x / 2;
  const T* x = (blockIdx.x % 2 == 0 ? a : b) + channel * volume;
  const int64_t samples = lncc::shift_samples(volume), per_slice = (samples + kShiftSlices - 1) / kShiftSlices;
  const int64_t begin = blockIdx.y * per_slice, end = begin + per_slice < samples ? begin + per_slice : samples;
  double sum = 0;
  for (int64_t j = begin + threadIdx.y * blockDim.x + threadIdx.x; j < end; j += kReduceThreads) {
    sum += double(x[lncc::shift_sample_index(j, volume)]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0 && threadIdx.y == 0) partials[int64_t(blockIdx.x) * kShiftSlices + blockIdx.y] = sum;
}

// shifts[i] = the mean of the samples of (channel, input) i from its kShiftSlices partial sums.
template <typename T>
__global__ void shift_means_kernel(const double* __restrict__ partials, T* __restrict__ shifts, int64_t count,
                                   int64_t volume) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  double sum = 0;
  for (int s = 0; s < kShiftSlices; ++s) sum += partials[i * kShiftSlices + s];
  shifts[i] = static_cast<T>(sum / double(lncc::shift_samples(volume)));
}

// The shifts [2 nc] of a and b (nc channels of `volume` voxels each, contiguous) on the current stream.
template <typename T>
at::Tensor channel_shifts(const at::Tensor& a, const at::Tensor& b, int64_t nc, int64_t volume) {
  at::Tensor shifts = at::empty({nc * 2}, a.options());
  if (nc == 0) return shifts;
  at::Tensor partials = at::empty({nc * 2 * kShiftSlices}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = current_stream();
  shift_partials_kernel<T><<<dim3(static_cast<unsigned int>(nc * 2), kShiftSlices), dim3(kBlockX, kBlockY), 0,
                             stream>>>(a.const_data_ptr<T>(), b.const_data_ptr<T>(),
                                       partials.mutable_data_ptr<double>(), volume);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  shift_means_kernel<T><<<blocks_for(nc * 2), kThreads, 0, stream>>>(partials.const_data_ptr<double>(),
                                                                     shifts.mutable_data_ptr<T>(), nc * 2, volume);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return shifts;
}

// cover = the window weight inside the volume at each position along z (d), then y (h), then x (w);
// taps.data(): the k taps.
template <typename T, typename Taps>
__global__ void coverage_kernel(T* __restrict__ cover, int64_t d, int64_t h, int64_t w, Taps taps, int k) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < d) {
    cover[i] = lncc::window_coverage(i, d, taps.data(), k);
  } else if (i < d + h) {
    cover[i] = lncc::window_coverage(i - d, h, taps.data(), k);
  } else if (i < d + h + w) {
    cover[i] = lncc::window_coverage(i - d - h, w, taps.data(), k);
  }
}

// out = -(sum of the n partials) / numel, by one block in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    mean_kernel(const T* __restrict__ partials, int64_t n, T numel, T* __restrict__ out) {
  T sum = 0;
  for (int64_t i = threadIdx.y * blockDim.x + threadIdx.x; i < n; i += kReduceThreads) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0 && threadIdx.y == 0) out[0] = -sum / numel;
}

}  // namespace lncc_cuda
}  // namespace deepatlas_fast
