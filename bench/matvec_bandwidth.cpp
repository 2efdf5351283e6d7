// One-token products of SmolLM2's 30 decoder layers (q, k, v, o, gate, up, down; 4-bit codes, groups of 32,
// f16 scales, random codes) through the native kernel that the fused decode layer calls, on 1 and 2 threads,
// without MLX or Python: how fast the products can go on this machine, and whether that is bound by the cores
// (layers=1: 2 MB of codes, cache-resident) or by memory (layers=30: 60 MB streamed per token).
//
//   g++ -O3 -std=c++20 -Ikernels/cpu bench/matvec_bandwidth.cpp kernels/cpu/affine_kernels.cpp \
//       kernels/cpu/thread_pool.cpp -lpthread -o /tmp/matvec_bandwidth && /tmp/matvec_bandwidth [layers]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "affine_kernels.h"

namespace {

struct Matrix {
  int rows, cols;
  std::vector<uint32_t> wq;
  std::vector<uint16_t> scales;  // f16 1.0: the value does not change the speed
};

}  // namespace

int main(int argc, char** argv) {
  const int layers = argc > 1 ? std::atoi(argv[1]) : 30;
  const int shapes[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  std::mt19937 rng(1);
  std::vector<Matrix> ms;
  size_t bytes = 0;
  for (int l = 0; l < layers; ++l)
    for (const auto& s : shapes) {
      Matrix m{s[0], s[1], std::vector<uint32_t>(size_t(s[0]) * s[1] / 8),
               std::vector<uint16_t>(size_t(s[0]) * s[1] / 32, 0x3c00)};
      for (auto& v : m.wq) v = rng();
      bytes += m.wq.size() * 4 + m.scales.size() * 4;  // codes + scales + biases
      ms.push_back(std::move(m));
    }
  std::vector<float> x(1536, 0.5f), y(1536);
  // run from a thread of its own, as MLX's stream thread calls the kernels
  std::thread([&] {
    for (int threads : {1, 2, 1, 2}) {
      mmt::set_num_threads(threads);
      const int reps = layers == 1 ? 600 : 20;
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r)
        for (auto& m : ms) {
          mmt::AffineWeights w{m.wq.data(), m.scales.data(), m.scales.data(), m.rows, m.cols, 4, 32, true};
          mmt::affine_matvec_shared(w, x.data(), y.data());
        }
      const double ms_per =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
      std::printf("%d layer(s), %d thread(s): %.3f ms per pass, %.1f GB/s of codes and scales\n", layers, threads,
                  ms_per, bytes / ms_per / 1e6);
    }
  }).join();
  return 0;
}
