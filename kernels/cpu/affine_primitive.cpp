#include "affine_primitive.h"

#include <sstream>
#include <stdexcept>

#include "affine_kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mmt {

mx::array affine_matmul_op(const mx::array& x, const mx::array& wq, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, mx::StreamOrDevice s) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
    throw std::invalid_argument("affine_matmul: bits must be 2, 3, 4, 5, 6 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("affine_matmul: group_size must be 32, 64 or 128");
  if (wq.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2 || x.ndim() < 1)
    throw std::invalid_argument("affine_matmul: wq, scales and biases must be 2-D");
  const int rows = wq.shape(0);
  const int cols = x.shape(-1);
  if (int64_t(wq.shape(1)) * 32 != int64_t(cols) * bits || cols % group_size != 0 ||
      scales.shape(0) != rows || scales.shape(1) != cols / group_size || biases.shape() != scales.shape()) {
    std::ostringstream msg;
    msg << "affine_matmul: shapes do not match (x last dim " << cols << ", wq " << wq.shape(0) << "x"
        << wq.shape(1) << ", scales " << scales.shape(0) << "x" << scales.shape(1) << ", bits " << bits
        << ", group " << group_size << ")";
    throw std::invalid_argument(msg.str());
  }
  auto stream = mx::to_stream(s);
  // The kernel reads row-contiguous f32 operands; these ops are no-ops (shared buffers) when already so.
  auto xf = mx::contiguous(mx::astype(x, mx::float32, stream), false, stream);
  auto sf = mx::astype(scales, mx::float32, stream);
  auto bf = mx::astype(biases, mx::float32, stream);
  auto wu = mx::astype(wq, mx::uint32, stream);
  mx::Shape out_shape = x.shape();
  out_shape.back() = rows;
  return mx::array(out_shape, mx::float32, std::make_shared<AffineMatmul>(stream, group_size, bits),
                   {xf, wu, sf, bf});
}

void AffineMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& wq = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  for (const auto* a : {&x, &wq, &scales, &biases}) {
    if (!a->flags().row_contiguous)
      throw std::runtime_error("MmtAffineMatmul: operands must be row-contiguous");
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_input_array(wq);
  enc.set_input_array(scales);
  enc.set_input_array(biases);
  enc.set_output_array(out);
  const int rows = wq.shape(0), cols = x.shape(-1);
  const int tokens = cols ? int(x.size() / cols) : 0;
  enc.dispatch([x = mx::array::unsafe_weak_copy(x), wq = mx::array::unsafe_weak_copy(wq),
                scales = mx::array::unsafe_weak_copy(scales), biases = mx::array::unsafe_weak_copy(biases),
                out = mx::array::unsafe_weak_copy(out), rows, cols, tokens, g = group_size_,
                b = bits_]() mutable {
    AffineWeights w{wq.data<uint32_t>(), scales.data<float>(), biases.data<float>(), rows, cols, b, g};
    affine_matmul(w, x.data<float>(), out.data<float>(), tokens);
  });
}

void AffineMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtAffineMatmul runs on the CPU only; GPUs use mx.quantized_matmul");
}

bool AffineMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AffineMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

}  // namespace mmt
