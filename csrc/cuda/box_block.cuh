// The CUDA executor of include/deepatlas_fast/box_splat.h: the block's threads, each with its own state
// (registers), the box bounds reduced with warp reductions and shared atomics.
#pragma once

#include "deepatlas_fast/box_splat.h"

namespace deepatlas_fast {
namespace box {

template <typename State>
struct CudaBlock {
  State& state;

  template <typename F>
  __device__ __forceinline__ void each_thread(F&& f) const {
    f(int(threadIdx.x), state);
  }
  template <typename F>
  __device__ __forceinline__ void for_each(int64_t n, F&& f) const {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) f(i);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  // The union of the threads' boxes: a warp reduction per bound, then one shared atomic per warp.
  template <typename F>
  __device__ Box reduce_box(F&& f) const {
    constexpr int kWarp = 32;
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
  template <typename T>
  __device__ __forceinline__ void shared_add(T* p, T v) const {
    atomicAdd(p, v);
  }
  template <typename T>
  __device__ __forceinline__ void global_add(T* p, T v) const {
    atomicAdd(p, v);
  }
};

}  // namespace box
}  // namespace deepatlas_fast
