#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define SENTINEL_HAVE_PTHREAD_ATFORK 1
#endif

namespace sentinel {
namespace {

constexpr int kMaxThreads = 256;

// True on pool workers and on a thread currently inside parallel_for: a nested
// parallel_for then runs inline instead of deadlocking on the pool.
thread_local bool tl_in_parallel_region = false;

struct Job {
  RangeFn fn = nullptr;
  void* ctx = nullptr;
  int64_t n = 0;
  int num_chunks = 0;
  int max_helpers = 0;           // workers allowed to join (guarded by Pool::mu_)
  int helpers = 0;               // workers that joined (guarded by Pool::mu_)
  std::atomic<int> next_chunk{0};
  std::atomic<int> chunks_left{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  std::exception_ptr error;

  // Claims chunks until none is left. Never throws.
  void run_chunks() noexcept {
    for (;;) {
      const int c = next_chunk.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) return;
      if (!failed.load(std::memory_order_relaxed)) {
        // Balanced contiguous split: the first n % k chunks get one extra index.
        const int64_t base = n / num_chunks;
        const int64_t rem = n % num_chunks;
        const int64_t begin = c * base + std::min<int64_t>(c, rem);
        const int64_t end = begin + base + (c < rem ? 1 : 0);
        try {
          fn(ctx, begin, end);
        } catch (...) {
          std::lock_guard<std::mutex> lk(error_mu);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
      chunks_left.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
};

class Pool {
 public:
  void run(int64_t n, int num_chunks, RangeFn fn, void* ctx) {
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel_for at a time
    const int helpers_wanted = std::max(0, num_chunks - 1);
    const int helpers = ensure_workers(helpers_wanted);

    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.n = n;
    job.num_chunks = num_chunks;
    job.max_helpers = helpers;
    job.chunks_left.store(num_chunks, std::memory_order_relaxed);

    tl_in_parallel_region = true;
    if (helpers > 0) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = &job;
        ++generation_;
      }
      work_cv_.notify_all();
    }
    job.run_chunks();
    if (helpers > 0) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] {
        return active_ == 0 && job.chunks_left.load(std::memory_order_acquire) == 0;
      });
      job_ = nullptr;  // late wakers see no job; none holds a pointer to it now
    }
    tl_in_parallel_region = false;
    if (job.error) std::rethrow_exception(job.error);
  }

  int size() {
    std::lock_guard<std::mutex> lk(mu_);
    return static_cast<int>(threads_.size());
  }

 private:
  // Starts workers up to `wanted`; returns how many exist (fewer if the OS refused).
  int ensure_workers(int wanted) {
    std::lock_guard<std::mutex> lk(mu_);
    while (static_cast<int>(threads_.size()) < wanted) {
      try {
        threads_.emplace_back([this] { worker_loop(); });
      } catch (const std::system_error&) {
        break;  // run with the workers we have
      }
    }
    return std::min(wanted, static_cast<int>(threads_.size()));
  }

  void worker_loop() {
    tl_in_parallel_region = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      Job* job = job_;
      if (job == nullptr || job->helpers >= job->max_helpers) continue;
      ++job->helpers;
      ++active_;
      lk.unlock();
      job->run_chunks();
      lk.lock();
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0;
  std::vector<std::thread> threads_;
};

// The pool is created on first use and intentionally never destroyed: its workers
// block on a condition variable forever and simply vanish when the process exits,
// so there is no join (and no deadlock) during interpreter shutdown.
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
