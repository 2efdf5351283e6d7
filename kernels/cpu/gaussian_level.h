// The Gaussian level's product on the CPU: W[r, :] = sum_k amp[r, k] * g_{s(r,k)}(j - mu[r, k]) (columns in the
// level's permuted order), so W x is the input blurred once with each width of the sigma grid, then K taps of
// those blurs per row. The blur is a direct convolution over each width's reach (the taps the MLX reference
// keeps: ops.gaussian_plan; it uses conv1d or an FFT for the same sums), the gather reads an L1-sized buffer.
// One function per token, shared by the one-op primitive (any number of tokens) and the fused decode layer,
// so a token gets the same bits on both paths whatever the thread count.
#pragma once

#include <cstdint>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mmt {

namespace mx = mlx::core;

struct GaussianWeights {
  const float* amp;      // (rows, k) amplitudes
  const int32_t* index;  // (rows, k): sigma index * cols + centre, a position in the blurred input
  const int32_t* perm;   // (cols) or nullptr: column j of the level reads x[perm[j]]
  const float* taps;     // (nsig, 2 * reach_max + 1): each width's kernel centred at reach_max, 0 past its reach
  const int32_t* reach;  // (nsig) half-widths, <= reach_max
  int rows, cols, k, nsig, reach_max;
};

// y (rows) = W x for one token (y overwritten).
void gaussian_matvec(const GaussianWeights& g, const float* x, float* y);

// y (tokens, rows) = x (tokens, cols) @ W.T; tokens shared over the pool, each computed by gaussian_matvec.
void gaussian_matmul(const GaussianWeights& g, const float* x, float* y, int tokens);

// Throws unless the operands describe one Gaussian level over `cols` inputs (shapes and dtypes; the index
// values are checked where they are built, mmt_mlx/fgs/runtime/layers.py).
void check_gaussian(const char* where, int cols, const mx::array& amp, const mx::array& index, const mx::array& perm,
                    const mx::array& taps, const mx::array& reach);

// The view of checked, row-contiguous operands (perm of size 0: no permutation).
GaussianWeights gaussian_of(const mx::array& amp, const mx::array& index, const mx::array& perm, const mx::array& taps,
                            const mx::array& reach, int cols);

// x (..., cols) -> (..., rows) f32.
mx::array gaussian_matmul_op(const mx::array& x, const mx::array& amp, const mx::array& index, const mx::array& perm,
                             const mx::array& taps, const mx::array& reach, mx::StreamOrDevice s = {});

class GaussianMatmul : public mx::UnaryPrimitive {
 public:
  explicit GaussianMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MmtGaussianMatmul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace mmt
