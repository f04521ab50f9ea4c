// The MoE layer: parameters (owned or borrowed), caches, and one forward and one backward as
// the four stage calls of moekit/stages.h (route → permute → experts → combine, and back). The
// math lives in the stages' ops (src/ops/) and their backend implementations (src/cpu/);
// docs/architecture.md draws the data flow.
#include "moekit/layer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "internal/bf16.h"
#include "internal/parallel.h"
#include "internal/random.h"
#include "moekit/error.h"
#include "moekit/stages.h"

namespace moekit {

// ---------------------------------------------------------------------------------------------
// The layer: parameters, caches and the sequence of op calls.

// What a training forward keeps for backward: each stage's saved state. The rows' segments
// point into hidden_states and routing.plan (kept here, moved with the struct, never copied).
struct MoeSavedForward {
  bool valid = false;
  Matrix<float> hidden_states;  // [num_tokens, d_model]
  RoutingResult<float> routing;
  ExpertRows rows;
  ExpertsSaved experts;         // the pre-activations
  CombineSaved combine;         // Soft MoE: the slot outputs
};

MoeForwardState::MoeForwardState() = default;
MoeForwardState::~MoeForwardState() = default;
MoeForwardState::MoeForwardState(MoeForwardState&&) noexcept = default;
MoeForwardState& MoeForwardState::operator=(MoeForwardState&&) noexcept = default;
bool MoeForwardState::empty() const { return saved_ == nullptr || !saved_->valid; }

struct MoeLayer::Impl {
  explicit Impl(const MoeLayerConfig& c) : stages(c) {}

  MoeStages stages;               // the backend object, its router and expert caches
  std::vector<PhaseTime> phases;  // of the last forward or backward (last_phases())

  // bf16 rounding of owned fp32 parameters (dtype bf16 only); params_ points here. Filled by
  // params() when stale (bf16_stale[e], index num_experts: shared); the layer itself computes
  // from compute_params.
  std::vector<uint16_t> gate_up_bf16, down_bf16, shared_gate_up_bf16, shared_down_bf16;
  std::vector<uint8_t> bf16_stale;
  // What the experts compute from: params_, or for an owned bf16 layer the fp32 masters, which
  // every path rounds to bf16 as it packs or loads them (the same values as the bf16 copies,
  // without a pass that writes those).
  MoeParams compute_params;

  // Per expert (index num_experts: the shared expert): its weight gradients are logically zero
  // but not yet filled (zero_grad() is lazy; see there).
  std::vector<uint8_t> grad_pending_zero;

  MoeSavedForward saved;  // of the last training forward, until taken or consumed
  bool save_in_eval = false;  // set_save_for_backward
  // The pre-activation buffer of the last consumed forward state, handed to the next training
  // forward: the same size each step, so it is not faulted in afresh every time.
  std::vector<float> spare_pre_activations;
};

// ---------------------------------------------------------------------------------------------
// Construction, parameters.

namespace {

// PyTorch nn.Linear initialisation U(−1/√fan_in, 1/√fan_in), counter-based per element.
void init_uniform(std::vector<float>& v, int64_t fan_in, uint64_t seed, uint64_t stream) {
  const double bound = 1.0 / std::sqrt(double(fan_in));
  for (size_t i = 0; i < v.size(); ++i) {
    const double u = detail::random_uniform(seed, static_cast<detail::RandomStream>(0x4d6f45ULL + stream), i, 0);
    v[i] = static_cast<float>((2.0 * u - 1.0) * bound);
  }
}

// The bf16 copies of the expert weights of the experts in `experts` (index num_experts: the
// shared expert) that are stale, rounded from the fp32 masters in parallel.
void round_experts(const MoeLayerConfig& c, const MoeTensors& masters, MoeLayer::Impl& impl,
                   const std::vector<int64_t>& experts) {
  const int64_t gu = c.gate_up_rows() * c.d_model, dn = c.d_model * c.d_ff;
  detail::run_parallel(std::max(1, c.num_threads), static_cast<int64_t>(experts.size()), [&](int64_t i, int) {
    const int64_t e = experts[static_cast<size_t>(i)];
    if (e == c.num_experts()) {
      detail::float_to_bf16_n(masters.shared_gate_up.data(), impl.shared_gate_up_bf16.data(),
                           static_cast<int64_t>(masters.shared_gate_up.size()));
      detail::float_to_bf16_n(masters.shared_down.data(), impl.shared_down_bf16.data(),
                           static_cast<int64_t>(masters.shared_down.size()));
    } else {
      detail::float_to_bf16_n(masters.gate_up.data() + e * gu, impl.gate_up_bf16.data() + e * gu, gu);
      detail::float_to_bf16_n(masters.down.data() + e * dn, impl.down_bf16.data() + e * dn, dn);
    }
  });
  for (int64_t e : experts) impl.bf16_stale[static_cast<size_t>(e)] = 0;
}

void check_finite_matrix(ConstMatrixView<float> m, const char* name) {
  for (int64_t i = 0; i < m.size(); ++i) {
    if (!std::isfinite(m.data[i])) {
      throw_input_error(detail::concat(name, "[", i / m.cols, "][", i % m.cols, "]"), "a finite number", m.data[i]);
    }
  }
}

// A result computed from finite inputs that is not finite is an error saying where it arose.
void check_computed_finite(ConstMatrixView<float> m, const char* name, const char* where) {
  for (int64_t i = 0; i < m.size(); ++i) {
    if (!std::isfinite(m.data[i])) {
      throw InputError(detail::concat(name, "[", i / m.cols, "][", i % m.cols, "]: expected a finite number, got ",
                                      m.data[i], " (", where, ")"));
    }
  }
}

void check_hidden_states(const MoeLayerConfig& c, ConstMatrixView<float> x) {  // [num_tokens, d_model]
  if (x.data == nullptr || x.rows <= 0) {
    throw_input_error("hidden_states", "a non-empty [num_tokens, d_model] matrix", shape_text(x.rows, x.cols));
  }
  if (x.cols != c.d_model) throw_input_error("hidden_states columns", detail::concat(c.d_model, " (d_model)"), x.cols);
  if (x.rows > std::numeric_limits<int32_t>::max()) throw_input_error("hidden_states rows", "< 2^31 tokens", x.rows);
  check_finite_matrix(x, "hidden_states");
}

}  // namespace

MoeLayer::MoeLayer(const MoeLayerConfig& config, uint64_t seed) : config_(config) {
  config_.validate();
  impl_ = std::make_unique<Impl>(config_);
  owned_ = std::make_unique<MoeTensors>(make_moe_tensors<float>(config_));
  MoeTensors& t = *owned_;
  const int64_t d = config_.d_model;
  init_uniform(t.router_weight, d, seed, 0);
  init_uniform(t.router_bias, d, seed, 1);
  init_uniform(t.gate_up, d, seed, 2);
  init_uniform(t.gate_up_bias, d, seed, 3);
  init_uniform(t.down, config_.d_ff, seed, 4);
  init_uniform(t.down_bias, config_.d_ff, seed, 5);
  if (config_.has_shared()) {
    init_uniform(t.shared_gate_up, d, seed, 6);
    init_uniform(t.shared_gate_up_bias, d, seed, 7);
    init_uniform(t.shared_down, config_.effective_shared_d_ff(), seed, 8);
    init_uniform(t.shared_down_bias, config_.effective_shared_d_ff(), seed, 9);
    init_uniform(t.shared_gate, d, seed, 10);
  }
  refresh_packed_weights();
}

MoeLayer::MoeLayer(const MoeLayerConfig& config, const MoeParams& params) : config_(config) {
  config_.validate();
  if (!config_.routing.e_score_correction_bias.empty()) {
    throw_config_error("e_score_correction_bias",
                       "no values for a layer that borrows its parameters (the bias is params.selection_bias; "
                       "set selection_bias instead)",
                       detail::concat(config_.routing.e_score_correction_bias.size(), " values"));
  }
  check_moe_params(config_, params);
  impl_ = std::make_unique<Impl>(config_);
  params_ = params;
}

MoeLayer::~MoeLayer() = default;
MoeLayer::MoeLayer(MoeLayer&&) noexcept = default;
MoeLayer& MoeLayer::operator=(MoeLayer&&) noexcept = default;

void MoeLayer::set_num_threads(int num_threads) {
  if (num_threads < 1 || num_threads > 1024) throw_input_error("num_threads", "in [1, 1024]", num_threads);
  config_.num_threads = num_threads;
  impl_->stages.set_num_threads(num_threads);
}

void MoeLayer::set_training(bool training) {
  config_.routing.training = training;
  impl_->stages.set_training(training);
  if (!training && !impl_->save_in_eval) impl_->saved = MoeSavedForward{};
}

void MoeLayer::set_save_for_backward(bool save) { impl_->save_in_eval = save; }
bool MoeLayer::saves_for_backward() const { return config_.routing.training || impl_->save_in_eval; }

MoeTensors& MoeLayer::parameters() {
  if (!owned_) throw std::logic_error("MoeLayer::parameters: the layer borrows its parameters (use params())");
  return *owned_;
}

const MoeTensors& MoeLayer::parameters() const {
  if (!owned_) throw std::logic_error("MoeLayer::parameters: the layer borrows its parameters (use params())");
  return *owned_;
}

const MoeParams& MoeLayer::compute_params() const {
  return owned_ && config_.dtype == DType::kBF16 ? impl_->compute_params : params_;
}

const MoeParams& MoeLayer::params() const {
  // An owned bf16 layer rounds its weights per expert when first needed; the views must show
  // all of them. Filling stale copies changes nothing the caller could have seen: logically const.
  Impl& impl = *impl_;
  if (owned_ && !impl.bf16_stale.empty()) {
    std::vector<int64_t> stale;
    for (int64_t e = 0; e <= config_.num_experts(); ++e)
      if (impl.bf16_stale[static_cast<size_t>(e)]) stale.push_back(e);
    if (!stale.empty()) round_experts(config_, *owned_, impl, stale);
  }
  return params_;
}

const char* MoeLayer::isa_name() const { return impl_->stages.kernel_path(); }

const std::vector<PhaseTime>& MoeLayer::last_phases() const { return impl_->phases; }

void MoeLayer::ensure_grads() {
  if (grads_.router_weight.empty()) {
    grads_ = make_moe_tensors<float>(config_);
    impl_->grad_pending_zero.assign(static_cast<size_t>(config_.num_experts() + 1), 0);
  }
}

void MoeLayer::zero_grad() {
  ensure_grads();
  // The expert weight gradients (almost all of the gradient memory) are only marked zero: the
  // next backward writes instead of adding into those of the experts it touches, and
  // materialize_zero_grads() fills the others when grads() is read. This saves a pass over the
  // gradients here and a read of them in the backward (as PyTorch's zero_grad(set_to_none)).
  grads_.for_each([](const char* name, std::vector<float>& v) {
    if (!moe_param_spec(name).expert_weight) std::fill(v.begin(), v.end(), 0.0f);
  });
  std::fill(impl_->grad_pending_zero.begin(), impl_->grad_pending_zero.end(), 1);
}

void MoeLayer::materialize_zero_grads() {
  if (grads_.router_weight.empty()) return;
  const int64_t num_experts = config_.num_experts();
  const int64_t gu = config_.gate_up_rows() * config_.d_model, dn = config_.d_model * config_.d_ff;
  for (int64_t e = 0; e <= num_experts; ++e) {
    if (!impl_->grad_pending_zero[static_cast<size_t>(e)]) continue;
    impl_->grad_pending_zero[static_cast<size_t>(e)] = 0;
    if (e == num_experts) {
      std::fill(grads_.shared_gate_up.begin(), grads_.shared_gate_up.end(), 0.0f);
      std::fill(grads_.shared_down.begin(), grads_.shared_down.end(), 0.0f);
    } else {
      std::fill_n(grads_.gate_up.begin() + e * gu, gu, 0.0f);
      std::fill_n(grads_.down.begin() + e * dn, dn, 0.0f);
    }
  }
}

const MoeTensors& MoeLayer::grads() const {
  // Filling pending zeros changes no value that grads() can show: logically const.
  const_cast<MoeLayer*>(this)->materialize_zero_grads();
  return grads_;
}

MoeTensors& MoeLayer::grads() {
  ensure_grads();
  materialize_zero_grads();
  return grads_;
}

void MoeLayer::update_selection_bias(std::span<const int64_t> tokens_per_expert) {
  if (!config_.has_selection_bias())
    throw std::logic_error("MoeLayer::update_selection_bias: the layer has no selection bias (selection_bias)");
  if (!owned_)
    throw std::logic_error("MoeLayer::update_selection_bias: the layer borrows its selection bias "
                           "(update it with update_expert_bias)");
  update_expert_bias(std::span<float>(owned_->selection_bias), tokens_per_expert,
                     config_.routing.expert_bias_update_rate);
}

void MoeLayer::refresh_packed_weights() {
  if (owned_) {
    params_ = moe_params_view(config_, *owned_);
    if (config_.dtype == DType::kBF16) {
      // The layer computes with the bf16 rounding of the fp32 master weights, made as it packs
      // or loads them, or for all by params().
      impl_->gate_up_bf16.resize(owned_->gate_up.size());
      impl_->down_bf16.resize(owned_->down.size());
      impl_->shared_gate_up_bf16.resize(owned_->shared_gate_up.size());
      impl_->shared_down_bf16.resize(owned_->shared_down.size());
      impl_->bf16_stale.assign(static_cast<size_t>(config_.num_experts() + 1), 1);
      impl_->compute_params = moe_params_view(config_, *owned_);
      params_.gate_up.data = impl_->gate_up_bf16.data();
      params_.down.data = impl_->down_bf16.data();
      params_.gate_up.dtype = params_.down.dtype = DType::kBF16;
      if (config_.has_shared()) {
        params_.shared_gate_up.data = impl_->shared_gate_up_bf16.data();
        params_.shared_down.data = impl_->shared_down_bf16.data();
        params_.shared_gate_up.dtype = params_.shared_down.dtype = DType::kBF16;
      }
    }
  }
  impl_->stages.invalidate_weights();
  impl_->saved = MoeSavedForward{};
}

// ---------------------------------------------------------------------------------------------
// Forward: the four stages (moekit/stages.h).
//   routing = route(x)                       router op, routing method → plan, losses, stats
//   rows    = permute(plan)                  expert-major index lists (Soft MoE: slot inputs)
//   y       = experts(rows)                  grouped FFN, combine weights as row scales
//   out     = combine(y)                     fixed choice-order token sum (Soft MoE: slots)

MoeForwardResult MoeLayer::forward(ConstMatrixView<float> hidden_states, const RoutingOptions& options) {
  const MoeLayerConfig& c = config_;
  Impl& impl = *impl_;
  MoeStages& stages = impl.stages;
  check_hidden_states(c, hidden_states);
  const bool training = saves_for_backward();  // keep what backward needs (pre-activations, ...)
  if (training) stages.require_training();     // an inference-only weight format: before any work
  stages.start_timing(&impl.phases);
  impl.saved = MoeSavedForward{};
  MoeSavedForward& s = impl.saved;
  // A training forward runs on its own copy of x, which the backward reads (the rows point there).
  ConstMatrixView<float> x = hidden_states;
  if (training) {
    s.experts.pre_activations = std::move(impl.spare_pre_activations);
    s.hidden_states = Matrix<float>(hidden_states.rows, c.d_model);
    std::copy(hidden_states.data, hidden_states.data + hidden_states.size(), s.hidden_states.values.begin());
    x = s.hidden_states.cview();
    stages.phase("save_input");
  }
  MoeForwardResult result;
  RoutingResult<float>& routing = training ? s.routing : result.routing;
  routing = stages.route(params_, x, options);
  ExpertRows rows = stages.permute(params_, routing.plan, x, routing.saved.sequence_length);
  const ConstMatrixView<float> y = stages.experts(compute_params(), rows, training ? &s.experts : nullptr);
  result.output = Matrix<float>(x.rows, c.d_model);
  stages.combine(routing.plan, rows, y, result.output.view(), training ? &s.combine : nullptr);
  check_computed_finite(result.output.cview(), "output", "the expert FFNs overflowed on finite hidden_states");
  if (training) {
    result.routing = s.routing;
    s.rows = std::move(rows);
    s.valid = true;
    stages.phase("save");
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Backward: the stages' backwards in reverse.
//   d_y              = combine_backward(d_out)         (in place; Soft MoE: d_Y, d_combine)
//   d_X, d_w, d_W    = experts_backward(d_y)
//   d_x              = permute_backward(d_X)           (token sum; Soft MoE: d_dispatch; shared gate)
//   d_x, d_W_router += route_backward(d_w, d_aux, d_z)

MoeForwardState MoeLayer::take_forward_state() {
  MoeForwardState state;
  if (impl_->saved.valid) state.saved_ = std::make_unique<MoeSavedForward>(std::move(impl_->saved));
  impl_->saved = MoeSavedForward{};
  return state;
}

Matrix<float> MoeLayer::backward(ConstMatrixView<float> d_output) {
  if (!impl_->saved.valid) {
    throw_input_error("backward", "a preceding forward that saved its state (set_training, set_save_for_backward)",
                      "no saved forward");
  }
  ensure_grads();
  Matrix<float> d_x = run_backward(d_output, impl_->saved, moe_grad_buffers(grads_), impl_->grad_pending_zero,
                                   config_.routing.router_aux_loss_coef, config_.routing.router_z_loss_coef);
  impl_->saved = MoeSavedForward{};
  return d_x;
}

Matrix<float> MoeLayer::backward(ConstMatrixView<float> d_output, MoeForwardState& state,
                                 const MoeBackwardOptions& options) {
  if (state.empty()) {
    throw_input_error("backward state", "the saved state of a training forward (take_forward_state)",
                      "an empty or consumed state");
  }
  MoeSavedForward& saved = *state.saved_;
  const double d_aux = options.d_aux_loss.value_or(config_.routing.router_aux_loss_coef);
  const double d_z = options.d_z_loss.value_or(config_.routing.router_z_loss_coef);
  if (!std::isfinite(d_aux)) throw_input_error("d_aux_loss", "a finite number", d_aux);
  if (!std::isfinite(d_z)) throw_input_error("d_z_loss", "a finite number", d_z);
  const MoeGradBuffers* into = options.into;
  Matrix<float> d_x;
  if (into == nullptr) {
    ensure_grads();
    d_x = run_backward(d_output, saved, moe_grad_buffers(grads_), impl_->grad_pending_zero, d_aux, d_z);
  } else {
    // Written, not accumulated: every buffer starts at zero except the expert weight gradients,
    // which the backward writes for the experts it touches; the others are zeroed after.
    const auto sizes = moe_tensor_sizes(config_);
    size_t i = 0;
    into->for_each([&](const char* name, std::span<float> v) {
      const int64_t want = sizes[i++].second;
      if (static_cast<int64_t>(v.size()) != want || (want > 0 && v.data() == nullptr)) {
        throw_input_error(detail::concat("gradient buffer ", name, " length"), want, v.size());
      }
      if (!moe_param_spec(name).expert_weight) std::fill(v.begin(), v.end(), 0.0f);
    });
    std::vector<uint8_t> pending(static_cast<size_t>(config_.num_experts() + 1), 1);
    d_x = run_backward(d_output, saved, *into, pending, d_aux, d_z);
    const int64_t num_experts = config_.num_experts();
    const int64_t gu = config_.gate_up_rows() * config_.d_model, dn = config_.d_model * config_.d_ff;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (!pending[static_cast<size_t>(e)]) continue;
      std::fill_n(into->gate_up.begin() + e * gu, gu, 0.0f);
      std::fill_n(into->down.begin() + e * dn, dn, 0.0f);
    }
    if (pending[static_cast<size_t>(num_experts)]) {
      std::fill(into->shared_gate_up.begin(), into->shared_gate_up.end(), 0.0f);
      std::fill(into->shared_down.begin(), into->shared_down.end(), 0.0f);
    }
  }
  state.saved_.reset();
  return d_x;
}

Matrix<float> MoeLayer::run_backward(ConstMatrixView<float> d_output, MoeSavedForward& s,
                                     const MoeGradBuffers& grad_out, std::vector<uint8_t>& pending_zero,
                                     double d_aux_loss, double d_z_loss) {
  const MoeLayerConfig& c = config_;
  Impl& impl = *impl_;
  MoeStages& stages = impl.stages;
  const int64_t num_tokens = s.hidden_states.rows, d = c.d_model;
  if (d_output.data == nullptr || d_output.rows != num_tokens || d_output.cols != d) {
    throw_input_error("d_output shape", shape_text(num_tokens, d), shape_text(d_output.rows, d_output.cols));
  }
  check_finite_matrix(d_output, "d_output");
  stages.start_timing(&impl.phases);
  s.valid = false;  // the pre-activations are overwritten by their gradients below

  const RoutingPlan& plan = s.routing.plan;
  const ConstMatrixView<float> x = s.hidden_states.cview();
  RoutingGradOutput<float> d_routing;
  d_routing.d_aux_loss = d_aux_loss;
  d_routing.d_z_loss = d_z_loss;

  const ExpertRowGrads d_y = stages.combine_backward(plan, s.rows, d_output, s.combine, d_routing);
  const ExpertsBackward d_experts =
      stages.experts_backward(compute_params(), s.rows, d_y, s.experts, ExpertGradTargets{&grad_out, &pending_zero});
  Matrix<float> d_x(num_tokens, d);
  stages.permute_backward(params_, plan, s.rows, x, d_experts, d_x.view(), d_routing, grad_out);
  stages.route_backward(params_, x, s.routing, d_routing, d_x.view(), grad_out);

  impl.spare_pre_activations = std::move(s.experts.pre_activations);
  impl.spare_pre_activations.clear();  // keeps the capacity
  s = MoeSavedForward{};
  check_computed_finite(d_x.cview(), "d_hidden_states", "the backward overflowed on finite d_output");
  return d_x;
}

}  // namespace moekit
