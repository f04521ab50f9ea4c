// Parameters of the layer: the schema's rules (params.h), owned storage, views, and their shape
// checks, all derived from kMoeParamSchema.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/quant.h"

namespace moekit {

// ---------------------------------------------------------------------------------------------
// The schema's rules (params.h).

const MoeParamSpec& moe_param_spec(std::string_view name) {
  const MoeParamSpec* s = find_moe_param(name);
  if (s == nullptr) {
    std::string names;
    for (const MoeParamSpec& row : kMoeParamSchema) names += (names.empty() ? "" : ", ") + std::string(row.name);
    throw_input_error("parameter name", detail::concat("one of ", names), detail::concat("'", name, "'"));
  }
  return *s;
}

int64_t moe_param_dim(MoeParamDim dim, const MoeLayerConfig& c) {
  switch (dim) {
    case MoeParamDim::kNone: return 0;
    case MoeParamDim::kOne: return 1;
    case MoeParamDim::kNumExperts: return c.num_experts();
    case MoeParamDim::kRouterRows: return c.router_rows();
    case MoeParamDim::kDModel: return c.d_model;
    case MoeParamDim::kDFf: return c.d_ff;
    case MoeParamDim::kGateUpRows: return c.gate_up_rows();
    case MoeParamDim::kSharedGateUpRows: return c.shared_gate_up_rows();
    case MoeParamDim::kSharedDFf: return c.effective_shared_d_ff();
  }
  return 0;
}

bool moe_param_used(const MoeParamSpec& spec, const MoeLayerConfig& c) {
  switch (spec.used_when) {
    case MoeParamCondition::kAlways: return true;
    case MoeParamCondition::kRouterBias: return c.router_bias;
    case MoeParamCondition::kNoisyGating: return c.routing.noisy_gating;
    case MoeParamCondition::kExpertBias: return c.expert_bias;
    case MoeParamCondition::kSharedExperts: return c.has_shared();
    case MoeParamCondition::kSharedExpertBias: return c.has_shared() && c.expert_bias;
    case MoeParamCondition::kSharedExpertGate: return c.shared_expert_gate;
    case MoeParamCondition::kSelectionBias: return c.has_selection_bias();
  }
  return false;
}

std::vector<int64_t> moe_param_shape(const MoeParamSpec& spec, const MoeLayerConfig& c) {
  std::vector<int64_t> shape;
  for (int i = 0; i < spec.rank(); ++i) shape.push_back(moe_param_dim(spec.shape[static_cast<size_t>(i)], c));
  return shape;
}

int64_t moe_param_size(const MoeParamSpec& spec, const MoeLayerConfig& c) {
  if (!moe_param_used(spec, c)) return 0;
  int64_t n = 1;
  for (const int64_t v : moe_param_shape(spec, c)) n *= v;
  return n;
}

const char* moe_param_dim_name(MoeParamDim dim) {
  switch (dim) {
    case MoeParamDim::kNone: return "none";
    case MoeParamDim::kOne: return "1";
    case MoeParamDim::kNumExperts: return "num_experts";
    case MoeParamDim::kRouterRows: return "router_rows";
    case MoeParamDim::kDModel: return "d_model";
    case MoeParamDim::kDFf: return "d_ff";
    case MoeParamDim::kGateUpRows: return "gate_up_rows";
    case MoeParamDim::kSharedGateUpRows: return "shared_gate_up_rows";
    case MoeParamDim::kSharedDFf: return "shared_d_ff";
  }
  return "unknown";
}

const char* moe_param_condition_name(MoeParamCondition when) {
  switch (when) {
    case MoeParamCondition::kAlways: return "always";
    case MoeParamCondition::kRouterBias: return "router_bias";
    case MoeParamCondition::kNoisyGating: return "noisy_gating";
    case MoeParamCondition::kExpertBias: return "expert_bias";
    case MoeParamCondition::kSharedExperts: return "shared_experts";
    case MoeParamCondition::kSharedExpertBias: return "shared_expert_bias";
    case MoeParamCondition::kSharedExpertGate: return "shared_expert_gate";
    case MoeParamCondition::kSelectionBias: return "selection_bias";
  }
  return "unknown";
}

const char* moe_param_absent_reason(MoeParamCondition when) {
  switch (when) {
    case MoeParamCondition::kAlways: return "";
    case MoeParamCondition::kRouterBias: return "router_bias is false";
    case MoeParamCondition::kNoisyGating: return "noisy_gating is false";
    case MoeParamCondition::kExpertBias: return "expert_bias is false";
    case MoeParamCondition::kSharedExperts: return "num_shared_experts is 0";
    case MoeParamCondition::kSharedExpertBias: return "no shared expert biases";
    case MoeParamCondition::kSharedExpertGate: return "shared_expert_gate is false";
    case MoeParamCondition::kSelectionBias: return "selection_bias is false and no e_score_correction_bias is given";
  }
  return "unknown";
}

const char* moe_param_storage_name(MoeParamStorage storage) {
  switch (storage) {
    case MoeParamStorage::kFp32Matrix: return "fp32_matrix";
    case MoeParamStorage::kFp32Vector: return "fp32_vector";
    case MoeParamStorage::kWeight: return "weight";
  }
  return "unknown";
}

std::vector<const char*> moe_param_layout_names(uint32_t layouts) {
  std::vector<const char*> names;
  for (const auto& [bit, name] : {std::pair{kLayoutStacked, "stacked"}, std::pair{kLayoutPerExpert, "per_expert"},
                                  std::pair{kLayoutTransposed, "transposed"}, std::pair{kLayoutInterleaved, "interleaved"},
                                  std::pair{kLayoutSplit, "split"}, std::pair{kLayoutRowMatrix, "row_matrix"}}) {
    if ((layouts & bit) != 0) names.push_back(name);
  }
  return names;
}

// ---------------------------------------------------------------------------------------------
// Parameter tensors and views, row by row of the schema.

std::vector<std::pair<const char*, int64_t>> moe_tensor_sizes(const MoeLayerConfig& c) {
  c.validate();
  std::vector<std::pair<const char*, int64_t>> sizes;
  for (const MoeParamSpec& s : kMoeParamSchema) sizes.emplace_back(s.name, moe_param_size(s, c));
  return sizes;
}

template <typename Real>
BasicMoeTensors<Real> make_moe_tensors(const MoeLayerConfig& c) {
  c.validate();
  BasicMoeTensors<Real> t;
  for_each_moe_field(t, [&](auto row, std::vector<Real>& v) {
    v.assign(static_cast<size_t>(moe_param_size(kMoeParamSchema[row], c)), Real(0));
  });
  std::copy(c.routing.e_score_correction_bias.begin(), c.routing.e_score_correction_bias.end(),
            t.selection_bias.begin());
  return t;
}

template BasicMoeTensors<float> make_moe_tensors<float>(const MoeLayerConfig&);
template BasicMoeTensors<double> make_moe_tensors<double>(const MoeLayerConfig&);

MoeGradBuffers moe_grad_buffers(MoeTensors& t) {
  // Every row with a gradient (the buffers have no field for the others).
  MoeGradBuffers b;
  for_each_moe_field(b, [&](auto row, std::span<float>& span) { span = moe_param_field<row>(t); });
  return b;
}

MoeParams moe_params_view(const MoeLayerConfig& c, const MoeTensors& t) {
  MoeParams p;
  for_each_moe_field(p, [&](auto row, auto& view) {
    const std::vector<float>& v = moe_param_field<row>(t);
    using View = std::remove_reference_t<decltype(view)>;
    if constexpr (std::is_same_v<View, std::span<const float>>) {
      view = v;
    } else if (!v.empty()) {
      const std::vector<int64_t> shape = moe_param_shape(kMoeParamSchema[row], c);
      if constexpr (std::is_same_v<View, WeightView>) {
        view = WeightView{v.data(), DType::kF32, shape[0], shape[1], shape[2]};
      } else {
        view = ConstMatrixView<float>(v.data(), shape[0], shape[1]);
      }
    }
  });
  return p;
}

namespace {

// Element (e, r, c) of a weight view as float (the addressing of ops::expert_weight).
float weight_element(const WeightView& w, int64_t e, int64_t r, int64_t c) {
  const bool up = w.up_data != nullptr && r >= w.rows / 2;
  const int64_t row = up ? r - w.rows / 2 : r;
  const size_t bytes = w.dtype == DType::kBF16 ? 2 : 4;
  const std::span<const void* const> list = up ? w.expert_up_data : w.expert_data;
  const auto* base = static_cast<const uint8_t*>(!list.empty() ? list[static_cast<size_t>(e)] : (up ? w.up_data : w.data));
  const int64_t offset = (list.empty() ? e * w.expert_step() : 0) + row * w.row_step() + c * w.col_step();
  const uint8_t* at = base + static_cast<size_t>(offset) * bytes;
  if (w.dtype == DType::kBF16) {
    uint16_t b;
    std::memcpy(&b, at, 2);
    const uint32_t u = uint32_t{b} << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  float f;
  std::memcpy(&f, at, 4);
  return f;
}

void copy_weight(const WeightView& w, std::vector<float>& out) {
  if (w.empty()) return;
  if (is_quantized(w.dtype)) {  // the values the codes stand for
    const int64_t cb = quantized_code_bytes(w.dtype, w.cols), sb = quantized_scale_bytes(w.dtype, w.cols);
    for (int64_t r = 0; r < w.experts * w.rows; ++r)
      dequantize_row(w.dtype, static_cast<const uint8_t*>(w.data) + r * cb, static_cast<const uint8_t*>(w.scales) + r * sb,
                     w.cols, out.data() + r * w.cols);
    return;
  }
  for (int64_t e = 0; e < w.experts; ++e)
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t c = 0; c < w.cols; ++c) out[static_cast<size_t>((e * w.rows + r) * w.cols + c)] = weight_element(w, e, r, c);
}

// The values of one parameter view copied into its owned tensor (sized by make_moe_tensors).
void copy_param(const WeightView& w, std::vector<float>& to) { copy_weight(w, to); }
void copy_param(ConstMatrixView<float> m, std::vector<float>& to) {
  if (m.data != nullptr) std::copy(m.data, m.data + m.rows * m.cols, to.begin());
}
void copy_param(std::span<const float> v, std::vector<float>& to) { std::copy(v.begin(), v.end(), to.begin()); }

}  // namespace

MoeTensors moe_tensors_from_params(const MoeLayerConfig& c, const MoeParams& p) {
  check_moe_params(c, p);
  MoeTensors t = make_moe_tensors<float>(c);
  for_each_moe_field(p, [&](auto row, const auto& view) { copy_param(view, moe_param_field<row>(t)); });
  return t;
}

namespace {

void check_matrix_param(const char* name, ConstMatrixView<float> m, bool wanted, int64_t rows,
                        int64_t cols, const char* why) {
  const bool given = m.data != nullptr;
  if (given != wanted) {
    throw_input_error(detail::concat("params.", name),
                      wanted ? detail::concat("a ", shape_text(rows, cols), " matrix") : detail::concat("none (", why, ")"),
                      given ? shape_text(m.rows, m.cols) : std::string("none"));
  }
  if (given && (m.rows != rows || m.cols != cols)) {
    throw_input_error(detail::concat("params.", name, " shape"), shape_text(rows, cols), shape_text(m.rows, m.cols));
  }
}

void check_vector_param(const char* name, std::span<const float> v, bool wanted, int64_t size,
                        const char* why) {
  const int64_t actual = static_cast<int64_t>(v.size());
  if (wanted && (v.data() == nullptr || actual != size)) {
    throw_input_error(detail::concat("params.", name, " length"), size, v.data() ? actual : 0);
  }
  if (!wanted && actual != 0) {
    throw_input_error(detail::concat("params.", name), detail::concat("empty (", why, ")"),
                      detail::concat("length ", actual));
  }
}

// A quantized view: the layer's format, contiguous, scales given and finite (a NaN or infinite
// scale would make every weight of its row or group NaN).
void check_quantized_weight(const char* name, const WeightView& w, DType layer_dtype) {
  if (w.dtype != layer_dtype) {
    throw_input_error(detail::concat("params.", name, " dtype"),
                      detail::concat(dtype_name(layer_dtype), " (quantized weights compute only in their own format)"),
                      dtype_name(w.dtype));
  }
  if (w.scales == nullptr) throw_input_error(detail::concat("params.", name, ".scales"), "a pointer", "null");
  if (w.expert_stride != 0 || w.row_stride != 0 || w.col_stride != 0 || w.up_data != nullptr ||
      !w.expert_data.empty() || !w.expert_up_data.empty()) {
    throw_input_error(detail::concat("params.", name), "a contiguous quantized stack (no strides, up half or per-expert pointers)",
                      "a strided or split view");
  }
  const int64_t rows = w.experts * w.rows;
  const auto* sc = static_cast<const uint8_t*>(w.scales);
  const int64_t groups = w.cols / kQuantGroup;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < (w.dtype == DType::kInt8 ? 1 : groups); ++g) {
      float s = 0;
      if (w.dtype == DType::kInt8) {
        std::memcpy(&s, sc + 4 * r, 4);
      } else if (w.dtype == DType::kInt4) {
        uint16_t b;
        std::memcpy(&b, sc + 2 * (r * groups + g), 2);
        s = fp16_to_float(b);
      } else {
        s = sc[r * groups + g] == 0xffu ? std::numeric_limits<float>::quiet_NaN() : 1.0f;
      }
      if (!std::isfinite(s)) {
        throw_input_error(detail::concat("params.", name, ".scales[", r / w.rows, ", ", r % w.rows,
                                         w.dtype == DType::kInt8 ? "" : detail::concat(", group ", g), "]"),
                          "a finite scale", s);
      }
    }
  }
}

void check_weight_param(const char* name, const WeightView& w, bool wanted, int64_t experts,
                        int64_t rows, int64_t cols, const char* why, DType layer_dtype) {
  if (w.empty() != !wanted) {
    throw_input_error(detail::concat("params.", name),
                      wanted ? detail::concat("a ", shape_text(experts, rows, cols), " weight") : detail::concat("none (", why, ")"),
                      w.empty() ? std::string("none") : shape_text(w.experts, w.rows, w.cols));
  }
  if (!wanted) return;
  if (w.experts != experts || w.rows != rows || w.cols != cols) {
    throw_input_error(detail::concat("params.", name, " shape"), shape_text(experts, rows, cols),
                      shape_text(w.experts, w.rows, w.cols));
  }
  if (is_quantized(w.dtype)) {
    check_quantized_weight(name, w, layer_dtype);
    return;
  }
  if (w.dtype != DType::kF32 && w.dtype != DType::kBF16) {
    throw_input_error(detail::concat("params.", name, " dtype"), "fp32, bf16 or the layer's quantized format",
                      static_cast<int>(w.dtype));
  }
  for (const auto& [part, list, base] : {std::tuple{"expert_data", w.expert_data, w.data},
                                         std::tuple{"expert_up_data", w.expert_up_data, w.up_data}}) {
    if (list.empty()) continue;
    if (static_cast<int64_t>(list.size()) != experts) {
      throw_input_error(detail::concat("params.", name, ".", part, " length"), experts, list.size());
    }
    if (base == nullptr || list[0] != base || std::find(list.begin(), list.end(), nullptr) != list.end()) {
      throw_input_error(detail::concat("params.", name, ".", part),
                        detail::concat("non-null pointers, the first equal to ", part == std::string("expert_data") ? "data" : "up_data"),
                        "a null or different pointer");
    }
  }
  if (w.expert_stride < 0 || w.row_stride < 0 || w.col_stride < 0) {
    throw_input_error(detail::concat("params.", name, " strides"), "non-negative (0: contiguous)",
                      shape_text(w.expert_stride, w.row_stride, w.col_stride));
  }
}

}  // namespace

void check_moe_params(const MoeLayerConfig& c, const MoeParams& p) {
  for_each_moe_field(p, [&](auto row, const auto& view) {
    const MoeParamSpec& s = kMoeParamSchema[row];
    const bool wanted = moe_param_used(s, c);
    const std::vector<int64_t> shape = moe_param_shape(s, c);
    const char* why = moe_param_absent_reason(s.used_when);
    using View = std::remove_cvref_t<decltype(view)>;
    if constexpr (std::is_same_v<View, ConstMatrixView<float>>) {
      check_matrix_param(s.name, view, wanted, shape[0], shape[1], why);
    } else if constexpr (std::is_same_v<View, std::span<const float>>) {
      int64_t size = 1;
      for (const int64_t v : shape) size *= v;
      check_vector_param(s.name, view, wanted, size, why);
    } else {
      check_weight_param(s.name, view, wanted, shape[0], shape[1], shape[2], why, c.dtype);
      // Only the rows with gate and up halves, and only for a gated activation, have an up half.
      if (view.up_data != nullptr && !(is_gated(c.activation) && s.up_name != nullptr)) {
        throw_input_error(detail::concat("params.", s.name, ".up_data"),
                          "null (only the gate_up weight of a gated activation has an up half)", "a pointer");
      }
    }
  });
}

}  // namespace moekit
