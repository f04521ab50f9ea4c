// GEMM kernels: every ISA path this CPU supports against gemm_reference, with error bounds
// derived from the arithmetic (not tuned to pass), plus bitwise determinism under tiling.
//
// Error model (u = 2^-24, the fp32 unit roundoff; gamma(n) = n·u / (1 − n·u)):
//  * Pre-activation value x = bias + Σ_k a'·b. Every path forms it as a chain of fp32 steps,
//    each with one rounding (mul then add, or FMA, or vdpbf16ps whose bf16 products are exact),
//    in some fixed order, and adds the bias once. Higham, Accuracy and Stability of Numerical
//    Algorithms, §3.1: |x̂ − x| ≤ gamma(k + 1) · S,  S = |bias| + Σ_k |a'|·|b|.
//    So the constant c in "c·k·u·Σ|a||b|" is 1 (times 1/(1 − (k+1)u) and with k + 1 for the
//    bias); nothing is fitted.
//  * Activation f with |f'| ≤ L (1 for none/ReLU, 1.13 for both GELUs, whose derivative peaks
//    at 1.129): error ≤ L·|x̂ − x| + the evaluation error of f, bounded by c_act·u·(|x| + |f|)
//    with c_act = 16 (a few ulps of exp/tanh/erf, plus the roundings of the formula; for
//    x·(1 + tanh(·)) the cancellation when tanh → −1 costs about u·|x| absolute).
//  * SwiGLU pair (g, u): out = s(g)·h(u) with s(g) = g·σ(αg) (|s'| ≤ 1.1), h(u) = u or
//    clamp(u) + 1 (|h'| ≤ 1): error ≤ 1.1·|h|·E_g + |s|·E_u + 1.1·E_g·E_u + eval error.
//  * Row scale r: error · |r| + u·|out| (one rounding); accumulate: + u·|C| (one rounding);
//    the reference is rounded once (u·|ref|); a bf16 C adds at most half a bf16 ulp to each
//    side, ≤ 2^-8·(|ref| + |out|).
//  * bf16 operands: A' is A rounded to bf16 when B is bf16 (the library's definition), so a
//    product of two bf16 values is exact in fp32 and the bound above holds unchanged against
//    the reference on the rounded inputs. Against the reference on the unrounded fp32 inputs,
//    each operand carries a relative rounding of at most 2^-8 (bf16 has 8 significant bits,
//    round to nearest), so |a'b' − ab| ≤ (2·2^-8 + 2^-16)·|a||b| and the pre-activation bound
//    becomes (2^-7 + 2^-16 + gamma(k + 1))·S (2^-8 + gamma(k + 1) when only B is rounded).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/activation.h"
#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"
#include "moekit/error.h"
#include "moekit/experts.h"
#include "oracles/gemm_reference.h"

namespace moekit::cpu {
namespace {

constexpr double kU = 1.0 / 16777216.0;  // 2^-24
constexpr double kUb = 1.0 / 256.0;      // 2^-8, bf16 unit roundoff
constexpr double kActC = 16.0;

double gamma(double n) { return n * kU / (1.0 - n * kU); }

bool is_pair(Activation a) { return a == Activation::kSiluMul || a == Activation::kSiluMulClamped; }

float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

struct Spec {
  int64_t m = 1, n = 1, k = 1;
  DType a_dt = DType::kF32, b_dt = DType::kF32, c_dt = DType::kF32;
  bool a_trans = false, b_trans = false, gather = false, scatter = false;
  bool a_lines = false;  // A rows an odd number of whole cache lines apart (read in place)
  bool accumulate = false, bias = false, scale = false;
  Activation act = Activation::kNone;
  float clamp_limit = 1.5f;  // small, so that random data hits the clamps
  uint32_t seed = 1;
};

std::string describe(const Spec& s) {
  return detail::concat("m=", s.m, " n=", s.n, " k=", s.k, " a=", int(s.a_dt), " b=", int(s.b_dt),
                        " c=", int(s.c_dt), " at=", s.a_trans, " bt=", s.b_trans, " gather=", s.gather,
                        " scatter=", s.scatter, " lines=", s.a_lines, " acc=", s.accumulate, " bias=", s.bias,
                        " scale=", s.scale, " act=", int(s.act), " seed=", s.seed);
}

// All buffers of one problem. Logical A is [src_m, k] (rows gathered), logical B is [k, nb].
struct Data {
  Spec s;
  int64_t nb = 0, src_m = 0, c_rows_total = 0;
  std::vector<float> a_orig, b_orig;  // unrounded values, logical layout in storage
  std::vector<float> a32, b32;        // storage as fp32 (rounded when the dtype is bf16)
  std::vector<uint16_t> a16, b16;
  std::vector<int32_t> rows, c_rows;
  std::vector<float> bias, scale;
  std::vector<float> c_init;
  int64_t lda_r = 0, lda_c = 0, ldb_r = 0, ldb_c = 0, ldc = 0;

  float a_log(int64_t r, int64_t c) const { return a32[r * lda_r + c * lda_c]; }
  float b_log(int64_t r, int64_t c) const { return b32[r * ldb_r + c * ldb_c]; }
};

Data make_data(const Spec& s) {
  Data d;
  d.s = s;
  std::mt19937 gen(s.seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  d.nb = is_pair(s.act) ? 2 * s.n : s.n;
  d.src_m = s.gather ? s.m + 5 : s.m;
  // A storage
  size_t a_size;
  if (s.a_trans) {
    const int64_t lda = d.src_m + 3;
    d.lda_r = 1, d.lda_c = lda;
    a_size = static_cast<size_t>(std::max<int64_t>(s.k, 1) * lda);
  } else {
    int64_t lda = s.k + 2;
    if (s.a_lines) {
      const int64_t per_line = s.a_dt == DType::kF32 ? 16 : 32;
      int64_t lines = (s.k + per_line - 1) / per_line;
      if (lines % 2 == 0) ++lines;
      lda = lines * per_line;
    }
    d.lda_r = lda, d.lda_c = 1;
    a_size = static_cast<size_t>(d.src_m * lda + 1);
  }
  d.a_orig.resize(a_size);
  for (auto& v : d.a_orig) v = uni(gen);
  if (s.b_trans) {
    const int64_t ldb = s.k + 1;
    d.ldb_r = 1, d.ldb_c = ldb;
    d.b_orig.resize(static_cast<size_t>(d.nb * ldb + 1));
  } else {
    const int64_t ldb = d.nb + 3;
    d.ldb_r = ldb, d.ldb_c = 1;
    d.b_orig.resize(static_cast<size_t>(std::max<int64_t>(s.k, 1) * ldb));
  }
  for (auto& v : d.b_orig) v = uni(gen);
  d.a32 = d.a_orig;
  d.b32 = d.b_orig;
  if (s.a_dt == DType::kBF16)
    for (auto& v : d.a32) v = round_bf16(v);
  if (s.b_dt == DType::kBF16)
    for (auto& v : d.b32) v = round_bf16(v);
  for (float v : d.a32) d.a16.push_back(float_to_bf16(v));
  for (float v : d.b32) d.b16.push_back(float_to_bf16(v));
  if (s.gather) {
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(d.src_m - 1));
    for (int64_t i = 0; i < s.m; ++i) d.rows.push_back(pick(gen));
  }
  d.c_rows_total = s.scatter ? s.m + 4 : s.m;
  if (s.scatter) {
    std::vector<int32_t> perm(static_cast<size_t>(d.c_rows_total));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
    d.c_rows.assign(perm.begin(), perm.begin() + s.m);
  }
  if (s.bias) {
    d.bias.resize(static_cast<size_t>(d.nb));
    for (auto& v : d.bias) v = uni(gen);
  }
  if (s.scale) {
    d.scale.resize(static_cast<size_t>(s.m));
    for (auto& v : d.scale) v = 0.5f * (uni(gen) + 1.0f);
  }
  d.ldc = s.n + 2;
  d.c_init.resize(static_cast<size_t>(d.c_rows_total * d.ldc));
  for (auto& v : d.c_init) v = s.accumulate ? uni(gen) : 1234.5f;
  return d;
}

// The problem over d's buffers; `orig` points the operands at the unrounded fp32 values.
GemmProblem problem(const Data& d, void* c, bool orig = false) {
  const Spec& s = d.s;
  GemmProblem p;
  p.m = s.m, p.n = s.n, p.k = s.k;
  p.a.dtype = orig ? DType::kF32 : s.a_dt;
  p.a.data = orig ? static_cast<const void*>(d.a_orig.data())
                  : (s.a_dt == DType::kF32 ? static_cast<const void*>(d.a32.data()) : d.a16.data());
  p.a.row_stride = d.lda_r, p.a.col_stride = d.lda_c;
  p.a.rows = s.gather ? d.rows.data() : nullptr;
  p.b.dtype = orig ? DType::kF32 : s.b_dt;
  p.b.data = orig ? static_cast<const void*>(d.b_orig.data())
                  : (s.b_dt == DType::kF32 ? static_cast<const void*>(d.b32.data()) : d.b16.data());
  p.b.row_stride = d.ldb_r, p.b.col_stride = d.ldb_c;
  p.c = c;
  p.c_dtype = s.c_dt;
  p.ldc = d.ldc;
  p.c_rows = s.scatter ? d.c_rows.data() : nullptr;
  p.accumulate = s.accumulate;
  p.epilogue.activation = s.act;
  p.epilogue.bias = s.bias ? d.bias.data() : nullptr;
  p.epilogue.row_scale = s.scale ? d.scale.data() : nullptr;
  p.epilogue.clamp_limit = s.clamp_limit;
  return p;
}

// C buffer in the spec's dtype, stored as raw bytes.
struct CBuf {
  DType dt;
  std::vector<float> f;
  std::vector<uint16_t> h;
  void* ptr() { return dt == DType::kF32 ? static_cast<void*>(f.data()) : h.data(); }
  double at(int64_t idx) const { return dt == DType::kF32 ? f[idx] : bf16_to_float(h[idx]); }
  bool operator==(const CBuf& o) const {
    return dt == DType::kF32 ? std::memcmp(f.data(), o.f.data(), f.size() * 4) == 0
                             : h == o.h;
  }
};

CBuf make_c(const Data& d) {
  CBuf c{d.s.c_dt, {}, {}};
  if (c.dt == DType::kF32)
    c.f = d.c_init;
  else
    for (float v : d.c_init) c.h.push_back(float_to_bf16(v));
  return c;
}

// Runs a path over the whole C in tiles: m split at m_cuts, n at n_cuts.
using Runner = std::function<void(const GemmProblem&, int64_t, int64_t, int64_t, int64_t)>;

void run_tiled(const GemmProblem& p, const Runner& run, std::vector<int64_t> m_cuts,
               std::vector<int64_t> n_cuts) {
  m_cuts.insert(m_cuts.begin(), 0), m_cuts.push_back(p.m);
  n_cuts.insert(n_cuts.begin(), 0), n_cuts.push_back(p.n);
  std::sort(m_cuts.begin(), m_cuts.end());
  std::sort(n_cuts.begin(), n_cuts.end());
  for (size_t i = 0; i + 1 < m_cuts.size(); ++i)
    for (size_t j = 0; j + 1 < n_cuts.size(); ++j)
      run(p, m_cuts[i], m_cuts[i + 1], n_cuts[j], n_cuts[j + 1]);
}

// The reference result of a problem and the derived bound for every element of C.
// vs_orig: the reference runs on the unrounded fp32 inputs (the bf16 rounding bound applies).
struct Expected {
  CBuf ref;
  std::vector<double> tol;  // per C element (row-major over the C buffer)
  bool vs_orig = false;
};

Expected expected(const Data& d, bool vs_orig) {
  const Spec& s = d.s;
  Expected ex{make_c(d), std::vector<double>(static_cast<size_t>(d.c_rows_total * d.ldc), 0.0), vs_orig};
  gemm_reference(problem(d, ex.ref.ptr(), vs_orig));
  // Per-element magnitudes and pre-activation values in fp64 from the logical operands.
  const bool round_a = s.b_dt == DType::kBF16 && s.a_dt == DType::kF32;
  double op_rel = 0.0;  // relative perturbation of each product vs the reference's inputs
  if (vs_orig) {
    const bool ra = s.a_dt == DType::kBF16 || round_a, rb = s.b_dt == DType::kBF16;
    op_rel = (ra && rb) ? 2 * kUb + kUb * kUb : (ra || rb) ? kUb : 0.0;
  }
  const bool pair = is_pair(s.act);
  std::vector<double> arow(static_cast<size_t>(s.k));
  std::vector<double> bcol(static_cast<size_t>(s.k));
  std::vector<double> x(static_cast<size_t>(s.m * d.nb)), mag(static_cast<size_t>(s.m * d.nb));
  for (int64_t col = 0; col < d.nb; ++col) {
    for (int64_t kk = 0; kk < s.k; ++kk) bcol[kk] = d.b_log(kk, col);
    for (int64_t i = 0; i < s.m; ++i) {
      const int64_t src = s.gather ? d.rows[i] : i;
      double xs = s.bias ? d.bias[col] : 0.0, ms = s.bias ? std::fabs(d.bias[col]) : 0.0;
      for (int64_t kk = 0; kk < s.k; ++kk) {
        float a = d.a_log(src, kk);
        if (round_a) a = round_bf16(a);
        xs += a * bcol[kk];
        ms += std::fabs(a * bcol[kk]);
      }
      x[i * d.nb + col] = xs, mag[i * d.nb + col] = ms;
    }
  }
  const double g_k = gamma(static_cast<double>(s.k + 1)) + op_rel;
  for (int64_t i = 0; i < s.m; ++i) {
    const int64_t crow = s.scatter ? d.c_rows[i] : i;
    for (int64_t j = 0; j < s.n; ++j) {
      const double e0 = g_k * mag[i * d.nb + j];
      double out, err;
      if (!pair) {
        double L = 1.0;
        if (s.act == Activation::kGelu || s.act == Activation::kGeluErf) L = 1.13;
        const double fx = std::fabs(x[i * d.nb + j]) + e0;
        out = fx;  // |f(x)| <= |x| for every single-input activation here
        err = L * e0 + (s.act == Activation::kNone ? 0.0 : kActC * kU * (fx + out));
      } else {
        const double e1 = g_k * mag[i * d.nb + j + s.n];
        const double g = std::fabs(x[i * d.nb + j]) + e0;
        double hu = std::fabs(x[i * d.nb + j + s.n]) + e1;
        if (s.act == Activation::kSiluMulClamped) hu = std::min<double>(hu, s.clamp_limit) + 1.0;
        const double sg = s.act == Activation::kSiluMulClamped ? std::min<double>(g, s.clamp_limit) : g;
        out = sg * hu;
        err = 1.1 * hu * e0 + sg * e1 + 1.1 * e0 * e1 + kActC * kU * out;
      }
      if (s.scale) {
        const double r = d.scale[i];
        out *= r;
        err = err * r + kU * out;
      }
      const int64_t idx = crow * d.ldc + j;
      const double rv = ex.ref.at(idx);
      if (s.accumulate) err += kU * (std::fabs(rv) + err);
      err += kU * std::fabs(rv);  // the reference's own rounding
      if (s.c_dt == DType::kBF16) err += kUb * (2.02 * std::fabs(rv) + err);
      ex.tol[idx] = err;
    }
  }
  return ex;
}

void check(const Data& d, const Expected& ex, const CBuf& got, const std::string& what) {
  const Spec& s = d.s;
  int64_t bad = 0;
  std::vector<char> written(static_cast<size_t>(d.c_rows_total * d.ldc), 0);
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.n; ++j) {
      const int64_t idx = (s.scatter ? d.c_rows[i] : i) * d.ldc + j;
      written[idx] = 1;
      const double gv = got.at(idx), rv = ex.ref.at(idx);
      if (!(std::fabs(gv - rv) <= ex.tol[idx]) && ++bad <= 5)
        ADD_FAILURE() << what << " " << describe(s) << " at (" << i << ", " << j << "): got " << gv
                      << ", reference " << rv << ", |diff| " << std::fabs(gv - rv) << " > bound "
                      << ex.tol[idx];
    }
  // Everything outside the written region is untouched.
  for (size_t idx = 0; idx < written.size(); ++idx)
    if (!written[idx] && got.at(static_cast<int64_t>(idx)) != ex.ref.at(static_cast<int64_t>(idx))) {
      ADD_FAILURE() << what << " " << describe(s) << ": wrote outside C's region at " << idx;
      break;
    }
  EXPECT_EQ(bad, 0) << what << " " << describe(s);
}

void check_against_reference(const Data& d, const CBuf& got, bool vs_orig, const std::string& what) {
  check(d, expected(d, vs_orig), got, what);
}

Runner general_runner(Isa isa) {
  return [isa](const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    gemm(p, isa, m0, m1, n0, n1);
  };
}

// Packs the logical B of d as a weight W = Bᵀ [nb, k] (from its stored dtype) for isa; or,
// with from_operand, straight from d's strided B operand (PackedWeight::pack_operand).
PackedWeight pack_b(const Data& d, Isa isa, DType packed_dt, bool from_operand = false) {
  if (from_operand) {
    Operand b;
    b.dtype = d.s.b_dt;
    b.data = d.s.b_dt == DType::kF32 ? static_cast<const void*>(d.b32.data()) : d.b16.data();
    b.row_stride = d.ldb_r, b.col_stride = d.ldb_c;
    return PackedWeight::pack_operand(b, d.s.k, d.nb, packed_dt, isa, is_pair(d.s.act));
  }
  const int64_t ldw = d.s.k + 3;
  if (d.s.b_dt == DType::kF32) {
    std::vector<float> w(static_cast<size_t>(d.nb * ldw), 0.0f);
    for (int64_t j = 0; j < d.nb; ++j)
      for (int64_t kk = 0; kk < d.s.k; ++kk) w[j * ldw + kk] = d.b_log(kk, j);
    return PackedWeight::pack(w.data(), DType::kF32, d.nb, d.s.k, ldw, packed_dt, isa, is_pair(d.s.act));
  }
  std::vector<uint16_t> w(static_cast<size_t>(d.nb * ldw), 0);
  for (int64_t j = 0; j < d.nb; ++j)
    for (int64_t kk = 0; kk < d.s.k; ++kk) w[j * ldw + kk] = float_to_bf16(d.b_log(kk, j));
  return PackedWeight::pack(w.data(), DType::kBF16, d.nb, d.s.k, ldw, packed_dt, isa, is_pair(d.s.act));
}

Runner packed_runner(const PackedWeight& w) {
  return [&w](const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    gemm_packed(p, w, m0, m1, n0, n1);
  };
}

Spec random_spec(int64_t m, int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 gen(seed);
  auto coin = [&](double p) { return std::bernoulli_distribution(p)(gen); };
  Spec s;
  s.m = m, s.n = n, s.k = k, s.seed = seed;
  s.a_trans = coin(0.3), s.b_trans = coin(0.4), s.gather = coin(0.4), s.scatter = coin(0.2);
  s.a_lines = !s.a_trans && coin(0.3);
  s.bias = coin(0.5), s.scale = coin(0.3), s.accumulate = coin(0.2);
  s.act = static_cast<Activation>(std::uniform_int_distribution<int>(0, 5)(gen));
  if (coin(0.25)) s.a_dt = DType::kBF16;
  if (coin(0.25)) s.b_dt = DType::kBF16;
  if (!s.accumulate && coin(0.15)) s.c_dt = DType::kBF16;
  return s;
}

const int64_t kSizes[] = {1, 7, 17, 33, 100};

// Random (m, n, k) from the awkward sizes, random options, every ISA, general B.
TEST(GemmPaths, AwkwardShapesAllOptions) {
  uint32_t seed = 1;
  for (int64_t m : kSizes)
    for (int64_t n : kSizes)
      for (int64_t k : kSizes) {
        const Spec s = random_spec(m, n, k, seed++);
        const Data d = make_data(s);
        const Expected ex = expected(d, false);
        for (Isa isa : supported_isas()) {
          CBuf c = make_c(d);
          run_tiled(problem(d, c.ptr()), general_runner(isa), {}, {});
          check(d, ex, c, std::string("gemm ") + isa_name(isa));
        }
      }
}

// The same through PackedWeight, fp32 and bf16 storage.
TEST(GemmPaths, PackedWeightsAllOptions) {
  uint32_t seed = 1000;
  for (int64_t m : kSizes)
    for (int64_t n : kSizes)
      for (int64_t k : kSizes) {
        Spec s = random_spec(m, n, k, seed++);
        for (Isa isa : supported_isas())
          for (DType pdt : {DType::kF32, DType::kBF16}) {
            Spec t = s;
            // The reference sees B as stored in the packed weight.
            if (pdt == DType::kBF16) t.b_dt = DType::kBF16;
            if (pdt == DType::kF32) t.b_dt = DType::kF32;
            const Data d = make_data(t);
            const PackedWeight w = pack_b(d, isa, pdt, /*from_operand=*/seed % 2 == 0);
            CBuf c = make_c(d);
            run_tiled(problem(d, c.ptr()), packed_runner(w), {}, {});
            check_against_reference(d, c, false,
                                    std::string("gemm_packed ") + isa_name(isa) + (pdt == DType::kBF16 ? " bf16" : " f32"));
          }
      }
}

// Shapes large enough to cross every blocking boundary (K blocks, row and column blocks).
TEST(GemmPaths, LargeShapesCrossBlocks) {
  const int64_t shapes[][3] = {{180, 200, 1100}, {45, 530, 777}, {1, 300, 2100}, {200, 65, 64}};
  uint32_t seed = 5000;
  for (auto& sh : shapes)
    for (Activation act : {Activation::kNone, Activation::kSiluMul, Activation::kGelu})
      for (DType bdt : {DType::kF32, DType::kBF16}) {
        Spec s;
        s.m = sh[0], s.n = sh[1], s.k = sh[2], s.act = act, s.b_dt = bdt, s.bias = true,
        s.scale = true, s.seed = seed++;
        s.gather = s.seed % 2 == 0, s.a_lines = !s.gather;  // copied rows, or A read in place
        if (bdt == DType::kBF16 && s.seed % 4 == 1) s.a_dt = DType::kBF16;
        const Data d = make_data(s);
        const Expected ex = expected(d, false);
        for (Isa isa : supported_isas()) {
          CBuf c = make_c(d);
          run_tiled(problem(d, c.ptr()), general_runner(isa), {}, {});
          check(d, ex, c, std::string("gemm ") + isa_name(isa));
          const PackedWeight w = pack_b(d, isa, bdt);
          CBuf c2 = make_c(d);
          run_tiled(problem(d, c2.ptr()), packed_runner(w), {}, {});
          check(d, ex, c2, std::string("gemm_packed ") + isa_name(isa));
        }
      }
}

// k = 0: C = epilogue(bias) on every path.
TEST(GemmPaths, ZeroK) {
  for (Activation act : {Activation::kNone, Activation::kGelu, Activation::kSiluMulClamped}) {
    Spec s;
    s.m = 9, s.n = 35, s.k = 0, s.act = act, s.bias = true, s.scale = true, s.seed = 77;
    const Data d = make_data(s);
    const Expected ex = expected(d, false);
    for (Isa isa : supported_isas()) {
      CBuf c = make_c(d);
      run_tiled(problem(d, c.ptr()), general_runner(isa), {}, {});
      check(d, ex, c, std::string("k=0 gemm ") + isa_name(isa));
      const PackedWeight w = pack_b(d, isa, DType::kBF16);
      CBuf c2 = make_c(d);
      run_tiled(problem(d, c2.ptr()), packed_runner(w), {}, {});
      check(d, ex, c2, std::string("k=0 gemm_packed ") + isa_name(isa));
    }
  }
}

// Every activation on every path, with bias, row scale, gather and a bf16 variant.
TEST(GemmEpilogue, EveryActivationEveryIsa) {
  uint32_t seed = 7000;
  for (int a = 0; a <= static_cast<int>(Activation::kSiluMulClamped); ++a)
    for (bool bf : {false, true})
      for (bool acc : {false, true}) {
        Spec s;
        s.m = 37, s.n = 45, s.k = 70, s.act = static_cast<Activation>(a), s.bias = true,
        s.scale = true, s.gather = true, s.accumulate = acc, s.seed = seed++;
        if (bf) s.a_dt = DType::kBF16, s.b_dt = DType::kBF16, s.gather = false, s.a_lines = true;
        const Data d = make_data(s);
        const Expected ex = expected(d, false);
        for (Isa isa : supported_isas()) {
          CBuf c = make_c(d);
          run_tiled(problem(d, c.ptr()), general_runner(isa), {}, {});
          check(d, ex, c, std::string("gemm ") + isa_name(isa));
          const PackedWeight w = pack_b(d, isa, s.b_dt);
          CBuf c2 = make_c(d);
          run_tiled(problem(d, c2.ptr()), packed_runner(w), {}, {});
          check(d, ex, c2, std::string("gemm_packed ") + isa_name(isa));
        }
      }
}

// bf16 operands against the reference on the unrounded fp32 inputs: the 2^-8 per-operand
// rounding bound (see the top of the file).
TEST(GemmBf16, BoundAgainstFp32Inputs) {
  uint32_t seed = 9000;
  for (int64_t k : {1, 33, 100, 513})
    for (int variant = 0; variant < 3; ++variant)
      for (Activation act : {Activation::kNone, Activation::kSiluMul}) {
        Spec s;
        s.m = 19, s.n = 41, s.k = k, s.act = act, s.bias = true, s.seed = seed++;
        s.a_dt = variant == 1 ? DType::kBF16 : DType::kF32;
        s.b_dt = variant == 2 ? DType::kF32 : DType::kBF16;
        if (variant == 2) s.a_dt = DType::kBF16;
        const Data d = make_data(s);
        const Expected ex = expected(d, true);
        for (Isa isa : supported_isas()) {
          CBuf c = make_c(d);
          run_tiled(problem(d, c.ptr()), general_runner(isa), {}, {});
          check(d, ex, c, std::string("bf16 vs fp32 inputs ") + isa_name(isa));
        }
      }
}

// Same bits for any tiling of (m, n), general and packed B.
TEST(GemmDeterminism, AnyTilingSameBits) {
  std::mt19937 gen(42);
  uint32_t seed = 11000;
  for (int rep = 0; rep < 6; ++rep) {
    Spec s;
    s.m = 90 + rep * 13, s.n = 70 + rep * 29, s.k = rep % 2 ? 700 : 130, s.seed = seed++;
    s.act = static_cast<Activation>(rep % 6), s.bias = true, s.scale = rep % 3 == 0,
    s.gather = rep % 2 == 0, s.b_dt = rep >= 3 ? DType::kBF16 : DType::kF32;
    s.a_lines = !s.gather, s.a_dt = rep == 5 ? DType::kBF16 : DType::kF32;
    const Data d = make_data(s);
    for (Isa isa : supported_isas())
      for (bool packed : {false, true}) {
        PackedWeight w;
        if (packed) w = pack_b(d, isa, s.b_dt);
        const Runner run = packed ? packed_runner(w) : general_runner(isa);
        CBuf whole = make_c(d);
        run_tiled(problem(d, whole.ptr()), run, {}, {});
        for (int t = 0; t < 4; ++t) {
          std::vector<int64_t> mc, nc;
          for (int q = 0; q < t + 1; ++q) {
            mc.push_back(std::uniform_int_distribution<int64_t>(0, s.m)(gen));
            nc.push_back(std::uniform_int_distribution<int64_t>(0, s.n)(gen));
          }
          if (t == 3) {  // one row and one column at a time at the edges
            mc = {1, 2, s.m - 1};
            nc = {1, 2, 3, s.n - 1};
          }
          CBuf tiled = make_c(d);
          run_tiled(problem(d, tiled.ptr()), run, mc, nc);
          EXPECT_TRUE(tiled == whole) << isa_name(isa) << (packed ? " packed " : " general ")
                                      << describe(s) << " tiling " << t;
        }
      }
  }
}

// The cache blocking (K blocks with partial sums, row blocks, column blocks, A copied or read
// in place) changes no bit: each element is one fp32 chain over k in order.
TEST(GemmDeterminism, BlockingChangesNoBits) {
  struct Restore {
    detail_gemm::Tuning saved = detail_gemm::tuning();
    ~Restore() { detail_gemm::tuning() = saved; }
  } restore;
  uint32_t seed = 13000;
  for (int rep = 0; rep < 6; ++rep) {
    Spec s;
    s.m = 60 + 17 * rep, s.n = 50 + 23 * rep, s.k = 300 + 41 * rep, s.seed = seed++;
    s.act = static_cast<Activation>(rep % 6), s.bias = true, s.scale = rep % 2 == 1;
    s.gather = rep % 3 == 0, s.a_lines = !s.gather;
    s.b_dt = rep % 2 ? DType::kBF16 : DType::kF32;
    s.a_dt = rep == 3 ? DType::kBF16 : DType::kF32;
    const Data d = make_data(s);
    const Expected ex = expected(d, false);
    for (Isa isa : supported_isas())
      for (bool packed : {false, true}) {
        PackedWeight w;
        if (packed) w = pack_b(d, isa, s.b_dt);
        const Runner run = packed ? packed_runner(w) : general_runner(isa);
        detail_gemm::tuning() = restore.saved;
        CBuf base = make_c(d);
        run_tiled(problem(d, base.ptr()), run, {}, {});
        detail_gemm::tuning().kc = 64 + 2 * rep;
        detail_gemm::tuning().mc = 20;
        detail_gemm::tuning().nc_panels = 1;
        detail_gemm::tuning().small_m = 0;
        detail_gemm::tuning().a_in_place = rep % 2 == 0;
        CBuf blocked = make_c(d);
        run_tiled(problem(d, blocked.ptr()), run, {33}, {});
        EXPECT_TRUE(blocked == base) << isa_name(isa) << (packed ? " packed " : " general ") << describe(s);
        check(d, ex, blocked, std::string("blocked ") + isa_name(isa));
      }
  }
}

TEST(GemmApi, IsaNamesAndDetection) {
  const std::vector<Isa> isas = supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), Isa::kScalar);
  EXPECT_EQ(isas.back(), detect_isa());
  EXPECT_STREQ(isa_name(Isa::kAvx512Bf16), "avx512bf16");
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(float_to_bf16(1.0f + 1.0f / 256.0f), float_to_bf16(1.0f));           // tie → even
  EXPECT_EQ(float_to_bf16(1.0f + 3.0f / 256.0f), float_to_bf16(1.0f + 1.0f / 64.0f));  // tie → even (up)
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(INFINITY))));
  // MOEKIT_ISA lowers the active ISA; unknown names (amx has no path) are rejected.
  const char* saved = std::getenv("MOEKIT_ISA");
  const std::string saved_value = saved ? saved : "";
  setenv("MOEKIT_ISA", "scalar", 1);
  EXPECT_EQ(active_isa(), Isa::kScalar);
  setenv("MOEKIT_ISA", "fastest", 1);
  EXPECT_THROW(active_isa(), InputError);
  setenv("MOEKIT_ISA", "amx", 1);
  EXPECT_THROW(active_isa(), InputError);
  unsetenv("MOEKIT_ISA");
  EXPECT_EQ(active_isa(), detect_isa());
  if (saved) setenv("MOEKIT_ISA", saved_value.c_str(), 1);
}

TEST(GemmApi, RejectsBadArguments) {
  Spec s;
  s.m = 4, s.n = 4, s.k = 4;
  Data d = make_data(s);
  CBuf c = make_c(d);
  GemmProblem p = problem(d, c.ptr());
  EXPECT_THROW(gemm(p, Isa::kScalar, 0, 5, 0, 4), InputError);
  EXPECT_THROW(gemm(p, Isa::kScalar, 0, 4, 2, 1), InputError);
  GemmProblem q = p;
  q.c_dtype = DType::kBF16;
  q.accumulate = true;
  EXPECT_THROW(gemm(q, Isa::kScalar, 0, 4, 0, 4), InputError);
  const PackedWeight w = pack_b(d, Isa::kScalar, DType::kF32);
  q = p;
  q.epilogue.activation = Activation::kSiluMul;  // needs a paired weight of 2n rows
  EXPECT_THROW(gemm_packed(q, w, 0, 4, 0, 4), InputError);
  q = p;
  q.k = 5;
  EXPECT_THROW(gemm_packed(q, w, 0, 4, 0, 4), InputError);
  EXPECT_THROW(PackedWeight::pack(d.b32.data(), DType::kF32, 3, 4, 4, DType::kF32, Isa::kScalar, true),
               InputError);
}

// The kernels share the library's weight-format enum: its quantized formats, which the GEMM does
// not multiply, are rejected with the argument and the format named.
TEST(GemmApi, RejectsQuantizedFormats) {
  Spec s;
  s.m = 4, s.n = 4, s.k = 4;
  Data d = make_data(s);
  CBuf c = make_c(d);
  GemmProblem p = problem(d, c.ptr());
  for (Isa isa : supported_isas()) {
    GemmProblem q = p;
    q.b.dtype = DType::kInt8;
    try {
      gemm(q, isa, 0, 4, 0, 4);
      ADD_FAILURE() << "gemm accepted an int8 B";
    } catch (const InputError& e) {
      EXPECT_STREQ(e.what(), "gemm: b.dtype: expected kF32 or kBF16, got int8");
    }
    q = p;
    q.a.dtype = DType::kMxfp4;
    EXPECT_THROW(gemm(q, isa, 0, 4, 0, 4), InputError);
    EXPECT_THROW(PackedWeight::packed_bytes(4, 4, DType::kInt4, isa), InputError);
    EXPECT_THROW(PackedWeight::pack(d.b32.data(), DType::kF32, 4, 4, 4, DType::kInt8, isa), InputError);
    EXPECT_THROW(gemm_weight_rows(p, d.b32.data(), DType::kInt8, 4, isa, 0, 4, 0, 4), InputError);
  }
}

// SwiGLU row kernels (activation.h) on every path against activation_forward/backward in
// double. Bounds: the vector exp is within a few ulps, and each formula has at most 5 fp32
// roundings, so every product term is within 16u of its value; d_g's factor 1 + g·(1 − σ)
// cancels near g ≈ −1.28 (where silu' = 0), so its bound is relative to the terms before
// cancellation, 16u·|d_h·u·σ|·(1 + |g|(1 − σ)). A bf16-rounded h may differ by one bf16
// rounding (2^-8 relative) where the two paths straddle a rounding boundary.
TEST(SwigluRows, MatchDoubleReferenceOnEveryPath) {
  std::mt19937 gen(21);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const ActivationConstants k;
  for (Isa isa : supported_isas()) {
    for (int64_t n : {1, 15, 16, 17, 100}) {
      for (bool round : {false, true}) {
        SCOPED_TRACE(std::string(isa_name(isa)) + " n=" + std::to_string(n) + (round ? " bf16" : ""));
        std::vector<float> g(n), u(n), G(n), h(n), h2(n);
        for (int64_t j = 0; j < n; ++j) g[j] = normal(gen), u[j] = normal(gen), G[j] = normal(gen);
        g[0] = -1.2784645f;  // near the zero of silu'
        const float w = 0.37f;
        const double hb = round ? kUb : 0.0;
        swiglu_forward_row(isa, g.data(), u.data(), n, round, h.data());
        std::vector<float> gi = g, ui = u;
        const double dot = swiglu_backward_row(isa, gi.data(), ui.data(), G.data(), w, n, round, h2.data());
        double dot_ref = 0, dot_abs = 0;
        for (int64_t j = 0; j < n; ++j) {
          const double gd = g[j], ud = u[j];
          const double h_ref = activation_forward<double>(ExpertActivation::kSwiGlu, gd, ud, {});
          const double tol_h = (kActC * kU + hb) * std::abs(h_ref) + 1e-30;
          EXPECT_NEAR(h[j], h_ref, tol_h) << j;
          EXPECT_EQ(h[j], h2[j]) << j;  // the same h in forward and backward
          dot_ref += double(G[j]) * h_ref;
          dot_abs += std::abs(double(G[j]) * h_ref);
          double dg = 0, du = 0;
          activation_backward<double>(ExpertActivation::kSwiGlu, gd, ud, double(w) * G[j], {}, &dg, &du);
          const double s = 1.0 / (1.0 + std::exp(-gd));
          const double dh = double(w) * G[j];
          EXPECT_NEAR(gi[j], dg, kActC * kU * std::abs(dh * ud * s) * (1 + std::abs(gd) * (1 - s)) + 1e-30) << j;
          EXPECT_NEAR(ui[j], du, kActC * kU * std::abs(du) + 1e-30) << j;
        }
        EXPECT_NEAR(dot, dot_ref, (kActC * kU + hb) * dot_abs + 1e-30);
        (void)k;
      }
    }
  }
}

// fp32 → bf16, scalar and bulk, against the definition: the nearer of the two bf16 values
// around x (ties to the even mantissa), overflow to infinity, infinities kept, NaN quieted with
// its sign; the candidates are compared in double, where their distances to x are exact.
double bf16_value(uint32_t b) {  // exponent 255 with zero mantissa: 2^128, the overflow boundary
  const uint32_t e = (b >> 7) & 0xffu, m = b & 0x7fu;
  const double v = e == 0 ? std::ldexp(double(m), -133) : std::ldexp(double(128 + m), int(e) - 134);
  return (b >> 15) ? -v : v;
}

TEST(Bf16, ConversionRoundsToNearestEven) {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu,
                                0x7f7f8000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffbfffffu,
                                0x00000001u, 0x007fffffu, 0x3fffffffu, 0xbf808001u};
  std::mt19937 gen(3);
  for (int i = 0; i < 2000; ++i) bits.push_back(gen());
  std::vector<float> x(bits.size());
  std::memcpy(x.data(), bits.data(), bits.size() * 4);
  std::vector<uint16_t> bulk(x.size());
  float_to_bf16_n(x.data(), bulk.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    const uint32_t u = bits[i];
    uint16_t want;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      want = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN, sign and top payload kept
    } else if ((u & 0x7fffffffu) == 0x7f800000u) {
      want = static_cast<uint16_t>(u >> 16);
    } else {
      const uint32_t lo = u >> 16, hi = lo + 1;  // toward zero, and one step away from zero
      const double dlo = std::abs(double(x[i]) - bf16_value(lo)), dhi = std::abs(double(x[i]) - bf16_value(hi));
      want = static_cast<uint16_t>(dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi));
    }
    EXPECT_EQ(float_to_bf16(x[i]), want) << std::hex << u;
    EXPECT_EQ(bulk[i], want) << std::hex << u;
  }
}

// transpose_rows on every path is exactly scale[r] · rows[r][c] (one rounding), including
// row and column counts that are not multiples of the 16 × 16 register blocks.
TEST(TransposeRows, EveryPathBitwise) {
  std::mt19937 gen(5);
  std::normal_distribution<float> normal;
  for (Isa isa : supported_isas())
    for (int64_t num_rows : {1, 15, 16, 33})
      for (int64_t cols : {1, 16, 17, 40})
        for (bool scaled : {false, true}) {
          std::vector<std::vector<float>> src(static_cast<size_t>(num_rows), std::vector<float>(cols));
          std::vector<const float*> rows;
          std::vector<float> scale(num_rows);
          for (auto& r : src) {
            for (float& v : r) v = normal(gen);
            rows.push_back(r.data());
          }
          for (float& v : scale) v = normal(gen);
          const int64_t ld = num_rows + 3;
          std::vector<float> dst(static_cast<size_t>(cols * ld), -7.0f);
          transpose_rows(isa, rows.data(), scaled ? scale.data() : nullptr, num_rows, cols, dst.data(), ld);
          for (int64_t c = 0; c < cols; ++c)
            for (int64_t r = 0; r < ld; ++r) {
              const float want = r < num_rows ? (scaled ? scale[r] : 1.0f) * src[r][c] : -7.0f;
              ASSERT_EQ(dst[c * ld + r], want) << isa_name(isa) << " " << num_rows << "x" << cols << " r" << r << " c" << c;
            }
        }
}

// Packing fp32 B as bf16 rounds each value exactly once: the packed bytes equal those of
// packing the bf16-rounded copy (a path checked against the reference above), for B with
// contiguous rows (activations, a weight used transposed) and contiguous columns (W [n][k]),
// paired and not, whole and partial panels, odd K.
TEST(GemmPacking, Fp32SourceRoundsLikeBf16Source) {
  std::mt19937 gen(9);
  std::normal_distribution<float> normal;
  for (Isa isa : supported_isas())
    for (int64_t k : {1, 31, 64, 101})
      for (int64_t n : {16, 64, 70})
        for (bool rows_contiguous : {true, false})
          for (bool paired : {false, true}) {
            std::vector<float> b32(static_cast<size_t>(k * n));
            for (float& v : b32) v = normal(gen);
            b32[0] = std::numeric_limits<float>::quiet_NaN();
            std::vector<uint16_t> b16(b32.size());
            for (size_t i = 0; i < b32.size(); ++i) b16[i] = float_to_bf16(b32[i]);
            // Logical B [k, n]: element (kk, j) at kk·n + j (rows contiguous) or j·k + kk.
            const int64_t rs = rows_contiguous ? n : 1, cs = rows_contiguous ? 1 : k;
            const PackedWeight a = PackedWeight::pack_operand(Operand{b32.data(), DType::kF32, rs, cs}, k, n,
                                                              DType::kBF16, isa, paired);
            const PackedWeight b = PackedWeight::pack_operand(Operand{b16.data(), DType::kBF16, rs, cs}, k, n,
                                                              DType::kBF16, isa, paired);
            ASSERT_EQ(a.bytes(), b.bytes());
            EXPECT_EQ(std::memcmp(a.data(), b.data(), a.bytes()), 0)
                << isa_name(isa) << " k=" << k << " n=" << n << (rows_contiguous ? " rows" : " cols")
                << (paired ? " paired" : "");
          }
}

// gemm_weight_rows (weights read in place) on every path against a double reference, with the
// summation bound γ(k+1)·(|bias| + Σ|a'||w|) (any order), then the row scale's rounding; bf16
// W rounds A (A' = bf16(A)) so that products are exact, as in gemm(). Gathered A rows and
// scattered C rows; k and n not multiples of the vector width or of the 4 × 4 blocks.
TEST(GemmWeightRows, EveryPathWithinBound) {
  std::mt19937 gen(13);
  std::normal_distribution<float> normal;
  for (Isa isa : supported_isas())
    for (DType wdt : {DType::kF32, DType::kBF16})
      for (int64_t m : {1, 3, 6})
        for (int64_t n : {1, 5, 37})
          for (int64_t k : {1, 17, 100}) {
            const int64_t ldw = k + 2, lda = k + 1;
            std::vector<float> a(static_cast<size_t>((m + 2) * lda)), w32(static_cast<size_t>(n * ldw));
            for (float& v : a) v = normal(gen);
            for (float& v : w32) v = normal(gen);
            std::vector<uint16_t> w16(w32.size());
            for (size_t i = 0; i < w32.size(); ++i) w16[i] = float_to_bf16(w32[i]);
            std::vector<float> bias(n), scale(m + 2);
            for (float& v : bias) v = normal(gen);
            for (float& v : scale) v = normal(gen);
            std::vector<int32_t> a_rows(m), c_rows(m);
            for (int64_t i = 0; i < m; ++i) a_rows[i] = static_cast<int32_t>(m + 1 - i), c_rows[i] = static_cast<int32_t>(i + 1);
            const int64_t ldc = n + 3;
            std::vector<float> c(static_cast<size_t>((m + 2) * ldc), -9.0f);
            GemmProblem p;
            p.m = m, p.n = n, p.k = k;
            p.a = {a.data(), DType::kF32, lda, 1, a_rows.data()};
            p.c = c.data(), p.ldc = ldc, p.c_rows = c_rows.data();
            p.epilogue.bias = bias.data(), p.epilogue.row_scale = scale.data();
            const void* w = wdt == DType::kF32 ? static_cast<const void*>(w32.data()) : w16.data();
            // Two calls splitting rows and columns, as tiles would.
            gemm_weight_rows(p, w, wdt, ldw, isa, 0, m / 2, 0, n);
            gemm_weight_rows(p, w, wdt, ldw, isa, m / 2, m, 0, n / 2);
            gemm_weight_rows(p, w, wdt, ldw, isa, m / 2, m, n / 2, n);
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < n; ++j) {
                double acc = bias[j], mag = std::abs(bias[j]);
                for (int64_t kk = 0; kk < k; ++kk) {
                  float av = a[a_rows[i] * lda + kk];
                  double wv = w32[j * ldw + kk];
                  if (wdt == DType::kBF16) av = bf16_to_float(float_to_bf16(av)), wv = bf16_to_float(w16[j * ldw + kk]);
                  acc += double(av) * wv;
                  mag += std::abs(double(av) * wv);
                }
                const double want = acc * scale[i];
                const double tol = gamma(double(k + 1)) * mag * std::abs(scale[i]) + 2 * kU * std::abs(want);
                EXPECT_NEAR(c[c_rows[i] * ldc + j], want, tol)
                    << isa_name(isa) << " m" << m << " n" << n << " k" << k << " (" << i << "," << j << ")";
              }
            EXPECT_EQ(c[0], -9.0f);  // row 0 is not a target
          }
}

}  // namespace
}  // namespace moekit::cpu
