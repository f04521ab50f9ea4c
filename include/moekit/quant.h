// Quantized weight formats of real MoE checkpoints, dequantized to fp32 at load.
//
//   FP8 E4M3 with 128 × 128 block scales (DeepSeek-V3, Qwen3 FP8 releases): w = fp8(q) · s_b,
//     s_b = weight_scale_inv[⌊r / block_rows⌋][⌊c / block_cols⌋] (a multiplier, despite the name);
//   MXFP4 (gpt-oss `*_blocks` + `*_scales`, OCP Microscaling): 32 FP4 E2M1 values per block, two
//     per byte (low nibble first), one E8M0 exponent per block: w = fp4(q) · 2^(e − 127).
// Both results are exact in fp32 (a product of an exact value and a power of two or an fp32
// scale, one rounding), so they equal transformers' own dequantization in fp32 bit for bit.
// NaN encodings and results that overflow are InputErrors naming the element.
#pragma once

#include <cstdint>

#include "moekit/backend.h"

namespace moekit {

// FP8 E4M3 "fn" (no infinities; 0x7f and 0xff are NaN) to float, exactly.
float fp8_e4m3_to_float(uint8_t bits);

// IEEE binary16 (safetensors F16) to float, exactly (subnormals, infinities and NaN kept).
float fp16_to_float(uint16_t bits);

// FP4 E2M1 (the low 4 bits) to float, exactly: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
float fp4_e2m1_to_float(uint8_t nibble);

// q [rows, cols] FP8 E4M3, scale_inv [⌈rows / block_rows⌉, ⌈cols / block_cols⌉] fp32 →
// out [rows, cols] fp32. `name` names the tensor in errors.
void dequantize_fp8_blocks(const uint8_t* q,           // [rows, cols]
                           const float* scale_inv,     // [ceil(rows/block_rows), ceil(cols/block_cols)]
                           int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols,
                           float* out,                 // [rows, cols]
                           const char* name);

// blocks [num_rows, groups, 16] uint8, scales [num_rows, groups] uint8 (E8M0) →
// out [num_rows, groups · 32] fp32 (gpt-oss: num_rows = experts · out_features, groups · 32 =
// in_features; transformers then transposes the last two axes of the expert stack).
void dequantize_mxfp4(const uint8_t* blocks,  // [num_rows, groups, 16]
                      const uint8_t* scales,  // [num_rows, groups]
                      int64_t num_rows, int64_t groups,
                      float* out,             // [num_rows, groups * 32]
                      const char* name);

// ---------------------------------------------------------------------------------------------
// moekit's own quantized formats for expert weights (DType kInt8, kInt4, kMxfp4), computed
// natively by the quantized expert kernels. A weight W [rows, cols] (out × in) is quantized
// row by row along its input dimension; every format needs cols % 32 == 0.
//
//   int8:  q ∈ [−127, 127] (int8, one byte per weight), one fp32 scale per row:
//            w ≈ s_r · q,   s_r = max_c |w_rc| / 127,   q = round_half_even(w / s_r)
//          (the quotient in double, so that the nearest level is found).
//          With 255 levels clipping never lowers the squared error measurably: absmax it is.
//   int4:  groups of 32 along cols, q ∈ [−8, 7], one fp16 scale per group (Q4_0's bytes: 18
//          per 32 weights, 4.5 bits): w ≈ s_g · q. Symmetric, as Q4_0: no zero point to store
//          or to correct for in the integer dot product. The scale is the one of 17 candidates
//          s = m / r, r ∈ {−8, −7.875, …, −6} with m the group's element of largest magnitude
//          (signed, so that it maps to the extra level −8), that minimises Σ (w − s·q)² after
//          rounding s to fp16 (the first on ties; candidates whose scale overflows fp16 are
//          skipped, and a group where even m / −8 does is an InputError). r = −8 is Q4_0's rule.
//   mxfp4: groups of 32, FP4 E2M1 values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, one E8M0 exponent per
//          group (4.25 bits; OCP Microscaling, as gpt-oss stores its experts): w ≈ 2^(e−127)·v.
//          e is the one of {e₀, e₀ + 1}, e₀ = ⌊log₂ max|w|⌋ − 2 (the OCP rule), that minimises
//          Σ (w − 2^(e−127)·v)² (e₀ on ties); values round to the nearest E2M1 value, ties to
//          the even code.
// Codes of the 4-bit formats: per group of 32, 16 bytes; byte j holds element j in its low
// nibble and element j + 16 in its high nibble (int4: the nibble is q + 8; mxfp4: sign bit and
// E2M1 code, as gpt-oss). This is not gpt-oss's byte order (element 2j low, 2j + 1 high):
// repack_gpt_oss_mxfp4_row converts.
// Scales: int8 [rows] fp32; int4 [rows, cols/32] fp16 bits; mxfp4 [rows, cols/32] E8M0 bytes.
// Quantizing rejects NaN and Inf (InputError naming `name`, row and column) and a scale that
// fp16 cannot hold.
inline constexpr int64_t kQuantGroup = 32;

bool is_quantized(DType dtype);  // int8, int4, mxfp4
// Bytes of one row's codes and of its scales for cols input columns.
int64_t quantized_code_bytes(DType format, int64_t cols);
int64_t quantized_scale_bytes(DType format, int64_t cols);
// Throws InputError naming `name` unless `format` is quantized and cols a positive multiple of 32.
void check_quantizable(DType format, int64_t cols, const char* name);

// IEEE binary16 of x, rounded to nearest even (overflow → ±Inf, as a conversion does).
uint16_t float_to_fp16(float x);

// One row w [cols] → codes [quantized_code_bytes] and scales [quantized_scale_bytes] by the
// rules above. `name` and `row` name the row in errors.
void quantize_row(DType format, const float* w, int64_t cols, uint8_t* codes, uint8_t* scales, const char* name,
                  int64_t row);
// The values the codes stand for: out [cols] = scale · value, exactly (one rounding at most).
void dequantize_row(DType format, const uint8_t* codes, const uint8_t* scales, int64_t cols, float* out);

// One gpt-oss MXFP4 row (blocks [cols/32, 16], element 2j in the low nibble of byte j) in moekit's
// nibble order (codes [cols/2]); its E8M0 scales are used as they are. Throws InputError
// naming `name` for the NaN exponent 0xff.
void repack_gpt_oss_mxfp4_row(const uint8_t* blocks, const uint8_t* scales, int64_t cols, uint8_t* codes,
                              const char* name);

}  // namespace moekit
