#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <immintrin.h>
#define SENTINEL_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__) && defined(__GNUC__)
#define SENTINEL_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define SENTINEL_CPU_RELAX() ((void)0)
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define SENTINEL_HAVE_PTHREAD_ATFORK 1
#endif
#if defined(__linux__)
#include <sched.h>
#endif

// How a job reaches the workers (and the result reaches the caller) cheaply.
//
// A worker that sleeps on a condition variable needs 10-65 us to run again on the
// small VMs this was tuned on, longer than a decode-sized GEMV takes. So after a worker
// finishes its part of a job it keeps polling for the next one for a bounded time
// (kSpinNs: _mm_pause first, then sched_yield so that other runnable threads on that
// CPU get their turn), and only then blocks. Likewise the caller, once it has no chunk
// left to take, polls the completion counter for a bounded time before blocking. Back
// to back parallel_for calls (the linears of a decoder layer) then hand over in well
// under a microsecond, and an idle process stops burning CPU kSpinNs after its last
// call. SENTINEL_POOL_SPIN_US (read once, when the pool is created) overrides kSpinNs,
// 0 disables spinning; SENTINEL_POOL_PAUSE_US likewise overrides kPauseSpinNs.
// Workers beyond the first (number of usable CPUs - 1) never spin, and the caller only
// spins while every helper it waits for can have a CPU of its own.
//
// A job is published through one 64-bit word, state_ = epoch << 32 | helpers << 16 |
// unclaimed: workers notice a new job when the epoch changes, worker i takes part when
// i < helpers, and every thread (the caller included) claims chunks by decrementing
// `unclaimed` with a compare-exchange that also checks the epoch. Chunks are claimed
// dynamically, so when a worker is slow to start (asleep, or descheduled) the caller
// simply runs its chunks too. A worker that still holds a stale epoch can never claim
// a chunk of a newer job, and the job's fields are only read after a successful claim,
// so the caller may return (and reuse the job slot) as soon as every claimed chunk is
// done (chunks_left_ == 0) without waiting for workers to acknowledge anything.
//
// Sleeping and waking use the usual "announce, then re-check" protocol with
// sequentially consistent operations on both sides (the waker changes the condition,
// then looks at the sleeper's flag; the sleeper sets its flag, then re-checks the
// condition under the mutex), so no wake-up is lost and a waker only touches a mutex
// when somebody actually sleeps.

namespace sentinel {
namespace {

constexpr int kMaxThreads = 256;
// Default bounded spin (see above): total, and the part of it spent in _mm_pause
// before switching to sched_yield.
constexpr int64_t kSpinNs = 250000;
constexpr int64_t kPauseSpinNs = 30000;

constexpr uint64_t kUnclaimedMask = 0xFFFF;
constexpr int kHelpersShift = 16;
constexpr int kEpochShift = 32;

inline uint64_t epoch_of(uint64_t s) { return s >> kEpochShift; }
inline int helpers_of(uint64_t s) { return static_cast<int>((s >> kHelpersShift) & 0xFFFF); }
inline int unclaimed_of(uint64_t s) { return static_cast<int>(s & kUnclaimedMask); }

using Clock = std::chrono::steady_clock;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// CPUs this process may run on (affinity mask / cgroup cpuset), at least 1.
int usable_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

int64_t us_from_env(const char* name, int64_t dflt_ns) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return dflt_ns;
  char* end = nullptr;
  const long long us = std::strtoll(s, &end, 10);
  if (end == s || us < 0) return dflt_ns;
  return std::min<long long>(us, 1000000) * 1000;  // at most 1 s
}

// Polls ready() until it returns true or `budget_ns` has passed: _mm_pause for the
// first `pause_ns`, then sched_yield. Returns ready()'s last value.
template <class Ready>
bool spin_until(Ready&& ready, int64_t budget_ns, int64_t pause_ns) {
  if (ready()) return true;
  if (budget_ns <= 0) return false;
  const int64_t start = now_ns();
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      SENTINEL_CPU_RELAX();
      if (ready()) return true;
    }
    const int64_t elapsed = now_ns() - start;
    if (elapsed >= budget_ns) return ready();
    if (elapsed >= pause_ns) std::this_thread::yield();
  }
}

// True on pool workers and on a thread currently inside parallel_for: a nested
// parallel_for then runs inline instead of deadlocking on the pool.
thread_local bool tl_in_parallel_region = false;

struct alignas(64) WorkerSlot {
  std::atomic<bool> sleeping{false};
  std::mutex mu;
  std::condition_variable cv;
};

class Pool {
 public:
  Pool()
      : spin_ns_(us_from_env("SENTINEL_POOL_SPIN_US", kSpinNs)),
        pause_ns_(us_from_env("SENTINEL_POOL_PAUSE_US", kPauseSpinNs)),
        cpus_(usable_cpus()) {}

  void run(int64_t n, int num_chunks, RangeFn fn, void* ctx) {
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel_for at a time
    const int helpers = ensure_workers(std::max(0, num_chunks - 1));

    // Nobody reads these until the state_ store below publishes them, and no claim
    // of the previous job is still running (its chunks_left_ reached 0).
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    num_chunks_ = num_chunks;
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    chunks_left_.store(num_chunks, std::memory_order_relaxed);
    const uint64_t epoch = epoch_of(state_.load(std::memory_order_relaxed)) + 1;
    // Chunk 0 is the caller's from the start (one compare-exchange on a contended
    // line less); the workers claim from chunk 1 on.
    state_.store((epoch << kEpochShift) | (static_cast<uint64_t>(helpers) << kHelpersShift) |
                     static_cast<uint64_t>(num_chunks - 1),
                 std::memory_order_seq_cst);
    for (int i = 0; i < helpers; ++i) {
      WorkerSlot& w = *slots_[i];
      if (w.sleeping.load(std::memory_order_seq_cst)) {
        { std::lock_guard<std::mutex> lk(w.mu); }
        w.cv.notify_one();
      }
    }

    tl_in_parallel_region = true;
    run_chunk(0);
    run_chunks(epoch);
    wait_done(helpers);
    tl_in_parallel_region = false;
    if (failed_.load(std::memory_order_relaxed)) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  int size() const { return num_workers_.load(std::memory_order_acquire); }

 private:
  // Starts workers up to `wanted`; returns how many exist (fewer if the OS refused).
  // Called with call_mu_ held.
  int ensure_workers(int wanted) {
    int have = static_cast<int>(slots_.size());
    while (have < wanted) {
      auto slot = std::make_unique<WorkerSlot>();
      WorkerSlot* sp = slot.get();
      const uint64_t epoch = epoch_of(state_.load(std::memory_order_relaxed));
      const int index = have;
      try {
        std::thread t([this, sp, index, epoch] { worker_loop(*sp, index, epoch); });
        t.detach();  // the pool is never destroyed; see g_pool below
      } catch (const std::system_error&) {
        break;  // run with the workers we have
      }
      slots_.push_back(std::move(slot));
      num_workers_.store(++have, std::memory_order_release);
    }
    return std::min(wanted, have);
  }

  // Claims and runs chunks of job `epoch` until none is left. Never throws.
  void run_chunks(uint64_t epoch) noexcept {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (epoch_of(s) != epoch || unclaimed_of(s) == 0) return;
      if (!state_.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        continue;
      }
      // The claim succeeded: the job's fields are valid and stay so until this
      // chunk is counted off.
      run_chunk(num_chunks_ - unclaimed_of(s));
      s = state_.load(std::memory_order_acquire);
    }
  }

  // Runs chunk c of the current job (claimed by the calling thread), records its
  // exception if any, and counts it off. Never throws.
  void run_chunk(int c) noexcept {
    if (!failed_.load(std::memory_order_relaxed)) {
      // Balanced contiguous split: the first n % k chunks get one extra index.
      const int64_t base = n_ / num_chunks_;
      const int64_t rem = n_ % num_chunks_;
      const int64_t begin = c * base + std::min<int64_t>(c, rem);
      const int64_t end = begin + base + (c < rem ? 1 : 0);
      try {
        fn_(ctx_, begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu_);
        if (!failed_.load(std::memory_order_relaxed)) {
          error_ = std::current_exception();
          failed_.store(true, std::memory_order_relaxed);
        }
      }
    }
    // Last use of the job's fields by this thread: the caller may reuse them as
    // soon as chunks_left_ reaches 0.
    if (chunks_left_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        caller_sleeping_.load(std::memory_order_seq_cst)) {
      { std::lock_guard<std::mutex> lk(done_mu_); }
      done_cv_.notify_one();
    }
  }

  // Caller side: returns once every chunk of the current job has finished.
  void wait_done(int helpers) {
    auto done = [this] { return chunks_left_.load(std::memory_order_acquire) == 0; };
    // Spinning only helps while the workers have CPUs of their own.
    const int64_t budget = helpers < cpus_ ? spin_ns_ : 0;
    if (spin_until(done, budget, std::min(budget, pause_ns_))) return;
    caller_sleeping_.store(true, std::memory_order_seq_cst);
    {
      std::unique_lock<std::mutex> lk(done_mu_);
      done_cv_.wait(lk, [this] { return chunks_left_.load(std::memory_order_seq_cst) == 0; });
    }
    caller_sleeping_.store(false, std::memory_order_relaxed);
  }

  void worker_loop(WorkerSlot& slot, int index, uint64_t seen) {
    tl_in_parallel_region = true;
    // Workers beyond the CPU count would only steal time from the ones doing work.
    const int64_t budget = index + 1 < cpus_ ? spin_ns_ : 0;
    const int64_t pause = std::min(budget, pause_ns_);
    for (;;) {
      auto fresh = [&] { return epoch_of(state_.load(std::memory_order_acquire)) != seen; };
      if (!spin_until(fresh, budget, pause)) {
        slot.sleeping.store(true, std::memory_order_seq_cst);
        {
          std::unique_lock<std::mutex> lk(slot.mu);
          slot.cv.wait(lk, [&] {
            return epoch_of(state_.load(std::memory_order_seq_cst)) != seen;
          });
        }
        slot.sleeping.store(false, std::memory_order_relaxed);
      }
      const uint64_t s = state_.load(std::memory_order_acquire);
      seen = epoch_of(s);
      if (index < helpers_of(s)) run_chunks(seen);
    }
  }

  const int64_t spin_ns_;
  const int64_t pause_ns_;
  const int cpus_;

  std::mutex call_mu_;
  std::vector<std::unique_ptr<WorkerSlot>> slots_;  // guarded by call_mu_
  std::atomic<int> num_workers_{0};

  // The published job (see the comment at the top of the file).
  alignas(64) std::atomic<uint64_t> state_{0};
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int num_chunks_ = 0;

  alignas(64) std::atomic<int> chunks_left_{0};
  std::atomic<bool> failed_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;

  alignas(64) std::atomic<bool> caller_sleeping_{false};
  std::mutex done_mu_;
  std::condition_variable done_cv_;
};

// The pool is created on first use and intentionally never destroyed: its detached
// workers poll or block forever and simply vanish when the process exits, so there is
// no join (and no deadlock) during interpreter shutdown.
std::atomic<Pool*> g_pool{nullptr};

#if defined(SENTINEL_HAVE_PTHREAD_ATFORK)
// A forked child has none of the parent's worker threads: forget (leak) the old
// pool so that the child lazily builds a fresh one.
void after_fork_in_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  tl_in_parallel_region = false;
}
#endif

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
#if defined(SENTINEL_HAVE_PTHREAD_ATFORK)
  static const int registered = pthread_atfork(nullptr, nullptr, &after_fork_in_child);
  (void)registered;
#endif
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread won the race; its pool is in p
  return *p;
}

}  // namespace

void parallel_for_impl(int64_t n, int num_threads, int64_t grain, RangeFn fn, void* ctx) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int chunks = static_cast<int>(
      std::min<int64_t>({static_cast<int64_t>(num_threads), max_chunks, int64_t{kMaxThreads}}));
  if (chunks <= 1 || tl_in_parallel_region) {
    fn(ctx, 0, n);
    return;
  }
  pool().run(n, chunks, fn, ctx);
}

int thread_pool_size() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p == nullptr ? 0 : p->size();
}

}  // namespace sentinel
