// The affine-quantized product as an MLX primitive, so it sits in MLX's lazy graph like any op.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mmt {

namespace mx = mlx::core;

// Throws unless (wq, scales, biases) hold a (rows, cols) matrix in MLX's affine layout at these bits/group.
void check_affine(const char* where, int cols, const mx::array& wq, const mx::array& scales,
                  const mx::array& biases, int group_size, int bits);

// y (..., rows) = x (..., cols) @ W.T; W in MLX's affine layout (wq uint32, scales and biases f32).
mx::array affine_matmul_op(const mx::array& x, const mx::array& wq, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, mx::StreamOrDevice s = {});

class AffineMatmul : public mx::UnaryPrimitive {
 public:
  AffineMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtAffineMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

// y (..., rows) = x (..., cols) @ W.T for codebook codes (the rotated Gaussian codes, x already rotated):
// W[r][j] = scales[r][g] * codebook[code], codes packed as MLX's affine layout packs them; a codebook of 4 x 2^bits
// levels holds trellis codes (codebook[state << bits | code], affine_kernels.h). Needs the integer
// kernels (codebook_int_gemm); the caller checks `isa()` and otherwise keeps the MLX-ops path.
mx::array codebook_matmul_op(const mx::array& x, const mx::array& wq, const mx::array& scales,
                             const mx::array& codebook, int group_size, int bits, mx::StreamOrDevice s = {});

class CodebookMatmul : public mx::UnaryPrimitive {
 public:
  CodebookMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtCodebookMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

// W (rows, cols) as f32 from MLX's affine layout (f16 or f32 scales and biases).
mx::array affine_dequantize_op(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                               int group_size, int bits, mx::StreamOrDevice s = {});

class AffineDequantize : public mx::UnaryPrimitive {
 public:
  AffineDequantize(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtAffineDequantize"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

}  // namespace mmt
