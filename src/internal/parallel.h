// Static-partition parallel loop. Each index is processed by exactly one thread and no thread
// writes another's indices, so results never depend on the thread count. The chunks run on the
// process-wide persistent pool (no thread is created per call).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/thread_pool.h"

namespace moekit::detail {

// Calls fn(begin, end) over [0, n) split into at most num_threads contiguous ranges.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(n, 1));
  if (threads <= 1 || n < 64) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  const int64_t chunks = (n + chunk - 1) / chunk;
  cpu::thread_pool().run(static_cast<int>(threads), chunks, [&](int64_t i, int) {
    fn(i * chunk, std::min(n, (i + 1) * chunk));
  });
}

}  // namespace moekit::detail
