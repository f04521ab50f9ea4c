// Static-partition parallel loop. Each index is processed by exactly one thread and no thread
// writes another's indices, so results never depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace moekit::detail {

// Calls fn(begin, end) over [0, n) split into at most num_threads contiguous ranges.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(n, 1));
  if (threads <= 1 || n < 64) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t i = 0; i < threads; ++i) {
    const int64_t begin = i * chunk;
    const int64_t end = std::min(n, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back([&, i, begin, end] {
      try {
        fn(begin, end);
      } catch (...) {
        errors[static_cast<size_t>(i)] = std::current_exception();
      }
    });
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace moekit::detail
