// A prompt's product y = x @ W.T for W in MLX's affine layout. On x86 with AVX2 it is the integer GEMM of
// int_gemm.inc (x rounded to int16 per token and group, 16 rows of codes per vpdpwssd); elsewhere W is decoded to
// f32 in row blocks, each block through the f32 GEMM that MLX's own matmul calls (cblas_sgemm: OpenBLAS when
// mmt_mlx/blas.py loaded it first).
#pragma once

#include "affine_kernels.h"

namespace mmt {

// Token count from which affine_matmul_op takes this path; below it the integer kernels stream the codes once per
// 8 tokens. The integer GEMM is already faster from 4 tokens (bench/int_gemm_bench.cpp), but a continuous batch's
// decode step (one token per sequence) must give each sequence the bits it gets alone, which only the few-token
// kernels do (the same float order as one token's): so the switch stays above any batch the server runs.
constexpr int kGemmMinTokens = 33;

// y (tokens, rows) = x (tokens, cols) @ W.T, all row-contiguous f32. W is decoded (over the pool) into a buffer
// of at most kGemmBlockWeights floats that the calling thread keeps between calls (no page faults per product).
void affine_gemm(const AffineWeights& w, const float* x, float* y, int tokens);

}  // namespace mmt
