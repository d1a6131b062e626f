// CPU kernels of invert / invert_displacement, forward and backward.
// Semantics: deepatlas_fast/reference/inversion.py; per-point math: include/deepatlas_fast/inversion.h.
//
// Forward: the coordinate-map case first splats the source coordinates into every pyramid level
// (coarsest first) and resolves each level's guess but the finest; then one parallel pass over target
// points resolves the finest guess (or starts at -disp), runs the Newton steps and the validity test.
// Backward: per valid point one transposed 3x3 solve, then a splat into the source grid's nodes.
// Both splats are bitwise reproducible for any thread count: a task owns a slab of D planes and walks
// every point in order, adding only into its planes, so each node sums its contributions in point
// order exactly as a serial splat would.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/inversion.h"
#include "deepatlas_fast/inversion_host.h"

namespace deepatlas_fast {
namespace {

using namespace inversion;

constexpr int64_t kGrain = 256;  // target points per parallel task: one Newton solve is ~0.5 us

// ---- forward ----------------------------------------------------------------------------------------

// Adds (w, w * source coordinates) of every source point of one item (coords [3, src]) to the nodes
// of D planes [d_begin, d_end) of one level's accumulators acc [level, 4], in source order.
template <typename T>
void splat_slab(const T* coords, const Grid& src, const Grid& level, int64_t d_begin, int64_t d_end, T* acc) {
  int64_t s = 0;
  for (int64_t i0 = 0; i0 < src.size[0]; ++i0) {
    const T q0 = identity_coordinate<T>(i0, src.size[0]);
    for (int64_t i1 = 0; i1 < src.size[1]; ++i1) {
      const T q1 = identity_coordinate<T>(i1, src.size[1]);
      for (int64_t i2 = 0; i2 < src.size[2]; ++i2, ++s) {
        int64_t low[3];
        T frac[3];
        if (!splat_cell(coords[s], level, 0, low[0], frac[0])) continue;
        if (low[0] + 1 < d_begin || low[0] >= d_end) continue;  // touches none of this task's planes
        if (!splat_cell(coords[src.cells + s], level, 1, low[1], frac[1])) continue;
        if (!splat_cell(coords[2 * src.cells + s], level, 2, low[2], frac[2])) continue;
        const T q[3] = {q0, q1, identity_coordinate<T>(i2, src.size[2])};
        // the 8 corners as nested steps, so that a plane or row outside the level (or this task's
        // planes) is skipped whole; weight = factor_D * factor_H * factor_W as trilinear_corners
        for (int step_d = 0; step_d < 2; ++step_d) {
          const int64_t d = low[0] + step_d;
          if (d < d_begin || d >= d_end) continue;
          const T weight_d = step_d ? frac[0] : T(1) - frac[0];
          for (int step_h = 0; step_h < 2; ++step_h) {
            const int64_t h = low[1] + step_h;
            if (h < 0 || h >= level.size[1]) continue;
            const T weight_dh = weight_d * (step_h ? frac[1] : T(1) - frac[1]);
            for (int step_w = 0; step_w < 2; ++step_w) {
              const int64_t w = low[2] + step_w;
              const T weight = weight_dh * (step_w ? frac[2] : T(1) - frac[2]);
              if (w < 0 || w >= level.size[2] || weight == T(0)) continue;
              T* node = acc + 4 * ((d * level.size[1] + h) * level.size[2] + w);
              node[0] += weight;
              for (int k = 0; k < 3; ++k) node[k + 1] += q[k] * weight;
            }
          }
        }
      }
    }
  }
}

template <typename T>
void splat_level(const T* coords, int64_t n, const Grid& src, const Grid& level, T* acc) {
  const int64_t slabs = std::min<int64_t>(level.size[0], at::get_num_threads());
  at::parallel_for(0, n * slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / slabs, slab = task % slabs;
      splat_slab(coords + b * 3 * src.cells, src, level, slab * level.size[0] / slabs,
                 (slab + 1) * level.size[0] / slabs, acc + b * 4 * level.cells);
    }
  });
}

// One level's guess [n, 3, level] from its accumulators and the coarser level's guess (or none).
template <typename T>
void resolve_level(const T* acc, const Grid& level, const T* coarse, const Grid& coarse_grid, int64_t n, T* guess) {
  at::parallel_for(0, n * level.cells, 4 * kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / level.cells, t = i % level.cells;
      T g[3];
      resolve_guess(acc + b * 4 * level.cells, level, coarse ? coarse + b * 3 * coarse_grid.cells : nullptr,
                    coarse_grid, t, g);
      for (int k = 0; k < 3; ++k) guess[(b * 3 + k) * level.cells + t] = g[k];
    }
  });
}

// The splat pyramid of coords, coarse to fine: returns the finest level's accumulators [n, target, 4]
// and the resolved guess of the next coarser level [n, 3, levels[1]] (undefined for a single level).
template <typename T>
std::pair<at::Tensor, at::Tensor> splat_pyramid(const at::Tensor& coords, const std::vector<Grid>& levels) {
  const int64_t n = coords.size(0);
  const Grid src = spatial_grid(coords);
  at::Tensor coarse;
  for (size_t level = levels.size() - 1;; --level) {
    const Grid& grid = levels[level];
    at::Tensor acc = at::zeros({n, grid.cells, 4}, coords.options());
    splat_level(coords.const_data_ptr<T>(), n, src, grid, acc.mutable_data_ptr<T>());
    if (level == 0) return {acc, coarse};
    at::Tensor guess = new_output({n, 3, grid.cells}, coords.options());
    const Grid& coarse_grid = levels[std::min(level + 1, levels.size() - 1)];
    resolve_level(acc.const_data_ptr<T>(), grid, coarse.defined() ? coarse.const_data_ptr<T>() : nullptr,
                  coarse_grid, n, guess.mutable_data_ptr<T>());
    coarse = guess;
  }
}

// Initial guess, Newton steps and validity at every target point. DISP: field is a displacement on
// the target grid, the guess is -disp and the output is p - u; else the guess is the finest level
// resolved from acc and coarse, and the output is p.
// I: the index type of the per-point math (int32_t where it fits, as on CUDA, so these tests run that code).
template <typename T, bool DISP, typename I>
void solve(const T* field, const Grid& src, const T* acc, const T* coarse, const Grid& coarse_grid,
           const Grid& target, int64_t n, int64_t iters, T tol, T* out, bool* valid) {
  const GridOf<I> src_i = narrow_grid<I>(src), target_i = narrow_grid<I>(target);
  const GridOf<I> coarse_i = narrow_grid<I>(coarse_grid);
  // parallel over rows of W points (no index divisions per point)
  const int64_t rows = target.size[0] * target.size[1], width = target.size[2];
  at::parallel_for(0, n * rows, std::max<int64_t>(1, kGrain / width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows, dh = row % rows;
      const T* item = field + b * 3 * src.cells;
      T u[3] = {identity_coordinate<T>(dh / target.size[1], target.size[0]),
                identity_coordinate<T>(dh % target.size[1], target.size[1]), T(0)};
      for (int64_t w = 0, t = dh * width; w < width; ++w, ++t) {
        u[2] = identity_coordinate<T>(w, width);
        T p[3];
        if (DISP) {
          for (int k = 0; k < 3; ++k) p[k] = u[k] - item[k * src.cells + t];
        } else {
          resolve_guess(acc + b * 4 * target.cells, target_i, coarse ? coarse + b * 3 * coarse_grid.cells : nullptr,
                        coarse_i, static_cast<I>(t), p);
        }
        for (int k = 0; k < 3; ++k) p[k] = clamp_to(p[k], T(-1), T(1));
        newton_solve<T, DISP>(item, src_i, u, p, iters);
        valid[b * target.cells + t] = is_valid<T, DISP>(item, src_i, target_i, u, p, tol);
        for (int k = 0; k < 3; ++k) out[(b * 3 + k) * target.cells + t] = DISP ? p[k] - u[k] : p[k];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> invert(const at::Tensor& coords, at::IntArrayRef out_shape, int64_t iters,
                                          double tol) {
  const Grid target = check_invert(coords, out_shape, iters, tol);
  const Grid src = spatial_grid(coords);
  const int64_t n = coords.size(0);
  const std::vector<Grid> levels = pyramid(target);
  const Grid& coarse_grid = levels[std::min<size_t>(1, levels.size() - 1)];
  const Outputs out = new_outputs(coords, target);
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "deepatlas_fast_invert", [&] {
    using T = scalar_t;
    const auto [acc, coarse] = splat_pyramid<T>(coords, levels);
    const auto run = [&](auto index) {
      solve<T, false, decltype(index)>(coords.const_data_ptr<T>(), src, acc.const_data_ptr<T>(),
                                       coarse.defined() ? coarse.const_data_ptr<T>() : nullptr, coarse_grid, target,
                                       n, iters, T(tol), out.inverse.mutable_data_ptr<T>(),
                                       out.valid.mutable_data_ptr<bool>());
    };
    fits_int32(n, 4, src, target) ? run(int32_t(0)) : run(int64_t(0));
  });
  return {out.inverse, out.valid};
}

std::tuple<at::Tensor, at::Tensor> invert_displacement(const at::Tensor& disp, int64_t iters, double tol) {
  const Grid grid = check_invert_displacement(disp, iters, tol);
  const int64_t n = disp.size(0);
  const Outputs out = new_outputs(disp, grid);
  AT_DISPATCH_FLOATING_TYPES(disp.scalar_type(), "deepatlas_fast_invert_displacement", [&] {
    using T = scalar_t;
    const auto run = [&](auto index) {
      solve<T, true, decltype(index)>(disp.const_data_ptr<T>(), grid, nullptr, nullptr, grid, grid, n, iters, T(tol),
                                      out.inverse.mutable_data_ptr<T>(), out.valid.mutable_data_ptr<bool>());
    };
    fits_int32(n, 3, grid, grid) ? run(int32_t(0)) : run(int64_t(0));
  });
  return {out.inverse, out.valid};
}

// ---- backward ---------------------------------------------------------------------------------------

// out[corners of p] -= w * J(p)^-T g for the valid, non-singular target points of one item whose cell
// touches source D planes [d_begin, d_end), in target order. DISP: inverse holds p - u, the map is id + field.
template <typename T, bool DISP, typename I>
void backward_slab(const T* grad, const T* field, const T* inverse, const bool* valid, const Grid& src,
                   const Grid& target, int64_t d_begin, int64_t d_end, T* out) {
  const GridOf<I> src_i = narrow_grid<I>(src);
  int64_t t = 0;
  for (int64_t i0 = 0; i0 < target.size[0]; ++i0) {
    for (int64_t i1 = 0; i1 < target.size[1]; ++i1) {
      for (int64_t i2 = 0; i2 < target.size[2]; ++i2, ++t) {
        if (!valid[t]) continue;
        T p[3];
        for (int k = 0; k < 3; ++k) p[k] = inverse[k * target.cells + t];
        if (DISP) {
          p[0] += identity_coordinate<T>(i0, target.size[0]);
          p[1] += identity_coordinate<T>(i1, target.size[1]);
          p[2] += identity_coordinate<T>(i2, target.size[2]);
        }
        const int64_t low_d = cell_low_d(p[0], src_i);
        if (low_d + 1 < d_begin || low_d >= d_end) continue;
        const T g[3] = {grad[t], grad[target.cells + t], grad[2 * target.cells + t]};
        T lambda[3];
        if (!backward_lambda<T, DISP>(field, src_i, p, g, lambda)) continue;
        Corners<T, I> corners;
        cell_corners(p, src_i, corners);
        for (int j = 0; j < 8; ++j) {
          const int64_t d = low_d + ((j >> 2) & 1);
          if (d < d_begin || d >= d_end) continue;
          for (int k = 0; k < 3; ++k) out[k * src.cells + corners.index[j]] += -corners.weight[j] * lambda[k];
        }
      }
    }
  }
}

template <bool DISP>
at::Tensor backward(const at::Tensor& grad, const at::Tensor& field, const at::Tensor& inverse,
                    const at::Tensor& valid) {
  const Grid target = check_backward(grad, field, inverse, valid, DISP);
  const Grid src = spatial_grid(field);
  const int64_t n = field.size(0);
  at::Tensor out = at::zeros(field.sizes(), field.options());
  const int64_t slabs = std::min<int64_t>(src.size[0], at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_invert_backward", [&] {
    using T = scalar_t;
    const T* up = grad.const_data_ptr<T>();
    const T* f = field.const_data_ptr<T>();
    const T* inv = inverse.const_data_ptr<T>();
    const bool* ok = valid.const_data_ptr<bool>();
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, n * slabs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / slabs, slab = task % slabs;
        const auto run = [&](auto index) {
          backward_slab<T, DISP, decltype(index)>(up + b * 3 * target.cells, f + b * 3 * src.cells,
                                                  inv + b * 3 * target.cells, ok + b * target.cells, src, target,
                                                  slab * src.size[0] / slabs, (slab + 1) * src.size[0] / slabs,
                                                  o + b * 3 * src.cells);
        };
        fits_int32(1, 3, src, target) ? run(int32_t(0)) : run(int64_t(0));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_INVERSION_IMPL(CPU)
