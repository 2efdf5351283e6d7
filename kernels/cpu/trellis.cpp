// Trellis-coded quantization (see trellis.h): a plain Viterbi, ~4 x 2^bits compares per weight. Conversion-time
// code, not a hot kernel: written for clarity and exact agreement with the numpy reference.
#include "trellis.h"

#include <cstddef>
#include <limits>
#include <vector>

namespace mmt {

void tcq_quantize(const float* t, const float* w, int64_t n, const float* lut, int bits, int state0,
                  uint8_t* codes) {
  const int half = 1 << (bits - 1);
  const float inf = std::numeric_limits<float>::infinity();
  float d[4] = {inf, inf, inf, inf};
  d[state0 & 3] = 0.0f;
  std::vector<uint8_t> from(static_cast<std::size_t>(n) * 4);   // per new state: high bit of its predecessor
  std::vector<uint8_t> level(static_cast<std::size_t>(n) * 4);  // per new state: b of the branch taken
  for (int64_t i = 0; i < n; ++i) {
    float e[4][2];
    uint8_t bb[4][2];
    for (int s = 0; s < 4; ++s) {
      const float* row = lut + (static_cast<int64_t>(s) << bits);
      for (int x = 0; x < 2; ++x) {
        float best = inf;
        int bi = 0;
        for (int b = 0; b < half; ++b) {
          const float diff = t[i] - row[(b << 1) | x];
          const float err = diff * diff;
          if (err < best) best = err, bi = b;
        }
        e[s][x] = w[i] * best;
        bb[s][x] = static_cast<uint8_t>(bi);
      }
    }
    float nd[4];
    for (int ns = 0; ns < 4; ++ns) {
      const int x = ns & 1, lo = ns >> 1;
      const float c0 = d[lo] + e[lo][x], c1 = d[2 | lo] + e[2 | lo][x];
      const int hi = c1 < c0 ? 1 : 0;
      nd[ns] = hi ? c1 : c0;
      from[i * 4 + ns] = static_cast<uint8_t>(hi);
      level[i * 4 + ns] = bb[(hi << 1) | lo][x];
    }
    for (int s = 0; s < 4; ++s) d[s] = nd[s];
  }
  int s = 0;
  for (int k = 1; k < 4; ++k)
    if (d[k] < d[s]) s = k;
  for (int64_t i = n - 1; i >= 0; --i) {
    codes[i] = static_cast<uint8_t>((level[i * 4 + s] << 1) | (s & 1));
    s = (from[i * 4 + s] << 1) | (s >> 1);
  }
}

}  // namespace mmt
