#include "operands.h"

#include <cstring>

#include "mlx/allocator.h"

namespace mmt {
namespace {

// Fills `out` (row-contiguous, same shape) from a strided array, element by element: rare (a transposed x).
void copy_strided(const mx::array& a, mx::array& out) {
  const size_t item = a.itemsize(), n = a.size();
  const char* src = a.data<char>();
  char* dst = out.data<char>();
  std::vector<int64_t> idx(a.ndim(), 0);
  for (size_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (size_t d = 0; d < idx.size(); ++d) off += idx[d] * a.strides()[d];
    std::memcpy(dst + i * item, src + off * int64_t(item), item);
    for (int d = int(idx.size()) - 1; d >= 0 && ++idx[d] == a.shape(d); --d) idx[d] = 0;
  }
}

}  // namespace

std::vector<mx::array> row_contiguous_inputs(const std::vector<mx::array>& inputs, mx::cpu::CommandEncoder& enc) {
  std::vector<mx::array> out;
  for (const auto& a : inputs) {
    if (a.flags().row_contiguous) {
      out.push_back(a);
      continue;
    }
    mx::array copy(a.shape(), a.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    enc.set_input_array(a);
    enc.set_output_array(copy);
    enc.dispatch([a = mx::array::unsafe_weak_copy(a), copy = mx::array::unsafe_weak_copy(copy)]() mutable {
      copy_strided(a, copy);
    });
    enc.add_temporary(copy);
    out.push_back(copy);
  }
  return out;
}

}  // namespace mmt
