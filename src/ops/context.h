// What every op receives besides its tensors: the backend object that implements it (ops/backend.h),
// how many threads of the process-wide pool it may use, and where it reports its phase times.
#pragma once

#include <chrono>
#include <vector>

#include "moekit/backend.h"
#include "moekit/timing.h"

namespace moekit::ops {

class BackendOps;

// Wall time per phase of one forward or backward: phase(name) closes the running phase.
class PhaseTimer {
 public:
  void start(std::vector<PhaseTime>* out);
  void phase(const char* name);

 private:
  std::vector<PhaseTime>* out_ = nullptr;
  std::chrono::steady_clock::time_point start_;
};

struct OpContext {
  const BackendOps* backend = nullptr;  // set by make_context; every op dispatches through it
  int num_threads = 1;
  PhaseTimer* timer = nullptr;  // may be null
  void phase(const char* name) const {
    if (timer) timer->phase(name);
  }
};

// A context on `backend` (registry.cpp: the backend object of that kind; ConfigError when this
// build has none) with num_threads threads.
OpContext make_context(Backend backend, int num_threads);
// The context of callers outside a layer (the routing core's own projection): the CPU backend.
OpContext default_context(int num_threads);

}  // namespace moekit::ops
