// Per-voxel math of lncc (local normalised cross-correlation), shared by cpu/lncc.cpp and cuda/lncc.cu.
// Semantics: deepatlas_fast/reference/similarity.py (MONAI 1.6). With S[f] the zero-padded window sum of f,
// V = (sum of the taps)^3:
//   cross = S[ab] - S[b] / V * S[a],  var_a = S[a^2] - S[a] / V * S[a]  (likewise var_b)
//   ncc   = cross^2 / (max(var_a, eps) max(var_b, eps))
//
// The kernels sum the moments of the shifted images a' = a - shift_a, b' = b - shift_b (one constant per
// kernel work unit, a typical value of the image) over the in-volume voxels of each window only. The
// zero padding of a is the constant -shift_a in the shifted frame; its share of each sum is added back
// here from the window weight falling outside the volume. cross, var_a and var_b are exactly invariant
// under the shift, and the shifted moments stay small on bright images (a + 1000, CT air at -1000).
#pragma once

#include "deepatlas_fast/common.h"

namespace deepatlas_fast {
namespace lncc {

// Tap j (0 <= j < kernel_size) of the 1-D window along each axis, as reference.window_weights:
// box: 1; gaussian: exp(-x^2 / (2 sigma^2)), x = j - kernel_size / 2, sigma = kernel_size / 3, unnormalised.
DA_HD double window_tap(int j, int kernel_size, bool gaussian) {
  if (!gaussian) return 1.0;
  const double sigma = kernel_size / 3.0;
  const double x = double(j - kernel_size / 2);
  return exp(-0.5 / (sigma * sigma) * (x * x));
}

// The part of the 1-D window sum centred at i that falls inside an axis of n voxels.
template <typename T>
DA_HD T window_coverage(int64_t i, int64_t n, const T* taps, int kernel_size) {
  const int64_t half = kernel_size / 2;
  T total = 0;
  for (int j = 0; j < kernel_size; ++j) {
    const int64_t t = i + j - half;
    if (t >= 0 && t < n) total += taps[j];
  }
  return total;
}

// The sum of the taps: window_coverage of a position whose window lies wholly inside, bit for bit.
template <typename T>
DA_HD T window_total(const T* taps, int kernel_size) {
  T total = 0;
  for (int j = 0; j < kernel_size; ++j) total += taps[j];
  return total;
}

// The window weight falling outside the volume, V - cover_z cover_y cover_x (full = window_total).
// Exactly 0 for a window wholly inside, whatever V's rounding and whatever the compiler fuses: nvcc's
// default multiply-add would leave V's rounding error there, and a constant image a nonzero NCC.
template <typename T>
DA_HD T window_outside(T cover_z, T cover_y, T cover_x, T full, T volume) {
  if (cover_z == full && cover_y == full && cover_x == full) return T(0);
  return volume - cover_z * cover_y * cover_x;
}

// The GPU kernels' shift of one channel of n voxels: the mean of at most kShiftSamples evenly spread
// voxels (shift_sample_index(j, n) for j < shift_samples(n)): only a typical value is needed.
constexpr int64_t kShiftSamples = 1 << 16;

DA_HD int64_t shift_samples(int64_t n) { return n < kShiftSamples ? n : kShiftSamples; }
DA_HD int64_t shift_sample_index(int64_t j, int64_t n) { return j * n / shift_samples(n); }

// Window sums over the in-volume voxels of the shifted moments a', b', a'^2, b'^2, a'b'.
template <typename T>
struct Moments {
  T a, b, aa, bb, ab;
};

// The window's padded sums of a' and b' divided by V, its covariance and variances (before the floor).
template <typename T>
struct WindowStats {
  T mean_a, mean_b, cross, var_a, var_b;
};

// outside = V - (window weight inside the volume): the weight of the padding, where a' = -shift_a.
// inv_volume = 1 / V (a product instead of two divisions per voxel).
template <typename T>
DA_HD WindowStats<T> window_stats(const Moments<T>& s, T outside, T shift_a, T shift_b, T inv_volume) {
  const T sa = s.a - shift_a * outside;
  const T sb = s.b - shift_b * outside;
  const T saa = s.aa + shift_a * shift_a * outside;
  const T sbb = s.bb + shift_b * shift_b * outside;
  const T sab = s.ab + shift_a * shift_b * outside;
  WindowStats<T> st;
  st.mean_a = sa * inv_volume;
  st.mean_b = sb * inv_volume;
  st.cross = sab - st.mean_b * sa;
  st.var_a = saa - st.mean_a * sa;
  st.var_b = sbb - st.mean_b * sb;
  return st;
}

template <typename T>
DA_HD T floored(T var, T eps) {
  return var > eps ? var : eps;
}

template <typename T>
DA_HD T ncc_value(const WindowStats<T>& st, T eps) {
  return st.cross * st.cross / (floored(st.var_a, eps) * floored(st.var_b, eps));
}

// g times the derivatives of ncc with respect to the padded window sums of the shifted moments:
// d/dS[a'b'] = cross, d/dS[a'^2] = aa, d/dS[a'] = a (likewise b). The floor's gradient is 0 where it is
// active (var < eps), as the reference's explicit backward.
template <typename T>
struct Adjoints {
  T cross, a, aa, b, bb;
};

template <typename T>
DA_HD Adjoints<T> ncc_adjoints(const WindowStats<T>& st, T g, T eps) {
  const T fa = floored(st.var_a, eps), fb = floored(st.var_b, eps);
  const T inv_q = T(1) / (fa * fb);  // one division: 1 / fa = fb / q
  const T ncc = st.cross * st.cross * inv_q;
  Adjoints<T> adj;
  adj.cross = 2 * g * st.cross * inv_q;
  adj.aa = st.var_a >= eps ? -g * ncc * fb * inv_q : T(0);
  adj.bb = st.var_b >= eps ? -g * ncc * fa * inv_q : T(0);
  adj.a = -(adj.cross * st.mean_b + 2 * adj.aa * st.mean_a);
  adj.b = -(adj.cross * st.mean_a + 2 * adj.bb * st.mean_b);
  return adj;
}

// The gradient at a voxel of x' (= a' or b', other' the other image) from the window sums W(.) of the
// adjoint maps (a zero-padded symmetric window is its own transpose):
//   grad_x = W(adj.x) + 2 x' W(adj.xx) + other' W(adj.cross).
template <typename T>
DA_HD T input_gradient(T w_x, T w_xx, T w_cross, T x_shifted, T other_shifted) {
  return w_x + 2 * x_shifted * w_xx + other_shifted * w_cross;
}

}  // namespace lncc
}  // namespace deepatlas_fast
