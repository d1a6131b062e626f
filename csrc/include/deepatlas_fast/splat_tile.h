// The tiled volume gradient of sample / warp (the "splat"), shared by the CUDA op sample_splat_tiled
// (cuda/splat_tiled.cu) and its serial CPU emulation (cpu/splat_tiled.cpp), so that the CPU tests run the
// code the GPU runs: box_splat.h's tiled splat over the output points.
//
// grad_vol[b, c, v] = the sum over output points p whose cell has v as an in-volume corner of
// grad[b, c, p] * weight(p, v). A tile's points usually land in a small box of voxels (a smooth map; a small
// atlas sampled on a large grid, where thousands of points share a voxel).
#pragma once

#include "box_splat.h"
#include "common.h"
#include "trilinear.h"

namespace deepatlas_fast {
namespace sampling {
namespace splat {

using box::box_capacity;
using box::kThreads;
using box::Tiles;

// The output grid's tiles.
DA_HD Tiles tiles_of(const Geometry& g) { return box::tiles_of(g.out_size); }

// One thread's output point (p < 0 when the thread has none) and its cell in the volume.
template <typename T, typename I>
struct PointState {
  SamplePoint<T, I> point;
  I p;
  DA_HD bool active() const { return p >= 0; }
  DA_HD const Corners<T, I>& corners() const { return point.corners; }
  DA_HD const I* low() const { return point.low; }
};

// The volume gradient contributions of tile `tile` of batch item b, added to grad_vol (zeroed by the
// caller); box_sums: the block's buffer of box_capacity<T>() values.
template <typename T, bool WARP, typename I, typename Block>
DA_HD void splat_tile(const Block& blk, const T* __restrict__ grad, const T* __restrict__ field, T* grad_vol,
                      T* box_sums, const Geometry& g, const Tiles& tiles, bool zeros, int64_t tile, I b) {
  blk.each_thread([&](int tid, PointState<T, I>& st) {
    st.p = box::tile_point<I>(g.out_size, tiles, tile, tid);
    if (st.p >= 0) sample_field_point<T, WARP>(field, g, b, st.p, zeros, st.point);
  });
  const I size[3] = {static_cast<I>(g.size[0]), static_cast<I>(g.size[1]), static_cast<I>(g.size[2])};
  const I c = static_cast<I>(g.c), points = static_cast<I>(g.points), volume = static_cast<I>(g.volume);
  box::box_splat<T, I>(
      blk, box_sums, size, int(g.c), 1,
      [&](const PointState<T, I>& st, int ch) { return DA_LOAD(grad + (b * c + ch) * points + st.p); },
      [&](int ch) { return grad_vol + (b * c + ch) * volume; });
}

}  // namespace splat
}  // namespace sampling
}  // namespace deepatlas_fast
