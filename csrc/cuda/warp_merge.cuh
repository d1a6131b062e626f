// WarpMerge: the trilinear splats of a warp's lanes with the adds that neighbouring lanes share merged first
// (warp shuffles), for the sample / warp volume gradient (sampling.cu) and invert's backward (inversion.cu),
// with DEEPATLAS_FAST_CUDA_SPLAT=merged, resp. DEEPATLAS_FAST_CUDA_INVERT_SPLAT=merged.
#pragma once

#include "deepatlas_fast/trilinear.h"

namespace deepatlas_fast {

// Merged trilinear splats of a warp. Lanes hold consecutive points, so for a near-identity map a point's x1
// corners (odd corner numbers, trilinear.h) are the next lane's x0 corners. Per row r of corners
// (2r, 2r + 1) where the two addresses agree, lane i adds lane i + 1's x0 value into its own x1 add and lane
// i + 1 skips its x0 add: about 4 global atomics per point and channel instead of 8 (an atomic splat runs at
// the GPU's atomic throughput: the sample backward's 134 M adds at 256^3 took 1.30 ms), the same terms
// summed in another order. Both lanes decide from the same pair of addresses, so an add is neither lost nor
// doubled, whatever the map; a lane's x0 add goes to the previous lane only, its x1 add takes from the next
// lane only (no chains). A lane without a point to splat passes corners with no inside flag.
struct WarpMerge {
  unsigned mask;  // the warp's lanes with a point (a prefix: the lanes past the last point have none)
  unsigned take;  // bit r: add the next lane's x0 value of row r to my x1 add
  unsigned give;  // bit r: my x0 add of row r is the previous lane's

  template <typename T, typename I>
  __device__ static WarpMerge of(const Corners<T, I>& k, unsigned mask) {
    const int lane = threadIdx.x & 31;
    const bool has_next = lane < 31 && ((mask >> (lane + 1)) & 1u);
    WarpMerge m{mask, 0u, 0u};
    DA_UNROLL
    for (int r = 0; r < 4; ++r) {
      const I x0 = k.inside[2 * r] ? k.index[2 * r] : I(-1), x1 = k.inside[2 * r + 1] ? k.index[2 * r + 1] : I(-1);
      const I next_x0 = __shfl_down_sync(mask, x0, 1), previous_x1 = __shfl_up_sync(mask, x1, 1);
      if (has_next && x1 >= 0 && next_x0 == x1) m.take |= 1u << r;
      if (lane > 0 && x0 >= 0 && previous_x1 == x0) m.give |= 1u << r;
    }
    return m;
  }

  // The adds of value up at the corners k into plane (every lane of mask calls it: it shuffles).
  template <typename T, typename I>
  __device__ void add(T* plane, const Corners<T, I>& k, T up) const {
    DA_UNROLL
    for (int r = 0; r < 4; ++r) {
      const T x0 = up * k.weight[2 * r], from_next = __shfl_down_sync(mask, x0, 1);
      const T x1 = up * k.weight[2 * r + 1] + (((take >> r) & 1u) ? from_next : T(0));
      if (k.inside[2 * r] && !((give >> r) & 1u)) atomicAdd(plane + k.index[2 * r], x0);
      if (k.inside[2 * r + 1]) atomicAdd(plane + k.index[2 * r + 1], x1);
    }
  }
};

}  // namespace deepatlas_fast
