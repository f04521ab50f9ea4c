// bf16 as the kernels store it: the upper 16 bits of an IEEE fp32 (as uint16), fp32 → bf16 by
// round to nearest even. Inline, because the packers and the scalar paths convert element by
// element in loops the compiler vectorises.
#pragma once

#include <cstdint>
#include <cstring>

namespace moekit::cpu {

// fp32 → bf16 bits, round to nearest even (adding 0x7fff plus the kept lsb carries into the
// kept half exactly when the dropped half is above, or at and odd, the midpoint), NaN quieted;
// branch-free, so that the loops using it (bulk conversion, packing) vectorise.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}
// Already bf16: unchanged (for the packers' templates over the source element type).
inline uint16_t bf16_bits(uint16_t x) { return x; }

inline uint16_t float_to_bf16(float x) { return bf16_bits(x); }  // round to nearest even; NaN stays NaN

inline float bf16_to_float(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// x rounded to bf16 and widened back: the value a bf16 operand holds, kept in fp32.
inline float bf16_round(float x) { return bf16_to_float(float_to_bf16(x)); }

void float_to_bf16_n(const float* src, uint16_t* dst, int64_t n);  // float_to_bf16 of each

}  // namespace moekit::cpu
