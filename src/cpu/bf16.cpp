// Bulk fp32 → bf16 conversion (bf16.h), one loop the compiler vectorises.
#include "cpu/bf16.h"

namespace moekit::cpu {

void float_to_bf16_n(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits(src[i]);
}

}  // namespace moekit::cpu
