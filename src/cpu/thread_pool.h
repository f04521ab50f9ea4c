// The process-wide pool of threads that runs all of moekit's parallel work (the layer's tiles,
// the routing core's loops, the bench): the calling thread plus up to num_threads − 1 workers
// pull task indices from a single atomic counter. The caller sizes each job (num_threads per
// run); the pool grows to the largest size asked for and never creates threads per call, so a
// process holds at most max(num_threads) − 1 workers however many layers and routers it runs.
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

  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs fn(task, thread) for every task in [0, num_tasks) on at most num_threads threads (the
  // caller and num_threads − 1 workers) and returns when all are done. The first exception
  // thrown by a task is rethrown here; remaining tasks are skipped.
  template <typename Fn>
  void run(int num_threads, int64_t num_tasks, Fn&& fn) {
    auto trampoline = [](void* context, int64_t task, int thread) {
      (*static_cast<std::remove_reference_t<Fn>*>(context))(task, thread);
    };
    run_raw(num_threads, num_tasks, trampoline, static_cast<void*>(&fn));
  }

  // Workers started so far (the largest num_threads asked for, minus one).
  int num_workers();

 private:
  void run_raw(int num_threads, int64_t num_tasks, TaskFn fn, void* context);
  void grow(int num_threads);  // under run_mutex_
  void worker_loop(int thread, uint64_t seen);
  void drain(int thread);

  std::vector<std::thread> workers_;
  int active_threads_ = 1;  // threads taking part in the current job
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

// The process-wide pool (created on first use, kept until exit). Safe to use from several
// threads: jobs run one at a time.
ThreadPool& thread_pool();

}  // namespace moekit::cpu
