// Affine-quantized matmul kernels: one token streams each packed row once (fused unpack + dot with x, the
// bias term through per-group sums of x); many tokens dequantize a few rows into L1 and reuse them for every
// token. Rows are shared out by thread_pool.cpp. AVX2/FMA code is compiled with target attributes and chosen at run time; the scalar code is the
// portable fallback (and what other CPUs run).
#include "affine_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <limits>
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
constexpr int kMaxIntTokens = 8;  // up to this many tokens share one pass over the packed weights

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
    acc += w.scale(size_t(r) * ng + g) * d + w.bias(size_t(r) * ng + g) * xsum[g];
  }
  return acc;
}

void dequant_row_scalar(const AffineWeights& w, const uint8_t* row, int r, float* out) {
  const int ng = w.cols / w.group;
  const uint64_t mask = (1u << w.bits) - 1;
  for (int g = 0; g < ng; ++g) {
    const float s = w.scale(size_t(r) * ng + g), b = w.bias(size_t(r) * ng + g);
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
// ---------------------------------------------------------------- AVX2 + FMA (+ F16C for f16 scales)
__attribute__((target("avx2,fma,f16c"))) inline float read_x86(const void* p, bool half, size_t k) {
  return half ? _cvtsh_ss(static_cast<const uint16_t*>(p)[k]) : static_cast<const float*>(p)[k];
}
__attribute__((target("avx2,fma,f16c"))) inline float scale_x86(const AffineWeights& w, size_t k) {
  return read_x86(w.scales, w.half, k);
}
__attribute__((target("avx2,fma,f16c"))) inline float bias_x86(const AffineWeights& w, size_t k) {
  return read_x86(w.biases, w.half, k);
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 unpack8(const uint8_t* row, int j, int bits) {
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

__attribute__((target("avx2,fma,f16c"))) inline __m256 unpack8_4bit(const uint32_t* words, int j) {
  const __m256i v = _mm256_set1_epi32(int(words[j / 8]));
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32(15)));
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline __m256 unpack(const uint8_t* row, int j) {
  if constexpr (BITS == 4) return unpack8_4bit(reinterpret_cast<const uint32_t*>(row), j);
  return unpack8(row, j, BITS);
}

// NR rows (1 or 2) at once: they share every load of x; 2 x 2 accumulators per row hide the FMA latency.
template <int BITS, int NR>
__attribute__((target("avx2,fma,f16c"))) void dot_rows_avx2(
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
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale_x86(w, k)), _mm256_add_ps(d[i][0], d[i][1]), acc[i]);
      bias_part[i] += bias_x86(w, k) * xsum[g];
    }
  }
  for (int i = 0; i < NR; ++i) out[i] = hsum(acc[i]) + bias_part[i];
}

// ---------------------------------------------------------------- AVX2 integer path (4- and 8-bit codes)
// For one token the float path spends ~5 instructions per 8 weights unpacking and converting codes. Here x
// is rounded once per token to int16 per group (scale = group max / 32767, so each product carries a relative
// error of at most 2^-16 of the group's largest |x|) and the codes stay integers: 4-bit bytes split into their
// two nibbles and meet x's even and odd values in one vpmaddwd each (32 weights in ~7 instructions), exact
// int32 sums per group, one float FMA per group with scale * x_scale.

// x prepared for the integer kernels: int16 values (4-bit: per 32 values the 16 even ones, then the 16 odd
// ones, matching the low and high nibbles of 16 packed bytes; other widths: natural order) and one scale per group.
// MMT_PREFETCH=0 turns the integer kernels' software prefetch off (int_kernels.inc; for paired A/B runs).
const bool g_prefetch = [] {
  const char* e = std::getenv("MMT_PREFETCH");
  return !(e && std::string(e) == "0");
}();

struct IntX {
  std::vector<int16_t> v;
  std::vector<float> scale;
};


// The last row of the matrix is copied into a padded buffer: load8 may read up to 8 bytes from a chunk of
// `bits` bytes and unpack16_i16 16 bytes from one of 2 * bits bytes, which would run past the end of the array.
struct RowReader {
  const AffineWeights& w;
  size_t row_bytes;
  std::vector<uint8_t> last;
  explicit RowReader(const AffineWeights& w_) : w(w_), row_bytes(size_t(w_.cols) * w_.bits / 8) {
    last.assign(row_bytes + 16, 0);
    std::memcpy(last.data(), reinterpret_cast<const uint8_t*>(w.wq) + (w.rows - 1) * row_bytes, row_bytes);
  }
  const uint8_t* row(int r) const {
    return r == w.rows - 1 ? last.data() : reinterpret_cast<const uint8_t*>(w.wq) + size_t(r) * row_bytes;
  }
};

// Rows per chunk when a one-token product is shared out: about 256 KB of codes (an even number of chunks, at
// least two), a multiple of 4, so that each thread streams long runs of its own rows. The kernels prefetch 32 KB
// ahead of their rows: with the fixed row counts of before (64 rows in a layer, 256 in a head) a thread's
// prefetches fell into the chunk the other thread took and the second thread added little. Measured with
// bench/matvec_bandwidth.cpp, 2 threads, Zen 4 host, 2026-12-04 13:28 UTC (same bits either way): Gemma's 18
// layers of 6-bit products (`gemma 6 32`) 3.9-4.4 ms a pass against 4.5-5.2 with MMT_SPLIT_CHUNK_KB=30 (about
// 64 rows); its 262,144 x 640 5-bit head (`matrix 262144 640 5 32`) 5.8-6.0 ms against 6.8-7.4 with
// MMT_SPLIT_CHUNK_KB=100 (about 256 rows); README "Kernels" has the decode figures.
// MMT_SPLIT_CHUNK_KB overrides the size (read once; for A/B runs).
constexpr size_t kSplitChunkBytes = size_t(256) << 10;

size_t split_chunk_bytes() {
  static const size_t n = [] {
    const char* env = std::getenv("MMT_SPLIT_CHUNK_KB");
    const long long kb = env ? std::atoll(env) : 0;
    return kb > 0 ? size_t(kb) << 10 : kSplitChunkBytes;
  }();
  return n;
}

int split_chunk_rows(const AffineWeights& w) {
  const size_t row_bytes = size_t(w.cols) * w.bits / 8, bytes = row_bytes * w.rows, target = split_chunk_bytes();
  size_t chunks = std::max<size_t>(2, (bytes + target - 1) / target);
  chunks += chunks % 2;
  const size_t rows = (size_t(w.rows) + chunks - 1) / chunks;
  return int(std::max<size_t>(4, (rows + 3) / 4 * 4));
}

namespace avx2 {
#define MMT_INT_TARGET __attribute__((target("avx2,fma,f16c")))
#define MMT_INT_VNNI 0
#include "int_kernels.inc"
#include "int_gemm.inc"
#undef MMT_INT_TARGET
#undef MMT_INT_VNNI
}  // namespace avx2

namespace vnni {
#define MMT_INT_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define MMT_INT_VNNI 1
#include "int_kernels.inc"
#include "int_gemm.inc"
#undef MMT_INT_TARGET
#undef MMT_INT_VNNI
}  // namespace vnni

// x rounded once per token to int16 per group (quantize_x_row, shared with the prompt GEMM), in the order the
// one-token and few-token kernels read it: 4-bit codes meet x's even values of a 32-value chunk, then its odd
// ones; every other width takes natural order (as unpack16_i16 and the byte widening give the codes).
void prepare_int_x(const float* x, int cols, int group, int bits, IntX& q) {
  thread_local std::vector<float> sums;
  thread_local std::vector<int16_t> natural;
  q.v.resize(cols);
  q.scale.resize(cols / group);
  sums.resize(cols / group);
  if (bits != 4) {
    avx2::quantize_x_row(x, cols, group, q.v.data(), q.scale.data(), sums.data());
    return;
  }
  natural.resize(cols);
  avx2::quantize_x_row(x, cols, group, natural.data(), q.scale.data(), sums.data());
  for (int j = 0; j < cols; ++j) {
    const int c = j / 32, k = j % 32;  // value k of chunk c: even ones first, then odd ones
    q.v[size_t(c) * 32 + (k % 2) * 16 + k / 2] = natural[j];
  }
}

__attribute__((target("avx2,fma,f16c"))) void dequant_row_avx2(
    const AffineWeights& w, const uint8_t* row, int r, float* out) {
  const int ng = w.cols / w.group;
  for (int g = 0; g < ng; ++g) {
    const __m256 s = _mm256_set1_ps(scale_x86(w, size_t(r) * ng + g));
    const __m256 b = _mm256_set1_ps(bias_x86(w, size_t(r) * ng + g));
    for (int j = g * w.group; j < (g + 1) * w.group; j += 8) {
      const __m256 q = w.bits == 4 ? unpack8_4bit(reinterpret_cast<const uint32_t*>(row), j)
                                   : unpack8(row, j, w.bits);
      _mm256_storeu_ps(out + j, _mm256_fmadd_ps(s, q, b));
    }
  }
}

// y[t, r0..r0+n) for one token: n (<= kRowBlock) dequantized rows share every load of x
__attribute__((target("avx2,fma,f16c"))) void dots_avx2(
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
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

// AVX-512 VNNI (vpdpwssd on 256-bit registers) for the integer kernels; MMT_NATIVE_ISA=avx2 turns it off.
bool use_vnni() {
#ifdef MMT_X86
  static const bool ok = [] {
    const char* force = std::getenv("MMT_NATIVE_ISA");
    if (force && (std::string(force) == "scalar" || std::string(force) == "avx2")) return false;
    __builtin_cpu_init();
    return use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
#else
  return false;
#endif
}

// The integer kernels, unless MMT_NATIVE_FLOAT=1 asks for the AVX2 float path (read once, not per product).
bool use_int_kernels() {
  static const bool ok = use_avx2() && !std::getenv("MMT_NATIVE_FLOAT");
  return ok;
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


using IntDotRows = void (*)(const AffineWeights&, const uint8_t* const*, int, const IntX&, const float*, float*);

template <int BITS, int NR>
IntDotRows int_dot_rows_kernel(int group, bool vnni_cpu) {
  switch (group) {
    case 32: return vnni_cpu ? vnni::dot_rows_int<BITS, NR, 32> : avx2::dot_rows_int<BITS, NR, 32>;
    case 64: return vnni_cpu ? vnni::dot_rows_int<BITS, NR, 64> : avx2::dot_rows_int<BITS, NR, 64>;
    case 128: return vnni_cpu ? vnni::dot_rows_int<BITS, NR, 128> : avx2::dot_rows_int<BITS, NR, 128>;
    default: return vnni_cpu ? vnni::dot_rows_int<BITS, NR, 0> : avx2::dot_rows_int<BITS, NR, 0>;
  }
}

// The integer kernel for these codes on this CPU, or nullptr (float path).
template <int NR>
IntDotRows pick_int_dot_rows(int bits, int group) {
#ifdef MMT_X86
  if (use_int_kernels()) {
    // Every width takes the integer path for one token too, although the float path measured ~20% faster
    // alone for 5-bit codes: a request must get the same logits alone as in a continuous batch (the same
    // int16 x and int32 group sums in both kernels), or greedy streams drift apart after a near-tie.
    const bool v = use_vnni();
    switch (bits) {
      case 2: return int_dot_rows_kernel<2, NR>(group, v);
      case 3: return int_dot_rows_kernel<3, NR>(group, v);
      case 4: return int_dot_rows_kernel<4, NR>(group, v);
      case 5: return int_dot_rows_kernel<5, NR>(group, v);
      case 6: return int_dot_rows_kernel<6, NR>(group, v);
      case 8: return int_dot_rows_kernel<8, NR>(group, v);
    }
  }
#endif
  (void)bits, (void)group;
  return nullptr;
}

// One-token products of at least this many weights are split over the pool (MMT_SPLIT_MATVEC, weights; 0: never).
// Measured 2026-12-03 (2 cores): Gemma 3's 262,144 x 640 head split gives decode +19%. SmolLM2's 49,152 x 576
// head split gave nothing while the graph builder shared the core; with the fused decode layers (a short
// build) a paired run gave 60.3 against 61.6 tok/s unsplit (README): within noise. Smaller products stay whole.
constexpr size_t kSplitMatvecWeights = size_t(16) << 20;

size_t split_matvec_weights() {
  static const size_t n = [] {
    const char* env = std::getenv("MMT_SPLIT_MATVEC");
    if (!env || !*env) return kSplitMatvecWeights;
    const long long v = std::atoll(env);
    return v > 0 ? size_t(v) : std::numeric_limits<size_t>::max();
  }();
  return n;
}

// One token of each of n matrices of the same input width, their rows shared out by the pool in one job: x
// prepared once per matrix, then chunks of split_chunk_rows (a multiple of 4) from each matrix's start, so each
// row takes the same kernel (4-row or 1-row) as on one thread and the bits do not depend on the split. Every
// matrix must have rows and an integer kernel.
void split_matvecs(int n, const AffineWeights* ws, const float* x, float* const* ys, int nthreads) {
  struct Part {
    IntX qx;
    std::vector<float> xsum;
    IntDotRows i4, i1;
    int first_chunk, chunk_rows;
  };
  std::vector<RowReader> readers;
  readers.reserve(n);
  std::vector<Part> parts(n);
  int nchunks = 0;
  for (int i = 0; i < n; ++i) {
    const AffineWeights& w = ws[i];
    Part& p = parts[i];
    readers.emplace_back(w);
    prepare_int_x(x, w.cols, w.group, w.bits, p.qx);
    const int ng = w.cols / w.group;
    p.xsum.resize(ng);
    for (int g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int j = g * w.group; j < (g + 1) * w.group; ++j) s += x[j];
      p.xsum[g] = s;
    }
    p.i4 = pick_int_dot_rows<4>(w.bits, w.group);
    p.i1 = pick_int_dot_rows<1>(w.bits, w.group);
    p.first_chunk = nchunks;
    p.chunk_rows = split_chunk_rows(w);
    nchunks += (w.rows + p.chunk_rows - 1) / p.chunk_rows;
  }
  parallel_for(nchunks, nthreads, [&](int c) {
    int i = n - 1;
    while (parts[i].first_chunk > c) --i;
    const Part& p = parts[i];
    const AffineWeights& w = ws[i];
    const RowReader& rd = readers[i];
    const int r0 = (c - p.first_chunk) * p.chunk_rows, r1 = std::min(w.rows, r0 + p.chunk_rows);
    int q = r0;
    for (; q + 4 <= r1; q += 4) {
      const uint8_t* rows[4] = {rd.row(q), rd.row(q + 1), rd.row(q + 2), rd.row(q + 3)};
      p.i4(w, rows, q, p.qx, p.xsum.data(), ys[i] + q);
    }
    for (; q < r1; ++q) {
      const uint8_t* row[1] = {rd.row(q)};
      p.i1(w, row, q, p.qx, p.xsum.data(), ys[i] + q);
    }
  });
}

void matvec(const AffineWeights& w, const RowReader& rd, const float* x, float* y, int nthreads) {
  const IntDotRows idot4 = pick_int_dot_rows<4>(w.bits, w.group), idot1 = pick_int_dot_rows<1>(w.bits, w.group);
  // One token runs on the calling thread (outside a fused layer the other core is building the next step's
  // graph), unless the matrix is as large as a vocabulary head: that runs last, when the builder is idle.
  if (idot4 && nthreads > 1 && size_t(w.rows) * w.cols >= split_matvec_weights()) {
    split_matvecs(1, &w, x, &y, nthreads);
    return;
  }
  const int ng = w.cols / w.group;
  thread_local std::vector<float> xsum_tl;
  thread_local IntX qx_tl;
  std::vector<float>& xsum = xsum_tl;
  IntX& qx = qx_tl;
  xsum.resize(ng);
  for (int g = 0; g < ng; ++g) {
    float s = 0.f;
    for (int j = g * w.group; j < (g + 1) * w.group; ++j) s += x[j];
    xsum[g] = s;
  }
  int r = 0;
  if (idot4) {  // integer path: four rows share each load of x
    prepare_int_x(x, w.cols, w.group, w.bits, qx);
    for (; r + 4 <= w.rows; r += 4) {
      const uint8_t* rows[4] = {rd.row(r), rd.row(r + 1), rd.row(r + 2), rd.row(r + 3)};
      idot4(w, rows, r, qx, xsum.data(), y + r);
    }
    for (; r < w.rows; ++r) {
      const uint8_t* row[1] = {rd.row(r)};
      idot1(w, row, r, qx, xsum.data(), y + r);
    }
    return;
  }
  const DotRows dot2 = pick_dot_rows<2>(w.bits), dot1 = pick_dot_rows<1>(w.bits);
  for (; r + 2 <= w.rows; r += 2) {
    const uint8_t* rows[2] = {rd.row(r), rd.row(r + 1)};
    dot2(w, rows, r, x, xsum.data(), y + r);
  }
  if (r < w.rows) {
    const uint8_t* last[1] = {rd.row(r)};
    dot1(w, last, r, x, xsum.data(), y + r);
  }
}

using IntGemm = void (*)(const AffineWeights&, const float*, float*, int, const int16_t*, float, bool);

// The integer GEMM for these codes on this CPU, or nullptr.
IntGemm pick_int_gemm(int bits) {
#ifdef MMT_X86
  if (use_int_kernels()) {
    const bool v = use_vnni();
    switch (bits) {
      case 2: return v ? vnni::int_gemm<2> : avx2::int_gemm<2>;
      case 3: return v ? vnni::int_gemm<3> : avx2::int_gemm<3>;
      case 4: return v ? vnni::int_gemm<4> : avx2::int_gemm<4>;
      case 5: return v ? vnni::int_gemm<5> : avx2::int_gemm<5>;
      case 6: return v ? vnni::int_gemm<6> : avx2::int_gemm<6>;
      case 8: return v ? vnni::int_gemm<8> : avx2::int_gemm<8>;
    }
  }
#endif
  (void)bits;
  return nullptr;
}

using RowTokens = void (*)(const AffineWeights&, const uint8_t*, int, const IntX*, const float*, float*, int);

template <int BITS, bool VNNI>
RowTokens row_tokens_kernel(int nt) {
  constexpr RowTokens avx2_k[8] = {avx2::dot_row_tokens_int<BITS, 1>, avx2::dot_row_tokens_int<BITS, 2>,
                                   avx2::dot_row_tokens_int<BITS, 3>, avx2::dot_row_tokens_int<BITS, 4>,
                                   avx2::dot_row_tokens_int<BITS, 5>, avx2::dot_row_tokens_int<BITS, 6>,
                                   avx2::dot_row_tokens_int<BITS, 7>, avx2::dot_row_tokens_int<BITS, 8>};
  constexpr RowTokens vnni_k[8] = {vnni::dot_row_tokens_int<BITS, 1>, vnni::dot_row_tokens_int<BITS, 2>,
                                   vnni::dot_row_tokens_int<BITS, 3>, vnni::dot_row_tokens_int<BITS, 4>,
                                   vnni::dot_row_tokens_int<BITS, 5>, vnni::dot_row_tokens_int<BITS, 6>,
                                   vnni::dot_row_tokens_int<BITS, 7>, vnni::dot_row_tokens_int<BITS, 8>};
  return (VNNI ? vnni_k : avx2_k)[std::min(std::max(nt, 1), 8) - 1];
}

// The integer kernel for 2..kMaxIntTokens tokens of these codes on this CPU, or nullptr.
RowTokens pick_row_tokens(int bits, int nt) {
#ifdef MMT_X86
  if (use_int_kernels()) {
    const bool v = use_vnni();
    switch (bits) {
      case 2: return v ? row_tokens_kernel<2, true>(nt) : row_tokens_kernel<2, false>(nt);
      case 3: return v ? row_tokens_kernel<3, true>(nt) : row_tokens_kernel<3, false>(nt);
      case 4: return v ? row_tokens_kernel<4, true>(nt) : row_tokens_kernel<4, false>(nt);
      case 5: return v ? row_tokens_kernel<5, true>(nt) : row_tokens_kernel<5, false>(nt);
      case 6: return v ? row_tokens_kernel<6, true>(nt) : row_tokens_kernel<6, false>(nt);
      case 8: return v ? row_tokens_kernel<8, true>(nt) : row_tokens_kernel<8, false>(nt);
    }
  }
#endif
  (void)bits, (void)nt;
  return nullptr;
}

// A few tokens (a decode step of a continuous batch): the packed weights are streamed once for all of them.
void matmul_few(const AffineWeights& w, const RowReader& rd, const float* x, float* y, int tokens,
                RowTokens kernel, int nthreads) {
  const int ng = w.cols / w.group;
  thread_local std::vector<IntX> qx_tl;
  thread_local std::vector<float> xsum_tl;
  std::vector<IntX>& qx = qx_tl;
  std::vector<float>& xsum = xsum_tl;
  qx.resize(tokens);
  xsum.resize(size_t(tokens) * ng);
  for (int t = 0; t < tokens; ++t) {
    const float* xt = x + size_t(t) * w.cols;
    prepare_int_x(xt, w.cols, w.group, w.bits, qx[t]);
    for (int g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int j = g * w.group; j < (g + 1) * w.group; ++j) s += xt[j];
      xsum[size_t(t) * ng + g] = s;
    }
  }
  const int rows_per_chunk = split_chunk_rows(w);  // long runs per thread, as for one token
  const int nchunks = (w.rows + rows_per_chunk - 1) / rows_per_chunk;
  parallel_for(nchunks, nthreads, [&](int c) {
    const int r1 = std::min(w.rows, (c + 1) * rows_per_chunk);
    for (int r = c * rows_per_chunk; r < r1; ++r) kernel(w, rd.row(r), r, qx.data(), xsum.data(), y + r, w.rows);
  });
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

const char* isa() { return use_vnni() ? "avx2+fma+avx512vnni" : use_avx2() ? "avx2+fma" : "scalar"; }


void affine_dequantize(const AffineWeights& w, float* out) {
  if (w.rows == 0) return;
  const RowReader rd(w);
  constexpr int kRowsPerChunk = 16;
  const int nchunks = (w.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const bool avx2 = use_avx2();
  (void)avx2;
  parallel_for(nchunks, num_threads(), [&](int c) {
    const int r1 = std::min(w.rows, (c + 1) * kRowsPerChunk);
    for (int r = c * kRowsPerChunk; r < r1; ++r) {
      float* o = out + size_t(r) * w.cols;
#ifdef MMT_X86
      if (avx2) {
        dequant_row_avx2(w, rd.row(r), r, o);
        continue;
      }
#endif
      dequant_row_scalar(w, rd.row(r), r, o);
    }
  });
}

bool affine_int_gemm(const AffineWeights& w, const float* x, float* y, int tokens) {
  const IntGemm k = pick_int_gemm(w.bits);
  if (!k || w.group % 32 != 0) return false;
  if (w.rows > 0 && tokens > 0) k(w, x, y, tokens, nullptr, 0.f, false);
  return true;
}

bool int_gemm_available(int bits) { return pick_int_gemm(bits) != nullptr; }

bool codebook_int_gemm(const AffineWeights& w, const float* codebook, const float* x, float* y, int tokens,
                       bool trellis) {
  const IntGemm k = pick_int_gemm(w.bits);
  if (!k || w.group % 32 != 0 || (trellis && w.bits > 6)) return false;
  // the levels on an integer grid of step max|level| / 2047 (each within 2.5e-4 of the largest: int_gemm.inc)
  const int levels = (trellis ? 4 : 1) << w.bits;
  float m = 0.f;
  for (int i = 0; i < levels; ++i) m = std::max(m, std::fabs(codebook[i]));
  const float step = m > 0.f ? m / float(vnni::kCodebookLevelMax) : 1.f;
  int16_t lut[256] = {};
  for (int i = 0; i < levels; ++i) lut[i] = int16_t(std::lrintf(codebook[i] / step));
  if (w.rows > 0 && tokens > 0) k(w, x, y, tokens, lut, step, trellis);
  return true;
}

void affine_matvec_shared(const AffineWeights& w, const float* x, float* y) {
  affine_matvec_shared_many(1, &w, x, &y);
}

void affine_matvec_shared_many(int n, const AffineWeights* ws, const float* x, float* const* ys) {
  // one pool job over all of their rows (fewer fork/joins; small matrices such as k and v no longer leave a
  // thread idle on their own); a width without an integer kernel goes one matrix at a time, unsplit
  std::vector<AffineWeights> split;
  std::vector<float*> outs;
  for (int i = 0; i < n; ++i) {
    if (ws[i].rows == 0) continue;
    if (pick_int_dot_rows<4>(ws[i].bits, ws[i].group)) {
      split.push_back(ws[i]);
      outs.push_back(ys[i]);
    } else {
      matvec(ws[i], RowReader(ws[i]), x, ys[i], 1);
    }
  }
  if (!split.empty()) split_matvecs(int(split.size()), split.data(), x, outs.data(), num_threads());
}

void affine_matmul(const AffineWeights& w, const float* x, float* y, int tokens) {
  if (w.rows == 0 || tokens == 0) return;
  const RowReader rd(w);
  const int nthreads = num_threads();
  if (tokens == 1) {
    matvec(w, rd, x, y, nthreads);
    return;
  }
  if (pick_row_tokens(w.bits, 1)) {
    // the integer kernel in blocks of up to kMaxIntTokens tokens (a prefill re-reads the matrix per block, from
    // cache; measured on SmolLM2 pp128 as fast as the f32 tiles below, which other bit widths keep)
    for (int t0 = 0; t0 < tokens; t0 += kMaxIntTokens) {
      const int nt = std::min(kMaxIntTokens, tokens - t0);
      matmul_few(w, rd, x + size_t(t0) * w.cols, y + size_t(t0) * w.rows, nt, pick_row_tokens(w.bits, nt),
                 nthreads);
    }
    return;
  }
  if (tokens <= 2) {
    for (int t = 0; t < tokens; ++t) matvec(w, rd, x + size_t(t) * w.cols, y + size_t(t) * w.rows, nthreads);
    return;
  }
  matmul_tiles(w, rd, x, y, tokens, nthreads);
}

}  // namespace mmt
