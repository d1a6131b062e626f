// The tiled backward of jacobian_det / jacobian_var, shared by the CUDA kernel (cuda/jacobian.cu) and its
// serial CPU emulation (cpu/jacobian.cpp), so that the CPU tests run the code the GPU runs.
//
// The gather of jacobian.h reads U[.][j] = g cof0[.][j] / (hi - lo)_j at the six axis neighbours of a voxel;
// one thread per voxel (cuda/jacobian.cu's backward_kernel) makes each U six times, 18 field loads and the
// cofactors each time. Here a unit is an in-plane tile of kTileY x kTileX voxels over a run of planes: per
// plane its threads make U once at the tile's voxels and, of the one component the tile's edge voxels
// read there, at the rows above and below and the columns left and right of the tile, into the unit's
// scratch (shared memory on CUDA); then each voxel gathers its six taps from the scratch. The D taps reach
// the previous and next plane: a ring of three planes of U[.][0], two of the in-plane components (the
// plane gathered and the one made ahead). Per output voxel about 1.5 U instead of 6; no atomics, and the
// same U and the same sums in the same order as the untiled kernels (gather_gradient).
//
// Exec runs the phases: for_each(n, f) calls f(i) for i in [0, n) (on CUDA spread over the block's
// threads), sync() is the barrier between phases (__syncthreads on CUDA, nothing when serial).
#pragma once

#include "common.h"
#include "jacobian.h"

namespace deepatlas_fast {
namespace jacobian {
namespace tile {

constexpr int kTileX = 32;  // one warp's row of coalesced x
constexpr int kTileY = 8;
constexpr int kThreads = kTileX * kTileY;  // one voxel of the tile per thread (CUDA block size)
constexpr int kPlanesPerUnit = 16;         // a unit's run of planes: +2 halo planes, 1/8 more U
// Points made per plane: the tile, then the rows above and below it, then the columns left and right.
constexpr int kRowPoints = 2 * kTileX, kColumnPoints = 2 * kTileY;
constexpr int kPlanePoints = kThreads + kRowPoints + kColumnPoints;

// The scratch of a unit, elements of T (float32 23 KB, float64 46 KB: static shared memory on CUDA):
//   along_d [3 ring slots][3 k][kTileY][kTileX]      U[k][0] of the tile's voxels, slot = plane % 3
//   along_h [2 slots][3 k][kTileY + 2][kTileX]       U[k][1], rows -1 .. kTileY, slot = plane % 2
//   along_w [2 slots][3 k][kTileY][kTileX + 2]       U[k][2], columns -1 .. kTileX, slot = plane % 2
constexpr int kAlongD = 3 * 3 * kTileY * kTileX;
constexpr int kAlongH = 2 * 3 * (kTileY + 2) * kTileX;
constexpr int kAlongW = 2 * 3 * kTileY * (kTileX + 2);
constexpr int kScratchElements = kAlongD + kAlongH + kAlongW;

// U[k][j] at (plane, ty, tx), tile-local ty in [-1, kTileY], tx in [-1, kTileX] (only the entries made).
template <typename T>
DA_HD T* along(T* scratch, int j, int64_t plane, int k, int ty, int tx) {
  if (j == 0) return scratch + ((int(plane % 3) * 3 + k) * kTileY + ty) * kTileX + tx;
  if (j == 1) return scratch + kAlongD + ((int(plane % 2) * 3 + k) * (kTileY + 2) + ty + 1) * kTileX + tx;
  return scratch + kAlongD + kAlongH + ((int(plane % 2) * 3 + k) * kTileY + ty) * (kTileX + 2) + tx + 1;
}

// Units: tiles along W and H, runs of planes along D (per batch element).
struct Units {
  int64_t x, y, runs;
  DA_HD int64_t tiles() const { return x * y; }
};

DA_HD Units units_of(const Geometry& g) {
  return Units{(g.size[2] + kTileX - 1) / kTileX, (g.size[1] + kTileY - 1) / kTileY,
               (g.size[0] + kPlanesPerUnit - 1) / kPlanesPerUnit};
}

// Point i of a plane's kPlanePoints, tile-local (see kPlanePoints' order).
DA_HD void plane_point(int i, int& ty, int& tx) {
  if (i < kThreads) {
    ty = i / kTileX;
    tx = i % kTileX;
  } else if (i < kThreads + kRowPoints) {
    const int r = i - kThreads;
    ty = r < kTileX ? -1 : kTileY;
    tx = r % kTileX;
  } else {
    const int c = i - kThreads - kRowPoints;
    tx = c < kTileY ? -1 : kTileX;
    ty = c % kTileY;
  }
}

// The gradient of the field f (one batch element, 3 channels g.voxels apart) by the unit of tile
// (tile_y, tile_x) over planes [p0, p1), into out (same layout). g(q) = a * det0(q) + b (AFFINE) or
// a * x(q) (x: the incoming det-map gradient of the batch element), as weighted_cofactors.
template <typename T, bool AFFINE, typename Exec>
DA_HD void backward_unit(const Exec& ex, T* scratch, const T* __restrict__ f, const T* __restrict__ x, T a, T b,
                         T* __restrict__ out, const Geometry& g, int64_t tile_y, int64_t tile_x, int64_t p0,
                         int64_t p1) {
  const int64_t y0 = tile_y * kTileY, x0 = tile_x * kTileX;
  // U of plane d at the points of the plane inside the volume, each point the components it is read for
  // (of plane p0 - 1, only U[.][0]: its in-plane slot is the one plane p0 + 1 takes before the barrier).
  auto make_plane = [&](int64_t d, bool in_plane) {
    ex.for_each(kPlanePoints, [&](int i) {
      int ty, tx;
      plane_point(i, ty, tx);
      const bool row_inside = ty >= 0 && ty < kTileY, column_inside = tx >= 0 && tx < kTileX;
      const int64_t q[3] = {d, y0 + ty, x0 + tx};
      if (q[1] < 0 || q[1] >= g.size[1] || q[2] < 0 || q[2] >= g.size[2]) return;
      if (!in_plane && !(row_inside && column_inside)) return;
      const int64_t center = (q[0] * g.size[1] + q[1]) * g.size[2] + q[2];
      T u[3][3];
      weighted_cofactors<T, AFFINE>(f, g.voxels, center, voxel_stencil<T>(q, g.size), a, b,
                                    AFFINE ? T(0) : DA_LOAD(x + center), u);
      DA_UNROLL
      for (int k = 0; k < 3; ++k) {
        if (row_inside && column_inside) *along(scratch, 0, d, k, ty, tx) = u[k][0];
        if (in_plane && column_inside) *along(scratch, 1, d, k, ty, tx) = u[k][1];
        if (in_plane && row_inside) *along(scratch, 2, d, k, ty, tx) = u[k][2];
      }
    });
  };
  if (p0 > 0) make_plane(p0 - 1, false);
  make_plane(p0, true);
  for (int64_t d = p0; d < p1; ++d) {
    if (d + 1 < g.size[0]) make_plane(d + 1, true);
    ex.sync();
    ex.for_each(kThreads, [&](int i) {
      const int ty = i / kTileX, tx = i % kTileX;
      const int64_t p[3] = {d, y0 + ty, x0 + tx};
      if (p[1] >= g.size[1] || p[2] >= g.size[2]) return;
      auto column = [&](const int64_t q[3], int j, T u[3]) {
        DA_UNROLL
        for (int k = 0; k < 3; ++k) u[k] = *along(scratch, j, q[0], k, int(q[1] - y0), int(q[2] - x0));
      };
      T grad[3];
      gather_gradient<T>(p, g.size, column, grad);
      const int64_t center = (p[0] * g.size[1] + p[1]) * g.size[2] + p[2];
      DA_UNROLL
      for (int k = 0; k < 3; ++k) out[k * g.voxels + center] = grad[k];
    });
    ex.sync();  // the next plane made overwrites the slots of plane d - 1
  }
}

}  // namespace tile
}  // namespace jacobian
}  // namespace deepatlas_fast
