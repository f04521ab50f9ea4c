// A weight packed once into the layout the chosen ISA's GEMM micro-kernel reads fastest
// (gemm_kernels.h describes the layouts), for repeated use as the B of gemm_packed (gemm.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "cpu/isa.h"
#include "cpu/operand.h"

namespace moekit::cpu {

// Weights prepared once for repeated use as B (C = A · Wᵀ with W [n, k] row-major, the
// Hugging Face Linear layout), in the layout the chosen ISA's micro-kernel reads fastest.
// For kSiluMul*, W holds the gate rows [0, n_out) then the up rows [n_out, 2·n_out); pack
// with paired = true and n = 2·n_out (n() is then 2·n_out). A paired weight may only be used
// with a kSiluMul* epilogue and vice versa. packed_dtype kBF16 selects bf16 compute (A is
// rounded to bf16, see gemm.h); the layout is private to the GEMM and the ISA given.
// Not a WeightView: it owns (or fills the caller's) memory in a kernel-private panel layout
// that no stride can describe, for one ISA; a view is what it is packed from.
class PackedWeight {
 public:
  PackedWeight() = default;
  static PackedWeight pack(const void* w, DType dtype, int64_t n, int64_t k, int64_t ldw,
                           DType packed_dtype, Isa isa, bool paired = false);
  // The same from any strided operand holding the logical B [k, n] (b.rows must be null): e.g.
  // a weight used transposed in a backward pass, packed once and reused by every row tile
  // instead of gemm() packing it again in each call. Paired: gate columns [0, n/2), up
  // columns [n/2, n).
  static PackedWeight pack_operand(const Operand& b, int64_t k, int64_t n, DType packed_dtype, Isa isa,
                                   bool paired = false);
  // The same into the caller's memory: `storage` (64-byte aligned) holds packed_bytes(...)
  // bytes and outlives every use of the result (which does not own it). Repacking into memory
  // kept between calls avoids fresh pages (a page fault each, zero-filled) on every pack.
  static PackedWeight pack_operand(const Operand& b, int64_t k, int64_t n, DType packed_dtype, Isa isa,
                                   bool paired, uint8_t* storage);
  static size_t packed_bytes(int64_t k, int64_t n, DType packed_dtype, Isa isa, bool paired = false);
  int64_t n() const { return n_; }
  int64_t k() const { return k_; }
  DType dtype() const { return dtype_; }
  Isa isa() const { return isa_; }
  bool paired() const { return paired_; }
  size_t bytes() const { return bytes_; }
  const uint8_t* data() const { return storage_.get(); }

 private:
  int64_t n_ = 0, k_ = 0;
  DType dtype_ = DType::kF32;
  Isa isa_ = Isa::kScalar;
  bool paired_ = false;
  size_t bytes_ = 0;
  std::shared_ptr<uint8_t> storage_;  // 64-byte aligned, immutable once packed (copies share it)
  friend struct PackedWeightAccess;
};

}  // namespace moekit::cpu
