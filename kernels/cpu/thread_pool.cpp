#include "thread_pool.h"

#include <atomic>
#include <chrono>
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

// After a job a worker keeps polling for the next one this long before it sleeps: a decode step runs a
// product every ~20-100 us, and waking a sleeping thread through the kernel costs about as much as one.
constexpr auto kSpin = std::chrono::microseconds(300);

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int nchunks, int nthreads, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> serial(run_m_);  // one job at a time (MLX may evaluate on several threads)
    while (int(workers_.size()) < nthreads - 1) workers_.emplace_back([this, i = int(workers_.size())] { loop(i); });
    fn_ = &fn;
    total_ = nchunks;
    wanted_ = nthreads - 1;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    open_.store(true, std::memory_order_release);  // publishes fn_, total_, wanted_ and next_
    {
      std::lock_guard<std::mutex> lk(m_);  // a worker about to sleep sees the new generation or is woken
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    work();
    for (int spins = 0; done_.load(std::memory_order_acquire) < total_; ++spins) {
      if (spins < 20000) MMT_PAUSE(); else std::this_thread::yield();
    }
    open_.store(false, std::memory_order_release);  // workers not yet inside stay out of this job
    while (inside_.load(std::memory_order_acquire) > 0) MMT_PAUSE();
  }

 private:
  void work() {
    for (int i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < total_;) {
      (*fn_)(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // Works on the current job if it is still open and this worker is wanted for it.
  void join(int index) {
    inside_.fetch_add(1, std::memory_order_acq_rel);
    if (open_.load(std::memory_order_acquire) && index < wanted_) work();
    inside_.fetch_sub(1, std::memory_order_acq_rel);
  }

  void loop(int index) {
    unsigned long long seen = 0;
    for (;;) {
      // poll for a while, then sleep until the next job
      const auto until = std::chrono::steady_clock::now() + kSpin;
      bool got = false;
      for (int spins = 0;; ++spins) {
        if (stop_.load(std::memory_order_acquire)) return;
        if (gen_.load(std::memory_order_acquire) != seen) {
          got = true;
          break;
        }
        MMT_PAUSE();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() > until) break;
      }
      if (!got) {
        std::unique_lock<std::mutex> lk(m_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lk, [&] { return stop_.load() || gen_.load() != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        if (stop_.load()) return;
      }
      seen = gen_.load(std::memory_order_acquire);
      join(index);
    }
  }

  std::mutex run_m_, m_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<int> next_{0}, done_{0}, inside_{0}, sleeping_{0};
  std::atomic<bool> open_{false}, stop_{false};
  std::atomic<unsigned long long> gen_{0};
  int total_ = 0, wanted_ = 0;
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
