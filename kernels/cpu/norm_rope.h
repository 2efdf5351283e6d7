// RMSNorm, RoPE and the gated activation (SiLU or GELU of gate, times up) as MLX primitives for the CPU. On x86 MLX runs mx.fast.rms_norm and mx.fast.rope as
// graphs of small ops (about 8 and 20 nodes: square, mean, rsqrt, ...; arange, exp, cos, sin, ...), each
// evaluated single-threaded with a few microseconds of overhead: per decoded token that is ~1,500 nodes on
// SmolLM2. These are one node each, with the same arithmetic (float32, MLX's formulas).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mmt {

namespace mx = mlx::core;

// x (..., D) * rsqrt(mean(x^2) + eps) * w; f32 result.
mx::array rms_norm_op(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});

// Non-traditional (half-split) RoPE over the last axis of x (B, H, T, D), any strides; position of
// x[b, :, t] = (offset[b] + t) * scale (offset: int32 of shape () or (B,)); f32 result, row-contiguous.
mx::array rope_op(const mx::array& x, const mx::array& offset, int dims, float base, float scale,
                  mx::StreamOrDevice s = {});

// act(gate) * up (act: SiLU, or GELU's tanh approximation when gelu); f32 result. MLX runs it as 3-9 nodes.
mx::array gated_activation_op(const mx::array& gate, const mx::array& up, bool gelu, mx::StreamOrDevice s = {});

class GatedActivation : public mx::UnaryPrimitive {
 public:
  GatedActivation(mx::Stream stream, bool gelu) : mx::UnaryPrimitive(stream), gelu_(gelu) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtGatedActivation"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool gelu_;
};

class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream stream, int dims, float base, float scale)
      : mx::UnaryPrimitive(stream), dims_(dims), base_(base), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtRope"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int dims_;
  float base_;
  float scale_;
};

}  // namespace mmt
