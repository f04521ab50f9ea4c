// Internal interface between the GEMM driver (gemm.cpp: blocking and dispatch; pack.cpp: the
// packers; packed_weight.cpp; gemm_scalar.cpp: the scalar path) and the ISA-specific
// micro-kernels (isa_avx2.cpp, isa_avx512.cpp). Not installed.
//
// Packed B ("panels"): the logical B [k, nb] is cut into panels of `nr` columns. A panel holds
// every K row of its columns; K block [pc, pc + kc) of a panel starts at element pc · nr.
//   kF32 layout:        element (kk, t) at kk·nr + t
//   kBf16Split layout:  (bf16, widened to fp32 by the kernel) per kk, the nr values of a row
//                       are interleaved by halves: lane t < nr/2 at 2t, lane nr/2 + t at 2t + 1
//                       (so the kernel widens with one shift and one mask)
//   kBf16Pairs layout:  (bf16, vdpbf16ps) K padded to even; element (kk, t) at
//                       (kk/2)·2·nr + 2t + kk%2: each fp32 lane is a (k even, k odd) pair
// A paired panel (SwiGLU) holds nr/2 gate columns then the nr/2 up columns of the same output
// columns; an unpaired panel holds nr output columns.
//
// A micro-panel: up to mr_max rows, each a contiguous run of the K block (fp32, or bf16 for
// kBf16Pairs, where kc is even and (a[kk], a[kk+1]) is read as one dword), rows `lda`
// elements apart. The driver points it straight at A when A's rows are contiguous, equally
// spaced and need no conversion, and otherwise copies the rows into a buffer (gather,
// conversion, odd K, or a row stride that aliases in L1).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/gemm.h"

namespace moekit::cpu::detail_gemm {

enum class BLayout : int { kF32 = 0, kBf16Split = 1, kBf16Pairs = 2 };

struct EpiArgs {
  Activation act = Activation::kNone;
  const float* bias = nullptr;       // [nb] (gate then up for pairs)
  const float* row_scale = nullptr;  // [m]
  float clamp_limit = 7.0f, clamp_alpha = 1.702f;
  void* c = nullptr;
  DType c_dtype = DType::kF32;
  int64_t ldc = 0;
  const int32_t* c_rows = nullptr;
  bool accumulate = false;
  int64_t n = 0;  // output columns of the problem (the up half of the bias starts at n)
};

// One call of a micro-kernel: a micro-panel of A (mr rows) times one panel of B over kc steps.
struct MicroTile {
  int64_t kc = 0;            // K steps (even for kBf16Pairs, zero-padded)
  const void* a = nullptr;   // A micro-panel: row i at a + i·lda (elements), K block start
  int64_t lda = 0;
  const void* b = nullptr;   // B panel at this K block
  int64_t b_step = 0;        // kF32 layout: floats between K rows (nr packed, ldb in place)
  float* part = nullptr;     // mr × nr partial sums (row-major, stride nr) between K blocks
  bool load_part = false;    // continue from part (not the first K block)
  bool finish = true;        // last K block: epilogue and store to C (else store to part)
  int mr = 0;                // rows in this micro-panel, 1..mr_max
  const EpiArgs* e = nullptr;
  int64_t row0 = 0;          // output row of the first micro-panel row
  int64_t col0 = 0;          // output column of output lane 0 of the panel
  int cbeg = 0, cend = 0;    // output lanes to store: [cbeg, cend) within [0, out_nr)
};

using MicroKernel = void (*)(const MicroTile&);

struct KernelInfo {
  MicroKernel micro = nullptr;  // null: no fast path (scalar)
  int mr_max = 1;
  int nr = 1;                   // B columns per panel (gate + up for paired)
  BLayout layout = BLayout::kF32;
  bool a_bf16_pairs = false;    // A rows in bf16 (kBf16Pairs); else fp32
  // Optional vectorised fp32 → bf16 (round to nearest even) of n values; null: scalar.
  void (*to_bf16)(const float* src, uint16_t* dst, int64_t n) = nullptr;
  // Optional kF32 panel packing from columns contiguous along K (W [n][k]): K rows [0, rows)
  // of the nr columns col[t] + k0, rows a multiple of 16, into dst[r·nr + t]; null: scalar.
  // stream: non-temporal stores (dst 64-byte aligned; a large weight read back from memory).
  void (*pack_f32_cols)(const float* const* col, int64_t k0, int64_t rows, float* dst, bool stream) = nullptr;
  // Optional kBf16Pairs from fp32 rows: dst[t] = (bf16(r0[t]), bf16(r1[t])) as one dword for
  // t < 16 (r1 null: zero); null: scalar.
  // Optional kBf16Pairs from fp32 columns contiguous along K (W [n][k], 32 columns col[t] + k0):
  // pairs [0, pairs) (a multiple of 16) into dst[p·32 + t] as dwords; null: scalar.
  void (*pack_pairs_f32_cols)(const float* const* col, int64_t k0, int64_t pairs, uint32_t* dst, bool stream) = nullptr;
  void (*pair_rows_f32)(const float* r0, const float* r1, uint32_t* dst, bool stream) = nullptr;
  // Optional copy of 32 floats to a 64-byte aligned dst with non-temporal stores (a packed
  // weight larger than the caches, read back later from memory); null: memcpy.
  void (*stream_copy32)(float* dst, const float* src) = nullptr;
  void (*stream_fence)() = nullptr;
  void (*pair_rows_bf16)(const uint16_t* r0, const uint16_t* r1, uint32_t* dst, bool stream) = nullptr;  // from bf16
  // Optional dst[c·ld + r] = scale[r]·rows[r][c] (scale null: 1) for r < 16, c < cols.
  // Optional dot products for gemm_weight_rows: out[r][j] = Σ_k a[r][k]·w[j][k] for r < rows
  // (≤ 4) and j < 4 (w[j] null: skipped), k < K; a rows fp32 (already rounded when w is bf16).
  // round_w: fp32 w rounded to bf16 as loaded.
  void (*dot_rows)(const float* const* a, int rows, const void* const* w, bool w_bf16, bool round_w, int64_t k,
                   float out[4][4]) = nullptr;
  void (*transpose16_rows)(const float* const* rows, const float* scale, int64_t cols, float* dst, int64_t ld) = nullptr;
};

// Per-ISA kernel tables (defined in isa_*.cpp; they return an empty KernelInfo when the
// compiler cannot build that ISA). b_dtype is kF32 or kBF16 (checked by the callers).
KernelInfo avx2_kernel(DType b_dtype);
KernelInfo avx512_kernel(DType b_dtype, bool bf16_dot);

// The kernel table of an ISA for B in b_dtype (kF32 or kBF16); empty (micro null) for the
// scalar path.
inline KernelInfo kernel_for(Isa isa, DType b_dtype) {
  switch (isa) {
    case Isa::kAvx2: return avx2_kernel(b_dtype);
    case Isa::kAvx512: return avx512_kernel(b_dtype, false);
    case Isa::kAvx512Bf16: return avx512_kernel(b_dtype, true);
    default: return {};
  }
}

// Panel geometry of a kernel table: bytes per packed B element, K as stored (kBf16Pairs pads
// it to even), output columns per panel (a paired panel holds gate and up of nr/2 outputs).
inline size_t b_elem_size(const KernelInfo& ki) { return ki.layout == BLayout::kF32 ? 4 : 2; }
inline int64_t k_padded(const KernelInfo& ki, int64_t k) {
  return ki.layout == BLayout::kBf16Pairs ? (k + 1) / 2 * 2 : k;
}
inline int64_t out_per_panel(const KernelInfo& ki, bool paired) { return paired ? ki.nr / 2 : ki.nr; }

// The epilogues that read B's columns in (gate, up) pairs.
inline bool is_pair(Activation a) { return a == Activation::kSiluMul || a == Activation::kSiluMulClamped; }

// Throws InputError naming `what` unless t is kF32 or kBF16: the formats the GEMM multiplies
// (quantized weights have their own kernels, quant_kernels.h).
void check_dtype(const char* what, DType t);

// Element (r, c) of a strided operand as a double (exact for fp32 and bf16): the scalar
// paths' load.
inline double load_elem(const Operand& op, int64_t r, int64_t c) {
  const int64_t row = op.rows ? op.rows[r] : r;
  const int64_t off = row * op.row_stride + c * op.col_stride;
  if (op.dtype == DType::kBF16) return bf16_to_float(static_cast<const uint16_t*>(op.data)[off]);
  return static_cast<const float*>(op.data)[off];
}

// The scalar path (gemm_scalar.cpp): row i, column j: acc = ((0 + a0·b0) + a1·b1) + ... in
// fp32 (separate multiply and add; no FMA at the baseline ISA), then the epilogue in fp32. It
// is gemm() for Isa::kScalar and the fallback wherever a kernel table has no micro-kernel.
void gemm_scalar(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end);

// SwiGLU row kernels of activation.h on AVX-512; false when this build has no AVX-512 code.
bool swiglu_forward_avx512(const float* g, const float* u, int64_t n, bool round_bf16, float* h);
bool swiglu_backward_avx512(float* g_io, float* u_io, const float* G, float w, int64_t n, bool round_bf16,
                            float* h, double* dot);

// Cache blocking, tunable for the benchmarks and tests (not thread-safe to change while GEMMs
// run). Measured on Zen 4 (docs/kernels.md): K blocking only lost speed up to K = 3584 (the
// L2 prefetchers stream A rows and B panels well), so one K block is used up to kc.
struct Tuning {
  int64_t kc = 4096;       // K block (rounded up to even); larger K is split, partial sums kept
  int64_t mc = 168;        // row block (balanced over the rows, a multiple of mr_max)
  int64_t nc_panels = 16;  // panels per column block when B is packed on the fly
  int64_t small_m = 32;    // row ranges up to this many rows use one K block (stream B once)
  bool a_in_place = true;  // read A in place when its layout allows
  int64_t b_in_place_rows = 64;  // general fp32 row-major B: read in place up to this many rows
};
Tuning& tuning();

}  // namespace moekit::cpu::detail_gemm
