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

}  // namespace moekit
