// bf16 rounding of fp32 arrays, for the parts of the library above the kernels (the layer's bf16
// copies of owned weights); implemented by the CPU kernels (src/cpu/), declared here so that
// callers need not reach into them.
#pragma once

#include <cstdint>

namespace moekit::detail {

// dst[i] = the bf16 nearest to src[i] (ties to even; NaN stays NaN), as the upper 16 bits of an
// IEEE fp32.
void float_to_bf16_n(const float* src, uint16_t* dst, int64_t n);

}  // namespace moekit::detail
