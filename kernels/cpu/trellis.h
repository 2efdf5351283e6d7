// Viterbi search of the trellis-coded quantizer of the rotq level (mmt_mlx/fgs/encoders/trellis.py holds the
// numpy reference and the description): four states, the last two "x" bits (a code's low bit) of the sequence;
// code c = (b << 1) | x of `bits` bits has the value lut[(state << bits) | c]; the next state is
// ((state << 1) | x) & 3. Conversion calls it once per column of GPTQ, the sequence running down the rows.
#pragma once

#include <cstdint>

namespace mmt {

// codes[0..n) minimizing sum_i w[i] (t[i] - value_i)^2 over the paths that start in `state0`; w >= 0.
// Ties go to the lower predecessor, the lower b and the lower final state (as the numpy reference).
void tcq_quantize(const float* t, const float* w, int64_t n, const float* lut, int bits, int state0,
                  uint8_t* codes);

}  // namespace mmt
