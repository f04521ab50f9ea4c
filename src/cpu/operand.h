// A GEMM operand as the CPU kernels read it (gemm.h): a strided fp32 or bf16 matrix, with an
// optional gather of its rows.
#pragma once

#include <cstdint>

#include "moekit/weights.h"

namespace moekit::cpu {

// The element format is the library's one weight-format enum (weights.h); the kernels take
// kF32 and kBF16 only and reject the quantized formats with an InputError naming the argument
// (quantized weights go through quant_kernels.h). The declaration keeps `DType` a valid
// spelling of the same enum.
using moekit::DType;

// A strided matrix operand. Element (r, c) of op(X) is at
//   data + row(r) * row_stride + c * col_stride        (in elements of dtype)
// where row(r) = rows ? rows[r] : r. Transposition is expressed by swapping the strides.
// Not a WeightView: an operand is either side of a product (activations as well as weights,
// the backward's transposed weights, packed panels read back), with a row gather that only
// activations have and no expert dimension or scales.
struct Operand {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  const int32_t* rows = nullptr;  // optional gather of rows (A only)
  // Optional second part, for a B that PackedWeight::pack_operand packs (gemm() rejects it):
  // logical columns (or rows, with split_rows) from split_at on are read from split_data with
  // the same strides, as index − split_at. A gated weight whose up half lies elsewhere (gpt-oss
  // interleaves gate and up columns; per-expert w1 and w3 tensors) is then packed in place.
  const void* split_data = nullptr;
  int64_t split_at = 0;
  bool split_rows = false;
};

}  // namespace moekit::cpu
