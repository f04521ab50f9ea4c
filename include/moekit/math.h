// Scalar functions that both the model's math (experts.h: the expert activations) and the
// library's routing use, defined once so that every caller rounds alike.
#pragma once

#include <cmath>

namespace moekit::detail {

// σ(x) = 1 / (1 + e^(−x)) in Real (float or double): one exp, one add, one division.
template <typename Real>
Real sigmoid(Real x) {
  return Real(1) / (Real(1) + std::exp(-x));
}

}  // namespace moekit::detail
