#include "layer_math.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>

// GCC on x86 builds an AVX2 clone of the inner loops beside the portable one and picks at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMT_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define MMT_CLONES
#endif

namespace mmt {
namespace {

// Inlined into each clone of attend_row (a call per key through the clone dispatcher cost more than the dot).
// Eight partial sums in a fixed order: a plain `s += a[i] * b[i]` loop may not be reordered without
// -ffast-math, so it ran as one chain of dependent scalar adds, 4 cycles per element.
typedef float float8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) float dot(const float* a, const float* b, int n) {
  float8 acc = {};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    float8 va, vb;
    std::memcpy(&va, a + i, sizeof va);
    std::memcpy(&vb, b + i, sizeof vb);
    acc += va * vb;
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline __attribute__((always_inline)) void axpy(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void rms_norm_rows(const float* x, const float* w, float* out, size_t rows, int d, float eps) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* orow = out + r * d;
    float ss = 0.f;
    for (int j = 0; j < d; ++j) ss += xr[j] * xr[j];
    const float inv = 1.f / std::sqrt(ss / float(d) + eps);
    for (int j = 0; j < d; ++j) orow[j] = xr[j] * inv * w[j];
  }
}

RopeAngles::RopeAngles(int dims, float base) : inv_freq(dims / 2), cs(dims / 2), sn(dims / 2) {
  const int half = dims / 2;
  const float step = std::log(base) / float(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = std::exp(-float(i) * step);
}

void RopeAngles::at(int position, float scale) {
  const float pos = float(position) * scale;
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const float th = pos * inv_freq[i];
    cs[i] = std::cos(th);
    sn[i] = std::sin(th);
  }
}

void rope_row(const float* x, int64_t xs, float* out, const RopeAngles& ang) {
  const int half = int(ang.cs.size());
  for (int i = 0; i < half; ++i) {
    const float a = x[i * xs], c = x[(i + half) * xs];
    out[i] = a * ang.cs[i] - c * ang.sn[i];
    out[i + half] = a * ang.sn[i] + c * ang.cs[i];
  }
}

MMT_CLONES void attend_row(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int lk, int d, float scale,
                const bool* mask, int64_t ms, float* p, float* acc, float* out, const float* k_last,
                const float* v_last) {
  auto key = [&](int j) { return k_last && j == lk - 1 ? k_last : k + j * ks; };
  auto value = [&](int j) { return v_last && j == lk - 1 ? v_last : v + j * vs; };
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float mx_score = neg_inf;
  for (int j = 0; j < lk; ++j) {
    if (mask && !mask[j * ms]) {
      p[j] = neg_inf;
      continue;
    }
    p[j] = scale * dot(q, key(j), d);
    mx_score = std::max(mx_score, p[j]);
  }
  std::fill(acc, acc + d, 0.f);
  float sum = 0.f;
  if (mx_score != neg_inf) {
    for (int j = 0; j < lk; ++j) {
      if (p[j] == neg_inf) continue;
      const float e = std::exp(p[j] - mx_score);
      sum += e;
      axpy(e, value(j), acc, d);
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int i = 0; i < d; ++i) out[i] = acc[i] * inv;
}

void gated_activation(const float* gate, const float* up, float* out, size_t n, bool gelu) {
  if (gelu) {
    const float c = std::sqrt(2.f / float(M_PI));
    for (size_t i = 0; i < n; ++i) {
      const float g = gate[i];
      out[i] = 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g))) * up[i];
    }
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.f + std::exp(-g)) * up[i];
  }
}

}  // namespace mmt
