// The tiled volume gradient of sample / warp (the "splat"), shared by the CUDA op sample_splat_tiled
// (cuda/splat_tiled.cu) and its serial CPU emulation (cpu/splat_tiled.cpp), so that the CPU tests run the
// code the GPU runs.
//
// grad_vol[b, c, v] = the sum over output points p whose cell has v as an in-volume corner of
// grad[b, c, p] * weight(p, v). One block of kThreads threads (one output point each) per tile of
// kTileZ x kTileY x kTileX output points and batch item. A tile's points usually land in a small box of
// voxels (a smooth map; a small atlas sampled on a large grid, where thousands of points share a voxel):
// the block adds its contributions into that box in shared memory, then adds each nonzero box voxel to
// global memory once, instead of 8 global atomic adds per point and channel. A box larger than the shared
// buffer (scattered points) falls back to the global atomic adds.
//
// Block is the executor (CUDA: the block's threads; CPU: a loop), with per-thread state PointState:
//   each_thread(f)       f(tid, state of thread tid) for every thread
//   for_each(n, f)       f(i) for i in [0, n), spread over the threads
//   sync()               barrier
//   reduce_box(f)        f(state, box) extends box by a thread's voxels; returns the union over the block
//   shared_add(p, v)     *p += v in the block's buffer (atomic among the block's threads)
//   global_add(p, v)     *p += v in grad_vol (atomic among blocks)
#pragma once

#include "common.h"
#include "trilinear.h"

namespace deepatlas_fast {
namespace sampling {
namespace splat {

constexpr int kTileX = 16, kTileY = 4, kTileZ = 4;
constexpr int kThreads = kTileX * kTileY * kTileZ;
constexpr int kBoxBytes = 16 * 1024;  // the block's box buffer

template <typename T>
DA_HD constexpr int box_capacity() {
  return kBoxBytes / int(sizeof(T));
}

// Tiles along each axis (W, H, D) of the output grid.
struct Tiles {
  int64_t x, y, z;
  DA_HD int64_t count() const { return x * y * z; }
};

DA_HD Tiles tiles_of(const Geometry& g) {
  return Tiles{(g.out_size[2] + kTileX - 1) / kTileX, (g.out_size[1] + kTileY - 1) / kTileY,
               (g.out_size[0] + kTileZ - 1) / kTileZ};
}

// The output point of thread tid in tile `tile`, or -1 where that position is outside the output grid.
// Tile numbers fit in 32 bits (the launchers check): 32-bit divisions.
template <typename I>
DA_HD I tile_point(const Geometry& g, const Tiles& t, int64_t tile, int tid) {
  const uint32_t n = uint32_t(tile), tx = uint32_t(t.x), ty = uint32_t(t.y);
  const int64_t x = int64_t(n % tx) * kTileX + tid % kTileX;
  const int64_t y = int64_t(n / tx % ty) * kTileY + tid / kTileX % kTileY;
  const int64_t z = int64_t(n / (tx * ty)) * kTileZ + tid / (kTileX * kTileY);
  if (x >= g.out_size[2] || y >= g.out_size[1] || z >= g.out_size[0]) return I(-1);
  return static_cast<I>((z * g.out_size[1] + y) * g.out_size[2] + x);
}

// Voxels [lo, hi] along D, H, W (inclusive); empty when lo > hi along an axis.
struct Box {
  int lo[3], hi[3];
  DA_HD int extent(int a) const { return hi[a] - lo[a] + 1; }
  DA_HD int64_t cells() const {
    return extent(0) > 0 && extent(1) > 0 && extent(2) > 0 ? int64_t(extent(0)) * extent(1) * extent(2) : 0;
  }
};

constexpr int kIntMax = 0x7fffffff;

DA_HD Box empty_box() { return Box{{kIntMax, kIntMax, kIntMax}, {-kIntMax, -kIntMax, -kIntMax}}; }

// Extends box by the in-volume corners of a point's cell.
template <typename T, typename I>
DA_HD void add_point_box(const SamplePoint<T, I>& sp, const Geometry& g, Box& box) {
  int lo[3], hi[3];
  DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    lo[a] = sp.low[a] > 0 ? int(sp.low[a]) : 0;
    hi[a] = sp.low[a] + 1 < g.size[a] - 1 ? int(sp.low[a] + 1) : int(g.size[a] - 1);
  }
  if (lo[0] > hi[0] || lo[1] > hi[1] || lo[2] > hi[2]) return;  // no corner in the volume
  DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    box.lo[a] = lo[a] < box.lo[a] ? lo[a] : box.lo[a];
    box.hi[a] = hi[a] > box.hi[a] ? hi[a] : box.hi[a];
  }
}

// One thread's point: p < 0 when the thread has none.
template <typename T, typename I>
struct PointState {
  SamplePoint<T, I> point;
  I p;
};

// The volume gradient contributions of tile `tile` of batch item b, added to grad_vol (zeroed by the
// caller); box_sums: the block's buffer of box_capacity<T>() values.
template <typename T, bool WARP, typename I, typename Block>
DA_HD void splat_tile(const Block& blk, const T* __restrict__ grad, const T* __restrict__ field, T* grad_vol,
                      T* box_sums, const Geometry& g, const Tiles& tiles, bool zeros, int64_t tile, I b) {
  blk.each_thread([&](int tid, PointState<T, I>& st) {
    st.p = tile_point<I>(g, tiles, tile, tid);
    if (st.p >= 0) sample_field_point<T, WARP>(field, g, b, st.p, zeros, st.point);
  });
  const Box box = blk.reduce_box([&](const PointState<T, I>& st, Box& mine) {
    if (st.p >= 0) add_point_box(st.point, g, mine);
  });
  const int64_t cells = box.cells();
  const bool in_shared = cells <= box_capacity<T>();
  const int by = box.extent(1), bx = box.extent(2);
  const I c = static_cast<I>(g.c), points = static_cast<I>(g.points), volume = static_cast<I>(g.volume);
  const I size_y = static_cast<I>(g.size[1]), size_x = static_cast<I>(g.size[2]);
  for (I ch = 0; ch < c; ++ch) {
    T* plane = grad_vol + (b * c + ch) * volume;
    const T* up_plane = grad + (b * c + ch) * points;
    if (!in_shared) {
      blk.each_thread([&](int, PointState<T, I>& st) {
        if (st.p < 0) return;
        const T up = DA_LOAD(up_plane + st.p);
        const Corners<T, I>& k = st.point.corners;
        DA_UNROLL
        for (int j = 0; j < 8; ++j)
          if (k.inside[j]) blk.global_add(plane + k.index[j], up * k.weight[j]);
      });
      continue;
    }
    blk.for_each(cells, [&](int64_t i) { box_sums[i] = T(0); });
    blk.sync();
    blk.each_thread([&](int, PointState<T, I>& st) {
      if (st.p < 0) return;
      const T up = DA_LOAD(up_plane + st.p);
      const Corners<T, I>& k = st.point.corners;
      DA_UNROLL
      for (int j = 0; j < 8; ++j) {
        if (!k.inside[j]) continue;
        const int z = int(st.point.low[0]) + ((j >> 2) & 1) - box.lo[0];
        const int y = int(st.point.low[1]) + ((j >> 1) & 1) - box.lo[1];
        const int x = int(st.point.low[2]) + (j & 1) - box.lo[2];
        blk.shared_add(box_sums + (z * by + y) * bx + x, up * k.weight[j]);
      }
    });
    blk.sync();
    blk.for_each(cells, [&](int64_t i) {
      const T v = box_sums[i];
      if (v == T(0)) return;  // (NaN is added)
      const I x = static_cast<I>(i % bx), y = static_cast<I>(i / bx % by), z = static_cast<I>(i / (int64_t(bx) * by));
      blk.global_add(plane + ((z + box.lo[0]) * size_y + y + box.lo[1]) * size_x + x + box.lo[2], v);
    });
    blk.sync();  // before the next channel clears the buffer
  }
}

}  // namespace splat
}  // namespace sampling
}  // namespace deepatlas_fast
