// The layer's structure: weight views with strides read in place, the backend seam, the one
// process-wide thread pool, and results that overflow on finite input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/thread_pool.h"
#include "moekit/error.h"
#include "moekit/layer.h"

namespace moekit {
namespace {

MoeLayerConfig small_config(int64_t num_experts, int64_t top_k, int64_t d_model, int64_t d_ff) {
  MoeLayerConfig c;
  c.routing.num_experts = num_experts;
  c.routing.num_experts_per_tok = top_k;
  c.d_model = d_model;
  c.d_ff = d_ff;
  return c;
}

Matrix<float> normal_matrix(int64_t rows, int64_t cols, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  Matrix<float> m(rows, cols);
  for (float& v : m.values) v = dist(gen);
  return m;
}

// The same weights in other layouts: the down projection stored transposed per expert
// ([experts, d_ff, d_model], as gpt-oss stores it) and the gate/up stack with a gap between
// experts (per-expert tensors that do not touch).
struct OtherLayouts {
  std::vector<float> down_t;   // [experts, d_ff, d_model]
  std::vector<float> gate_up;  // experts at a stride of rows·cols + kGap
  std::vector<float> gate_up_interleaved;  // gpt-oss: [experts, d_model, 2·d_ff], gate 2j, up 2j+1
  static constexpr int64_t kGap = 24;
};

OtherLayouts relayout(const MoeLayerConfig& c, const MoeTensors& t) {
  const int64_t num_experts = c.num_experts(), d = c.d_model, f = c.d_ff, gu = c.gate_up_rows();
  OtherLayouts o;
  o.down_t.resize(t.down.size());
  for (int64_t e = 0; e < num_experts; ++e)
    for (int64_t r = 0; r < d; ++r)
      for (int64_t j = 0; j < f; ++j) o.down_t[(e * f + j) * d + r] = t.down[(e * d + r) * f + j];
  o.gate_up.assign(static_cast<size_t>(num_experts * (gu * d + OtherLayouts::kGap)), NAN);
  for (int64_t e = 0; e < num_experts; ++e)
    std::copy_n(t.gate_up.begin() + e * gu * d, gu * d, o.gate_up.begin() + e * (gu * d + OtherLayouts::kGap));
  o.gate_up_interleaved.resize(t.gate_up.size());
  for (int64_t e = 0; e < num_experts; ++e)
    for (int64_t j = 0; j < f; ++j)
      for (int64_t k = 0; k < d; ++k) {
        o.gate_up_interleaved[(e * d + k) * 2 * f + 2 * j] = t.gate_up[(e * gu + j) * d + k];
        o.gate_up_interleaved[(e * d + k) * 2 * f + 2 * j + 1] = t.gate_up[(e * gu + f + j) * d + k];
      }
  return o;
}

MoeParams strided_view(const MoeLayerConfig& c, const MoeTensors& t, const OtherLayouts& o) {
  MoeParams p = moe_params_view(c, t);
  const int64_t d = c.d_model, f = c.d_ff, gu = c.gate_up_rows();
  p.down.data = o.down_t.data();
  p.down.expert_stride = f * d;
  p.down.row_stride = 1;  // element (e, r, j) of W_down [d_model, d_ff] at e·f·d + j·d + r
  p.down.col_stride = d;
  p.gate_up.data = o.gate_up.data();
  p.gate_up.expert_stride = gu * d + OtherLayouts::kGap;
  return p;
}

// gpt-oss's layout: the gate rows at the even columns of [d_model, 2·d_ff], the up rows at the
// odd ones (a second part one element further), and the transposed down projection.
MoeParams interleaved_view(const MoeLayerConfig& c, const MoeTensors& t, const OtherLayouts& o) {
  MoeParams p = strided_view(c, t, o);
  const int64_t d = c.d_model, f = c.d_ff;
  p.gate_up.data = o.gate_up_interleaved.data();
  p.gate_up.up_data = o.gate_up_interleaved.data() + 1;
  p.gate_up.expert_stride = d * 2 * f;
  p.gate_up.row_stride = 2;
  p.gate_up.col_stride = 2 * f;
  return p;
}

// Weight views with strides give bitwise the output, d_hidden_states and every gradient of the
// contiguous layout: packing reads through the strides (with enough rows per expert that both
// layers pack, so the same kernels run).
TEST(LayerStructure, StridedWeightViewsAreReadInPlace) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    MoeLayerConfig c = small_config(4, 2, 32, 24);
    c.dtype = dtype;
    c.expert_bias = true;
    MoeLayer owned(c, uint64_t{7});
    const MoeTensors& t = owned.parameters();
    const OtherLayouts o = relayout(c, t);
    MoeLayer contiguous(c, moe_params_view(c, t));
    for (int layout = 0; layout < 2; ++layout) {
    SCOPED_TRACE(layout == 0 ? "strided" : "interleaved gate/up");
    MoeLayer strided(c, layout == 0 ? strided_view(c, t, o) : interleaved_view(c, t, o));
    const Matrix<float> x = normal_matrix(64, 32, 8);
    EXPECT_TRUE(contiguous.forward(x.cview()).output.values == strided.forward(x.cview()).output.values)
        << dtype_name(dtype);

    contiguous.set_training(true);
    strided.set_training(true);
    const Matrix<float> d_out = normal_matrix(64, 32, 9);
    const auto a = contiguous.forward(x.cview());
    const auto b = strided.forward(x.cview());
    for (int64_t e = 0; e < c.num_experts(); ++e) ASSERT_GT(a.routing.plan.tokens_for_expert(e), 4);
    EXPECT_TRUE(a.output.values == b.output.values) << dtype_name(dtype);
    EXPECT_TRUE(contiguous.backward(d_out.cview()).values == strided.backward(d_out.cview()).values)
        << dtype_name(dtype);
    const MoeTensors& ga = contiguous.grads();
    const MoeTensors& gb = strided.grads();
    EXPECT_TRUE(ga.gate_up == gb.gate_up);
    EXPECT_TRUE(ga.down == gb.down);
    EXPECT_TRUE(ga.down_bias == gb.down_bias);
    EXPECT_TRUE(ga.router_weight == gb.router_weight);
    contiguous.set_training(false);
    contiguous.zero_grad();
    }
  }
}

// A B in two parts (columns or rows from split_at on elsewhere) packs to the same bytes as the
// same logical matrix in one part, on every kernel path, fp32 and bf16, plain and paired.
TEST(LayerStructure, TwoPartOperandsPackAsOnePart) {
  const int64_t k = 37, n = 70;  // n/2 = 35 gate columns and 35 up columns
  const Matrix<float> whole = normal_matrix(k, n, 11);  // logical B [k, n]
  // Columns [35, 70) elsewhere, and rows [20, 37) elsewhere.
  std::vector<float> left(k * 35), right(k * 35), top(20 * n), bottom(17 * n);
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = 0; c < n; ++c) {
      (c < 35 ? left[r * 35 + c] : right[r * 35 + c - 35]) = whole(r, c);
      (r < 20 ? top[r * n + c] : bottom[(r - 20) * n + c]) = whole(r, c);
    }
  for (cpu::Isa isa : cpu::supported_isas())
    for (DType packed : {DType::kF32, DType::kBF16})
      for (bool paired : {false, true}) {
        const auto one = cpu::PackedWeight::pack_operand({whole.values.data(), DType::kF32, n, 1}, k, n, packed,
                                                         isa, paired);
        cpu::Operand cols{left.data(), DType::kF32, 35, 1};
        cols.split_data = right.data();
        cols.split_at = 35;
        cpu::Operand rows{top.data(), DType::kF32, n, 1};
        rows.split_data = bottom.data();
        rows.split_at = 20;
        rows.split_rows = true;
        for (const cpu::Operand& b : {cols, rows}) {
          const auto two = cpu::PackedWeight::pack_operand(b, k, n, packed, isa, paired);
          ASSERT_EQ(one.bytes(), two.bytes());
          EXPECT_EQ(std::memcmp(one.data(), two.data(), one.bytes()), 0)
              << cpu::isa_name(isa) << (packed == DType::kBF16 ? " bf16" : " fp32") << (paired ? " paired" : "")
              << (b.split_rows ? " rows" : " columns");
        }
      }
  // gemm() reads B in place and does not take a second part.
  cpu::GemmProblem q;
  q.m = 1, q.n = n, q.k = k;
  std::vector<float> a(k, 1.0f), c(n);
  q.a = {a.data(), DType::kF32, k, 1};
  q.b = {left.data(), DType::kF32, 35, 1};
  q.b.split_data = right.data();
  q.b.split_at = 35;
  q.c = c.data();
  q.ldc = n;
  EXPECT_THROW(cpu::gemm(q, cpu::Isa::kScalar, 0, 1, 0, n), InputError);
}

TEST(LayerStructure, NegativeStridesAreRejected) {
  MoeLayerConfig c = small_config(4, 2, 8, 8);
  MoeLayer owned(c, uint64_t{1});
  MoeParams p = moe_params_view(c, owned.parameters());
  p.down.row_stride = -1;
  try {
    MoeLayer bad(c, p);
    FAIL() << "nothing thrown";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("params.down strides"), std::string::npos) << e.what();
  }
}

// A backend and weight format this build has no implementation for is a ConfigError naming
// both, and what the build does have, when the layer is built.
TEST(LayerStructure, UnsupportedBackendIsAClearError) {
  MoeLayerConfig c = small_config(4, 2, 8, 8);
  c.backend = Backend::kCuda;
  c.dtype = DType::kBF16;
  try {
    MoeLayer layer(c, uint64_t{1});
    FAIL() << "nothing thrown";
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("got cuda/bf16"), std::string::npos) << m;
    EXPECT_NE(m.find("cpu/fp32"), std::string::npos) << m;
    EXPECT_NE(m.find("cpu/bf16"), std::string::npos) << m;
  }
}

// Layers and the routing core share one pool: running two layers and a router with N threads
// leaves N − 1 workers in the process, not a pool per layer or per thread count.
TEST(LayerStructure, OneProcessWidePoolSizedByTheCaller) {
  const int threads = cpu::thread_pool().num_workers() + 3;  // larger than anything before
  MoeLayerConfig c = small_config(4, 2, 16, 16);
  c.num_threads = threads;
  MoeLayer first(c, uint64_t{1}), second(c, uint64_t{2});
  const Matrix<float> x = normal_matrix(300, 16, 3);
  const auto out1 = first.forward(x.cview());
  second.forward(x.cview());
  RoutingOptions options;
  options.num_threads = threads;
  route_logits(c.routing, normal_matrix(300, 4, 4).cview(), options);
  EXPECT_EQ(cpu::thread_pool().num_workers(), threads - 1);
  // Fewer threads per call use part of the pool and give bitwise the same result.
  c.num_threads = 1;
  MoeLayer serial(c, uint64_t{1});
  EXPECT_TRUE(serial.forward(x.cview()).output.values == out1.output.values);
  EXPECT_EQ(cpu::thread_pool().num_workers(), threads - 1);
}

// Finite hidden states with expert weights whose products overflow: the forward names the
// output element and where it arose instead of returning Inf or NaN.
TEST(LayerStructure, OverflowingExpertsAreAnError) {
  MoeLayerConfig c = small_config(2, 1, 4, 4);
  MoeLayer layer(c, uint64_t{1});
  for (float& w : layer.parameters().gate_up) w = 3e37f;
  layer.refresh_packed_weights();
  const Matrix<float> x = normal_matrix(3, 4, 5);
  try {
    layer.forward(x.cview());
    FAIL() << "nothing thrown";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("output["), std::string::npos) << m;
    EXPECT_NE(m.find("expected a finite number"), std::string::npos) << m;
    EXPECT_NE(m.find("overflowed"), std::string::npos) << m;
  }
}

// DeepSeek-V3's selection bias is a parameter: an owned layer initialises it from the config's
// values and routes with it; a borrowed tensor gives the same plan and output; the
// aux-loss-free update moves the owned tensor by rate · sign(mean load − load_e) with the
// config's expert_bias_update_rate.
TEST(LayerStructure, SelectionBiasIsAParameter) {
  MoeLayerConfig c = small_config(8, 2, 16, 16);
  c.routing.scoring_func = ScoringFunc::kSigmoid;
  c.routing.e_score_correction_bias = {0.0, 0.5, 0.0, -0.5, 0.25, 0.0, 0.0, 1.0};
  c.routing.expert_bias_update_rate = 0.125;
  MoeLayer owned(c, uint64_t{3});
  ASSERT_EQ(owned.parameters().selection_bias.size(), 8u);
  EXPECT_EQ(owned.parameters().selection_bias[7], 1.0f);
  const Matrix<float> x = normal_matrix(40, 16, 4);
  const auto a = owned.forward(x.cview());

  // Without the bias the plan differs (the bias is used), and a borrowed tensor gives a's result.
  MoeLayerConfig unbiased = c;
  unbiased.routing.e_score_correction_bias.clear();
  MoeLayer plain(unbiased, uint64_t{3});
  EXPECT_FALSE(plain.forward(x.cview()).routing.plan.token_experts == a.routing.plan.token_experts);
  MoeLayerConfig borrowing = unbiased;
  borrowing.selection_bias = true;
  const std::vector<float> bias(owned.parameters().selection_bias);
  MoeParams p = moe_params_view(borrowing, owned.parameters());
  p.selection_bias = bias;
  MoeLayer borrowed(borrowing, p);
  const auto b = borrowed.forward(x.cview());
  EXPECT_TRUE(a.routing.plan.token_experts == b.routing.plan.token_experts);
  EXPECT_TRUE(a.output.values == b.output.values);

  // A borrowing layer takes the bias as a parameter only: values in its config contradict it.
  EXPECT_THROW(MoeLayer(c, p), ConfigError);
  p.selection_bias = {};
  EXPECT_THROW(MoeLayer(borrowing, p), InputError);

  // Aux-loss-free update: mean load 40·2/8 = 10.
  const std::vector<int64_t> load = {10, 30, 0, 10, 5, 5, 10, 10};
  owned.update_selection_bias(load);
  const std::vector<float>& updated = owned.parameters().selection_bias;
  EXPECT_EQ(updated[0], 0.0f);      // at the mean: sign 0
  EXPECT_EQ(updated[1], 0.375f);    // overloaded: − rate
  EXPECT_EQ(updated[2], 0.125f);    // underloaded: + rate
  EXPECT_EQ(updated[4], 0.375f);
  EXPECT_THROW(plain.update_selection_bias(load), std::logic_error);
}

}  // namespace
}  // namespace moekit
