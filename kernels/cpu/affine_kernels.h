// CPU kernels for y = x @ W.T with W in MLX's affine layout (w = scale * q + bias per group of columns).
// Plain C++ (no MLX types) so they can be tested and timed on their own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace mmt {

// IEEE half (bits) to float, portable (F16C is not assumed: the kernels read one scale per group).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct AffineWeights {
  const uint32_t* wq;      // (rows, cols * bits / 32) little-endian bit stream per row
  const void* scales;      // (rows, cols / group), f32, or f16 when `half` (the stored precision: fewer bytes)
  const void* biases;      // (rows, cols / group), same type as scales
  int rows;
  int cols;
  int bits;                // 2, 3, 4, 5, 6 or 8
  int group;               // 32, 64 or 128
  bool half;

  float scale(size_t k) const { return read(scales, k); }
  float bias(size_t k) const { return read(biases, k); }

 private:
  float read(const void* p, size_t k) const {
    return half ? half_to_float(static_cast<const uint16_t*>(p)[k]) : static_cast<const float*>(p)[k];
  }
};

// y (tokens, rows) = x (tokens, cols) @ W.T, all row-contiguous f32. Every output element is computed by one
// thread in a fixed order, so results do not depend on the thread count.
void affine_matmul(const AffineWeights& w, const float* x, float* y, int tokens);

// One token, y (rows) = W x, rows shared out by the pool whatever the size (the fused decode layer: the graph
// builder is idle while it runs); the same bits as affine_matmul's one-token product.
void affine_matvec_shared(const AffineWeights& w, const float* x, float* y);

// ys[i] = ws[i] x for n matrices of the same input width (q/k/v, gate/up) in one pool job; the same bits as
// affine_matvec_shared on each.
void affine_matvec_shared_many(int n, const AffineWeights* ws, const float* x, float* const* ys);

// out (rows, cols) = W as f32 (a long prompt's tile, then the BLAS GEMM): rows shared out by the pool.
void affine_dequantize(const AffineWeights& w, float* out);

// A prompt's y (tokens, rows) = x (tokens, cols) @ W.T through integer multiply-adds (x rounded to int16 per
// token and group, as for one token; int_gemm.inc). False, computing nothing, where this CPU has no integer
// kernels (the caller takes the f32 GEMM).
bool affine_int_gemm(const AffineWeights& w, const float* x, float* y, int tokens);

// The same product for codebook codes (the rotated Gaussian codes): W[r][j] = scale[r][g] * codebook[code[r][j]]
// with codes packed as MLX's affine layout packs them (w.biases unused, may be null), the codebook's 2^bits levels
// rounded to steps of max|level| / 2047 and x to int16 per 32 columns; any token count (a token's outputs do not depend on the others
// in the call, so a request gets the same bits alone and in a batch). False where the integer kernels are off.
// trellis: trellis codes (mmt_mlx/fgs/codes.py), the codebook a lut of 4 << bits levels indexed by each code's
// state (the low bits of the codes of the two rows above it) and the code; bits <= 6 (scalar codes: 2-6 or 8).
bool codebook_int_gemm(const AffineWeights& w, const float* codebook, const float* x, float* y, int tokens,
                       bool trellis = false);

// Whether the integer GEMM serves these codes on this CPU (AVX2, integer kernels not turned off).
bool int_gemm_available(int bits);

// Threads used by the kernels (default: MMT_THREADS or the number of cores); n <= 0 restores the default.
void set_num_threads(int n);
int num_threads();

// "avx2+fma" or "scalar": the code path chosen at run time for this CPU (MMT_NATIVE_ISA=scalar forces it).
const char* isa();

}  // namespace mmt
