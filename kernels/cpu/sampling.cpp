#include "sampling.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "clones.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "operands.h"

namespace mmt {

typedef float float8 __attribute__((vector_size(32)));
typedef int32_t int8x32 __attribute__((vector_size(32)));

// Eight lanes each keep the first index of their own largest value (a strict > over the lane's elements, from
// x[0]) and of their first NaN; the lanes are then merged: the first NaN if there is one, else the largest
// value and, among lanes holding it, the smallest index. That is what MLX 0.32's CPU argmax returns (as numpy's:
// checked in tests/test_native.py), whose running maximum also starts at x[0] and moves only on > or a NaN.
MMT_CLONES uint32_t argmax_row(const float* x, int64_t n) {
  constexpr int32_t kNone = 0x7fffffff;
  const float first = x[0];
  float8 best = float8{} + first;
  int8x32 at = {}, nan_at = int8x32{} + kNone, idx = {0, 1, 2, 3, 4, 5, 6, 7};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    float8 v;
    std::memcpy(&v, x + j, sizeof v);
    const int8x32 gt = v > best, fresh_nan = (v != v) & (nan_at == kNone);
    best = gt ? v : best;
    at = gt ? idx : at;
    nan_at = fresh_nan ? idx : nan_at;
    idx += 8;
  }
  int64_t first_nan = kNone;
  for (int l = 0; l < 8; ++l) first_nan = std::min<int64_t>(first_nan, nan_at[l]);
  float bv = first;
  int64_t bi = 0;
  for (int l = 0; l < 8; ++l) {
    if (best[l] > bv) {
      bv = best[l], bi = at[l];
    } else if (best[l] == bv && at[l] < bi) {
      bi = at[l];
    }
  }
  for (; j < n; ++j) {
    if (x[j] != x[j] && first_nan == kNone) first_nan = j;
    if (x[j] > bv) bv = x[j], bi = j;
  }
  return uint32_t(first_nan != kNone ? first_nan : bi);
}

mx::array argmax_last_op(const mx::array& x, mx::StreamOrDevice s) {
  if (x.ndim() < 1 || x.shape(-1) < 1) throw std::invalid_argument("argmax_last: x needs a non-empty last axis");
  auto stream = mx::to_stream(s);
  mx::Shape shape(x.shape().begin(), x.shape().end() - 1);
  return mx::array(shape, mx::uint32, std::make_shared<ArgMaxLast>(stream), {mx::astype(x, mx::float32, stream)});
}

void ArgMaxLast::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_input_array(ops[0]);
  enc.set_output_array(out);
  enc.dispatch([x = mx::array::unsafe_weak_copy(ops[0]), out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int64_t n = x.shape(-1), rows = int64_t(x.size()) / n;
    for (int64_t r = 0; r < rows; ++r) out.data<uint32_t>()[r] = argmax_row(x.data<float>() + r * n, n);
  });
}

void ArgMaxLast::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtArgMaxLast runs on the CPU only; GPUs use mx.argmax");
}

}  // namespace mmt
