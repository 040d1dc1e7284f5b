// A small persistent pool of std::threads (deliberately not OpenMP: torch ships its
// own OpenMP runtime and this extension must not load a second one). For cheap
// hand-offs the workers poll for new work for a bounded time after each job before
// they block (250 us by default; the environment variable SENTINEL_POOL_SPIN_US, read
// when the pool is created, overrides it, 0 = always block); see thread_pool.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>

namespace sentinel {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Type-erased core of parallel_for (see below). Runs fn(ctx, begin, end) over
// contiguous chunks of [0, n) on the calling thread plus up to num_threads - 1
// pool workers, and returns when every chunk is done. The caller runs the first chunk
// and then any chunk no worker has claimed yet. The first exception thrown by any
// chunk is rethrown here, on the calling thread (chunks not started by then are
// skipped).
void parallel_for_impl(int64_t n, int num_threads, int64_t grain, RangeFn fn, void* ctx);

// Number of worker threads the pool has started so far (0 until first use).
int thread_pool_size();

// Splits [0, n) into at most num_threads contiguous chunks of at least `grain`
// indices and calls fn(begin, end) once per chunk, in parallel. Runs inline
// (fn(0, n) on the calling thread) when num_threads <= 1, when n <= grain, or when
// called from inside another parallel_for region (no nested parallelism).
// Calls from several threads are serialised by a mutex.
template <class F>
void parallel_for(int64_t n, int num_threads, F&& fn, int64_t grain = 1) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (num_threads <= 1 || n <= grain) {
    fn(int64_t{0}, n);
    return;
  }
  using Fn = std::remove_reference_t<F>;
  RangeFn tramp = [](void* ctx, int64_t begin, int64_t end) {
    (*static_cast<Fn*>(ctx))(begin, end);
  };
  parallel_for_impl(n, num_threads, grain, tramp,
                    const_cast<void*>(static_cast<const void*>(std::addressof(fn))));
}

}  // namespace sentinel
