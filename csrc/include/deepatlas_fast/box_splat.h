// The tiled splat shared by the volume gradient of sample / warp (splat_tile.h) and the initial guess of
// invert (invert_splat_tile.h), on CUDA and in their serial CPU emulations, so that the CPU tests run the
// code the GPU runs.
//
// One block of kThreads threads, one point each, per tile of kTileZ x kTileY x kTileX points of a grid
// and batch item. Each point adds `channels` values times its 8 trilinear weights into the in-grid corners
// of its cell. The tile's points usually land in a small box of nodes (a smooth map; a fine grid splatted
// into a coarse one, where hundreds of points share a node): the block adds its contributions into that box
// in shared memory, then adds each nonzero box node to global memory once, instead of 8 global atomic adds
// per point and channel. A box larger than the shared buffer (scattered points) falls back to those.
//
// Block is the executor (CUDA: the block's threads, cuda/box_block.cuh; CPU: SerialBlock below), with a
// per-thread State (active(), corners(), low(): the point's cell):
//   each_thread(f)       f(tid, state of thread tid) for every thread
//   for_each(n, f)       f(i) for i in [0, n), spread over the threads
//   sync()               barrier
//   reduce_box(f)        f(state, box) extends box by a thread's nodes; returns the union over the block
//   shared_add(p, v)     *p += v in the block's buffer (atomic among the block's threads)
//   global_add(p, v)     *p += v in the output (atomic among blocks)
#pragma once

#include <vector>

#include "common.h"
#include "trilinear.h"

namespace deepatlas_fast {
namespace box {

constexpr int kTileX = 16, kTileY = 4, kTileZ = 4;
constexpr int kThreads = kTileX * kTileY * kTileZ;
constexpr int kBoxBytes = 16 * 1024;  // the block's box buffer

template <typename T>
DA_HD constexpr int box_capacity() {
  return kBoxBytes / int(sizeof(T));
}

// Tiles along each axis (W, H, D) of a grid of points.
struct Tiles {
  int64_t x, y, z;
  DA_HD int64_t count() const { return x * y * z; }
};

DA_HD Tiles tiles_of(const int64_t size[3]) {
  return Tiles{(size[2] + kTileX - 1) / kTileX, (size[1] + kTileY - 1) / kTileY, (size[0] + kTileZ - 1) / kTileZ};
}

// The point of thread tid in tile `tile` of a grid of `size` points, or -1 where that position is outside
// the grid. Tile numbers fit in 32 bits (the launchers check): 32-bit divisions.
template <typename I>
DA_HD I tile_point(const int64_t size[3], const Tiles& t, int64_t tile, int tid) {
  const uint32_t n = uint32_t(tile), tx = uint32_t(t.x), ty = uint32_t(t.y);
  const int64_t x = int64_t(n % tx) * kTileX + tid % kTileX;
  const int64_t y = int64_t(n / tx % ty) * kTileY + tid / kTileX % kTileY;
  const int64_t z = int64_t(n / (tx * ty)) * kTileZ + tid / (kTileX * kTileY);
  if (x >= size[2] || y >= size[1] || z >= size[0]) return I(-1);
  return static_cast<I>((z * size[1] + y) * size[2] + x);
}

// Nodes [lo, hi] along D, H, W (inclusive); empty when lo > hi along an axis.
struct Box {
  int lo[3], hi[3];
  DA_HD int extent(int a) const { return hi[a] - lo[a] + 1; }
  DA_HD int64_t cells() const {
    return extent(0) > 0 && extent(1) > 0 && extent(2) > 0 ? int64_t(extent(0)) * extent(1) * extent(2) : 0;
  }
};

constexpr int kIntMax = 0x7fffffff;

DA_HD Box empty_box() { return Box{{kIntMax, kIntMax, kIntMax}, {-kIntMax, -kIntMax, -kIntMax}}; }

// Extends box by the in-grid corners of the cell whose lowest corner is `low` in a grid of `size` nodes.
template <typename I>
DA_HD void add_cell_box(const I low[3], const I size[3], Box& box) {
  int lo[3], hi[3];
  DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    lo[a] = low[a] > 0 ? int(low[a]) : 0;
    hi[a] = low[a] + 1 < size[a] - 1 ? int(low[a] + 1) : int(size[a] - 1);
  }
  if (lo[0] > hi[0] || lo[1] > hi[1] || lo[2] > hi[2]) return;  // no corner in the grid
  DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    box.lo[a] = lo[a] < box.lo[a] ? lo[a] : box.lo[a];
    box.hi[a] = hi[a] > box.hi[a] ? hi[a] : box.hi[a];
  }
}

// The block's splat into a grid of `size` nodes: for ch in [0, channels), out(ch)[node * stride] += the sum
// over the block's active points whose cell has node as an in-grid corner of value(state, ch) * weight.
// box_sums: the block's buffer of box_capacity<T>() values.
template <typename T, typename I, typename Block, typename Value, typename Out>
DA_HD void box_splat(const Block& blk, T* box_sums, const I size[3], int channels, int64_t stride, Value&& value,
                     Out&& out) {
  const Box box = blk.reduce_box([&](const auto& st, Box& mine) {
    if (st.active()) add_cell_box(st.low(), size, mine);
  });
  const int64_t cells = box.cells();
  const bool in_shared = cells <= box_capacity<T>();
  const int by = box.extent(1), bx = box.extent(2);
  const I step = static_cast<I>(stride);
  for (int ch = 0; ch < channels; ++ch) {
    T* target = out(ch);
    if (!in_shared) {
      blk.each_thread([&](int, const auto& st) {
        if (!st.active()) return;
        const T v = value(st, ch);
        const Corners<T, I>& k = st.corners();
        DA_UNROLL
        for (int j = 0; j < 8; ++j)
          if (k.inside[j]) blk.global_add(target + k.index[j] * step, v * k.weight[j]);
      });
      continue;
    }
    blk.for_each(cells, [&](int64_t i) { box_sums[i] = T(0); });
    blk.sync();
    blk.each_thread([&](int, const auto& st) {
      if (!st.active()) return;
      const T v = value(st, ch);
      const Corners<T, I>& k = st.corners();
      const I* low = st.low();
      DA_UNROLL
      for (int j = 0; j < 8; ++j) {
        if (!k.inside[j]) continue;
        const int z = int(low[0]) + ((j >> 2) & 1) - box.lo[0];
        const int y = int(low[1]) + ((j >> 1) & 1) - box.lo[1];
        const int x = int(low[2]) + (j & 1) - box.lo[2];
        blk.shared_add(box_sums + (z * by + y) * bx + x, v * k.weight[j]);
      }
    });
    blk.sync();
    blk.for_each(cells, [&](int64_t i) {
      const T v = box_sums[i];
      if (v == T(0)) return;  // (NaN is added)
      const I x = static_cast<I>(i % bx), y = static_cast<I>(i / bx % by), z = static_cast<I>(i / (int64_t(bx) * by));
      blk.global_add(target + (((z + box.lo[0]) * size[1] + y + box.lo[1]) * size[2] + x + box.lo[2]) * step, v);
    });
    blk.sync();  // before the next channel clears the buffer
  }
}

#if !defined(__CUDACC__)
// The CPU emulation's block: its threads one after the other, their states side by side, plain adds for
// the atomic ones.
template <typename State>
struct SerialBlock {
  std::vector<State>* states;

  template <typename F>
  void each_thread(F&& f) const {
    for (int tid = 0; tid < kThreads; ++tid) f(tid, (*states)[tid]);
  }
  template <typename F>
  void for_each(int64_t n, F&& f) const {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  void sync() const {}
  template <typename F>
  Box reduce_box(F&& f) const {
    Box box = empty_box();
    for (const auto& st : *states) f(st, box);
    return box;
  }
  template <typename T>
  void shared_add(T* p, T v) const {
    *p += v;
  }
  template <typename T>
  void global_add(T* p, T v) const {
    *p += v;
  }
};
#endif

}  // namespace box
}  // namespace deepatlas_fast
