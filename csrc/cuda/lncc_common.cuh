// CUDA pieces shared by the two lncc implementations (cuda/lncc.cu: one kernel per axis; cuda/lncc_tiled.cu:
// tiles in shared memory): the frame's channel shifts, the window coverage and the mean's final reduction.
#pragma once

#include <cstdint>

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

// shifts[2 c + i] = the shift (lncc.h) of channel c of input i (a, b): one block per (channel, input),
// fixed order.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) channel_mean_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                                        T* __restrict__ shifts, int64_t volume) {
  const int64_t channel = blockIdx.x / 2;
  const T* x = (blockIdx.x % 2 == 0 ? a : b) + channel * volume;
  const int64_t samples = lncc::shift_samples(volume);
  double sum = 0;
  for (int64_t j = threadIdx.y * blockDim.x + threadIdx.x; j < samples; j += kReduceThreads) {
    sum += double(x[lncc::shift_sample_index(j, volume)]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0 && threadIdx.y == 0) shifts[blockIdx.x] = static_cast<T>(sum / double(samples));
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
