// The arithmetic of a decoder layer's small steps (RMSNorm, RoPE, one query's attention, the gated
// activation) as plain functions. The one-op primitives and the fused decode layer both call these, so a
// token computed by either gives the same bits (a request alone and inside a batch decode identically).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mmt {

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w for `rows` contiguous rows of d values.
void rms_norm_rows(const float* x, const float* w, float* out, size_t rows, int d, float eps);

// cos/sin of the half-split RoPE angles at `position` (MLX's formulas: inv_freq_i = exp(-i log(base) / half),
// theta_i = (position * scale) * inv_freq_i); cs and sn get dims / 2 values each.
struct RopeAngles {
  std::vector<float> inv_freq, cs, sn;
  RopeAngles(int dims, float base);
  void at(int position, float scale);
};

// One head row: out[i] = a cos - c sin, out[i + half] = a sin + c cos (x read with element stride xs).
void rope_row(const float* x, int64_t xs, float* out, const RopeAngles& ang);

// softmax(scale q . k_j) v_j over keys j < lk (k_j = k + j * ks, v_j = v + j * vs); keys whose mask entry
// (mask + j * ms) is false are skipped. With k_last/v_last the last key and value (j = lk - 1) are read from
// there instead (a token's own key, not yet in the cache). p: lk floats of scratch, acc: d floats of scratch.
void attend_row(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int lk, int d, float scale,
                const bool* mask, int64_t ms, float* p, float* acc, float* out, const float* k_last = nullptr,
                const float* v_last = nullptr);

// out = act(gate) * up: SiLU (gate * sigmoid(gate)) or the tanh approximation of GELU.
void gated_activation(const float* gate, const float* up, float* out, size_t n, bool gelu);

}  // namespace mmt
