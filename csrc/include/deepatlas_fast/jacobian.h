// Jacobian determinant math (deepatlas_fast/reference/jacobian.py), per voxel, shared by the CPU and CUDA
// kernels: torch.gradient (edge_order=1) differences, cofactors and determinant, the transposed stencil of
// the backward gather, and the moments (count, mean, M2) of the variance with Chan's merge.
//
// J[k][j] = d f_k / d index_j (channel k, axis j in D, H, W order). The determinant is multilinear in the
// rows, so the channel scale enters only as s = prod(scale): det = s * det0 and d det / d f = s * cof0, with
// det0 and cof0 those of the unscaled field.
#pragma once

#include "common.h"

// DA_HD, forced inline on the host too: the CPU kernels' row loops only vectorise once the whole
// per-voxel computation is inlined, which GCC's size heuristics otherwise refuse.
#if defined(__CUDACC__)
#define DA_HD_INLINE DA_HD
#else
#define DA_HD_INLINE inline __attribute__((always_inline))
#endif

namespace deepatlas_fast {

namespace jacobian {

// The shape of a field [n, 3, D, H, W]: size = (D, H, W), plane = H * W, voxels = D * H * W (built by
// jacobian_host.h).
struct Geometry {
  int64_t n, size[3], plane, voxels;
};

}  // namespace jacobian

// torch.gradient stencil at index i of an axis of length n >= 2: (f[hi] - f[lo]) / (hi - lo) with
// lo = max(i-1, 0), hi = min(i+1, n-1); central inside, one-sided at the borders.
template <typename T>
struct AxisStencil {
  int64_t lo, hi;
  T inv;  // 1 / (hi - lo)
};

template <typename T>
DA_HD_INLINE AxisStencil<T> axis_stencil(int64_t i, int64_t n) {
  AxisStencil<T> s;
  s.lo = i > 0 ? i - 1 : 0;
  s.hi = i < n - 1 ? i + 1 : n - 1;
  s.inv = s.hi - s.lo == 2 ? T(0.5) : T(1);
  return s;
}

// The stencil of a voxel in flat offsets relative to the voxel: f_k(hi_j) - f_k(lo_j) is
// f[k * channel_stride + center + hi[j]] - f[k * channel_stride + center + lo[j]].
template <typename T>
struct VoxelStencil {
  int64_t lo[3], hi[3];
  T inv[3];
};

// Sets axis a of the voxel stencil for index i of an axis of length n whose flat stride is stride.
template <typename T>
DA_HD_INLINE void set_axis(VoxelStencil<T>& s, int a, int64_t i, int64_t n, int64_t stride) {
  const AxisStencil<T> axis = axis_stencil<T>(i, n);
  s.lo[a] = (axis.lo - i) * stride;
  s.hi[a] = (axis.hi - i) * stride;
  s.inv[a] = axis.inv;
}

// The stencil of voxel (p[0], p[1], p[2]) of a volume of size[3] (contiguous, W fastest).
template <typename T>
DA_HD_INLINE VoxelStencil<T> voxel_stencil(const int64_t p[3], const int64_t size[3]) {
  VoxelStencil<T> s;
  set_axis(s, 0, p[0], size[0], size[1] * size[2]);
  set_axis(s, 1, p[1], size[1], size[2]);
  set_axis(s, 2, p[2], size[2], int64_t(1));
  return s;
}

// J of the (unscaled) field f (3 channels channel_stride apart) at flat voxel index center.
template <typename T>
DA_HD_INLINE void jacobian_at(const T* f, int64_t channel_stride, int64_t center, const VoxelStencil<T>& s, T J[3][3]) {
DA_UNROLL
  for (int k = 0; k < 3; ++k) {
    const T* fk = f + k * channel_stride + center;
DA_UNROLL
    for (int j = 0; j < 3; ++j) J[k][j] = (fk[s.hi[j]] - fk[s.lo[j]]) * s.inv[j];
  }
}

// Cofactors c[i][j] = d det / d m[i][j] of a 3x3 matrix; returns det (expanded along row 0, the one
// formula every kernel uses, so forward and backward see the same rounding).
template <typename T>
DA_HD_INLINE T cofactors3(const T m[3][3], T c[3][3]) {
  c[0][0] = m[1][1] * m[2][2] - m[1][2] * m[2][1];
  c[0][1] = m[1][2] * m[2][0] - m[1][0] * m[2][2];
  c[0][2] = m[1][0] * m[2][1] - m[1][1] * m[2][0];
  c[1][0] = m[0][2] * m[2][1] - m[0][1] * m[2][2];
  c[1][1] = m[0][0] * m[2][2] - m[0][2] * m[2][0];
  c[1][2] = m[0][1] * m[2][0] - m[0][0] * m[2][1];
  c[2][0] = m[0][1] * m[1][2] - m[0][2] * m[1][1];
  c[2][1] = m[0][2] * m[1][0] - m[0][0] * m[1][2];
  c[2][2] = m[0][0] * m[1][1] - m[0][1] * m[1][0];
  return m[0][0] * c[0][0] + m[0][1] * c[0][1] + m[0][2] * c[0][2];
}

// det0 (unscaled) of the field at a voxel; the unused cofactors are dead code after inlining.
template <typename T>
DA_HD_INLINE T det_at(const T* f, int64_t channel_stride, int64_t center, const VoxelStencil<T>& s) {
  T J[3][3], c[3][3];
  jacobian_at(f, channel_stride, center, s, J);
  return cofactors3(J, c);
}

// --- backward ---------------------------------------------------------------------------------------
// The backward gathers grad_f[k](p) = sum_j sum_q coef_j(q, p) g(q) cof0[k][j](q) over the stencil
// neighbours q of p (the transpose of the difference operator; reference: axis_gradient_adjoint).
// g(q) = a * X(q) + b per batch element: X the incoming det-map gradient (jacobian_det: a = s, b = 0), or
// det0(q) itself (jacobian_var: a, b from the statistics, see variance_coefficients).
//
// With U_j(q) = g(q) cof0[.][j](q) / (hi - lo)_j(q), the contribution of axis j at index i is
// w_lo U_j(lo) + w_hi U_j(hi): U_j(i-1) - U_j(i+1) inside; at a border the missing neighbour's place is
// taken by the voxel itself with the sign of the one-sided difference (i = 0: -U(0) - U(1);
// i = n-1: U(n-2) + U(n-1)). Six taps per voxel, some on p itself at a border.
template <typename T>
struct AdjointTaps {
  int64_t lo, hi;
  T w_lo, w_hi;
};

template <typename T>
DA_HD_INLINE AdjointTaps<T> adjoint_taps(int64_t i, int64_t n) {
  AdjointTaps<T> t;
  t.lo = i > 0 ? i - 1 : i;
  t.w_lo = i > 0 ? T(1) : T(-1);
  t.hi = i < n - 1 ? i + 1 : i;
  t.w_hi = i < n - 1 ? T(-1) : T(1);
  return t;
}

// U[k][j] at a voxel (all nine) with g = a * det0 + b (AFFINE) or a * x (x: the incoming gradient there).
template <typename T, bool AFFINE>
DA_HD_INLINE void weighted_cofactors(const T* f, int64_t channel_stride, int64_t center, const VoxelStencil<T>& s,
                                     T a, T b, T x, T u[3][3]) {
  T J[3][3], c[3][3];
  jacobian_at(f, channel_stride, center, s, J);
  const T det0 = cofactors3(J, c);
  const T g = AFFINE ? a * det0 + b : a * x;
DA_UNROLL
  for (int j = 0; j < 3; ++j) {
    const T weight = g * s.inv[j];
DA_UNROLL
    for (int k = 0; k < 3; ++k) u[k][j] = weight * c[k][j];
  }
}

// The full gather at voxel p (CUDA: one thread per voxel, U recomputed at each tap). column(q, j, u)
// returns U[.][j](q) in u[3].
template <typename T, typename Column>
DA_HD_INLINE void gather_gradient(const int64_t p[3], const int64_t size[3], Column column, T out[3]) {
  out[0] = out[1] = out[2] = T(0);
DA_UNROLL
  for (int j = 0; j < 3; ++j) {
    const AdjointTaps<T> t = adjoint_taps<T>(p[j], size[j]);
    int64_t q[3] = {p[0], p[1], p[2]};
    T u[3];
    q[j] = t.lo;
    column(q, j, u);
DA_UNROLL
    for (int k = 0; k < 3; ++k) out[k] += t.w_lo * u[k];
    q[j] = t.hi;
    column(q, j, u);
DA_UNROLL
    for (int k = 0; k < 3; ++k) out[k] += t.w_hi * u[k];
  }
}

// --- variance ---------------------------------------------------------------------------------------
// Moments of a set of determinants: count, mean and M2 = sum (det - mean)^2, merged with Chan et al.'s
// parallel formula (stable where E[det^2] - E[det]^2 is not). Merging in a fixed order is deterministic.
struct Moments {
  double count, mean, m2;
};

DA_HD Moments merge_moments(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const double count = a.count + b.count;
  const double delta = b.mean - a.mean;
  const double weight = b.count / count;
  return Moments{count, a.mean + delta * weight, a.m2 + b.m2 + delta * delta * a.count * weight};
}

// jacobian_var's stats row of a batch element (mean, population variance of the scaled det: the forward's
// third output, which the backward takes) from its moments, and back.
DA_HD void store_stats(const Moments& m, double* row) {
  row[0] = m.mean;
  row[1] = m.m2 / m.count;
}

DA_HD Moments stats_moments(const double* row, int64_t voxels) {
  return Moments{double(voxels), row[0], row[1] * double(voxels)};
}

constexpr double kNormalizeFloor = 1e-12;  // reference NORMALIZE_FLOOR: floor of mean(det)^2

// The per-batch variance statistic of jacobian_var: M2 / voxels, divided by max(mean^2, floor) when normalized.
DA_HD double variance_statistic(const Moments& m, bool normalized) {
  const double var = m.m2 / m.count;
  if (!normalized) return var;
  const double square = m.mean * m.mean;
  return var / (square > kNormalizeFloor ? square : kNormalizeFloor);
}

// g(det) = d (weight * variance_statistic) / d det = alpha * det + beta for one batch element
// (reference jacobian_var_backward), returned as the coefficients (a, b) of g in terms of the unscaled
// det0 = det / s, including the chain factor s of d det / d f: g_field = (a det0 + b) cof0.
DA_HD void variance_coefficients(const Moments& m, bool normalized, double weight, double s, double& a, double& b) {
  const double voxels = m.count;
  double alpha = 2 * weight / voxels;
  double beta = -alpha * m.mean;
  if (normalized) {
    const double square = m.mean * m.mean;
    const double q = square > kNormalizeFloor ? square : kNormalizeFloor;
    const double var = m.m2 / voxels;
    alpha /= q;
    beta = beta / q - (square >= kNormalizeFloor ? weight * var / (q * q) * (2 * m.mean / voxels) : 0.0);
  }
  a = alpha * s * s;
  b = beta * s;
}

}  // namespace deepatlas_fast
