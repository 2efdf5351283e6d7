// Affine-quantized matmul kernels: one token streams each packed row once (fused unpack + dot with x, the
// bias term through per-group sums of x); many tokens dequantize a few rows into L1 and reuse them for every
// token. Rows are shared out by thread_pool.cpp. AVX2/FMA code is compiled with target attributes and chosen at run time; the scalar code is the
// portable fallback (and what other CPUs run).
#include "affine_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define MMT_X86 1
#include <immintrin.h>
#endif
#include <thread>

#include "thread_pool.h"

namespace mmt {
namespace {

constexpr int kRowBlock = 4;     // rows dequantized together in the many-token kernel
constexpr int kTokenBlock = 64;  // tokens per pass over a row block (keeps x's slice in L2)

int g_threads = 0;

int default_threads() {
  if (const char* env = std::getenv("MMT_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

// Eight q values starting at value index j (a multiple of 8) of a row: the low 8 * bits bits of one unaligned
// 8-byte load (a fixed-size memcpy compiles to a single mov). Bytes past the values belong to the next row or,
// for the last row, to RowReader's padding; the shifts and masks of the callers never use them.
inline uint64_t load8(const uint8_t* row, int j, int bits) {
  uint64_t v;
  std::memcpy(&v, row + (j / 8) * bits, 8);
  return v;
}

// ---------------------------------------------------------------- scalar
float dot_row_scalar(const AffineWeights& w, const uint8_t* row, int r, const float* x, const float* xsum) {
  const int ng = w.cols / w.group;
  const uint64_t mask = (1u << w.bits) - 1;
  float acc = 0.f;
  for (int g = 0; g < ng; ++g) {
    float d = 0.f;
    for (int j = g * w.group; j < (g + 1) * w.group; j += 8) {
      uint64_t v = load8(row, j, w.bits);
      for (int k = 0; k < 8; ++k) d += float((v >> (k * w.bits)) & mask) * x[j + k];
    }
    acc += w.scales[size_t(r) * ng + g] * d + w.biases[size_t(r) * ng + g] * xsum[g];
  }
  return acc;
}

void dequant_row_scalar(const AffineWeights& w, const uint8_t* row, int r, float* out) {
  const int ng = w.cols / w.group;
  const uint64_t mask = (1u << w.bits) - 1;
  for (int g = 0; g < ng; ++g) {
    const float s = w.scales[size_t(r) * ng + g], b = w.biases[size_t(r) * ng + g];
    for (int j = g * w.group; j < (g + 1) * w.group; j += 8) {
      uint64_t v = load8(row, j, w.bits);
      for (int k = 0; k < 8; ++k) out[j + k] = s * float((v >> (k * w.bits)) & mask) + b;
    }
  }
}

float dot_scalar(const float* a, const float* b, int n) {
  float acc = 0.f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#ifdef MMT_X86
// ---------------------------------------------------------------- AVX2 + FMA
__attribute__((target("avx2,fma"))) inline __m256 unpack8(const uint8_t* row, int j, int bits) {
  // lanes 0-3 take values 0-3 from the low 32 bits, lanes 4-7 values 4-7 from the bits after them
  uint64_t v;
  if (bits == 8) {
    std::memcpy(&v, row + j, 8);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(v))));
  }
  v = load8(row, j, bits);
  const uint32_t lo = uint32_t(v), hi = uint32_t(v >> (4 * bits));
  const __m256i words = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
  const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 0, bits, 2 * bits, 3 * bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(words, shifts), mask));
}

__attribute__((target("avx2,fma"))) inline __m256 unpack8_4bit(const uint32_t* words, int j) {
  const __m256i v = _mm256_set1_epi32(int(words[j / 8]));
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32(15)));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256 unpack(const uint8_t* row, int j) {
  if constexpr (BITS == 4) return unpack8_4bit(reinterpret_cast<const uint32_t*>(row), j);
  return unpack8(row, j, BITS);
}

// NR rows (1 or 2) at once: they share every load of x; 2 x 2 accumulators per row hide the FMA latency.
template <int BITS, int NR>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(
    const AffineWeights& w, const uint8_t* const* rows, int r, const float* x, const float* xsum, float* out) {
  const int ng = w.cols / w.group;
  __m256 acc[NR];
  float bias_part[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm256_setzero_ps(), bias_part[i] = 0.f;
  for (int g = 0; g < ng; ++g) {
    __m256 d[NR][2];
    for (int i = 0; i < NR; ++i) d[i][0] = d[i][1] = _mm256_setzero_ps();
    const int j0 = g * w.group, j1 = j0 + w.group;
    for (int j = j0; j < j1; j += 16) {  // groups are multiples of 32
      const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
      for (int i = 0; i < NR; ++i) {
        d[i][0] = _mm256_fmadd_ps(unpack<BITS>(rows[i], j), x0, d[i][0]);
        d[i][1] = _mm256_fmadd_ps(unpack<BITS>(rows[i], j + 8), x1, d[i][1]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      const size_t k = size_t(r + i) * ng + g;
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(w.scales[k]), _mm256_add_ps(d[i][0], d[i][1]), acc[i]);
      bias_part[i] += w.biases[k] * xsum[g];
    }
  }
  for (int i = 0; i < NR; ++i) out[i] = hsum(acc[i]) + bias_part[i];
}

__attribute__((target("avx2,fma"))) void dequant_row_avx2(
    const AffineWeights& w, const uint8_t* row, int r, float* out) {
  const int ng = w.cols / w.group;
  for (int g = 0; g < ng; ++g) {
    const __m256 s = _mm256_set1_ps(w.scales[size_t(r) * ng + g]);
    const __m256 b = _mm256_set1_ps(w.biases[size_t(r) * ng + g]);
    for (int j = g * w.group; j < (g + 1) * w.group; j += 8) {
      const __m256 q = w.bits == 4 ? unpack8_4bit(reinterpret_cast<const uint32_t*>(row), j)
                                   : unpack8(row, j, w.bits);
      _mm256_storeu_ps(out + j, _mm256_fmadd_ps(s, q, b));
    }
  }
}

// y[t, r0..r0+n) for one token: n (<= kRowBlock) dequantized rows share every load of x
__attribute__((target("avx2,fma"))) void dots_avx2(
    const float* rows, int n, int cols, const float* x, float* out) {
  __m256 a[kRowBlock];
  for (int i = 0; i < kRowBlock; ++i) a[i] = _mm256_setzero_ps();
  for (int j = 0; j < cols; j += 8) {
    const __m256 xv = _mm256_loadu_ps(x + j);
    for (int i = 0; i < n; ++i) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + size_t(i) * cols + j), xv, a[i]);
  }
  for (int i = 0; i < n; ++i) out[i] = hsum(a[i]);
}
#endif  // MMT_X86

bool use_avx2() {
#ifdef MMT_X86
  static const bool ok = [] {
    const char* force = std::getenv("MMT_NATIVE_ISA");
    if (force && std::string(force) == "scalar") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// Computes rows r and r + 1 (pair) or row r alone; the scalar code does the same row by row.
using DotRows = void (*)(const AffineWeights&, const uint8_t* const*, int, const float*, const float*, float*);

template <int NR>
void dot_rows_scalar(const AffineWeights& w, const uint8_t* const* rows, int r, const float* x, const float* xsum,
                     float* out) {
  for (int i = 0; i < NR; ++i) out[i] = dot_row_scalar(w, rows[i], r + i, x, xsum);
}

template <int NR>
DotRows pick_dot_rows(int bits) {
#ifdef MMT_X86
  if (use_avx2()) {
    switch (bits) {
      case 2: return dot_rows_avx2<2, NR>;
      case 3: return dot_rows_avx2<3, NR>;
      case 4: return dot_rows_avx2<4, NR>;
      case 5: return dot_rows_avx2<5, NR>;
      case 6: return dot_rows_avx2<6, NR>;
      case 8: return dot_rows_avx2<8, NR>;
    }
  }
#endif
  return dot_rows_scalar<NR>;
}

// The last row of the matrix is copied into a padded buffer: load8 may read up to 8 bytes from a chunk of
// `bits` bytes, which would run past the end of the array.
struct RowReader {
  const AffineWeights& w;
  size_t row_bytes;
  std::vector<uint8_t> last;
  explicit RowReader(const AffineWeights& w_) : w(w_), row_bytes(size_t(w_.cols) * w_.bits / 8) {
    last.assign(row_bytes + 8, 0);
    std::memcpy(last.data(), reinterpret_cast<const uint8_t*>(w.wq) + (w.rows - 1) * row_bytes, row_bytes);
  }
  const uint8_t* row(int r) const {
    return r == w.rows - 1 ? last.data() : reinterpret_cast<const uint8_t*>(w.wq) + size_t(r) * row_bytes;
  }
};

void matvec(const AffineWeights& w, const RowReader& rd, const float* x, float* y, int nthreads) {
  const int ng = w.cols / w.group;
  std::vector<float> xsum(ng);
  for (int g = 0; g < ng; ++g) {
    float s = 0.f;
    for (int j = g * w.group; j < (g + 1) * w.group; ++j) s += x[j];
    xsum[g] = s;
  }
  const DotRows dot2 = pick_dot_rows<2>(w.bits), dot1 = pick_dot_rows<1>(w.bits);
  const int pairs = w.rows / 2;
  constexpr int kPairsPerChunk = 16;
  const int nchunks = (pairs + kPairsPerChunk - 1) / kPairsPerChunk;
  parallel_for(nchunks, w.rows >= 128 ? nthreads : 1, [&](int c) {
    const int p1 = std::min(pairs, (c + 1) * kPairsPerChunk);
    for (int p = c * kPairsPerChunk; p < p1; ++p) {
      const uint8_t* rows[2] = {rd.row(2 * p), rd.row(2 * p + 1)};
      dot2(w, rows, 2 * p, x, xsum.data(), y + 2 * p);
    }
  });
  if (w.rows % 2) {
    const uint8_t* last[1] = {rd.row(w.rows - 1)};
    dot1(w, last, w.rows - 1, x, xsum.data(), y + w.rows - 1);
  }
}

void matmul_tiles(const AffineWeights& w, const RowReader& rd, const float* x, float* y, int tokens,
                  int nthreads) {
  const int nblocks = (w.rows + kRowBlock - 1) / kRowBlock;
  const bool avx2 = use_avx2();
  parallel_for(nblocks, nthreads, [&](int b) {
    thread_local std::vector<float> buf;
    buf.resize(size_t(kRowBlock) * w.cols);
    const int r0 = b * kRowBlock, n = std::min(kRowBlock, w.rows - r0);
    for (int i = 0; i < n; ++i) {
#ifdef MMT_X86
      if (avx2) {
        dequant_row_avx2(w, rd.row(r0 + i), r0 + i, buf.data() + size_t(i) * w.cols);
        continue;
      }
#endif
      dequant_row_scalar(w, rd.row(r0 + i), r0 + i, buf.data() + size_t(i) * w.cols);
    }
    float out[kRowBlock];
    for (int t = 0; t < tokens; ++t) {
      const float* xt = x + size_t(t) * w.cols;
#ifdef MMT_X86
      if (avx2) {
        dots_avx2(buf.data(), n, w.cols, xt, out);
      } else
#endif
      {
        for (int i = 0; i < n; ++i) out[i] = dot_scalar(buf.data() + size_t(i) * w.cols, xt, w.cols);
      }
      for (int i = 0; i < n; ++i) y[size_t(t) * w.rows + r0 + i] = out[i];
    }
  });
}

}  // namespace

void set_num_threads(int n) { g_threads = n > 0 ? n : 0; }

int num_threads() { return g_threads > 0 ? g_threads : default_threads(); }

const char* isa() { return use_avx2() ? "avx2+fma" : "scalar"; }


void affine_matmul(const AffineWeights& w, const float* x, float* y, int tokens) {
  if (w.rows == 0 || tokens == 0) return;
  const RowReader rd(w);
  const int nthreads = num_threads();
  // A token or two: stream the packed weights once per token; more: dequantize row tiles once.
  if (tokens <= 2) {
    for (int t = 0; t < tokens; ++t) matvec(w, rd, x + size_t(t) * w.cols, y + size_t(t) * w.rows, nthreads);
    return;
  }
  matmul_tiles(w, rd, x, y, tokens, nthreads);
}

}  // namespace mmt
