// The tiled lncc algorithm of the CUDA `lncc_tiled` op, shared with its serial CPU emulation (the CPU
// registration of `lncc_tiled`), so that the CPU tests run the same tile code the GPU runs.
//
// A work unit is one in-plane tile of kTileY x kTileX output voxels of one channel over a run of planes.
// Per step of up to P planes, window_sums computes the window sums of MAPS maps at every output
// voxel of the tile in phases separated by barriers, in the unit's scratch (shared memory on CUDA): z sums
// of each plane of the step at every column of the tile and its halo, read from global memory (the planes
// of a step share their loads); then per plane x sums, y sums and a visit of each output voxel. The
// forward's maps are the 5 shifted moments (lncc.h) and its visit forms the NCC; the backward runs it twice:
// once for the adjoint maps (written to a buffer), once over those maps to combine the gradients. Versus one
// kernel per axis (cuda/lncc.cu), the intermediate sums never leave the unit's scratch. Every window sum is
// a direct sum over its own taps, as the reference's convolution.
//
// Exec runs the phases: for_each(n, f) calls f(i) for i in [0, n) (on CUDA spread over the block's
// threads), sync() is the barrier between phases (__syncthreads on CUDA, nothing when serial).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "deepatlas_fast/common.h"
#include "deepatlas_fast/lncc.h"

namespace deepatlas_fast {
namespace lncc {
namespace tile {

constexpr int kTileX = 32;      // output columns per tile (one warp's worth of coalesced x)
constexpr int kTileY = 16;      // output rows per tile
constexpr int kMaxMaps = 5;     // moments (forward), adjoint maps with both gradients (backward)
constexpr int kMaxKernelSize = 31;  // the scratch grows with the halo (scratch_elements)
constexpr int kPlanesPerUnit = 16;  // planes a unit streams (units = tiles x channels x plane runs)

// Output planes per step of window_sums (P): 1 or 2. Two planes read the k + 1 input planes of their windows
// once, each input plane's maps feeding both z sums; one plane reads the k planes of its window per output
// plane (9 loads of each map per output voxel for k = 9, from L2: most of the kernels' memory traffic), with
// a smaller scratch (more blocks per SM). with_z_planes picks it.
constexpr int kMaxZPlanes = 2;

// The window's taps along each axis (window_tap), by value: a CUDA kernel argument.
template <typename T>
struct Taps {
  T tap[kMaxKernelSize];
  DA_HD T operator[](int j) const { return tap[j]; }
  DA_HD const T* data() const { return tap; }
};

// The window sums of MAPS maps at one point, by value (registers on CUDA).
template <typename T, int MAPS>
struct Sums {
  T v[MAPS];
};

template <typename T, int MAPS>
DA_HD Sums<T, MAPS> zero_sums() {
  Sums<T, MAPS> s;
  DA_UNROLL
  for (int q = 0; q < MAPS; ++q) s.v[q] = T(0);
  return s;
}

// The tile of a unit in a plane of h x w voxels: outputs [y0, y0 + kTileY) x [x0, x0 + kTileX) (clipped),
// and its scratch: z sums [z_planes][maps][halo_y][z_pitch], x sums [maps][halo_y][x_pitch], y sums
// [maps][kTileY][kTileX]. The odd pitches spread the rows that the threads of phase B run along over the 32
// shared-memory banks.
template <typename T>
struct PlaneTile {
  T* z_sums;
  T* x_sums;
  T* y_sums;
  int y0, x0, h, w, half;
  DA_HD int halo_y() const { return kTileY + 2 * half; }
  DA_HD int halo_x() const { return kTileX + 2 * half; }
  DA_HD int z_pitch() const { return halo_x() + 1; }
  DA_HD static constexpr int x_pitch() { return kTileX + 1; }
  DA_HD int z_plane_elements() const { return kMaxMaps * halo_y() * z_pitch(); }  // z sums of one plane
};

// Scratch elements of one unit for a window of `half` voxels each side and z_planes planes per step
// (k = 31, float64, one plane: 197 KB; k = 9, float32, two planes: 65 KB).
DA_HD int scratch_elements(int half, int z_planes) {
  const int halo_y = kTileY + 2 * half, halo_x = kTileX + 2 * half;
  return kMaxMaps * (z_planes * halo_y * (halo_x + 1) + halo_y * (kTileX + 1) + kTileY * kTileX);
}

template <typename T>
DA_HD PlaneTile<T> plane_tile(T* scratch, int tile_y, int tile_x, int h, int w, int half, int z_planes) {
  PlaneTile<T> t{scratch, nullptr, nullptr, tile_y * kTileY, tile_x * kTileX, h, w, half};
  t.x_sums = t.z_sums + z_planes * t.z_plane_elements();
  t.y_sums = t.x_sums + kMaxMaps * t.halo_y() * t.x_pitch();
  return t;
}

// Outputs per task of phase B (two runs per row) and phase C (one run per column).
constexpr int kRunX = kTileX / 2;
constexpr int kRunY = kTileY;

// out[o * out_stride] = sum over j < k of taps[j] in[(o + j) * in_stride], for o < R: a run of window
// sums along one axis, each summed directly over its own taps in order (no running sums: a sliding sum
// would carry the rounding error of bright voxels into the flat windows after them). K > 0: the window
// size at compile time, the run's R + K - 1 inputs read once into registers; K = 0: k at run time.
template <int K, int R, typename T>
DA_HD void window_run(const T* in, int in_stride, T* out, int out_stride, const T* taps, int k) {
  if constexpr (K > 0) {
    T v[R + K - 1], w[K];
    DA_UNROLL
    for (int i = 0; i < R + K - 1; ++i) v[i] = in[i * in_stride];
    DA_UNROLL
    for (int j = 0; j < K; ++j) w[j] = taps[j];
    DA_UNROLL
    for (int o = 0; o < R; ++o) {
      T sum = 0;
      DA_UNROLL
      for (int j = 0; j < K; ++j) sum += w[j] * v[o + j];
      out[o * out_stride] = sum;
    }
  } else {
    for (int o = 0; o < R; ++o) {
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += taps[j] * in[(o + j) * in_stride];
      out[o * out_stride] = sum;
    }
  }
}

// The window sums at planes z, ..., z + count - 1 (of d; count <= P) of MAPS maps at every output
// voxel of the tile, in phases:
//   A. z sums of each of the count planes at every column of the tile and its halo: maps_at(y, x, p) is
//      the maps' value at voxel (p, y, x) of the volume (called once per input plane of the step's windows,
//      for in-volume voxels only; the padding is zero);
//   then per plane q: B. x sums at every (halo row, output column), runs of kRunX;  C. y sums at every
//   output voxel, runs of kRunY;  D. visit(y, x, q, sums) at each in-volume output voxel.
// Each z sum adds its own taps in ascending p, as with one plane per step. K: the window size when known
// at compile time (window_run), else 0. The next step's phase A may follow the last phase D at once: it
// writes only the z sums, which the last phase B has finished reading, and its barrier comes before phases B
// and C overwrite what C and D read; likewise a plane's phase B may follow the previous plane's phase D.
template <int MAPS, int K, int P, typename T, typename Exec, typename MapsAt, typename Visit>
DA_HD void window_sums(const Exec& ex, const PlaneTile<T>& t, const T* taps, int64_t z, int count, int64_t d,
                       MapsAt&& maps_at, Visit&& visit) {
  static_assert(P >= 1 && P <= kMaxZPlanes, "planes per step");
  const int hy = t.halo_y(), hx = t.halo_x(), zp = t.z_pitch(), xp = t.x_pitch(), k = 2 * t.half + 1;
  ex.for_each(hy * hx, [&](int i) {
    const int iy = i / hx, ix = i - iy * hx;
    const int y = t.y0 - t.half + iy, x = t.x0 - t.half + ix;
    Sums<T, MAPS> sums[P];
    DA_UNROLL
    for (int q = 0; q < P; ++q) sums[q] = zero_sums<T, MAPS>();
    if (y >= 0 && y < t.h && x >= 0 && x < t.w) {
      const int64_t last = z + count - 1;
      const int64_t lo = z - t.half > 0 ? z - t.half : 0, hi = last + t.half < d ? last + t.half : d - 1;
      DA_NO_UNROLL
      for (int64_t p = lo; p <= hi; ++p) {
        const Sums<T, MAPS> m = maps_at(y, x, p);
        DA_UNROLL
        for (int q = 0; q < P; ++q) {
          const int64_t j = p - (z + q) + t.half;  // the tap of input plane p in plane z + q's window
          if (q < count && j >= 0 && j < k) {
            const T tap = taps[j];
            DA_UNROLL
            for (int r = 0; r < MAPS; ++r) sums[q].v[r] += tap * m.v[r];
          }
        }
      }
    }
    DA_UNROLL
    for (int q = 0; q < P; ++q) {
      if (q < count) {
        T* plane = t.z_sums + q * t.z_plane_elements();
        DA_UNROLL
        for (int r = 0; r < MAPS; ++r) plane[(r * hy + iy) * zp + ix] = sums[q].v[r];
      }
    }
  });
  ex.sync();
  for (int q = 0; q < count; ++q) {
    const T* z_sums = t.z_sums + q * t.z_plane_elements();
    // task = (row, half row); rows [map][halo row] are consecutive in both buffers
    ex.for_each(MAPS * hy * 2, [&](int i) {
      const int row = i / 2, start = (i - 2 * row) * kRunX;
      window_run<K, kRunX>(z_sums + row * zp + start, 1, t.x_sums + row * xp + start, 1, taps, k);
    });
    ex.sync();
    ex.for_each(MAPS * kTileX, [&](int i) {  // task = (map, output column)
      const int r = i / kTileX, ox = i - r * kTileX;
      window_run<K, kRunY>(t.x_sums + r * hy * xp + ox, xp, t.y_sums + r * kTileY * kTileX + ox, kTileX, taps, k);
    });
    ex.sync();
    ex.for_each(kTileY * kTileX, [&](int i) {
      const int oy = i / kTileX, ox = i - oy * kTileX;
      const int y = t.y0 + oy, x = t.x0 + ox;
      if (y >= t.h || x >= t.w) return;
      Sums<T, MAPS> sums;
      DA_UNROLL
      for (int r = 0; r < MAPS; ++r) sums.v[r] = t.y_sums[(r * kTileY + oy) * kTileX + ox];
      visit(y, x, q, sums);
    });
  }
}

// What every lncc unit reads: the volume's shape (nc channels of d x h x w), the window and the frame.
template <typename T>
struct Volume {
  const T* a;
  const T* b;
  const T* shifts;  // [nc][2]: the shift of a and b per channel (lncc.h)
  const T* cover;   // [d + h + w]: window weight inside the volume along z, y, x (window_coverage)
  int64_t nc, d;
  int h, w;
  int64_t plane;
  int half;
  T full, volume, inv_volume, eps;  // full: the sum of the taps; volume: full^3
};

// The window statistics at (channel c, z, y, x) from the in-volume window sums of the shifted moments.
template <typename T>
DA_HD WindowStats<T> stats_from_sums(const Volume<T>& v, int64_t c, int64_t z, int y, int x,
                                     const Sums<T, kMaxMaps>& s) {
  const Moments<T> m{s.v[0], s.v[1], s.v[2], s.v[3], s.v[4]};
  const T outside = window_outside(v.cover[z], v.cover[v.d + y], v.cover[v.d + v.h + x], v.full, v.volume);
  return window_stats(m, outside, v.shifts[2 * c], v.shifts[2 * c + 1], v.inv_volume);
}

// The 5 shifted moments of channel c at voxel (p, y, x); sa, sb: the channel's shifts.
template <typename T>
DA_HD Sums<T, kMaxMaps> moments_at(const Volume<T>& v, int64_t c, T sa, T sb, int y, int x, int64_t p) {
  const int64_t at = (c * v.d + p) * v.plane + int64_t(y) * v.w + x;
  const T xa = DA_LOAD(v.a + at) - sa, xb = DA_LOAD(v.b + at) - sb;
  return Sums<T, kMaxMaps>{{xa, xb, xa * xa, xb * xb, xa * xb}};
}

// ---- forward: the NCC map, or the unit's partial sum of it (returned; reduction="mean"). K, P: window_sums.

template <int K, int P, typename T, typename Exec>
DA_HD T forward_unit(const Exec& ex, const PlaneTile<T>& t, const Volume<T>& v, const T* taps, int64_t c, int64_t z0,
                     int64_t z1, T* map) {
  const T sa = v.shifts[2 * c], sb = v.shifts[2 * c + 1];
  T partial = 0;
  for (int64_t z = z0; z < z1; z += P) {
    const int count = z1 - z < P ? int(z1 - z) : P;
    window_sums<kMaxMaps, K, P>(
        ex, t, taps, z, count, v.d, [&](int y, int x, int64_t p) { return moments_at(v, c, sa, sb, y, x, p); },
        [&](int y, int x, int q, const Sums<T, kMaxMaps>& sums) {
          const T ncc = ncc_value(stats_from_sums(v, c, z + q, y, x, sums), v.eps);
          if (map) {
            map[(c * v.d + z + q) * v.plane + int64_t(y) * v.w + x] = ncc;
          } else {
            partial += ncc;
          }
        });
  }
  return partial;
}

// ---- backward, in chunks of output planes [z0, z1): the adjoint maps of planes [h0, h1) = the chunk
// plus a halo of `half` planes (in the volume), into buffer [nc][maps][h1 - h0][plane]; then their window
// sums, combined into the gradients at the chunk's planes.

// Which adjoint maps: [cross, (a, aa), (b, bb)], the pairs only where the gradient is needed.
struct Needs {
  bool a, b;
  DA_HD int maps() const { return 1 + 2 * (int(a) + int(b)); }
};

template <typename T>
struct Chunk {
  T* buffer;  // adjoint maps
  int64_t h0, planes;  // buffer planes: [h0, h0 + planes)
  Needs needs;
  const T* grad;         // the upstream map (reduction="none"; channel c reads channel (grad_c0 + c) / grad_div
  int64_t grad_c0, grad_div;  // of it: a group of channels, a map shared by an item's channels), or nullptr and:
  const T* grad_scalar;  // the upstream scalar (reduction="mean"), times
  T mean_scale;          // -1 / numel
};

template <typename T>
DA_HD T* buffer_at(const Chunk<T>& ch, const Volume<T>& v, int64_t c, int map, int64_t z) {
  return ch.buffer + ((c * ch.needs.maps() + map) * ch.planes + (z - ch.h0)) * v.plane;
}

// The adjoint maps of channel c at planes [p0, p1) (within the chunk's buffer planes). K, P: window_sums.
template <int K, int P, typename T, typename Exec>
DA_HD void adjoint_unit(const Exec& ex, const PlaneTile<T>& t, const Volume<T>& v, const Chunk<T>& ch,
                        const T* taps, int64_t c, int64_t p0, int64_t p1) {
  const T sa = v.shifts[2 * c], sb = v.shifts[2 * c + 1];
  for (int64_t z0 = p0; z0 < p1; z0 += P) {
    const int count = p1 - z0 < P ? int(p1 - z0) : P;
    window_sums<kMaxMaps, K, P>(
        ex, t, taps, z0, count, v.d, [&](int y, int x, int64_t p) { return moments_at(v, c, sa, sb, y, x, p); },
        [&](int y, int x, int q, const Sums<T, kMaxMaps>& sums) {
          const int64_t z = z0 + q, yx = int64_t(y) * v.w + x;
          const T g = ch.grad ? ch.grad[((ch.grad_c0 + c) / ch.grad_div * v.d + z) * v.plane + yx]
                              : ch.grad_scalar[0] * ch.mean_scale;
          const Adjoints<T> d = ncc_adjoints(stats_from_sums(v, c, z, y, x, sums), g, v.eps);
          int map = 0;
          buffer_at(ch, v, c, map++, z)[yx] = d.cross;
          if (ch.needs.a) {
            buffer_at(ch, v, c, map++, z)[yx] = d.a;
            buffer_at(ch, v, c, map++, z)[yx] = d.aa;
          }
          if (ch.needs.b) {
            buffer_at(ch, v, c, map++, z)[yx] = d.b;
            buffer_at(ch, v, c, map++, z)[yx] = d.bb;
          }
        });
  }
}

// The gradients of channel c at planes [z0, z1) from the window sums of the chunk's MAPS adjoint maps
// (MAPS = needs.maps(): 3 with one gradient, 5 with both). K, P: window_sums.
template <int MAPS, int K, int P, typename T, typename Exec>
DA_HD void combine_unit(const Exec& ex, const PlaneTile<T>& t, const Volume<T>& v, const Chunk<T>& ch,
                        const T* taps, int64_t c, int64_t z0, int64_t z1, T* grad_a, T* grad_b) {
  const T sa = v.shifts[2 * c], sb = v.shifts[2 * c + 1];
  const int64_t map_stride = ch.planes * v.plane;
  const T* maps = buffer_at(ch, v, c, 0, ch.h0);
  for (int64_t z = z0; z < z1; z += P) {
    const int count = z1 - z < P ? int(z1 - z) : P;
    window_sums<MAPS, K, P>(
        ex, t, taps, z, count, v.d,
        [&](int y, int x, int64_t p) {
          const T* at = maps + (p - ch.h0) * v.plane + int64_t(y) * v.w + x;
          Sums<T, MAPS> s;
          DA_UNROLL
          for (int q = 0; q < MAPS; ++q) s.v[q] = DA_LOAD(at + q * map_stride);
          return s;
        },
        [&](int y, int x, int q, const Sums<T, MAPS>& s) {
          const int64_t voxel = (c * v.d + z + q) * v.plane + int64_t(y) * v.w + x;
          const T xa = DA_LOAD(v.a + voxel) - sa, xb = DA_LOAD(v.b + voxel) - sb;
          // sums: [cross, (a, aa), (b, bb)] as the adjoint maps
          if (ch.needs.a) grad_a[voxel] = input_gradient(s.v[1], s.v[2], s.v[0], xa, xb);
          if (ch.needs.b) {
            const T w_b = MAPS == kMaxMaps ? s.v[3] : s.v[1], w_bb = MAPS == kMaxMaps ? s.v[4] : s.v[2];
            grad_b[voxel] = input_gradient(w_b, w_bb, s.v[0], xb, xa);
          }
        });
  }
}

// ---- the plan shared by the launchers

// f(std::integral_constant<int, K>{}) with K = k for the window sizes compiled as such, else K = 0.
template <typename F>
void with_window_size(int k, F&& f) {
  switch (k) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 9: return f(std::integral_constant<int, 9>{});
    case 11: return f(std::integral_constant<int, 11>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// f(std::integral_constant<int, P>{}): the planes per step of window_sums for a window of K taps (0: known at
// run time only). Two for the window sizes compiled as such, unless DEEPATLAS_FAST_LNCC_Z_PLANES=1 (one, as
// before: kept to time both on a GPU); one for the generic path (its scratch for windows up to 31 taps,
// float64, would not fit twice in shared memory). Read at each call.
template <int K, typename F>
void with_z_planes(F&& f) {
  if constexpr (K > 0) {
    const char* value = std::getenv("DEEPATLAS_FAST_LNCC_Z_PLANES");
    const bool one = value != nullptr && std::strcmp(value, "1") == 0;
    TORCH_CHECK(value == nullptr || *value == '\0' || one || std::strcmp(value, "2") == 0,
                "deepatlas_fast: DEEPATLAS_FAST_LNCC_Z_PLANES must be 1 or 2, got '", value, "'");
    if (!one) return f(std::integral_constant<int, 2>{});
  }
  return f(std::integral_constant<int, 1>{});
}

// f(window, planes), integral constants: K of with_window_size for a window of k taps, then P of
// with_z_planes (the launchers' and the CPU emulation's one choice).
template <typename F>
void with_window_and_planes(int k, F&& f) {
  with_window_size(k, [&](auto window) {
    with_z_planes<decltype(window)::value>([&](auto planes) { f(window, planes); });
  });
}

// Units: tiles_x x tiles_y tiles times nc channels times runs of at most `run` planes of a range of
// `planes` planes (run grows so that nc x runs stays within max_z_units, CUDA's grid.z).
struct Plan {
  int tiles_x, tiles_y;
  int64_t run, runs;
};

inline Plan plan_units(int64_t nc, int64_t planes, int h, int w, int64_t max_z_units) {
  Plan p;
  p.tiles_x = (w + kTileX - 1) / kTileX;
  p.tiles_y = (h + kTileY - 1) / kTileY;
  const int64_t runs_allowed = max_z_units / nc > 0 ? max_z_units / nc : 1;
  p.run = kPlanesPerUnit;
  if ((planes + p.run - 1) / p.run > runs_allowed) p.run = (planes + runs_allowed - 1) / runs_allowed;
  p.runs = planes > 0 ? (planes + p.run - 1) / p.run : 0;
  return p;
}

// The unit (tile_x, tile_y, z_unit) of a plan over planes [first, first + planes); z_unit = c * runs + run.
struct Unit {
  int tile_x, tile_y;
  int64_t c, p0, p1;  // channel, planes [p0, p1)
};

DA_HD Unit unit_of(const Plan& p, int tile_x, int tile_y, int64_t z_unit, int64_t first, int64_t planes) {
  Unit u;
  u.tile_x = tile_x;
  u.tile_y = tile_y;
  u.c = z_unit / p.runs;
  u.p0 = first + (z_unit - u.c * p.runs) * p.run;
  u.p1 = u.p0 + p.run < first + planes ? u.p0 + p.run : first + planes;
  return u;
}

}  // namespace tile
}  // namespace lncc
}  // namespace deepatlas_fast
