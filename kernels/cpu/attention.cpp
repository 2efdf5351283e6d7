#include "attention.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "layer_math.h"
#include "thread_pool.h"
#include "affine_kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace mmt {
namespace {

// Strides of a 4-D view with size-1 axes broadcast (stride 0).
struct View {
  const char* base;
  int64_t s[4];
  View(const mx::array& a) : base(a.data<char>()) {
    for (int d = 0; d < 4; ++d) s[d] = a.shape(d) == 1 ? 0 : a.strides()[d];
  }
};

}  // namespace

mx::array decode_attention_op(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                              const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("decode_attention: q, k, v must be 4-D (B, H, L, D)");
  const int B = q.shape(0), Hq = q.shape(1), Lq = q.shape(2), D = q.shape(3);
  if (k.shape() != v.shape() || k.shape(0) != B || k.shape(3) != D || Hq % k.shape(1) != 0)
    throw std::invalid_argument("decode_attention: k and v must be (B, Hkv, Lk, D) with Hq % Hkv == 0");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> in = {mx::astype(q, mx::float32, stream), mx::astype(k, mx::float32, stream),
                               mx::astype(v, mx::float32, stream)};
  if (mask) {
    auto m = *mask;
    while (m.ndim() < 4) m = mx::expand_dims(m, 0, stream);
    m = mx::broadcast_to(mx::astype(m, mx::bool_, stream), {B, 1, Lq, k.shape(2)}, stream);
    in.push_back(m);
  }
  return mx::array({B, Lq, Hq * D}, mx::float32, std::make_shared<DecodeAttention>(stream, scale, bool(mask)),
                   in);
}

void DecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  std::vector<mx::array> ins;
  for (const auto& a : inputs) ins.push_back(mx::array::unsafe_weak_copy(a));
  enc.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out), scale = scale_,
                masked = masked_]() mutable {
    const auto &q = ins[0], &k = ins[1], &v = ins[2];
    const int B = q.shape(0), Hq = q.shape(1), Lq = q.shape(2), D = q.shape(3);
    const int Hkv = k.shape(1), Lk = k.shape(2), group = Hq / Hkv;
    const View qv(q), kv(k), vv(v);
    std::optional<View> mv;
    if (masked) mv.emplace(ins[3]);
    // The innermost axis of q/k/v is read contiguously (the model's views all have stride 1 there).
    if (q.strides()[3] != 1 || k.strides()[3] != 1 || v.strides()[3] != 1)
      throw std::runtime_error("MmtDecodeAttention: the last axis of q, k and v must be contiguous");
    float* op = out.data<float>();
    // rows (b, h, t) shared out in blocks of queries; each row is attend_row's alone, so the bits do not
    // depend on the thread count (a prompt's many queries now take this path too, see models/base.py)
    constexpr int kQueries = 8;
    const int tblocks = (Lq + kQueries - 1) / kQueries;
    parallel_for(B * Hq * tblocks, Lq > 1 ? num_threads() : 1, [&](int c) {
      thread_local std::vector<float> p, acc;
      p.resize(Lk);
      acc.resize(D);
      const int b = c / (Hq * tblocks), h = c / tblocks % Hq, t0 = c % tblocks * kQueries;
      const int hk = h / group;
      const float* kb = reinterpret_cast<const float*>(kv.base) + b * kv.s[0] + hk * kv.s[1];
      const float* vb = reinterpret_cast<const float*>(vv.base) + b * vv.s[0] + hk * vv.s[1];
      for (int t = t0; t < std::min(Lq, t0 + kQueries); ++t) {
        const float* qr = reinterpret_cast<const float*>(qv.base) + b * qv.s[0] + h * qv.s[1] + t * qv.s[2];
        const bool* mr = masked ? reinterpret_cast<const bool*>(mv->base) + b * mv->s[0] + t * mv->s[2] : nullptr;
        float* orow = op + (size_t(b) * Lq + t) * size_t(Hq) * D + size_t(h) * D;
        attend_row(qr, kb, kv.s[2], vb, vv.s[2], Lk, D, scale, mr, masked ? mv->s[3] : 0, p.data(), acc.data(),
                   orow);
      }
    });
  });
}

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtDecodeAttention runs on the CPU only; GPUs use mx.fast.scaled_dot_product_attention");
}

bool DecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeAttention&>(other);
  return scale_ == o.scale_ && masked_ == o.masked_;
}

}  // namespace mmt
