// CPU kernels for y = x @ W.T with W in MLX's affine layout (w = scale * q + bias per group of columns).
// Plain C++ (no MLX types) so they can be tested and timed on their own.
#pragma once

#include <cstdint>

namespace mmt {

struct AffineWeights {
  const uint32_t* wq;      // (rows, cols * bits / 32) little-endian bit stream per row
  const float* scales;     // (rows, cols / group)
  const float* biases;     // (rows, cols / group)
  int rows;
  int cols;
  int bits;                // 2, 3, 4, 5, 6 or 8
  int group;               // 32, 64 or 128
};

// y (tokens, rows) = x (tokens, cols) @ W.T, all row-contiguous f32. Every output element is computed by one
// thread in a fixed order, so results do not depend on the thread count.
void affine_matmul(const AffineWeights& w, const float* x, float* y, int tokens);

// Threads used by the kernels (default: MMT_THREADS or the number of cores); n <= 0 restores the default.
void set_num_threads(int n);
int num_threads();

// "avx2+fma" or "scalar": the code path chosen at run time for this CPU (MMT_NATIVE_ISA=scalar forces it).
const char* isa();

}  // namespace mmt
