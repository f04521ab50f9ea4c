// A checkpoint's MoE layer (pretrained.h): tensor names per family, borrowed views where the
// stored dtype and alignment allow, conversions otherwise.
#include "moekit/pretrained.h"

#include <cstdint>
#include <cstring>
#include <optional>

#include "moekit/error.h"
#include "moekit/quant.h"

namespace moekit {

namespace {

float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

bool aligned(const void* p, size_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; }

}  // namespace

struct PretrainedLayer::Impl {
  std::shared_ptr<const Checkpoint> checkpoint;
  ModelFamily family;
  ModelLayer layer;
  MoeLayerConfig config;
  MoeParams params;
  std::vector<LoadedParameter> sources;
  // Conversions this object owns (vectors of vectors: their buffers never move).
  std::vector<std::vector<float>> owned;
  std::vector<std::vector<uint16_t>> owned_bf16;
  std::vector<std::vector<const void*>> pointer_lists;
  std::optional<MoeLayer> moe;

  std::string where() const { return checkpoint->dir(); }

  [[noreturn]] void fault(const std::string& tensor, const std::string& field, const std::string& expected,
                          const std::string& actual) const {
    throw_input_error(detail::concat(where(), ": tensor ", tensor, field.empty() ? "" : " ", field), expected, actual);
  }

  const TensorView* find(const std::string& name) const { return checkpoint->find(name); }

  const TensorView& tensor(const std::string& name, const std::vector<int64_t>& shape) const {
    const TensorView* t = find(name);
    if (t == nullptr) fault(name, "", "present (layer " + layer.name + " of a " + family.model_type + " checkpoint)", "missing");
    if (t->shape != shape) fault(name, "shape", shape_text(shape), shape_text(t->shape));
    check_finite(*t);
    return *t;
  }

  // NaN and Inf are refused at load, where the tensor is known, rather than surfacing as a
  // non-finite output. A test of the exponent bits (all ones) per element, fp32/bf16/f16.
  void check_finite(const TensorView& t) const {
    const int64_t n = t.num_elements();
    int64_t bad = -1;
    const auto scan = [&](auto word, auto mask) {
      using Word = decltype(word);
      const auto* p = static_cast<const uint8_t*>(t.data);
      for (int64_t i = 0; i < n && bad < 0; ++i) {
        Word w;
        std::memcpy(&w, p + i * static_cast<int64_t>(sizeof(Word)), sizeof(Word));
        if ((w & mask) == mask) bad = i;
      }
    };
    if (t.dtype == TensorDType::kF32) scan(uint32_t{}, uint32_t{0x7f800000});
    if (t.dtype == TensorDType::kBF16) scan(uint16_t{}, uint16_t{0x7f80});
    if (t.dtype == TensorDType::kF16) scan(uint16_t{}, uint16_t{0x7c00});
    if (bad >= 0) fault(t.name, detail::concat("element ", bad), "a finite number", detail::concat(element(t, bad)));
  }

  std::vector<float>& own(size_t n) {
    owned.emplace_back(n);
    return owned.back();
  }

  // Memory for a converted weight of n elements in the layer's dtype: fp32, or bf16 when the
  // layer computes in bf16 — packing would round the fp32 values to these same bf16 values
  // (round to nearest even), so half the memory gives the same results. Filled expert by
  // expert through put() from an fp32 scratch of one expert, so the fp32 copy of the whole
  // stack never exists either.
  struct Converted {
    void* data = nullptr;
    DType dtype = DType::kF32;
  };
  Converted own_weight(size_t n) {
    if (config.dtype == DType::kBF16) return {owned_bf16.emplace_back(n).data(), DType::kBF16};
    return {own(n).data(), DType::kF32};
  }
  static void put(const Converted& c, size_t offset, const float* src, size_t n) {
    if (c.dtype == DType::kF32) {
      std::memcpy(static_cast<float*>(c.data) + offset, src, n * sizeof(float));
      return;
    }
    uint16_t* dst = static_cast<uint16_t*>(c.data) + offset;
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, &src[i], 4);
      dst[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // finite: checked at load
    }
  }
  const char* target_name() const { return config.dtype == DType::kBF16 ? "bf16" : "fp32"; }

  // Element i of a F32/BF16/F16 tensor as float, exactly.
  static float element(const TensorView& t, int64_t i) {
    const auto* bytes = static_cast<const uint8_t*>(t.data);
    switch (t.dtype) {
      case TensorDType::kF32: {
        float f;
        std::memcpy(&f, bytes + 4 * i, 4);
        return f;
      }
      case TensorDType::kBF16: {
        uint16_t b;
        std::memcpy(&b, bytes + 2 * i, 2);
        return bf16_bits_to_float(b);
      }
      default: {
        uint16_t b;
        std::memcpy(&b, bytes + 2 * i, 2);
        return fp16_to_float(b);
      }
    }
  }

  void check_float_dtype(const TensorView& t) const {
    if (t.dtype != TensorDType::kF32 && t.dtype != TensorDType::kBF16 && t.dtype != TensorDType::kF16) {
      fault(t.name, "dtype", "F32, BF16 or F16", tensor_dtype_name(t.dtype));
    }
  }

  // Elements [begin, begin + n) as fp32 into `out` (all of them when n < 0).
  void convert(const TensorView& t, float* out, int64_t begin = 0, int64_t n = -1) const {
    check_float_dtype(t);
    if (n < 0) n = t.num_elements();
    if (t.dtype == TensorDType::kF32) {
      std::memcpy(out, static_cast<const uint8_t*>(t.data) + 4 * begin, static_cast<size_t>(n) * 4);
      return;
    }
    for (int64_t i = 0; i < n; ++i) out[i] = element(t, begin + i);
  }

  // A whole stored stack [experts, per_expert elements] converted into the layer's dtype,
  // expert by expert.
  Converted convert_stack(const TensorView& t, int64_t experts) {
    const int64_t per = t.num_elements() / experts;
    const Converted c = own_weight(static_cast<size_t>(t.num_elements()));
    std::vector<float> scratch(static_cast<size_t>(per));
    for (int64_t e = 0; e < experts; ++e) {
      convert(t, scratch.data(), e * per, per);
      put(c, static_cast<size_t>(e * per), scratch.data(), scratch.size());
    }
    return c;
  }

  // An fp32 vector/matrix parameter: borrowed when stored F32 and aligned, else converted.
  std::span<const float> floats(const char* parameter, const std::string& name, const std::vector<int64_t>& shape) {
    const TensorView& t = tensor(name, shape);
    check_float_dtype(t);
    const size_t n = static_cast<size_t>(t.num_elements());
    LoadedParameter s{parameter, name, std::string(tensor_dtype_name(t.dtype)) + " " + shape_text(shape), "borrowed"};
    std::span<const float> result;
    if (t.dtype == TensorDType::kF32 && aligned(t.data, alignof(float))) {
      result = {static_cast<const float*>(t.data), n};
    } else {
      std::vector<float>& v = own(n);
      convert(t, v.data());
      s.how = t.dtype == TensorDType::kF32 ? "copied (misaligned in the file)"
                                           : std::string("converted ") + tensor_dtype_name(t.dtype) + " → fp32";
      result = v;
    }
    sources.push_back(s);
    return result;
  }

  // A borrowable weight tensor: F32 or BF16, aligned to its element.
  static bool borrowable(const TensorView& t) {
    return (t.dtype == TensorDType::kF32 && aligned(t.data, 4)) || (t.dtype == TensorDType::kBF16 && aligned(t.data, 2));
  }
  static DType weight_dtype(const TensorView& t) { return t.dtype == TensorDType::kBF16 ? DType::kBF16 : DType::kF32; }

  // A stored weight matrix [rows, cols] (out × in) as fp32 into `out`: plain, or FP8 E4M3 with
  // its `<name>_scale_inv` block scales (name ends in ".weight").
  void matrix_to_f32(const std::string& name, int64_t rows, int64_t cols, float* out) const {
    const TensorView& t = tensor(name, {rows, cols});
    if (t.dtype == TensorDType::kF8E4M3) {
      const int64_t br = family.fp8_block_rows, bc = family.fp8_block_cols;
      const TensorView& s = tensor(name + "_scale_inv", {(rows + br - 1) / br, (cols + bc - 1) / bc});
      if (s.dtype != TensorDType::kF32 && s.dtype != TensorDType::kBF16) fault(s.name, "dtype", "F32 or BF16", tensor_dtype_name(s.dtype));
      std::vector<float> scale(static_cast<size_t>(s.num_elements()));
      for (int64_t i = 0; i < s.num_elements(); ++i) scale[static_cast<size_t>(i)] = element(s, i);
      dequantize_fp8_blocks(static_cast<const uint8_t*>(t.data), scale.data(), rows, cols, br, bc, out, name.c_str());
      return;
    }
    convert(t, out);
  }

  // For weights: converted into the layer's dtype.
  std::string how_converted(const TensorView& t) const {
    if (t.dtype == TensorDType::kF8E4M3) {
      return detail::concat("dequantized F8_E4M3 (", family.fp8_block_rows, " × ", family.fp8_block_cols,
                            " block scales) → ", target_name());
    }
    if (t.dtype == TensorDType::kF32 && config.dtype == DType::kF32) return "copied (misaligned in the file)";
    return detail::concat("converted ", tensor_dtype_name(t.dtype), " → ", target_name());
  }

  // One MLP weight made of per-expert matrices: names[e] (and up_names[e] for a gate/up pair),
  // each [rows, cols]. Borrowed through per-expert pointers when every part is borrowable and
  // of one dtype; else converted into one owned stack [experts, (2·)rows, cols].
  WeightView per_expert(const char* parameter, const std::vector<std::string>& names,
                        const std::vector<std::string>& up_names, int64_t rows, int64_t cols,
                        const std::string& pattern) {
    const int64_t experts = static_cast<int64_t>(names.size());
    const bool split = !up_names.empty();
    std::vector<const TensorView*> parts;
    for (const std::string& n : names) parts.push_back(&tensor(n, {rows, cols}));
    for (const std::string& n : up_names) parts.push_back(&tensor(n, {rows, cols}));
    bool borrow = true;
    for (const TensorView* t : parts) borrow = borrow && borrowable(*t) && t->dtype == parts[0]->dtype;
    const int64_t total_rows = split ? 2 * rows : rows;
    LoadedParameter s{parameter, pattern,
                      detail::concat(tensor_dtype_name(parts[0]->dtype), " ", experts, (split ? " × 2" : ""), " × ",
                                     shape_text(rows, cols), " per expert"),
                      "borrowed (one pointer per expert)"};
    WeightView w;
    w.experts = experts;
    w.rows = total_rows;
    w.cols = cols;
    if (borrow) {
      w.dtype = weight_dtype(*parts[0]);
      std::vector<const void*>& base = pointer_lists.emplace_back();
      for (int64_t e = 0; e < experts; ++e) base.push_back(parts[static_cast<size_t>(e)]->data);
      w.data = base[0];
      w.expert_data = base;
      if (split) {
        std::vector<const void*>& up = pointer_lists.emplace_back();
        for (int64_t e = 0; e < experts; ++e) up.push_back(parts[static_cast<size_t>(experts + e)]->data);
        w.up_data = up[0];
        w.expert_up_data = up;
      }
    } else {
      const Converted c = own_weight(static_cast<size_t>(experts * total_rows * cols));
      std::vector<float> scratch(static_cast<size_t>(rows * cols));
      for (int64_t e = 0; e < experts; ++e) {
        const size_t at = static_cast<size_t>(e * total_rows * cols);
        matrix_to_f32(names[static_cast<size_t>(e)], rows, cols, scratch.data());
        put(c, at, scratch.data(), scratch.size());
        if (split) {
          matrix_to_f32(up_names[static_cast<size_t>(e)], rows, cols, scratch.data());
          put(c, at + scratch.size(), scratch.data(), scratch.size());
        }
      }
      w.data = c.data;
      w.dtype = c.dtype;
      s.how = how_converted(*parts[0]);
    }
    sources.push_back(s);
    return w;
  }

  // An HF 5.x stacked weight [experts, rows, cols]: borrowed, else converted.
  WeightView stacked(const char* parameter, const std::string& name, int64_t experts, int64_t rows, int64_t cols) {
    const TensorView& t = tensor(name, {experts, rows, cols});
    LoadedParameter s{parameter, name, std::string(tensor_dtype_name(t.dtype)) + " " + shape_text(t.shape), "borrowed"};
    WeightView w{nullptr, DType::kF32, experts, rows, cols};
    if (borrowable(t)) {
      w.data = t.data;
      w.dtype = weight_dtype(t);
    } else {
      const Converted c = convert_stack(t, experts);
      w.data = c.data;
      w.dtype = c.dtype;
      s.how = how_converted(t);
    }
    sources.push_back(s);
    return w;
  }

  std::vector<std::string> expert_names(const std::string& format) const {
    std::vector<std::string> out;
    const std::string mark = "{e}";
    for (int64_t e = 0; e < config.num_experts(); ++e) {
      std::string n = format;
      n.replace(n.find(mark), mark.size(), std::to_string(e));
      out.push_back(n);
    }
    return out;
  }

  std::string first_present(const std::vector<std::string>& candidates) const {
    for (const std::string& c : candidates) {
      if (find(c) != nullptr) return c;
    }
    return "";
  }

  void load_router(const std::string& mlp) {
    const int64_t d = config.d_model, rows = config.router_rows();
    std::string w = first_present({mlp + ".gate.weight", mlp + ".router.weight", mlp + ".router.classifier.weight"});
    if (w.empty()) {
      fault(mlp + ".gate.weight", "", "present (the router; also looked for " + mlp + ".router.weight and " + mlp +
                                          ".router.classifier.weight)", "missing");
    }
    const std::span<const float> weight = floats("router_weight", w, {rows, d});
    params.router_weight = ConstMatrixView<float>(weight.data(), rows, d);
    const std::string stem = w.substr(0, w.size() - std::string("weight").size());
    if (config.router_bias) params.router_bias = floats("router_bias", stem + "bias", {rows});
    if (config.has_selection_bias()) {
      params.selection_bias = floats("selection_bias", stem + "e_score_correction_bias", {config.num_experts()});
    }
  }

  void load_gpt_oss_experts(const std::string& mlp) {
    const int64_t experts = config.num_experts(), d = config.d_model, f = config.d_ff;
    const std::string x = mlp + ".experts.";
    if (find(x + "gate_up_proj_blocks") != nullptr) {
      load_mxfp4_experts(x);
    } else {
      // [E, d, 2f]: moekit's gate row r is column 2r, up row r column 2r + 1; down [E, f, d]:
      // moekit's down element (row o, col i) = down_proj[e][i][o].
      const TensorView& gu = tensor(x + "gate_up_proj", {experts, d, 2 * f});
      const TensorView& dn = tensor(x + "down_proj", {experts, f, d});
      for (const TensorView* t : {&gu, &dn}) {
        if (!borrowable(*t)) check_float_dtype(*t);
      }
      params.gate_up = strided_or_owned("gate_up", gu, experts, 2 * f, d, /*row_stride=*/2, /*col_stride=*/2 * f,
                                        /*up_offset=*/1, "[E, d, 2·d_ff], gate/up interleaved");
      params.down = strided_or_owned("down", dn, experts, d, f, /*row_stride=*/1, /*col_stride=*/d, 0,
                                     "[E, d_ff, d] (transposed)");
    }
    // Bias [E, 2f] interleaved → gate first, then up (the layer's order).
    const std::span<const float> gub = floats("gate_up_bias", x + "gate_up_proj_bias", {experts, 2 * f});
    std::vector<float>& b = own(static_cast<size_t>(experts * 2 * f));
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t i = 0; i < f; ++i) {
        b[static_cast<size_t>(e * 2 * f + i)] = gub[static_cast<size_t>(e * 2 * f + 2 * i)];
        b[static_cast<size_t>(e * 2 * f + f + i)] = gub[static_cast<size_t>(e * 2 * f + 2 * i + 1)];
      }
    }
    LoadedParameter& bias = sources.back();
    bias.how = bias.how == "borrowed" ? "copied, reordered gate first" : bias.how + ", reordered gate first";
    params.gate_up_bias = b;
    params.down_bias = floats("down_bias", x + "down_proj_bias", {experts, d});
  }

  // A weight read through strides from one tensor `t`; converted to fp32 first (same strides)
  // when its dtype or alignment cannot be read in place.
  WeightView strided_or_owned(const char* parameter, const TensorView& t, int64_t experts, int64_t rows, int64_t cols,
                              int64_t row_stride, int64_t col_stride, int64_t up_offset, const std::string& layout) {
    LoadedParameter s{parameter, t.name, std::string(tensor_dtype_name(t.dtype)) + " " + shape_text(t.shape) + " " + layout,
                      "borrowed (strided view)"};
    WeightView w{nullptr, DType::kF32, experts, rows, cols};
    w.expert_stride = t.num_elements() / experts;
    w.row_stride = row_stride;
    w.col_stride = col_stride;
    const void* base = t.data;
    size_t element = static_cast<size_t>(tensor_dtype_size(t.dtype));
    if (borrowable(t)) {
      w.dtype = weight_dtype(t);
    } else {
      const Converted c = convert_stack(t, experts);
      base = c.data;
      w.dtype = c.dtype;
      element = c.dtype == DType::kBF16 ? 2 : 4;
      s.how = how_converted(t) + " (same layout)";
    }
    w.data = base;
    if (up_offset != 0) w.up_data = static_cast<const uint8_t*>(base) + static_cast<size_t>(up_offset) * element;
    sources.push_back(s);
    return w;
  }

  // gpt-oss MXFP4: *_blocks [E, out, in/32, 16] + *_scales [E, out, in/32] dequantize to
  // [E, out, in] (before transformers' transpose): gate_up out rows interleave gate (even) and
  // up (odd); down is [E, d, d_ff], the layer's layout.
  void load_mxfp4_experts(const std::string& x) {
    const int64_t experts = config.num_experts(), d = config.d_model, f = config.d_ff;
    if (d % 32 != 0 || f % 32 != 0) {
      fault(x + "gate_up_proj_blocks", "", "d_model and d_ff multiples of 32 (MXFP4 blocks of 32)",
            detail::concat("d_model ", d, ", d_ff ", f));
    }
    const auto dequantize = [&](const char* parameter, const std::string& stem, int64_t out_rows, int64_t in_cols) {
      const TensorView& blocks = tensor(stem + "_blocks", {experts, out_rows, in_cols / 32, 16});
      const TensorView& scales = tensor(stem + "_scales", {experts, out_rows, in_cols / 32});
      for (const TensorView* t : {&blocks, &scales}) {
        if (t->dtype != TensorDType::kU8) fault(t->name, "dtype", "U8", tensor_dtype_name(t->dtype));
      }
      const int64_t per = out_rows * in_cols, groups = in_cols / 32;
      const Converted c = own_weight(static_cast<size_t>(experts * per));
      std::vector<float> scratch(static_cast<size_t>(per));
      for (int64_t e = 0; e < experts; ++e) {
        dequantize_mxfp4(static_cast<const uint8_t*>(blocks.data) + e * out_rows * groups * 16,
                         static_cast<const uint8_t*>(scales.data) + e * out_rows * groups, out_rows, groups,
                         scratch.data(), blocks.name.c_str());
        put(c, static_cast<size_t>(e * per), scratch.data(), scratch.size());
      }
      sources.push_back({parameter, stem + "_blocks + _scales", detail::concat("MXFP4 ", shape_text(blocks.shape)),
                         std::string("dequantized MXFP4 → ") + target_name()});
      return c;
    };
    const Converted gu = dequantize("gate_up", x + "gate_up_proj", 2 * f, d);
    WeightView g{gu.data, gu.dtype, experts, 2 * f, d};
    g.expert_stride = 2 * f * d;
    g.row_stride = 2 * d;
    g.col_stride = 1;
    g.up_data = static_cast<const uint8_t*>(gu.data) + static_cast<size_t>(d) * (gu.dtype == DType::kBF16 ? 2 : 4);
    params.gate_up = g;
    const Converted dn = dequantize("down", x + "down_proj", d, f);
    params.down = WeightView{dn.data, dn.dtype, experts, d, f};
  }

  void load_experts(const std::string& mlp) {
    const int64_t experts = config.num_experts(), d = config.d_model, f = config.d_ff;
    const std::string x = mlp + ".experts.";
    const bool gated = is_gated(config.activation);
    if (find(x + "gate_up_proj") != nullptr || find(x + "down_proj") != nullptr) {
      params.gate_up = stacked("gate_up", x + "gate_up_proj", experts, config.gate_up_rows(), d);
      params.down = stacked("down", x + "down_proj", experts, d, f);
      if (config.expert_bias) {
        params.gate_up_bias = floats("gate_up_bias", x + "gate_up_proj_bias", {experts, config.gate_up_rows()});
        params.down_bias = floats("down_bias", x + "down_proj_bias", {experts, d});
      }
      return;
    }
    // Per-expert tensors under one of the names transformers has written.
    struct Names {
      const char* gate;
      const char* up;
      const char* down;
    };
    const std::vector<Names> spellings = {{"{e}.gate_proj", "{e}.up_proj", "{e}.down_proj"},
                                          {"{e}.w1", "{e}.w3", "{e}.w2"},
                                          {"expert_{e}.wi", nullptr, "expert_{e}.wo"}};
    for (const Names& n : spellings) {
      const std::string down = x + n.down + ".weight";
      if (find(expert_names(down)[0]) == nullptr) continue;
      const std::string gate = x + n.gate + ".weight";
      if (gated && n.up == nullptr) fault(gate, "", "a gated expert (gate and up projections)", "one projection (wi)");
      if (gated) {
        const std::string up = x + n.up + ".weight";
        params.gate_up = per_expert("gate_up", expert_names(gate), expert_names(up), f, d,
                                    replace_all(gate, "{e}", "{0.." + std::to_string(experts - 1) + "}") + " + " +
                                        replace_all(up, "{e}", "*"));
      } else {
        // Ungated: one [d_ff, d] projection ("up" in HF's shared MLPs, wi in Switch).
        const std::string up = n.up == nullptr ? gate : x + n.up + ".weight";
        params.gate_up = per_expert("gate_up", expert_names(up), {}, f, d,
                                    replace_all(up, "{e}", "{0.." + std::to_string(experts - 1) + "}"));
      }
      params.down = per_expert("down", expert_names(down), {}, d, f,
                               replace_all(down, "{e}", "{0.." + std::to_string(experts - 1) + "}"));
      if (config.expert_bias) fault(x, "", "no expert biases in the per-expert layout", "expert_bias true");
      return;
    }
    fault(x + "gate_up_proj", "", "present (the experts; also looked for " + x + "0.gate_proj.weight, " + x +
                                      "0.w1.weight and " + x + "expert_0.wi.weight)", "missing");
  }

  static std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
    return s;
  }

  void load_shared(const std::string& mlp) {
    const int64_t d = config.d_model, sf = config.effective_shared_d_ff();
    const std::string stem = first_present({mlp + ".shared_expert.down_proj.weight", mlp + ".shared_experts.down_proj.weight"});
    if (stem.empty()) {
      fault(mlp + ".shared_expert.down_proj.weight", "", "present (the shared expert; also looked for " + mlp +
                                                             ".shared_experts.down_proj.weight)", "missing");
    }
    const std::string s = stem.substr(0, stem.size() - std::string("down_proj.weight").size());
    const bool gated = is_gated(config.activation);
    if (gated) {
      params.shared_gate_up = per_expert("shared_gate_up", {s + "gate_proj.weight"}, {s + "up_proj.weight"}, sf, d,
                                         s + "{gate,up}_proj.weight");
    } else {
      params.shared_gate_up = per_expert("shared_gate_up", {s + "up_proj.weight"}, {}, sf, d, s + "up_proj.weight");
    }
    params.shared_down = per_expert("shared_down", {s + "down_proj.weight"}, {}, d, sf, s + "down_proj.weight");
    // A single shared "expert" borrowed through a pointer list is a plain view.
    for (WeightView* w : {&params.shared_gate_up, &params.shared_down}) {
      w->expert_data = {};
      w->expert_up_data = {};
    }
    if (config.shared_expert_gate) params.shared_gate = floats("shared_gate", mlp + ".shared_expert_gate.weight", {1, d});
  }
};

std::string stored_mlp_prefix(const Checkpoint& checkpoint, const ModelFamily& family, const ModelLayer& layer) {
  const std::string legacy = "model.layers." + std::to_string(layer.index) + ".block_sparse_moe";
  if (family.model_type == "mixtral" && checkpoint.find(layer.prefix + ".gate.weight") == nullptr &&
      checkpoint.find(legacy + ".gate.weight") != nullptr) {
    return legacy;
  }
  return layer.prefix;
}

PretrainedLayer::PretrainedLayer() : impl_(std::make_unique<Impl>()) {}
PretrainedLayer::PretrainedLayer(PretrainedLayer&&) noexcept = default;
PretrainedLayer& PretrainedLayer::operator=(PretrainedLayer&&) noexcept = default;
PretrainedLayer::~PretrainedLayer() = default;

PretrainedLayer PretrainedLayer::load(const std::string& dir, const std::string& layer, const PretrainedOptions& options) {
  return load(std::make_shared<const Checkpoint>(Checkpoint::open(dir)), layer, options);
}

PretrainedLayer PretrainedLayer::load(std::shared_ptr<const Checkpoint> checkpoint, const std::string& layer,
                                      const PretrainedOptions& options) {
  PretrainedLayer p;
  Impl& m = *p.impl_;
  m.checkpoint = std::move(checkpoint);
  if (m.checkpoint->config_json().empty()) {
    throw_input_error(m.checkpoint->dir() + "/config.json", "the model's configuration", "no such file");
  }
  m.family = model_family_from_config(m.checkpoint->config_json());
  m.layer = find_model_layer(m.family, layer);
  if (!m.layer.is_moe) {
    throw_input_error("layer", "an MoE layer", detail::concat("layer ", m.layer.name, ", dense (", m.layer.reason, ")"));
  }
  m.config = m.family.layer;
  m.config.dtype = options.dtype;
  m.config.num_threads = options.num_threads;
  m.config.validate();
  const std::string mlp = stored_mlp_prefix(*m.checkpoint, m.family, m.layer);
  m.load_router(mlp);
  if (m.family.model_type == "gpt_oss") {
    m.load_gpt_oss_experts(mlp);
  } else {
    m.load_experts(mlp);
  }
  if (m.config.has_shared()) m.load_shared(mlp);
  check_moe_params(m.config, m.params);
  m.moe.emplace(m.config, m.params);
  m.moe->set_training(false);
  return p;
}

const ModelFamily& PretrainedLayer::family() const { return impl_->family; }
const ModelLayer& PretrainedLayer::layer() const { return impl_->layer; }
const MoeLayerConfig& PretrainedLayer::config() const { return impl_->config; }
const MoeParams& PretrainedLayer::params() const { return impl_->params; }
const std::vector<LoadedParameter>& PretrainedLayer::sources() const { return impl_->sources; }
MoeLayer& PretrainedLayer::moe() { return *impl_->moe; }

}  // namespace moekit
