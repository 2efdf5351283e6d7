// The integer GEMM (kernels/cpu/int_gemm.inc, a prompt's products) against the few-token integer kernels (a
// continuous batch's decode step) on one matrix, by token count, on all cores, without MLX or Python: where the
// GEMM starts to pay, and its multiply-add rate.
//
//   g++ -O3 -std=c++20 -Ikernels/cpu bench/int_gemm_bench.cpp kernels/cpu/affine_kernels.cpp \
//       kernels/cpu/thread_pool.cpp -lpthread -o /tmp/int_gemm_bench
//   /tmp/int_gemm_bench [ROWS COLS BITS GROUP]     default 2048 640 6 128 (Gemma 3's gate projection)
//
// Each figure is the best of 7 runs (this host's speed drifts); random codes, f16 scales.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "affine_kernels.h"

int main(int argc, char** argv) {
  const int rows = argc > 4 ? std::atoi(argv[1]) : 2048, cols = argc > 4 ? std::atoi(argv[2]) : 640;
  const int bits = argc > 4 ? std::atoi(argv[3]) : 6, group = argc > 4 ? std::atoi(argv[4]) : 128;
  std::mt19937 rng(7);
  std::vector<uint32_t> wq(size_t(rows) * cols * bits / 32);
  for (auto& v : wq) v = rng();
  std::vector<uint16_t> scales(size_t(rows) * cols / group, 0x2000);  // f16 2^-7: the value does not change speed
  const mmt::AffineWeights w{wq.data(), scales.data(), scales.data(), rows, cols, bits, group, true};
  const int max_tokens = 256;
  std::vector<float> x(size_t(max_tokens) * cols), y(size_t(max_tokens) * rows);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(rng);
  auto best_ms = [](auto&& fn) {
    double best = 1e30;
    for (int i = 0; i < 7; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  std::printf("%dx%d %d-bit g%d, %d thread(s)\n", rows, cols, bits, group, mmt::num_threads());
  for (int tokens : {2, 4, 8, 16, 32, 64, 256}) {
    const double few = tokens <= 32 ? best_ms([&] { mmt::affine_matmul(w, x.data(), y.data(), tokens); }) : 0.0;
    const double gemm = best_ms([&] {
      if (!mmt::affine_int_gemm(w, x.data(), y.data(), tokens)) std::exit((std::puts("no integer GEMM here"), 1));
    });
    const double gmacs = double(rows) * cols * tokens / gemm / 1e6;
    if (tokens <= 32)
      std::printf("%3d tokens: few-token kernels %.3f ms, integer GEMM %.3f ms (%.0f GMAC/s)\n", tokens, few, gemm,
                  gmacs);
    else
      std::printf("%3d tokens: integer GEMM %.3f ms (%.0f GMAC/s)\n", tokens, gemm, gmacs);
  }
  return 0;
}
