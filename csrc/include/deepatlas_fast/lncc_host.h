// Host side of lncc shared by cpu/lncc.cpp and cuda/lncc.cu: the checks of the raw torch.ops.deepatlas_fast_C
// ops (the Python layer validates too) and their options (kernel, kernel_size, eps, reduction).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "host.h"
#include "lncc.h"

namespace deepatlas_fast {
namespace lncc {

// The options of an lncc call, checked.
struct Options {
  int k;          // kernel_size: taps of the window along each axis (odd)
  bool gaussian;  // kernel == "gaussian", else "box"
  bool mean;      // reduction == "mean", else "none"
  double eps;
};

// a and b: 5-D, one dtype, device and shape, not empty; the options. max_kernel_size: the backend's
// limit, named in the message (with limit_note, e.g. "on CUDA") when limit_note is given.
inline Options check_arguments(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                               double eps, c10::string_view reduction, int64_t max_kernel_size,
                               const char* limit_note = nullptr) {
  check_input(a, "a", 5);
  check_input(b, "b", 5);
  check_same_dtype(a, "a", b, "b");
  check_device(b, "b", a, "a");
  TORCH_CHECK(a.sizes() == b.sizes(), "deepatlas_fast: b must have the shape of a ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.numel() > 0, "deepatlas_fast: a must not be empty, got shape ", a.sizes());
  const bool odd = kernel_size >= 1 && kernel_size % 2 == 1 && kernel_size <= max_kernel_size;
  if (limit_note != nullptr) {
    TORCH_CHECK(odd, "deepatlas_fast: kernel_size must be a positive odd integer <= ", max_kernel_size, " ",
                limit_note, ", got ", kernel_size);
  } else {
    TORCH_CHECK(odd, "deepatlas_fast: kernel_size must be a positive odd integer, got ", kernel_size);
  }
  TORCH_CHECK(kernel == "box" || kernel == "gaussian", "deepatlas_fast: kernel must be 'box' or 'gaussian', got '",
              kernel, "'");
  TORCH_CHECK(eps > 0, "deepatlas_fast: eps must be > 0, got ", eps);
  TORCH_CHECK(reduction == "mean" || reduction == "none", "deepatlas_fast: reduction must be 'mean' or 'none', got '",
              reduction, "'");
  return Options{static_cast<int>(kernel_size), kernel == "gaussian", reduction == "mean", eps};
}

// The backward's grad: one element for reduction="mean" (mean), else the shape of a, or [N, 1, D, H, W]: one
// map per item shared by its C channels (the gradient of a channel sum, which autograd would otherwise
// materialise over the channels); a's dtype and device. Returns the divisor that maps a's flat channel
// n * C + c to grad's: C for a shared map, else 1.
inline int64_t check_grad(const at::Tensor& grad, const at::Tensor& a, bool mean) {
  check_same_dtype(a, "a", grad, "grad");
  check_device(grad, "grad", a, "a");
  if (mean) {
    TORCH_CHECK(grad.numel() == 1, "deepatlas_fast: grad must have one element for reduction='mean', got shape ",
                grad.sizes());
    return 1;
  }
  check_input(grad, "grad", 5);
  const bool shared = grad.size(0) == a.size(0) && grad.size(1) == 1 && grad.sizes().slice(2) == a.sizes().slice(2);
  TORCH_CHECK(grad.sizes() == a.sizes() || shared, "deepatlas_fast: grad must have the shape of a ", a.sizes(),
              " or [", a.size(0), ", 1, *a.shape[2:]] (one map shared by the channels), got ", grad.sizes());
  return grad.sizes() == a.sizes() ? 1 : a.size(1);
}

// ---- scratch memory of the chunked passes -----------------------------------------------------------

// The smallest scratch budget, in elements: volumes this small are done whole (no halo recomputation,
// few launches) however many channels they have.
constexpr int64_t kMinScratchElements = int64_t(32) << 20;
// Overrides the budget (elements, > 0): tests force chunks and channel groups on small volumes with it.
constexpr const char* kScratchVariable = "DEEPATLAS_FAST_LNCC_SCRATCH_ELEMENTS";

// The scratch budget of a pass over an input whose channels are `volume` elements each: `volumes` such
// channel volumes, at least kMinScratchElements, whatever the number of channels (the scratch used to grow
// with them: 4 x 18 channel volumes for a pair of 9-channel feature maps, 4.5 GiB at 256^3).
inline int64_t scratch_budget(int64_t volume, int64_t volumes) {
  if (const char* value = std::getenv(kScratchVariable)) {
    char* end = nullptr;
    const long long parsed = std::strtoll(value, &end, 10);
    TORCH_CHECK(end != value && *end == '\0' && parsed > 0, "deepatlas_fast: ", kScratchVariable,
                " must be a positive number of elements, got '", value, "'");
    return parsed;
  }
  return std::max(volumes * volume, kMinScratchElements);
}

// How a pass whose scratch holds `maps` maps per channel, over a chunk's planes plus `halo` planes each
// side, walks nc channels of d planes of `plane` elements within `budget` elements: `group` channels at a
// time, `chunk` planes at a time. Whole channels (no halo) in groups as large as fit; else one channel at a
// time in chunks as deep as fit, at least min_chunk planes (the budget is then exceeded).
struct ChunkPlan {
  int64_t group, chunk;
  // planes a chunk's scratch holds
  int64_t planes(int64_t d, int64_t halo) const { return std::min(d, chunk + 2 * halo); }
};

inline ChunkPlan chunk_plan(int64_t nc, int64_t d, int64_t plane, int64_t halo, int64_t maps, int64_t budget,
                            int64_t min_chunk) {
  const int64_t channel = maps * d * plane;
  if (channel <= budget) return {std::max<int64_t>(1, std::min(nc, budget / channel)), d};
  const int64_t fit = budget / (maps * plane) - 2 * halo;
  return {1, std::min(d, std::max(fit, min_chunk))};
}

}  // namespace lncc
}  // namespace deepatlas_fast

// Registers the ops for dispatch key KEY (CPU or CUDA), one list for both backends: cpu/lncc.cpp and
// cuda/lncc.cu each define lncc_forward and lncc_backward in namespace deepatlas_fast and end with
// DEEPATLAS_FAST_LNCC_IMPL(CPU), resp. (CUDA).
#define DEEPATLAS_FAST_LNCC_IMPL(KEY)                        \
  TORCH_LIBRARY_IMPL(deepatlas_fast_C, KEY, m) {             \
    m.impl("lncc", &deepatlas_fast::lncc_forward);           \
    m.impl("lncc_backward", &deepatlas_fast::lncc_backward); \
  }
