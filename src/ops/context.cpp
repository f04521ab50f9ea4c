#include "ops/context.h"

namespace moekit::ops {

void PhaseTimer::start(std::vector<PhaseTime>* out) {
  out_ = out;
  if (out_) out_->clear();
  start_ = std::chrono::steady_clock::now();
}

void PhaseTimer::phase(const char* name) {
  const auto now = std::chrono::steady_clock::now();
  if (out_) out_->push_back({name, std::chrono::duration<double, std::milli>(now - start_).count()});
  start_ = now;
}

}  // namespace moekit::ops
