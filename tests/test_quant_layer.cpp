// Quantized experts (int8, int4, mxfp4): the kernels against references written from the
// definitions (quant_kernels.h, quant.h), and the layer against a double-precision evaluation on
// the dequantized weights with an elementwise error bound propagated through both GEMMs.
//
// Bounds, with u = 2⁻²⁴ and γ_n = n·u / (1 − n·u):
//   a dot of G groups (int32 sums exact, one fp32 product of scales per group, fp32 FMA per
//   group and a final horizontal sum): |dot̂ − dot| ≤ γ_{G+4} · Σ_c |x̃_c| · (|w̃_c| + 2·o_c)
//   (x̃, w̃ the values the codes stand for, so no quantization error enters: it is the same on
//   both sides). The vector paths sum (level + offset) · q and subtract offset · Σ q
//   afterwards, both in fp32: o_c = offset · |s_b| is the size of the offset in weight units
//   (int8 on VNNI: 128·|s_r|; int4: 8·|s_b|; mxfp4: 12 · 2^(e−128), the doubled levels' unit),
//   which both of those sums carry (the AVX2 int8 path has none: the bound is looser there).
// The layer adds what rounding h costs (half a step of its group or row, d/2, plus the product
// x·(127/amax) rounded, 2u|x|), the activation's fp32 evaluation, and how an error in the
// pre-activations moves silu(g)·u (|silu'| ≤ 1.1): see layer_bound().
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/quant_kernels.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/layer_file.h"
#include "moekit/safetensors.h"
#include "moekit/quant.h"

namespace moekit {
namespace {

constexpr double kU = 0x1p-24;
double gamma_n(double n) { return n * kU / (1.0 - n * kU); }

const DType kFormats[] = {DType::kInt8, DType::kInt4, DType::kMxfp4};

// The activation rounding by its definition (quant_kernels.h), in the same fp32 operations.
void reference_activation(DType f, const float* x, int64_t cols, std::vector<int8_t>& q, std::vector<float>& d) {
  const int64_t span = 32;  // every format (quant_kernels.h)
  q.resize(static_cast<size_t>(cols));
  d.resize(static_cast<size_t>(cols / span));
  for (int64_t b = 0; b < cols / span; ++b) {
    float amax = 0;
    for (int64_t i = 0; i < span; ++i) amax = std::max(amax, std::fabs(x[b * span + i]));
    d[static_cast<size_t>(b)] = amax / 127.0f;
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < span; ++i) q[static_cast<size_t>(b * span + i)] = static_cast<int8_t>(std::nearbyint(x[b * span + i] * inv));
  }
}

std::vector<double> dequantized_activation(DType f, const std::vector<int8_t>& q, const std::vector<float>& d) {
  const size_t span = 32;
  std::vector<double> out(q.size());
  for (size_t i = 0; i < q.size(); ++i) out[i] = double(d[i / span]) * q[i];
  return out;
}

struct QuantizedRows {
  std::vector<uint8_t> codes, scales;
  WeightView m;  // one expert, quantized (quant_kernels.h)
  std::vector<double> values;   // [rows, cols] what the codes stand for
  std::vector<double> offsets;  // [rows, cols] o_c of the file comment
  // |w̃_c| + 2·o_c: what an element contributes to the dots' rounding bound.
  double magnitude(size_t i) const { return std::fabs(values[i]) + 2 * offsets[i]; }
};

QuantizedRows quantize_matrix(DType f, const std::vector<float>& w, int64_t rows, int64_t cols) {
  QuantizedRows q;
  const int64_t cb = quantized_code_bytes(f, cols), sb = quantized_scale_bytes(f, cols);
  q.codes.resize(static_cast<size_t>(rows * cb));
  q.scales.resize(static_cast<size_t>(rows * sb));
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(f, w.data() + r * cols, cols, q.codes.data() + r * cb, q.scales.data() + r * sb, "w", r);
    dequantize_row(f, q.codes.data() + r * cb, q.scales.data() + r * sb, cols, row.data());
    q.values.insert(q.values.end(), row.begin(), row.end());
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = c / 32;
      double o = 0;
      if (f == DType::kInt8) {  // the VNNI path adds 128 to the int8 levels
        float sw;
        std::memcpy(&sw, q.scales.data() + r * sb, 4);
        o = 128.0 * std::fabs(double(sw));
      } else if (f == DType::kInt4) {
        uint16_t h;
        std::memcpy(&h, q.scales.data() + r * sb + 2 * g, 2);
        o = 8.0 * std::fabs(double(fp16_to_float(h)));
      } else if (f == DType::kMxfp4) {
        o = 12.0 * std::ldexp(1.0, int(q.scales[static_cast<size_t>(r * sb + g)]) - 128);
      }
      q.offsets.push_back(o);
    }
  }
  q.m.data = q.codes.data();
  q.m.dtype = f;
  q.m.rows = rows;
  q.m.cols = cols;
  q.m.scales = q.scales.data();
  return q;
}

std::vector<float> random_vector(size_t n, double stddev, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(gen));
  return v;
}

TEST(QuantKernel, ActivationRowsFollowTheirDefinitionOnEveryIsa) {
  for (const DType f : kFormats) {
    for (const int64_t cols : {32, 96, 2048}) {
      std::vector<float> x = random_vector(static_cast<size_t>(cols), 1.0, 7);
      for (int64_t i = 0; i < 32; ++i) x[static_cast<size_t>(i)] = 0.0f;  // an all-zero group
      x[static_cast<size_t>(cols - 1)] = 40.0f;                            // an outlier
      std::vector<int8_t> rq;
      std::vector<float> rd;
      reference_activation(f, x.data(), cols, rq, rd);
      for (const cpu::Isa isa : cpu::supported_isas()) {
        std::vector<int8_t> q(static_cast<size_t>(cols));
        std::vector<float> d(static_cast<size_t>(cpu::activation_scales_per_row(f, cols)));
        cpu::quantize_activation_row(isa, f, x.data(), cols, q.data(), d.data());
        ASSERT_EQ(d.size(), rd.size());
        EXPECT_EQ(0, std::memcmp(q.data(), rq.data(), q.size())) << dtype_name(f) << " " << cpu::isa_name(isa);
        EXPECT_EQ(0, std::memcmp(d.data(), rd.data(), 4 * d.size())) << dtype_name(f) << " " << cpu::isa_name(isa);
      }
    }
  }
}

TEST(QuantKernel, DotsMatchExactDotsOfTheCodedValuesWithinTheFp32Bound) {
  for (const DType f : kFormats) {
    for (const int64_t k : {32, 64, 288, 1024}) {
      const int64_t n = 7;
      const std::vector<float> w = random_vector(static_cast<size_t>(n * k), 1.0 / std::sqrt(double(k)), 11);
      const QuantizedRows qw = quantize_matrix(f, w, n, k);
      for (const int64_t m : {1, 2, 3, 4, 5, 9}) {
        std::vector<std::vector<int8_t>> aq(static_cast<size_t>(m));
        std::vector<std::vector<float>> ad(static_cast<size_t>(m));
        std::vector<const int8_t*> qp;
        std::vector<const float*> dp;
        for (int64_t i = 0; i < m; ++i) {
          const std::vector<float> x = random_vector(static_cast<size_t>(k), 1.0, static_cast<uint32_t>(100 + i));
          reference_activation(f, x.data(), k, aq[static_cast<size_t>(i)], ad[static_cast<size_t>(i)]);
          qp.push_back(aq[static_cast<size_t>(i)].data());
          dp.push_back(ad[static_cast<size_t>(i)].data());
        }
        const double g = gamma_n(double(k / 32) + 4);
        for (const cpu::Isa isa : cpu::supported_isas()) {
          std::vector<float> out(static_cast<size_t>(m * n), NAN);
          cpu::quant_dot(isa, qw.m, 0, n, qp.data(), dp.data(), m, out.data(), n);
          for (int64_t i = 0; i < m; ++i) {
            const std::vector<double> xv = dequantized_activation(f, aq[static_cast<size_t>(i)], ad[static_cast<size_t>(i)]);
            for (int64_t j = 0; j < n; ++j) {
              double exact = 0, mag = 0;
              for (int64_t c = 0; c < k; ++c) {
                exact += xv[static_cast<size_t>(c)] * qw.values[static_cast<size_t>(j * k + c)];
                mag += std::fabs(xv[static_cast<size_t>(c)]) * qw.magnitude(static_cast<size_t>(j * k + c));
              }
              EXPECT_LE(std::fabs(out[static_cast<size_t>(i * n + j)] - exact), g * mag)
                  << dtype_name(f) << " " << cpu::isa_name(isa) << " k=" << k << " m=" << m << " (" << i << ", " << j << ")";
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The layer.

MoeLayerConfig quant_config(DType f, bool bias) {
  MoeLayerConfig c;
  c.routing.num_experts = 6;
  c.routing.num_experts_per_tok = 2;
  c.d_model = 64;
  c.d_ff = 96;
  c.expert_bias = bias;
  c.dtype = f;
  return c;
}

void randomize(MoeTensors& t, const MoeLayerConfig& c, uint32_t seed) {
  auto fill = [&](std::vector<float>& v, double s, uint32_t k) {
    const std::vector<float> r = random_vector(v.size(), s, seed * 31 + k);
    std::copy(r.begin(), r.end(), v.begin());
  };
  fill(t.router_weight, 2.0 / std::sqrt(double(c.d_model)), 1);
  fill(t.gate_up, 1.0 / std::sqrt(double(c.d_model)), 2);
  fill(t.down, 1.0 / std::sqrt(double(c.d_ff)), 3);
  fill(t.gate_up_bias, 0.1, 4);
  fill(t.down_bias, 0.1, 5);
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// out_t in double on the dequantized weights with h unrounded, and a bound on how far the
// layer's fp32 output may lie from it (see the file comment).
void layer_reference(const MoeLayerConfig& c, const MoeTensors& t, const Matrix<float>& x, const RoutingPlan& plan,
                     std::vector<double>& ref, std::vector<double>& bound) {
  const DType f = c.dtype;
  const int64_t d = c.d_model, ff = c.d_ff, E = c.num_experts();
  std::vector<QuantizedRows> gu, dn;
  for (int64_t e = 0; e < E; ++e) {
    gu.push_back(quantize_matrix(f, std::vector<float>(t.gate_up.begin() + e * 2 * ff * d, t.gate_up.begin() + (e + 1) * 2 * ff * d), 2 * ff, d));
    dn.push_back(quantize_matrix(f, std::vector<float>(t.down.begin() + e * d * ff, t.down.begin() + (e + 1) * d * ff), d, ff));
  }
  const double g1 = gamma_n(double(d / 32) + 4);
  const double g2 = gamma_n(double(ff / 32) + 4);
  const int64_t T = x.rows;
  ref.assign(static_cast<size_t>(T * d), 0.0);
  bound.assign(static_cast<size_t>(T * d), 0.0);
  for (int64_t tok = 0; tok < T; ++tok) {
    std::vector<int8_t> q;
    std::vector<float> s;
    reference_activation(f, x.row(tok), d, q, s);
    const std::vector<double> xv = dequantized_activation(f, q, s);
    const int64_t k = plan.token_offsets[static_cast<size_t>(tok + 1)] - plan.token_offsets[static_cast<size_t>(tok)];
    for (int64_t si = plan.token_offsets[static_cast<size_t>(tok)]; si < plan.token_offsets[static_cast<size_t>(tok + 1)]; ++si) {
      if (!plan.token_kept[static_cast<size_t>(si)]) continue;
      const int64_t e = plan.token_experts[static_cast<size_t>(si)];
      const double w = plan.token_weights[static_cast<size_t>(si)];
      // Experts with many rows take the panel path (quant_kernels.h): the fp32 or bf16 GEMM on
      // the dequantized weights, activations not rounded to int8. Its bound: the GEMM's fp32
      // accumulation (γ_{k+2}) plus, for bf16 panels, the rounding of both operands to bf16
      // ((1 + 2⁻⁹)² − 1 < 2⁻⁸ + 2⁻¹⁷), as a relative error of Σ|a·w|.
      const bool panel = plan.expert_offsets[static_cast<size_t>(e + 1)] - plan.expert_offsets[static_cast<size_t>(e)] >=
                         cpu::kPanelRows;
      const double kBf16Pair = 0x1p-8 + 0x1p-17;
      std::vector<double> xs = xv;
      if (panel) xs.assign(x.row(tok), x.row(tok) + d);
      const double e1 = panel ? gamma_n(double(d) + 2) + kBf16Pair : g1;
      const double e2 = panel ? gamma_n(double(ff) + 2) + kBf16Pair : g2;
      // GEMM 1 and SwiGLU.
      std::vector<double> h(static_cast<size_t>(ff)), dh(static_cast<size_t>(ff));
      for (int64_t j = 0; j < ff; ++j) {
        double pre[2], err[2];
        for (int p = 0; p < 2; ++p) {
          const int64_t r = j + p * ff;
          double v = 0, mag = 0;
          for (int64_t cc = 0; cc < d; ++cc) {
            v += xs[static_cast<size_t>(cc)] * gu[static_cast<size_t>(e)].values[static_cast<size_t>(r * d + cc)];
            const size_t at = static_cast<size_t>(r * d + cc);
            mag += std::fabs(xs[static_cast<size_t>(cc)]) *
                   (panel ? std::fabs(gu[static_cast<size_t>(e)].values[at]) : gu[static_cast<size_t>(e)].magnitude(at));
          }
          const double b = c.expert_bias ? t.gate_up_bias[static_cast<size_t>(e * 2 * ff + r)] : 0.0;
          pre[p] = v + b;
          err[p] = e1 * mag + kU * (std::fabs(v) + std::fabs(b)) + 2 * kU * std::fabs(pre[p]);
        }
        const double sg = silu(pre[0]);
        h[static_cast<size_t>(j)] = sg * pre[1];
        // |Δ(silu(g)·u)| ≤ 1.1·Δg·(|u| + Δu) + (|silu(g)| + 1.1·Δg)·Δu, plus the fp32 evaluation
        // of silu(g)·u (exp within 2 ulp, 1 + e, the division and two products: 8u).
        dh[static_cast<size_t>(j)] = 1.1 * err[0] * (std::fabs(pre[1]) + err[1]) + (std::fabs(sg) + 1.1 * err[0]) * err[1] +
                                     8 * kU * std::fabs(h[static_cast<size_t>(j)]);
      }
      // h rounded: half a step of its span (the step from the largest |ĥ| the bound allows),
      // plus the rounding of x·(127/amax).
      const int64_t span = 32;
      std::vector<double> hr(static_cast<size_t>(ff));
      for (int64_t b0 = 0; b0 < ff; b0 += span) {
        double amax = 0;
        for (int64_t j = b0; j < b0 + span; ++j) amax = std::max(amax, std::fabs(h[static_cast<size_t>(j)]) + dh[static_cast<size_t>(j)]);
        const double step = panel ? 0.0 : amax / 127.0 * (1 + 2 * kU);  // the panel path keeps h
        for (int64_t j = b0; j < b0 + span; ++j)
          hr[static_cast<size_t>(j)] = dh[static_cast<size_t>(j)] + step / 2 + 4 * kU * (std::fabs(h[static_cast<size_t>(j)]) + dh[static_cast<size_t>(j)]);
      }
      for (int64_t i = 0; i < d; ++i) {
        double v = 0, prop = 0, mag = 0;
        for (int64_t j = 0; j < ff; ++j) {
          const double wv = dn[static_cast<size_t>(e)].values[static_cast<size_t>(i * ff + j)];
          v += wv * h[static_cast<size_t>(j)];
          prop += std::fabs(wv) * hr[static_cast<size_t>(j)];
          const size_t at = static_cast<size_t>(i * ff + j);
          mag += (panel ? std::fabs(wv) : dn[static_cast<size_t>(e)].magnitude(at)) *
                 (std::fabs(h[static_cast<size_t>(j)]) + hr[static_cast<size_t>(j)]);
        }
        const double b = c.expert_bias ? t.down_bias[static_cast<size_t>(e * d + i)] : 0.0;
        const double y = w * (v + b);
        ref[static_cast<size_t>(tok * d + i)] += y;
        // GEMM 2's own rounding, the bias and scale products, and the k-term token sum.
        bound[static_cast<size_t>(tok * d + i)] += std::fabs(w) * (prop + e2 * mag + 2 * kU * (std::fabs(v) + prop + std::fabs(b))) +
                                                   gamma_n(double(k)) * std::fabs(y) * 2;
      }
    }
  }
}

// The dots read a one-expert WeightView; one that is not quantized is refused, not misread.
TEST(QuantKernel, RejectsAWeightThatIsNotQuantized) {
  const std::vector<float> w(64, 1.0f);
  WeightView v;
  v.data = w.data();
  v.rows = 2;
  v.cols = 32;
  const std::vector<int8_t> q(32, 1);
  const std::vector<float> d(1, 1.0f);
  const int8_t* qp[1] = {q.data()};
  const float* dp[1] = {d.data()};
  float out[2];
  for (cpu::Isa isa : cpu::supported_isas()) {
    EXPECT_THROW(cpu::quant_dot(isa, v, 0, 2, qp, dp, 1, out, 2), InputError);
    EXPECT_THROW(cpu::dequantize_weight_row(isa, v, 0, out), InputError);
  }
}

TEST(QuantLayer, MatchesDoubleEvaluationOfTheCodedWeightsWithinThePropagatedBound) {
  for (const DType f : kFormats) {
    for (const bool bias : {false, true}) {
      const MoeLayerConfig c = quant_config(f, bias);
      MoeLayer layer(c, uint64_t{3});
      randomize(layer.parameters(), c, 5);
      layer.refresh_packed_weights();
      for (const int64_t tokens : {40, 240}) {  // ~13 rows per expert: integer dots; ~80: panels
      const Matrix<float> x = [&] {
        Matrix<float> m(tokens, c.d_model);
        const std::vector<float> v = random_vector(m.values.size(), 1.0, 9);
        std::copy(v.begin(), v.end(), m.values.begin());
        return m;
      }();
      const MoeForwardResult r = layer.forward(x.cview());
      std::vector<double> ref, bound;
      layer_reference(c, layer.parameters(), x, r.routing.plan, ref, bound);
      int64_t bad = 0;
      double worst = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        const double err = std::fabs(r.output.values[i] - ref[i]);
        worst = std::max(worst, err / bound[i]);
        if (err > bound[i]) ++bad;
      }
      EXPECT_EQ(bad, 0) << dtype_name(f) << " bias=" << bias << " tokens=" << tokens << " worst error/bound " << worst;
      EXPECT_GT(worst, 0.0) << "the bound was never approached at all: is the quantized path running?";
      RecordProperty(std::string("worst_error_over_bound_") + dtype_name(f) + "_" + std::to_string(tokens), std::to_string(worst));
      }
    }
  }
}

TEST(QuantLayer, BitwiseTheSameForAnyThreadCountAndForBorrowedCodes) {
  for (const DType f : kFormats) {
    MoeLayerConfig c = quant_config(f, true);
    c.routing.num_experts = 8;
    c.routing.num_experts_per_tok = 3;
    MoeLayer layer(c, uint64_t{4});
    randomize(layer.parameters(), c, 6);
    layer.refresh_packed_weights();
    Matrix<float> x(300, c.d_model);
    const std::vector<float> v = random_vector(x.values.size(), 1.0, 10);
    std::copy(v.begin(), v.end(), x.values.begin());
    const Matrix<float> one = layer.forward(x.cview()).output;
    for (const int threads : {2, 3}) {
      layer.set_num_threads(threads);
      const Matrix<float> many = layer.forward(x.cview()).output;
      EXPECT_EQ(0, std::memcmp(one.values.data(), many.values.data(), 4 * one.values.size())) << dtype_name(f) << " " << threads;
    }
    // The same codes handed to a layer as quantized views: read where they lie, same output.
    const MoeTensors& t = layer.parameters();
    const QuantizedRows gu = quantize_matrix(f, t.gate_up, c.num_experts() * c.gate_up_rows(), c.d_model);
    const QuantizedRows dn = quantize_matrix(f, t.down, c.num_experts() * c.d_model, c.d_ff);
    MoeParams p = moe_params_view(c, t);
    p.gate_up.dtype = p.down.dtype = f;
    p.gate_up.data = gu.codes.data();
    p.gate_up.scales = gu.scales.data();
    p.down.data = dn.codes.data();
    p.down.scales = dn.scales.data();
    MoeLayer borrowed(c, p);
    const Matrix<float> b = borrowed.forward(x.cview()).output;
    EXPECT_EQ(0, std::memcmp(one.values.data(), b.values.data(), 4 * one.values.size())) << dtype_name(f);
  }
}

TEST(QuantLayer, BadInputIsRejectedWithTheArgumentNamed) {
  MoeLayerConfig c = quant_config(DType::kInt4, false);
  c.d_model = 48;
  try {
    c.validate();
    ADD_FAILURE() << "d_model 48 accepted for int4";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("d_model"), std::string::npos) << e.what();
  }
  c = quant_config(DType::kInt8, false);
  c.d_ff = 100;
  EXPECT_THROW(c.validate(), ConfigError);

  c = quant_config(DType::kMxfp4, false);
  MoeLayer layer(c, uint64_t{1});
  Matrix<float> x(4, c.d_model);
  layer.set_training(true);
  try {
    layer.forward(x.cview());
    ADD_FAILURE() << "a training forward ran on quantized experts";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("inference"), std::string::npos) << e.what();
  }
  layer.set_training(false);
  for (int64_t e = 0; e < c.num_experts(); ++e) layer.parameters().gate_up[(e * c.gate_up_rows() + 5) * c.d_model + 3] = NAN;
  layer.refresh_packed_weights();
  for (float& v : x.values) v = 1.0f;
  try {
    layer.forward(x.cview());
    ADD_FAILURE() << "a NaN weight was quantized";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("gate_up[expert "), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("][5, 3]"), std::string::npos) << e.what();
  }

  // Quantized views of another format, or with a NaN scale.
  c = quant_config(DType::kInt4, false);
  MoeTensors t = make_moe_tensors<float>(c);
  randomize(t, c, 2);
  const QuantizedRows gu8 = quantize_matrix(DType::kInt8, t.gate_up, c.num_experts() * c.gate_up_rows(), c.d_model);
  MoeParams p = moe_params_view(c, t);
  p.gate_up.dtype = DType::kInt8;
  p.gate_up.data = gu8.codes.data();
  p.gate_up.scales = gu8.scales.data();
  EXPECT_THROW(MoeLayer(c, p), InputError);
  QuantizedRows gu4 = quantize_matrix(DType::kInt4, t.gate_up, c.num_experts() * c.gate_up_rows(), c.d_model);
  const uint16_t nan16 = 0x7e00;
  std::memcpy(gu4.scales.data() + 2 * 7, &nan16, 2);
  p.gate_up.dtype = DType::kInt4;
  p.gate_up.data = gu4.codes.data();
  p.gate_up.scales = gu4.scales.data();
  try {
    MoeLayer bad(c, p);
    ADD_FAILURE() << "a NaN scale was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("gate_up.scales"), std::string::npos) << e.what();
  }
}


// ---------------------------------------------------------------------------------------------
// Layer files.

TEST(LayerFile, EveryDtypeSavesAndLoadsBackToBitwiseTheSameOutputs) {
  for (const DType f : {DType::kF32, DType::kBF16, DType::kInt8, DType::kInt4, DType::kMxfp4}) {
    MoeLayerConfig c = quant_config(f, true);
    c.num_shared_experts = 1;
    c.shared_d_ff = 64;
    c.shared_expert_gate = true;
    c.router_bias = true;
    c.selection_bias = true;
    c.routing.scoring_func = ScoringFunc::kSigmoid;
    MoeLayer layer(c, uint64_t{8});
    randomize(layer.parameters(), c, 8);
    layer.refresh_packed_weights();
    Matrix<float> x(50, c.d_model);
    const std::vector<float> v = random_vector(x.values.size(), 1.0, 12);
    std::copy(v.begin(), v.end(), x.values.begin());
    const Matrix<float> y = layer.forward(x.cview()).output;
    const std::string path = ::testing::TempDir() + "/moekit_layer_" + dtype_name(f) + ".safetensors";
    save_layer_file(layer, path, {{"note", "kept"}});
    LayerFile file = LayerFile::open(path, 2);
    EXPECT_EQ(moe_layer_config_to_json(file.config()), moe_layer_config_to_json([&] {
                MoeLayerConfig k = c;
                k.num_threads = 2;
                return k;
              }()));
    EXPECT_EQ(file.metadata().at("note"), "kept");
    const Matrix<float> y2 = file.moe().forward(x.cview()).output;
    EXPECT_EQ(0, std::memcmp(y.values.data(), y2.values.data(), 4 * y.values.size())) << dtype_name(f);
    if (is_quantized(f)) {
      // The loaded layer reads the codes in the mapping: nothing was quantized again.
      EXPECT_EQ(file.moe().params().gate_up.dtype, f);
      // And a loaded layer saves the same bytes again.
      const std::string path2 = path + ".again";
      save_layer_file(file.moe(), path2);
      const SafetensorsFile a = SafetensorsFile::open(path), b = SafetensorsFile::open(path2);
      for (const char* name : {"gate_up.codes", "gate_up.scales", "down.scales", "shared_down.codes"}) {
        ASSERT_EQ(a.at(name).bytes, b.at(name).bytes) << name;
        EXPECT_EQ(0, std::memcmp(a.at(name).data, b.at(name).data, static_cast<size_t>(a.at(name).bytes))) << name;
      }
    }
  }
}

TEST(LayerFile, FaultsNameTheFileAndTheTensor) {
  const std::string dir = ::testing::TempDir();
  const std::vector<float> w(4 * 64);
  write_safetensors(dir + "/plain.safetensors", {{"router_weight", TensorDType::kF32, {4, 64}, w.data()}});
  try {
    LayerFile::open(dir + "/plain.safetensors");
    ADD_FAILURE() << "a file without the layer metadata was opened";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("a moekit layer file"), std::string::npos) << e.what();
  }
  MoeLayerConfig c = quant_config(DType::kInt4, false);
  MoeLayer layer(c, uint64_t{1});
  const std::string path = dir + "/int4.safetensors";
  save_layer_file(layer, path);
  // The same file with down.codes one row short.
  const SafetensorsFile good = SafetensorsFile::open(path);
  std::vector<TensorToWrite> tensors;
  for (const TensorView& t : good.tensors()) {
    std::vector<int64_t> shape = t.shape;
    if (t.name == "down.codes") shape[1] -= 1;
    tensors.push_back({t.name, t.dtype, shape, t.data});
  }
  write_safetensors(dir + "/short.safetensors", tensors, good.metadata());
  try {
    LayerFile::open(dir + "/short.safetensors");
    ADD_FAILURE() << "a short tensor was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("down.codes shape: expected [6, 64, 48], got [6, 63, 48]"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moekit
