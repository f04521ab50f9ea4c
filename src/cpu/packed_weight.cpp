// PackedWeight (packed_weight.h): a whole weight packed once into the panels of one ISA's
// micro-kernel (pack.h does the packing), or into B [k][n] for the scalar path.
#include "cpu/packed_weight.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "cpu/pack.h"
#include "moekit/error.h"

namespace moekit::cpu {

using detail_gemm::b_elem_size;
using detail_gemm::BLayout;
using detail_gemm::BSource;
using detail_gemm::check_dtype;
using detail_gemm::k_padded;
using detail_gemm::kernel_for;
using detail_gemm::KernelInfo;
using detail_gemm::out_per_panel;
using detail_gemm::pack_panel;
using detail_gemm::pack_rows_f32;
using detail_gemm::pack_rows_pairs;
using detail_gemm::source_of;

PackedWeight PackedWeight::pack(const void* w, DType dtype, int64_t n, int64_t k, int64_t ldw,
                                DType packed_dtype, Isa isa, bool paired) {
  if (n > 1 && ldw < k) throw_input_error("PackedWeight::pack: ldw", detail::concat(">= k = ", k), ldw);
  // W [n][k] row-major is the logical B [k, n] with row stride 1 and column stride ldw.
  Operand b;
  b.data = w;
  b.dtype = dtype;
  b.row_stride = 1;
  b.col_stride = ldw;
  return pack_operand(b, k, n, packed_dtype, isa, paired);
}

size_t PackedWeight::packed_bytes(int64_t k, int64_t n, DType packed_dtype, Isa isa, bool paired) {
  check_dtype("PackedWeight::packed_bytes: packed_dtype", packed_dtype);
  const KernelInfo ki = kernel_for(isa, packed_dtype);
  if (ki.micro == nullptr) return static_cast<size_t>(n * k) * (packed_dtype == DType::kF32 ? 4 : 2);
  const int64_t n_out = paired ? n / 2 : n;
  const int64_t out_nr = out_per_panel(ki, paired);
  const int64_t panels = (n_out + out_nr - 1) / out_nr;
  return static_cast<size_t>(panels * k_padded(ki, k) * ki.nr) * b_elem_size(ki);
}

PackedWeight PackedWeight::pack_operand(const Operand& b, int64_t k, int64_t n, DType packed_dtype, Isa isa,
                                        bool paired) {
  return pack_operand(b, k, n, packed_dtype, isa, paired, nullptr);
}

PackedWeight PackedWeight::pack_operand(const Operand& b, int64_t k, int64_t n, DType packed_dtype, Isa isa,
                                        bool paired, uint8_t* storage) {
  check_dtype("PackedWeight::pack: dtype", b.dtype);
  check_dtype("PackedWeight::pack: packed_dtype", packed_dtype);
  if (n < 0 || k < 0)
    throw_input_error("PackedWeight::pack: n, k", "non-negative", detail::concat(n, ", ", k));
  if (paired && n % 2 != 0) throw_input_error("PackedWeight::pack: n (paired)", "even", n);
  if (n > 0 && k > 0 && b.data == nullptr) throw_input_error("PackedWeight::pack: w", "non-null", "null");
  if (b.rows != nullptr) throw_input_error("PackedWeight::pack_operand: b.rows", "null (no gather of B)", "a row list");
  if (static_cast<int>(isa) > static_cast<int>(detect_isa()))
    throw_input_error("PackedWeight::pack: isa", std::string("at most ") + isa_name(detect_isa()),
                      isa_name(isa));
  PackedWeight out;
  out.n_ = n;
  out.k_ = k;
  out.dtype_ = packed_dtype;
  out.isa_ = isa;
  out.paired_ = paired;
  const BSource src = source_of(b);
  auto bv = [&](int64_t kk, int64_t col) {
    return b.dtype == DType::kF32 ? *src.at<float>(kk, col) : bf16_to_float(*src.at<uint16_t>(kk, col));
  };
  const KernelInfo ki = kernel_for(isa, packed_dtype);
  const int64_t n_out = paired ? n / 2 : n;
  const size_t bytes = packed_bytes(k, n, packed_dtype, isa, paired);
  out.bytes_ = bytes;
  uint8_t* mem = storage;
  if (mem == nullptr) {
    mem = static_cast<uint8_t*>(::operator new(std::max<size_t>(bytes, 64), std::align_val_t(64)));
    out.storage_ = std::shared_ptr<uint8_t>(mem, [](uint8_t* q) { ::operator delete(q, std::align_val_t(64)); });
  } else {
    if (reinterpret_cast<uintptr_t>(mem) % 64 != 0)
      throw_input_error("PackedWeight::pack_operand: storage", "64-byte aligned", "unaligned");
    out.storage_ = std::shared_ptr<uint8_t>(mem, [](uint8_t*) {});  // the caller's memory
  }
  if (ki.micro == nullptr) {  // B [k][n]: the scalar loops run along contiguous B rows
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = 0; j < n; ++j) {
        const float v = bv(kk, j);
        if (packed_dtype == DType::kF32) {
          std::memcpy(mem + (kk * n + j) * 4, &v, 4);
        } else {
          const uint16_t h = float_to_bf16(v);
          std::memcpy(mem + (kk * n + j) * 2, &h, 2);
        }
      }
    return out;
  }
  const int64_t out_nr = out_per_panel(ki, paired);
  const int64_t panels = (n_out + out_nr - 1) / out_nr, kpad = k_padded(ki, k);
  const size_t panel_bytes = static_cast<size_t>(kpad * ki.nr) * b_elem_size(ki);
  // A whole weight larger than the caches is read back later from memory, not from the
  // caches: its lines need not be fetched before they are written (non-temporal stores; the
  // packing of a large weight ran 1.5× faster).
  const bool large = bytes > (size_t{4} << 20);
  const bool one_part = b.split_data == nullptr;
  if (one_part && ki.layout == BLayout::kF32 && b.dtype == DType::kF32 && b.col_stride == 1) {
    pack_rows_f32(ki, paired, n_out, k, static_cast<const float*>(b.data), b.row_stride, 0, panels, mem,
                  panel_bytes, large);
    return out;
  }
  const int64_t first = one_part && ki.layout == BLayout::kBf16Pairs && b.col_stride == 1
                            ? pack_rows_pairs(ki, paired, n_out, k, src, 0, panels, mem, panel_bytes, large)
                            : 0;
  for (int64_t q = first; q < panels; ++q)
    pack_panel(ki, paired, n_out, k, q, 0, kpad, src, mem + static_cast<size_t>(q) * panel_bytes, large);
  if (large && ki.stream_fence) ki.stream_fence();
  return out;
}

}  // namespace moekit::cpu
