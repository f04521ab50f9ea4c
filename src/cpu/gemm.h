// CPU GEMM kernels behind one interface, chosen at run time from the CPU's features.
//
//   C[m, n] = op(A)[m, k] · op(B)[k, n]      (then the epilogue; C accumulates if asked)
//
// A may gather its rows through an index list (token rows of one expert, without a permuted
// copy). Operands are fp32 or bf16 (bf16 is the top half of an IEEE fp32, round to nearest
// even on conversion); accumulation is always fp32. Every call is single-threaded and
// deterministic: the caller splits work into tiles (expert, row block, column block) and runs
// them on its own thread pool, so no BLAS threading is ever nested. Calls on different threads
// may run at once (scratch buffers are thread_local; a PackedWeight is read-only).
//
// Paths (docs/kernels.md has the measurements): AVX-512 14×32 fp32 FMA micro-kernel, the same
// widening bf16 weights, AVX512-BF16 14×32 vdpbf16ps micro-kernel for bf16 weights, AVX2 6×16
// fp32 micro-kernel, scalar. There is no AMX path yet (no AMX machine was available to test one;
// untested kernels are not shipped): an AMX path will be one more Isa value and kernel file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moekit::cpu {

enum class Isa : int {
  kScalar = 0,      // plain C++: the oracle for every other path
  kAvx2 = 1,        // AVX2 + FMA
  kAvx512 = 2,      // AVX-512 F/BW/VL/DQ
  kAvx512Bf16 = 3,  // + AVX512-BF16 (vdpbf16ps) for bf16 operands
};

// The best ISA this CPU and this build support.
Isa detect_isa();
// detect_isa(), lowered by the environment variable MOEKIT_ISA (scalar|avx2|avx512|avx512bf16)
// when set; an unknown name or a request above what the CPU has is an error.
Isa active_isa();
const char* isa_name(Isa isa);
// Every ISA from kScalar up to detect_isa(), for tests that compare all paths.
std::vector<Isa> supported_isas();

enum class DType : int { kF32 = 0, kBF16 = 1 };

uint16_t float_to_bf16(float x);  // round to nearest even; NaN stays NaN
float bf16_to_float(uint16_t x);
void float_to_bf16_n(const float* src, uint16_t* dst, int64_t n);  // float_to_bf16 of each

// A strided matrix operand. Element (r, c) of op(X) is at
//   data + row(r) * row_stride + c * col_stride        (in elements of dtype)
// where row(r) = rows ? rows[r] : r. Transposition is expressed by swapping the strides.
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

// Elementwise work done on a finished tile of C, before it is stored.
enum class Activation : int {
  kNone = 0,
  kRelu,
  kGelu,        // tanh approximation (as HF "gelu_new"); exact erf GELU is kGeluErf
  kGeluErf,
  kSiluMul,     // SwiGLU: the B columns come in pairs (see pair_stride); out = silu(g) · u
  kSiluMulClamped,  // gpt-oss: g = min(g, limit), u = clamp(u, −limit, limit),
                    //          out = (u + 1) · g · sigmoid(alpha · g)
};

struct Epilogue {
  Activation activation = Activation::kNone;
  const float* bias = nullptr;        // [n] (for kSiluMul*: [2·n_out], gate then up halves)
  const float* row_scale = nullptr;   // [m] multiply output row i by row_scale[i]
  // For kSiluMul*: the logical B has 2·n_out columns, gate column j at j and up column j at
  // j + n_out; the stored C has n_out columns.
  float clamp_limit = 7.0f;
  float clamp_alpha = 1.702f;
};

struct GemmProblem {
  int64_t m = 0, n = 0, k = 0;  // n: columns of C as stored (after a pairing activation)
  Operand a;                    // op(A) [m, k]
  Operand b;                    // op(B) [k, n] (or [k, 2n] for kSiluMul*)
  void* c = nullptr;            // C [m, n], row stride ldc
  DType c_dtype = DType::kF32;
  int64_t ldc = 0;
  const int32_t* c_rows = nullptr;  // optional scatter: output row i is stored at row c_rows[i]
  bool accumulate = false;      // C += result (fp32 C only)
  Epilogue epilogue;
};

// Semantics, exactly (every ISA path computes this, up to fp32 rounding):
//   acc[i][j] = sum over kk = 0..k-1 (in this order) of A'(i, kk) · B(kk, j)   (fp32)
//   where A' = A rounded to bf16 when B is bf16 (the products are then exact in fp32; this is
//   what vdpbf16ps computes), else A widened to fp32. B is never rounded.
//   v = act(acc + bias)        (kSiluMul*: act of the pair (acc[., j] + bias[j],
//                               acc[., j + n] + bias[n + j]))
//   v = v · row_scale[i]
//   C[c_row(i)][j] = accumulate ? C[c_row(i)][j] + v : v      (rounded to c_dtype)
// The result of one element never depends on how (m, n) is split into calls: bitwise equal
// for any tiling, for a given ISA.

// Weights prepared once for repeated use as B (C = A · Wᵀ with W [n, k] row-major, the
// Hugging Face Linear layout), in the layout the chosen ISA's micro-kernel reads fastest.
// For kSiluMul*, W holds the gate rows [0, n_out) then the up rows [n_out, 2·n_out); pack
// with paired = true and n = 2·n_out (n() is then 2·n_out). A paired weight may only be used
// with a kSiluMul* epilogue and vice versa. packed_dtype kBF16 selects bf16 compute (A is
// rounded to bf16, see above); the layout is private to gemm.cpp and the ISA given.
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

// General GEMM on rows [m_begin, m_end) and columns [n_begin, n_end) of C.
void gemm(const GemmProblem& p, Isa isa, int64_t m_begin, int64_t m_end, int64_t n_begin,
          int64_t n_end);

// The same with B given as a PackedWeight (b in the problem is ignored).
void gemm_packed(const GemmProblem& p, const PackedWeight& w, int64_t m_begin, int64_t m_end,
                 int64_t n_begin, int64_t n_end);

// Few rows against a weight read in place (no packing): for rows [m_begin, m_end) and weight
// rows (columns of C) [n_begin, n_end),
//   C[c_row(i)][j] = (Σ_k A'(i, k) · W[j][k] + bias[j]) · row_scale[i]
// with W [n][k] row-major (row stride ldw), fp32 or bf16, and A' as in gemm() (rounded to bf16
// when W is bf16). round_w: an fp32 W is rounded to bf16 as it is loaded (an fp32 master weight
// computing as bf16; then A is rounded too), the same values as a bf16 copy of W. For a group of a few token rows the weight is then streamed once, where
// packing it would first read and write all of it. Each element is one dot product whose order
// depends only on k (not on the split into calls). The epilogue is limited to bias and
// row_scale (activation kNone), with an fp32 C and no accumulate.
void gemm_weight_rows(const GemmProblem& p, const void* w, DType w_dtype, int64_t ldw, Isa isa, int64_t m_begin,
                      int64_t m_end, int64_t n_begin, int64_t n_end, bool round_w = false);

// dst[c·ld_dst + r] = scale[r] · rows[r][c] for r < num_rows, c < cols (scale null: 1): a
// gathered, row-scaled transpose (the backward's (w ⊙ d_y)ᵀ and d_preᵀ), 16 × 16 blocks in
// registers on AVX-512. One rounding per element, so every path gives the same bits.
void transpose_rows(Isa isa, const float* const* rows, const float* scale, int64_t num_rows, int64_t cols,
                    float* dst, int64_t ld_dst);

}  // namespace moekit::cpu
