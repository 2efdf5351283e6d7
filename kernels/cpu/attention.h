// Attention of a few queries (decode) against a KV cache as one MLX primitive for the CPU. MLX's CPU
// scaled_dot_product_attention is a graph (grouped-head reshapes, two matmuls, a softmax, a transpose back):
// about 12 nodes per layer and token. This reads q, k, v through their strides (cache slices need no copy),
// handles grouped KV heads and a boolean mask, and writes (B, Lq, Hq * D), the layout the output projection
// takes.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mmt {

namespace mx = mlx::core;

// q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) with Hq % Hkv == 0; mask: bool, broadcastable to
// (B, 1, Lq, Lk) (true = visible) or none. Returns softmax(scale * q k^T) v as (B, Lq, Hq * D), f32.
mx::array decode_attention_op(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                              const std::optional<mx::array>& mask, mx::StreamOrDevice s = {});

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream stream, float scale, bool masked)
      : mx::UnaryPrimitive(stream), scale_(scale), masked_(masked) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtDecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool masked_;
};

}  // namespace mmt
