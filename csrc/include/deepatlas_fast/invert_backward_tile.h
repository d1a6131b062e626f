// The tiled backward of invert / invert_displacement, shared by the CUDA kernel (cuda/splat_tiled.cu, used by
// invert's backward with DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled) and its serial CPU emulation
// (cpu/splat_tiled.cpp): box_splat.h's tiled splat over the target points.
//
// The backward splats -lambda = -J(p)^-T g of each valid target point into the 8 source nodes of the cell
// of its solution p (inversion.h, backward_lambda); the atomic kernel (cuda/inversion.cu) issues 24 global
// atomic adds per point. A tile of 4 x 4 x 16 target points of a smooth map has its solutions in a small box
// of source nodes (about as many as the tile's points for a displacement), so each node of the box gets one
// global add per channel and block.
#pragma once

#include "box_splat.h"
#include "inversion.h"

namespace deepatlas_fast {
namespace inversion {

// One thread's target point: the source cell of its solution and -lambda; inactive without a point, where
// the forward found no valid solution, or where J is degenerate (such points pass no gradient).
template <typename T, typename I>
struct TargetState {
  Corners<T, I> cell;
  I lo[3];
  T minus_lambda[3];
  bool on;
  DA_HD bool active() const { return on; }
  DA_HD const Corners<T, I>& corners() const { return cell; }
  DA_HD const I* low() const { return lo; }
};

// Adds tile `tile` of batch item b's target points to out [n, 3, *src] (zeroed by the caller): grad and
// inverse [n, 3, *target] (DISP: the inverse displacement p - u), valid [n, 1, *target], field [n, 3, *src]
// (coords, or DISP: disp); target_size: the target grid's sizes (the tiles' grid).
template <typename T, bool DISP, typename I, typename Block>
DA_HD void backward_tile(const Block& blk, const T* __restrict__ grad, const T* __restrict__ field,
                         const T* __restrict__ inverse, const bool* __restrict__ valid, T* out, T* box_sums,
                         const GridOf<I>& src, const GridOf<I>& target, const int64_t target_size[3],
                         const box::Tiles& tiles, int64_t tile, I b) {
  blk.each_thread([&](int tid, TargetState<T, I>& st) {
    st.on = false;
    const I t = box::tile_point<I>(target_size, tiles, tile, tid);
    if (t < 0 || !valid[b * target.cells + t]) return;
    T p[3], g[3], lambda[3];
    solution_and_grad<T, DISP>(grad, inverse, target, b, t, p, g);
    if (!backward_lambda<T, DISP>(field + b * 3 * src.cells, src, p, g, lambda)) return;
    cell_corners(p, src, st.cell, st.lo);
    DA_UNROLL
    for (int k = 0; k < 3; ++k) st.minus_lambda[k] = -lambda[k];
    st.on = true;
  });
  box::box_splat<T, I>(
      blk, box_sums, src.size, 3, 1,
      // selects, not a run-time index: that would put the state in local memory on the GPU
      [&](const TargetState<T, I>& st, int ch) {
        return ch == 0 ? st.minus_lambda[0] : ch == 1 ? st.minus_lambda[1] : st.minus_lambda[2];
      },
      [&](int ch) { return out + (b * 3 + ch) * src.cells; });
}

}  // namespace inversion
}  // namespace deepatlas_fast
