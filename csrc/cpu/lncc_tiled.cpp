// lncc_tiled on the CPU: the CUDA tile algorithm (include/deepatlas_fast/lncc_tile.h) run serially, unit by
// unit (units in parallel), with the same plan, chunks, frame and accumulation dtype as the GPU. It exists
// so that the CPU tests check the code the CUDA kernels run; the CPU backend's lncc is cpu/lncc.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "deepatlas_fast/lncc_tile_host.h"

namespace deepatlas_fast {

using namespace lncc::tile;

// The Runner of lncc_tile_host.h: units one after the other within each worker thread.
template <typename T>
struct SerialRunner {
  static constexpr int64_t kMaxZUnits = std::numeric_limits<int64_t>::max();

  static void check(const at::Tensor&) {}
  explicit SerialRunner(const at::Tensor&) {}

  at::Tensor shifts(const at::Tensor& a, const at::Tensor& b, int64_t nc) {
    at::Tensor out = at::empty({nc * 2}, a.options());
    const int64_t n = a.numel() / nc, samples = lncc::shift_samples(n);
    for (int64_t i = 0; i < nc * 2; ++i) {
      const T* x = (i % 2 == 0 ? a : b).template const_data_ptr<T>() + (i / 2) * n;
      double sum = 0;
      for (int64_t j = 0; j < samples; ++j) sum += double(x[lncc::shift_sample_index(j, n)]);
      out.mutable_data_ptr<T>()[i] = static_cast<T>(sum / double(samples));
    }
    return out;
  }

  at::Tensor cover(const Volume<T>& v, const Taps<T>& taps) {
    at::Tensor out = at::empty({v.d + v.h + v.w}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* c = out.mutable_data_ptr<T>();
    for (int64_t i = 0; i < v.d; ++i) c[i] = lncc::window_coverage(i, v.d, taps.tap, 2 * v.half + 1);
    for (int i = 0; i < v.h; ++i) c[v.d + i] = lncc::window_coverage(int64_t(i), int64_t(v.h), taps.tap, 2 * v.half + 1);
    for (int i = 0; i < v.w; ++i) c[v.d + v.h + i] = lncc::window_coverage(int64_t(i), int64_t(v.w), taps.tap, 2 * v.half + 1);
    return out;
  }

  // unit(exec, tile, u) for every unit of plan over planes [first, first + planes), each with its scratch
  // (z sums for P planes).
  template <int P, typename F>
  void each_unit(const Volume<T>& v, const Plan& plan, int64_t first, int64_t planes, F&& unit) {
    const int64_t tiles = int64_t(plan.tiles_x) * plan.tiles_y, units = tiles * v.nc * plan.runs;
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(scratch_elements(v.half, P));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t tile = i % tiles;
        const Unit u = unit_of(plan, int(tile % plan.tiles_x), int(tile / plan.tiles_x), i / tiles, first, planes);
        unit(i, u, plane_tile(scratch.data(), u.tile_y, u.tile_x, v.h, v.w, v.half, P));
      }
    });
  }

  void forward(const Volume<T>& v, const Taps<T>& taps, const Plan& plan, T* map, T* partials) {
    with_window_and_planes(2 * v.half + 1, [&](auto window, auto planes) {
      constexpr int K = decltype(window)::value, P = decltype(planes)::value;
      each_unit<P>(v, plan, 0, v.d, [&](int64_t i, const Unit& u, const PlaneTile<T>& t) {
        const T partial = forward_unit<K, P>(SerialExec{}, t, v, taps.tap, u.c, u.p0, u.p1, map);
        if (partials) partials[i] = partial;
      });
    });
  }

  void mean(const T* partials, int64_t n, T numel, T* out) {
    T sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += partials[i];
    out[0] = -sum / numel;
  }

  void adjoints(const Volume<T>& v, const Chunk<T>& ch, const Taps<T>& taps, const Plan& plan) {
    with_window_and_planes(2 * v.half + 1, [&](auto window, auto planes) {
      constexpr int K = decltype(window)::value, P = decltype(planes)::value;
      each_unit<P>(v, plan, ch.h0, ch.planes, [&](int64_t, const Unit& u, const PlaneTile<T>& t) {
        adjoint_unit<K, P>(SerialExec{}, t, v, ch, taps.tap, u.c, u.p0, u.p1);
      });
    });
  }

  void combine(const Volume<T>& v, const Chunk<T>& ch, const Taps<T>& taps, const Plan& plan, int64_t z0,
               int64_t planes, T* grad_a, T* grad_b) {
    with_window_and_planes(2 * v.half + 1, [&](auto window, auto z_planes) {
      constexpr int K = decltype(window)::value, P = decltype(z_planes)::value;
      each_unit<P>(v, plan, z0, planes, [&](int64_t, const Unit& u, const PlaneTile<T>& t) {
        if (ch.needs.maps() == kMaxMaps) {
          combine_unit<kMaxMaps, K, P>(SerialExec{}, t, v, ch, taps.tap, u.c, u.p0, u.p1, grad_a, grad_b);
        } else {
          combine_unit<3, K, P>(SerialExec{}, t, v, ch, taps.tap, u.c, u.p0, u.p1, grad_a, grad_b);
        }
      });
    });
  }
};

}  // namespace deepatlas_fast

DEEPATLAS_FAST_LNCC_TILED_IMPL(CPU, SerialRunner)
