// Per-point math of invert / invert_displacement: the formulas of deepatlas_fast/reference/inversion.py,
// one copy shared by the CPU (cpu/inversion.cpp) and CUDA (cuda/inversion.cu) kernels.
//
// A field is 3 channels on a grid, channel k at field + k * grid.cells. With DISP the field is a
// displacement and the map is identity + field: value p + disp(p), Jacobian I + d disp / dp, so the
// identity grid is never built.
#pragma once

#include <cfloat>

#include "common.h"
#include "trilinear.h"

namespace deepatlas_fast {
namespace inversion {

// The reference's constants (reference/inversion.py).
constexpr double kMaxNewtonStepVoxels = 4.0;
constexpr double kSplatWeightTrusted = 0.5;
constexpr double kSingularForward = 1e-10;
constexpr double kSingularBackward = 1e-4;
constexpr double kWeightFloor = 1e-12;  // floor of the splatted weight when normalising
constexpr double kNormFloor = 1e-30;    // floor of |J|_F^2
// A Newton step of at most this many machine epsilons on every axis (normalised units) ends the solve
// (see newton_solve).
constexpr double kConvergedStepEps = 8.0;

// A grid of size[0] x size[1] x size[2] nodes (D, H, W). I: the index type of the per-point math (int64_t;
// the solve and the backward use int32_t where every flat index of the call fits: fewer registers and
// instructions for the corner indices of each Newton step, as the sampling kernels).
template <typename I>
struct GridOf {
  I size[3];
  I cells;
};
using Grid = GridOf<int64_t>;

DA_HD Grid make_grid(int64_t d, int64_t h, int64_t w) { return Grid{{d, h, w}, d * h * w}; }

// The grid with index type J (the caller checks that its flat indices fit, see fits_int32).
template <typename J>
DA_HD GridOf<J> narrow_grid(const Grid& g) {
  return GridOf<J>{{static_cast<J>(g.size[0]), static_cast<J>(g.size[1]), static_cast<J>(g.size[2])},
                   static_cast<J>(g.cells)};
}

// Whether int32_t holds every flat index of n items of `channels` channels on each grid.
DA_HD bool fits_int32(int64_t n, int64_t channels, const Grid& a, const Grid& b) {
  const int64_t cells = a.cells > b.cells ? a.cells : b.cells;
  return n * channels * cells < (int64_t(1) << 31);
}

template <typename T>
DA_HD T machine_epsilon() {
  return sizeof(T) == sizeof(float) ? T(FLT_EPSILON) : T(DBL_EPSILON);
}

template <typename T>
DA_HD T load(const T* ptr) {
#if defined(__CUDA_ARCH__)
  return __ldg(ptr);
#else
  return *ptr;
#endif
}

// Normalised coordinate -> voxel position on an axis of `size` nodes (align_corners=True), unclipped:
// unlike sampling's axis_position there is no padding, the clamped cell extrapolates linearly.
template <typename T, typename I>
DA_HD T voxel_position(T p, I size) {
  return (p + T(1)) / T(2) * T(size - 1);
}

// Voxels per normalised unit along an axis: (size - 1) / 2.
template <typename T, typename I>
DA_HD T voxel_scale(I size) {
  return T(size - 1) / T(2);
}

// (D, H, W) node indices of flat index t.
template <typename I>
DA_HD void unflatten(I t, const GridOf<I>& grid, I index[3]) {
  index[2] = t % grid.size[2];
  index[1] = (t / grid.size[2]) % grid.size[1];
  index[0] = t / (grid.size[1] * grid.size[2]);
}

// The normalised identity coordinates of node t: the target point u of the solve.
template <typename T, typename I>
DA_HD void identity_point(I t, const GridOf<I>& grid, T u[3]) {
  I index[3];
  unflatten(t, grid, index);
DA_UNROLL
  for (int a = 0; a < 3; ++a) u[a] = identity_coordinate<T>(index[a], grid.size[a]);
}

// ---- sampling the map: value, Jacobian ------------------------------------------------------------

// D index of the lower corner of the cell holding normalised p_D (the cell of cell_corners), so that
// a kernel can tell which D planes a point touches before any other work.
template <typename T, typename I>
DA_HD I cell_low_d(T p_d, const GridOf<I>& grid) {
  I low;
  T frac;
  cell_of(voxel_position(p_d, grid.size[0]), grid.size[0], true, low, frac);
  return low;
}

// Corners of the trilinear cell holding normalised p, clamped into the grid (the reference's
// _cell_corners: value and derivative stay continuous up to the border, linear beyond it; every grid axis
// has >= 2 nodes, so all 8 corners are inside), and the cell's lowest corner `low`.
template <typename T, typename I>
DA_HD void cell_corners(const T p[3], const GridOf<I>& grid, Corners<T, I>& corners, I low[3]) {
  T frac[3];
DA_UNROLL
  for (int a = 0; a < 3; ++a) cell_of(voxel_position(p[a], grid.size[a]), grid.size[a], true, low[a], frac[a]);
  trilinear_corners(low, frac, grid.size, corners);
}

template <typename T, typename I>
DA_HD void cell_corners(const T p[3], const GridOf<I>& grid, Corners<T, I>& corners) {
  I low[3];
  cell_corners(p, grid, corners, low);
}

// Trilinear value of the map at normalised p and its Jacobian jac[k][a] = d value_k / d p_a.
template <typename T, bool DISP, typename I>
DA_HD void value_and_jacobian(const T* field, const GridOf<I>& grid, const T p[3], T value[3], T jac[3][3]) {
  Corners<T, I> corners;
  cell_corners(p, grid, corners);
  const T scale[3] = {voxel_scale<T>(grid.size[0]), voxel_scale<T>(grid.size[1]), voxel_scale<T>(grid.size[2])};
DA_UNROLL
  for (int k = 0; k < 3; ++k) {
    value[k] = T(0);
DA_UNROLL
    for (int a = 0; a < 3; ++a) jac[k][a] = T(0);
  }
DA_UNROLL
  for (int j = 0; j < 8; ++j) {
DA_UNROLL
    for (int k = 0; k < 3; ++k) {
      const T v = load(field + k * grid.cells + corners.index[j]);
      value[k] += corners.weight[j] * v;
DA_UNROLL
      for (int a = 0; a < 3; ++a) jac[k][a] += corners.d_weight[j][a] * scale[a] * v;
    }
  }
  if (DISP) {
DA_UNROLL
    for (int k = 0; k < 3; ++k) {
      value[k] += p[k];
      jac[k][k] += T(1);
    }
  }
}

// Solves m x = r (m^T x = r when transposed) by cofactors; returns whether m is numerically singular,
// |det m| <= threshold |m|_F^3, in which case x is the finite least-squares-like step m^T r / |m|_F^2
// (m r / |m|_F^2 when transposed).
template <typename T>
DA_HD bool solve3(const T m[3][3], const T r[3], bool transpose, T threshold, T x[3]) {
  T a[3][3];
DA_UNROLL
  for (int i = 0; i < 3; ++i) {
DA_UNROLL
    for (int j = 0; j < 3; ++j) a[i][j] = transpose ? m[j][i] : m[i][j];
  }
  // cof[i][j] = d det / d a[i][j]; inverse[i][j] = cof[j][i] / det
  const T cof[3][3] = {
      {a[1][1] * a[2][2] - a[1][2] * a[2][1], a[1][2] * a[2][0] - a[1][0] * a[2][2],
       a[1][0] * a[2][1] - a[1][1] * a[2][0]},
      {a[0][2] * a[2][1] - a[0][1] * a[2][2], a[0][0] * a[2][2] - a[0][2] * a[2][0],
       a[0][1] * a[2][0] - a[0][0] * a[2][1]},
      {a[0][1] * a[1][2] - a[0][2] * a[1][1], a[0][2] * a[1][0] - a[0][0] * a[1][2],
       a[0][0] * a[1][1] - a[0][1] * a[1][0]},
  };
  const T det = a[0][0] * cof[0][0] + a[0][1] * cof[0][1] + a[0][2] * cof[0][2];
  T norm2 = T(0);
DA_UNROLL
  for (int i = 0; i < 3; ++i) {
DA_UNROLL
    for (int j = 0; j < 3; ++j) norm2 += a[i][j] * a[i][j];
  }
  norm2 = norm2 > T(kNormFloor) ? norm2 : T(kNormFloor);
  const bool singular = std::fabs(det) <= threshold * (norm2 * std::sqrt(norm2));
DA_UNROLL
  for (int i = 0; i < 3; ++i) {
    x[i] = singular ? (a[0][i] * r[0] + a[1][i] * r[1] + a[2][i] * r[2]) / norm2
                    : (cof[0][i] * r[0] + cof[1][i] * r[1] + cof[2][i] * r[2]) / det;
  }
  return singular;
}

// ---- the solve and its implicit backward -------------------------------------------------------

// `iters` damped Newton steps p <- clamp(p - clamp(J^-1 (map(p) - u), +-4 voxels), -1, 1) in place,
// with two early exits, invisible at the reference's tolerances:
// * a step that leaves p unchanged (converged to the last bit, or held by the domain clamp) would be
//   repeated by every later step, as a step is a function of p alone: stopping gives the same p;
// * after a step of at most kConvergedStepEps epsilons, quadratic convergence has put the error far
//   below rounding and later steps only move p within its rounding noise (measured: <= 4 eps).
//   Without this exit a coordinate-map solve, whose p never settles on one float, always runs `iters`.
template <typename T, bool DISP, typename I>
DA_HD void newton_solve(const T* field, const GridOf<I>& grid, const T u[3], T p[3], int64_t iters) {
  const T converged = T(kConvergedStepEps) * machine_epsilon<T>();
  T max_step[3];
DA_UNROLL
  for (int a = 0; a < 3; ++a) max_step[a] = T(kMaxNewtonStepVoxels) / voxel_scale<T>(grid.size[a]);
  for (int64_t it = 0; it < iters; ++it) {
    T value[3], jac[3][3], residual[3], step[3];
    value_and_jacobian<T, DISP>(field, grid, p, value, jac);
DA_UNROLL
    for (int k = 0; k < 3; ++k) residual[k] = value[k] - u[k];
    solve3(jac, residual, false, T(kSingularForward), step);
    bool moved = false, small = true;
DA_UNROLL
    for (int a = 0; a < 3; ++a) {
      const T next = clamp_to(p[a] - clamp_to(step[a], -max_step[a], max_step[a]), T(-1), T(1));
      moved = moved || !(next == p[a]);
      small = small && std::fabs(step[a]) <= converged;
      p[a] = next;
    }
    if (!moved || small) break;
  }
}

// Whether |map(p) - u| is at most tol target voxels (Euclidean); NaN is never valid. `tol` arrives
// rounded to T, as the reference compares a T residual with it.
template <typename T, bool DISP, typename I>
DA_HD bool is_valid(const T* field, const GridOf<I>& grid, const GridOf<I>& target, const T u[3], const T p[3], T tol) {
  T value[3], jac[3][3];
  value_and_jacobian<T, DISP>(field, grid, p, value, jac);
  T sum = T(0);
DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    const T e = (value[a] - u[a]) * voxel_scale<T>(target.size[a]);
    sum += e * e;
  }
  return std::sqrt(sum) <= tol;
}

// The solution p of target point t of batch item b and the incoming gradient g there, from the forward's
// inverse and the backward's grad, both [n, 3, *target] (DISP: inverse holds p - u, u the point itself).
template <typename T, bool DISP, typename I>
DA_HD void solution_and_grad(const T* grad, const T* inverse, const GridOf<I>& target, I b, I t, T p[3], T g[3]) {
  const I base = b * 3 * target.cells + t;
DA_UNROLL
  for (int k = 0; k < 3; ++k) {
    p[k] = inverse[base + k * target.cells];
    g[k] = grad[base + k * target.cells];
  }
  if (DISP) {
    T u[3];
    identity_point(t, target, u);
DA_UNROLL
    for (int k = 0; k < 3; ++k) p[k] += u[k];
  }
}

// lambda = J(p)^-T g at a solution p. Returns false (the point passes no gradient) where J is
// degenerate, |det J| <= kSingularBackward |J|_F^3.
template <typename T, bool DISP, typename I>
DA_HD bool backward_lambda(const T* field, const GridOf<I>& grid, const T p[3], const T g[3], T lambda[3]) {
  T value[3], jac[3][3];
  value_and_jacobian<T, DISP>(field, grid, p, value, jac);
  return !solve3(jac, g, true, T(kSingularBackward), lambda);
}

// ---- the splatted initial guess of the coordinate-map case ------------------------------------

// The splat pyramid: the target grid, then halved (ceil, at least 2 per axis) while any size exceeds 2.
DA_HD int64_t coarser_size(int64_t size) { return (size + 1) / 2 > 2 ? (size + 1) / 2 : 2; }

DA_HD bool has_coarser(const Grid& grid) { return grid.size[0] > 2 || grid.size[1] > 2 || grid.size[2] > 2; }

DA_HD Grid coarser(const Grid& grid) {
  return make_grid(coarser_size(grid.size[0]), coarser_size(grid.size[1]), coarser_size(grid.size[2]));
}

// Cell of normalised target coordinate x along axis a of a splat level (the reference's splat: voxel
// position clamped to [-2, size+1], unclamped floor cell). False for NaN, which the kernels drop.
template <typename T, typename I>
DA_HD bool splat_cell(T x, const GridOf<I>& level, int a, I& low, T& frac) {
  const T v = voxel_position(x, level.size[a]);
  if (is_nan(v)) return false;
  cell_of(clamp_to(v, T(-2), T(level.size[a] + 1)), level.size[a], false, low, frac);
  return true;
}

// The 8 corners a source point at normalised target position x splats into (inside[j]: that corner
// exists in the level) and the cell's lowest corner `low` (possibly outside the level); false for NaN
// positions.
template <typename T, typename I>
DA_HD bool splat_corners(const T x[3], const GridOf<I>& level, Corners<T, I>& corners, I low[3]) {
  T frac[3];
DA_UNROLL
  for (int a = 0; a < 3; ++a) {
    if (!splat_cell(x[a], level, a, low[a], frac[a])) return false;
  }
  trilinear_corners(low, frac, level.size, corners);
  return true;
}

// Cell of node i of a level of `size` nodes in the next coarser level of `coarse` nodes, as
// F.interpolate(mode="trilinear", align_corners=True) upsamples coarse -> size.
template <typename T, typename I>
DA_HD void upsample_cell(I i, I size, I coarse, I& low, T& frac) {
  const T x = T(coarse - 1) / T(size - 1) * T(i);
  T base = std::floor(x);
  base = base < T(coarse - 2) ? base : T(coarse - 2);
  low = static_cast<I>(base);
  frac = x - base;
}

// Guess at node t of a level from its accumulators acc ([cells, 4]: per node the splatted weight, then
// the weighted sums of the 3 source coordinates) and the next coarser level's guess ([3, coarse cells]):
// the splatted mean where its weight is trusted, else the coarser guess upsampled; the coarsest level
// (coarse_guess == nullptr) takes the mean where any weight arrived, else 0.
template <typename T, typename I>
DA_HD void resolve_guess(const T* acc, const GridOf<I>& level, const T* coarse_guess, const GridOf<I>& coarse, I t,
                         T guess[3]) {
  const T* node = acc + 4 * t;
  const T weight = node[0];
  const T norm = weight > T(kWeightFloor) ? weight : T(kWeightFloor);
  bool trusted = weight > T(0);
  T fallback[3] = {T(0), T(0), T(0)};
  if (coarse_guess != nullptr) {
    trusted = weight > T(kSplatWeightTrusted);
    if (!trusted) {
      I index[3], low[3];
      T frac[3];
      unflatten(t, level, index);
DA_UNROLL
      for (int a = 0; a < 3; ++a) upsample_cell(index[a], level.size[a], coarse.size[a], low[a], frac[a]);
      Corners<T, I> corners;
      trilinear_corners(low, frac, coarse.size, corners);
DA_UNROLL
      for (int j = 0; j < 8; ++j) {
DA_UNROLL
        for (int k = 0; k < 3; ++k) fallback[k] += corners.weight[j] * coarse_guess[k * coarse.cells + corners.index[j]];
      }
    }
  }
DA_UNROLL
  for (int k = 0; k < 3; ++k) guess[k] = trusted ? node[k + 1] / norm : fallback[k];
}

}  // namespace inversion
}  // namespace deepatlas_fast
