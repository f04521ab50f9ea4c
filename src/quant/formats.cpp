// moekit's quantized expert weight formats (include/moekit/quant.h): quantizing a row by the
// rules stated there, and the values its codes stand for. Scalar on purpose: quantizing runs
// once per weight (at load or on request), and this is the definition the kernels and the
// tests' references are checked against.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "moekit/error.h"
#include "moekit/quant.h"

namespace moekit {

bool is_quantized(DType dtype) { return dtype == DType::kInt8 || dtype == DType::kInt4 || dtype == DType::kMxfp4; }

int64_t quantized_code_bytes(DType format, int64_t cols) { return format == DType::kInt8 ? cols : cols / 2; }

int64_t quantized_scale_bytes(DType format, int64_t cols) {
  switch (format) {
    case DType::kInt8: return 4;
    case DType::kInt4: return cols / kQuantGroup * 2;
    case DType::kMxfp4: return cols / kQuantGroup;
    default: return 0;
  }
}

void check_quantizable(DType format, int64_t cols, const char* name) {
  if (!is_quantized(format)) throw_input_error(detail::concat(name, " format"), "int8, int4 or mxfp4", dtype_name(format));
  if (cols <= 0 || cols % kQuantGroup != 0) {
    throw_input_error(detail::concat(name, " columns"), detail::concat("a positive multiple of ", kQuantGroup), cols);
  }
}

uint16_t float_to_fp16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  // Exponent of x relative to fp16's bias: e16 = e32 − 127 + 15.
  const int32_t e = static_cast<int32_t>(abs >> 23) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);  // overflows to Inf
  uint32_t mant = (abs & 0x7fffffu) | 0x800000u;                 // 24 significant bits
  uint32_t shift;  // bits dropped from the 24-bit significand
  uint32_t base;   // exponent field of the result before rounding carries into it
  if (e >= 1) {
    shift = 13;
    base = static_cast<uint32_t>(e) << 10;
    mant &= 0x7fffffu;  // normal: the implicit bit is the exponent's
  } else {
    if (e < -10) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    shift = static_cast<uint32_t>(14 - e);            // subnormal: value = mant · 2^(e − 25)
    base = 0;
  }
  const uint32_t kept = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  uint32_t r = base + kept;  // a carry out of the mantissa increments the exponent: still right
  if (rest > half || (rest == half && (kept & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

namespace {

constexpr float kE2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

// |x| to the nearest E2M1 magnitude code, ties to the even code.
uint8_t e2m1_code(float a) {
  if (a <= 0.25f) return 0;
  if (a < 0.75f) return 1;
  if (a <= 1.25f) return 2;
  if (a < 1.75f) return 3;
  if (a <= 2.5f) return 4;
  if (a < 3.5f) return 5;
  if (a <= 5.0f) return 6;
  return 7;
}

float e8m0_to_float(uint8_t e) { return std::ldexp(1.0f, static_cast<int>(e) - 127); }

void check_finite_row(const float* w, int64_t cols, const char* name, int64_t row) {
  for (int64_t c = 0; c < cols; ++c) {
    if (!std::isfinite(w[c])) {
      throw_input_error(detail::concat(name, "[", row, ", ", c, "]"), "a finite weight to quantize", w[c]);
    }
  }
}

float group_absmax(const float* w, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(w[i]));
  return m;
}

void put_nibble(uint8_t* group_codes, int64_t i, uint8_t nibble) {
  uint8_t& b = group_codes[i % 16];
  b = i < 16 ? static_cast<uint8_t>((b & 0xf0u) | nibble) : static_cast<uint8_t>((b & 0x0fu) | (nibble << 4));
}

uint8_t get_nibble(const uint8_t* group_codes, int64_t i) {
  const uint8_t b = group_codes[i % 16];
  return i < 16 ? (b & 0x0fu) : (b >> 4);
}

void quantize_int8(const float* w, int64_t cols, uint8_t* codes, uint8_t* scales) {
  const float amax = group_absmax(w, cols);
  const float s = amax / 127.0f;
  std::memcpy(scales, &s, 4);
  for (int64_t c = 0; c < cols; ++c) {
    // The quotient in double: an fp32 quotient can round to k + ½ when w/s is just below it,
    // and rounding that half to even would pick the farther level.
    const float q = s > 0.0f ? static_cast<float>(std::nearbyint(double(w[c]) / double(s))) : 0.0f;
    codes[c] = static_cast<uint8_t>(static_cast<int8_t>(std::fmax(-127.0f, std::fmin(127.0f, q))));
  }
}

int int4_level(float w, float s) {
  if (s == 0.0f) return 0;
  const float q = std::nearbyint(w / s);
  return static_cast<int>(std::fmax(-8.0f, std::fmin(7.0f, q)));
}

void quantize_int4_group(const float* w, uint8_t* codes, uint16_t* scale, const char* name, int64_t row, int64_t col0) {
  // m: the element of largest magnitude, signed (the first of equal magnitude).
  float m = 0.0f;
  for (int64_t i = 0; i < kQuantGroup; ++i)
    if (std::fabs(w[i]) > std::fabs(m)) m = w[i];
  uint16_t best = 0;
  bool found = m == 0.0f;  // an all-zero group keeps the scale +0
  if (m != 0.0f) {
    double best_err = std::numeric_limits<double>::infinity();
    for (int i = 0; i <= 16; ++i) {
      const float r = -8.0f + 0.125f * static_cast<float>(i);
      const uint16_t bits = float_to_fp16(m / r);
      const float s = fp16_to_float(bits);
      if (!std::isfinite(s)) continue;  // this candidate's scale overflows fp16
      double err = 0.0;
      for (int64_t j = 0; j < kQuantGroup; ++j) {
        const double d = double(w[j]) - double(s) * int4_level(w[j], s);
        err += d * d;
      }
      if (err < best_err) {
        best_err = err;
        best = bits;
        found = true;
      }
    }
  }
  if (!found) {  // every candidate overflowed fp16, even m / −8
    throw_input_error(detail::concat(name, "[", row, ", ", col0, ":", col0 + kQuantGroup, "]"),
                      "weights whose int4 scale m / 8 fits in fp16 (|m| < 524160)", m);
  }
  *scale = best;
  const float s = fp16_to_float(best);
  for (int64_t j = 0; j < kQuantGroup; ++j) put_nibble(codes, j, static_cast<uint8_t>(int4_level(w[j], s) + 8));
}

// The E2M1 code (sign bit and magnitude) of w at exponent e.
uint8_t mxfp4_code(float w, uint8_t e) {
  const float a = std::fabs(w) * std::ldexp(1.0f, 127 - static_cast<int>(e));
  const uint8_t c = e2m1_code(a);
  return c != 0 && std::signbit(w) ? static_cast<uint8_t>(c | 8u) : c;
}

float mxfp4_value(uint8_t code, uint8_t e) {
  const float v = kE2m1[code & 7u] * e8m0_to_float(e);
  return (code & 8u) ? -v : v;
}

void quantize_mxfp4_group(const float* w, uint8_t* codes, uint8_t* scale) {
  const float amax = group_absmax(w, kQuantGroup);
  uint8_t best = 0;
  if (amax > 0.0f) {
    int ex = 0;
    std::frexp(amax, &ex);                     // amax = f · 2^ex, f ∈ [0.5, 1)
    const int e0 = (ex - 1) - 2 + 127;         // ⌊log₂ amax⌋ − emax(E2M1), biased
    double best_err = std::numeric_limits<double>::infinity();
    for (int e = e0; e <= e0 + 1; ++e) {
      if (e < 0 || e > 254) continue;
      const auto eb = static_cast<uint8_t>(e);
      double err = 0.0;
      for (int64_t j = 0; j < kQuantGroup; ++j) {
        const double d = double(w[j]) - double(mxfp4_value(mxfp4_code(w[j], eb), eb));
        err += d * d;
      }
      if (err < best_err) {
        best_err = err;
        best = eb;
      }
    }
  }
  *scale = best;
  for (int64_t j = 0; j < kQuantGroup; ++j) put_nibble(codes, j, amax > 0.0f ? mxfp4_code(w[j], best) : 0);
}

}  // namespace

void quantize_row(DType format, const float* w, int64_t cols, uint8_t* codes, uint8_t* scales, const char* name,
                  int64_t row) {
  check_quantizable(format, cols, name);
  check_finite_row(w, cols, name, row);
  if (format == DType::kInt8) {
    quantize_int8(w, cols, codes, scales);
    return;
  }
  if (cols <= 0) return;  // (checked above; tells the compiler the fill below is bounded)
  std::fill(codes, codes + cols / 2, uint8_t{0});
  for (int64_t g = 0; g < cols / kQuantGroup; ++g) {
    if (format == DType::kInt4) {
      uint16_t s = 0;
      quantize_int4_group(w + g * kQuantGroup, codes + g * 16, &s, name, row, g * kQuantGroup);
      std::memcpy(scales + 2 * g, &s, 2);
    } else {
      quantize_mxfp4_group(w + g * kQuantGroup, codes + g * 16, scales + g);
    }
  }
}

void dequantize_row(DType format, const uint8_t* codes, const uint8_t* scales, int64_t cols, float* out) {
  check_quantizable(format, cols, "dequantize_row");
  if (format == DType::kInt8) {
    float s;
    std::memcpy(&s, scales, 4);
    for (int64_t c = 0; c < cols; ++c) out[c] = s * static_cast<float>(static_cast<int8_t>(codes[c]));
    return;
  }
  for (int64_t g = 0; g < cols / kQuantGroup; ++g) {
    const uint8_t* gc = codes + g * 16;
    for (int64_t j = 0; j < kQuantGroup; ++j) {
      const uint8_t nib = get_nibble(gc, j);
      if (format == DType::kInt4) {
        uint16_t s;
        std::memcpy(&s, scales + 2 * g, 2);
        out[g * kQuantGroup + j] = fp16_to_float(s) * static_cast<float>(static_cast<int>(nib) - 8);
      } else {
        out[g * kQuantGroup + j] = mxfp4_value(nib, scales[g]);
      }
    }
  }
}

void repack_gpt_oss_mxfp4_row(const uint8_t* blocks, const uint8_t* scales, int64_t cols, uint8_t* codes,
                              const char* name) {
  check_quantizable(DType::kMxfp4, cols, name);
  for (int64_t g = 0; g < cols / kQuantGroup; ++g) {
    if (scales[g] == 0xffu) throw_input_error(detail::concat(name, " scale of group ", g), "an E8M0 exponent below 0xff (NaN)", 255);
    const uint8_t* in = blocks + g * 16;
    uint8_t* out = codes + g * 16;
    std::memset(out, 0, 16);
    for (int64_t j = 0; j < kQuantGroup; ++j) {
      const uint8_t nib = (j % 2 == 0) ? (in[j / 2] & 0x0fu) : (in[j / 2] >> 4);
      put_nibble(out, j, nib);
    }
  }
}

}  // namespace moekit
