// CUDA kernels of lncc (local normalised cross-correlation), forward and backward: the CPU kernels' math
// (include/deepatlas_fast/lncc.h) as separable passes, one kernel per axis, over z-chunks of the volume.
//
// Forward, per chunk of planes: moments_z (z-window sums of the 5 shifted moments straight from a and b)
// -> window_y -> stats (its x-window sums fused in): the NCC map, or per-block partial sums that one block
// adds up in a fixed order at the end (reduction="mean": deterministic, on the device, no host sync).
// Backward, per chunk: the same passes over the chunk's planes plus a halo of h planes each side, then
// adjoints (the 3 or 5 adjoint maps instead of the NCC), window_z -> window_y -> combine (x fused in).
// Everything runs on the current stream without host synchronisation (CUDA-graph capturable) and is
// gather-only (no atomics): bitwise reproducible.
//
// Sums are accumulated in the input dtype, in the frame of each channel's mean (see lncc.h; estimated from a
// subsample). Extra memory: two chunk buffers of 5 maps per channel of a group of channels, sized so that both
// together hold about kBufferVolumes channel volumes, at least lncc_host.h's kMinScratchElements, whatever the
// number of channels (more for volumes thinner than kMinChunk + 2 h planes): the passes walk groups of channels,
// then chunks of planes (lncc::chunk_plan).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/host_cuda.h"
#include "deepatlas_fast/lncc.h"
#include "deepatlas_fast/lncc_host.h"
#include "lncc_common.cuh"

namespace deepatlas_fast {
namespace {

constexpr int kMaxTaps = 63;          // window taps travel as a kernel argument
constexpr int64_t kBufferVolumes = 4;  // the chunk buffers hold about this many channel volumes
constexpr int64_t kMinChunk = 8;       // ... unless the chunks would be thinner than this many planes
constexpr int kMoments = 5;
using lncc_cuda::block_sum;
using lncc_cuda::kBlockX;  // threads along x (coalesced) and y; blocks loop over planes
using lncc_cuda::kBlockY;
using lncc_cuda::kReduceThreads;
constexpr unsigned int kMaxGridZ = 65535;

template <typename T>
struct Window {
  T taps[kMaxTaps];
  int k, half;
  __host__ __device__ const T* data() const { return taps; }
};

struct Dims {
  int64_t nc, d;
  int h, w;
  int64_t plane;
};

// ------------------------------------------------------------------------------------------------ helpers

// The (y, x) a thread handles; slices (channel-planes, int32) are strided over grid.z.
struct Voxel {
  int y, x;
  bool inside;
};

__device__ __forceinline__ Voxel this_voxel(const Dims& s) {
  Voxel v;
  v.x = blockIdx.x * kBlockX + threadIdx.x;
  v.y = blockIdx.y * kBlockY + threadIdx.y;
  v.inside = v.x < s.w && v.y < s.h;
  return v;
}

// Sum over the window taps along x (zero padded) of a row of one slice.
template <typename T>
__device__ __forceinline__ T x_window(const T* __restrict__ row, int x, int w, const Window<T>& win) {
  T sum = 0;
  for (int j = 0; j < win.k; ++j) {
    const int t = x + j - win.half;
    if (t >= 0 && t < w) sum += win.taps[j] * __ldg(row + t);
  }
  return sum;
}

// ------------------------------------------------------------------------------------------------ kernels

// out[c][m][p] = the z-window sums of moment m of planes first + p (p < planes) of channel c.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    moments_z_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ shifts,
                     T* __restrict__ out, Dims s, int64_t first, int64_t planes, Window<T> win) {
  const Voxel v = this_voxel(s);
  if (!v.inside) return;
  const int64_t yx = int64_t(v.y) * s.w + v.x;
  for (int slice = blockIdx.z; slice < int(s.nc * planes); slice += gridDim.z) {
    const int c = slice / int(planes), p = slice - c * int(planes);
    const int64_t z = first + p;
    const T sa = shifts[2 * c], sb = shifts[2 * c + 1];
    T m[kMoments] = {0, 0, 0, 0, 0};
    for (int j = 0; j < win.k; ++j) {
      const int64_t t = z + j - win.half;
      if (t < 0 || t >= s.d) continue;
      const int64_t at = (c * s.d + t) * s.plane + yx;
      const T x = __ldg(a + at) - sa, y = __ldg(b + at) - sb;
      const T wx = win.taps[j] * x, wy = win.taps[j] * y;
      m[0] += wx;
      m[1] += wy;
      m[2] += wx * x;
      m[3] += wy * y;
      m[4] += wx * y;
    }
    DA_UNROLL
    for (int i = 0; i < kMoments; ++i) out[((c * kMoments + i) * planes + p) * s.plane + yx] = m[i];
  }
}

// out = the y-window sums of `slices` planes.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    window_y_kernel(const T* __restrict__ in, T* __restrict__ out, Dims s, int64_t slices, Window<T> win) {
  const Voxel v = this_voxel(s);
  if (!v.inside) return;
  for (int slice = blockIdx.z; slice < int(slices); slice += gridDim.z) {
    const T* column = in + slice * s.plane + v.x;
    T sum = 0;
    for (int j = 0; j < win.k; ++j) {
      const int t = v.y + j - win.half;
      if (t >= 0 && t < s.h) sum += win.taps[j] * __ldg(column + int64_t(t) * s.w);
    }
    out[slice * s.plane + int64_t(v.y) * s.w + v.x] = sum;
  }
}

// out[q][p] = the z-window sums at plane out_first + p of the maps in[q][.] stored for planes
// [in_first, in_first + in_planes), which hold every in-volume plane of those windows.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    window_z_kernel(const T* __restrict__ in, T* __restrict__ out, Dims s, int64_t maps, int64_t in_first,
                    int64_t in_planes, int64_t out_first, int64_t out_planes, Window<T> win) {
  const Voxel v = this_voxel(s);
  if (!v.inside) return;
  const int64_t yx = int64_t(v.y) * s.w + v.x;
  for (int slice = blockIdx.z; slice < int(maps * out_planes); slice += gridDim.z) {
    const int q = slice / int(out_planes), p = slice - q * int(out_planes);
    const int64_t z = out_first + p;
    T sum = 0;
    for (int j = 0; j < win.k; ++j) {
      const int64_t t = z + j - win.half - in_first;
      if (t >= 0 && t < in_planes) sum += win.taps[j] * __ldg(in + (q * in_planes + t) * s.plane + yx);
    }
    out[slice * s.plane + yx] = sum;
  }
}

// The window statistics of chunk planes [first, first + planes), and what becomes of them.
template <typename T>
struct StatsJob {
  const T* sums;    // [nc][5][planes][plane]: z- and y-window sums of the moments (x pass fused here)
  const T* shifts;  // [nc][2]
  const T* cover;   // [d + h + w]
  int64_t first, planes;
  T full, volume, inv_volume, eps;  // full: the sum of the taps
  T* out;  // ncc_map_kernel: the NCC map; ncc_partial_kernel: one partial sum per block; adjoints_kernel:
           // the adjoint maps [nc][maps][planes][plane], [cross, (a, aa), (b, bb)] where needed
  const T* grad;         // adjoints_kernel, "none": the upstream map (of the whole input, not the group)
  int64_t grad_c0, grad_div;  // ... channel c of the group reads its channel (grad_c0 + c) / grad_div
  const T* grad_scalar;  // adjoints_kernel, "mean": the upstream scalar, read on the device
  T mean_scale;          // -1 / numel
  bool need_a, need_b;
  int maps;
};

// The window statistics at (channel c, chunk plane p, y, x).
template <typename T>
__device__ __forceinline__ lncc::WindowStats<T> stats_at(const StatsJob<T>& job, const Dims& s, const Window<T>& win,
                                                         int64_t c, int64_t p, const Voxel& v) {
  const T* rows = job.sums + (c * kMoments * job.planes + p) * s.plane + int64_t(v.y) * s.w;
  const int64_t stride = job.planes * s.plane;
  const lncc::Moments<T> m{x_window(rows, v.x, s.w, win), x_window(rows + stride, v.x, s.w, win),
                           x_window(rows + 2 * stride, v.x, s.w, win), x_window(rows + 3 * stride, v.x, s.w, win),
                           x_window(rows + 4 * stride, v.x, s.w, win)};
  const T outside = lncc::window_outside(job.cover[job.first + p], job.cover[s.d + v.y],
                                         job.cover[s.d + s.h + v.x], job.full, job.volume);
  return lncc::window_stats(m, outside, job.shifts[2 * c], job.shifts[2 * c + 1], job.inv_volume);
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) ncc_map_kernel(StatsJob<T> job, Dims s, Window<T> win) {
  const Voxel v = this_voxel(s);
  if (!v.inside) return;
  for (int slice = blockIdx.z; slice < int(s.nc * job.planes); slice += gridDim.z) {
    const int c = slice / int(job.planes), p = slice - c * int(job.planes);
    const T ncc = lncc::ncc_value(stats_at(job, s, win, c, p, v), job.eps);
    job.out[(c * s.d + job.first + p) * s.plane + int64_t(v.y) * s.w + v.x] = ncc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) ncc_partial_kernel(StatsJob<T> job, Dims s, Window<T> win) {
  const Voxel v = this_voxel(s);
  T partial = 0;
  if (v.inside) {  // no early return: every thread joins block_sum
    for (int slice = blockIdx.z; slice < int(s.nc * job.planes); slice += gridDim.z) {
      const int c = slice / int(job.planes), p = slice - c * int(job.planes);
      partial += lncc::ncc_value(stats_at(job, s, win, c, p, v), job.eps);
    }
  }
  const T total = block_sum(partial);
  if (threadIdx.x == 0 && threadIdx.y == 0) job.out[(int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) adjoints_kernel(StatsJob<T> job, Dims s, Window<T> win) {
  const Voxel v = this_voxel(s);
  if (!v.inside) return;
  const int64_t yx = int64_t(v.y) * s.w + v.x, stride = job.planes * s.plane;
  for (int slice = blockIdx.z; slice < int(s.nc * job.planes); slice += gridDim.z) {
    const int c = slice / int(job.planes), p = slice - c * int(job.planes);
    const T g = job.grad ? job.grad[((job.grad_c0 + c) / job.grad_div * s.d + job.first + p) * s.plane + yx]
                         : job.grad_scalar[0] * job.mean_scale;
    const lncc::Adjoints<T> d = lncc::ncc_adjoints(stats_at(job, s, win, c, p, v), g, job.eps);
    T* out = job.out + (c * job.maps * job.planes + p) * s.plane + yx;
    out[0] = d.cross;
    if (job.need_a) {
      out[stride] = d.a;
      out[2 * stride] = d.aa;
    }
    if (job.need_b) {
      T* out_b = out + (job.need_a ? 2 : 0) * stride;
      out_b[stride] = d.b;
      out_b[2 * stride] = d.bb;
    }
  }
}

// The gradients at planes [first, first + planes) from the z- and y-window sums of the adjoint maps
// (x pass fused here).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    combine_kernel(const T* __restrict__ sums, const T* __restrict__ a, const T* __restrict__ b,
                   const T* __restrict__ shifts, T* __restrict__ grad_a, T* __restrict__ grad_b, Dims s,
                   int64_t first, int64_t planes, int maps, Window<T> win) {
  const Voxel v = this_voxel(s);
  if (!v.inside) return;
  const int64_t yx = int64_t(v.y) * s.w + v.x;
  for (int slice = blockIdx.z; slice < int(s.nc * planes); slice += gridDim.z) {
    const int c = slice / int(planes), p = slice - c * int(planes);
    const int64_t map_stride = planes * s.plane;
    const T* rows = sums + (c * maps * planes + p) * s.plane + int64_t(v.y) * s.w;
    const int64_t voxel = (c * s.d + first + p) * s.plane + yx;
    const T x = a[voxel] - shifts[2 * c], y = b[voxel] - shifts[2 * c + 1];
    const T w_cross = x_window(rows, v.x, s.w, win);
    const T w1 = x_window(rows + map_stride, v.x, s.w, win), w2 = x_window(rows + 2 * map_stride, v.x, s.w, win);
    if (grad_a && grad_b) {
      const T w3 = x_window(rows + 3 * map_stride, v.x, s.w, win);
      const T w4 = x_window(rows + 4 * map_stride, v.x, s.w, win);
      grad_a[voxel] = lncc::input_gradient(w1, w2, w_cross, x, y);
      grad_b[voxel] = lncc::input_gradient(w3, w4, w_cross, y, x);
    } else if (grad_a) {
      grad_a[voxel] = lncc::input_gradient(w1, w2, w_cross, x, y);
    } else {
      grad_b[voxel] = lncc::input_gradient(w1, w2, w_cross, y, x);
    }
  }
}

// ------------------------------------------------------------------------------------------------ host

// The checked options (k, gaussian, mean, eps: lncc_host.h) and the dims.
struct Problem : lncc::Options {
  Dims dims;
};

Problem check_problem(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                      double eps, c10::string_view reduction) {
  const lncc::Options options = lncc::check_arguments(a, b, kernel_size, kernel, eps, reduction, kMaxTaps, "on CUDA");
  // grid.y covers H; slices (channel-planes of up to 5 maps) are int32 in the kernels
  TORCH_CHECK(a.size(3) < int64_t(kMaxGridZ) * kBlockY && a.size(4) < (int64_t(1) << 30) &&
                  kMoments * a.size(0) * a.size(1) * a.size(2) < (int64_t(1) << 31),
              "deepatlas_fast: lncc: input too large for the CUDA kernels, got shape ", a.sizes());
  return Problem{options, {a.size(0) * a.size(1), a.size(2), int(a.size(3)), int(a.size(4)), a.size(3) * a.size(4)}};
}

template <typename T>
Window<T> make_window(const Problem& p, T* full, T* volume) {
  Window<T> win{};
  win.k = p.k;
  win.half = p.k / 2;
  for (int j = 0; j < p.k; ++j) win.taps[j] = static_cast<T>(lncc::window_tap(j, p.k, p.gaussian));
  *full = lncc::window_total(win.taps, p.k);
  *volume = static_cast<T>(double(*full) * double(*full) * double(*full));
  return win;
}

dim3 slice_grid(const Dims& s, int64_t slices) {
  return dim3((s.w + kBlockX - 1) / kBlockX, (s.h + kBlockY - 1) / kBlockY,
              static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(slices, kMaxGridZ))));
}

// Groups of channels, chunks [z0, z1) of their planes; the buffers hold (chunk + 2 halo) planes of 5 maps per
// channel of a group each.
lncc::ChunkPlan chunk_plan(const Dims& s, int64_t halo) {
  return lncc::chunk_plan(s.nc, s.d, s.plane, halo, 2 * kMoments, lncc::scratch_budget(s.d * s.plane, kBufferVolumes),
                          kMinChunk);
}

// The channels [c0, c0 + nc) of a Dims.
struct Group {
  int64_t c0;
  Dims dims;
  int64_t offset() const { return c0 * dims.d * dims.plane; }  // of channel c0's first element
};

std::vector<Group> channel_groups(const Dims& s, int64_t group) {
  std::vector<Group> groups;
  for (int64_t c0 = 0; c0 < s.nc; c0 += group) {
    Dims dims = s;
    dims.nc = std::min(group, s.nc - c0);
    groups.push_back(Group{c0, dims});
  }
  return groups;
}

// Inputs shared by the forward and the backward: window, shifts, coverage, chunk buffers.
template <typename T>
struct Setup {
  Window<T> win;
  T full, volume;
  at::Tensor shifts, cover, buffer_1, buffer_2;
  lncc::ChunkPlan plan;  // channel groups and z-chunks
  cudaStream_t stream;

  Setup(const Problem& p, const at::Tensor& a, const at::Tensor& b, int64_t halo) : stream(current_stream()) {
    const Dims& s = p.dims;
    win = make_window<T>(p, &full, &volume);
    shifts = lncc_cuda::channel_shifts<T>(a, b, s.nc, s.d * s.plane);
    cover = at::empty({s.d + s.h + s.w}, a.options());
    lncc_cuda::coverage_kernel<<<blocks_for(s.d + s.h + s.w), kThreads, 0, stream>>>(cover.mutable_data_ptr<T>(), s.d,
                                                                                     s.h, s.w, win, win.k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    plan = chunk_plan(s, halo);
    const int64_t size = plan.group * kMoments * plan.planes(s.d, halo) * s.plane;
    buffer_1 = at::empty({size}, a.options());
    buffer_2 = at::empty({size}, a.options());
  }

  // The z- then y-window sums of the moments of planes [first, first + planes) of a group's channels into
  // buffer_2.
  void moment_sums(const Group& g, const at::Tensor& a, const at::Tensor& b, int64_t first, int64_t planes) {
    const Dims& s = g.dims;
    T* m = buffer_1.mutable_data_ptr<T>();
    moments_z_kernel<T><<<slice_grid(s, s.nc * planes), dim3(kBlockX, kBlockY), 0, stream>>>(
        a.const_data_ptr<T>() + g.offset(), b.const_data_ptr<T>() + g.offset(), shifts.const_data_ptr<T>() + 2 * g.c0,
        m, s, first, planes, win);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t slices = s.nc * kMoments * planes;
    window_y_kernel<T><<<slice_grid(s, slices), dim3(kBlockX, kBlockY), 0, stream>>>(
        m, buffer_2.mutable_data_ptr<T>(), s, slices, win);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  StatsJob<T> stats_job(const Problem& p, const Group& g, int64_t first, int64_t planes) const {
    StatsJob<T> job{};
    job.sums = buffer_2.const_data_ptr<T>();
    job.shifts = shifts.const_data_ptr<T>() + 2 * g.c0;
    job.cover = cover.const_data_ptr<T>();
    job.first = first;
    job.planes = planes;
    job.full = full;
    job.volume = volume;
    job.inv_volume = static_cast<T>(1.0 / double(volume));
    job.eps = static_cast<T>(p.eps);
    return job;
  }
};

at::Tensor lncc_forward(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                        double eps, c10::string_view reduction) {
  const Problem p = check_problem(a, b, kernel_size, kernel, eps, reduction);
  const c10::cuda::CUDAGuard guard(a.device());
  const Dims& s = p.dims;
  at::Tensor out = new_output(p.mean ? at::IntArrayRef{} : a.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "deepatlas_fast_lncc", [&] {
    using T = scalar_t;
    Setup<T> setup(p, a, b, 0);
    const std::vector<Group> groups = channel_groups(s, setup.plan.group);
    std::vector<int64_t> starts;
    for (int64_t z0 = 0; z0 < s.d; z0 += setup.plan.chunk) starts.push_back(z0);
    const dim3 grid = slice_grid(groups[0].dims, groups[0].dims.nc * setup.plan.chunk);
    const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
    at::Tensor partials = at::empty({p.mean ? int64_t(groups.size() * starts.size()) * blocks : 0}, a.options());
    int64_t slot = 0;
    for (const Group& g : groups) {
      for (const int64_t z0 : starts) {
        const int64_t planes = std::min(setup.plan.chunk, s.d - z0);
        setup.moment_sums(g, a, b, z0, planes);
        StatsJob<T> job = setup.stats_job(p, g, z0, planes);
        if (p.mean) {
          // the first group's first chunk's grid for every launch, so that each block owns one partial slot
          // per (group, chunk); blocks without slices in a smaller group or chunk write 0
          job.out = partials.mutable_data_ptr<T>() + slot * blocks;
          ncc_partial_kernel<T><<<grid, dim3(kBlockX, kBlockY), 0, setup.stream>>>(job, g.dims, setup.win);
        } else {
          job.out = out.mutable_data_ptr<T>() + g.offset();
          ncc_map_kernel<T><<<grid, dim3(kBlockX, kBlockY), 0, setup.stream>>>(job, g.dims, setup.win);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        ++slot;
      }
    }
    if (p.mean) {
      lncc_cuda::mean_kernel<T><<<1, dim3(kBlockX, kBlockY), 0, setup.stream>>>(
          partials.const_data_ptr<T>(), partials.numel(), static_cast<T>(a.numel()), out.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::vector<at::Tensor> lncc_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                      int64_t kernel_size, c10::string_view kernel, double eps,
                                      c10::string_view reduction, bool need_a, bool need_b) {
  const Problem p = check_problem(a, b, kernel_size, kernel, eps, reduction);
  const int64_t grad_div = lncc::check_grad(grad, a, p.mean);
  if (!need_a && !need_b) return {};
  const c10::cuda::CUDAGuard guard(a.device());
  const Dims& s = p.dims;
  const int64_t half = p.k / 2;
  const int maps = 1 + 2 * (int(need_a) + int(need_b));
  at::Tensor grad_a = need_a ? new_output(a.sizes(), a.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? new_output(b.sizes(), b.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "deepatlas_fast_lncc_backward", [&] {
    using T = scalar_t;
    Setup<T> setup(p, a, b, half);
    const dim3 block(kBlockX, kBlockY);
    for (const Group& g : channel_groups(s, setup.plan.group)) {
      const Dims& gs = g.dims;
      for (int64_t z0 = 0; z0 < s.d; z0 += setup.plan.chunk) {
        const int64_t z1 = std::min(s.d, z0 + setup.plan.chunk);
        const int64_t h0 = std::max<int64_t>(0, z0 - half), h1 = std::min(s.d, z1 + half);  // with the halo
        setup.moment_sums(g, a, b, h0, h1 - h0);
        StatsJob<T> job = setup.stats_job(p, g, h0, h1 - h0);
        T* adjoints = setup.buffer_1.template mutable_data_ptr<T>();
        job.out = adjoints;
        job.grad = p.mean ? nullptr : grad.const_data_ptr<T>();
        job.grad_c0 = g.c0;
        job.grad_div = grad_div;
        job.grad_scalar = p.mean ? grad.const_data_ptr<T>() : nullptr;
        job.mean_scale = static_cast<T>(-1.0 / double(a.numel()));
        job.need_a = need_a;
        job.need_b = need_b;
        job.maps = maps;
        adjoints_kernel<T><<<slice_grid(gs, gs.nc * (h1 - h0)), block, 0, setup.stream>>>(job, gs, setup.win);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        T* sums = setup.buffer_2.template mutable_data_ptr<T>();
        window_z_kernel<T><<<slice_grid(gs, gs.nc * maps * (z1 - z0)), block, 0, setup.stream>>>(
            adjoints, sums, gs, gs.nc * maps, h0, h1 - h0, z0, z1 - z0, setup.win);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t slices = gs.nc * maps * (z1 - z0);
        window_y_kernel<T><<<slice_grid(gs, slices), block, 0, setup.stream>>>(sums, adjoints, gs, slices, setup.win);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        combine_kernel<T><<<slice_grid(gs, gs.nc * (z1 - z0)), block, 0, setup.stream>>>(
            adjoints, a.const_data_ptr<T>() + g.offset(), b.const_data_ptr<T>() + g.offset(),
            setup.shifts.template const_data_ptr<T>() + 2 * g.c0,
            need_a ? grad_a.mutable_data_ptr<T>() + g.offset() : nullptr,
            need_b ? grad_b.mutable_data_ptr<T>() + g.offset() : nullptr, gs, z0, z1 - z0, maps, setup.win);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return requested_gradients(need_a, grad_a, need_b, grad_b);
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_LNCC_IMPL(CUDA)
