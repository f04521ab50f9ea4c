// The parameter schema (params.h): the table's rows against the structs' fields, the owned
// tensors' sizes, the views and the checks derived from it.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/error.h"
#include "moekit/layer.h"

namespace moekit {
namespace {

MoeLayerConfig minimal_config() {
  MoeLayerConfig c;
  c.routing.num_experts = 5;
  c.routing.num_experts_per_tok = 2;
  c.d_model = 12;
  c.d_ff = 10;
  return c;
}

MoeLayerConfig config_with_everything() {
  MoeLayerConfig c = minimal_config();
  c.router_bias = true;
  c.expert_bias = true;
  c.routing.noisy_gating = true;
  c.num_shared_experts = 1;
  c.shared_d_ff = 7;
  c.shared_expert_gate = true;
  c.selection_bias = true;
  return c;
}

// Configs that switch every row on and off and change every dimension rule.
std::vector<MoeLayerConfig> configs() {
  std::vector<MoeLayerConfig> out = {minimal_config(), config_with_everything()};
  MoeLayerConfig ungated = config_with_everything();
  ungated.activation = ExpertActivation::kGelu;
  ungated.shared_expert_gate = false;
  ungated.num_shared_experts = 2;
  ungated.shared_d_ff = 0;  // 2 · d_ff
  out.push_back(ungated);
  MoeLayerConfig soft = minimal_config();
  soft.routing.routing_method = RoutingMethod::kSoftMoe;
  soft.routing.slots_per_expert = 3;
  soft.routing.num_experts_per_tok = 1;
  out.push_back(soft);
  MoeLayerConfig deepseek = minimal_config();
  deepseek.routing.e_score_correction_bias = {0.5f, -0.25f, 0, 1, 2};
  deepseek.num_shared_experts = 1;
  out.push_back(deepseek);
  return out;
}

// Element counts worked out by hand from the config, independently of the table.
std::vector<std::pair<std::string, int64_t>> expected_sizes(const MoeLayerConfig& c) {
  const int64_t E = c.num_experts(), d = c.d_model, f = c.d_ff;
  const int64_t gu = is_gated(c.activation) ? 2 * f : f;
  const int64_t sf = c.has_shared() ? (c.shared_d_ff > 0 ? c.shared_d_ff : c.num_shared_experts * f) : 0;
  const int64_t sgu = is_gated(c.activation) ? 2 * sf : sf;
  const int64_t rr = c.routing.routing_method == RoutingMethod::kSoftMoe ? E * c.routing.slots_per_expert : E;
  const bool shared = c.num_shared_experts > 0;
  return {{"router_weight", rr * d},
          {"router_bias", c.router_bias ? rr : 0},
          {"router_noise_weight", c.routing.noisy_gating ? E * d : 0},
          {"gate_up", E * gu * d},
          {"down", E * d * f},
          {"gate_up_bias", c.expert_bias ? E * gu : 0},
          {"down_bias", c.expert_bias ? E * d : 0},
          {"shared_gate_up", shared ? sgu * d : 0},
          {"shared_down", shared ? d * sf : 0},
          {"shared_gate_up_bias", shared && c.expert_bias ? sgu : 0},
          {"shared_down_bias", shared && c.expert_bias ? d : 0},
          {"shared_gate", c.shared_expert_gate ? d : 0},
          {"selection_bias", c.selection_bias || !c.routing.e_score_correction_bias.empty() ? E : 0}};
}

std::vector<std::string> schema_names(bool with_gradient_only) {
  std::vector<std::string> names;
  for (const MoeParamSpec& s : kMoeParamSchema) {
    if (s.has_gradient || !with_gradient_only) names.emplace_back(s.name);
  }
  return names;
}

TEST(ParamSchema, NamesAreUniqueAndFoundByName) {
  std::set<std::string> seen;
  for (const MoeParamSpec& s : kMoeParamSchema) {
    EXPECT_TRUE(seen.insert(s.name).second) << s.name;
    EXPECT_EQ(find_moe_param(s.name), &s);
    EXPECT_EQ(&moe_param_spec(s.name), &s);
    if (s.up_name != nullptr) {
      EXPECT_TRUE(seen.insert(s.up_name).second) << s.up_name;  // a half's name is no row's
      EXPECT_EQ(find_moe_param(s.up_name), nullptr);
    }
    EXPECT_NE(s.hf_names[0].name, nullptr) << s.name;
  }
  EXPECT_EQ(find_moe_param("gate_up_proj"), nullptr);
  try {
    moe_param_spec("gate_up_proj");
    FAIL() << "no exception";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("parameter name: expected one of router_weight, router_bias"), std::string::npos) << what;
    EXPECT_NE(what.find("got 'gate_up_proj'"), std::string::npos) << what;
  }
}

TEST(ParamSchema, RolesAreTheLayersOwn) {
  // The gradients zeroed lazily are the expert weights; only the selection bias has none.
  std::vector<std::string> expert_weights, weights, without_gradient;
  for (const MoeParamSpec& s : kMoeParamSchema) {
    if (s.expert_weight) expert_weights.emplace_back(s.name);
    if (s.storage == MoeParamStorage::kWeight) weights.emplace_back(s.name);
    if (!s.has_gradient) without_gradient.emplace_back(s.name);
    EXPECT_EQ(s.fp32_only(), s.storage != MoeParamStorage::kWeight) << s.name;
  }
  const std::vector<std::string> want = {"gate_up", "down", "shared_gate_up", "shared_down"};
  EXPECT_EQ(expert_weights, want);
  EXPECT_EQ(weights, want);
  EXPECT_EQ(without_gradient, std::vector<std::string>{"selection_bias"});
}

TEST(ParamSchema, ShapeRulesMatchMakeMoeTensors) {
  for (const MoeLayerConfig& c : configs()) {
    const MoeTensors t = make_moe_tensors<float>(c);
    const auto want = expected_sizes(c);
    const auto sizes = moe_tensor_sizes(c);
    ASSERT_EQ(sizes.size(), kNumMoeParams);
    size_t i = 0;
    t.for_each([&](const char* name, const std::vector<float>& v) {
      const MoeParamSpec& s = kMoeParamSchema[i];
      EXPECT_EQ(std::string(name), want[i].first);
      EXPECT_EQ(std::string(sizes[i].first), want[i].first);
      EXPECT_EQ(static_cast<int64_t>(v.size()), want[i].second) << name;
      EXPECT_EQ(sizes[i].second, want[i].second) << name;
      EXPECT_EQ(moe_param_size(s, c), want[i].second) << name;
      EXPECT_EQ(moe_param_used(s, c), want[i].second > 0) << name;
      int64_t product = 1;
      for (const int64_t dim : moe_param_shape(s, c)) product *= dim;
      if (moe_param_used(s, c)) EXPECT_EQ(product, want[i].second) << name;
      ++i;
    });
    EXPECT_EQ(i, kNumMoeParams);
    // The selection bias starts at the config's correction bias.
    const auto& initial = c.routing.e_score_correction_bias;
    if (!initial.empty()) EXPECT_EQ(t.selection_bias, std::vector<float>(initial.begin(), initial.end()));
  }
}

TEST(ParamSchema, ForEachVisitsExactlyTheTableInOrder) {
  MoeTensors t = make_moe_tensors<float>(config_with_everything());
  // The fields by name, written out here: the binding in layer.h must agree with it.
  const std::vector<std::pair<std::string, const void*>> fields = {
      {"router_weight", &t.router_weight},   {"router_bias", &t.router_bias},
      {"router_noise_weight", &t.router_noise_weight}, {"gate_up", &t.gate_up},
      {"down", &t.down},                     {"gate_up_bias", &t.gate_up_bias},
      {"down_bias", &t.down_bias},           {"shared_gate_up", &t.shared_gate_up},
      {"shared_down", &t.shared_down},       {"shared_gate_up_bias", &t.shared_gate_up_bias},
      {"shared_down_bias", &t.shared_down_bias}, {"shared_gate", &t.shared_gate},
      {"selection_bias", &t.selection_bias}};
  std::vector<std::pair<std::string, const void*>> visited, visited_const;
  t.for_each([&](const char* name, std::vector<float>& v) { visited.emplace_back(name, &v); });
  std::as_const(t).for_each([&](const char* name, const std::vector<float>& v) { visited_const.emplace_back(name, &v); });
  EXPECT_EQ(visited, fields);
  EXPECT_EQ(visited_const, fields);

  BasicMoeTensors<double> td = make_moe_tensors<double>(config_with_everything());
  std::vector<std::string> names_double;
  td.for_each([&](const char* name, std::vector<double>&) { names_double.emplace_back(name); });
  EXPECT_EQ(names_double, schema_names(false));

  // The gradient buffers: every row with a gradient, each span over the tensor of its name.
  const MoeGradBuffers b = moe_grad_buffers(t);
  std::vector<std::string> buffer_names;
  b.for_each([&](const char* name, std::span<float> span) {
    buffer_names.emplace_back(name);
    for (const auto& [field, address] : fields) {
      if (field == name) EXPECT_EQ(span.data(), static_cast<const std::vector<float>*>(address)->data()) << name;
    }
  });
  EXPECT_EQ(buffer_names, schema_names(true));
  EXPECT_EQ(b.gate_up.data(), t.gate_up.data());
  EXPECT_EQ(b.shared_gate.data(), t.shared_gate.data());

  // for_each_moe_field hands each struct's own field type, row by row.
  MoeParams p;
  std::vector<std::string> view_kinds;
  for_each_moe_field(p, [&](auto row, auto& view) {
    using View = std::remove_reference_t<decltype(view)>;
    const MoeParamStorage storage = kMoeParamSchema[row].storage;
    if constexpr (std::is_same_v<View, WeightView>) {
      EXPECT_EQ(storage, MoeParamStorage::kWeight) << kMoeParamSchema[row].name;
    } else if constexpr (std::is_same_v<View, ConstMatrixView<float>>) {
      EXPECT_EQ(storage, MoeParamStorage::kFp32Matrix) << kMoeParamSchema[row].name;
    } else {
      static_assert(std::is_same_v<View, std::span<const float>>);
      EXPECT_EQ(storage, MoeParamStorage::kFp32Vector) << kMoeParamSchema[row].name;
    }
    view_kinds.emplace_back(kMoeParamSchema[row].name);
  });
  EXPECT_EQ(view_kinds, schema_names(false));
}

TEST(ParamSchema, ViewsHaveTheRowsShapes) {
  for (const MoeLayerConfig& c : configs()) {
    const MoeTensors t = make_moe_tensors<float>(c);
    const MoeParams p = moe_params_view(c, t);
    EXPECT_NO_THROW(check_moe_params(c, p));
    for_each_moe_field(p, [&](auto row, const auto& view) {
      const MoeParamSpec& s = kMoeParamSchema[row];
      const std::vector<int64_t> shape = moe_param_shape(s, c);
      const std::vector<float>& v = moe_param_field<row>(t);
      using View = std::remove_cvref_t<decltype(view)>;
      if constexpr (std::is_same_v<View, WeightView>) {
        ASSERT_EQ(view.empty(), !moe_param_used(s, c)) << s.name;
        if (!view.empty()) {
          EXPECT_EQ((std::vector<int64_t>{view.experts, view.rows, view.cols}), shape) << s.name;
          EXPECT_EQ(view.data, v.data()) << s.name;
        }
      } else if constexpr (std::is_same_v<View, ConstMatrixView<float>>) {
        ASSERT_EQ(view.data == nullptr, !moe_param_used(s, c)) << s.name;
        if (view.data != nullptr) EXPECT_EQ((std::vector<int64_t>{view.rows, view.cols}), shape) << s.name;
      } else {
        EXPECT_EQ(static_cast<int64_t>(view.size()), moe_param_size(s, c)) << s.name;
      }
    });
    // Copied back through the views: the same tensors.
    const MoeTensors back = moe_tensors_from_params(c, p);
    std::vector<const std::vector<float>*> a, b;
    t.for_each([&](const char*, const std::vector<float>& v) { a.push_back(&v); });
    back.for_each([&](const char*, const std::vector<float>& v) { b.push_back(&v); });
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(*a[i], *b[i]) << kMoeParamSchema[i].name;
  }
}

TEST(ParamSchema, CheckNamesEveryOptionalRowAndWhyItIsAbsent) {
  // A view for each parameter the minimal config does not use: the check names the parameter
  // and the config switch that leaves it out.
  const MoeLayerConfig full = config_with_everything(), bare = minimal_config();
  const MoeTensors t_full = make_moe_tensors<float>(full), t_bare = make_moe_tensors<float>(bare);
  const MoeParams p_full = moe_params_view(full, t_full);
  int checked = 0;
  for_each_moe_field(p_full, [&](auto row, const auto& view) {
    const MoeParamSpec& s = kMoeParamSchema[row];
    if (moe_param_used(s, bare)) return;
    MoeParams p = moe_params_view(bare, t_bare);
    moe_param_field<row>(p) = view;
    try {
      check_moe_params(bare, p);
      ADD_FAILURE() << s.name << ": no exception";
    } catch (const InputError& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind(std::string("params.") + s.name + ": expected ", 0), 0u) << what;
      EXPECT_NE(what.find(moe_param_absent_reason(s.used_when)), std::string::npos) << what;
    }
    ++checked;
  });
  EXPECT_EQ(checked, 10);  // every row but router_weight, gate_up and down
}

TEST(ParamSchema, NamesForMessagesAndFrontEnds) {
  EXPECT_STREQ(moe_param_dim_name(MoeParamDim::kGateUpRows), "gate_up_rows");
  EXPECT_STREQ(moe_param_condition_name(MoeParamCondition::kSharedExpertBias), "shared_expert_bias");
  EXPECT_STREQ(moe_param_storage_name(MoeParamStorage::kWeight), "weight");
  const std::vector<const char*> names = moe_param_layout_names(moe_param_spec("gate_up").layouts);
  const std::vector<std::string> layouts(names.begin(), names.end());
  EXPECT_EQ(layouts, (std::vector<std::string>{"stacked", "per_expert", "transposed", "interleaved", "split"}));
  EXPECT_EQ(moe_param_spec("shared_gate").rank(), 1);
  EXPECT_TRUE(moe_param_spec("shared_down").single_expert());
  EXPECT_FALSE(moe_param_spec("down").single_expert());
}

}  // namespace
}  // namespace moekit
