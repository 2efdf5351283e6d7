#include "norm_rope.h"

#include <algorithm>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "affine_kernels.h"
#include "layer_math.h"
#include "operands.h"
#include "thread_pool.h"

namespace mmt {

// ---------------------------------------------------------------- RMSNorm

mx::array rms_norm_op(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: w must be 1-D with x's last dimension");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps),
                   {mx::astype(x, mx::float32, stream), mx::astype(w, mx::float32, stream)});
}

namespace {

// Two f32 inputs (made row-contiguous) -> out, computed on the stream by fn(a, b, out).
template <class F>
void eval_binary(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out, F fn) {
  auto& enc = mx::cpu::get_command_encoder(stream);
  const std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_input_array(ops[0]);
  enc.set_input_array(ops[1]);
  enc.set_output_array(out);
  enc.dispatch([a = mx::array::unsafe_weak_copy(ops[0]), b = mx::array::unsafe_weak_copy(ops[1]),
                out = mx::array::unsafe_weak_copy(out), fn]() mutable { fn(a, b, out); });
}

}  // namespace

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_binary(stream(), inputs, out, [eps = eps_](const mx::array& x, const mx::array& w, mx::array& o) {
    const int d = x.shape(-1);
    const size_t rows = d ? x.size() / d : 0;
    rms_norm_rows(x.data<float>(), w.data<float>(), o.data<float>(), rows, d, eps);
  });
}

void RmsNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtRmsNorm runs on the CPU only; GPUs use mx.fast.rms_norm");
}

bool RmsNorm::is_equivalent(const mx::Primitive& other) const {
  return eps_ == static_cast<const RmsNorm&>(other).eps_;
}

// ---------------------------------------------------------------- RoPE

mx::array rope_op(const mx::array& x, const mx::array& offset, int dims, float base, float scale,
                  mx::StreamOrDevice s) {
  if (x.ndim() != 4) throw std::invalid_argument("rope: x must be (B, H, T, D)");
  if (dims != x.shape(-1) || dims % 2) throw std::invalid_argument("rope: dims must be D and even");
  if (offset.ndim() > 1 || (offset.ndim() == 1 && offset.shape(0) != x.shape(0) && offset.shape(0) != 1))
    throw std::invalid_argument("rope: offset must be a scalar or one per batch row");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream, dims, base, scale),
                   {mx::astype(x, mx::float32, stream), mx::astype(offset, mx::int32, stream)});
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const auto& x = inputs[0];  // read through its strides (q/k arrive transposed)
  const auto& offset = inputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_input_array(x);
  enc.set_input_array(offset);
  enc.set_output_array(out);
  enc.dispatch([x = mx::array::unsafe_weak_copy(x), offset = mx::array::unsafe_weak_copy(offset),
                out = mx::array::unsafe_weak_copy(out), dims = dims_, base = base_, scale = scale_]() mutable {
    const int B = x.shape(0), H = x.shape(1), T = x.shape(2);
    const auto& st = x.strides();
    const float* xp = x.data<float>();
    const int32_t* off = offset.data<int32_t>();
    const bool per_row = offset.ndim() == 1 && offset.shape(0) == B && B > 1;
    float* op = out.data<float>();
    RopeAngles ang(dims, base);
    for (int b = 0; b < B; ++b) {
      const int o = off[per_row ? b : 0];
      for (int t = 0; t < T; ++t) {
        ang.at(t + o, scale);
        for (int h = 0; h < H; ++h) {
          const float* xr = xp + b * st[0] + h * st[1] + t * st[2];
          rope_row(xr, st[3], op + ((size_t(b) * H + h) * T + t) * dims, ang);
        }
      }
    }
  });
}

void Rope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtRope runs on the CPU only; GPUs use mx.fast.rope");
}

bool Rope::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Rope&>(other);
  return dims_ == o.dims_ && base_ == o.base_ && scale_ == o.scale_;
}

// ---------------------------------------------------------------- gated activation

mx::array gated_activation_op(const mx::array& gate, const mx::array& up, bool gelu, mx::StreamOrDevice s) {
  if (gate.shape() != up.shape()) throw std::invalid_argument("gated_activation: gate and up must have one shape");
  auto stream = mx::to_stream(s);
  return mx::array(gate.shape(), mx::float32, std::make_shared<GatedActivation>(stream, gelu),
                   {mx::astype(gate, mx::float32, stream), mx::astype(up, mx::float32, stream)});
}

void GatedActivation::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_binary(stream(), inputs, out, [gelu = gelu_](const mx::array& g, const mx::array& u, mx::array& o) {
    // a prompt's activations (Gemma 3: 256 x 2,048 a layer) over the pool, in chunks of whole 8-lane vectors
    // (each element's bits do not depend on where a chunk starts); a token's stay on this thread
    constexpr size_t kChunk = 16384;
    const size_t n = o.size();
    const float *gp = g.data<float>(), *up = u.data<float>();
    float* op = o.data<float>();
    parallel_for(int((n + kChunk - 1) / kChunk), n > kChunk ? num_threads() : 1, [&](int c) {
      const size_t i0 = size_t(c) * kChunk;
      gated_activation(gp + i0, up + i0, op + i0, std::min(kChunk, n - i0), gelu);
    });
  });
}

void GatedActivation::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtGatedActivation runs on the CPU only");
}

bool GatedActivation::is_equivalent(const mx::Primitive& other) const {
  return gelu_ == static_cast<const GatedActivation&>(other).gelu_;
}

}  // namespace mmt
