// The layer's four stages (moekit/stages.h) over the backend object: each a short sequence of op
// calls (src/ops/), forward and backward side by side.
#include "moekit/stages.h"

#include <algorithm>

#include "moekit/error.h"
#include "ops/backend.h"
#include "ops/combine.h"
#include "ops/context.h"
#include "ops/expert_ffn.h"
#include "ops/router.h"
#include "ops/row_space.h"

namespace moekit {

struct MoeStages::Impl {
  MoeLayerConfig config;
  ops::PhaseTimer timer;
  ops::OpContext ctx;
  std::unique_ptr<ops::RouterCache> router;  // the router weight in the backend's layout
  std::unique_ptr<ops::ExpertFfn> experts;   // the expert FFN for (backend, weight format)
  bool can_train = false;
};

namespace {

bool is_soft(const MoeLayerConfig& c) { return c.routing.routing_method == RoutingMethod::kSoftMoe; }

// The ops a config runs (every config: router, routing, permute, experts, combine).
std::vector<ops::Op> ops_of(const MoeLayerConfig& c) {
  std::vector<ops::Op> out = {ops::Op::kExperts, ops::Op::kRouter, ops::Op::kRouting, ops::Op::kPermute,
                              ops::Op::kCombine};
  if (is_soft(c)) out.push_back(ops::Op::kSoftSlots);
  if (c.shared_expert_gate) out.push_back(ops::Op::kSharedGate);
  return out;
}

ops::SoftMoeShape soft_shape(const MoeLayerConfig& c, const RoutingPlan& plan, int64_t num_sequences) {
  return {num_sequences, plan.num_tokens / num_sequences, c.num_experts(), c.routing.slots_per_expert};
}

RouterParams<float> router_params_of(const MoeParams& p) {
  return {p.router_weight, p.router_bias, p.router_noise_weight};
}

// Input jitter and noisy gating change the router's input or add a second projection: the
// routing core's route_hidden implements them (on the same router op). Otherwise the route stage
// runs the router op itself, on the weight kept in the backend's layout.
bool router_runs_as_op(const MoeLayerConfig& c) {
  const bool jitter = c.routing.router_jitter_noise > 0 && (c.routing.training || c.routing.noise_in_eval);
  return !jitter && !c.routing.noisy_gating;
}

// The routing core's router gradients (route_hidden's path) added to the stage's outputs.
void add_router_grads(const RouterGrads<float>& router, MatrixView<float> d_x, const MoeGradBuffers& grads) {
  auto add = [](std::span<float> dst, std::span<const float> src) {
    for (size_t i = 0; i < src.size() && i < dst.size(); ++i) dst[i] += src[i];
  };
  add(std::span<float>(d_x.data, static_cast<size_t>(d_x.size())), router.d_hidden_states.values);
  add(grads.router_weight, router.d_weight.values);
  add(grads.router_bias, router.d_bias);
  add(grads.router_noise_weight, router.d_noise_weight.values);
}

// Where the expert FFN writes each group's weight gradients (pending zero: written, not added).
std::vector<ops::ExpertGrads> expert_grads(const MoeLayerConfig& c, const ops::RowSpace& rs, const MoeGradBuffers& g,
                                           const std::vector<uint8_t>& pending_zero) {
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  std::vector<ops::ExpertGrads> out(rs.groups.size());
  for (size_t i = 0; i < rs.groups.size(); ++i) {
    const ops::Group& grp = rs.groups[i];
    const bool shared = grp.expert == num_experts;
    ops::ExpertGrads& e = out[i];
    e.d_gate_up = shared ? g.shared_gate_up.data() : g.gate_up.data() + grp.expert * grp.gu_cols * d;
    e.d_down = shared ? g.shared_down.data() : g.down.data() + grp.expert * d * grp.d_ff;
    if (c.expert_bias) {
      e.d_gate_up_bias = shared ? g.shared_gate_up_bias.data() : g.gate_up_bias.data() + grp.expert * grp.gu_cols;
      e.d_down_bias = shared ? g.shared_down_bias.data() : g.down_bias.data() + grp.expert * d;
    }
    e.accumulate = pending_zero[static_cast<size_t>(std::min(grp.expert, num_experts))] == 0;
  }
  return out;
}

}  // namespace

MoeStages::MoeStages(const MoeLayerConfig& config) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.config = config;
  m.can_train = true;
  for (ops::Op op : ops_of(config)) {
    ops::require_support(config.backend, op, config.dtype, false);
    m.can_train = m.can_train && ops::backend_for(config.backend).supports(op, config.dtype, true);
  }
  if (config.routing.training) require_training();
  m.ctx = ops::make_context(config.backend, std::max(1, config.num_threads));
  m.ctx.timer = &m.timer;
  m.router = ops::make_router_cache(m.ctx);
  ops::ExpertFfnConfig e;
  e.backend = config.backend;
  e.weight_format = config.dtype;
  e.d_model = config.d_model;
  e.num_groups = config.num_experts() + (config.has_shared() ? 1 : 0);
  e.activation = config.activation;
  e.activation_constants = config.activation_constants;
  m.experts = ops::make_expert_ffn(e);
}

MoeStages::~MoeStages() = default;
MoeStages::MoeStages(MoeStages&&) noexcept = default;
MoeStages& MoeStages::operator=(MoeStages&&) noexcept = default;

const MoeLayerConfig& MoeStages::config() const { return impl_->config; }

void MoeStages::set_num_threads(int num_threads) {
  impl_->config.num_threads = num_threads;
  impl_->ctx.num_threads = std::max(1, num_threads);
}

void MoeStages::set_training(bool training) { impl_->config.routing.training = training; }

bool MoeStages::can_train() const { return impl_->can_train; }

void MoeStages::require_training() const {
  if (impl_->can_train) return;
  for (ops::Op op : ops_of(impl_->config)) ops::require_support(impl_->config.backend, op, impl_->config.dtype, true);
}

const char* MoeStages::kernel_path() const { return impl_->ctx.backend->kernel_path(); }

void MoeStages::invalidate_weights() {
  impl_->router->invalidate();
  impl_->experts->invalidate();
}

void MoeStages::start_timing(std::vector<PhaseTime>* out) { impl_->timer.start(out); }
void MoeStages::phase(const char* name) { impl_->ctx.phase(name); }

// ---------------------------------------------------------------------------------------------
// route:  logits = x·Wᵀ + b (router op),  plan = routing method(logits)
//         backward: d_logits = route_backward(d_w, d_aux, d_z);  d_x += d_logits·W;  dW += d_logitsᵀ·x

RoutingResult<float> MoeStages::route(const MoeParams& p, ConstMatrixView<float> x, const RoutingOptions& options) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  const ops::OpContext& ctx = m.ctx;
  RoutingOptions o = options;
  o.num_threads = ctx.num_threads;
  o.selection_bias = p.selection_bias;  // the parameter, not a config value
  RoutingResult<float> result;
  if (router_runs_as_op(c)) {
    ops::router_prepare(ctx, p.router_weight, *m.router);
    ctx.phase("pack_router");
    Matrix<float> logits(x.rows, c.router_rows());
    ops::router_forward<float>(ctx, x, p.router_weight, p.router_bias, logits.view(), m.router.get());
    ctx.phase("router");
    result = ctx.backend->route_logits(ctx, c.routing, logits.cview(), o);
  } else {
    ctx.phase("pack_router");  // route_hidden reads W as it is
    result = ctx.backend->route_hidden(ctx, c.routing, x, router_params_of(p), o);
  }
  ctx.phase("routing");
  return result;
}

void MoeStages::route_backward(const MoeParams& p, ConstMatrixView<float> x, const RoutingResult<float>& routing,
                               const RoutingGradOutput<float>& d_routing, MatrixView<float> d_x,
                               const MoeGradBuffers& grads) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  const ops::OpContext& ctx = m.ctx;
  Matrix<float> d_noisy;
  const Matrix<float> d_logits = ctx.backend->route_backward(ctx, c.routing, routing, d_routing, &d_noisy);
  // The forward ran the router op unless it jittered the input or gated noisily.
  const bool by_op = !c.routing.noisy_gating && routing.saved.jitter.rows != x.rows;
  if (by_op) {
    const int64_t rows = c.router_rows();
    ops::router_backward<float>(ctx, x, p.router_weight, d_logits.cview(), d_x,
                                MatrixView<float>{grads.router_weight.data(), rows, c.d_model}, grads.router_bias);
  } else {
    add_router_grads(ctx.backend->route_hidden_backward(ctx, c.routing, routing, x, router_params_of(p),
                                                        d_logits.cview(), d_noisy.cview()),
                     d_x, grads);
  }
  ctx.phase("router");
}

// ---------------------------------------------------------------------------------------------
// permute:  rows of expert e = the plan's kept tokens of e, ascending (an index list into x);
//           Soft MoE: X̃ = Dᵀ·x per sequence; the shared rows, scaled by s_t = σ(⟨x_t, w_gate⟩)
//           backward: d_x_t = Σ_{kept i of t, choice order} d_X[row(i)] (+ shared; Soft MoE: D·d_X̃)

ExpertRows MoeStages::permute(const MoeParams& p, const RoutingPlan& plan, ConstMatrixView<float> x,
                              int64_t sequence_length, CombineWeights weights) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  const ops::OpContext& ctx = m.ctx;
  ExpertRows rows;
  rows.weights = weights;
  if (is_soft(c)) {
    const int64_t seq_len = sequence_length > 0 ? sequence_length : x.rows;
    rows.num_sequences = x.rows / seq_len;
    const ops::SoftMoeShape shape = soft_shape(c, plan, rows.num_sequences);
    rows.slot_inputs = Matrix<float>(shape.num_slots() * rows.num_sequences, c.d_model);
    ops::soft_dispatch_forward(ctx, plan, shape, x, rows.slot_inputs.view());
  }
  if (c.shared_expert_gate) rows.shared_gate = ops::shared_gate_forward(ctx, x, p.shared_gate);
  ops::permute_rows(ctx, c, plan, x.data, rows);
  ctx.phase("dispatch");
  return rows;
}

void MoeStages::permute_backward(const MoeParams& p, const RoutingPlan& plan, const ExpertRows& rows,
                                 ConstMatrixView<float> x, const ExpertsBackward& d_experts, MatrixView<float> d_x,
                                 RoutingGradOutput<float>& d_routing, const MoeGradBuffers& grads) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  const ops::OpContext& ctx = m.ctx;
  const int64_t num_tokens = plan.num_tokens;
  const ConstMatrixView<float> shared_rows =
      c.has_shared() ? ConstMatrixView<float>{d_experts.d_rows.row(rows.routed_rows), num_tokens, c.d_model}
                     : ConstMatrixView<float>{};
  if (is_soft(c)) {
    const ops::SoftMoeShape shape = soft_shape(c, plan, rows.num_sequences);
    d_routing.d_dispatch.assign(static_cast<size_t>(num_tokens * shape.num_slots()), 0.0f);
    std::fill(d_x.data, d_x.data + d_x.size(), 0.0f);
    ops::soft_dispatch_backward(ctx, plan, shape, x, d_experts.d_rows, shared_rows, d_x, d_routing.d_dispatch);
  } else {
    if (rows.weights == CombineWeights::kInExperts) {
      d_routing.d_token_weights = ops::d_token_weights(plan, d_experts.d_scale);
    }
    ops::token_sum(ctx, plan, d_experts.d_rows, {}, c.has_shared() ? rows.routed_rows : -1, d_x);
  }
  if (c.shared_expert_gate) {
    const std::span<const float> d_gate(d_experts.d_scale.data() + rows.routed_rows, static_cast<size_t>(num_tokens));
    ops::shared_gate_backward(ctx, x, p.shared_gate, rows.shared_gate, d_gate, d_x, grads.shared_gate);
  }
  ctx.phase("d_x");
}

// ---------------------------------------------------------------------------------------------
// experts:  y = w ⊙ (act(X[R]·W_guᵀ + b)·W_downᵀ + b) per segment (ops/expert_ffn.h)

ConstMatrixView<float> MoeStages::experts(const MoeParams& p, const ExpertRows& rows, ExpertsSaved* saved) {
  Impl& m = *impl_;
  if (saved != nullptr) require_training();
  const ops::RowSpace rs = ops::build_row_space(m.config, p, rows);
  return m.experts->forward(m.ctx, rs, saved);
}

ExpertsBackward MoeStages::experts_backward(const MoeParams& p, const ExpertRows& rows, const ExpertRowGrads& d_y,
                                            ExpertsSaved& saved, const ExpertGradTargets& targets) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  require_training();
  if (targets.grads == nullptr || targets.pending_zero == nullptr ||
      static_cast<int64_t>(targets.pending_zero->size()) != c.num_experts() + 1) {
    throw_input_error("experts_backward targets", "gradient buffers and num_experts + 1 pending-zero flags",
                      targets.pending_zero ? static_cast<int64_t>(targets.pending_zero->size()) : -1);
  }
  const ops::RowSpace rs = ops::build_row_space(c, p, rows, &d_y);
  const std::vector<ops::ExpertGrads> grads = expert_grads(c, rs, *targets.grads, *targets.pending_zero);
  ops::ExpertFfnBackwardResult r = m.experts->backward(m.ctx, rs, saved, grads);
  for (const ops::Group& g : rs.groups)
    if (g.num_rows > 0) (*targets.pending_zero)[static_cast<size_t>(std::min(g.expert, c.num_experts()))] = 0;
  return {r.d_rows, std::move(r.d_scale)};
}

// ---------------------------------------------------------------------------------------------
// combine:  out_t = Σ_{kept i of t, choice order} w_i·y[row(i)] + y[shared row t] (ops/combine.h);
//           Soft MoE: out_g = Σ_e C_g[:, e-slots]·Y[e, g]
//           backward: d_y[row(i)] = d_out_t, read in place (weights in the experts), or
//                     w_i·d_out_t with d_w_i = ⟨d_out_t, y[row(i)]⟩ (weights here); Soft MoE: Cᵀ·d_out

void MoeStages::combine(const RoutingPlan& plan, const ExpertRows& rows, ConstMatrixView<float> y,
                        MatrixView<float> out, CombineSaved* saved) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  const ops::OpContext& ctx = m.ctx;
  const int64_t d = c.d_model;
  const bool keep = is_soft(c) || rows.weights == CombineWeights::kInCombine;
  if (saved != nullptr && keep) {
    saved->rows = Matrix<float>(rows.routed_rows, d);
    std::copy(y.data, y.data + rows.routed_rows * d, saved->rows.values.begin());
  }
  if (is_soft(c)) {
    const ConstMatrixView<float> shared_rows =
        c.has_shared() ? ConstMatrixView<float>{y.row(rows.routed_rows), plan.num_tokens, d} : ConstMatrixView<float>{};
    ops::soft_combine_forward(ctx, plan, soft_shape(c, plan, rows.num_sequences),
                              ConstMatrixView<float>{y.data, rows.routed_rows, d}, shared_rows, out);
  } else {
    const std::span<const float> weights =
        rows.weights == CombineWeights::kInCombine ? std::span<const float>(plan.expert_weights) : std::span<const float>{};
    ops::token_sum(ctx, plan, y, weights, c.has_shared() ? rows.routed_rows : -1, out);
  }
  ctx.phase("combine");
}

ExpertRowGrads MoeStages::combine_backward(const RoutingPlan& plan, const ExpertRows& rows,
                                           ConstMatrixView<float> d_out, const CombineSaved& saved,
                                           RoutingGradOutput<float>& d_routing) {
  Impl& m = *impl_;
  const MoeLayerConfig& c = m.config;
  const ops::OpContext& ctx = m.ctx;
  const int64_t d = c.d_model, num_kept = plan.num_kept();
  ExpertRowGrads g;
  g.d_output.resize(rows.segments.size());
  if (is_soft(c)) {
    const ops::SoftMoeShape shape = soft_shape(c, plan, rows.num_sequences);
    g.storage = Matrix<float>(rows.routed_rows, d);
    d_routing.d_combine.assign(static_cast<size_t>(plan.num_tokens * shape.num_slots()), 0.0f);
    ops::soft_combine_backward(ctx, plan, shape, d_out, saved.rows.cview(), g.storage.view(), d_routing.d_combine);
  } else if (rows.weights == CombineWeights::kInCombine) {
    const std::span<const int32_t> tokens(plan.expert_tokens.data(), static_cast<size_t>(num_kept));
    g.storage = Matrix<float>(num_kept, d);
    ops::gather_rows(ctx, d_out, tokens, plan.expert_weights, g.storage.view());
    std::vector<float> d_w(static_cast<size_t>(num_kept));
    ops::row_dots(ctx, d_out, tokens, saved.rows.cview(), d_w);
    d_routing.d_token_weights = ops::d_token_weights(plan, d_w);
  }
  for (size_t i = 0; i < rows.segments.size(); ++i) {
    const ExpertSegment& s = rows.segments[i];
    if (s.expert == c.num_experts()) {
      g.d_output[i] = {d_out.data, nullptr};  // the shared rows are the tokens in order
    } else if (g.storage.rows > 0) {
      g.d_output[i] = {g.storage.row(s.row_begin), nullptr};
    } else {
      g.d_output[i] = {d_out.data, s.input.rows};  // d_y[row] = d_out[token(row)], read in place
    }
  }
  ctx.phase("setup");
  return g;
}

}  // namespace moekit
