// CUDA kernels of invert / invert_displacement, forward and backward: the Triton version's algorithm
// (kernels/inversion.py) on the per-point math shared with the CPU (include/deepatlas_fast/inversion.h).
//
// * splat_kernel (coordinate maps), one launch per pyramid level: per source point, atomic adds of
//   (w, w * source coordinates) into the 8 nodes around its target position. Coarse levels, whose few
//   nodes every source point hits, get R replicas of the accumulators (block b adds into b % R), summed
//   before use, to keep same-address atomic chains short.
// * resolve_kernel: one level's guess from its accumulators and the coarser guess (every level but the
//   finest, which solve_kernel resolves in registers).
// * solve_kernel: per target point the initial guess, the Newton steps and the validity test.
// * backward_kernel: per valid target point one transposed 3x3 solve, then atomic adds into the 8
//   source nodes of its cell (none for invalid or degenerate points).
// With DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled the pyramid levels and the backward are splatted by tiles in
// shared memory first (cuda/splat_tiled.cu); with =merged the backward's adds are merged within warps first.
// The atomics make the coordinate-map forward and both backwards not bitwise reproducible: under
// torch.use_deterministic_algorithms(True) they raise, as torch's own non-deterministic kernels do.
// No host synchronisation: every launch decision comes from shapes (CUDA-graph capturable).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/inversion.h"
#include "deepatlas_fast/inversion_host.h"
#include "invert_splat.cuh"
#include "warp_merge.cuh"

namespace deepatlas_fast {
namespace {

using namespace inversion;

constexpr int64_t kAtomicsPerAddress = 1024;  // same-address atomics per accumulator replica (as Triton)

__device__ __forceinline__ int64_t point_index() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }

// ---- kernels ----------------------------------------------------------------------------------------

// acc: [n, replicas, level, 4] zeros.
template <typename T>
__global__ void splat_kernel(const T* __restrict__ coords, T* __restrict__ acc, const Grid src, const Grid level,
                             const int replicas) {
  const int64_t s = point_index();
  if (s >= src.cells) return;
  const int64_t b = blockIdx.y;
  const T* item = coords + b * 3 * src.cells + s;
  const T x[3] = {item[0], item[src.cells], item[2 * src.cells]};
  Corners<T> corners;
  int64_t low[3];
  if (!splat_corners(x, level, corners, low)) return;
  T q[3];
  identity_point(s, src, q);
  T* replica = acc + (b * replicas + blockIdx.x % replicas) * 4 * level.cells;
  DA_UNROLL
  for (int j = 0; j < 8; ++j) {
    const T w = corners.weight[j];
    if (!corners.inside[j] || w == T(0)) continue;  // a source on a node (identity-like maps) skips 7 of 8
    T* node = replica + 4 * corners.index[j];
    atomicAdd(node, w);
    DA_UNROLL
    for (int k = 0; k < 3; ++k) atomicAdd(node + k + 1, q[k] * w);
  }
}

// guess: [n, 3, level]; coarse_guess: [n, 3, coarse] or null at the coarsest level.
template <typename T>
__global__ void resolve_kernel(const T* __restrict__ acc, const T* __restrict__ coarse_guess, T* __restrict__ guess,
                               const Grid level, const Grid coarse) {
  const int64_t t = point_index();
  if (t >= level.cells) return;
  const int64_t b = blockIdx.y;
  T g[3];
  resolve_guess(acc + b * 4 * level.cells, level, coarse_guess ? coarse_guess + b * 3 * coarse.cells : nullptr,
                coarse, t, g);
  DA_UNROLL
  for (int k = 0; k < 3; ++k) guess[(b * 3 + k) * level.cells + t] = g[k];
}

// DISP: field is a displacement on the target grid, the guess is -disp and the output p - u; else the
// guess is the finest level resolved from acc and coarse_guess, and the output p. I: int32_t where every flat
// index fits (fits_int32), else int64_t.
template <typename T, bool DISP, typename I>
__global__ void solve_kernel(const T* __restrict__ field, const T* __restrict__ acc,
                             const T* __restrict__ coarse_guess, T* __restrict__ out, bool* __restrict__ valid,
                             const GridOf<I> src, const GridOf<I> target, const GridOf<I> coarse, const int64_t iters,
                             const T tol) {
  const int64_t point = point_index();
  if (point >= target.cells) return;
  const I t = static_cast<I>(point), b = static_cast<I>(blockIdx.y);
  const T* item = field + b * 3 * src.cells;
  T u[3], p[3];
  identity_point(t, target, u);
  if (DISP) {
    DA_UNROLL
    for (int k = 0; k < 3; ++k) p[k] = u[k] - item[k * src.cells + t];
  } else {
    resolve_guess(acc + b * 4 * target.cells, target, coarse_guess ? coarse_guess + b * 3 * coarse.cells : nullptr,
                  coarse, t, p);
  }
  DA_UNROLL
  for (int k = 0; k < 3; ++k) p[k] = clamp_to(p[k], T(-1), T(1));
  newton_solve<T, DISP>(item, src, u, p, iters);
  valid[b * target.cells + t] = is_valid<T, DISP>(item, src, target, u, p, tol);
  DA_UNROLL
  for (int k = 0; k < 3; ++k) out[(b * 3 + k) * target.cells + t] = DISP ? p[k] - u[k] : p[k];
}

// out [n, 3, src] zeros: out[corners of p] -= w * J(p)^-T g. DISP: inverse holds p - u. I as solve_kernel.
// MERGE: the adds that neighbouring lanes share merged first (warp_merge.cuh); every lane with a target point
// takes part in the shuffles, an invalid or degenerate one with no corner inside.
template <typename T, bool DISP, bool MERGE, typename I>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ field,
                                const T* __restrict__ inverse, const bool* __restrict__ valid, T* __restrict__ out,
                                const GridOf<I> src, const GridOf<I> target) {
  const int64_t point = point_index();
  // every thread of a block reaches the ballot: blocks are whole warps (kThreads)
  const unsigned lanes = MERGE ? __ballot_sync(0xffffffffu, point < target.cells) : 0u;
  if (point >= target.cells) return;
  const I t = static_cast<I>(point), b = static_cast<I>(blockIdx.y);
  T* item_out = out + b * 3 * src.cells;
  if constexpr (MERGE) {
    Corners<T, I> corners;
    T lambda[3] = {0, 0, 0};
    bool splats = valid[b * target.cells + t];
    if (splats) {
      T p[3], g[3];
      solution_and_grad<T, DISP>(grad, inverse, target, b, t, p, g);
      splats = backward_lambda<T, DISP>(field + b * 3 * src.cells, src, p, g, lambda);
      cell_corners(p, src, corners);
    }
    if (!splats) {  // no add of its own; nothing to give or take
      DA_UNROLL
      for (int j = 0; j < 8; ++j) corners.inside[j] = false;
      DA_UNROLL
      for (int k = 0; k < 3; ++k) lambda[k] = T(0);
    }
    const WarpMerge merge = WarpMerge::of(corners, lanes);
    DA_UNROLL
    for (int k = 0; k < 3; ++k) merge.add(item_out + k * src.cells, corners, -lambda[k]);
    return;
  }
  if (!valid[b * target.cells + t]) return;
  T p[3], g[3];
  solution_and_grad<T, DISP>(grad, inverse, target, b, t, p, g);
  const T* item = field + b * 3 * src.cells;
  T lambda[3];
  if (!backward_lambda<T, DISP>(item, src, p, g, lambda)) return;
  Corners<T, I> corners;
  cell_corners(p, src, corners);
  DA_UNROLL
  for (int j = 0; j < 8; ++j) {
    DA_UNROLL
    for (int k = 0; k < 3; ++k) atomicAdd(item_out + k * src.cells + corners.index[j], -corners.weight[j] * lambda[k]);
  }
}

// ---- host side --------------------------------------------------------------------------------------

// DEEPATLAS_FAST_CUDA_INVERT_SPLAT selects how the pyramid levels and the backward are splatted: "atomic"
// (splat_kernel, backward_kernel: the default, measured on a GPU), "tiled" (invert_splat_tile.h,
// invert_backward_tile.h: per tile of source, resp. target points in shared memory first; measured slower)
// or "merged" (the atomic pyramid; the backward's adds merged within warps, warp_merge.cuh; opt-in until
// measured). Read at each call.
enum class Splat { kAtomic, kTiled, kMerged };

Splat splat_choice() {
  const char* value = std::getenv("DEEPATLAS_FAST_CUDA_INVERT_SPLAT");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "atomic") == 0) return Splat::kAtomic;
  if (std::strcmp(value, "merged") == 0) return Splat::kMerged;
  TORCH_CHECK(std::strcmp(value, "tiled") == 0, "deepatlas_fast: DEEPATLAS_FAST_CUDA_INVERT_SPLAT must be 'atomic', ",
              "'merged' or 'tiled', got '", value, "'");
  return Splat::kTiled;
}

// The splat pyramid of coords, coarse to fine: the finest level's accumulators [n, target, 4] and the
// resolved guess of the next coarser level [n, 3, levels[1]] (undefined for a single level).
template <typename T>
std::pair<at::Tensor, at::Tensor> splat_pyramid(const at::Tensor& coords, const std::vector<Grid>& levels) {
  const int64_t n = coords.size(0);
  const Grid src = spatial_grid(coords);
  cudaStream_t stream = current_stream();
  const dim3 splat_grid = point_grid(src.cells, n);
  const bool tiled = splat_choice() == Splat::kTiled;
  at::Tensor coarse;
  for (size_t level = levels.size() - 1;; --level) {
    const Grid& grid = levels[level];
    at::Tensor acc;
    if (tiled) {
      acc = at::zeros({n, grid.cells, 4}, coords.options());
      splat_level_tiled<T>(coords.const_data_ptr<T>(), acc.mutable_data_ptr<T>(), n, src, grid, stream);
    } else {
      const int64_t replicas =
          std::max<int64_t>(1, std::min<int64_t>(splat_grid.x, 8 * src.cells / (grid.cells * kAtomicsPerAddress)));
      acc = at::zeros({n, replicas, grid.cells, 4}, coords.options());
      splat_kernel<T><<<splat_grid, kThreads, 0, stream>>>(coords.const_data_ptr<T>(), acc.mutable_data_ptr<T>(),
                                                           src, grid, static_cast<int>(replicas));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      acc = replicas > 1 ? acc.sum(1) : acc.view({n, grid.cells, 4});
    }
    if (level == 0) return {acc, coarse};
    at::Tensor guess = new_output({n, 3, grid.cells}, coords.options());
    const Grid& coarse_grid = levels[std::min(level + 1, levels.size() - 1)];
    resolve_kernel<T><<<point_grid(grid.cells, n), kThreads, 0, stream>>>(
        acc.const_data_ptr<T>(), coarse.defined() ? coarse.const_data_ptr<T>() : nullptr,
        guess.mutable_data_ptr<T>(), grid, coarse_grid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    coarse = guess;
  }
}

std::tuple<at::Tensor, at::Tensor> invert(const at::Tensor& coords, at::IntArrayRef out_shape, int64_t iters,
                                          double tol) {
  const Grid target = check_invert(coords, out_shape, iters, tol);
  const c10::cuda::CUDAGuard guard(coords.device());
  const Grid src = spatial_grid(coords);
  const int64_t n = coords.size(0);
  const std::vector<Grid> levels = pyramid(target);
  const Grid& coarse_grid = levels[std::min<size_t>(1, levels.size() - 1)];
  const Outputs out = new_outputs(coords, target);
  if (n == 0) return {out.inverse, out.valid};
  at::globalContext().alertNotDeterministic("deepatlas_fast invert (atomic splat of the initial guess)");
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "deepatlas_fast_invert", [&] {
    using T = scalar_t;
    const auto [acc, coarse] = splat_pyramid<T>(coords, levels);
    const auto launch = [&](auto index) {
      using I = decltype(index);
      solve_kernel<T, false, I><<<point_grid(target.cells, n), kThreads, 0, current_stream()>>>(
          coords.const_data_ptr<T>(), acc.const_data_ptr<T>(),
          coarse.defined() ? coarse.const_data_ptr<T>() : nullptr, out.inverse.mutable_data_ptr<T>(),
          out.valid.mutable_data_ptr<bool>(), narrow_grid<I>(src), narrow_grid<I>(target),
          narrow_grid<I>(coarse_grid), iters, T(tol));
    };
    fits_int32(n, 4, src, target) ? launch(int32_t(0)) : launch(int64_t(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.inverse, out.valid};
}

std::tuple<at::Tensor, at::Tensor> invert_displacement(const at::Tensor& disp, int64_t iters, double tol) {
  const Grid grid = check_invert_displacement(disp, iters, tol);
  const c10::cuda::CUDAGuard guard(disp.device());
  const int64_t n = disp.size(0);
  const Outputs out = new_outputs(disp, grid);
  if (n == 0) return {out.inverse, out.valid};
  AT_DISPATCH_FLOATING_TYPES(disp.scalar_type(), "deepatlas_fast_invert_displacement", [&] {
    using T = scalar_t;
    const auto launch = [&](auto index) {
      using I = decltype(index);
      const GridOf<I> g = narrow_grid<I>(grid);
      solve_kernel<T, true, I><<<point_grid(grid.cells, n), kThreads, 0, current_stream()>>>(
          disp.const_data_ptr<T>(), nullptr, nullptr, out.inverse.mutable_data_ptr<T>(),
          out.valid.mutable_data_ptr<bool>(), g, g, g, iters, T(tol));
    };
    fits_int32(n, 3, grid, grid) ? launch(int32_t(0)) : launch(int64_t(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.inverse, out.valid};
}

template <bool DISP>
at::Tensor backward(const at::Tensor& grad, const at::Tensor& field, const at::Tensor& inverse,
                    const at::Tensor& valid) {
  const Grid target = check_backward(grad, field, inverse, valid, DISP);
  const c10::cuda::CUDAGuard guard(field.device());
  const Grid src = spatial_grid(field);
  const int64_t n = field.size(0);
  at::Tensor out = at::zeros(field.sizes(), field.options());
  if (n == 0) return out;
  at::globalContext().alertNotDeterministic("deepatlas_fast invert backward (atomic splat)");
  const Splat splat = splat_choice();
  const bool tiled = splat == Splat::kTiled;
  if (tiled) check_backward_tiled(grad, field, inverse, valid, DISP);
  AT_DISPATCH_FLOATING_TYPES(field.scalar_type(), "deepatlas_fast_invert_backward", [&] {
    using T = scalar_t;
    if (tiled) {
      backward_tiled<T, DISP>(grad.const_data_ptr<T>(), field.const_data_ptr<T>(), inverse.const_data_ptr<T>(),
                              valid.const_data_ptr<bool>(), out.mutable_data_ptr<T>(), n, src, target,
                              current_stream());
      return;
    }
    const auto launch = [&](auto index) {
      using I = decltype(index);
      const auto kernel = splat == Splat::kMerged ? backward_kernel<T, DISP, true, I> : backward_kernel<T, DISP, false, I>;
      kernel<<<point_grid(target.cells, n), kThreads, 0, current_stream()>>>(
          grad.const_data_ptr<T>(), field.const_data_ptr<T>(), inverse.const_data_ptr<T>(),
          valid.const_data_ptr<bool>(), out.mutable_data_ptr<T>(), narrow_grid<I>(src), narrow_grid<I>(target));
    };
    fits_int32(n, 3, src, target) ? launch(int32_t(0)) : launch(int64_t(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_INVERSION_IMPL(CUDA)
