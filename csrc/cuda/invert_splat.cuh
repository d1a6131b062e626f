// invert's splats by tiles, launched by cuda/splat_tiled.cu's kernels: one level of the initial-guess pyramid
// (include/deepatlas_fast/invert_splat_tile.h; the invert_splat_tiled op) and the backward
// (invert_backward_tile.h; the invert_*backward_tiled ops); with DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled, invert's
// pyramid and backward (cuda/inversion.cu).
#pragma once

#include <cuda_runtime.h>

#include "deepatlas_fast/inversion.h"

namespace deepatlas_fast {
namespace inversion {

// acc [n, level.cells, 4] (zeroed) += the splat of coords [n, 3, *src] (see splat_source_tile), on `stream`.
template <typename T>
void splat_level_tiled(const T* coords, T* acc, int64_t n, const Grid& src, const Grid& level, cudaStream_t stream);

// out [n, 3, *src] (zeroed) += invert's (DISP: invert_displacement's) backward splat by tiles of target points
// (invert_backward_tile.h), on `stream`.
template <typename T, bool DISP>
void backward_tiled(const T* grad, const T* field, const T* inverse, const bool* valid, T* out, int64_t n,
                    const Grid& src, const Grid& target, cudaStream_t stream);

}  // namespace inversion
}  // namespace deepatlas_fast
