// Model families from config.json (the block-level conformance against transformers is in
// tests/python/test_model_families.py, which builds the peer's blocks).
#include <gtest/gtest.h>

#include <string>

#include "moekit/error.h"
#include "moekit/model_family.h"

namespace moekit {
namespace {

TEST(ModelFamily, DeepSeekV3LayersSharedExpertsAndGroups) {
  const ModelFamily f = model_family_from_config(R"({"model_type": "deepseek_v3", "hidden_size": 16,
      "intermediate_size": 40, "moe_intermediate_size": 8, "n_routed_experts": 8, "num_experts_per_tok": 2,
      "n_group": 4, "topk_group": 2, "n_shared_experts": 2, "first_k_dense_replace": 1, "num_hidden_layers": 3,
      "routed_scaling_factor": 2.5, "vocab_size": 100, "rope_scaling": null})");
  EXPECT_EQ(f.layer.d_model, 16);
  EXPECT_EQ(f.layer.d_ff, 8);
  EXPECT_EQ(f.layer.num_experts(), 8);
  EXPECT_EQ(f.layer.effective_shared_d_ff(), 16);
  EXPECT_EQ(f.layer.routing.n_group, 4);
  EXPECT_EQ(f.layer.routing.routed_scaling_factor, 2.5);
  EXPECT_TRUE(f.layer.has_selection_bias());
  ASSERT_EQ(f.layers.size(), 3u);
  EXPECT_FALSE(f.layers[0].is_moe);
  EXPECT_EQ(f.layers[0].dense_d_ff, 40);
  EXPECT_TRUE(f.layers[2].is_moe);
  EXPECT_EQ(f.layers[2].prefix, "model.layers.2.mlp");
}

TEST(ModelFamily, FaultsAreErrorsNamingTheKey) {
  auto message = [](const std::string& json) {
    try {
      model_family_from_config(json);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message(R"({"model_type": "gpt2", "hidden_size": 8, "num_hidden_layers": 1})").find("model_type: expected one of"),
            std::string::npos);
  EXPECT_NE(message(R"({"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 4,
      "num_local_experts": 4, "num_experts": 5})").find("num_experts: expected the value of num_local_experts"),
            std::string::npos);
  EXPECT_NE(message(R"({"model_type": "olmoe", "hidden_size": 8, "num_hidden_layers": 1})").find("intermediate_size"),
            std::string::npos);
  EXPECT_NE(message(R"({"model_type": "mixtral", "hidden_size": -8, "num_hidden_layers": 1})").find("hidden_size"),
            std::string::npos);
  EXPECT_NE(message("[1]").find("a JSON object"), std::string::npos);
  EXPECT_NE(message(R"({"model_type": "qwen2_moe", "hidden_size": 8, "num_hidden_layers": 2, "moe_intermediate_size": 4,
      "num_experts": 4, "num_experts_per_tok": 5, "shared_expert_intermediate_size": 8})").find("num_experts_per_tok"),
            std::string::npos);  // the layer config's own check
}

TEST(ModelFamily, ConfigJsonIsReadThroughTheStrictJsonLayer) {
  auto message = [](const std::string& json) {
    try {
      model_family_from_config(json);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  // A key repeated within one object is ambiguous (nlohmann would keep the last one).
  EXPECT_EQ(message(R"({"model_type": "mixtral", "hidden_size": 8, "hidden_size": 16})"),
            "config.json hidden_size: expected the key at most once, got it repeated");
  EXPECT_EQ(message(R"({"model_type": "deepseek_v3", "quantization_config": {"fmt": "e4m3", "fmt": "e4m3"}})"),
            "config.json quantization_config.fmt: expected the key at most once, got it repeated");
  EXPECT_EQ(message(R"({"model_type": 3})"), "config.json model_type: expected a string, got 3");
  EXPECT_EQ(message(R"({"model_type": null})"), "config.json model_type: expected a string, got none");
  EXPECT_EQ(message(R"({"model_type": "deepseek_v3", "hidden_size": 8, "num_hidden_layers": 1,
      "quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}})"),
            "config.json quantization_config.fmt: expected \"e4m3\", got \"e5m2\"");
  EXPECT_EQ(message("[1]"), "config.json: expected a JSON object, got array");
  EXPECT_EQ(message(std::string(300, '[')), "config.json: expected JSON nested at most 128 levels, got deeper nesting");
  EXPECT_EQ(message("{").rfind("config.json: expected well-formed JSON, got ", 0), 0u);
  // Keys no family reads stay ignored, null counts as absent.
  EXPECT_EQ(message(R"({"model_type": "olmoe", "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 4,
      "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 5, "rope_scaling": null, "norm_topk_prob": null})"),
            "accepted");
}

}  // namespace
}  // namespace moekit
