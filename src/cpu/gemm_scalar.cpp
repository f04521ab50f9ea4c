// The scalar GEMM path (gemm_kernels.h): the plain C++ oracle of every ISA path and the
// fallback where a kernel table has no micro-kernel. Row i, column j:
//   acc = ((0 + a0·b0) + a1·b1) + ...      in fp32, separate multiply and add (no FMA)
// then the epilogue in fp32, its activation being experts.h's activation_forward.
#include <algorithm>
#include <vector>

#include "cpu/gemm_kernels.h"
#include "moekit/experts.h"

namespace moekit::cpu::detail_gemm {

namespace {

// The epilogue's activation of the pre-activation g (and of the up value u for the paired
// kSiluMul*): the expert activations' one definition (moekit/experts.h), in fp32. The float
// constants convert to double and back exactly.
float activate(const Epilogue& e, float g, float u) {
  const ActivationConstants k{e.clamp_limit, e.clamp_alpha};
  switch (e.activation) {
    case Activation::kNone: return g;
    case Activation::kRelu: return activation_forward(ExpertActivation::kRelu, g, 0.0f, k);
    case Activation::kGelu: return activation_forward(ExpertActivation::kGelu, g, 0.0f, k);
    case Activation::kGeluErf: return activation_forward(ExpertActivation::kGeluErf, g, 0.0f, k);
    case Activation::kSiluMul: return activation_forward(ExpertActivation::kSwiGlu, g, u, k);
    case Activation::kSiluMulClamped: return activation_forward(ExpertActivation::kSwiGluClamped, g, u, k);
  }
  return g;
}

void store_row_scalar(const GemmProblem& p, int64_t i, int64_t n_begin, int64_t n_end, const float* acc,
                      const float* acc_up) {
  const Epilogue& e = p.epilogue;
  const bool pair = is_pair(e.activation);
  const float scale = e.row_scale ? e.row_scale[i] : 1.0f;
  const int64_t crow = p.c_rows ? p.c_rows[i] : i;
  for (int64_t j = n_begin; j < n_end; ++j) {
    float v = acc[j - n_begin];
    if (pair) {
      float u = acc_up[j - n_begin];
      if (e.bias) v += e.bias[j], u += e.bias[p.n + j];
      v = activate(e, v, u);
    } else {
      if (e.bias) v += e.bias[j];
      v = activate(e, v, 0.0f);
    }
    if (e.row_scale) v *= scale;
    if (p.c_dtype == DType::kF32) {
      float* c = static_cast<float*>(p.c) + crow * p.ldc + j;
      *c = p.accumulate ? *c + v : v;
    } else {
      static_cast<uint16_t*>(p.c)[crow * p.ldc + j] = float_to_bf16(v);
    }
  }
}

// acc[0, len) += a · B(kk, col0 + [0, len)), in order, B row kk of a strided operand.
void axpy_row(float a, const Operand& b, int64_t kk, int64_t col0, int64_t len, float* acc) {
  const int64_t cs = b.col_stride;
  if (b.dtype == DType::kF32) {
    const float* row = static_cast<const float*>(b.data) + kk * b.row_stride + col0 * cs;
    if (cs == 1) {
      for (int64_t j = 0; j < len; ++j) acc[j] += a * row[j];
    } else {
      for (int64_t j = 0; j < len; ++j) acc[j] += a * row[j * cs];
    }
  } else {
    const uint16_t* row = static_cast<const uint16_t*>(b.data) + kk * b.row_stride + col0 * cs;
    for (int64_t j = 0; j < len; ++j) acc[j] += a * bf16_to_float(row[j * cs]);
  }
}

}  // namespace

void gemm_scalar(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  const bool pair = is_pair(p.epilogue.activation);
  const bool round_a = p.b.dtype == DType::kBF16 && p.a.dtype == DType::kF32;
  const int64_t len = n_end - n_begin;
  std::vector<float> acc(static_cast<size_t>(len)), acc_up(pair ? static_cast<size_t>(len) : 0);
  for (int64_t i = m_begin; i < m_end; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(acc_up.begin(), acc_up.end(), 0.0f);
    for (int64_t kk = 0; kk < p.k; ++kk) {
      float a = static_cast<float>(load_elem(p.a, i, kk));
      if (round_a) a = bf16_round(a);
      axpy_row(a, p.b, kk, n_begin, len, acc.data());
      if (pair) axpy_row(a, p.b, kk, n_begin + p.n, len, acc_up.data());
    }
    store_row_scalar(p, i, n_begin, n_end, acc.data(), acc_up.data());
  }
}

}  // namespace moekit::cpu::detail_gemm
