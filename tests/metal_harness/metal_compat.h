// Just enough of the Metal Shading Language to run mmt_mlx's kernel bodies as C++20 on a CPU.
//
// Model: a threadgroup is tx*ty*tz std::threads; `threadgroup` arrays become function-local statics
// (the generated source defines `threadgroup` as `static` only around the kernel text), so they are
// shared by the group's threads. Groups run one after another, with a barrier between groups, so the
// statics are never used by two groups at once. metal::threadgroup_barrier is a std::barrier.
// Limits: no simdgroup functions, no `threadgroup T* p` pointers, no initializers on threadgroup arrays.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

typedef unsigned int uint;

struct uint3 {
  uint x, y, z;
};

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

namespace harness {
inline thread_local std::barrier<>* group_barrier = nullptr;
}

inline void threadgroup_barrier(mem_flags) { harness::group_barrier->arrive_and_wait(); }

inline float exp(float v) { return std::exp(v); }
inline float cos(float v) { return std::cos(v); }
inline float sin(float v) { return std::sin(v); }
inline float sqrt(float v) { return std::sqrt(v); }
inline float abs(float v) { return std::fabs(v); }
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T max(T a, T b) { return a > b ? a : b; }

namespace harness {

// The arguments MLX's generated signature passes to a kernel (only those the body names are used).
struct ThreadIds {
  uint3 thread_position_in_grid;
  uint3 threadgroup_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threads_per_threadgroup;
  uint thread_index_in_threadgroup;
};

// Runs body over the whole grid (in threads, as mx.fast.metal_kernel takes it).
inline void launch(uint3 grid, uint3 group, const std::function<void(const ThreadIds&)>& body) {
  if (grid.x % group.x || grid.y % group.y || grid.z % group.z) {
    throw std::invalid_argument("harness: grid must be a multiple of the threadgroup");
  }
  const uint3 ngroups{grid.x / group.x, grid.y / group.y, grid.z / group.z};
  const uint nthreads = group.x * group.y * group.z;
  std::barrier<> bar(nthreads);
  std::vector<std::thread> pool;
  pool.reserve(nthreads);
  for (uint lin = 0; lin < nthreads; ++lin) {
    pool.emplace_back([&, lin] {
      group_barrier = &bar;
      const uint3 tp{lin % group.x, (lin / group.x) % group.y, lin / (group.x * group.y)};
      for (uint gz = 0; gz < ngroups.z; ++gz)
        for (uint gy = 0; gy < ngroups.y; ++gy)
          for (uint gx = 0; gx < ngroups.x; ++gx) {
            ThreadIds ids;
            ids.thread_position_in_threadgroup = tp;
            ids.threadgroup_position_in_grid = uint3{gx, gy, gz};
            ids.thread_position_in_grid =
                uint3{gx * group.x + tp.x, gy * group.y + tp.y, gz * group.z + tp.z};
            ids.threads_per_threadgroup = group;
            ids.thread_index_in_threadgroup = lin;
            body(ids);
            bar.arrive_and_wait();  // nobody starts the next group while threadgroup statics are in use
          }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace harness
}  // namespace metal
