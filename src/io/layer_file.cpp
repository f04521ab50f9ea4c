// Layer files (include/moekit/layer_file.h): a MoeLayer's configuration and parameters in one
// safetensors file, read back through the mapping.
#include "moekit/layer_file.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "moekit/error.h"
#include "moekit/quant.h"
#include "moekit/safetensors.h"

namespace moekit {

namespace {

constexpr const char* kFormatKey = "format";
constexpr const char* kFormat = "moekit-layer";
constexpr const char* kConfigKey = "moekit_layer_config";

int64_t product(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t v : s) n *= v;
  return n;
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
  // One tensor per parameter the config uses, named and shaped as the schema's row (params.h);
  // the parameters in the layer's weight format keep it.
  for_each_moe_field(p, [&](auto row, const auto& view) {
    const MoeParamSpec& s = kMoeParamSchema[row];
    if (!moe_param_used(s, c)) return;
    const std::vector<int64_t> shape = moe_param_shape(s, c);
    const std::vector<float>& v = moe_param_field<row>(t);
    if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(view)>, WeightView>) {
      f32.push_back({s.name, TensorDType::kF32, shape, v.data()});
    } else if (c.dtype == DType::kF32) {
      f32.push_back({s.name, TensorDType::kF32, shape, v.data()});
    } else if (c.dtype == DType::kBF16) {
      std::vector<uint16_t>& b = bf16_data.emplace_back(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &v[i], 4);
        b[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // finite: the layer checked
      }
      bf16.push_back({s.name, TensorDType::kBF16, shape, b.data()});
    } else {
      // Quantized: the layer's own codes when its view holds them, else quantized here.
      const int64_t experts = shape[0], rows = shape[1], cols = shape[2];
      const int64_t cb = quantized_code_bytes(c.dtype, cols), sb = quantized_scale_bytes(c.dtype, cols);
      const void* codes = view.data;
      const void* scales = view.scales;
      if (view.dtype != c.dtype) {
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
  });
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
  for_each_moe_field(p, [&](auto row, auto& view) {
    const MoeParamSpec& s = kMoeParamSchema[row];
    if (!moe_param_used(s, c)) return;
    const std::string name = s.name;
    const std::vector<int64_t> shape = moe_param_shape(s, c);
    using View = std::remove_reference_t<decltype(view)>;
    if constexpr (std::is_same_v<View, WeightView>) {
      WeightView& w = view;
      w.experts = shape[0];
      w.rows = shape[1];
      w.cols = shape[2];
      w.dtype = c.dtype;
      if (is_quantized(c.dtype)) {
        w.data = tensor(name + ".codes", TensorDType::kU8, {w.experts, w.rows, quantized_code_bytes(c.dtype, w.cols)}, 1);
        w.scales = tensor(name + ".scales", TensorDType::kU8, {w.experts, w.rows, quantized_scale_bytes(c.dtype, w.cols)}, 1);
      } else if (c.dtype == DType::kBF16) {
        w.data = tensor(name, TensorDType::kBF16, shape, 2);
      } else {
        w.data = tensor(name, TensorDType::kF32, shape, 4);
      }
    } else {
      const auto* data = static_cast<const float*>(tensor(name, TensorDType::kF32, shape, 4));
      if constexpr (std::is_same_v<View, ConstMatrixView<float>>) {
        view = ConstMatrixView<float>(data, shape[0], shape[1]);
      } else {
        view = std::span<const float>(data, static_cast<size_t>(product(shape)));
      }
    }
  });
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
