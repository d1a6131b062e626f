// Trilinear sampling math (grid_sample, bilinear, align_corners=True): the formulas of
// deepatlas_fast/reference/sampling.py (source_index, trilinear_corners), per point.
#pragma once

#include "common.h"

namespace deepatlas_fast {

// Padded voxel position along one axis and d position / d coordinate.
// border: clip to [0, size-1]; no gradient on or beyond a border.
// zeros: clip to [-2, size+1] (every corner is outside there, so the slope never matters) to keep
// floor() in integer range. A NaN coordinate stays NaN (it reaches the output through the weights).
template <typename T>
DA_HD void axis_position(T coord, int64_t size, bool zeros, T& position, T& slope) {
  const T x = ((coord + T(1)) / T(2)) * T(size - 1);
  const T scale = T(size - 1) / T(2);
  if (is_nan(x)) {
    position = x;
    slope = zeros ? scale : T(0);
    return;
  }
  if (zeros) {
    position = clamp_to(x, T(-2), T(size + 1));
    slope = scale;
  } else {
    position = clamp_to(x, T(0), T(size - 1));
    slope = (x > T(0) && x < T(size - 1)) ? scale : T(0);
  }
}

// The cell below a position: floor(position) (grid_sample), or with clamp_cell kept in
// [0, size-2] so that a point on the upper border uses the last cell with fraction 1 (inversion).
template <typename T>
DA_HD void cell_of(T position, int64_t size, bool clamp_cell, int64_t& low, T& frac) {
  T base = is_nan(position) ? T(0) : floor(position);
  if (clamp_cell) base = clamp_to(base, T(0), T(size >= 2 ? size - 2 : 0));
  low = static_cast<int64_t>(base);
  frac = position - base;
}

// The 8 corners of a cell: flat index (clamped into the volume so it can be read), weight,
// d weight / d position (3 axes) and whether the corner really lies inside the volume.
// Corner k has steps ((k >> 2) & 1, (k >> 1) & 1, k & 1) along (D, H, W).
template <typename T>
struct Corners {
  int64_t index[8];
  T weight[8];
  T d_weight[8][3];
  bool inside[8];
};

template <typename T>
DA_HD void trilinear_corners(const int64_t low[3], const T frac[3], const int64_t size[3], Corners<T>& out) {
DA_UNROLL
  for (int k = 0; k < 8; ++k) {
    const int step[3] = {(k >> 2) & 1, (k >> 1) & 1, k & 1};
    T factor[3], slope[3];
    int64_t flat = 0;
    bool inside = true;
DA_UNROLL
    for (int a = 0; a < 3; ++a) {
      factor[a] = step[a] ? frac[a] : T(1) - frac[a];
      slope[a] = step[a] ? T(1) : T(-1);
      const int64_t index = low[a] + step[a];
      inside = inside && index >= 0 && index < size[a];
      flat = flat * size[a] + clamp_to<int64_t>(index, 0, size[a] - 1);
    }
    out.index[k] = flat;
    out.inside[k] = inside;
    out.weight[k] = factor[0] * factor[1] * factor[2];
    out.d_weight[k][0] = slope[0] * factor[1] * factor[2];
    out.d_weight[k][1] = factor[0] * slope[1] * factor[2];
    out.d_weight[k][2] = factor[0] * factor[1] * slope[2];
  }
}

// Everything one sampled point needs: corners (grid_sample cells) and the padding slopes.
template <typename T>
struct SamplePoint {
  Corners<T> corners;
  T slope[3];
};

template <typename T>
DA_HD void sample_point(const T coord[3], const int64_t size[3], bool zeros, SamplePoint<T>& point) {
  int64_t low[3];
  T frac[3];
DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    T position;
    axis_position(coord[a], size[a], zeros, position, point.slope[a]);
    cell_of(position, size[a], false, low[a], frac[a]);
  }
  trilinear_corners(low, frac, size, point.corners);
}

}  // namespace deepatlas_fast
