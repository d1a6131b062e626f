// Host+device basics shared by the CPU (cpu/) and CUDA (cuda/) kernels: one copy of each formula.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DA_HD __host__ __device__ __forceinline__
#define DA_UNROLL _Pragma("unroll")
#define DA_NO_UNROLL _Pragma("unroll 1")
#else
// always inlined: GCC kept e.g. sample_point out of line (called through the PLT, its corners written to
// memory), which made the CPU sample kernels ~1.5x slower
#define DA_HD inline __attribute__((always_inline))
#define DA_UNROLL _Pragma("GCC unroll 8")
#define DA_NO_UNROLL
#endif

// A read-only load: through the read-only data cache in device code.
#if defined(__CUDA_ARCH__)
#define DA_LOAD(ptr) __ldg(ptr)
#else
#define DA_LOAD(ptr) (*(ptr))
#endif

namespace deepatlas_fast {

template <typename T>
DA_HD T clamp_to(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename T>
DA_HD bool is_nan(T x) {
  return x != x;
}

// torch.linspace(-1, 1, s)[i] with linspace's two-sided formula (0 when s == 1): the identity
// coordinate of voxel i along an axis of size s, generated in-kernel by `warp`.
template <typename T>
DA_HD T identity_coordinate(int64_t i, int64_t s) {
  if (s <= 1) return T(0);
  const T step = T(2) / T(s - 1);
  return i < s / 2 ? T(-1) + step * T(i) : T(1) - step * T(s - 1 - i);
}

// The executor of the tile algorithms (lncc_tile.h, jacobian_tile.h) in their serial CPU emulations: a
// phase's indices one after the other, so a barrier has nothing to wait for.
struct SerialExec {
  template <typename F>
  void for_each(int n, F&& f) const {
    for (int i = 0; i < n; ++i) f(i);
  }
  void sync() const {}
};

}  // namespace deepatlas_fast
