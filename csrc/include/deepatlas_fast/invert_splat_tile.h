// The tiled splat of invert's initial guess (one pyramid level), shared by the CUDA kernel of
// invert_splat_tiled / invert's pyramid (cuda/splat_tiled.cu) and its serial CPU emulation
// (cpu/splat_tiled.cpp): box_splat.h's tiled splat over the source points. A tile of 4 x 4 x 16 source voxels
// of a smooth map lands in a few nodes of the target level (a 256^3 exam inverted onto a 64^3 template: about
// 4 x 4 x 8 of them; the coarser levels fewer), so the 4 accumulators of each node get one global add per
// block instead of 8 x 4 atomic adds per source point (the atomic kernel's chains of hundreds of adds to one
// address).
#pragma once

#include "box_splat.h"
#include "inversion.h"

namespace deepatlas_fast {
namespace inversion {

// One thread's source point: its cell in the level and its own (identity) coordinates; inactive without a
// point or at a NaN position.
template <typename T, typename I>
struct SourceState {
  Corners<T, I> cell;
  I lo[3];
  T q[3];
  bool on;
  DA_HD bool active() const { return on; }
  DA_HD const Corners<T, I>& corners() const { return cell; }
  DA_HD const I* low() const { return lo; }
};

// Adds tile `tile` of batch item b's source points to the level's accumulators acc [n, level.cells, 4] (per
// node the splatted weight, then the weighted sums of the 3 source coordinates; zeroed by the caller).
// coords: [n, 3, *src] target positions of the source grid; src_size: its sizes (the tiles' grid).
template <typename T, typename I, typename Block>
DA_HD void splat_source_tile(const Block& blk, const T* __restrict__ coords, T* acc, T* box_sums,
                             const GridOf<I>& src, const int64_t src_size[3], const GridOf<I>& level,
                             const box::Tiles& tiles, int64_t tile, I b) {
  blk.each_thread([&](int tid, SourceState<T, I>& st) {
    st.on = false;
    const I s = box::tile_point<I>(src_size, tiles, tile, tid);
    if (s < 0) return;
    const T* item = coords + b * 3 * src.cells + s;
    const T x[3] = {item[0], item[src.cells], item[2 * src.cells]};
    if (!splat_corners(x, level, st.cell, st.lo)) return;
    identity_point(s, src, st.q);
    st.on = true;
  });
  box::box_splat<T, I>(
      blk, box_sums, level.size, 4, 4,
      // selects, not st.q[ch - 1]: a run-time index would put the state in local memory on the GPU
      [&](const SourceState<T, I>& st, int ch) { return ch == 0 ? T(1) : ch == 1 ? st.q[0] : ch == 2 ? st.q[1] : st.q[2]; },
      [&](int ch) { return acc + b * 4 * level.cells + ch; });
}

}  // namespace inversion
}  // namespace deepatlas_fast
