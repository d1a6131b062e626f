// CPU kernels of sample / warp (trilinear, align_corners=True, border/zeros padding), forward and backward.
// Semantics: deepatlas_fast/reference/sampling.py (= F.grid_sample); per-point math: include/trilinear.h.
//
// Forward: one pass over output points (parallel), corners computed once per point and reused for every channel;
// with several channels, by blocks of kBlock points: the block's corners first, then one channel at a time over the
// block. Backward: the coordinate gradient is a gather in the same pass; the volume gradient is a splat without
// atomics, by tasks of (batch item, channel group, slab of D planes) that each walk every point in order (point by
// point: by blocks, as the forward, it was slower) and add only into their own channels' planes: every voxel sums
// its contributions in point order whatever the tasks, so the result is bitwise the same for any thread count.
// Channel groups are as large as the thread count allows (corners once per group; one group per item also gathers
// the coordinate gradient); slabs split the planes when items x channels are fewer than the threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/sampling_host.h"
#include "deepatlas_fast/trilinear.h"

namespace deepatlas_fast {
namespace {

using namespace sampling;

constexpr int64_t kGrain = 2048;  // points per parallel task
constexpr int64_t kBlock = 128;  // points whose corners a many-channel pass keeps (~25 KB: in L1)

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

// f(zeros, index): the padding as a compile-time constant (no padding branch per point) and the index type,
// int32_t where every flat index of the call fits (fits_int32: cheaper index math, as on CUDA), else int64_t.
template <typename F>
void with_padding_and_index(bool zeros, const Geometry& g, F&& f) {
  const auto with_index = [&](auto padding) {
    if (fits_int32(g)) {
      f(padding, int32_t{});
    } else {
      f(padding, int64_t{});
    }
  };
  if (zeros) {
    with_index(std::true_type{});
  } else {
    with_index(std::false_type{});
  }
}

// Runs body(b, p0, p1) over blocks of at most kBlock points of one batch item, in parallel.
template <typename Body>
void for_each_block(const Geometry& g, const Body& body) {
  const int64_t blocks = (g.points + kBlock - 1) / kBlock;
  at::parallel_for(0, g.n * blocks, (kGrain + kBlock - 1) / kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, p0 = (i % blocks) * kBlock;
      body(b, p0, std::min(g.points, p0 + kBlock));
    }
  });
}

// Many channels: the corners of a block of points first, then one channel at a time over the block, so each
// pass reads one channel's plane and writes one contiguous run of outputs (point by point, every channel's
// plane is read at once: C = 9 at 64^3 barely scaled past one thread).
template <typename T, bool WARP, bool ZEROS, typename I>
void forward_kernel(const T* vol, const T* field, T* out, const Geometry& g) {
  if (g.c == 1) {  // nothing to share between channels: point by point
    for_each_point(g, [&](int64_t b, int64_t p) {
      SamplePoint<T, I> point;
      sample_field_point<T, WARP>(field, g, I(b), I(p), ZEROS, point);
      out[b * g.points + p] = corner_value(vol + b * g.volume, point.corners);
    });
    return;
  }
  for_each_block(g, [&](int64_t b, int64_t p0, int64_t p1) {
    SamplePoint<T, I> block[kBlock];
    for (int64_t p = p0; p < p1; ++p) sample_field_point<T, WARP>(field, g, I(b), I(p), ZEROS, block[p - p0]);
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const T* plane = vol + (b * g.c + ch) * g.volume;
      T* o = out + (b * g.c + ch) * g.points;
      for (int64_t p = p0; p < p1; ++p) o[p] = corner_value(plane, block[p - p0].corners);
    }
  });
}

// Coordinate gradient (gather) over all points; many channels by blocks, as the forward.
template <typename T, bool WARP, bool ZEROS, typename I>
void coordinate_pass(const T* grad, const T* vol, const T* field, T* grad_field, const Geometry& g) {
  if (g.c == 1) {
    for_each_point(g, [&](int64_t b, int64_t p) {
      SamplePoint<T, I> point;
      sample_field_point<T, WARP>(field, g, I(b), I(p), ZEROS, point);
      T d_pos[3] = {0, 0, 0};
      add_position_gradient(vol + b * g.volume, point.corners, grad[b * g.points + p], d_pos);
      T* out = grad_field + b * 3 * g.points + p;
      for (int a = 0; a < 3; ++a) out[a * g.points] = d_pos[a] * point.slope[a];
    });
    return;
  }
  for_each_block(g, [&](int64_t b, int64_t p0, int64_t p1) {
    SamplePoint<T, I> block[kBlock];
    T d_pos[kBlock][3] = {};
    for (int64_t p = p0; p < p1; ++p) sample_field_point<T, WARP>(field, g, I(b), I(p), ZEROS, block[p - p0]);
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const T* plane = vol + (b * g.c + ch) * g.volume;
      const T* up = grad + (b * g.c + ch) * g.points;
      for (int64_t p = p0; p < p1; ++p) add_position_gradient(plane, block[p - p0].corners, up[p], d_pos[p - p0]);
    }
    T* out = grad_field + b * 3 * g.points;
    for (int a = 0; a < 3; ++a)
      for (int64_t p = p0; p < p1; ++p) out[a * g.points + p] = d_pos[p - p0][a] * block[p - p0].slope[a];
  });
}

// How the volume gradient's splat is split: channel groups of `group` channels, each over `slabs` slabs of D
// planes. As few groups per item as keep every thread busy (corners once per group), then slabs when items x
// groups are still fewer than the threads.
struct SplatTasks {
  int64_t group, groups, slabs;
};

SplatTasks splat_tasks(const Geometry& g, int64_t threads) {
  SplatTasks t;
  t.groups = std::min(g.c, std::max<int64_t>(1, (threads + g.n - 1) / std::max<int64_t>(g.n, 1)));
  t.group = (g.c + t.groups - 1) / t.groups;
  t.groups = (g.c + t.group - 1) / t.group;
  const int64_t tasks = g.n * t.groups;
  t.slabs = std::min(g.size[0], std::max<int64_t>(1, (threads + tasks - 1) / std::max<int64_t>(tasks, 1)));
  return t;
}

// Volume gradient by tasks of (batch item, channel group, slab of D planes), points in order, no atomics
// (see the top). With one group and one slab per item the task also gathers the coordinate gradient
// (NEED_COORDS).
template <typename T, bool WARP, bool ZEROS, typename I, bool NEED_COORDS>
void splat(const T* grad, const T* vol, const T* field, T* grad_field, T* grad_vol, const Geometry& g,
           const SplatTasks& tasks) {
  const int64_t per_item = tasks.groups * tasks.slabs, depth = g.size[0];
  at::parallel_for(0, g.n * per_item, 1, [&](int64_t begin, int64_t end) {
    SamplePoint<T, I> point;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_item, group = (task % per_item) / tasks.slabs, slab = task % tasks.slabs;
      const int64_t c0 = group * tasks.group, c1 = std::min(g.c, c0 + tasks.group);
      const int64_t d0 = slab * depth / tasks.slabs, d1 = (slab + 1) * depth / tasks.slabs;
      const bool whole = tasks.slabs == 1;
      for (int64_t p = 0; p < g.points; ++p) {
        if (!whole) {
          const int64_t low = point_low_d<T, WARP>(field, g, I(b), I(p), ZEROS);
          if (low + 1 < d0 || low >= d1) continue;  // touches none of this slab's planes
        }
        sample_field_point<T, WARP>(field, g, I(b), I(p), ZEROS, point);
        const Corners<T, I>& k = point.corners;
        bool mine[8];
        for (int j = 0; j < 8; ++j) {
          const int64_t d = point.low[0] + ((j >> 2) & 1);
          mine[j] = k.inside[j] && (whole || (d >= d0 && d < d1));
        }
        T d_pos[3] = {0, 0, 0};
        for (int64_t ch = c0; ch < c1; ++ch) {
          const T up = grad[(b * g.c + ch) * g.points + p];
          if (NEED_COORDS) add_position_gradient(vol + (b * g.c + ch) * g.volume, k, up, d_pos);
          T* plane = grad_vol + (b * g.c + ch) * g.volume;
          for (int j = 0; j < 8; ++j)
            if (mine[j]) plane[k.index[j]] += up * k.weight[j];
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
    with_padding_and_index(zeros, g, [&](auto padding, auto index) {
      forward_kernel<scalar_t, WARP, decltype(padding)::value, decltype(index)>(
          vol.const_data_ptr<scalar_t>(), field.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g);
    });
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
  const SplatTasks tasks = splat_tasks(g, at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample_backward", [&] {
    using T = scalar_t;
    const T* up = grad.const_data_ptr<T>();
    const T* v = vol.const_data_ptr<T>();
    const T* f = field.const_data_ptr<T>();
    T* gf = need_field ? grad_field.mutable_data_ptr<T>() : nullptr;
    T* gv = need_vol ? grad_vol.mutable_data_ptr<T>() : nullptr;
    with_padding_and_index(zeros, g, [&](auto padding, auto index) {
      constexpr bool Z = decltype(padding)::value;
      using I = decltype(index);
      if (!need_vol) {
        coordinate_pass<T, WARP, Z, I>(up, v, f, gf, g);
      } else if (need_field && tasks.groups == 1 && tasks.slabs == 1) {  // both gradients in one pass
        splat<T, WARP, Z, I, true>(up, v, f, gf, gv, g, tasks);
      } else {
        if (need_field) coordinate_pass<T, WARP, Z, I>(up, v, f, gf, g);
        splat<T, WARP, Z, I, false>(up, v, f, gf, gv, g, tasks);
      }
    });
  });
  return requested_gradients(need_vol, grad_vol, need_field, grad_field);
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_SAMPLING_IMPL(CPU)
