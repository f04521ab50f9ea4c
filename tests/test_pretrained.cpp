// MoE layers loaded from checkpoints that transformers itself wrote (tests/fixtures/models/,
// tools/fixtures/gen_models.py), run on the hidden states its blocks ran on, compared with the
// outputs, router logits and top-k choices those blocks produced; then the loader's faults.
//
// Tolerances. Both sides compute in fp32 (orders differ), so an output element differs by at
// most twice the rounding bound of its longest chain of accumulations, γ_n · Σ|terms| with
// γ_n = n·u / (1 − n·u), u = 2^−24 and n = d_model (gate/up dot products) + d_ff (down) +
// top_k (combine) + 4 (activation, weight, scaling, shared gate). The fixtures are random
// with no systematic cancellation, so Σ|terms| is taken as the output's largest magnitude:
// tol = 2 · γ_n · max|y|. In bf16 every GEMM operand is rounded to 8 bits of mantissa (relative
// error ≤ u_b = 2^−8 each): two operands per product in each of the two GEMMs, with the
// activation's slope (≤ 1.1 for SiLU) carrying the first GEMM's error through, give ≤ 2·u_b ·
// 1.1 + 2·u_b + 2·u_b ≈ 6·u_b relative: tol = 6 · u_b · max|y|.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/pretrained.h"
#include "moekit/safetensors.h"

namespace moekit {
namespace {

const std::string kModels = std::string(MOEKIT_FIXTURE_DIR) + "/models";

std::vector<float> floats_of(const TensorView& t) {
  EXPECT_EQ(t.dtype, TensorDType::kF32) << t.name;
  std::vector<float> v(static_cast<size_t>(t.num_elements()));
  std::memcpy(v.data(), t.data, v.size() * 4);
  return v;
}

std::vector<int64_t> ints_of(const TensorView& t) {
  EXPECT_EQ(t.dtype, TensorDType::kI64) << t.name;
  std::vector<int64_t> v(static_cast<size_t>(t.num_elements()));
  std::memcpy(v.data(), t.data, v.size() * 8);
  return v;
}

// The layer names of moe_io.safetensors ("0", "decoder.1", ...): prefixes of "<layer>.output".
std::vector<std::string> fixture_layers(const SafetensorsFile& io) {
  std::set<std::string> names;
  for (const TensorView& t : io.tensors()) {
    const std::string suffix = ".output";
    if (t.name.size() > suffix.size() && t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      names.insert(t.name.substr(0, t.name.size() - suffix.size()));
    }
  }
  return {names.begin(), names.end()};
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(double(x)));
  return m;
}

double gamma_fp32(int64_t n) {
  const double u = std::ldexp(1.0, -24);
  return double(n) * u / (1 - double(n) * u);
}

struct FamilyRun {
  std::string family;
  DType dtype;
};

class PretrainedConformance : public ::testing::TestWithParam<FamilyRun> {};

TEST_P(PretrainedConformance, MatchesTheBlocksTransformersRan) {
  const FamilyRun run = GetParam();
  const std::string dir = kModels + "/" + run.family;
  const SafetensorsFile io = SafetensorsFile::open(dir + "/moe_io.safetensors");
  const std::vector<std::string> layers = fixture_layers(io);
  ASSERT_FALSE(layers.empty());
  auto checkpoint = std::make_shared<const Checkpoint>(Checkpoint::open(dir));
  for (const std::string& name : layers) {
    SCOPED_TRACE(run.family + " layer " + name);
    PretrainedOptions options;
    options.dtype = run.dtype;
    PretrainedLayer layer = PretrainedLayer::load(checkpoint, name, options);
    const MoeLayerConfig& c = layer.config();
    const TensorView& hs = io.at(name + ".hidden_states");
    ASSERT_EQ(hs.shape.size(), 3u);
    const std::vector<float> x = floats_of(hs);
    const int64_t tokens = hs.shape[0] * hs.shape[1];
    RoutingOptions routing;
    routing.sequence_length = hs.shape[1];  // each batch row a sequence, as the block saw it
    const MoeForwardResult r = layer.moe().forward(ConstMatrixView<float>(x.data(), tokens, c.d_model), routing);

    const std::vector<float> expected = floats_of(io.at(name + ".output"));
    const double scale = max_abs(expected);
    const int64_t k = c.routing.num_experts_per_tok;
    const double tol = run.dtype == DType::kF32 ? 2 * gamma_fp32(c.d_model + c.d_ff + k + 4) * scale
                                                : 6 * std::ldexp(1.0, -8) * scale;
    ASSERT_EQ(r.output.values.size(), expected.size());
    double worst = 0;
    for (size_t i = 0; i < expected.size(); ++i) worst = std::max(worst, std::fabs(double(r.output.values[i]) - expected[i]));
    EXPECT_LE(worst, tol) << "largest |Δoutput| (output scale " << scale << ")";

    // Router logits: one fp32 dot product of length d_model per element (the router runs in
    // fp32 whatever the experts' dtype).
    const std::vector<float> logits = floats_of(io.at(name + ".router_logits"));
    const std::vector<float>& ours = r.routing.saved.clean_logits.values;
    ASSERT_EQ(ours.size(), logits.size());
    const double logit_tol = 2 * gamma_fp32(c.d_model + 1) * max_abs(logits);
    for (size_t i = 0; i < logits.size(); ++i) ASSERT_NEAR(ours[i], logits[i], logit_tol) << "router_logits " << i;

    // Top-k per token as an expert → weight map (DeepSeek's block takes an unsorted topk, so the
    // order is not part of what it computes); weights of kept selections only (a dropped one has
    // weight 0 in the plan, Switch stores its router probability).
    const std::vector<int64_t> indices = ints_of(io.at(name + ".topk_indices"));
    const std::vector<float> weights = floats_of(io.at(name + ".topk_weights"));
    const TensorView* kept = io.find(name + ".kept");
    const RoutingPlan& plan = r.routing.plan;
    int64_t dropped = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      ASSERT_EQ(plan.token_offsets[t + 1] - plan.token_offsets[t], k) << "token " << t;
      std::map<int64_t, std::pair<float, bool>> ours_by_expert, theirs_by_expert;
      for (int64_t j = 0; j < k; ++j) {
        const size_t s = static_cast<size_t>(plan.token_offsets[t] + j), at = static_cast<size_t>(t * k + j);
        ours_by_expert[plan.token_experts[s]] = {plan.token_weights[s], plan.token_kept[s] != 0};
        theirs_by_expert[indices[at]] = {weights[at], kept == nullptr || static_cast<const uint8_t*>(kept->data)[at] != 0};
      }
      ASSERT_EQ(ours_by_expert.size(), theirs_by_expert.size()) << "token " << t;
      for (const auto& [expert, theirs] : theirs_by_expert) {
        ASSERT_TRUE(ours_by_expert.count(expert)) << "token " << t << ": transformers chose expert " << expert;
        const auto [w, was_kept] = ours_by_expert[expert];
        ASSERT_EQ(was_kept, theirs.second) << "token " << t << " expert " << expert;
        if (was_kept) {
          EXPECT_NEAR(w, theirs.first, 4 * gamma_fp32(c.num_experts() + 4) * std::max(1.0f, theirs.first))
              << "token " << t << " expert " << expert;
        } else {
          ++dropped;
        }
      }
    }
    if (kept != nullptr) EXPECT_GT(dropped, 0) << "the Switch fixture is meant to drop tokens";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Families, PretrainedConformance,
    ::testing::Values(FamilyRun{"mixtral", DType::kF32}, FamilyRun{"qwen2_moe", DType::kF32}, FamilyRun{"qwen3_moe", DType::kF32},
                      FamilyRun{"olmoe", DType::kF32}, FamilyRun{"deepseek_v3", DType::kF32}, FamilyRun{"gpt_oss", DType::kF32},
                      FamilyRun{"switch_transformers", DType::kF32}, FamilyRun{"deepseek_v3_fp8", DType::kF32},
                      FamilyRun{"gpt_oss_mxfp4", DType::kF32}, FamilyRun{"mixtral", DType::kBF16}, FamilyRun{"qwen2_moe", DType::kBF16},
                      FamilyRun{"qwen3_moe", DType::kBF16}, FamilyRun{"olmoe", DType::kBF16}, FamilyRun{"deepseek_v3", DType::kBF16},
                      FamilyRun{"gpt_oss", DType::kBF16}, FamilyRun{"switch_transformers", DType::kBF16},
                      FamilyRun{"deepseek_v3_fp8", DType::kBF16}, FamilyRun{"gpt_oss_mxfp4", DType::kBF16}),
    [](const ::testing::TestParamInfo<FamilyRun>& info) {
      return info.param.family + (info.param.dtype == DType::kF32 ? "_fp32" : "_bf16");
    });

const LoadedParameter& source_of(const PretrainedLayer& l, const std::string& parameter) {
  for (const LoadedParameter& s : l.sources()) {
    if (s.parameter == parameter) return s;
  }
  throw std::runtime_error("no source for " + parameter);
}

// Inside the file's mapping: the layer reads the checkpoint where it lies.
bool inside(const Checkpoint& c, const std::string& tensor, const void* p) {
  const TensorView& t = c.at(tensor);
  const auto* b = static_cast<const uint8_t*>(t.data);
  return static_cast<const uint8_t*>(p) >= b && static_cast<const uint8_t*>(p) < b + t.bytes;
}

TEST(Pretrained, BorrowsStoredWeightsAndConvertsOnlyWhatItMust) {
  {
    // BF16 per-expert tensors: borrowed, one pointer per expert, read as bf16.
    auto c = std::make_shared<const Checkpoint>(Checkpoint::open(kModels + "/qwen3_moe"));
    const PretrainedLayer l = PretrainedLayer::load(c, "0");
    EXPECT_EQ(l.params().gate_up.dtype, DType::kBF16);
    ASSERT_EQ(l.params().gate_up.expert_data.size(), size_t(l.config().num_experts()));
    EXPECT_TRUE(inside(*c, "model.layers.0.mlp.experts.3.gate_proj.weight", l.params().gate_up.expert_data[3]));
    EXPECT_TRUE(inside(*c, "model.layers.0.mlp.experts.3.up_proj.weight", l.params().gate_up.expert_up_data[3]));
    EXPECT_EQ(source_of(l, "gate_up").how, "borrowed (one pointer per expert)");
    EXPECT_EQ(source_of(l, "router_weight").how, "converted BF16 → fp32");
  }
  {
    // gpt-oss's interleaved [E, d, 2·d_ff] stack: a strided view, up half one element on.
    auto c = std::make_shared<const Checkpoint>(Checkpoint::open(kModels + "/gpt_oss"));
    const PretrainedLayer l = PretrainedLayer::load(c, "1");
    const WeightView& w = l.params().gate_up;
    EXPECT_TRUE(inside(*c, "model.layers.1.mlp.experts.gate_up_proj", w.data));
    EXPECT_EQ(static_cast<const float*>(w.up_data) - static_cast<const float*>(w.data), 1);
    EXPECT_EQ(w.row_stride, 2);
    EXPECT_EQ(w.col_stride, 2 * l.config().d_ff);
    EXPECT_EQ(l.params().down.col_stride, l.config().d_model);
    EXPECT_EQ(source_of(l, "router_weight").how, "borrowed");
  }
  {
    const PretrainedLayer l = PretrainedLayer::load(kModels + "/deepseek_v3_fp8", "1");
    EXPECT_NE(source_of(l, "gate_up").how.find("dequantized F8_E4M3"), std::string::npos);
    EXPECT_NE(source_of(l, "shared_down").how.find("dequantized F8_E4M3"), std::string::npos);
    const PretrainedLayer g = PretrainedLayer::load(kModels + "/gpt_oss_mxfp4", "0");
    EXPECT_EQ(source_of(g, "down").how, "dequantized MXFP4 → fp32");
    // A bf16 layer keeps what it converts in bf16: the values its packing would round to anyway.
    PretrainedOptions bf16;
    bf16.dtype = DType::kBF16;
    const PretrainedLayer h = PretrainedLayer::load(kModels + "/deepseek_v3_fp8", "1", bf16);
    EXPECT_EQ(h.params().gate_up.dtype, DType::kBF16);
    EXPECT_NE(source_of(h, "gate_up").how.find("→ bf16"), std::string::npos);
  }
}

TEST(Pretrained, Bf16ConversionsGiveWhatPackingFp32ValuesGives) {
  // FP8 and MXFP4 weights dequantized straight to bf16 (half the memory) against the same
  // values dequantized to fp32 and rounded by the bf16 layer's packing: bitwise equal outputs.
  for (const char* family : {"deepseek_v3_fp8", "gpt_oss_mxfp4"}) {
    SCOPED_TRACE(family);
    PretrainedOptions bf16;
    bf16.dtype = DType::kBF16;
    PretrainedLayer direct = PretrainedLayer::load(kModels + "/" + family, "1", bf16);
    const PretrainedLayer fp32 = PretrainedLayer::load(kModels + "/" + family, "1");
    MoeLayerConfig c = fp32.config();
    c.dtype = DType::kBF16;
    const MoeTensors values = moe_tensors_from_params(fp32.config(), fp32.params());
    MoeLayer packed(c, moe_params_view(c, values));
    std::vector<float> x(7 * static_cast<size_t>(c.d_model));
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.37f * float(i));
    const ConstMatrixView<float> view(x.data(), 7, c.d_model);
    EXPECT_EQ(direct.moe().forward(view).output.values, packed.forward(view).output.values);
  }
}

std::string expect_input_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

TEST(Pretrained, NamesTheLayerWhenItIsDenseOrAbsent) {
  const std::string dense = expect_input_error([] { PretrainedLayer::load(kModels + "/qwen2_moe", "1"); });
  EXPECT_NE(dense.find("layer 1, dense (in mlp_only_layers)"), std::string::npos) << dense;
  const std::string range = expect_input_error([] { PretrainedLayer::load(kModels + "/mixtral", "2"); });
  EXPECT_NE(range.find("layer: expected a layer index 0..1, got \"2\""), std::string::npos) << range;
  const std::string sw = expect_input_error([] { PretrainedLayer::load(kModels + "/switch_transformers", "decoder.0"); });
  EXPECT_NE(sw.find("decoder_sparse_step"), std::string::npos) << sw;
  const std::string bad = expect_input_error([] { PretrainedLayer::load(kModels + "/switch_transformers", "decoder.x"); });
  EXPECT_NE(bad.find("\"decoder.N\""), std::string::npos) << bad;
  // "encoder.1" is the same block as "1".
  EXPECT_EQ(PretrainedLayer::load(kModels + "/switch_transformers", "encoder.1").layer().name, "1");
}

// A copy of a fixture checkpoint with its tensors changed by `edit` (name → tensor; erase to drop).
std::string edited_copy(const std::string& family, const std::string& name,
                        const std::function<void(std::map<std::string, TensorToWrite>&, std::vector<std::vector<uint8_t>>&)>& edit,
                        const std::string& config_edit_from = "", const std::string& config_edit_to = "") {
  const std::string src = kModels + "/" + family;
  const std::string dir = std::string(MOEKIT_BINARY_DIR) + "/pretrained_test_" + name;
  mkdir(dir.c_str(), 0755);
  const SafetensorsFile f = SafetensorsFile::open(src + "/model.safetensors");
  std::map<std::string, TensorToWrite> tensors;
  for (const TensorView& t : f.tensors()) tensors[t.name] = {t.name, t.dtype, t.shape, t.data};
  std::vector<std::vector<uint8_t>> storage;
  edit(tensors, storage);
  std::vector<TensorToWrite> list;
  for (auto& [n, t] : tensors) list.push_back(t);
  write_safetensors(dir + "/model.safetensors", list);
  std::ifstream in(src + "/config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!config_edit_from.empty()) {
    const size_t at = config.find(config_edit_from);
    EXPECT_NE(at, std::string::npos) << config_edit_from;
    config.replace(at, config_edit_from.size(), config_edit_to);
  }
  std::ofstream(dir + "/config.json") << config;
  return dir;
}

TEST(Pretrained, NamesTheDirectoryAndTensorOfEveryFault) {
  const std::string e3 = "model.layers.0.mlp.experts.3.up_proj.weight";
  const std::string missing = edited_copy("olmoe", "missing", [&](auto& t, auto&) { t.erase(e3); });
  std::string what = expect_input_error([&] { PretrainedLayer::load(missing, "0"); });
  EXPECT_NE(what.find(missing + ": tensor " + e3 + ": expected present"), std::string::npos) << what;

  const std::string shaped = edited_copy("olmoe", "shape", [&](auto& t, auto&) { t[e3].shape = {32, 16}; });
  what = expect_input_error([&] { PretrainedLayer::load(shaped, "0"); });
  EXPECT_NE(what.find("tensor " + e3 + " shape: expected [16, 32], got [32, 16]"), std::string::npos) << what;

  const std::string typed = edited_copy("olmoe", "dtype", [&](auto& t, auto& storage) {
    storage.emplace_back(16 * 32 * 4, 0);
    t[e3] = {e3, TensorDType::kI32, {16, 32}, storage.back().data()};
  });
  what = expect_input_error([&] { PretrainedLayer::load(typed, "0"); });
  EXPECT_NE(what.find("tensor " + e3 + " dtype: expected F32, BF16 or F16, got I32"), std::string::npos) << what;

  const std::string nan = edited_copy("olmoe", "nan", [&](auto& t, auto& storage) {
    const TensorToWrite& old = t[e3];
    storage.emplace_back(static_cast<const uint8_t*>(old.data), static_cast<const uint8_t*>(old.data) + 16 * 32 * 4);
    const float inf = INFINITY;
    std::memcpy(storage.back().data() + 4 * 37, &inf, 4);
    t[e3].data = storage.back().data();
  });
  what = expect_input_error([&] { PretrainedLayer::load(nan, "0"); });
  EXPECT_NE(what.find("tensor " + e3 + " element 37: expected a finite number, got inf"), std::string::npos) << what;

  const std::string unknown = edited_copy("olmoe", "type", [](auto&, auto&) {}, "\"model_type\": \"olmoe\"",
                                          "\"model_type\": \"olmo9\"");
  what = expect_input_error([&] { PretrainedLayer::load(unknown, "0"); });
  EXPECT_NE(what.find("model_type: expected one of mixtral"), std::string::npos) << what;

  const std::string quant = edited_copy("olmoe", "quant", [](auto&, auto&) {}, "\"model_type\": \"olmoe\"",
                                        "\"model_type\": \"olmoe\", \"quantization_config\": {\"quant_method\": \"gptq\"}");
  what = expect_input_error([&] { PretrainedLayer::load(quant, "0"); });
  EXPECT_NE(what.find("quant_method: expected \"fp8\" or \"mxfp4\""), std::string::npos) << what;
}

TEST(Pretrained, ConvertsF16WeightsExactly) {
  // The olmoe checkpoint with one expert's weights stored F16 (values chosen exact in F16):
  // the layer converts that expert stack and gives the output of the same values in F32.
  const std::string e0 = "model.layers.0.mlp.experts.0.gate_proj.weight";
  std::vector<float> f32_values;
  const std::string f16 = edited_copy("olmoe", "f16", [&](auto& t, auto& storage) {
    std::vector<uint8_t>& bits = storage.emplace_back(16 * 32 * 2);
    f32_values.resize(16 * 32);
    for (int i = 0; i < 16 * 32; ++i) {
      const int m = (i * 37) % 1024;  // 1 + m/1024 times ±2^(−3..0): exact in both
      const int e = 12 + i % 4, sign = i % 3 == 0;
      const uint16_t h = static_cast<uint16_t>((sign << 15) | (e << 10) | m);
      std::memcpy(bits.data() + 2 * i, &h, 2);
      f32_values[static_cast<size_t>(i)] = (sign ? -1.0f : 1.0f) * std::ldexp(1.0f + float(m) / 1024.0f, e - 15);
    }
    t[e0] = {e0, TensorDType::kF16, {16, 32}, bits.data()};
  });
  const std::string f32 = edited_copy("olmoe", "f16_as_f32", [&](auto& t, auto&) {
    t[e0] = {e0, TensorDType::kF32, {16, 32}, f32_values.data()};
  });
  PretrainedLayer a = PretrainedLayer::load(f16, "0"), b = PretrainedLayer::load(f32, "0");
  EXPECT_EQ(source_of(a, "gate_up").how, "converted F16 → fp32");
  std::vector<float> x(6 * 32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(float(i)) * 2.0f;
  const ConstMatrixView<float> view(x.data(), 6, 32);
  EXPECT_EQ(a.moe().forward(view).output.values, b.moe().forward(view).output.values);
}

}  // namespace
}  // namespace moekit
