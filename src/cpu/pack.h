// The packers of the GEMM (pack.cpp): B into the micro-kernels' panels (gemm_kernels.h has the
// layouts) and A rows into the kernels' row buffer. Internal to the GEMM sources.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/gemm_kernels.h"

namespace moekit::cpu::detail_gemm {

// A strided source of logical B (kk, col): data + kk·rs + col·cs, fp32 or bf16.
struct BSource {
  const void* data;
  DType dtype;
  int64_t rs, cs;
  // Optional second part (Operand::split_*): indices from split_at on read from split_data.
  const void* split_data = nullptr;
  int64_t split_at = 0;
  bool split_rows = false;
  // Element offset (in elements of dtype) of (kk, col) from the base it lies in.
  template <class T>
  const T* at(int64_t kk, int64_t col) const {
    if (split_data != nullptr) {
      if (split_rows && kk >= split_at) return static_cast<const T*>(split_data) + (kk - split_at) * rs + col * cs;
      if (!split_rows && col >= split_at) return static_cast<const T*>(split_data) + kk * rs + (col - split_at) * cs;
    }
    return static_cast<const T*>(data) + kk * rs + col * cs;
  }
};

inline BSource source_of(const Operand& b) {
  return BSource{b.data, b.dtype, b.row_stride, b.col_stride, b.split_data, b.split_at, b.split_rows};
}

// Writes K rows [k0, k0 + rows) of panel `panel` (rows past k are zero) at dst, in ki's layout.
// Columns are of the logical B (nb wide); a paired panel takes gate columns from [0, n_out) and
// up columns from [n_out, 2·n_out). stream: non-temporal stores where the kernel table has them.
void pack_panel(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, int64_t panel, int64_t k0, int64_t rows,
                const BSource& src, uint8_t* dst, bool stream = false);

// fp32 B with contiguous rows into kF32 panels [pj0, pj1): K row by K row (one sequential read
// of each B row segment), each panel row a copy of nr (or two nr/2 for pairs) floats.
void pack_rows_f32(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, const float* b, int64_t ldb,
                   int64_t pj0, int64_t pj1, uint8_t* buf, size_t panel_bytes, bool stream = false);

// B with contiguous rows (fp32 or bf16) into kBf16Pairs panels [pj0, pj1), in the source's row
// order: each pair of K rows is read once, sequentially, and scattered over the panels (a panel
// at a time would read 64 bytes per row with the row stride between them, a quarter of the
// memory bandwidth). Only panels whose lanes all hold columns; returns the first panel not
// packed (the caller packs the rest), or pj0 when the kernel table has no pair routine.
int64_t pack_rows_pairs(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, const BSource& src, int64_t pj0,
                        int64_t pj1, uint8_t* buf, size_t panel_bytes, bool stream = false);

// A(i, kk) of a strided operand as float (widened, or rounded to bf16 when `round`).
struct ASource {
  const Operand& a;
  bool round;
  const uint8_t* row_ptr(int64_t i) const {
    const int64_t row = a.rows ? a.rows[i] : i;
    const size_t esz = a.dtype == DType::kF32 ? 4 : 2;
    return static_cast<const uint8_t*>(a.data) + static_cast<size_t>(row * a.row_stride) * esz;
  }
};

// Copies rows [i0, i0 + r) and K [k0, k0 + kc) of A into dst (row i at dst + i·ld elements),
// converted to the kernel's A type; K entries [kc, kc_pad) are zero.
void pack_a_rows(const KernelInfo& ki, const ASource& src, int64_t i0, int64_t r, int64_t k0, int64_t kc,
                 int64_t kc_pad, uint8_t* dst, int64_t ld);

}  // namespace moekit::cpu::detail_gemm
