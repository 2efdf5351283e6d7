#include "thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MMT_PAUSE() _mm_pause()
#else
#define MMT_PAUSE() std::this_thread::yield()
#endif

namespace mmt {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int nchunks, int nthreads, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> serial(run_m_);  // one job at a time (MLX may evaluate on several threads)
    while (int(workers_.size()) < nthreads - 1) workers_.emplace_back([this, i = int(workers_.size())] { loop(i); });
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      total_ = nchunks;
      next_.store(0);
      done_.store(0);
      wanted_ = nthreads - 1;
      open_ = true;
      ++gen_;
    }
    cv_.notify_all();
    work();
    for (int spins = 0; done_.load(std::memory_order_acquire) < total_; ++spins) {
      if (spins < 2000) MMT_PAUSE(); else std::this_thread::yield();
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      open_ = false;  // workers not yet inside stay out of this job
    }
    while (inside_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
  }

 private:
  void work() {
    for (int i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < total_;) {
      (*fn_)(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop(int index) {
    unsigned long long seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || gen_ != seen; });
        if (stop_) return;
        seen = gen_;
        if (!open_ || index >= wanted_) continue;
        inside_.fetch_add(1, std::memory_order_acq_rel);
      }
      work();
      inside_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex run_m_, m_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<int> next_{0}, done_{0}, inside_{0};
  int total_ = 0, wanted_ = 0;
  bool open_ = false, stop_ = false;
  unsigned long long gen_ = 0;
};

}  // namespace

void parallel_for(int nchunks, int nthreads, const std::function<void(int)>& fn) {
  if (nthreads <= 1 || nchunks <= 1) {
    for (int i = 0; i < nchunks; ++i) fn(i);
    return;
  }
  static Pool pool;
  pool.run(nchunks, nthreads, fn);
}

}  // namespace mmt
