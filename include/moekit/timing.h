// Where a forward or backward spent its time: one entry per phase, in the order they ran.
#pragma once

#include <string>

namespace moekit {

// Wall time of one phase of a forward or backward call (MoeLayer::last_phases()).
struct PhaseTime {
  std::string name;
  double ms = 0;
};

}  // namespace moekit
