// Kernels of the quantized expert FFN (int8, int4, mxfp4 weights; include/moekit/quant.h has
// the formats): activation rows rounded to int8, and dot products of those rows with quantized
// weight rows, integer products summed exactly in int32 and scaled into fp32.
//
// Activations: a row x [cols] becomes q [cols] int8 and one scale per group b of 32 (as
// llama.cpp's Q8_0 activations; one scale per token cost int8 layers 2e-2 of relative output
// error on SwiGLU's heavy-tailed h, per group 5e-3):
//   d_b = max_{c∈b}|x_c| / 127,   q_c = rne(x_c · (127 / max_b))   (0 for an all-zero group)
// so |x_c − d_b·q_c| ≤ d_b/2 (+ one fp32 rounding of the product).
// Dots, weight row w with group scales s_b (int8: its row scale for every group; int4: fp16;
// mxfp4: 2^(e−127)/2 with the E2M1 values doubled to the integers ±{0, 1, 2, 3, 4, 6, 8, 12}):
//   out = Σ_b (s_b · d_b) · Σ_{c∈b} q_c · w_c          (int32 per group, fp32 Σ_b)
// The int32 sums are exact (|q|, |w| ≤ 127: a group adds at most 32 · 127² < 2^19). The AVX2
// path multiplies |w| (unsigned) by q·sign(w) with vpmaddubsw, which cannot saturate for
// these ranges (2 · 127 · 127 < 2^15), then widens pairs with vpmaddwd. The fp32 sums run
// in a fixed order per output, independent of threads; ISA paths may differ in it.
#pragma once

#include <cstdint>

#include "cpu/gemm.h"
#include "moekit/weights.h"

namespace moekit::cpu {

// Scales per activation row: cols / 32 (every format).
int64_t activation_scales_per_row(moekit::DType format, int64_t cols);

// One row x [cols] → q [cols], d [activation_scales_per_row].
void quantize_activation_row(Isa isa, moekit::DType format, const float* x, int64_t cols, int8_t* q, float* d);

// The weight w of the dots and of dequantize_weight_row is the WeightView of one expert
// matrix (weights.h) in a quantized format (w.dtype: int8, int4, mxfp4; anything else is an
// InputError): row j's codes at w.data + j·quantized_code_bytes(w.dtype, w.cols), its scales
// at w.scales + j·quantized_scale_bytes(w.dtype, w.cols) (quant.h).

// out[i·ldo + j] = dot(activation row i, weight row n0 + j) for i < m, j < n1 − n0.
// Activation row i: q[i] [cols] and its scales d[i] [activation_scales_per_row] (pointers, so
// that an expert's rows are read where the token's quantized row lies: no gather copy).
void quant_dot(Isa isa, const WeightView& w, int64_t n0, int64_t n1,
               const int8_t* const* q,  // [m] rows of [cols]
               const float* const* d,   // [m] rows of [scales per row]
               int64_t m,
               float* out,              // [m, ldo]
               int64_t ldo);

// The values of one quantized weight row as fp32, exactly dequantize_row's (quant.h), with the
// vector path where the ISA has one: out [cols].
void dequantize_weight_row(Isa isa, const WeightView& w, int64_t row, float* out);

// Experts with at least this many rows (prefill) do not run the integer dots: their quantized
// weights are dequantized block by block into the fp32 GEMM's panels (bf16 panels where the CPU
// has AVX512-BF16; no copy of the whole weight is kept), and the GEMM micro-kernel multiplies
// the activations unrounded to int8. On AVX2
// an integer dot of a group costs about what fp32 FMAs over it cost (vpmaddubsw saturates, so
// there is no 4-operand int8 accumulate as VNNI's vpdpbusd), and the register-blocked fp32
// kernel reuses each loaded value across a 6 × 16 tile: for many rows it is the faster kernel.
inline constexpr int64_t kPanelRows = 16;

}  // namespace moekit::cpu
