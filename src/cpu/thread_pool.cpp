#include "thread_pool.h"

#include <algorithm>

#include "internal/parallel.h"

namespace moekit::cpu {
namespace {
// True on a thread while it runs pool tasks: a nested run() then executes inline.
thread_local bool t_inside_task = false;
}  // namespace

void ThreadPool::grow(int num_threads) {
  // A new worker waits for the next job: it starts having seen the current generation (which
  // only changes under run_mutex_, held here).
  const uint64_t seen = generation_;
  for (int i = static_cast<int>(workers_.size()) + 1; i < num_threads; ++i)
    workers_.emplace_back([this, i, seen] { worker_loop(i, seen); });
}

int ThreadPool::num_workers() {
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  return static_cast<int>(workers_.size());
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::drain(int thread) {
  const bool was_inside = t_inside_task;
  t_inside_task = true;
  while (!failed_.load(std::memory_order_relaxed)) {
    const int64_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (task >= num_tasks_) break;
    try {
      fn_(context_, task, thread);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  t_inside_task = was_inside;
}

void ThreadPool::worker_loop(int thread, uint64_t seen) {
  bool take_part = false;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      take_part = thread < active_threads_;
    }
    if (take_part) drain(thread);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_workers_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::run_raw(int num_threads, int64_t num_tasks, TaskFn fn, void* context) {
  if (num_tasks <= 0) return;
  // Serial cases: one thread, one task, or a run issued from inside a task (never nest).
  if (num_threads <= 1 || num_tasks == 1 || t_inside_task) {
    for (int64_t task = 0; task < num_tasks; ++task) fn(context, task, 0);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  grow(num_threads);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    active_threads_ = num_threads;
    fn_ = fn;
    context_ = context;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  drain(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return busy_workers_ == 0; });
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

ThreadPool& thread_pool() {
  static ThreadPool pool;
  return pool;
}

}  // namespace moekit::cpu

namespace moekit::detail {

// The parallel-loop interface (internal/parallel.h) runs on the process-wide pool.
void run_parallel_raw(int num_threads, int64_t num_tasks, TaskFn fn, void* context) {
  cpu::thread_pool().run(num_threads, num_tasks, [&](int64_t task, int thread) { fn(context, task, thread); });
}

}  // namespace moekit::detail
