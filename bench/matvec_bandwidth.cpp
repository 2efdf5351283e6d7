// One-token products through the native kernel that the fused decode layer calls, on 1 and 2 threads, without
// MLX or Python: how fast the products can go on this machine, and what bounds them.
//
//   g++ -O3 -std=c++20 -Ikernels/cpu bench/matvec_bandwidth.cpp kernels/cpu/affine_kernels.cpp \
//       kernels/cpu/thread_pool.cpp -lpthread -o /tmp/matvec_bandwidth
//   /tmp/matvec_bandwidth [layers]                 SmolLM2's 30 layers of products (q, k, v, o, gate, up, down;
//                                                  4-bit codes, groups of 32, f16 scales, random codes); 1 layer
//                                                  is 2 MB (cache-resident), 30 stream 60 MB per pass
//   /tmp/matvec_bandwidth matrix ROWS COLS BITS GROUP
//                                                  one matrix, e.g. Gemma's head: matrix 262144 640 5 32
//   /tmp/matvec_bandwidth gemma BITS GROUP         Gemma 3 270M's 18 layers of products at one width and group
//   /tmp/matvec_bandwidth read                     a plain 256 MB read with AVX2 loads: the memory's own speed
//
// Each line gives the best pass and the median of the passes. MMT_PREFETCH=0 in the environment turns the kernels'
// software prefetch off (int_kernels.inc); MMT_SPLIT_CHUNK_KB sets the rows each thread takes at a time
// (affine_kernels.cpp); AS_LAYER=1 runs the layer modes' products as the fused decode layer groups them (q, k, v
// in one job, o, gate and up in one job, down) instead of one matrix per job.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "affine_kernels.h"

namespace {

struct Matrix {
  int rows, cols, bits, group;
  std::vector<uint32_t> wq;
  std::vector<uint16_t> scales;  // f16 1.0 (scales and biases alike): the value does not change the speed

  Matrix(int r, int c, int b, int g, std::mt19937& rng)
      : rows(r), cols(c), bits(b), group(g), wq(size_t(r) * c * b / 32), scales(size_t(r) * c / g, 0x3c00) {
    for (auto& v : wq) v = rng();
  }
  size_t bytes() const { return wq.size() * 4 + scales.size() * 4; }  // codes + scales + biases
  mmt::AffineWeights weights() const {
    return {wq.data(), scales.data(), scales.data(), rows, cols, bits, group, true};
  }
};

// Times passes over the matrices on 1 and 2 threads (twice each), from a thread of its own as MLX's stream
// thread calls the kernels; prints the best pass of each.
void time_passes(const std::vector<Matrix>& ms, int reps, const char* what) {
  size_t bytes = 0;
  for (const auto& m : ms) bytes += m.bytes();
  std::vector<float> x(1 << 16, 0.5f), y(1 << 20);
  std::thread([&] {
    for (int threads : {1, 2, 1, 2}) {
      mmt::set_num_threads(threads);
      double best = 1e30;
      std::vector<double> all;
      for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        if (std::getenv("AS_LAYER") && ms.size() % 7 == 0) {  // the fused layer's jobs: qkv, o, gate+up, down
          for (size_t l = 0; l < ms.size(); l += 7) {
            mmt::AffineWeights w[7];
            for (int i = 0; i < 7; ++i) w[i] = ms[l + i].weights();
            float* ys[3] = {y.data(), y.data() + 4096, y.data() + 8192};
            mmt::affine_matvec_shared_many(3, w, x.data(), ys);
            mmt::affine_matvec_shared(w[3], x.data(), y.data());
            mmt::affine_matvec_shared_many(2, w + 4, x.data(), ys);
            mmt::affine_matvec_shared(w[6], x.data(), y.data());
          }
        } else {
          for (const auto& m : ms) {
            const mmt::AffineWeights w = m.weights();
            mmt::affine_matvec_shared(w, x.data(), y.data());
          }
        }
        all.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        best = std::min(best, all.back());
      }
      std::sort(all.begin(), all.end());
      std::printf("%s, %d thread(s): %.3f ms per pass (median %.3f), %.1f GB/s of codes and scales\n", what,
                  threads, best, all[all.size() / 2], bytes / best / 1e6);
    }
  }).join();
}

__attribute__((target("avx2"))) float read_all(const float* p, size_t n) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
    b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
    c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
    d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
  }
  float o[8];
  _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  return o[0] + o[7];
}

void time_read() {
  const size_t n = size_t(64) << 20;  // 256 MB of floats
  std::vector<float> v(n, 1.f);
  for (int threads : {1, 2, 1, 2}) {
    double best = 1e30;
    float sink = 0.f;
    for (int r = 0; r < 8; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      if (threads == 1) {
        sink += read_all(v.data(), n);
      } else {
        float other = 0.f;
        std::thread t([&] { other = read_all(v.data() + n / 2, n / 2); });
        sink += read_all(v.data(), n / 2);
        t.join();
        sink += other;
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("plain read of 256 MB, %d thread(s): %.1f GB/s (%g)\n", threads, n * 4 / best / 1e9, double(sink));
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(1);
  if (argc > 1 && std::strcmp(argv[1], "read") == 0) {
    time_read();
    return 0;
  }
  if (argc > 5 && std::strcmp(argv[1], "matrix") == 0) {
    std::vector<Matrix> ms;
    ms.emplace_back(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), rng);
    char what[96];
    std::snprintf(what, sizeof what, "%dx%d %d-bit g%d", ms[0].rows, ms[0].cols, ms[0].bits, ms[0].group);
    time_passes(ms, 20, what);
    return 0;
  }
  const bool gemma = argc > 3 && std::strcmp(argv[1], "gemma") == 0;
  const int layers = gemma ? 18 : argc > 1 ? std::atoi(argv[1]) : 30;
  const int bits = gemma ? std::atoi(argv[2]) : 4, group = gemma ? std::atoi(argv[3]) : 32;
  const int smol[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  const int gem[7][2] = {{1024, 640}, {256, 640}, {256, 640}, {640, 1024}, {2048, 640}, {2048, 640}, {640, 2048}};
  std::vector<Matrix> ms;
  for (int l = 0; l < layers; ++l)
    for (const auto& s : gemma ? gem : smol) ms.emplace_back(s[0], s[1], bits, group, rng);
  char what[64];
  std::snprintf(what, sizeof what, "%s%d layer(s), %d-bit g%d", gemma ? "Gemma's " : "", layers, bits, group);
  time_passes(ms, layers == 1 ? 600 : 20, what);
  return 0;
}
