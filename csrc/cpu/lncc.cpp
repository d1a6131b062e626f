// CPU kernels of lncc (local normalised cross-correlation), forward and backward.
// Semantics: deepatlas_fast/reference/similarity.py; per-voxel math: include/deepatlas_fast/lncc.h.
//
// Work units are slabs of output planes of one (n, c) channel, run in parallel; the slabs
// depend only on the shape, so the results (the mean's partial sums included, added in unit order) do not
// depend on the thread count. Everything is accumulated in double, in the frame shifted by the mean of the
// unit's planes (see lncc.h), so float32 inputs are as accurate as float64 ones.
//
// A unit streams its planes: the z-window sums of the five moments slide from plane to plane (box window;
// a gaussian window sums its k taps afresh), straight from the inputs, then each plane gets its x pass and,
// row by row, its y pass and the statistics. The backward computes the adjoint maps of the planes
// [z0 - h, z1 + h) in the same way, takes their in-plane window sums into a ring of the last k + 1 planes,
// and sums the ring along z (sliding again for the box window) for each output plane.
//
// Extra memory, per worker thread (H x W planes of doubles; NA = 3 adjoint maps, 5 with both gradients):
// forward 10 planes; backward 10 + NA (k + 3) planes (k = 9, both gradients: 70 planes). Plus one double
// per unit for the mean.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deepatlas_fast/host.h"
#include "deepatlas_fast/lncc.h"
#include "deepatlas_fast/lncc_host.h"

namespace deepatlas_fast {
namespace {

using Acc = double;
using Stats = lncc::WindowStats<Acc>;

// Units depend only on the shape (results independent of the thread count): slabs of at least kMinSlab output
// planes, only as many per channel as give kUnits units in all. A unit's start (its shift, the first window's
// sums from scratch, the backward's halo of k - 1 planes) costs a fixed number of planes: on 16 channels (a pair's
// 8 feature channels at 64^3) 2 slabs of 32 planes ran fwd+bwd 10-16 % faster than 4 of 16.
constexpr int64_t kMinSlab = 16;
constexpr int64_t kUnits = 32;
constexpr int kMoments = 5;    // a', b', a'^2, b'^2, a'b'
constexpr int64_t kMaxKernelSize = (int64_t(1) << 20) - 1;  // taps per axis accepted (the window is a vector)

struct Shape {
  int64_t nc, d, h, w, plane, volume;
};

struct Window {
  int k = 1, half = 0;
  bool slides = false;  // box window of more than one tap: running sums (one tap in, one out per step)
  std::vector<Acc> taps;
  Acc full = 1;    // the sum of the taps
  Acc volume = 1;  // V = full^3
  Acc inv_volume = 1;
  std::vector<Acc> cover_z, cover_y, cover_x;  // window weight inside the volume, per position along each axis
};

struct Problem {
  Shape shape;
  Window window;
  Acc eps;
  bool mean;
};

std::vector<Acc> coverage(int64_t n, const Window& win) {
  std::vector<Acc> cover(n);
  for (int64_t i = 0; i < n; ++i) cover[i] = lncc::window_coverage(i, n, win.taps.data(), win.k);
  return cover;
}

Problem check_problem(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                      double eps, c10::string_view reduction) {
  const lncc::Options o = lncc::check_arguments(a, b, kernel_size, kernel, eps, reduction, kMaxKernelSize);
  Problem p;
  p.shape = {a.size(0) * a.size(1), a.size(2), a.size(3), a.size(4), a.size(3) * a.size(4), 0};
  p.shape.volume = p.shape.d * p.shape.plane;
  Window& win = p.window;
  win.k = o.k;
  win.half = win.k / 2;
  win.slides = !o.gaussian && win.k > 1;
  for (int j = 0; j < win.k; ++j) win.taps.push_back(lncc::window_tap(j, win.k, o.gaussian));
  win.full = lncc::window_total(win.taps.data(), win.k);
  win.volume = win.full * win.full * win.full;
  win.inv_volume = 1 / win.volume;
  win.cover_z = coverage(p.shape.d, win);
  win.cover_y = coverage(p.shape.h, win);
  win.cover_x = coverage(p.shape.w, win);
  p.eps = o.eps;
  p.mean = o.mean;
  return p;
}

// Units [z0, z1) of a channel: slabs of balanced lengths (see kUnits).
int64_t slabs_per_channel(const Shape& s) {
  return std::max<int64_t>(1, std::min((s.d + kMinSlab - 1) / kMinSlab, (kUnits + s.nc - 1) / s.nc));
}

struct Unit {
  int64_t channel, z0, z1;
};

Unit unit_at(const Shape& s, int64_t index) {
  const int64_t slabs = slabs_per_channel(s), slab = index % slabs;
  return {index / slabs, s.d * slab / slabs, s.d * (slab + 1) / slabs};
}

// ------------------------------------------------------------------------------------- 1-D window passes

inline void axpy(Acc* __restrict__ dst, const Acc* __restrict__ src, Acc weight, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += weight * src[i];
}

// The window sum at position i of a sequence of n vectors (rows of a plane, planes of a volume) into dst
// (len values); add(dst, t, weight) adds weight times vector t. slide (win.slides only): dst holds the sum
// at i - 1, which moves by one vector at each end; else the taps are summed afresh.
template <typename Add>
void window_at(Acc* dst, int64_t len, int64_t i, int64_t n, bool slide, const Window& win, Add&& add) {
  if (slide) {
    if (i + win.half < n) add(dst, i + win.half, Acc(1));
    if (i - win.half - 1 >= 0) add(dst, i - win.half - 1, Acc(-1));
    return;
  }
  std::fill(dst, dst + len, Acc(0));
  for (int j = 0; j < win.k; ++j) {
    const int64_t t = i + j - win.half;
    if (t >= 0 && t < n) add(dst, t, win.taps[j]);
  }
}

// Running box sums along x of kRows rows of w values at once: independent dependency chains.
constexpr int64_t kRows = 8;

template <int64_t R>
void box_rows(const Acc* __restrict__ src, Acc* __restrict__ dst, int64_t w, int64_t half) {
  Acc sum[R];
  for (int64_t r = 0; r < R; ++r) {
    sum[r] = 0;
    for (int64_t t = 0; t <= std::min(half, w - 1); ++t) sum[r] += src[r * w + t];
  }
  for (int64_t x = 0; x < w; ++x) {
    for (int64_t r = 0; r < R; ++r) dst[r * w + x] = sum[r];
    if (x + half + 1 < w) {
      for (int64_t r = 0; r < R; ++r) sum[r] += src[r * w + x + half + 1];
    }
    if (x - half >= 0) {
      for (int64_t r = 0; r < R; ++r) sum[r] -= src[r * w + x - half];
    }
  }
}

// dst = the window sums along x (the contiguous axis) of `rows` rows of w values.
void x_window(const Acc* __restrict__ src, Acc* __restrict__ dst, int64_t rows, int64_t w, const Window& win) {
  const int64_t half = win.half;
  if (win.slides) {
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) box_rows<kRows>(src + r * w, dst + r * w, w, half);
    for (; r < rows; ++r) box_rows<1>(src + r * w, dst + r * w, w, half);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* in = src + r * w;
    Acc* out = dst + r * w;
    std::fill(out, out + w, Acc(0));
    for (int j = 0; j < win.k; ++j) {
      const int64_t off = j - half, lo = std::max<int64_t>(0, -off), hi = std::min(w, w - off);
      const Acc tap = win.taps[j];
      for (int64_t x = lo; x < hi; ++x) out[x] += tap * in[x + off];
    }
  }
}

// dst = the in-plane (x then y) window sums of `channels` planes (h x w each); tmp: same size.
void plane_window(const Acc* src, Acc* tmp, Acc* dst, int64_t channels, const Shape& s, const Window& win) {
  x_window(src, tmp, channels * s.h, s.w, win);
  for (int64_t c = 0; c < channels; ++c) {
    const Acc* in = tmp + c * s.plane;
    for (int64_t y = 0; y < s.h; ++y) {
      Acc* out_row = dst + c * s.plane + y * s.w;
      const bool slide = win.slides && y > 0;
      if (slide) std::copy(out_row - s.w, out_row, out_row);
      window_at(out_row, s.w, y, s.h, slide, win,
                [&](Acc* out, int64_t t, Acc weight) { axpy(out, in + t * s.w, weight, s.w); });
    }
  }
}

// ------------------------------------------------------------------------------------- window statistics

// weight times the shifted moments of one plane (n values of a and b), added to the 5 planes of z_sum.
template <typename T>
void add_moments(Acc* z_sum, const T* __restrict__ a, const T* __restrict__ b, int64_t n, Acc weight, Acc shift_a,
                 Acc shift_b) {
  Acc* __restrict__ sa = z_sum;
  Acc* __restrict__ sb = z_sum + n;
  Acc* __restrict__ saa = z_sum + 2 * n;
  Acc* __restrict__ sbb = z_sum + 3 * n;
  Acc* __restrict__ sab = z_sum + 4 * n;
  for (int64_t i = 0; i < n; ++i) {
    const Acc x = Acc(a[i]) - shift_a, y = Acc(b[i]) - shift_b;
    const Acc wx = weight * x, wy = weight * y;
    sa[i] += wx;
    sb[i] += wy;
    saa[i] += wx * x;
    sbb[i] += wy * y;
    sab[i] += wx * y;
  }
}

// The mean of planes [z0, z1) of one channel: the unit's shift.
template <typename T>
Acc plane_mean(const T* x, const Shape& s, int64_t z0, int64_t z1) {
  Acc sum = 0;
  for (int64_t i = z0 * s.plane; i < z1 * s.plane; ++i) sum += Acc(x[i]);
  return sum / Acc((z1 - z0) * s.plane);
}

// The window statistics of consecutive planes of one channel (see the top of the file). Buffers are
// allocated once per worker and reused by its units.
template <typename T>
class StatsStream {
 public:
  StatsStream(const Shape& s, const Window& win)
      : s_(s), win_(win), z_sum_(kMoments * s.plane), x_sum_(kMoments * s.plane), y_sum_(kMoments * s.w) {}

  void start(const T* a, const T* b, Acc shift_a, Acc shift_b) {
    a_ = a;
    b_ = b;
    shift_a_ = shift_a;
    shift_b_ = shift_b;
    z_ = -2;
  }

  Acc shift_a() const { return shift_a_; }
  Acc shift_b() const { return shift_b_; }

  // The z and x passes of plane z (consecutive planes slide the box window).
  void plane(int64_t z) {
    window_at(z_sum_.data(), kMoments * s_.plane, z, s_.d, win_.slides && z == z_ + 1, win_,
              [&](Acc* dst, int64_t t, Acc weight) {
                add_moments(dst, a_ + t * s_.plane, b_ + t * s_.plane, s_.plane, weight, shift_a_, shift_b_);
              });
    x_window(z_sum_.data(), x_sum_.data(), kMoments * s_.h, s_.w, win_);
    z_ = z;
  }

  // visit(x, stats) for each voxel of row y of the current plane; rows in order y = 0, 1, ...
  template <typename Visit>
  void row(int64_t y, Visit&& visit) {
    const int64_t w = s_.w;
    window_at(y_sum_.data(), kMoments * w, y, s_.h, win_.slides && y > 0, win_, [&](Acc* dst, int64_t t, Acc weight) {
      for (int m = 0; m < kMoments; ++m) axpy(dst + m * w, x_sum_.data() + m * s_.plane + t * w, weight, w);
    });
    const Acc* ys = y_sum_.data();
    const Acc cover_z = win_.cover_z[z_], cover_y = win_.cover_y[y];
    for (int64_t x = 0; x < w; ++x) {
      const lncc::Moments<Acc> m{ys[x], ys[w + x], ys[2 * w + x], ys[3 * w + x], ys[4 * w + x]};
      const Acc outside = lncc::window_outside(cover_z, cover_y, win_.cover_x[x], win_.full, win_.volume);
      visit(x, lncc::window_stats(m, outside, shift_a_, shift_b_, win_.inv_volume));
    }
  }

  // A buffer of 5 planes the caller may use between rows' visits and the next plane().
  Acc* spare() { return x_sum_.data(); }

 private:
  const Shape& s_;
  const Window& win_;
  std::vector<Acc> z_sum_, x_sum_, y_sum_;
  const T* a_ = nullptr;
  const T* b_ = nullptr;
  Acc shift_a_ = 0, shift_b_ = 0;
  int64_t z_ = -2;
};

// ------------------------------------------------------------------------------------------------ forward

template <typename T>
void forward_kernel(const T* a, const T* b, T* map, Acc* partials, const Problem& p) {
  const Shape& s = p.shape;
  const int64_t units = s.nc * slabs_per_channel(s);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    StatsStream<T> stream(s, p.window);
    for (int64_t u = begin; u < end; ++u) {
      const Unit unit = unit_at(s, u);
      const T* ca = a + unit.channel * s.volume;
      const T* cb = b + unit.channel * s.volume;
      stream.start(ca, cb, plane_mean(ca, s, unit.z0, unit.z1), plane_mean(cb, s, unit.z0, unit.z1));
      Acc sum = 0;
      for (int64_t z = unit.z0; z < unit.z1; ++z) {
        stream.plane(z);
        for (int64_t y = 0; y < s.h; ++y) {
          T* out = map ? map + unit.channel * s.volume + z * s.plane + y * s.w : nullptr;
          stream.row(y, [&](int64_t x, const Stats& st) {
            const Acc ncc = lncc::ncc_value(st, p.eps);
            if (out) {
              out[x] = static_cast<T>(ncc);
            } else {
              sum += ncc;
            }
          });
        }
      }
      if (partials) partials[u] = sum;
    }
  });
}

at::Tensor lncc_forward(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size, c10::string_view kernel,
                        double eps, c10::string_view reduction) {
  const Problem p = check_problem(a, b, kernel_size, kernel, eps, reduction);
  at::Tensor out = new_output(p.mean ? at::IntArrayRef{} : a.sizes(), a.options());
  std::vector<Acc> partials(p.mean ? p.shape.nc * slabs_per_channel(p.shape) : 0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "deepatlas_fast_lncc", [&] {
    forward_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                             p.mean ? nullptr : out.mutable_data_ptr<scalar_t>(), p.mean ? partials.data() : nullptr,
                             p);
    if (p.mean) {
      Acc total = 0;
      for (const Acc partial : partials) total += partial;  // in unit order: deterministic
      out.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(-total / Acc(a.numel()));
    }
  });
  return out;
}

// ----------------------------------------------------------------------------------------------- backward

// Which adjoint maps a backward unit forms: [cross, (a, aa), (b, bb)], the pairs only where needed.
struct Needs {
  bool a, b;
  int maps() const { return 1 + 2 * (int(a) + int(b)); }
};

template <typename T>
struct Backward {
  const T* grad;  // the upstream map ("none"), else nullptr and g_mean
  int64_t grad_div;  // flat channel c reads grad's channel c / grad_div (check_grad)
  Acc g_mean;
  const T* a;
  const T* b;
  T* grad_a;
  T* grad_b;
  Needs needs;
};

// One backward unit: see the top of the file.
template <typename T>
class BackwardUnit {
 public:
  BackwardUnit(const Problem& p, const Backward<T>& job)
      : p_(p),
        s_(p.shape),
        job_(job),
        maps_(job.needs.maps()),
        ring_size_(p.window.k + 1),
        stream_(p.shape, p.window),
        adjoint_(maps_ * s_.plane),
        ring_(ring_size_ * maps_ * s_.plane),
        z_sum_(maps_ * s_.plane) {}

  void run(const Unit& unit) {
    const int64_t offset = unit.channel * s_.volume;
    grad_offset_ = unit.channel / job_.grad_div * s_.volume;
    const T* a = job_.a + offset;
    const T* b = job_.b + offset;
    stream_.start(a, b, plane_mean(a, s_, unit.z0, unit.z1), plane_mean(b, s_, unit.z0, unit.z1));
    const Window& win = p_.window;
    const int64_t n = maps_ * s_.plane;
    int64_t next = std::max<int64_t>(unit.z0 - win.half, 0);  // the next adjoint plane to form
    for (int64_t z = unit.z0; z < unit.z1; ++z) {
      for (; next < std::min(s_.d, z + win.half + 1); ++next) adjoint_plane(next);
      window_at(z_sum_.data(), n, z, s_.d, win.slides && z > unit.z0, win,
                [&](Acc* dst, int64_t t, Acc weight) { axpy(dst, ring_slot(t), weight, n); });
      combine(offset + z * s_.plane, a + z * s_.plane, b + z * s_.plane);
    }
  }

 private:
  Acc* ring_slot(int64_t z) { return ring_.data() + (z % ring_size_) * maps_ * s_.plane; }

  // The adjoint maps of plane z, their in-plane window sums into the ring.
  void adjoint_plane(int64_t z) {
    stream_.plane(z);
    const int64_t plane = s_.plane;
    const Needs needs = job_.needs;
    for (int64_t y = 0; y < s_.h; ++y) {
      const int64_t row = y * s_.w;
      const T* up = job_.grad ? job_.grad + grad_offset_ + z * plane + row : nullptr;
      Acc* adj = adjoint_.data() + row;
      stream_.row(y, [&](int64_t x, const Stats& st) {
        const Acc g = up ? Acc(up[x]) : job_.g_mean;
        const lncc::Adjoints<Acc> d = lncc::ncc_adjoints(st, g, p_.eps);
        Acc* at = adj + x;
        at[0] = d.cross;
        if (needs.a) {
          at[plane] = d.a;
          at[2 * plane] = d.aa;
        }
        if (needs.b) {
          at[(needs.a ? 3 : 1) * plane] = d.b;
          at[(needs.a ? 4 : 2) * plane] = d.bb;
        }
      });
    }
    plane_window(adjoint_.data(), stream_.spare(), ring_slot(z), maps_, s_, p_.window);
  }

  // The gradients at plane z (voxel offset `at`) from the window sums of the adjoint maps in z_sum_.
  void combine(int64_t at, const T* a, const T* b) {
    const Acc* w_cross = z_sum_.data();
    const Acc* w_first = w_cross + s_.plane;  // (W(adj.x), W(adj.xx)) of the first requested gradient
    const Acc* w_second = w_cross + 3 * s_.plane;
    const Acc sa = stream_.shift_a(), sb = stream_.shift_b();
    T* ga = job_.needs.a ? job_.grad_a + at : nullptr;
    T* gb = job_.needs.b ? job_.grad_b + at : nullptr;
    const Acc* w_b = job_.needs.a ? w_second : w_first;
    for (int64_t i = 0; i < s_.plane; ++i) {
      const Acc x = Acc(a[i]) - sa, y = Acc(b[i]) - sb;
      if (ga) ga[i] = static_cast<T>(lncc::input_gradient(w_first[i], w_first[s_.plane + i], w_cross[i], x, y));
      if (gb) gb[i] = static_cast<T>(lncc::input_gradient(w_b[i], w_b[s_.plane + i], w_cross[i], y, x));
    }
  }

  const Problem& p_;
  const Shape& s_;
  const Backward<T>& job_;
  const int maps_;
  const int64_t ring_size_;  // k + 1 planes: the sliding box window also drops plane z - h - 1
  StatsStream<T> stream_;
  std::vector<Acc> adjoint_, ring_, z_sum_;
  int64_t grad_offset_ = 0;  // the unit's channel of grad
};

std::vector<at::Tensor> lncc_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                      int64_t kernel_size, c10::string_view kernel, double eps,
                                      c10::string_view reduction, bool need_a, bool need_b) {
  const Problem p = check_problem(a, b, kernel_size, kernel, eps, reduction);
  const int64_t grad_div = lncc::check_grad(grad, a, p.mean);
  if (!need_a && !need_b) return {};
  at::Tensor grad_a = need_a ? new_output(a.sizes(), a.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? new_output(b.sizes(), b.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "deepatlas_fast_lncc_backward", [&] {
    using T = scalar_t;
    Backward<T> job;
    job.grad = p.mean ? nullptr : grad.const_data_ptr<T>();
    job.grad_div = grad_div;
    job.g_mean = p.mean ? -Acc(grad.const_data_ptr<T>()[0]) / Acc(a.numel()) : Acc(0);
    job.a = a.const_data_ptr<T>();
    job.b = b.const_data_ptr<T>();
    job.grad_a = need_a ? grad_a.mutable_data_ptr<T>() : nullptr;
    job.grad_b = need_b ? grad_b.mutable_data_ptr<T>() : nullptr;
    job.needs = {need_a, need_b};
    at::parallel_for(0, p.shape.nc * slabs_per_channel(p.shape), 1, [&](int64_t begin, int64_t end) {
      BackwardUnit<T> worker(p, job);
      for (int64_t u = begin; u < end; ++u) worker.run(unit_at(p.shape, u));
    });
  });
  return requested_gradients(need_a, grad_a, need_b, grad_b);
}

}  // namespace
}  // namespace deepatlas_fast

DEEPATLAS_FAST_LNCC_IMPL(CPU)
