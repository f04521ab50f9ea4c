// Expert weights as the layer reads them: the weight format (DType) and the one weight view
// (WeightView), a stack of expert matrices in any layout that can be read in place (strides,
// split halves, per-expert pointers) or a quantized stack with its scales.
#pragma once

#include <cstdint>
#include <span>

namespace moekit {

// Element type of expert weights and activations. The router is always fp32.
//   kF32:  fp32 weights, fp32 GEMM inputs and accumulation.
//   kBF16: weights stored bf16, activations rounded to bf16 at each GEMM input, fp32
//          accumulation and fp32 output (the bf16 of PyTorch autocast).
//   kInt8, kInt4, kMxfp4: quantized expert weights (quant.h: the formats and how they are
//          chosen), for inference: activations are rounded to int8 per token in groups of
//          32 (a scale per group) at each GEMM input, integer products, fp32 accumulation
//          and fp32 output. A layer of such a dtype has no backward.
enum class DType { kF32, kBF16, kInt8, kInt4, kMxfp4 };

const char* dtype_name(DType dtype);  // "fp32", "bf16", "int8", "int4", "mxfp4"

// Non-owning view of a weight stack [experts, rows, cols], fp32 or bf16 (bf16: the upper 16
// bits of an IEEE fp32, as uint16), or quantized (see `scales`): the one view of expert weights
// from the layer's parameters down to the kernels, which read one expert's matrix as a view
// with experts = 1. Element (e, r, c) is at
//   data + e·expert_stride + r·row_stride + c·col_stride      (in elements of dtype)
// where a stride of 0 means the contiguous row-major default (rows·cols, cols, 1). Strides let
// a layer read a layout other than its own in place (per-expert tensors at any distance, a down
// projection stored transposed as [experts, d_ff, d_model]): packing reads through them, no
// copy is made first.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t experts = 1;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t expert_stride = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  // Gated weights (gate_up of SwiGLU): the up rows [rows/2, rows) at up_data instead, with the
  // same strides (row rows/2 + i of expert e at up_data + e·expert_stride + i·row_stride), for
  // layouts whose up half does not follow the gate half: gpt-oss's [experts, d_model, 2·d_ff]
  // with gate and up interleaved (data = base, up_data = base + 1 element, row_stride 2,
  // col_stride 2·d_ff), or separate gate and up tensors. Null: the up rows follow.
  const void* up_data = nullptr;
  // Experts stored as separate tensors at no common distance (one safetensors tensor per
  // expert, possibly in different shards): expert e's base is expert_data[e] (and its up half,
  // when split, expert_up_data[e]) instead of data + e·expert_stride; row and column strides as
  // above. Empty: the stack layout. `data` must still point at expert 0.
  std::span<const void* const> expert_data = {};
  std::span<const void* const> expert_up_data = {};
  // Quantized weights (dtype int8, int4, mxfp4; quant.h): `data` holds the codes and `scales`
  // the scales, both contiguous stacks (expert e, row r at e·rows + r rows of
  // quantized_code_bytes(dtype, cols) and quantized_scale_bytes(dtype, cols) bytes); strides,
  // up_data and the per-expert lists must be left at their defaults.
  const void* scales = nullptr;
  bool empty() const { return data == nullptr; }
  int64_t expert_step() const { return expert_stride != 0 ? expert_stride : rows * cols; }
  int64_t row_step() const { return row_stride != 0 ? row_stride : cols; }
  int64_t col_step() const { return col_stride != 0 ? col_stride : 1; }
  // First row of the up half of a split gated weight (rows it reads from up_data).
  int64_t up_row() const { return rows / 2; }
  // Rows contiguous and in one part: what a reader of a weight row by row in place needs.
  bool rows_contiguous() const { return col_step() == 1 && up_data == nullptr; }
  // Where element (e, r, c) of an fp32 or bf16 view lies: the base it is read from (up_data or
  // expert_up_data[e] for a row of a split up half, expert_data[e] for per-expert tensors, else
  // data) and its offset from that base in elements of dtype, by the formula above.
  struct Element {
    const void* base;
    int64_t offset;
  };
  Element element(int64_t e, int64_t r, int64_t c) const {
    const bool up = up_data != nullptr && r >= up_row();
    const std::span<const void* const> per_expert = up ? expert_up_data : expert_data;
    const int64_t in_expert = (up ? r - up_row() : r) * row_step() + c * col_step();
    if (!per_expert.empty()) return {per_expert[static_cast<size_t>(e)], in_expert};
    return {up ? up_data : data, e * expert_step() + in_expert};
  }
};

}  // namespace moekit
