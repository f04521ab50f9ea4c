// The parallel-loop interface every part of the library runs its loops on (the routing core, the
// ops, the CPU kernels): run_parallel hands task indices to the threads of the process-wide pool
// (implemented by src/cpu/thread_pool.cpp). Declared here, below both the routing core and the
// backends, so that neither reaches into the other to find threads.
//
// Results never depend on the thread count as long as every task writes only its own outputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace moekit::detail {

using TaskFn = void (*)(void* context, int64_t task, int thread);

// Runs fn(context, task, thread) for every task in [0, num_tasks) on at most num_threads threads
// (the caller is thread 0) and returns when all are done; the first exception a task throws is
// rethrown here. A call from inside a task runs inline on that thread.
void run_parallel_raw(int num_threads, int64_t num_tasks, TaskFn fn, void* context);

// run_parallel_raw with a callable fn(task, thread).
template <typename Fn>
void run_parallel(int num_threads, int64_t num_tasks, Fn&& fn) {
  auto trampoline = [](void* context, int64_t task, int thread) {
    (*static_cast<std::remove_reference_t<Fn>*>(context))(task, thread);
  };
  run_parallel_raw(num_threads, num_tasks, trampoline, static_cast<void*>(&fn));
}

// Calls fn(begin, end) over [0, n) split into at most num_threads contiguous ranges (a static
// partition: each index is processed by exactly one thread).
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(n, 1));
  if (threads <= 1 || n < 64) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  const int64_t chunks = (n + chunk - 1) / chunk;
  run_parallel(static_cast<int>(threads), chunks, [&](int64_t i, int) { fn(i * chunk, std::min(n, (i + 1) * chunk)); });
}

}  // namespace moekit::detail
