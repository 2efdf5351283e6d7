#include "gaussian_level.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "affine_kernels.h"
#include "clones.h"
#include "operands.h"
#include "thread_pool.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"


namespace mmt {
namespace {

typedef float float8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// b[j] = sum_{d=-r..r} tap[d] xp[j + d] for j < cols, in that order of d for every j. 32 columns at a time stay
// in registers over all the taps (one load and one FMA per 8 products; accumulating into b in memory cost a load
// and a store more per 8, and the portable build had no FMA: ~55 us per token for Gemma 3's levels).
MMT_CLONES void blur(const float* xp, const float* tap, int r, int cols, float* b) {
  int j = 0;
  for (; j + 32 <= cols; j += 32) {
    float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int d = -r; d <= r; ++d) {
      const float w = tap[d];
      const float* src = xp + j + d;
      a0 += w * load8(src);
      a1 += w * load8(src + 8);
      a2 += w * load8(src + 16);
      a3 += w * load8(src + 24);
    }
    std::memcpy(b + j, &a0, sizeof a0);
    std::memcpy(b + j + 8, &a1, sizeof a1);
    std::memcpy(b + j + 16, &a2, sizeof a2);
    std::memcpy(b + j + 24, &a3, sizeof a3);
  }
  for (; j + 8 <= cols; j += 8) {
    float8 a = {};
    for (int d = -r; d <= r; ++d) a += tap[d] * load8(xp + j + d);
    std::memcpy(b + j, &a, sizeof a);
  }
  for (; j < cols; ++j) {
    float a = 0.f;
    for (int d = -r; d <= r; ++d) a += tap[d] * xp[j + d];
    b[j] = a;
  }
}

}  // namespace

void gaussian_matvec(const GaussianWeights& g, const float* x, float* y) {
  const int cols = g.cols, R = g.reach_max, width = 2 * R + 1;
  thread_local std::vector<float> xpad, blur_out;
  xpad.assign(size_t(cols) + 2 * R, 0.f);  // zero outside the row, as the reference's padding
  blur_out.resize(size_t(g.nsig) * cols);
  float* xp = xpad.data() + R;
  if (g.perm) {
    for (int j = 0; j < cols; ++j) xp[j] = x[g.perm[j]];
  } else {
    std::copy(x, x + cols, xp);
  }
  for (int s = 0; s < g.nsig; ++s) {
    const int r = std::clamp(int(g.reach[s]), 0, R);  // never past the taps (layers.py builds r <= R)
    const float* tap = g.taps + size_t(s) * width + R;  // tap[d] for d in [-r, r]
    blur(xp, tap, r, cols, blur_out.data() + size_t(s) * cols);
  }
  const float* bl = blur_out.data();
  for (int r = 0; r < g.rows; ++r) {
    const float* a = g.amp + size_t(r) * g.k;
    const int32_t* ix = g.index + size_t(r) * g.k;
    float acc = 0.f;
    for (int i = 0; i < g.k; ++i) acc += a[i] * bl[ix[i]];
    y[r] = acc;
  }
}

void gaussian_matmul(const GaussianWeights& g, const float* x, float* y, int tokens) {
  parallel_for(tokens, num_threads(), [&](int t) {
    gaussian_matvec(g, x + size_t(t) * g.cols, y + size_t(t) * g.rows);
  });
}

void check_gaussian(const char* where, int cols, const mx::array& amp, const mx::array& index, const mx::array& perm,
                    const mx::array& taps, const mx::array& reach) {
  const std::string w(where);
  if (amp.ndim() != 2 || amp.dtype() != mx::float32 || index.shape() != amp.shape() || index.dtype() != mx::int32)
    throw std::invalid_argument(w + ": the Gaussian amplitudes (f32) and indices (int32) must be (rows, k)");
  if (perm.dtype() != mx::int32 || perm.ndim() != 1 || (perm.size() != 0 && perm.shape(0) != cols))
    throw std::invalid_argument(w + ": the Gaussian permutation must be int32 (cols) or empty");
  if (taps.ndim() != 2 || taps.dtype() != mx::float32 || taps.shape(1) % 2 != 1 || reach.ndim() != 1 ||
      reach.dtype() != mx::int32 || reach.shape(0) != taps.shape(0) || taps.shape(0) == 0)
    throw std::invalid_argument(w + ": the Gaussian taps must be f32 (widths, 2R+1), reach int32 (widths)");
}

GaussianWeights gaussian_of(const mx::array& amp, const mx::array& index, const mx::array& perm, const mx::array& taps,
                            const mx::array& reach, int cols) {
  GaussianWeights g{amp.data<float>(), index.data<int32_t>(), perm.size() ? perm.data<int32_t>() : nullptr,
                    taps.data<float>(), reach.data<int32_t>(), int(amp.shape(0)), cols, int(amp.shape(1)),
                    int(taps.shape(0)), int(taps.shape(1)) / 2};
  return g;
}

mx::array gaussian_matmul_op(const mx::array& x, const mx::array& amp, const mx::array& index, const mx::array& perm,
                             const mx::array& taps, const mx::array& reach, mx::StreamOrDevice s) {
  if (x.ndim() < 1) throw std::invalid_argument("gaussian_matmul: x must have at least one dimension");
  check_gaussian("gaussian_matmul", x.shape(-1), amp, index, perm, taps, reach);
  auto stream = mx::to_stream(s);
  mx::Shape out_shape = x.shape();
  out_shape.back() = amp.shape(0);
  return mx::array(out_shape, mx::float32, std::make_shared<GaussianMatmul>(stream),
                   {mx::astype(x, mx::float32, stream), amp, index, perm, taps, reach});
}

void GaussianMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : ops) enc.set_input_array(a);
  enc.set_output_array(out);
  std::vector<mx::array> weak;
  for (const auto& a : ops) weak.push_back(mx::array::unsafe_weak_copy(a));
  enc.dispatch([ops = std::move(weak), out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int cols = ops[0].shape(-1);
    const int tokens = cols ? int(ops[0].size() / cols) : 0;
    const GaussianWeights g = gaussian_of(ops[1], ops[2], ops[3], ops[4], ops[5], cols);
    gaussian_matmul(g, ops[0].data<float>(), out.data<float>(), tokens);
  });
}

void GaussianMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtGaussianMatmul runs on the CPU only; GPUs use the Gaussian kernels");
}

}  // namespace mmt
