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
//
// The interface is split by concern, and this header includes every part: isa.h (detection),
// bf16.h (conversion), operand.h (Operand, the element format), packed_weight.h (PackedWeight).
// Sources: isa.cpp, bf16.cpp, gemm_scalar.cpp (the scalar path), pack.cpp (the packers),
// packed_weight.cpp, gemm.cpp (argument checks and the blocked panel driver), isa_*.cpp (the
// micro-kernels; gemm_kernels.h is their private interface).
#pragma once

#include <cstdint>

#include "cpu/bf16.h"
#include "cpu/isa.h"
#include "cpu/operand.h"
#include "cpu/packed_weight.h"

namespace moekit::cpu {

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
//   act: activation_forward of moekit/experts.h (what the scalar path calls; the vector
//   paths evaluate exp, tanh and erf with polynomials of a few ulps)
//   v = v · row_scale[i]
//   C[c_row(i)][j] = accumulate ? C[c_row(i)][j] + v : v      (rounded to c_dtype)
// The result of one element never depends on how (m, n) is split into calls: bitwise equal
// for any tiling, for a given ISA.

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
