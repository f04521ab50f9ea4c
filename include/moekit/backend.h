// Where the layer computes (the backend) and in what format its expert weights are stored and
// multiplied (the weight format). Each op picks its implementation from the pair at run time
// (src/ops/registry.cpp lists what this build has); a pair without one is a ConfigError naming
// both, raised when the layer is built, never in the middle of a forward.
#pragma once

#include "moekit/weights.h"  // DType, the weight format a backend is asked for

namespace moekit {

enum class Backend {
  kCpu,   // x86-64 kernels chosen from the CPU's features (src/cpu/)
  kCuda,  // NVIDIA GPUs: named so configs can ask for it; this build has no implementation
};

const char* backend_name(Backend backend);  // "cpu", "cuda"

}  // namespace moekit
