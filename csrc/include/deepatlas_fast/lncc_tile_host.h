// Host side of the tiled lncc (lncc_tile.h), shared by the CUDA op (cuda/lncc_tiled.cu) and its serial CPU
// emulation (cpu/lncc_tiled.cpp): checks, window, frame, the backward's chunks. A Runner runs the units:
//   at::Tensor shifts(a, b, nc)                  [nc][2] channel shifts (shift_sample_index)
//   at::Tensor cover(volume, taps)               [d + h + w] window coverage
//   void forward(volume, taps, plan, map, partials)   every unit; one partial per unit unless map
//   void mean(partials, n, numel, out)           out = -(sum of the partials in order) / numel
//   void adjoints(volume, chunk, taps, plan)     the chunk's buffer planes
//   void combine(volume, chunk, taps, plan, z0, planes, grad_a, grad_b)   gradients at [z0, z0 + planes)
// Runner::kMaxZUnits bounds channels x plane runs (CUDA's grid.z); Runner::check(a) rejects what the
// backend cannot run; a Runner is constructed from a (the CUDA one holds a device guard).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "host.h"
#include "lncc_host.h"
#include "lncc_tile.h"

namespace deepatlas_fast {
namespace lncc {
namespace tile {

// The backward's adjoint buffer holds about this many channel volumes (lncc_host.h's scratch_budget: at
// least kMinScratchElements, whatever the number of channels) ...
constexpr int64_t kBufferVolumes = 2;
constexpr int64_t kMinChunk = 8;  // ... unless its chunks would be thinner than this many planes

struct Problem {
  Options options;
  int64_t nc, d;
  int h, w;
};

inline Problem check_problem(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                             double eps, c10::string_view reduction) {
  const Options o = check_arguments(a, b, kernel_size, kernel, eps, reduction, kMaxKernelSize, "for lncc_tiled");
  TORCH_CHECK(a.size(3) < (int64_t(1) << 30) && a.size(4) < (int64_t(1) << 30),
              "deepatlas_fast: lncc_tiled: planes too large, got shape ", a.sizes());
  return Problem{o, a.size(0) * a.size(1), a.size(2), int(a.size(3)), int(a.size(4))};
}

// The volume, its taps and its frame (shifts and coverage, made by the runner; the tensors the volume
// points into).
template <typename T>
struct Described {
  Volume<T> volume;
  Taps<T> taps;
  at::Tensor shifts, cover;
};

template <typename T, typename Runner>
Described<T> describe(Runner& runner, const Problem& p, const at::Tensor& a, const at::Tensor& b) {
  Described<T> out{};
  Volume<T>& v = out.volume;
  v.a = a.const_data_ptr<T>();
  v.b = b.const_data_ptr<T>();
  v.nc = p.nc;
  v.d = p.d;
  v.h = p.h;
  v.w = p.w;
  v.plane = int64_t(p.h) * p.w;
  v.half = p.options.k / 2;
  for (int j = 0; j < p.options.k; ++j) {
    out.taps.tap[j] = static_cast<T>(window_tap(j, p.options.k, p.options.gaussian));
  }
  v.full = window_total(out.taps.tap, p.options.k);
  v.volume = static_cast<T>(double(v.full) * double(v.full) * double(v.full));
  v.inv_volume = static_cast<T>(1.0 / double(v.volume));
  v.eps = static_cast<T>(p.options.eps);
  out.shifts = runner.shifts(a, b, p.nc);
  out.cover = runner.cover(v, out.taps);
  v.shifts = out.shifts.template const_data_ptr<T>();
  v.cover = out.cover.template const_data_ptr<T>();
  return out;
}

// The forward of a checked problem.
template <typename T, typename Runner>
at::Tensor forward(Runner& runner, const Problem& p, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = new_output(p.options.mean ? at::IntArrayRef{} : a.sizes(), a.options());
  const Described<T> described = describe<T>(runner, p, a, b);
  const Volume<T>& v = described.volume;
  const Taps<T>& taps = described.taps;
  const Plan plan = plan_units(p.nc, p.d, p.h, p.w, Runner::kMaxZUnits);
  if (p.options.mean) {
    const int64_t units = int64_t(plan.tiles_x) * plan.tiles_y * p.nc * plan.runs;
    at::Tensor partials = at::empty({units}, a.options());
    runner.forward(v, taps, plan, nullptr, partials.mutable_data_ptr<T>());
    runner.mean(partials.const_data_ptr<T>(), units, static_cast<T>(a.numel()), out.mutable_data_ptr<T>());
  } else {
    runner.forward(v, taps, plan, out.mutable_data_ptr<T>(), nullptr);
  }
  return out;
}

// The backward of a checked problem (grad checked too), at least one gradient asked for.
template <typename T, typename Runner>
std::vector<at::Tensor> backward(Runner& runner, const Problem& p, const at::Tensor& grad, const at::Tensor& a,
                                 const at::Tensor& b, bool need_a, bool need_b, int64_t grad_div) {
  at::Tensor grad_a = need_a ? new_output(a.sizes(), a.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? new_output(b.sizes(), b.options()) : at::Tensor();
  const Described<T> described = describe<T>(runner, p, a, b);
  const Volume<T>& v = described.volume;
  const Taps<T>& taps = described.taps;
  Chunk<T> ch{};
  ch.needs = {need_a, need_b};
  ch.grad = p.options.mean ? nullptr : grad.const_data_ptr<T>();
  ch.grad_div = grad_div;
  ch.grad_scalar = p.options.mean ? grad.const_data_ptr<T>() : nullptr;
  ch.mean_scale = static_cast<T>(-1.0 / double(a.numel()));
  const int maps = ch.needs.maps();
  const ChunkPlan plan = chunk_plan(p.nc, p.d, v.plane, v.half, maps, scratch_budget(p.d * v.plane, kBufferVolumes),
                                    kMinChunk);
  const at::Tensor buffer = at::empty({plan.group * maps * plan.planes(p.d, v.half) * v.plane}, a.options());
  ch.buffer = buffer.data_ptr<T>();
  const int64_t channel = p.d * v.plane;
  for (int64_t c0 = 0; c0 < p.nc; c0 += plan.group) {
    // channels [c0, c0 + group) as a volume of their own
    Volume<T> group = v;
    group.nc = std::min(plan.group, p.nc - c0);
    group.a += c0 * channel;
    group.b += c0 * channel;
    group.shifts += 2 * c0;
    Chunk<T> gch = ch;
    gch.grad_c0 = c0;
    T* group_grad_a = need_a ? grad_a.mutable_data_ptr<T>() + c0 * channel : nullptr;
    T* group_grad_b = need_b ? grad_b.mutable_data_ptr<T>() + c0 * channel : nullptr;
    for (int64_t z0 = 0; z0 < p.d; z0 += plan.chunk) {
      const int64_t z1 = std::min(p.d, z0 + plan.chunk);
      gch.h0 = std::max<int64_t>(0, z0 - v.half);
      gch.planes = std::min(p.d, z1 + v.half) - gch.h0;
      runner.adjoints(group, gch, taps, plan_units(group.nc, gch.planes, p.h, p.w, Runner::kMaxZUnits));
      runner.combine(group, gch, taps, plan_units(group.nc, z1 - z0, p.h, p.w, Runner::kMaxZUnits), z0, z1 - z0,
                     group_grad_a, group_grad_b);
    }
  }
  return requested_gradients(need_a, grad_a, need_b, grad_b);
}

// The ops' entry points for a backend's Runner<T> (constructed from a; Runner<T>::check(a) runs first):
// the problem is checked once, before the dtype dispatch, so a wrong dtype gets this file's message.
template <template <typename> class Runner>
at::Tensor forward_op(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                      double eps, c10::string_view reduction) {
  const Problem p = check_problem(a, b, kernel_size, kernel, eps, reduction);
  Runner<float>::check(a);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "deepatlas_fast_lncc_tiled", [&] {
    Runner<scalar_t> runner(a);
    out = forward<scalar_t>(runner, p, a, b);
  });
  return out;
}

template <template <typename> class Runner>
std::vector<at::Tensor> backward_op(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                    int64_t kernel_size, c10::string_view kernel, double eps,
                                    c10::string_view reduction, bool need_a, bool need_b) {
  const Problem p = check_problem(a, b, kernel_size, kernel, eps, reduction);
  const int64_t grad_div = check_grad(grad, a, p.options.mean);
  if (!need_a && !need_b) return {};
  Runner<float>::check(a);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "deepatlas_fast_lncc_tiled_backward", [&] {
    Runner<scalar_t> runner(a);
    grads = backward<scalar_t>(runner, p, grad, a, b, need_a, need_b, grad_div);
  });
  return grads;
}

}  // namespace tile
}  // namespace lncc
}  // namespace deepatlas_fast

// Registers lncc_tiled / lncc_tiled_backward for dispatch key KEY with the runner template RUNNER (in
// namespace deepatlas_fast): cpu/lncc_tiled.cpp's SerialRunner, cuda/lncc_tiled.cu's BlockRunner.
#define DEEPATLAS_FAST_LNCC_TILED_IMPL(KEY, RUNNER)                                                   \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {                                                      \
    m.impl("lncc_tiled", &deepatlas_fast::lncc::tile::forward_op<deepatlas_fast::RUNNER>);            \
    m.impl("lncc_tiled_backward", &deepatlas_fast::lncc::tile::backward_op<deepatlas_fast::RUNNER>);  \
  }
