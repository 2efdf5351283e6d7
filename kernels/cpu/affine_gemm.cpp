#include "affine_gemm.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cblas.h"

namespace mmt {
namespace {

// Weights decoded per GEMM call: 8 MB of f32 holds any projection of SmolLM2 or Gemma 3 (2,048 x 640) whole (1 MB
// tiles through MLX ops had taken Gemma's 6-bit products at 256 tokens ~530 ms, these blocks 363 ms: README,
// bench/prefill_profile.py); a vocabulary head (a perplexity run's logits) goes in blocks of rows.
constexpr size_t kGemmBlockWeights = size_t(1) << 21;

// Rows [r0, r0 + n) of w as a matrix of their own (same codes, scales and biases, no copy).
AffineWeights row_block(const AffineWeights& w, int r0, int n) {
  const size_t words = size_t(w.cols) * w.bits / 32, ng = size_t(w.cols / w.group), esize = w.half ? 2 : 4;
  AffineWeights b = w;
  b.wq = w.wq + size_t(r0) * words;
  b.scales = static_cast<const char*>(w.scales) + size_t(r0) * ng * esize;
  b.biases = static_cast<const char*>(w.biases) + size_t(r0) * ng * esize;
  b.rows = n;
  return b;
}

}  // namespace

void affine_gemm(const AffineWeights& w, const float* x, float* y, int tokens) {
  if (w.rows == 0 || tokens == 0) return;
  if (affine_int_gemm(w, x, y, tokens)) return;  // CPUs with the integer kernels (AVX2); others decode to f32
  const int block = int(std::max<size_t>(1, std::min<size_t>(w.rows, kGemmBlockWeights / size_t(w.cols))));
  thread_local std::vector<float> buf;
  buf.resize(size_t(block) * w.cols);
  for (int r0 = 0; r0 < w.rows; r0 += block) {
    const int n = std::min(block, w.rows - r0);
    affine_dequantize(row_block(w, r0, n), buf.data());
    cblas_sgemm(kCblasRowMajor, kCblasNoTrans, kCblasTrans, tokens, n, w.cols, 1.f, x, w.cols, buf.data(), w.cols,
                0.f, y + r0, w.rows);
  }
}

}  // namespace mmt
