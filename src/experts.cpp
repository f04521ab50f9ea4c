// Expert activations: names (the math is inline in experts.h).
#include "moekit/experts.h"

namespace moekit {

const char* activation_name(ExpertActivation a) {
  switch (a) {
    case ExpertActivation::kSwiGlu: return "swiglu";
    case ExpertActivation::kGelu: return "gelu";
    case ExpertActivation::kGeluErf: return "gelu_erf";
    case ExpertActivation::kRelu: return "relu";
    case ExpertActivation::kSwiGluClamped: return "swiglu_clamped";
  }
  return "unknown";
}

}  // namespace moekit
