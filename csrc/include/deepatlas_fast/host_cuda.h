// Host-only helpers of the CUDA launchers: the current stream, launch geometry and error checks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace deepatlas_fast {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t work, int threads = kThreads) {
  const int64_t blocks = (work + threads - 1) / threads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "deepatlas_fast: launch too large (", work, " threads)");
  return static_cast<unsigned int>(blocks > 0 ? blocks : 1);
}

// One thread per (item, point) on a (blocks, n) grid: the batch item is blockIdx.y, no index division.
inline dim3 point_grid(int64_t points, int64_t n) {
  TORCH_CHECK(n < 65536, "deepatlas_fast: batch too large for one launch (", n, " items)");
  return dim3(blocks_for(points), static_cast<unsigned int>(n));
}

// Kernels run on the caller's current stream (CUDA-graph capture, user streams), never synchronise.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace deepatlas_fast
