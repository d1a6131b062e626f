// CPU kernels of sample / warp (trilinear, align_corners=True, border/zeros padding), forward and backward.
// Semantics: deepatlas_fast/reference/sampling.py (= F.grid_sample); per-point math: include/trilinear.h.
//
// Forward: one pass over output points (parallel), corners computed once per point and reused for every
// channel. Backward: the coordinate gradient is a gather in the same pass; the volume gradient is a splat,
// by (batch item, channel group) tasks in point order when there are enough planes for the threads (or
// when torch.use_deterministic_algorithms(True): bitwise reproducible, whatever the grouping), the groups
// as large as the thread count allows (corners once per group; one group per item also gathers the
// coordinate gradient), else over points with atomic adds.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/trilinear.h"

namespace deepatlas_fast {
namespace {

using namespace sampling;

constexpr int64_t kGrain = 2048;  // points per parallel task

// Runs body(b, p) for every point of every batch, in parallel; no division per point.
template <typename Body>
void for_each_point(const Geometry& g, const Body& body) {
  at::parallel_for(0, g.n * g.points, kGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / g.points, p = begin % g.points;
    for (int64_t i = begin; i < end; ++i) {
      body(b, p);
      if (++p == g.points) {
        p = 0;
        ++b;
      }
    }
  });
}

template <typename T, bool WARP>
void forward_kernel(const T* vol, const T* field, T* out, const Geometry& g, bool zeros) {
  for_each_point(g, [&](int64_t b, int64_t p) {
    SamplePoint<T> point;
    sample_field_point<T, WARP>(field, g, b, p, zeros, point);
    const Corners<T>& k = point.corners;
    for (int64_t ch = 0; ch < g.c; ++ch)
      out[(b * g.c + ch) * g.points + p] = corner_value(vol + (b * g.c + ch) * g.volume, k);
  });
}

template <typename T>
inline void atomic_add(T* target, T value) {
  // relaxed CAS loop: the CPU has no native float atomic add
  std::atomic_ref<T> ref(*target);
  T expected = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(expected, expected + value, std::memory_order_relaxed)) {
  }
}

// Coordinate gradient (gather) over all points; with SPLAT_ATOMIC the volume gradient too (atomics).
template <typename T, bool WARP, bool NEED_COORDS, bool SPLAT_ATOMIC>
void point_pass(const T* grad, const T* vol, const T* field, T* grad_field, T* grad_vol, const Geometry& g,
                bool zeros) {
  for_each_point(g, [&](int64_t b, int64_t p) {
    SamplePoint<T> point;
    sample_field_point<T, WARP>(field, g, b, p, zeros, point);
    const Corners<T>& k = point.corners;
    T d_pos[3] = {0, 0, 0};
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const T up = grad[(b * g.c + ch) * g.points + p];
      if (NEED_COORDS) add_position_gradient(vol + (b * g.c + ch) * g.volume, k, up, d_pos);
      if (SPLAT_ATOMIC) {
        T* plane = grad_vol + (b * g.c + ch) * g.volume;
        for (int j = 0; j < 8; ++j)
          if (k.inside[j]) atomic_add(plane + k.index[j], up * k.weight[j]);
      }
    }
    if (NEED_COORDS) {
      T* out = grad_field + b * 3 * g.points + p;
      for (int a = 0; a < 3; ++a) out[a * g.points] = d_pos[a] * point.slope[a];
    }
  });
}

// Volume gradient by tasks of (batch item, group of `group` consecutive channels), points in order: corners
// once per point and task, no atomics; every plane gets its points' contributions in point order whatever
// the grouping (bitwise reproducible). With one group per item (group == c) the task can gather the
// coordinate gradient in the same pass (NEED_COORDS).
template <typename T, bool WARP, bool NEED_COORDS>
void splat_groups(const T* grad, const T* vol, const T* field, T* grad_field, T* grad_vol, const Geometry& g,
                  bool zeros, int64_t group) {
  const int64_t groups = (g.c + group - 1) / group;
  at::parallel_for(0, g.n * groups, 1, [&](int64_t begin, int64_t end) {
    SamplePoint<T> point;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, c0 = (task % groups) * group, c1 = std::min(g.c, c0 + group);
      for (int64_t p = 0; p < g.points; ++p) {
        sample_field_point<T, WARP>(field, g, b, p, zeros, point);
        const Corners<T>& k = point.corners;
        T d_pos[3] = {0, 0, 0};
        for (int64_t ch = c0; ch < c1; ++ch) {
          const T up = grad[(b * g.c + ch) * g.points + p];
          if (NEED_COORDS) add_position_gradient(vol + (b * g.c + ch) * g.volume, k, up, d_pos);
          T* plane = grad_vol + (b * g.c + ch) * g.volume;
          for (int j = 0; j < 8; ++j)
            if (k.inside[j]) plane[k.index[j]] += up * k.weight[j];
        }
        if (NEED_COORDS) {
          T* out = grad_field + b * 3 * g.points + p;
          for (int a = 0; a < 3; ++a) out[a * g.points] = d_pos[a] * point.slope[a];
        }
      }
    }
  });
}

template <bool WARP>
at::Tensor forward(const at::Tensor& vol, const at::Tensor& field, c10::string_view padding) {
  const Geometry g = check_forward(vol, field, WARP);
  const bool zeros = zeros_padding(padding);
  at::Tensor out = new_output({g.n, g.c, g.out_size[0], g.out_size[1], g.out_size[2]}, vol.options());
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample", [&] {
    forward_kernel<scalar_t, WARP>(vol.const_data_ptr<scalar_t>(), field.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), g, zeros);
  });
  return out;
}

template <bool WARP>
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& vol, const at::Tensor& field,
                                 c10::string_view padding, bool need_vol, bool need_field) {
  const Geometry g = check_backward(grad, vol, field, WARP);
  const bool zeros = zeros_padding(padding);
  if (!need_vol && !need_field) return {};
  at::Tensor grad_vol = need_vol ? at::zeros(vol.sizes(), vol.options()) : at::Tensor();
  at::Tensor grad_field = need_field ? new_output(field.sizes(), field.options()) : at::Tensor();
  // The volume gradient in channel groups (no atomics) when there are enough tasks for the threads or
  // determinism is asked for: as few groups per item as keep every thread busy (corners once per group).
  const int64_t threads = at::get_num_threads();
  const bool grouped = at::globalContext().deterministicAlgorithms() || g.n * g.c >= threads;
  const int64_t groups = std::min(g.c, std::max<int64_t>(1, (threads + g.n - 1) / std::max<int64_t>(g.n, 1)));
  const int64_t group = (g.c + groups - 1) / groups;
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample_backward", [&] {
    using T = scalar_t;
    const T* up = grad.const_data_ptr<T>();
    const T* v = vol.const_data_ptr<T>();
    const T* f = field.const_data_ptr<T>();
    T* gf = need_field ? grad_field.mutable_data_ptr<T>() : nullptr;
    T* gv = need_vol ? grad_vol.mutable_data_ptr<T>() : nullptr;
    if (!need_vol) {
      point_pass<T, WARP, true, false>(up, v, f, gf, gv, g, zeros);
    } else if (!grouped) {
      if (need_field) {
        point_pass<T, WARP, true, true>(up, v, f, gf, gv, g, zeros);
      } else {
        point_pass<T, WARP, false, true>(up, v, f, gf, gv, g, zeros);
      }
    } else if (need_field && group == g.c) {  // one group per item: both gradients in one pass
      splat_groups<T, WARP, true>(up, v, f, gf, gv, g, zeros, group);
    } else {
      if (need_field) point_pass<T, WARP, true, false>(up, v, f, gf, gv, g, zeros);
      splat_groups<T, WARP, false>(up, v, f, gf, gv, g, zeros, group);
    }
  });
  return requested_gradients(need_vol, grad_vol, need_field, grad_field);
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SAMPLING_IMPL(CPU)
