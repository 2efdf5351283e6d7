#include "affine_primitive.h"

#include <algorithm>
#include <sstream>
#include <string>
#include <stdexcept>

#include "affine_gemm.h"
#include "affine_kernels.h"
#include "operands.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mmt {

// Throws unless (wq, scales, biases) hold a (rows, cols) matrix in MLX's affine layout at these bits/group.
void check_affine(const char* where, int cols, const mx::array& wq, const mx::array& scales,
                  const mx::array& biases, int group_size, int bits) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
    throw std::invalid_argument(std::string(where) + ": bits must be 2, 3, 4, 5, 6 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument(std::string(where) + ": group_size must be 32, 64 or 128");
  if (wq.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2)
    throw std::invalid_argument(std::string(where) + ": wq, scales and biases must be 2-D");
  const int rows = wq.shape(0);
  if (int64_t(wq.shape(1)) * 32 != int64_t(cols) * bits || cols % group_size != 0 ||
      scales.shape(0) != rows || scales.shape(1) != cols / group_size || biases.shape() != scales.shape()) {
    std::ostringstream msg;
    msg << where << ": shapes do not match (cols " << cols << ", wq " << wq.shape(0) << "x" << wq.shape(1)
        << ", scales " << scales.shape(0) << "x" << scales.shape(1) << ", bits " << bits << ", group "
        << group_size << ")";
    throw std::invalid_argument(msg.str());
  }
}

namespace {

// f16 scales and biases stay f16 (the kernels read them per group); anything else becomes f32.
mx::Dtype scale_dtype(const mx::array& scales, const mx::array& biases) {
  return scales.dtype() == mx::float16 && biases.dtype() == mx::float16 ? mx::float16 : mx::float32;
}

}  // namespace

mx::array affine_matmul_op(const mx::array& x, const mx::array& wq, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, mx::StreamOrDevice s) {
  if (x.ndim() < 1) throw std::invalid_argument("affine_matmul: x must have at least one dimension");
  check_affine("affine_matmul", x.shape(-1), wq, scales, biases, group_size, bits);
  const int rows = wq.shape(0);
  auto stream = mx::to_stream(s);
  // f32 operands (f16 scales stay f16: the kernels read them per group, fewer bytes streamed per token). No
  // contiguous() nodes here: every extra graph node costs ~8 us of evaluation on the CPU, about what a
  // small product does; eval_cpu copies the rare strided operand itself.
  const auto sdt = scale_dtype(scales, biases);
  auto xf = mx::astype(x, mx::float32, stream);
  auto sf = mx::astype(scales, sdt, stream);
  auto bf = mx::astype(biases, sdt, stream);
  auto wu = mx::astype(wq, mx::uint32, stream);
  mx::Shape out_shape = x.shape();
  out_shape.back() = rows;
  return mx::array(out_shape, mx::float32, std::make_shared<AffineMatmul>(stream, group_size, bits),
                   {xf, wu, sf, bf});
}

void AffineMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  const auto& x = ops[0];
  const auto& wq = ops[1];
  const auto& scales = ops[2];
  const auto& biases = ops[3];
  out.set_data(mx::allocator::malloc(out.nbytes()));
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
    const bool half = scales.dtype() == mx::float16;
    AffineWeights w{wq.data<uint32_t>(), scales.data<void>(), biases.data<void>(), rows, cols, b, g, half};
    if (tokens >= kGemmMinTokens) {
      affine_gemm(w, x.data<float>(), out.data<float>(), tokens);
    } else {
      affine_matmul(w, x.data<float>(), out.data<float>(), tokens);
    }
  });
}

void AffineMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtAffineMatmul runs on the CPU only; GPUs use mx.quantized_matmul");
}

bool AffineMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AffineMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

mx::array codebook_matmul_op(const mx::array& x, const mx::array& wq, const mx::array& scales,
                             const mx::array& codebook, int group_size, int bits, mx::StreamOrDevice s) {
  if (x.ndim() < 1) throw std::invalid_argument("codebook_matmul: x must have at least one dimension");
  if (bits < 2 || bits > 8 || bits == 7) throw std::invalid_argument("codebook_matmul: bits must be 2 to 6, or 8");
  if (!int_gemm_available(bits) || group_size % 32 != 0)
    throw std::invalid_argument("codebook_matmul: needs the integer kernels (AVX2) and groups of 32, 64 or 128");
  check_affine("codebook_matmul", x.shape(-1), wq, scales, scales, group_size, bits);  // no biases: scales twice
  if (codebook.ndim() != 1 || (codebook.shape(0) != (1 << bits) && codebook.shape(0) != (4 << bits)))
    throw std::invalid_argument("codebook_matmul: the codebook must hold 2^bits levels (4 x 2^bits: trellis codes)");
  if (codebook.shape(0) == (4 << bits) && bits > 6)
    throw std::invalid_argument("codebook_matmul: trellis codes take 2 to 6 bits");
  auto stream = mx::to_stream(s);
  const auto sdt = scales.dtype() == mx::float16 ? mx::float16 : mx::float32;
  mx::Shape out_shape = x.shape();
  out_shape.back() = wq.shape(0);
  return mx::array(out_shape, mx::float32, std::make_shared<CodebookMatmul>(stream, group_size, bits),
                   {mx::astype(x, mx::float32, stream), mx::astype(wq, mx::uint32, stream),
                    mx::astype(scales, sdt, stream), mx::astype(codebook, mx::float32, stream)});
}

void CodebookMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : ops) enc.set_input_array(a);
  enc.set_output_array(out);
  const int rows = ops[1].shape(0), cols = ops[0].shape(-1);
  const int tokens = cols ? int(ops[0].size() / cols) : 0;
  enc.dispatch([x = mx::array::unsafe_weak_copy(ops[0]), wq = mx::array::unsafe_weak_copy(ops[1]),
                scales = mx::array::unsafe_weak_copy(ops[2]), cb = mx::array::unsafe_weak_copy(ops[3]),
                out = mx::array::unsafe_weak_copy(out), rows, cols, tokens, g = group_size_,
                b = bits_]() mutable {
    const bool half = scales.dtype() == mx::float16;
    AffineWeights w{wq.data<uint32_t>(), scales.data<void>(), nullptr, rows, cols, b, g, half};
    const bool trellis = cb.size() == (size_t{4} << b);
    if (!codebook_int_gemm(w, cb.data<float>(), x.data<float>(), out.data<float>(), tokens, trellis))
      throw std::runtime_error("codebook_matmul: this CPU has no integer kernels (the MLX-ops path serves it)");
  });
}

void CodebookMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtCodebookMatmul runs on the CPU only");
}

bool CodebookMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const CodebookMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

mx::array affine_dequantize_op(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                               int group_size, int bits, mx::StreamOrDevice s) {
  if (wq.ndim() != 2) throw std::invalid_argument("affine_dequantize: wq must be 2-D");
  const int cols = int(int64_t(wq.shape(1)) * 32 / std::max(bits, 1));
  check_affine("affine_dequantize", cols, wq, scales, biases, group_size, bits);
  auto stream = mx::to_stream(s);
  const auto sdt = scale_dtype(scales, biases);
  return mx::array({wq.shape(0), cols}, mx::float32, std::make_shared<AffineDequantize>(stream, group_size, bits),
                   {mx::astype(wq, mx::uint32, stream), mx::astype(scales, sdt, stream),
                    mx::astype(biases, sdt, stream)});
}

void AffineDequantize::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  const auto& wq = ops[0];
  const auto& scales = ops[1];
  const auto& biases = ops[2];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_input_array(wq);
  enc.set_input_array(scales);
  enc.set_input_array(biases);
  enc.set_output_array(out);
  enc.dispatch([wq = mx::array::unsafe_weak_copy(wq), scales = mx::array::unsafe_weak_copy(scales),
                biases = mx::array::unsafe_weak_copy(biases), out = mx::array::unsafe_weak_copy(out),
                g = group_size_, b = bits_]() mutable {
    const bool half = scales.dtype() == mx::float16;
    AffineWeights w{wq.data<uint32_t>(), scales.data<void>(), biases.data<void>(), int(out.shape(0)),
                    int(out.shape(1)), b, g, half};
    affine_dequantize(w, out.data<float>());
  });
}

void AffineDequantize::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtAffineDequantize runs on the CPU only; GPUs use mx.dequantize");
}

bool AffineDequantize::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AffineDequantize&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

}  // namespace mmt
