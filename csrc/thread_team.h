// The CPU kernels' worker threads (the int8 decode step's, the sampler's): one team per calling
// thread, its workers spinning between a step's parallel loops and sleeping between steps.
//
// Why not at::parallel_for (OpenMP): a step is 60-120 parallel loops of 5-400 µs each. libgomp's
// workers spin between loops only while the process has no more OpenMP threads than cores; once a
// second thread has run a parallel loop (the server's engine thread, after the main thread loaded
// the model) every worker sleeps after ~100 spins, and each loop waits for a futex wake-up. gpt2's
// batch-1 step took 5.0 ms from a Python thread against 1.6 on the main thread (2-core EPYC).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace gpt2engine::cpu_decode {

class ThreadTeam {
 public:
  // How long a worker spins for the next loop before it sleeps: longer than the gaps inside a step
  // (LayerNorm and quantisation between two GEMVs: ~1-20 µs). `rest` ends the spinning sooner.
  static constexpr std::chrono::microseconds kSpin{200};

  ThreadTeam() : state_(std::make_unique<State>()), pid_(getpid()) {}
  ThreadTeam(const ThreadTeam&) = delete;
  ThreadTeam& operator=(const ThreadTeam&) = delete;

  ~ThreadTeam() {
    if (getpid() != pid_) {
      (void)state_.release();  // a forked child: the workers are the parent's (see run)
      return;
    }
    State& s = *state_;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      s.stop = true;
      s.generation.fetch_add(1, std::memory_order_release);
    }
    s.wake.notify_all();
    for (std::thread& t : s.workers) t.join();
  }

  // Runs part(i, n) for i in [0, n): part 0 on the calling thread, the others on n - 1 workers, and
  // returns when every part has; then rethrows the first exception a part threw.
  void run(int n, const std::function<void(int, int)>& part) {
    if (n <= 1) {
      part(0, 1);
      return;
    }
    if (getpid() != pid_) {
      // A child forked after this thread used its team: the workers stayed in the parent, and a
      // worker may have held the mutex. Leave that state untouched (a small leak) and start anew.
      (void)state_.release();
      state_ = std::make_unique<State>();
      pid_ = getpid();
    }
    State& s = *state_;
    while (static_cast<int>(s.workers.size()) < n - 1) {
      const int index = static_cast<int>(s.workers.size()) + 1;
      const uint64_t now = s.generation.load(std::memory_order_relaxed);  // a new worker waits for the next
      s.workers.emplace_back([&s, index, now] { work(s, index, now); });
    }
    s.resting.store(false, std::memory_order_relaxed);
    s.job = &part;
    s.parts = n;
    s.pending.store(static_cast<int>(s.workers.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(s.mutex);  // a worker about to sleep sees the new generation
      s.generation.fetch_add(1, std::memory_order_release);
    }
    s.wake.notify_all();
    try {
      part(0, n);
    } catch (...) {
      keep_first(s, std::current_exception());
    }
    while (s.pending.load(std::memory_order_acquire) != 0) _mm_pause();
    if (s.error) std::rethrow_exception(std::exchange(s.error, nullptr));
  }

  // No loop follows soon (a step has ended): the workers sleep now instead of spinning. Spinning
  // on, they took the cores from PyTorch's own threads in the ops after the step: gpt2 at batch 8
  // decoded at 650-720 tok/s through the engine against 1480 with OpenMP's team (2-core EPYC).
  void rest() { state_->resting.store(true, std::memory_order_relaxed); }

 private:
  struct State {
    std::vector<std::thread> workers;
    std::atomic<uint64_t> generation{0};
    std::atomic<int> pending{0};
    std::atomic<bool> resting{false};
    const std::function<void(int, int)>* job = nullptr;
    int parts = 0;
    bool stop = false;
    std::exception_ptr error;  // the first a part threw in this run (under mutex)
    std::mutex mutex;
    std::condition_variable wake;
  };

  // Every worker answers every generation (those beyond the parts only count down), so that each
  // reads the job of the generation it saw: the next is published only after all have answered.
  static void work(State& s, int index, uint64_t seen) {
    for (;;) {
      uint64_t now = s.generation.load(std::memory_order_acquire);
      if (now == seen) now = wait_past(s, seen);
      seen = now;
      if (s.stop) return;
      if (index < s.parts) {
        try {
          (*s.job)(index, s.parts);
        } catch (...) {
          keep_first(s, std::current_exception());
        }
      }
      s.pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  static void keep_first(State& s, std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.error) s.error = e;
  }

  static uint64_t wait_past(State& s, uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      const uint64_t now = s.generation.load(std::memory_order_acquire);
      if (now != seen) return now;
      _mm_pause();
      if (i % 64 == 0 && (s.resting.load(std::memory_order_relaxed) || std::chrono::steady_clock::now() > until))
        break;
    }
    std::unique_lock<std::mutex> lock(s.mutex);
    s.wake.wait(lock, [&] { return s.generation.load(std::memory_order_acquire) != seen; });
    return s.generation.load(std::memory_order_acquire);
  }

  std::unique_ptr<State> state_;
  pid_t pid_;
};

// The calling thread's team (the engine thread's, in a server): its workers are its own. Inline, so
// every translation unit shares one per thread.
inline ThreadTeam& team() {
  static thread_local ThreadTeam t;
  return t;
}

// f(begin, end) over [0, items) in contiguous runs, one per thread: as many as torch's intra-op
// thread count for this thread (torch.set_num_threads), at most one per item.
template <class F>
void parallel_range(int64_t items, const F& f) {
  const int n = static_cast<int>(std::min<int64_t>(items, at::get_num_threads()));
  if (n <= 1) {
    if (items > 0) f(0, items);
    return;
  }
  team().run(n, [&](int i, int parts) { f(items * i / parts, items * (i + 1) / parts); });
}

}  // namespace gpt2engine::cpu_decode
