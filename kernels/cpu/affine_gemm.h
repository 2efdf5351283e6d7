// A prompt's product y = x @ W.T for W in MLX's affine layout: W decoded to f32 in row blocks, each block through
// the f32 GEMM that MLX's own matmul calls (cblas_sgemm: OpenBLAS when mmt_mlx/blas.py loaded it first).
#pragma once

#include "affine_kernels.h"

namespace mmt {

// Token count from which affine_matmul_op takes this path; below it the integer kernels stream the codes once per
// 8 tokens. The 32-token boundary is the one the Python side used before (the tile GEMM measured 20-30% faster
// than the integer kernels at 256 tokens, 2026-12-03); it was not re-tuned.
constexpr int kGemmMinTokens = 33;

// y (tokens, rows) = x (tokens, cols) @ W.T, all row-contiguous f32. W is decoded (over the pool) into a buffer
// of at most kGemmBlockWeights floats that the calling thread keeps between calls (no page faults per product).
void affine_gemm(const AffineWeights& w, const float* x, float* y, int tokens);

}  // namespace mmt
