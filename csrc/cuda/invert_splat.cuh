// One level of invert's initial-guess splat by tiles (include/deepatlas_fast/invert_splat_tile.h), launched by
// cuda/splat_tiled.cu's kernel: used by the invert_splat_tiled op and, with DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled,
// by invert's pyramid (cuda/inversion.cu).
#pragma once

#include <cuda_runtime.h>

#include "deepatlas_fast/inversion.h"

namespace deepatlas_fast {
namespace inversion {

// acc [n, level.cells, 4] (zeroed) += the splat of coords [n, 3, *src] (see splat_source_tile), on `stream`.
template <typename T>
void splat_level_tiled(const T* coords, T* acc, int64_t n, const Grid& src, const Grid& level, cudaStream_t stream);

}  // namespace inversion
}  // namespace deepatlas_fast
