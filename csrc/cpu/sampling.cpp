// CPU kernels of sample / warp (trilinear, align_corners=True, border/zeros padding), forward and backward.
// Semantics: deepatlas_fast/reference/sampling.py (= F.grid_sample); per-point math: include/trilinear.h.
//
// Forward: one pass over output points (parallel), corners computed once per point and reused for every
// channel. Backward: the coordinate gradient is a gather in the same pass; the volume gradient is a splat,
// run per (batch, channel) plane in point order when there are enough planes for the threads (or when
// torch.use_deterministic_algorithms(True): bitwise reproducible), else over points with atomic adds.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/trilinear.h"

namespace deepatlas_fast {
namespace {

constexpr int64_t kGrain = 2048;  // points per parallel task

struct Geometry {
  int64_t n, c, size[3], volume, points, out_size[3];
};

Geometry geometry(const at::Tensor& vol, const at::Tensor& field) {
  Geometry g;
  g.n = vol.size(0);
  g.c = vol.size(1);
  g.volume = 1;
  g.points = 1;
  for (int a = 0; a < 3; ++a) {
    g.size[a] = vol.size(2 + a);
    g.out_size[a] = field.size(2 + a);
    g.volume *= g.size[a];
    g.points *= g.out_size[a];
  }
  return g;
}

bool zeros_padding(c10::string_view padding) {
  TORCH_CHECK(padding == "zeros" || padding == "border", "deepatlas_fast: padding must be 'border' or 'zeros'");
  return padding == "zeros";
}

// Coordinates of point p of batch b: the field itself (sample) or identity + displacement (warp).
template <typename T, bool WARP>
inline void point_coords(const T* field, const Geometry& g, int64_t b, int64_t p, T coord[3]) {
  const T* base = field + b * 3 * g.points + p;
  for (int a = 0; a < 3; ++a) coord[a] = base[a * g.points];
  if (WARP) {
    const int64_t w = p % g.out_size[2], h = (p / g.out_size[2]) % g.out_size[1], d = p / (g.out_size[1] * g.out_size[2]);
    coord[0] += identity_coordinate<T>(d, g.out_size[0]);
    coord[1] += identity_coordinate<T>(h, g.out_size[1]);
    coord[2] += identity_coordinate<T>(w, g.out_size[2]);
  }
}

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
    T coord[3];
    point_coords<T, WARP>(field, g, b, p, coord);
    sample_point(coord, g.size, zeros, point);
    const Corners<T>& k = point.corners;
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const T* plane = vol + (b * g.c + ch) * g.volume;
      T acc = 0;
      for (int j = 0; j < 8; ++j) acc += k.inside[j] ? plane[k.index[j]] * k.weight[j] : T(0);
      out[(b * g.c + ch) * g.points + p] = acc;
    }
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
    T coord[3];
    point_coords<T, WARP>(field, g, b, p, coord);
    sample_point(coord, g.size, zeros, point);
    const Corners<T>& k = point.corners;
    T d_pos[3] = {0, 0, 0};
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const T up = grad[(b * g.c + ch) * g.points + p];
      if (NEED_COORDS) {
        const T* plane = vol + (b * g.c + ch) * g.volume;
        T dot[3] = {0, 0, 0};
        for (int j = 0; j < 8; ++j) {
          if (!k.inside[j]) continue;
          const T v = plane[k.index[j]];
          dot[0] += v * k.d_weight[j][0];
          dot[1] += v * k.d_weight[j][1];
          dot[2] += v * k.d_weight[j][2];
        }
        for (int a = 0; a < 3; ++a) d_pos[a] += up * dot[a];
      }
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

// Volume gradient one (batch, channel) plane per task, points in order: no atomics, reproducible.
template <typename T, bool WARP>
void plane_splat(const T* grad, const T* field, T* grad_vol, const Geometry& g, bool zeros) {
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    SamplePoint<T> point;
    for (int64_t plane_id = begin; plane_id < end; ++plane_id) {
      const int64_t b = plane_id / g.c;
      T* plane = grad_vol + plane_id * g.volume;
      const T* up = grad + plane_id * g.points;
      for (int64_t p = 0; p < g.points; ++p) {
        T coord[3];
        point_coords<T, WARP>(field, g, b, p, coord);
        sample_point(coord, g.size, zeros, point);
        const Corners<T>& k = point.corners;
        for (int j = 0; j < 8; ++j)
          if (k.inside[j]) plane[k.index[j]] += up[p] * k.weight[j];
      }
    }
  });
}

template <bool WARP>
at::Tensor forward(const at::Tensor& vol, const at::Tensor& field, c10::string_view padding) {
  check_input(vol, "vol", 5);
  check_input(field, WARP ? "disp" : "coords", 5);
  check_same_dtype(vol, "vol", field, WARP ? "disp" : "coords");
  const bool zeros = zeros_padding(padding);
  const Geometry g = geometry(vol, field);
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
  check_input(grad, "grad", 5);
  check_input(vol, "vol", 5);
  check_input(field, WARP ? "disp" : "coords", 5);
  check_same_dtype(vol, "vol", field, WARP ? "disp" : "coords");
  check_same_dtype(vol, "vol", grad, "grad");
  const bool zeros = zeros_padding(padding);
  const Geometry g = geometry(vol, field);
  std::vector<at::Tensor> grads;
  if (!need_vol && !need_field) return grads;
  at::Tensor grad_vol = need_vol ? at::zeros(vol.sizes(), vol.options()) : at::Tensor();
  at::Tensor grad_field = need_field ? new_output(field.sizes(), field.options()) : at::Tensor();
  const bool by_plane = at::globalContext().deterministicAlgorithms() || g.n * g.c >= at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "deepatlas_fast_sample_backward", [&] {
    using T = scalar_t;
    const T* up = grad.const_data_ptr<T>();
    const T* v = vol.const_data_ptr<T>();
    const T* f = field.const_data_ptr<T>();
    T* gf = need_field ? grad_field.mutable_data_ptr<T>() : nullptr;
    T* gv = need_vol ? grad_vol.mutable_data_ptr<T>() : nullptr;
    if (need_field) {
      if (need_vol && !by_plane) {
        point_pass<T, WARP, true, true>(up, v, f, gf, gv, g, zeros);
      } else {
        point_pass<T, WARP, true, false>(up, v, f, gf, gv, g, zeros);
      }
    } else if (!by_plane) {
      point_pass<T, WARP, false, true>(up, v, f, gf, gv, g, zeros);
    }
    if (need_vol && by_plane) plane_splat<T, WARP>(up, f, gv, g, zeros);
  });
  if (need_vol) grads.push_back(grad_vol);
  if (need_field) grads.push_back(grad_field);
  return grads;
}

}  // namespace
}  // namespace deepatlas_fast

TORCH_LIBRARY_IMPL(deepatlas_fast_C, CPU, m) {
  m.impl("sample", &deepatlas_fast::forward<false>);
  m.impl("sample_backward", &deepatlas_fast::backward<false>);
  m.impl("warp", &deepatlas_fast::forward<true>);
  m.impl("warp_backward", &deepatlas_fast::backward<true>);
}
