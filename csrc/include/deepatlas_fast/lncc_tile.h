// The tiled lncc algorithm of the CUDA `lncc_tiled` op, shared with its serial CPU emulation (the CPU
// registration of `lncc_tiled`), so that the CPU tests run the same tile code the GPU runs.
//
// A work unit is one in-plane tile of kTileY x kTileX output voxels of one channel over a run of planes.
// Per plane it computes the window sums of `MAPS` maps at every output voxel of the tile in three phases
// separated by barriers, all in the unit's scratch (shared memory on CUDA):
//   A. z-window sums of the maps at every column of the tile plus a halo of `half` voxels each side
//      (column(): the caller's maps, straight from global memory, zero outside the volume);
//   B. x-window sums of A at every (halo row, output column);
//   C. y-window sums of B at every output voxel, handed to visit().
// The forward's maps are the 5 shifted moments (lncc.h) and visit() forms the NCC; the backward runs it
// twice: once for the adjoint maps (written to a buffer), once over those maps to combine the gradients.
// Versus one kernel per axis (cuda/lncc.cu) the intermediate sums never leave the unit's scratch.
//
// Exec runs the phases: for_each(n, f) calls f(i) for i in [0, n) (on CUDA spread over the block's
// threads), sync() is the barrier between phases (__syncthreads on CUDA, nothing when serial). Phase C
// needs no barrier after it: the next plane's phase A writes only the z sums, and its barrier comes before
// phase B overwrites the x sums that C reads.
#pragma once

#include "deepatlas_fast/common.h"
#include "deepatlas_fast/lncc.h"

#if defined(__CUDACC__)
#define DA_LOAD(p) __ldg(p)
#define DA_NO_UNROLL _Pragma("unroll 1")
#else
#define DA_LOAD(p) (*(p))
#define DA_NO_UNROLL
#endif

namespace deepatlas_fast {
namespace lncc {
namespace tile {

constexpr int kTileX = 32;      // output columns per tile (one warp's worth of coalesced x)
constexpr int kTileY = 16;      // output rows per tile
constexpr int kMaxMaps = 5;     // moments (forward), adjoint maps with both gradients (backward)
constexpr int kMaxKernelSize = 31;  // the scratch grows with the halo: 31 taps, float64 = 173 KB
constexpr int kPlanesPerUnit = 16;  // planes a unit streams (units = tiles x channels x plane runs)

// The window's taps along each axis (window_tap), by value: a CUDA kernel argument.
template <typename T>
struct Taps {
  T tap[kMaxKernelSize];
  DA_HD T operator[](int j) const { return tap[j]; }
  DA_HD const T* data() const { return tap; }
};

// Scratch elements of one unit for a window of `half` voxels each side: z sums [maps][halo_y][halo_x],
// then x sums [maps][halo_y][kTileX].
DA_HD int scratch_elements(int half) {
  const int halo_y = kTileY + 2 * half, halo_x = kTileX + 2 * half;
  return kMaxMaps * halo_y * (halo_x + kTileX);
}

// The tile of a unit in a plane of h x w voxels: outputs [y0, y0 + kTileY) x [x0, x0 + kTileX) (clipped).
template <typename T>
struct PlaneTile {
  T* z_sums;
  T* x_sums;
  int y0, x0, h, w, half;
  DA_HD int halo_y() const { return kTileY + 2 * half; }
  DA_HD int halo_x() const { return kTileX + 2 * half; }
};

template <typename T>
DA_HD PlaneTile<T> plane_tile(T* scratch, int tile_y, int tile_x, int h, int w, int half) {
  PlaneTile<T> t{scratch, nullptr, tile_y * kTileY, tile_x * kTileX, h, w, half};
  t.x_sums = scratch + kMaxMaps * t.halo_y() * t.halo_x();
  return t;
}

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

// Phases A-C above for one plane. column(y, x) returns the z-window sums of the MAPS maps at the
// in-volume column (y, x); visit(y, x, sums) receives the window sums at each in-volume output voxel.
// taps: the k taps of the window along each axis.
template <int MAPS, typename T, typename Exec, typename Column, typename Visit>
DA_HD void window_sums(const Exec& ex, const PlaneTile<T>& t, const T* taps, int k, Column&& column,
                       Visit&& visit) {
  const int hy = t.halo_y(), hx = t.halo_x();
  ex.for_each(hy * hx, [&](int i) {
    const int iy = i / hx, ix = i - iy * hx;
    const int y = t.y0 - t.half + iy, x = t.x0 - t.half + ix;
    Sums<T, MAPS> sums = zero_sums<T, MAPS>();
    if (y >= 0 && y < t.h && x >= 0 && x < t.w) sums = column(y, x);
    DA_UNROLL
    for (int q = 0; q < MAPS; ++q) t.z_sums[(q * hy + iy) * hx + ix] = sums.v[q];
  });
  ex.sync();
  ex.for_each(hy * kTileX, [&](int i) {
    const int iy = i / kTileX, ox = i - iy * kTileX;
    DA_UNROLL
    for (int q = 0; q < MAPS; ++q) {
      const T* row = t.z_sums + (q * hy + iy) * hx + ox;
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += taps[j] * row[j];
      t.x_sums[(q * hy + iy) * kTileX + ox] = sum;
    }
  });
  ex.sync();
  ex.for_each(kTileY * kTileX, [&](int i) {
    const int oy = i / kTileX, ox = i - oy * kTileX;
    const int y = t.y0 + oy, x = t.x0 + ox;
    if (y >= t.h || x >= t.w) return;
    Sums<T, MAPS> sums;
    DA_UNROLL
    for (int q = 0; q < MAPS; ++q) {
      const T* col = t.x_sums + (q * hy + oy) * kTileX + ox;
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += taps[j] * col[j * kTileX];
      sums.v[q] = sum;
    }
    visit(y, x, sums);
  });
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

// z-window sums of the 5 shifted moments of channel c at column (y, x), centred on plane z.
template <typename T>
DA_HD Sums<T, kMaxMaps> moment_column(const Volume<T>& v, const T* taps, int k, int64_t c, int64_t z, int y, int x) {
  const T sa = v.shifts[2 * c], sb = v.shifts[2 * c + 1];
  Sums<T, kMaxMaps> s = zero_sums<T, kMaxMaps>();
  const int64_t column = c * v.d * v.plane + int64_t(y) * v.w + x;
  for (int j = 0; j < k; ++j) {
    const int64_t t = z + j - v.half;
    if (t < 0 || t >= v.d) continue;
    const T xa = DA_LOAD(v.a + column + t * v.plane) - sa, xb = DA_LOAD(v.b + column + t * v.plane) - sb;
    const T wa = taps[j] * xa, wb = taps[j] * xb;
    s.v[0] += wa;
    s.v[1] += wb;
    s.v[2] += wa * xa;
    s.v[3] += wb * xb;
    s.v[4] += wa * xb;
  }
  return s;
}

// ---- forward: the NCC map, or the unit's partial sum of it (returned; reduction="mean")

template <typename T, typename Exec>
DA_HD T forward_unit(const Exec& ex, const PlaneTile<T>& t, const Volume<T>& v, const T* taps, int k, int64_t c,
                     int64_t z0, int64_t z1, T* map) {
  T partial = 0;
  for (int64_t z = z0; z < z1; ++z) {
    window_sums<kMaxMaps>(
        ex, t, taps, k, [&](int y, int x) { return moment_column(v, taps, k, c, z, y, x); },
        [&](int y, int x, const Sums<T, kMaxMaps>& sums) {
          const T ncc = ncc_value(stats_from_sums(v, c, z, y, x, sums), v.eps);
          if (map) {
            map[(c * v.d + z) * v.plane + int64_t(y) * v.w + x] = ncc;
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
  const T* grad;         // the upstream map (reduction="none"), or nullptr and:
  const T* grad_scalar;  // the upstream scalar (reduction="mean"), times
  T mean_scale;          // -1 / numel
};

template <typename T>
DA_HD T* buffer_at(const Chunk<T>& ch, const Volume<T>& v, int64_t c, int map, int64_t z) {
  return ch.buffer + ((c * ch.needs.maps() + map) * ch.planes + (z - ch.h0)) * v.plane;
}

// The adjoint maps of channel c at planes [p0, p1) (within the chunk's buffer planes).
template <typename T, typename Exec>
DA_HD void adjoint_unit(const Exec& ex, const PlaneTile<T>& t, const Volume<T>& v, const Chunk<T>& ch,
                        const T* taps, int k, int64_t c, int64_t p0, int64_t p1) {
  for (int64_t z = p0; z < p1; ++z) {
    window_sums<kMaxMaps>(
        ex, t, taps, k, [&](int y, int x) { return moment_column(v, taps, k, c, z, y, x); },
        [&](int y, int x, const Sums<T, kMaxMaps>& sums) {
          const int64_t yx = int64_t(y) * v.w + x;
          const T g = ch.grad ? ch.grad[(c * v.d + z) * v.plane + yx] : ch.grad_scalar[0] * ch.mean_scale;
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
// (MAPS = needs.maps(): 3 with one gradient, 5 with both).
template <int MAPS, typename T, typename Exec>
DA_HD void combine_unit(const Exec& ex, const PlaneTile<T>& t, const Volume<T>& v, const Chunk<T>& ch,
                        const T* taps, int k, int64_t c, int64_t z0, int64_t z1, T* grad_a, T* grad_b) {
  const T sa = v.shifts[2 * c], sb = v.shifts[2 * c + 1];
  for (int64_t z = z0; z < z1; ++z) {
    window_sums<MAPS>(
        ex, t, taps, k,
        [&](int y, int x) {
          Sums<T, MAPS> s = zero_sums<T, MAPS>();
          const T* column = buffer_at(ch, v, c, 0, z) + int64_t(y) * v.w + x;
          const int64_t map_stride = ch.planes * v.plane;
          const int64_t first = z - v.half > 0 ? z - v.half : 0, last = z + v.half < v.d ? z + v.half : v.d - 1;
          DA_NO_UNROLL
          for (int64_t p = first; p <= last; ++p) {
            const T tap = taps[p - z + v.half];
            const T* at = column + (p - z) * v.plane;
            DA_UNROLL
            for (int q = 0; q < MAPS; ++q) s.v[q] += tap * DA_LOAD(at + q * map_stride);
          }
          return s;
        },
        [&](int y, int x, const Sums<T, MAPS>& s) {
          const int64_t voxel = (c * v.d + z) * v.plane + int64_t(y) * v.w + x;
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

// Chunks of output planes for the backward: each chunk's buffer (maps x (chunk + 2 half) planes per
// channel) holds about `buffer_volumes` input volumes, at least min_chunk planes.
inline int64_t backward_chunk(int64_t d, int half, int maps, int64_t buffer_volumes, int64_t min_chunk) {
  const int64_t fit = buffer_volumes * d / maps - 2 * int64_t(half);
  const int64_t chunk = fit > min_chunk ? fit : min_chunk;
  return chunk < d ? chunk : d;
}

}  // namespace tile
}  // namespace lncc
}  // namespace deepatlas_fast
