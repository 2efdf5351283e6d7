// Just enough of CUDA to run mmt_mlx's CUDA kernel bodies as C++20 on a CPU, on metal_compat.h's grid.
//
// The generated source passes threadIdx / blockIdx / blockDim to each body as parameters and defines
// `__shared__` as `static` only around the kernel text (storage shared by a block's threads, one block
// at a time); __syncthreads() is the block's std::barrier. No warp functions, no atomics.
#pragma once

#include <cmath>

#include "metal_compat.h"

typedef uint3 dim3;

inline void __syncthreads() { metal::harness::group_barrier->arrive_and_wait(); }

namespace cuda_harness {
using std::max;
using std::min;
}  // namespace cuda_harness
