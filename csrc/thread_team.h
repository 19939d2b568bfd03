// The int8 CPU decode step's worker threads: one team per calling thread, its workers spinning
// between the step's parallel loops and sleeping between steps.
//
// Why not at::parallel_for (OpenMP): a step is 60-120 parallel loops of 5-400 µs each. libgomp's
// workers spin between loops only while the process has no more OpenMP threads than cores; once a
// second thread has run a parallel loop (the server's engine thread, after the main thread loaded
// the model) every worker sleeps after ~100 spins, and each loop waits for a futex wake-up. gpt2's
// batch-1 step took 5.0 ms from a Python thread against 1.6 on the main thread (2-core EPYC).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace gpt2engine::cpu_decode {

class ThreadTeam {
 public:
  // How long a worker spins for the next loop before it sleeps: longer than the gaps inside a step
  // (LayerNorm and quantisation between two GEMVs: ~1-20 µs), shorter than the Python work between
  // two steps, so that an idle engine leaves its cores alone.
  static constexpr std::chrono::microseconds kSpin{200};

  ThreadTeam() = default;
  ThreadTeam(const ThreadTeam&) = delete;
  ThreadTeam& operator=(const ThreadTeam&) = delete;

  ~ThreadTeam() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  // Runs part(i, n) for i in [0, n): part 0 on the calling thread, the others on n - 1 workers, and
  // returns when every part has. `part` must not throw.
  void run(int n, const std::function<void(int, int)>& part) {
    if (n <= 1) {
      part(0, 1);
      return;
    }
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int index = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = &part;
    parts_ = n;
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);  // a worker about to sleep sees the new generation
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    part(0, n);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  // Every worker answers every generation (those beyond the parts only count down), so that each
  // reads the job of the generation it saw: the next is published only after all have answered.
  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      if (now == seen) now = wait_past(seen);
      seen = now;
      if (stop_) return;
      if (index < parts_) (*job_)(index, parts_);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  uint64_t wait_past(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      _mm_pause();
      if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
    return generation_.load(std::memory_order_acquire);
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  int parts_ = 0;
  bool stop_ = false;
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace gpt2engine::cpu_decode
