#include "rotation.h"

#include <stdexcept>
#include <vector>

#define POCKETFFT_NO_MULTITHREADING  // rows are shared out by our own pool
#define POCKETFFT_CACHE_SIZE 16      // plans by length (the default, 0, recomputes the twiddles on every call)
#include "mlx/3rdparty/pocketfft.h"

#include "affine_kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "operands.h"
#include "thread_pool.h"

namespace mmt {
namespace {

using RealPlan = pocketfft::detail::pocketfft_r<float>;

// One row in place. pocketfft's real transform keeps the spectrum in FFTPACK's half-complex order: c[0] = bin 0,
// then (re, im) of bins 1, 2, ..., and for even n the Nyquist bin's real part last. Bins 0 and n / 2 have real
// factors (+-1, see rotation.py); `conj` turns the factors into their conjugates (the inverse rotation).
void spin(float* c, int n, const float* phase, bool conj) {
  c[0] *= phase[0];
  const int pairs = (n - 1) / 2;
  const float sgn = conj ? -1.f : 1.f;
  for (int k = 1; k <= pairs; ++k) {
    const float re = c[2 * k - 1], im = c[2 * k];
    const float pr = phase[2 * k], pi = sgn * phase[2 * k + 1];
    c[2 * k - 1] = re * pr - im * pi;
    c[2 * k] = re * pi + im * pr;
  }
  if (n % 2 == 0) c[n - 1] *= phase[n];  // bin n / 2: (re, im) at phase[n], phase[n + 1]
}

void rotate_row(const RealPlan& plan, const float* x, const float* signs, const float* phase, bool inverse,
                float* y, int n) {
  if (inverse) {
    std::copy(x, x + n, y);
  } else {
    for (int j = 0; j < n; ++j) y[j] = x[j] * signs[j];
  }
  plan.exec(y, 1.f, true);
  spin(y, n, phase, inverse);
  plan.exec(y, 1.f / float(n), false);  // irfft's 1 / n, as MLX and numpy normalise it
  if (inverse)
    for (int j = 0; j < n; ++j) y[j] *= signs[j];
}

}  // namespace

mx::array fft_rotate_op(const mx::array& x, const mx::array& signs, const mx::array& phase, bool inverse,
                        mx::StreamOrDevice s) {
  if (x.ndim() < 1) throw std::invalid_argument("fft_rotate: x must have at least one dimension");
  const int n = x.shape(-1);
  if (n < 1 || signs.ndim() != 1 || signs.shape(0) != n)
    throw std::invalid_argument("fft_rotate: signs must be (n,) for x (..., n)");
  if (phase.ndim() != 2 || phase.shape(0) != n / 2 + 1 || phase.shape(1) != 2)
    throw std::invalid_argument("fft_rotate: phase must be (n / 2 + 1, 2): each bin's (re, im)");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<FftRotate>(stream, inverse),
                   {mx::astype(x, mx::float32, stream), mx::astype(signs, mx::float32, stream),
                    mx::astype(phase, mx::float32, stream)});
}

void FftRotate::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const std::vector<mx::array> ops = row_contiguous_inputs(inputs, enc);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : ops) enc.set_input_array(a);
  enc.set_output_array(out);
  enc.dispatch([x = mx::array::unsafe_weak_copy(ops[0]), signs = mx::array::unsafe_weak_copy(ops[1]),
                phase = mx::array::unsafe_weak_copy(ops[2]), out = mx::array::unsafe_weak_copy(out),
                inverse = inverse_]() mutable {
    const int n = x.shape(-1);
    const int rows = n ? int(x.size() / n) : 0;
    if (rows == 0) return;
    const auto plan = pocketfft::detail::get_plan<RealPlan>(size_t(n));
    const float *xp = x.data<float>(), *sp = signs.data<float>(), *pp = phase.data<float>();
    float* op = out.data<float>();
    // each row alone: the same arithmetic whatever the row count or the thread that runs it
    constexpr int kRowsPerChunk = 8;
    parallel_for((rows + kRowsPerChunk - 1) / kRowsPerChunk, rows > 1 ? num_threads() : 1, [&](int c) {
      for (int r = c * kRowsPerChunk; r < std::min(rows, (c + 1) * kRowsPerChunk); ++r)
        rotate_row(*plan, xp + size_t(r) * n, sp, pp, inverse, op + size_t(r) * n, n);
    });
  });
}

void FftRotate::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MmtFftRotate runs on the CPU only; GPUs use mx.fft");
}

bool FftRotate::is_equivalent(const mx::Primitive& other) const {
  return inverse_ == static_cast<const FftRotate&>(other).inverse_;
}

}  // namespace mmt
