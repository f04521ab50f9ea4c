// The GEMM oracle: fp64 accumulation, fp64 epilogue, one rounding at the store. It keeps its
// own element loads so that it shares no computing code with the paths it checks; argument
// checks are cpu::gemm's (every test runs both on the same problem).
#include "gemm_reference.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "moekit/error.h"

namespace moekit::cpu {
namespace {

bool is_pair(Activation a) { return a == Activation::kSiluMul || a == Activation::kSiluMulClamped; }

double act_ref(Activation act, double x) {
  switch (act) {
    case Activation::kRelu: return x > 0 ? x : 0.0;
    case Activation::kGelu: {
      const double c = std::sqrt(2.0 / 3.14159265358979323846);
      return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
    }
    case Activation::kGeluErf: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    default: return x;
  }
}

double pair_ref(const Epilogue& e, double g, double u) {
  if (e.activation == Activation::kSiluMul) return g / (1.0 + std::exp(-g)) * u;
  const double lim = e.clamp_limit;
  g = std::min(g, lim);
  u = std::clamp(u, -lim, lim);
  return (u + 1.0) * g / (1.0 + std::exp(-static_cast<double>(e.clamp_alpha) * g));
}

double load_elem(const Operand& op, int64_t r, int64_t c) {
  const int64_t row = op.rows ? op.rows[r] : r;
  const int64_t off = row * op.row_stride + c * op.col_stride;
  if (op.dtype == DType::kBF16) return bf16_to_float(static_cast<const uint16_t*>(op.data)[off]);
  return static_cast<const float*>(op.data)[off];
}

}  // namespace

void gemm_reference(const GemmProblem& p) {
  // The problem's arguments are checked by cpu::gemm, which every test runs on the same
  // problem; the oracle only computes.
  if (p.m == 0 || p.n == 0) return;
  const bool pair = is_pair(p.epilogue.activation);
  const bool round_a = p.b.dtype == DType::kBF16 && p.a.dtype == DType::kF32;
  if (p.k > 0 && p.b.data == nullptr) throw_input_error("gemm: b.data", "non-null", "null");
  // Widen once: A' [m][k] (gathered, rounded when B is bf16) and Bᵀ [nb][k], in fp64.
  const int64_t nb = pair ? 2 * p.n : p.n;
  const size_t K = static_cast<size_t>(p.k);
  std::vector<double> at(static_cast<size_t>(p.m) * K), bt(static_cast<size_t>(nb) * K);
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t kk = 0; kk < p.k; ++kk) {
      double a = load_elem(p.a, i, kk);
      if (round_a) a = bf16_to_float(float_to_bf16(static_cast<float>(a)));
      at[static_cast<size_t>(i) * K + kk] = a;
    }
  for (int64_t kk = 0; kk < p.k; ++kk)
    for (int64_t j = 0; j < nb; ++j) bt[static_cast<size_t>(j) * K + kk] = load_elem(p.b, kk, j);
  auto dot = [&](int64_t i, int64_t j) {
    const double* x = at.data() + static_cast<size_t>(i) * K;
    const double* y = bt.data() + static_cast<size_t>(j) * K;
    double acc = 0;
    for (size_t kk = 0; kk < K; ++kk) acc += x[kk] * y[kk];
    return acc;
  };
  for (int64_t i = 0; i < p.m; ++i) {
    const int64_t crow = p.c_rows ? p.c_rows[i] : i;
    for (int64_t j = 0; j < p.n; ++j) {
      double acc = dot(i, j), acc2 = pair ? dot(i, j + p.n) : 0.0;
      const float* bias = p.epilogue.bias;
      double v;
      if (pair) {
        if (bias) acc += bias[j], acc2 += bias[p.n + j];
        v = pair_ref(p.epilogue, acc, acc2);
      } else {
        if (bias) acc += bias[j];
        v = act_ref(p.epilogue.activation, acc);
      }
      if (p.epilogue.row_scale) v *= p.epilogue.row_scale[i];
      if (p.c_dtype == DType::kF32) {
        float* c = static_cast<float*>(p.c) + crow * p.ldc + j;
        *c = static_cast<float>(p.accumulate ? v + static_cast<double>(*c) : v);
      } else {
        static_cast<uint16_t*>(p.c)[crow * p.ldc + j] = float_to_bf16(static_cast<float>(v));
      }
    }
  }
}

}  // namespace moekit::cpu
