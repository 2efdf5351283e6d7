// The seeded FFT rotation of the rotated Gaussian codes (mmt_mlx/fgs/encoders/rotation.py) as one CPU primitive:
// R x = irfft(rfft(signs * x) * phase) along the last axis, and its inverse R^T y = signs * irfft(rfft(y) *
// conj(phase)). MLX runs it as ~6 nodes (astype, multiply, rfft, complex multiply, irfft) of ~80 us together
// for a 576-wide token; here it is one real FFT pair per row through the pocketfft that MLX itself ships.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mmt {

namespace mx = mlx::core;

// x (..., n) f32; signs (n,) f32 of +-1; phase (n / 2 + 1, 2) f32: each bin's unit-modulus factor (re, im).
mx::array fft_rotate_op(const mx::array& x, const mx::array& signs, const mx::array& phase, bool inverse,
                        mx::StreamOrDevice s = {});

class FftRotate : public mx::UnaryPrimitive {
 public:
  FftRotate(mx::Stream stream, bool inverse) : mx::UnaryPrimitive(stream), inverse_(inverse) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtFftRotate"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool inverse_;
};

}  // namespace mmt
