// Dequantization of checkpoint formats (quant.h). Every value is built from its bits (sign,
// exponent, mantissa) rather than looked up in a table copied from elsewhere.
#include <cmath>
#include <cstring>
#include <limits>

#include "moekit/error.h"
#include "moekit/quant.h"

namespace moekit {

float fp8_e4m3_to_float(uint8_t bits) {
  const int sign = bits >> 7, exponent = (bits >> 3) & 0xf, mantissa = bits & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  // bias 7; exponent 0: subnormal m/8 · 2^−6
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
  return sign ? -magnitude : magnitude;
}

float fp16_to_float(uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  float magnitude;
  if (exponent == 0x1f) {
    magnitude = mantissa != 0 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal m/1024 · 2^−14
  } else {
    magnitude = std::ldexp(1.0f + static_cast<float>(mantissa) / 1024.0f, exponent - 15);  // bias 15
  }
  return sign ? -magnitude : magnitude;
}

float fp4_e2m1_to_float(uint8_t nibble) {
  const int sign = (nibble >> 3) & 1, exponent = (nibble >> 1) & 0x3, mantissa = nibble & 1;
  // bias 1; exponent 0: subnormal m/2 · 2^0
  const float magnitude = exponent == 0 ? 0.5f * static_cast<float>(mantissa)
                                        : std::ldexp(1.0f + 0.5f * static_cast<float>(mantissa), exponent - 1);
  return sign ? -magnitude : magnitude;
}

void dequantize_fp8_blocks(const uint8_t* q, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_rows,
                           int64_t block_cols, float* out, const char* name) {
  if (rows < 0 || cols < 0) throw_input_error(detail::concat(name, " shape"), "non-negative extents", detail::concat("[", rows, ", ", cols, "]"));
  if (block_rows < 1 || block_cols < 1) {
    throw_input_error(detail::concat(name, " block size"), ">= 1 × 1", detail::concat(block_rows, " × ", block_cols));
  }
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  float lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = fp8_e4m3_to_float(static_cast<uint8_t>(b));
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = scale_inv + (r / block_rows) * scale_cols;
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t bits = q[r * cols + c];
      const float s = srow[c / block_cols];
      const float v = lut[bits] * s;
      if (!std::isfinite(v)) {
        throw InputError(detail::concat(name, "[", r, "][", c, "]: expected a finite value, got ", v, " (fp8 bits 0x",
                                        std::hex, int(bits), std::dec, " × scale ", s, ")"));
      }
      out[r * cols + c] = v;
    }
  }
}

void dequantize_mxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t num_rows, int64_t groups, float* out,
                      const char* name) {
  if (num_rows < 0 || groups < 0) {
    throw_input_error(detail::concat(name, " shape"), "non-negative extents", detail::concat("[", num_rows, ", ", groups, "]"));
  }
  float lut[16];
  for (int b = 0; b < 16; ++b) lut[b] = fp4_e2m1_to_float(static_cast<uint8_t>(b));
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t e = scales[r * groups + g];
      if (e == 0xff) {  // E8M0 NaN (OCP MX)
        throw InputError(detail::concat(name, " scale [", r, "][", g, "]: expected an E8M0 exponent, got 0xff (NaN)"));
      }
      const uint8_t* b = blocks + (r * groups + g) * 16;
      float* o = out + (r * groups + g) * 32;
      for (int i = 0; i < 16; ++i) {
        o[2 * i] = std::ldexp(lut[b[i] & 0xf], int(e) - 127);
        o[2 * i + 1] = std::ldexp(lut[b[i] >> 4], int(e) - 127);
      }
      for (int i = 0; i < 32; ++i) {
        if (!std::isfinite(o[i])) {
          throw InputError(detail::concat(name, "[", r, "][", g * 32 + i, "]: expected a finite value, got ", o[i],
                                          " (scale exponent ", int(e) - 127, ")"));
        }
      }
    }
  }
}

}  // namespace moekit
