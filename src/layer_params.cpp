// Parameters of the layer: owned storage, views, and their shape checks.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <string>

#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/quant.h"

namespace moekit {

// ---------------------------------------------------------------------------------------------
// Parameter tensors and views.

std::vector<std::pair<const char*, int64_t>> moe_tensor_sizes(const MoeLayerConfig& c) {
  c.validate();
  const int64_t num_experts = c.num_experts(), d = c.d_model, f = c.d_ff, rows = c.gate_up_rows();
  const bool shared = c.has_shared();
  return {
      {"router_weight", c.router_rows() * d},
      {"router_bias", c.router_bias ? c.router_rows() : 0},
      {"router_noise_weight", c.routing.noisy_gating ? num_experts * d : 0},
      {"gate_up", num_experts * rows * d},
      {"down", num_experts * d * f},
      {"gate_up_bias", c.expert_bias ? num_experts * rows : 0},
      {"down_bias", c.expert_bias ? num_experts * d : 0},
      {"shared_gate_up", shared ? c.shared_gate_up_rows() * d : 0},
      {"shared_down", shared ? d * c.effective_shared_d_ff() : 0},
      {"shared_gate_up_bias", shared && c.expert_bias ? c.shared_gate_up_rows() : 0},
      {"shared_down_bias", shared && c.expert_bias ? d : 0},
      {"shared_gate", shared && c.shared_expert_gate ? d : 0},
      {"selection_bias", c.has_selection_bias() ? num_experts : 0},
  };
}

template <typename Real>
BasicMoeTensors<Real> make_moe_tensors(const MoeLayerConfig& c) {
  const auto sizes = moe_tensor_sizes(c);
  BasicMoeTensors<Real> t;
  size_t i = 0;
  t.for_each([&](const char*, std::vector<Real>& v) { v.assign(static_cast<size_t>(sizes[i++].second), Real(0)); });
  std::copy(c.routing.e_score_correction_bias.begin(), c.routing.e_score_correction_bias.end(),
            t.selection_bias.begin());
  return t;
}

template BasicMoeTensors<float> make_moe_tensors<float>(const MoeLayerConfig&);
template BasicMoeTensors<double> make_moe_tensors<double>(const MoeLayerConfig&);

MoeGradBuffers moe_grad_buffers(MoeTensors& t) {
  // Both lists run in MoeTensors' order; the buffers stop before the selection bias.
  std::vector<std::vector<float>*> tensors;
  t.for_each([&](const char*, std::vector<float>& v) { tensors.push_back(&v); });
  MoeGradBuffers b;
  size_t i = 0;
  b.for_each([&](const char*, std::span<float>& span) { span = *tensors[i++]; });
  return b;
}

MoeParams moe_params_view(const MoeLayerConfig& c, const MoeTensors& t) {
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  auto weights = [](const std::vector<float>& v, int64_t experts, int64_t rows, int64_t cols) {
    return v.empty() ? WeightView{} : WeightView{v.data(), DType::kF32, experts, rows, cols};
  };
  MoeParams p;
  p.router_weight = {t.router_weight.data(), c.router_rows(), d};
  p.router_bias = t.router_bias;
  if (!t.router_noise_weight.empty()) p.router_noise_weight = {t.router_noise_weight.data(), num_experts, d};
  p.gate_up = weights(t.gate_up, num_experts, c.gate_up_rows(), d);
  p.down = weights(t.down, num_experts, d, c.d_ff);
  p.gate_up_bias = t.gate_up_bias;
  p.down_bias = t.down_bias;
  p.shared_gate_up = weights(t.shared_gate_up, 1, c.shared_gate_up_rows(), d);
  p.shared_down = weights(t.shared_down, 1, d, c.effective_shared_d_ff());
  p.shared_gate_up_bias = t.shared_gate_up_bias;
  p.shared_down_bias = t.shared_down_bias;
  p.shared_gate = t.shared_gate;
  p.selection_bias = t.selection_bias;
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

}  // namespace

MoeTensors moe_tensors_from_params(const MoeLayerConfig& c, const MoeParams& p) {
  check_moe_params(c, p);
  MoeTensors t = make_moe_tensors<float>(c);
  const auto copy_span = [](std::span<const float> from, std::vector<float>& to) { std::copy(from.begin(), from.end(), to.begin()); };
  const auto copy_matrix = [](ConstMatrixView<float> m, std::vector<float>& to) {
    if (m.data != nullptr) std::copy(m.data, m.data + m.rows * m.cols, to.begin());
  };
  copy_matrix(p.router_weight, t.router_weight);
  copy_span(p.router_bias, t.router_bias);
  copy_matrix(p.router_noise_weight, t.router_noise_weight);
  copy_weight(p.gate_up, t.gate_up);
  copy_weight(p.down, t.down);
  copy_span(p.gate_up_bias, t.gate_up_bias);
  copy_span(p.down_bias, t.down_bias);
  copy_weight(p.shared_gate_up, t.shared_gate_up);
  copy_weight(p.shared_down, t.shared_down);
  copy_span(p.shared_gate_up_bias, t.shared_gate_up_bias);
  copy_span(p.shared_down_bias, t.shared_down_bias);
  copy_span(p.shared_gate, t.shared_gate);
  copy_span(p.selection_bias, t.selection_bias);
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
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  check_matrix_param("router_weight", p.router_weight, true, c.router_rows(), d, "");
  check_vector_param("router_bias", p.router_bias, c.router_bias, c.router_rows(), "router_bias is false");
  check_matrix_param("router_noise_weight", p.router_noise_weight, c.routing.noisy_gating, num_experts, d,
                     "noisy_gating is false");
  check_weight_param("gate_up", p.gate_up, true, num_experts, c.gate_up_rows(), d, "", c.dtype);
  check_weight_param("down", p.down, true, num_experts, d, c.d_ff, "", c.dtype);
  check_vector_param("gate_up_bias", p.gate_up_bias, c.expert_bias, num_experts * c.gate_up_rows(),
                     "expert_bias is false");
  check_vector_param("down_bias", p.down_bias, c.expert_bias, num_experts * d, "expert_bias is false");
  const bool shared = c.has_shared();
  check_weight_param("shared_gate_up", p.shared_gate_up, shared, 1, c.shared_gate_up_rows(), d,
                     "num_shared_experts is 0", c.dtype);
  check_weight_param("shared_down", p.shared_down, shared, 1, d, c.effective_shared_d_ff(),
                     "num_shared_experts is 0", c.dtype);
  check_vector_param("shared_gate_up_bias", p.shared_gate_up_bias, shared && c.expert_bias,
                     c.shared_gate_up_rows(), "no shared expert biases");
  check_vector_param("shared_down_bias", p.shared_down_bias, shared && c.expert_bias, d,
                     "no shared expert biases");
  check_vector_param("shared_gate", p.shared_gate, c.shared_expert_gate, d, "shared_expert_gate is false");
  const bool gated = is_gated(c.activation);
  for (const auto& [name, w] : {std::pair<const char*, const WeightView*>{"gate_up", &p.gate_up},
                                {"shared_gate_up", &p.shared_gate_up}, {"down", &p.down},
                                {"shared_down", &p.shared_down}}) {
    const bool may_split = gated && std::string(name).find("gate_up") != std::string::npos;
    if (w->up_data != nullptr && !may_split) {
      throw_input_error(detail::concat("params.", name, ".up_data"),
                        "null (only the gate_up weight of a gated activation has an up half)", "a pointer");
    }
  }
  check_vector_param("selection_bias", p.selection_bias, c.has_selection_bias(), num_experts,
                     "selection_bias is false and no e_score_correction_bias is given");
}


}  // namespace moekit
