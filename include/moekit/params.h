// The parameters of one MoE layer: views of memory the layer does not own (MoeParams), owned
// tensors (MoeTensors, also the gradients) and gradient buffers a caller owns (MoeGradBuffers),
// all three described by one table, the parameter schema: one row per parameter tensor, from
// which everything that names or shapes a parameter is derived:
//   - the C++ structs' visiting order and names (MoeParams, BasicMoeTensors and MoeGradBuffers
//     below: for_each and for_each_moe_field walk this table);
//   - moe_tensor_sizes, make_moe_tensors, moe_grad_buffers, moe_params_view,
//     moe_tensors_from_params and check_moe_params' expected shapes (src/layer_params.cpp);
//   - which gradients the layer zeroes lazily (the expert weights, src/layer.cpp);
//   - the layer file's tensors and shapes (src/io/layer_file.cpp);
//   - the Python extension's parameter names (moekit._moekit.parameter_schema()), from which
//     moekit.torch builds its parameter lists and finds the module's tensors by their Hugging
//     Face names.
// Adding a tensor is one row here, plus its field in each struct below and its entry in the
// one list that binds rows to fields (detail::moe_param_fields).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/layer_config.h"
#include "moekit/tensor.h"
#include "moekit/weights.h"

namespace moekit {

// One dimension of a parameter's shape, as a quantity of the config (MoeLayerConfig's derived
// shapes). kNone ends a shape of fewer than three dimensions.
enum class MoeParamDim : uint8_t {
  kNone,
  kOne,               // the shared expert's leading expert axis (one MLP)
  kNumExperts,        // routing.num_experts
  kRouterRows,        // router_rows(): num_experts, or num_experts · slots_per_expert (Soft MoE)
  kDModel,            // d_model
  kDFf,               // d_ff
  kGateUpRows,        // gate_up_rows(): 2·d_ff gated, d_ff ungated
  kSharedGateUpRows,  // shared_gate_up_rows()
  kSharedDFf,         // effective_shared_d_ff() (0 without shared experts)
};

// The config switch that makes a parameter present; without it the tensor is empty.
enum class MoeParamCondition : uint8_t {
  kAlways,
  kRouterBias,        // router_bias
  kNoisyGating,       // routing.noisy_gating
  kExpertBias,        // expert_bias
  kSharedExperts,     // num_shared_experts > 0
  kSharedExpertBias,  // num_shared_experts > 0 and expert_bias
  kSharedExpertGate,  // shared_expert_gate
  kSelectionBias,     // has_selection_bias()
};

// How MoeParams holds the parameter, which says the formats it may be given in.
enum class MoeParamStorage : uint8_t {
  kFp32Matrix,  // ConstMatrixView<float> [rows, cols]: fp32 only
  kFp32Vector,  // std::span<const float>, the shape flattened: fp32 only
  kWeight,      // WeightView [experts, rows, cols]: fp32, bf16 or the layer's quantized format
};

// Layouts a parameter may arrive in (bit set); every parameter may arrive as its own shape,
// contiguous (kLayoutStacked).
inline constexpr uint32_t kLayoutStacked = 1u << 0;      // the shape of the row, row-major
inline constexpr uint32_t kLayoutPerExpert = 1u << 1;    // one tensor per expert (pointer list)
inline constexpr uint32_t kLayoutTransposed = 1u << 2;   // [experts, cols, rows], read through strides
inline constexpr uint32_t kLayoutInterleaved = 1u << 3;  // gate and up rows alternating (gpt-oss)
inline constexpr uint32_t kLayoutSplit = 1u << 4;        // gate and up halves as two tensors
inline constexpr uint32_t kLayoutRowMatrix = 1u << 5;    // a vector stored as a [1, n] matrix

// A name a parameter is stored under in a Hugging Face MoE block (relative to the block, e.g.
// "model.layers.3.mlp"), as transformers writes it and moekit.torch.MoE names it; "{e}" stands
// for the expert index. `up` is set when the gate and up halves are stored apart: `name` is
// then the gate half's tensor.
struct MoeParamHfName {
  const char* name = nullptr;
  const char* up = nullptr;
};

inline constexpr size_t kMaxMoeParamHfNames = 5;

struct MoeParamSpec {
  const char* name = nullptr;  // the C++ field and the extension's dictionary key
  MoeParamStorage storage = MoeParamStorage::kFp32Vector;
  // The shape as the layer file stores it and WeightView / ConstMatrixView see it (a flat
  // vector's elements in that row-major order).
  std::array<MoeParamDim, 3> shape = {};
  MoeParamCondition used_when = MoeParamCondition::kAlways;
  // An expert weight: stored per expert, and its gradient is zeroed lazily (zero_grad() marks
  // it; the next backward writes the experts it touches).
  bool expert_weight = false;
  bool has_gradient = true;  // false: the parameter only selects (the selection bias)
  uint32_t layouts = kLayoutStacked;
  // The name of the up half when a gated activation's gate and up halves are given as two
  // arrays (the Python extension's keys, moekit.torch's lists); null: no halves.
  const char* up_name = nullptr;
  // The names the parameter is found under, in the order they are looked for.
  std::array<MoeParamHfName, kMaxMoeParamHfNames> hf_names = {};

  constexpr int rank() const {
    int r = 0;
    while (r < 3 && shape[static_cast<size_t>(r)] != MoeParamDim::kNone) ++r;
    return r;
  }
  // The shared expert's weights carry a leading axis of 1 (kOne) that array front ends drop.
  constexpr bool single_expert() const { return shape[0] == MoeParamDim::kOne; }
  constexpr bool fp32_only() const { return storage != MoeParamStorage::kWeight; }
};

// The table (kMoeParamSchema below), in the order of the structs' fields. The expert weights
// follow the Hugging Face layout (out × in); biases, the router and the shared gate are fp32.
namespace detail {
constexpr std::array<MoeParamSpec, 13> moe_param_rows() {
  using enum MoeParamDim;
  using enum MoeParamCondition;
  using enum MoeParamStorage;
  return {{
      {.name = "router_weight",
       .storage = kFp32Matrix,
       .shape = {kRouterRows, kDModel},
       .hf_names = {{{"gate.weight"}, {"router.weight"}, {"router.classifier.weight"}}}},
      {.name = "router_bias",
       .shape = {kRouterRows},
       .used_when = kRouterBias,
       .hf_names = {{{"gate.bias"}, {"router.bias"}, {"router.classifier.bias"}}}},
      // Noisy gating has no Hugging Face counterpart: the names are moekit.torch's.
      {.name = "router_noise_weight",
       .storage = kFp32Matrix,
       .shape = {kNumExperts, kDModel},
       .used_when = kNoisyGating,
       .hf_names = {{{"gate.noise_weight"}, {"router.noise_weight"}, {"router.classifier.noise_weight"}}}},
      {.name = "gate_up",
       .storage = kWeight,
       .shape = {kNumExperts, kGateUpRows, kDModel},
       .expert_weight = true,
       .layouts = kLayoutStacked | kLayoutPerExpert | kLayoutTransposed | kLayoutInterleaved | kLayoutSplit,
       .up_name = "up",
       .hf_names = {{{"experts.gate_up_proj"},
                     {"experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"},
                     {"experts.{e}.w1.weight", "experts.{e}.w3.weight"},
                     {"experts.{e}.up_proj.weight"},
                     {"experts.expert_{e}.wi.weight"}}}},
      {.name = "down",
       .storage = kWeight,
       .shape = {kNumExperts, kDModel, kDFf},
       .expert_weight = true,
       .layouts = kLayoutStacked | kLayoutPerExpert | kLayoutTransposed,
       .hf_names = {{{"experts.down_proj"},
                     {"experts.{e}.down_proj.weight"},
                     {"experts.{e}.w2.weight"},
                     {"experts.expert_{e}.wo.weight"}}}},
      {.name = "gate_up_bias",
       .shape = {kNumExperts, kGateUpRows},
       .used_when = kExpertBias,
       .layouts = kLayoutStacked | kLayoutInterleaved,
       .hf_names = {{{"experts.gate_up_proj_bias"}}}},
      {.name = "down_bias",
       .shape = {kNumExperts, kDModel},
       .used_when = kExpertBias,
       .hf_names = {{{"experts.down_proj_bias"}}}},
      // Qwen2-MoE names its shared MLP shared_expert, DeepSeek shared_experts.
      {.name = "shared_gate_up",
       .storage = kWeight,
       .shape = {kOne, kSharedGateUpRows, kDModel},
       .used_when = kSharedExperts,
       .expert_weight = true,
       .layouts = kLayoutStacked | kLayoutSplit,
       .up_name = "shared_up",
       .hf_names = {{{"shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"},
                     {"shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"},
                     {"shared_expert.up_proj.weight"},
                     {"shared_experts.up_proj.weight"}}}},
      {.name = "shared_down",
       .storage = kWeight,
       .shape = {kOne, kDModel, kSharedDFf},
       .used_when = kSharedExperts,
       .expert_weight = true,
       .hf_names = {{{"shared_expert.down_proj.weight"}, {"shared_experts.down_proj.weight"}}}},
      {.name = "shared_gate_up_bias",
       .shape = {kSharedGateUpRows},
       .used_when = kSharedExpertBias,
       .hf_names = {{{"shared_expert.up_proj.bias"}, {"shared_experts.up_proj.bias"}}}},
      {.name = "shared_down_bias",
       .shape = {kDModel},
       .used_when = kSharedExpertBias,
       .hf_names = {{{"shared_expert.down_proj.bias"}, {"shared_experts.down_proj.bias"}}}},
      {.name = "shared_gate",
       .shape = {kDModel},
       .used_when = kSharedExpertGate,
       .layouts = kLayoutStacked | kLayoutRowMatrix,
       .hf_names = {{{"shared_expert_gate.weight"}}}},
      // DeepSeek-V3's e_score_correction_bias: it only selects, so it has no gradient.
      {.name = "selection_bias",
       .shape = {kNumExperts},
       .used_when = kSelectionBias,
       .has_gradient = false,
       .hf_names = {{{"gate.e_score_correction_bias"},
                     {"router.e_score_correction_bias"},
                     {"router.classifier.e_score_correction_bias"}}}},
  }};
}
}  // namespace detail

inline constexpr std::array<MoeParamSpec, 13> kMoeParamSchema = detail::moe_param_rows();

inline constexpr size_t kNumMoeParams = kMoeParamSchema.size();

namespace detail {
// What the code that derives from the table relies on: unique names, a matrix of rank 2, a
// weight of rank 3 (the shared expert's with its leading 1), halves only for weights.
constexpr bool moe_param_schema_is_consistent() {
  for (size_t i = 0; i < kNumMoeParams; ++i) {
    const MoeParamSpec& s = kMoeParamSchema[i];
    for (size_t j = 0; j < i; ++j) {
      if (std::string_view(s.name) == kMoeParamSchema[j].name) return false;
    }
    if (s.storage == MoeParamStorage::kFp32Matrix && s.rank() != 2) return false;
    if (s.storage == MoeParamStorage::kWeight && s.rank() != 3) return false;
    if (s.up_name != nullptr && s.storage != MoeParamStorage::kWeight) return false;
    if (s.hf_names[0].name == nullptr) return false;
  }
  return true;
}
static_assert(moe_param_schema_is_consistent(), "kMoeParamSchema: a row breaks the rules above");
}  // namespace detail

// The row named `name`, or null.
constexpr const MoeParamSpec* find_moe_param(std::string_view name) {
  for (const MoeParamSpec& s : kMoeParamSchema) {
    if (name == s.name) return &s;
  }
  return nullptr;
}

// The row named `name`; throws InputError naming it when there is none.
const MoeParamSpec& moe_param_spec(std::string_view name);

// Whether `config` has the parameter (a tensor it does not use is empty).
bool moe_param_used(const MoeParamSpec& spec, const MoeLayerConfig& config);
// The value of one dimension for `config`.
int64_t moe_param_dim(MoeParamDim dim, const MoeLayerConfig& config);
// The row's shape for `config` (rank() values), whether the config uses the parameter or not.
std::vector<int64_t> moe_param_shape(const MoeParamSpec& spec, const MoeLayerConfig& config);
// Element count: the shape's product when used, else 0.
int64_t moe_param_size(const MoeParamSpec& spec, const MoeLayerConfig& config);

// Names for messages and the Python extension.
const char* moe_param_dim_name(MoeParamDim dim);                  // "num_experts", "d_model", "1", ...
const char* moe_param_condition_name(MoeParamCondition when);     // "always", "router_bias", ...
const char* moe_param_absent_reason(MoeParamCondition when);      // "router_bias is false", ...
const char* moe_param_storage_name(MoeParamStorage storage);      // "fp32_matrix", "fp32_vector", "weight"
std::vector<const char*> moe_param_layout_names(uint32_t layouts);  // "stacked", "per_expert", ...

// The parameter structs below have one field per row of kMoeParamSchema (params.h), in the
// table's order. This is where a row meets its field, the one list C++ needs besides the
// fields themselves (it cannot reach a field by its name; tests/test_param_schema.cpp checks
// each name against its field); a struct without a field for a row (MoeGradBuffers has none for
// the selection bias, which has no gradient) binds it to null.
namespace detail {
template <typename Struct>
constexpr auto moe_param_fields() {
  constexpr auto selection_bias = [] {
    if constexpr (requires { &Struct::selection_bias; }) {
      return &Struct::selection_bias;
    } else {
      return nullptr;
    }
  }();
  return std::tuple{&Struct::router_weight,    &Struct::router_bias,    &Struct::router_noise_weight,
                    &Struct::gate_up,          &Struct::down,           &Struct::gate_up_bias,
                    &Struct::down_bias,        &Struct::shared_gate_up, &Struct::shared_down,
                    &Struct::shared_gate_up_bias, &Struct::shared_down_bias, &Struct::shared_gate,
                    selection_bias};
}
template <typename Struct>
inline constexpr auto kMoeParamFields = moe_param_fields<Struct>();
}  // namespace detail

// The field of row `row` of kMoeParamSchema in `s` (a MoeParams, BasicMoeTensors or
// MoeGradBuffers, const or not).
template <size_t row, typename Struct>
constexpr auto& moe_param_field(Struct& s) {
  return s.*std::get<row>(detail::kMoeParamFields<std::remove_const_t<Struct>>);
}

// Calls fn(row, field) for every row of kMoeParamSchema that `s` has a field for, in the
// table's order; `row` is a std::integral_constant<size_t, i> (kMoeParamSchema[row] is its
// spec, moe_param_field<row>(other) the same parameter in another struct) and `field` a
// reference to the field, of its own type (a generic lambda tells them apart).
template <typename Struct, typename Fn>
constexpr void for_each_moe_field(Struct& s, Fn&& fn) {
  using Fields = std::remove_cv_t<decltype(detail::kMoeParamFields<std::remove_const_t<Struct>>)>;
  static_assert(std::tuple_size_v<Fields> == kNumMoeParams, "one field per row of kMoeParamSchema");
  [&]<size_t... rows>(std::index_sequence<rows...>) {
    (
        [&] {
          if constexpr (!std::is_null_pointer_v<std::tuple_element_t<rows, Fields>>) {
            fn(std::integral_constant<size_t, rows>{}, moe_param_field<rows>(s));
          }
        }(),
        ...);
  }(std::make_index_sequence<kNumMoeParams>{});
}

// The parameters a layer computes with, as views of memory it does not own (Python tensors,
// memory-mapped safetensors). Weights follow the Hugging Face layout (out × in); biases, the
// router and the shared gate are fp32.
struct MoeParams {
  ConstMatrixView<float> router_weight;        // [router_rows, d_model]
  std::span<const float> router_bias;          // [router_rows] or empty
  ConstMatrixView<float> router_noise_weight;  // [num_experts, d_model], noisy gating only
  WeightView gate_up;                          // [num_experts, gate_up_rows, d_model]
  WeightView down;                             // [num_experts, d_model, d_ff]
  std::span<const float> gate_up_bias;         // [num_experts · gate_up_rows] or empty
  std::span<const float> down_bias;            // [num_experts · d_model] or empty
  WeightView shared_gate_up;                   // [1, shared_gate_up_rows, d_model] or empty
  WeightView shared_down;                      // [1, d_model, shared_d_ff] or empty
  std::span<const float> shared_gate_up_bias;  // [shared_gate_up_rows] or empty
  std::span<const float> shared_down_bias;     // [d_model] or empty
  std::span<const float> shared_gate;          // [d_model] (the [1, d_model] gate) or empty
  std::span<const float> selection_bias;       // [num_experts] or empty (has_selection_bias())
};

// Owning flat storage of every parameter (or gradient), shapes as in MoeParams. Tensors a
// config does not use are empty.
template <typename Real>
struct BasicMoeTensors {
  std::vector<Real> router_weight;        // [router_rows, d_model]
  std::vector<Real> router_bias;          // [router_rows]
  std::vector<Real> router_noise_weight;  // [num_experts, d_model]
  std::vector<Real> gate_up;              // [num_experts, gate_up_rows, d_model]
  std::vector<Real> down;                 // [num_experts, d_model, d_ff]
  std::vector<Real> gate_up_bias;         // [num_experts, gate_up_rows]
  std::vector<Real> down_bias;            // [num_experts, d_model]
  std::vector<Real> shared_gate_up;       // [shared_gate_up_rows, d_model]
  std::vector<Real> shared_down;          // [d_model, shared_d_ff]
  std::vector<Real> shared_gate_up_bias;  // [shared_gate_up_rows]
  std::vector<Real> shared_down_bias;     // [d_model]
  std::vector<Real> shared_gate;          // [d_model]
  std::vector<Real> selection_bias;       // [num_experts] (no gradient: it only selects)

  // Calls fn(name, tensor) for every tensor, in declaration order (kMoeParamSchema's).
  template <typename Fn>
  void for_each(Fn&& fn) {
    for_each_moe_field(*this, [&](auto row, std::vector<Real>& v) { fn(kMoeParamSchema[row].name, v); });
  }
  template <typename Fn>
  void for_each(Fn&& fn) const {
    const_cast<BasicMoeTensors*>(this)->for_each(
        [&](const char* name, std::vector<Real>& v) { fn(name, std::as_const(v)); });
  }
};

using MoeTensors = BasicMoeTensors<float>;

// Zero-filled tensors of the sizes `config` uses.
template <typename Real>
BasicMoeTensors<Real> make_moe_tensors(const MoeLayerConfig& config);

// (name, element count) of every tensor of MoeTensors in declaration order; 0 for a tensor the
// config does not use.
std::vector<std::pair<const char*, int64_t>> moe_tensor_sizes(const MoeLayerConfig& config);

// Gradient memory the caller owns (fresh PyTorch .grad tensors, say), fp32, shapes as in
// MoeTensors; empty spans where the config has no such tensor. backward(…, into) writes the
// gradients of that one backward there (assigns, never accumulates), so the caller need not
// clear them first and the layer keeps no gradient memory of its own for that call.
struct MoeGradBuffers {
  std::span<float> router_weight;        // [router_rows, d_model]
  std::span<float> router_bias;          // [router_rows]
  std::span<float> router_noise_weight;  // [num_experts, d_model]
  std::span<float> gate_up;              // [num_experts, gate_up_rows, d_model]
  std::span<float> down;                 // [num_experts, d_model, d_ff]
  std::span<float> gate_up_bias;         // [num_experts, gate_up_rows]
  std::span<float> down_bias;            // [num_experts, d_model]
  std::span<float> shared_gate_up;       // [shared_gate_up_rows, d_model]
  std::span<float> shared_down;          // [d_model, shared_d_ff]
  std::span<float> shared_gate_up_bias;  // [shared_gate_up_rows]
  std::span<float> shared_down_bias;     // [d_model]
  std::span<float> shared_gate;          // [d_model]

  // Calls fn(name, span) for every buffer, in MoeTensors' order (names as there): every row of
  // kMoeParamSchema with a gradient. The non-const form passes each span by reference, to be
  // set.
  template <typename Fn>
  void for_each(Fn&& fn) {
    for_each_moe_field(*this, [&](auto row, std::span<float>& v) {
      static_assert(kMoeParamSchema[decltype(row)::value].has_gradient,
                    "a gradient buffer for a parameter without a gradient");
      fn(kMoeParamSchema[row].name, v);
    });
  }
  template <typename Fn>
  void for_each(Fn&& fn) const {
    const_cast<MoeGradBuffers*>(this)->for_each([&](const char* name, std::span<float>& v) { fn(name, v); });
  }
};

// Views of owned gradient tensors as buffers (every tensor of `t` but the selection bias).
MoeGradBuffers moe_grad_buffers(MoeTensors& t);

// fp32 views of owned tensors (the layout MoeParams expects).
MoeParams moe_params_view(const MoeLayerConfig& config, const MoeTensors& tensors);

// The parameters behind `params` copied into owned fp32 tensors of MoeTensors' layout, read
// through the views' strides, split halves and per-expert pointers (bf16 widened exactly): what
// a front end that owns its parameters (a fine-tuned PyTorch module) starts from.
MoeTensors moe_tensors_from_params(const MoeLayerConfig& config, const MoeParams& params);

// Throws InputError unless every view has the shape `config` asks for (names the parameter,
// the expected and the actual shape).
void check_moe_params(const MoeLayerConfig& config, const MoeParams& params);

}  // namespace moekit
