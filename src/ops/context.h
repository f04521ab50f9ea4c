// What every op receives besides its tensors: the backend it runs on, how many threads of the
// process-wide pool it may use, the kernel path, and where it reports its phase times.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "moekit/backend.h"

namespace moekit {
struct PhaseTime;
}

namespace moekit::ops {

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
  Backend backend = Backend::kCpu;
  int num_threads = 1;
  cpu::Isa isa = cpu::Isa::kScalar;
  PhaseTimer* timer = nullptr;  // may be null
  void phase(const char* name) const {
    if (timer) timer->phase(name);
  }
};

}  // namespace moekit::ops
