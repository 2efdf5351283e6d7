#include "layer_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "clones.h"

namespace mmt {
namespace {

// Inlined into each clone of attend_row (a call per key through the clone dispatcher cost more than the dot).
// Eight partial sums in a fixed order: a plain `s += a[i] * b[i]` loop may not be reordered without
// -ffast-math, so it ran as one chain of dependent scalar adds, 4 cycles per element. (Four chains of eight
// measured no faster, for 64- or 256-wide heads.)
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

// e^x for 8 lanes, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r (about 1 ulp),
// 2^n from the exponent bits; n = round(x log2 e) comes from the callers below (and its float nf).
typedef int int8v __attribute__((vector_size(32)));

inline __attribute__((always_inline)) float8 exp_of(float8 x, int8v n, float8 nf) {
  const float8 r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float8 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  const int8v bits = (n + 127) << 23;
  float8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

// e^x with x <= 0 (scores minus their max). Vectorizes in the AVX2 clone; against a libm call per key, one
// query's attention over 1,024 keys of SmolLM2's 30 x 9 heads took 3.7-4.3 ms instead of 4.8-5.2 (one thread,
// this file alone, 2026-12-03). Inputs below -87 give e^-87 (~1.6e-38); masked keys get 0.
inline __attribute__((always_inline)) float8 exp_nonpositive(float8 x) {
  x = x < -87.f ? float8{} - 87.f : x;
  const float8 t = 0.5f - x * 1.44269504088896341f;  // > 0: truncation rounds it down
  int8v n;
  float8 nf;
  for (int i = 0; i < 8; ++i) {  // lane by lane (GCC 12 has no __builtin_convert_vector); SLP vectorizes it
    n[i] = -int(t[i]);  // round(x log2 e)
    nf[i] = float(n[i]);
  }
  return exp_of(x, n, nf);
}

// e^x of any sign: x clamped to [-87, 88] (so 2^n stays a normal float and the result finite), n = floor(x log2
// e + 1/2) by truncating a positive shift of it.
inline __attribute__((always_inline)) float8 exp_any(float8 x) {
  x = x < -87.f ? float8{} - 87.f : x;
  x = x > 88.f ? float8{} + 88.f : x;
  const float8 t = x * 1.44269504088896341f + 128.5f;  // in [2.9, 255.5]: truncation rounds it down
  int8v n;
  float8 nf;
  for (int i = 0; i < 8; ++i) {
    n[i] = int(t[i]) - 128;
    nf[i] = float(n[i]);
  }
  return exp_of(x, n, nf);
}

// act(g) * u for 8 lanes: both activations are g * sigmoid(z), z = g for SiLU and, since 0.5 (1 + tanh(y)) =
// sigmoid(2 y), z = 2 sqrt(2 / pi) (g + 0.044715 g^3) for GELU's tanh approximation.
inline __attribute__((always_inline)) float8 gated8(float8 g, float8 u, bool gelu) {
  const float8 z = gelu ? 1.5957691216057308f * (g + 0.044715f * g * g * g) : g;
  return g / (1.f + exp_any(float8{} - z)) * u;
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
    int j = 0;
    for (; j + 8 <= lk; j += 8) {  // the weights, 8 keys at a time (masked keys: 0)
      float8 s8;
      std::memcpy(&s8, p + j, sizeof s8);
      const float8 e = exp_nonpositive(s8 - mx_score);
      const float8 w = s8 == neg_inf ? float8{} : e;
      std::memcpy(p + j, &w, sizeof w);
    }
    if (j < lk) {  // the last keys through the same lanes, padded with masked ones
      float8 s8 = float8{} + neg_inf;
      std::memcpy(&s8, p + j, sizeof(float) * (lk - j));
      const float8 e = exp_nonpositive(s8 - mx_score);
      const float8 w = s8 == neg_inf ? float8{} : e;
      std::memcpy(p + j, &w, sizeof(float) * (lk - j));
    }
    for (j = 0; j < lk; ++j) sum += p[j];
    // acc += p_j v_j over the keys, 64 columns at a time held in registers (in memory, each key's adds waited
    // on the previous key's stores); every element still adds the keys in order
    int c0 = 0;
    for (; c0 + 64 <= d; c0 += 64) {
      float8 a[8] = {};
      for (j = 0; j < lk; ++j) {
        if (p[j] == 0.f) continue;  // masked (or below f32's range)
        const float* vr = value(j) + c0;
        for (int i = 0; i < 8; ++i) {
          float8 vv;
          std::memcpy(&vv, vr + 8 * i, sizeof vv);
          a[i] += p[j] * vv;
        }
      }
      std::memcpy(acc + c0, a, sizeof a);
    }
    if (c0 < d) {
      for (j = 0; j < lk; ++j)
        if (p[j] != 0.f) axpy(p[j], value(j) + c0, acc + c0, d - c0);
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int i = 0; i < d; ++i) out[i] = acc[i] * inv;
}

// Eight lanes at a time (vectorized in the AVX2 clone; std::tanh per element cost ~17 ns, 160 ms of Gemma 3's
// 256-token prefill); the tail goes through the same lanes zero-padded, so every element's bits are the same
// wherever it falls.
MMT_CLONES void gated_activation(const float* gate, const float* up, float* out, size_t n, bool gelu) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    float8 g, u;
    std::memcpy(&g, gate + i, sizeof g);
    std::memcpy(&u, up + i, sizeof u);
    const float8 o = gated8(g, u, gelu);
    std::memcpy(out + i, &o, sizeof o);
  }
  if (i < n) {
    float8 g = {}, u = {};
    std::memcpy(&g, gate + i, (n - i) * sizeof(float));
    std::memcpy(&u, up + i, (n - i) * sizeof(float));
    const float8 o = gated8(g, u, gelu);
    std::memcpy(out + i, &o, (n - i) * sizeof(float));
  }
}

}  // namespace mmt
