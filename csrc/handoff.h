// The hand-offs between the caller's thread and the replicas' workers (dpfast/workers.py): a
// one-shot event (a job is done) and a counting semaphore (a job is queued), whose waits spin for
// a while before they sleep. No Python types; bindings.cpp releases the GIL around the waits.
//
// NOTE [Spinning hand-offs]
// A step hands work between threads four times (forward out and back, backward out and back). A
// thread that sleeps on a lock for the milliseconds of a forward or a backward is slow to wake:
// on a 2-core VM, 40-100 us from set() to the waiter running, where both threads polling take a
// few. So a waiter first spins (checking the flag, a pause between checks, yielding its core to
// any other runnable thread every few checks) for up to `spin_us`, then sleeps on a condition
// variable. The caller's waits also return every `timeout_s` so that Python can run signal
// handlers (Ctrl-C during a hung replica). DPFAST_SPIN_US sets the spin (0: sleep at once); without
// it a pool spins only where its workers and the caller's intra-op threads have a core each: a
// spinning waiter held off an OpenMP thread that needed its core (WorkerPool._refresh_spin).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace dpfast {

namespace detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("isb" ::: "memory");  // paces a spin where "yield" does nothing on many cores
#endif
}

// At most 10 s of spinning, whatever the caller asks: steady_clock's now() + spin_us must not overflow.
inline int64_t bounded_spin_us(int64_t spin_us) { return spin_us < 10000000 ? spin_us : 10000000; }

// Polls ready() for up to spin_us; true once it returned true.
template <typename Ready>
bool spin_until(Ready ready, int64_t spin_us) {
  if (ready()) return true;
  if (spin_us <= 0) return false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(bounded_spin_us(spin_us));
  for (uint32_t i = 1;; ++i) {
    if (ready()) return true;
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() >= deadline) return ready();
      std::this_thread::yield();  // a spinning waiter gives way where its core is wanted
    } else {
      cpu_relax();
    }
  }
}

// A wait's limit; false where there is none (< 0, or too long or NaN to count in nanoseconds).
inline bool limited(double timeout_s) { return timeout_s >= 0 && timeout_s < 1e6; }

inline std::chrono::nanoseconds seconds(double timeout_s) {
  return std::chrono::nanoseconds(static_cast<int64_t>(timeout_s * 1e9));
}

// The waits of both classes below: spin on ready() for up to spin_us, then sleep on cv (whose
// notifier changes what ready() reads under mutex) until ready() or timeout_s (as limited()
// reads it) passes. True once ready() returned true.
template <typename Ready>
bool wait_until(std::mutex& mutex, std::condition_variable& cv, Ready ready, int64_t spin_us, double timeout_s) {
  if (spin_until(ready, spin_us)) return true;
  std::unique_lock<std::mutex> lock(mutex);
  if (!limited(timeout_s)) {
    cv.wait(lock, ready);
    return true;
  }
  return cv.wait_for(lock, seconds(timeout_s), ready);
}

}  // namespace detail

// Set once, waited for by any number of threads.
class SpinEvent {
 public:
  void set() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      set_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
  }

  bool is_set() const { return set_.load(std::memory_order_acquire); }

  // True once set; false if timeout_s (< 0, NaN or 1e6 and more: no limit) passed first.
  bool wait(int64_t spin_us, double timeout_s) {
    return detail::wait_until(mutex_, cv_, [this] { return is_set(); }, spin_us, timeout_s);
  }

 private:
  std::atomic<bool> set_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
};

// release() adds one; acquire() takes one, waiting while there is none.
class SpinSemaphore {
 public:
  void release() {
    count_.fetch_add(1, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex_);  // a waiter checks under it before it sleeps
    }
    cv_.notify_one();
  }

  // True once one was taken; false if timeout_s (as for SpinEvent::wait) passed first. A release
  // may come before its item is visible to the taker (dpfast/workers.py's _Inbox takes items first
  // and waits here only when there is none), so a count above the items is harmless.
  bool acquire(int64_t spin_us, double timeout_s) {
    return detail::wait_until(mutex_, cv_, [this] { return try_take(); }, spin_us, timeout_s);
  }

 private:
  bool try_take() {
    int64_t count = count_.load(std::memory_order_acquire);
    while (count > 0) {
      if (count_.compare_exchange_weak(count, count - 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  std::atomic<int64_t> count_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace dpfast
