// Trilinear sampling math (grid_sample, bilinear, align_corners=True): the formulas of
// deepatlas_fast/reference/sampling.py (source_index, trilinear_corners), per point.
#pragma once

#include "common.h"

namespace deepatlas_fast {

// Padded voxel position along one axis and d position / d coordinate.
// border: clip to [0, size-1]; no gradient on or beyond a border.
// zeros: clip to [-2, size+1] (every corner is outside there, so the slope never matters) to keep
// floor() in integer range. A NaN coordinate stays NaN (it reaches the output through the weights).
template <typename T, typename I>
DA_HD void axis_position(T coord, I size, bool zeros, T& position, T& slope) {
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
template <typename T, typename I>
DA_HD void cell_of(T position, I size, bool clamp_cell, I& low, T& frac) {
  T base = is_nan(position) ? T(0) : floor(position);
  if (clamp_cell) base = clamp_to(base, T(0), T(size >= 2 ? size - 2 : 0));
  low = static_cast<I>(base);
  frac = position - base;
}

// The 8 corners of a cell: flat index (clamped into the volume so it can be read), weight,
// d weight / d position (3 axes) and whether the corner really lies inside the volume.
// Corner k has steps ((k >> 2) & 1, (k >> 1) & 1, k & 1) along (D, H, W). I: the index type (int64_t;
// the CUDA sampling kernels use int32_t where every flat index of the call fits, for fewer registers).
template <typename T, typename I = int64_t>
struct Corners {
  I index[8];
  T weight[8];
  T d_weight[8][3];
  bool inside[8];
};

template <typename T, typename I>
DA_HD void trilinear_corners(const I low[3], const T frac[3], const I size[3], Corners<T, I>& out) {
  // per axis first (2 indices, factors, in-bounds flags), then the 8 combinations
  I index[3][2];
  T factor[3][2];
  bool inside[3][2];
  DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    DA_UNROLL
    for (int step = 0; step < 2; ++step) {
      const I i = low[a] + step;
      inside[a][step] = i >= 0 && i < size[a];
      index[a][step] = clamp_to<I>(i, 0, size[a] - 1);
    }
    factor[a][0] = T(1) - frac[a];
    factor[a][1] = frac[a];
  }
  DA_UNROLL
  for (int k = 0; k < 8; ++k) {
    const int z = (k >> 2) & 1, y = (k >> 1) & 1, x = k & 1;
    out.index[k] = (index[0][z] * size[1] + index[1][y]) * size[2] + index[2][x];
    out.inside[k] = inside[0][z] && inside[1][y] && inside[2][x];
    const T fz = factor[0][z], fy = factor[1][y], fx = factor[2][x];
    out.weight[k] = fz * fy * fx;
    out.d_weight[k][0] = (z ? T(1) : T(-1)) * fy * fx;
    out.d_weight[k][1] = fz * (y ? T(1) : T(-1)) * fx;
    out.d_weight[k][2] = fz * fy * (x ? T(1) : T(-1));
  }
}

// The sampled value of one channel plane: sum of in-volume corner values times their weights.
template <typename T, typename I>
DA_HD T corner_value(const T* plane, const Corners<T, I>& k) {
  T acc = 0;
  DA_UNROLL
  for (int j = 0; j < 8; ++j) acc += k.inside[j] ? DA_LOAD(plane + k.index[j]) * k.weight[j] : T(0);
  return acc;
}

// Adds up * d(sampled value of one channel plane) / d position to d_pos (the coordinate gradient's gather).
template <typename T, typename I>
DA_HD void add_position_gradient(const T* plane, const Corners<T, I>& k, T up, T d_pos[3]) {
  T dot[3] = {0, 0, 0};
  DA_UNROLL
  for (int j = 0; j < 8; ++j) {
    const T v = k.inside[j] ? DA_LOAD(plane + k.index[j]) : T(0);
    dot[0] += v * k.d_weight[j][0];
    dot[1] += v * k.d_weight[j][1];
    dot[2] += v * k.d_weight[j][2];
  }
  DA_UNROLL
  for (int a = 0; a < 3; ++a) d_pos[a] += up * dot[a];
}

// Everything one sampled point needs: corners (grid_sample cells), the padding slopes and the cell (its
// lowest corner's voxel along D, H, W; possibly outside the volume).
template <typename T, typename I = int64_t>
struct SamplePoint {
  Corners<T, I> corners;
  T slope[3];
  I low[3];
};

template <typename T, typename I>
DA_HD void sample_point(const T coord[3], const I size[3], bool zeros, SamplePoint<T, I>& point) {
  I low[3];
  T frac[3];
DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    T position;
    axis_position(coord[a], size[a], zeros, position, point.slope[a]);
    cell_of(position, size[a], false, low[a], frac[a]);
    point.low[a] = low[a];
  }
  trilinear_corners(low, frac, size, point.corners);
}

// ---- sample / warp: the points of a field ---------------------------------------------------------

namespace sampling {

// The shapes of a sample / warp call: vol [n, c, *size] (volume = prod(size) voxels), field
// [n, 3, *out_size] (points = prod(out_size) sampled points). Built by sampling_host.h.
struct Geometry {
  int64_t n, c, size[3], volume, points, out_size[3];
};

// Coordinates of point p of batch b: the field itself (sample) or identity + displacement (warp).
// I: the index type of the whole computation (n * 3 * points must fit).
template <typename T, bool WARP, typename I>
DA_HD void point_coords(const T* __restrict__ field, const Geometry& g, I b, I p, T coord[3]) {
  const I points = static_cast<I>(g.points);
  const T* base = field + b * 3 * points + p;
DA_UNROLL
  for (int a = 0; a < 3; ++a) coord[a] = base[a * points];
  if (WARP) {
    const I ow = static_cast<I>(g.out_size[2]), oh = static_cast<I>(g.out_size[1]);
    const I w = p % ow, h = (p / ow) % oh;
    const I d = p / (oh * ow);
    coord[0] += identity_coordinate<T>(d, g.out_size[0]);
    coord[1] += identity_coordinate<T>(h, g.out_size[1]);
    coord[2] += identity_coordinate<T>(w, g.out_size[2]);
  }
}

// sample_point at point p of batch b of the field.
template <typename T, bool WARP, typename I>
DA_HD void sample_field_point(const T* __restrict__ field, const Geometry& g, I b, I p, bool zeros,
                              SamplePoint<T, I>& point) {
  T coord[3];
  point_coords<T, WARP>(field, g, b, p, coord);
  const I size[3] = {static_cast<I>(g.size[0]), static_cast<I>(g.size[1]), static_cast<I>(g.size[2])};
  sample_point(coord, size, zeros, point);
}

// point.low[0] of sample_field_point at point p of batch b (the D index of its cell's lowest corner), from
// the point's D coordinate alone: a splat owning a slab of D planes skips other slabs' points cheaply.
template <typename T, bool WARP, typename I>
DA_HD I point_low_d(const T* __restrict__ field, const Geometry& g, I b, I p, bool zeros) {
  T coord = field[b * 3 * static_cast<I>(g.points) + p];
  if (WARP) coord += identity_coordinate<T>(p / static_cast<I>(g.out_size[1] * g.out_size[2]), g.out_size[0]);
  const I size = static_cast<I>(g.size[0]);
  T position, slope, frac;
  I low;
  axis_position(coord, size, zeros, position, slope);
  cell_of(position, size, false, low, frac);
  return low;
}

// Whether every flat index of a sample / warp call (inputs, outputs, gradients) fits in int32_t.
DA_HD bool fits_int32(const Geometry& g) {
  const int64_t limit = int64_t(1) << 31;
  const int64_t channels = g.c > 3 ? g.c : 3;
  return g.n * channels * g.points < limit && g.n * g.c * g.volume < limit;
}

}  // namespace sampling
}  // namespace deepatlas_fast
