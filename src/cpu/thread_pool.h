// One persistent pool of threads for the layer's compute: num_threads − 1 workers plus the
// calling thread pull task indices from a single atomic counter.
//
// Why one counter and not a static split: MoE work is uneven (a hot expert has many row blocks,
// a cold one none), so tasks are pulled dynamically and every core stays busy until the queue is
// empty. Results never depend on which thread ran a task as long as every task writes only its
// own outputs, which is how the layer builds its task lists; that is what makes the layer's
// output bitwise identical for any thread count.
//
// A `run` issued from inside a task executes inline on the calling thread (no nested threading).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace moekit::cpu {

class ThreadPool {
 public:
  // Task body: fn(task index, thread index in [0, num_threads)). The thread index lets a task
  // use per-thread scratch memory; the caller is thread 0.
  using TaskFn = void (*)(void* context, int64_t task, int thread);

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs fn(task, thread) for every task in [0, num_tasks) and returns when all are done. The
  // first exception thrown by a task is rethrown here; remaining tasks are skipped.
  template <typename Fn>
  void run(int64_t num_tasks, Fn&& fn) {
    auto trampoline = [](void* context, int64_t task, int thread) {
      (*static_cast<std::remove_reference_t<Fn>*>(context))(task, thread);
    };
    run_raw(num_tasks, trampoline, static_cast<void*>(&fn));
  }

 private:
  void run_raw(int64_t num_tasks, TaskFn fn, void* context);
  void worker_loop(int thread);
  void drain(int thread);

  int num_threads_ = 1;
  std::vector<std::thread> workers_;

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;  // workers wait here for a new job
  std::condition_variable done_;  // the caller waits here for workers to leave a job
  uint64_t generation_ = 0;       // bumped once per job
  bool stop_ = false;
  int busy_workers_ = 0;  // workers still inside the current job

  // The current job.
  TaskFn fn_ = nullptr;
  void* context_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

// A process-wide pool of num_threads threads (created on first use, one per distinct count,
// kept until exit), for code without a pool of its own (the routing core), so that no call
// pays for creating threads. Safe to use from several threads: jobs run one at a time.
ThreadPool& shared_thread_pool(int num_threads);

}  // namespace moekit::cpu
