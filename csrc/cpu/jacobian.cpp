// CPU kernels of jacobian_det / jacobian_var, forward and backward. Semantics:
// deepatlas_fast/reference/jacobian.py; per-voxel math: include/deepatlas_fast/jacobian.h.
//
// Rows of W voxels are the unit of work: the two border voxels of a row apart, the interior loop has
// constant stencil offsets and vectorises.
// * jacobian_det: one pass over rows, det written directly.
// * jacobian_var: one pass computing (count, mean, M2, folds) per chunk of rows, row by row (two-pass per
//   row in a W-sized scratch), merged with Chan's formula. The chunks are a fixed partition of each batch
//   element (independent of the thread count) merged in order, so the result is bitwise reproducible
//   for any number of threads. The det volume is never stored.
// * backward: a gather (no atomics). Each task walks its planes in order with a ring of three planes
//   holding U[k][j] = g cof0[k][j] / (hi - lo)_j (jacobian.h), so the Jacobian of each voxel is computed
//   once (plus two halo planes per task) and the gather reads six neighbours of U. Scratch: 27 H*W values
//   per thread.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/jacobian.h"
#include "deepatlas_fast/jacobian_host.h"
#include "deepatlas_fast/jacobian_tile.h"

namespace deepatlas_fast {
namespace {

using namespace jacobian;

// On the row driver and its per-voxel lambdas, for the reason given at DA_HD_INLINE (jacobian.h).
#define DA_ALWAYS_INLINE __attribute__((always_inline))

constexpr int64_t kChunkVoxels = 16384;  // voxels per statistics chunk (fixed: determinism)
constexpr int64_t kTaskVoxels = 32768;   // minimum voxels per parallel task
constexpr int kUComponents = 9;          // U[k][j] planes in the backward's ring

int64_t tasks_grain(int64_t voxels_per_item) { return std::max<int64_t>(1, kTaskVoxels / voxels_per_item); }

// fn(w, stencil) for each voxel of row (d, h): the border voxels apart, so that the interior loop's
// stencil is a loop constant (offsets -1 / +1 along W, factor 1/2) and the loop vectorises.
template <typename T, typename Fn>
inline DA_ALWAYS_INLINE void for_each_in_row(const Geometry& g, int64_t d, int64_t h, Fn&& fn) {
  const int64_t W = g.size[2];
  VoxelStencil<T> s;
  set_axis(s, 0, d, g.size[0], g.plane);
  set_axis(s, 1, h, g.size[1], W);
  set_axis(s, 2, 0, W, 1);
  fn(int64_t(0), s);
  set_axis(s, 2, 1, W, 1);
  if (W > 2) {
    const VoxelStencil<T> inner = s;
    // the callers write only outputs and scratch, never the field they read: no loop-carried dependence
#pragma GCC ivdep
    for (int64_t w = 1; w < W - 1; ++w) fn(w, inner);
  }
  set_axis(s, 2, W - 1, W, 1);
  fn(W - 1, s);
}

// ---------------------------------------------------------------------------------------------------
// forward

template <typename T>
void det_rows(const T* field, T* det, const Geometry& g, T s) {
  const int64_t D = g.size[0], H = g.size[1], W = g.size[2];
  at::parallel_for(0, g.n * D * H, tasks_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (D * H), d = (r / H) % D, h = r % H;
      const T* f = field + b * 3 * g.voxels;
      const int64_t row = (d * H + h) * W;
      T* out = det + b * g.voxels + row;
      for_each_in_row<T>(g, d, h, [&](int64_t w, const VoxelStencil<T>& st) DA_ALWAYS_INLINE {
        out[w] = s * det_at(f, g.voxels, row + w, st);
      });
    }
  });
}

struct Partial {
  Moments moments;
  int64_t folds;  // voxels with det <= 0
};

// Moments of one row of determinants, two-pass, with four accumulators (a fixed order: deterministic).
template <typename T>
Partial row_partial(const T* x, int64_t n) {
  double acc[4] = {0, 0, 0, 0};
  int64_t folds = 0, i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) acc[l] += double(x[i + l]);
  }
  for (; i < n; ++i) acc[0] += double(x[i]);
  const double mean = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / double(n);
  double sq[4] = {0, 0, 0, 0};
  for (i = 0; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) {
      const double dev = double(x[i + l]) - mean;
      sq[l] += dev * dev;
    }
  }
  for (; i < n; ++i) sq[0] += (double(x[i]) - mean) * (double(x[i]) - mean);
  for (i = 0; i < n; ++i) folds += x[i] <= T(0);
  return Partial{Moments{double(n), mean, (sq[0] + sq[1]) + (sq[2] + sq[3])}, folds};
}

// Per batch element: moments of the scaled det over all voxels and the folding count. The rows of each
// batch element are cut into fixed chunks (kChunkVoxels); chunks run in parallel and merge in order.
template <typename T>
std::vector<Partial> batch_statistics(const T* field, const Geometry& g, T s) {
  const int64_t D = g.size[0], H = g.size[1], W = g.size[2];
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkVoxels / W);
  const int64_t chunks = (D * H + rows_per_chunk - 1) / rows_per_chunk;  // per batch element
  std::vector<Partial> partials(g.n * chunks);
  at::parallel_for(0, g.n * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> det(W);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks, first = (c % chunks) * rows_per_chunk;
      const T* f = field + b * 3 * g.voxels;
      Partial chunk{Moments{0, 0, 0}, 0};
      for (int64_t r = first; r < std::min(first + rows_per_chunk, D * H); ++r) {
        const int64_t d = r / H, h = r % H, row = r * W;
        for_each_in_row<T>(g, d, h, [&](int64_t w, const VoxelStencil<T>& st) DA_ALWAYS_INLINE {
          det[w] = s * det_at(f, g.voxels, row + w, st);
        });
        const Partial p = row_partial(det.data(), W);
        chunk.moments = merge_moments(chunk.moments, p.moments);
        chunk.folds += p.folds;
      }
      partials[c] = chunk;
    }
  });
  std::vector<Partial> out(g.n, Partial{Moments{0, 0, 0}, 0});
  for (int64_t b = 0; b < g.n; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      out[b].moments = merge_moments(out[b].moments, partials[b * chunks + c].moments);
      out[b].folds += partials[b * chunks + c].folds;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// backward

// U[k][j] (jacobian.h) of plane d of one batch element into u: nine components of H*W values each.
// g = a * det0 + b (AFFINE) or a * x (x: the incoming det-map gradient of that batch element).
template <typename T, bool AFFINE>
void weighted_plane(const T* f, const T* x, T a, T b, const Geometry& g, int64_t d, T* u) {
  const int64_t H = g.size[1], W = g.size[2];
  for (int64_t h = 0; h < H; ++h) {
    const int64_t row = (d * H + h) * W;
    T* out = u + h * W;
    for_each_in_row<T>(g, d, h, [&](int64_t w, const VoxelStencil<T>& st) DA_ALWAYS_INLINE {
      T v[3][3];
      weighted_cofactors<T, AFFINE>(f, g.voxels, row + w, st, a, b, AFFINE ? T(0) : x[row + w], v);
      for (int k = 0; k < 3; ++k)
        for (int j = 0; j < 3; ++j) out[(k * 3 + j) * g.plane + w] = v[k][j];
    });
  }
}

// The gather of plane d (jacobian.h, gather_gradient) from the U planes at the D taps (u_lo, u_hi, with
// weights td) and of plane d itself (u_mid: the H and W taps). out: the batch element's gradient.
template <typename T>
void gather_plane(const T* u_lo, const T* u_mid, const T* u_hi, const AdjointTaps<T>& td, const Geometry& g,
                  int64_t d, T* out) {
  const int64_t H = g.size[1], W = g.size[2];
  const AdjointTaps<T> first = adjoint_taps<T>(0, W), last = adjoint_taps<T>(W - 1, W);
  for (int64_t h = 0; h < H; ++h) {
    const AdjointTaps<T> th = adjoint_taps<T>(h, H);
    for (int k = 0; k < 3; ++k) {
      const T* d_lo = u_lo + (k * 3 + 0) * g.plane + h * W;
      const T* d_hi = u_hi + (k * 3 + 0) * g.plane + h * W;
      const T* h_lo = u_mid + (k * 3 + 1) * g.plane + th.lo * W;
      const T* h_hi = u_mid + (k * 3 + 1) * g.plane + th.hi * W;
      const T* w_row = u_mid + (k * 3 + 2) * g.plane + h * W;
      T* o = out + k * g.voxels + (d * H + h) * W;
      auto dh_taps = [&](int64_t w) {
        return td.w_lo * d_lo[w] + td.w_hi * d_hi[w] + th.w_lo * h_lo[w] + th.w_hi * h_hi[w];
      };
      o[0] = dh_taps(0) + first.w_lo * w_row[first.lo] + first.w_hi * w_row[first.hi];
      for (int64_t w = 1; w < W - 1; ++w) o[w] = dh_taps(w) + w_row[w - 1] - w_row[w + 1];  // interior taps
      o[W - 1] = dh_taps(W - 1) + last.w_lo * w_row[last.lo] + last.w_hi * w_row[last.hi];
    }
  }
}

// grad_field of batch element b = gather of g(q) cof0(q), g = coef[2b] * (AFFINE ? det0 : x) + coef[2b+1].
template <typename T, bool AFFINE>
void gather_backward(const T* field, const T* x, const std::vector<T>& coef, T* grad_field, const Geometry& g) {
  const int64_t D = g.size[0];
  at::parallel_for(0, g.n * D, tasks_grain(g.plane), [&](int64_t begin, int64_t end) {
    // ring of three U planes, slot d % 3, tagged with the (batch, plane) they hold
    std::vector<T> ring(3 * kUComponents * g.plane);
    int64_t tag[3] = {-1, -1, -1};
    auto plane = [&](int64_t b, int64_t d) -> const T* {
      const int slot = int(d % 3);
      T* u = ring.data() + slot * kUComponents * g.plane;
      if (tag[slot] != b * D + d) {
        weighted_plane<T, AFFINE>(field + b * 3 * g.voxels, AFFINE ? nullptr : x + b * g.voxels, coef[2 * b],
                                  coef[2 * b + 1], g, d, u);
        tag[slot] = b * D + d;
      }
      return u;
    };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / D, d = i % D;
      const AdjointTaps<T> td = adjoint_taps<T>(d, D);
      const T* u_lo = plane(b, td.lo);
      const T* u_mid = plane(b, d);
      const T* u_hi = plane(b, td.hi);
      gather_plane(u_lo, u_mid, u_hi, td, g, d, grad_field + b * 3 * g.voxels);
    }
  });
}

// The CUDA kernel's tiled backward (jacobian_tile.h) run serially, unit after unit (units in parallel), for
// the raw *_backward_tiled ops: they exist so that the CPU tests check the code the GPU runs.
template <typename T, bool AFFINE>
void tiled_backward(const T* field, const T* x, const std::vector<T>& coef, T* grad_field, const Geometry& g) {
  const tile::Units units = tile::units_of(g);
  const int64_t per_item = units.tiles() * units.runs;
  at::parallel_for(0, g.n * per_item, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(tile::kScratchElements);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / per_item, run = i % per_item / units.tiles(), t = i % units.tiles();
      const int64_t p0 = run * tile::kPlanesPerUnit, p1 = std::min(p0 + tile::kPlanesPerUnit, g.size[0]);
      tile::backward_unit<T, AFFINE>(SerialExec{}, scratch.data(), field + b * 3 * g.voxels,
                                     AFFINE ? nullptr : x + b * g.voxels, coef[2 * b], coef[2 * b + 1],
                                     grad_field + b * 3 * g.voxels, g, t / units.x, t % units.x, p0, p1);
    }
  });
}

// The backward of batch element b from g = coef[2b] * (AFFINE ? det0 : x) + coef[2b+1]: the cpu backend's
// ring of planes, or the CUDA kernel's tiles (TILED).
template <typename T, bool AFFINE, bool TILED>
void backward(const T* field, const T* x, const std::vector<T>& coef, T* grad_field, const Geometry& g) {
  if (TILED) {
    tiled_backward<T, AFFINE>(field, x, coef, grad_field, g);
  } else {
    gather_backward<T, AFFINE>(field, x, coef, grad_field, g);
  }
}

// ---------------------------------------------------------------------------------------------------
// ops

at::Tensor jacobian_det(const at::Tensor& field, std::optional<at::ArrayRef<double>> scale) {
  const Geometry g = check_field(field);
  const double s = scale_factor(scale);
  at::Tensor det = new_output({g.n, 1, g.size[0], g.size[1], g.size[2]}, field.options());
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_det", [&] {
    det_rows<scalar_t>(field.const_data_ptr<scalar_t>(), det.mutable_data_ptr<scalar_t>(), g, scalar_t(s));
  });
  return det;
}

template <bool TILED>
at::Tensor det_backward(const at::Tensor& grad, const at::Tensor& field, std::optional<at::ArrayRef<double>> scale) {
  const Geometry g = check_field(field);
  check_det_grad(grad, field, g);
  const double s = scale_factor(scale);
  at::Tensor grad_field = new_output(field.sizes(), field.options());
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_det_backward", [&] {
    std::vector<scalar_t> coef(2 * g.n);
    for (int64_t b = 0; b < g.n; ++b) coef[2 * b] = scalar_t(s), coef[2 * b + 1] = scalar_t(0);
    backward<scalar_t, false, TILED>(field.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), coef,
                                     grad_field.mutable_data_ptr<scalar_t>(), g);
  });
  return grad_field;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobian_var(const at::Tensor& field,
                                                            std::optional<at::ArrayRef<double>> scale,
                                                            bool normalized) {
  const Geometry g = check_field(field);
  const double s = scale_factor(scale);
  at::Tensor var = new_output({}, field.options());
  at::Tensor folding = new_output({}, field.options());
  at::Tensor stats = new_output({g.n, 2}, field.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_var", [&] {
    const std::vector<Partial> partials = batch_statistics(field.const_data_ptr<scalar_t>(), g, scalar_t(s));
    double var_sum = 0, folding_sum = 0;
    for (int64_t b = 0; b < g.n; ++b) {
      var_sum += variance_statistic(partials[b].moments, normalized);
      folding_sum += double(partials[b].folds) / double(g.voxels);
      store_stats(partials[b].moments, stats.mutable_data_ptr<double>() + 2 * b);
    }
    *var.mutable_data_ptr<scalar_t>() = scalar_t(var_sum / double(g.n));
    *folding.mutable_data_ptr<scalar_t>() = scalar_t(folding_sum / double(g.n));
  });
  return {var, folding, stats};
}

template <bool TILED>
at::Tensor var_backward(const at::Tensor& grad_var, const at::Tensor& field, const at::Tensor& stats,
                        std::optional<at::ArrayRef<double>> scale, bool normalized) {
  const Geometry g = check_field(field);
  check_var_grad(grad_var, field);
  check_stats(stats, field, g);
  const double s = scale_factor(scale);
  at::Tensor grad_field = new_output(field.sizes(), field.options());
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_jacobian_var_backward", [&] {
    const double weight = double(*grad_var.const_data_ptr<scalar_t>()) / double(g.n);
    std::vector<scalar_t> coef(2 * g.n);
    for (int64_t b = 0; b < g.n; ++b) {
      double a, c;
      variance_coefficients(stats_moments(stats.const_data_ptr<double>() + 2 * b, g.voxels), normalized, weight, s,
                            a, c);
      coef[2 * b] = scalar_t(a), coef[2 * b + 1] = scalar_t(c);
    }
    backward<scalar_t, true, TILED>(field.const_data_ptr<scalar_t>(), nullptr, coef,
                                    grad_field.mutable_data_ptr<scalar_t>(), g);
  });
  return grad_field;
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_JACOBIAN_IMPL(CPU)
