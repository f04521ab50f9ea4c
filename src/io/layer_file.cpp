// Layer files (include/moekit/layer_file.h): a MoeLayer's configuration and parameters in one
// safetensors file, read back through the mapping.
#include "moekit/layer_file.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "moekit/error.h"
#include "moekit/quant.h"
#include "moekit/safetensors.h"

namespace moekit {

namespace {

constexpr const char* kFormatKey = "format";
constexpr const char* kFormat = "moekit-layer";
constexpr const char* kConfigKey = "moekit_layer_config";

// Shape of every tensor of MoeTensors for `c` (expert weights as [experts, rows, cols]; the
// shared expert's as [1, rows, cols]); empty when the config does not use it.
struct TensorShape {
  const char* name;
  std::vector<int64_t> shape;
  bool expert_weight;
};

std::vector<TensorShape> layer_shapes(const MoeLayerConfig& c) {
  const int64_t E = c.num_experts(), d = c.d_model, rr = c.router_rows();
  const bool sh = c.has_shared();
  auto when = [](bool on, std::vector<int64_t> s) { return on ? s : std::vector<int64_t>{}; };
  return {
      {"router_weight", {rr, d}, false},
      {"router_bias", when(c.router_bias, {rr}), false},
      {"router_noise_weight", when(c.routing.noisy_gating, {E, d}), false},
      {"gate_up", {E, c.gate_up_rows(), d}, true},
      {"down", {E, d, c.d_ff}, true},
      {"gate_up_bias", when(c.expert_bias, {E, c.gate_up_rows()}), false},
      {"down_bias", when(c.expert_bias, {E, d}), false},
      {"shared_gate_up", when(sh, {1, c.shared_gate_up_rows(), d}), true},
      {"shared_down", when(sh, {1, d, c.effective_shared_d_ff()}), true},
      {"shared_gate_up_bias", when(sh && c.expert_bias, {c.shared_gate_up_rows()}), false},
      {"shared_down_bias", when(sh && c.expert_bias, {d}), false},
      {"shared_gate", when(c.shared_expert_gate, {d}), false},
      {"selection_bias", when(c.has_selection_bias(), {E}), false},
  };
}

int64_t product(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t v : s) n *= v;
  return n;
}

const WeightView& weight_of(const MoeParams& p, const std::string& name) {
  if (name == "gate_up") return p.gate_up;
  if (name == "down") return p.down;
  if (name == "shared_gate_up") return p.shared_gate_up;
  return p.shared_down;
}
WeightView& weight_of(MoeParams& p, const std::string& name) {
  return const_cast<WeightView&>(weight_of(std::as_const(p), name));
}

}  // namespace

void save_layer_file(const MoeLayer& layer, const std::string& path, const std::map<std::string, std::string>& metadata) {
  const MoeLayerConfig& c = layer.config();
  const MoeParams& p = layer.params();
  const MoeTensors t = moe_tensors_from_params(c, p);  // fp32 values of every parameter
  std::vector<TensorToWrite> f32, bf16, u8;
  std::vector<std::vector<uint16_t>> bf16_data;
  std::vector<std::vector<uint8_t>> u8_data;
  bf16_data.reserve(4);
  u8_data.reserve(8);
  std::map<std::string, const std::vector<float>*> values;
  t.for_each([&](const char* name, const std::vector<float>& v) { values[name] = &v; });
  for (const TensorShape& s : layer_shapes(c)) {
    if (s.shape.empty()) continue;
    const std::vector<float>& v = *values.at(s.name);
    if (!s.expert_weight || c.dtype == DType::kF32) {
      f32.push_back({s.name, TensorDType::kF32, s.shape, v.data()});
      continue;
    }
    if (c.dtype == DType::kBF16) {
      std::vector<uint16_t>& b = bf16_data.emplace_back(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &v[i], 4);
        b[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // finite: the layer checked
      }
      bf16.push_back({s.name, TensorDType::kBF16, s.shape, b.data()});
      continue;
    }
    // Quantized: the layer's own codes when its view holds them, else quantized here.
    const int64_t experts = s.shape[0], rows = s.shape[1], cols = s.shape[2];
    const int64_t cb = quantized_code_bytes(c.dtype, cols), sb = quantized_scale_bytes(c.dtype, cols);
    const WeightView& w = weight_of(p, s.name);
    const void* codes = w.data;
    const void* scales = w.scales;
    if (w.dtype != c.dtype) {
      std::vector<uint8_t>& qc = u8_data.emplace_back(static_cast<size_t>(experts * rows * cb));
      std::vector<uint8_t>& qs = u8_data.emplace_back(static_cast<size_t>(experts * rows * sb));
      for (int64_t r = 0; r < experts * rows; ++r)
        quantize_row(c.dtype, v.data() + r * cols, cols, qc.data() + r * cb, qs.data() + r * sb, s.name, r);
      codes = qc.data();
      scales = qs.data();
    }
    u8.push_back({std::string(s.name) + ".codes", TensorDType::kU8, {experts, rows, cb}, codes});
    u8.push_back({std::string(s.name) + ".scales", TensorDType::kU8, {experts, rows, sb}, scales});
  }
  // F32 first, then BF16, then bytes: every tensor stays aligned to its element.
  std::vector<TensorToWrite> all = f32;
  all.insert(all.end(), bf16.begin(), bf16.end());
  all.insert(all.end(), u8.begin(), u8.end());
  std::map<std::string, std::string> meta = metadata;
  meta[kFormatKey] = kFormat;
  meta[kConfigKey] = moe_layer_config_to_json(c);
  write_safetensors(path, all, meta);
}

struct LayerFile::Impl {
  SafetensorsFile file;
  MoeLayerConfig config;
  std::optional<MoeLayer> layer;
  explicit Impl(SafetensorsFile f) : file(std::move(f)) {}
};

LayerFile::LayerFile() = default;
LayerFile::LayerFile(LayerFile&&) noexcept = default;
LayerFile& LayerFile::operator=(LayerFile&&) noexcept = default;
LayerFile::~LayerFile() = default;

const MoeLayerConfig& LayerFile::config() const { return impl_->config; }
const std::map<std::string, std::string>& LayerFile::metadata() const { return impl_->file.metadata(); }
MoeLayer& LayerFile::moe() { return *impl_->layer; }

LayerFile LayerFile::open(const std::string& path, int num_threads) {
  LayerFile out;
  out.impl_ = std::make_unique<Impl>(SafetensorsFile::open(path));
  const SafetensorsFile& f = out.impl_->file;
  const auto& meta = f.metadata();
  const auto format = meta.find(kFormatKey);
  if (format == meta.end() || format->second != kFormat || meta.count(kConfigKey) == 0) {
    throw_input_error(path, detail::concat("a moekit layer file (metadata ", kFormatKey, " = ", kFormat, " and ", kConfigKey, ")"),
                      format == meta.end() ? std::string("no such metadata") : format->second);
  }
  MoeLayerConfig c = moe_layer_config_from_json(meta.at(kConfigKey));
  if (num_threads > 0) c.num_threads = num_threads;
  out.impl_->config = c;

  auto tensor = [&](const std::string& name, TensorDType dtype, const std::vector<int64_t>& shape, size_t align) {
    const TensorView& v = f.at(name);
    if (v.dtype != dtype) throw_input_error(path + ": " + name + " dtype", tensor_dtype_name(dtype), tensor_dtype_name(v.dtype));
    if (v.shape != shape) throw_input_error(path + ": " + name + " shape", shape_text(shape), shape_text(v.shape));
    if (reinterpret_cast<uintptr_t>(v.data) % align != 0) {
      throw_input_error(path + ": " + name + " offset", detail::concat("aligned to ", align, " bytes"), "misaligned");
    }
    return v.data;
  };
  MoeParams p;
  for (const TensorShape& s : layer_shapes(c)) {
    if (s.shape.empty()) continue;
    const std::string name = s.name;
    if (s.expert_weight) {
      WeightView& w = weight_of(p, name);
      w.experts = s.shape[0];
      w.rows = s.shape[1];
      w.cols = s.shape[2];
      w.dtype = c.dtype;
      if (is_quantized(c.dtype)) {
        w.data = tensor(name + ".codes", TensorDType::kU8, {w.experts, w.rows, quantized_code_bytes(c.dtype, w.cols)}, 1);
        w.scales = tensor(name + ".scales", TensorDType::kU8, {w.experts, w.rows, quantized_scale_bytes(c.dtype, w.cols)}, 1);
      } else if (c.dtype == DType::kBF16) {
        w.data = tensor(name, TensorDType::kBF16, s.shape, 2);
      } else {
        w.data = tensor(name, TensorDType::kF32, s.shape, 4);
      }
      continue;
    }
    const auto* data = static_cast<const float*>(tensor(name, TensorDType::kF32, s.shape, 4));
    const std::span<const float> span(data, static_cast<size_t>(product(s.shape)));
    if (name == "router_weight") p.router_weight = {data, s.shape[0], s.shape[1]};
    else if (name == "router_noise_weight") p.router_noise_weight = {data, s.shape[0], s.shape[1]};
    else if (name == "router_bias") p.router_bias = span;
    else if (name == "gate_up_bias") p.gate_up_bias = span;
    else if (name == "down_bias") p.down_bias = span;
    else if (name == "shared_gate_up_bias") p.shared_gate_up_bias = span;
    else if (name == "shared_down_bias") p.shared_down_bias = span;
    else if (name == "shared_gate") p.shared_gate = span;
    else if (name == "selection_bias") p.selection_bias = span;
  }
  // Non-finite values: the scales are checked by the layer (check_moe_params); fp32 tensors here.
  for (const TensorView& v : f.tensors()) {
    if (v.dtype != TensorDType::kF32) continue;
    const auto* x = static_cast<const float*>(v.data);
    for (int64_t i = 0; i < v.num_elements(); ++i)
      if (!std::isfinite(x[i])) throw_input_error(detail::concat(path, ": ", v.name, "[", i, "]"), "a finite value", x[i]);
  }
  out.impl_->layer.emplace(c, p);
  return out;
}

}  // namespace moekit
