// Routing methods: selection, capacity and drops, combine weights, losses, and their backward.
// See include/moekit/routing.h for the weight model and the gradient formulas.
#include "moekit/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <numeric>
#include <string>

#include "internal/parallel.h"
#include "internal/random.h"
#include "moekit/error.h"

namespace moekit {
namespace {

using detail::RandomStream;

// Epsilon DeepSeek-V3 and Megatron add to the sigmoid normaliser: w = s / (Σ s + 1e-20).
constexpr double kSigmoidNormEps = 1e-20;

bool is_token_choice(const RoutingConfig& c) {
  return c.routing_method == RoutingMethod::kTopK || c.routing_method == RoutingMethod::kSinkhorn;
}

bool noise_active(const RoutingConfig& c) { return c.training || c.noise_in_eval; }

// Megatron's Sinkhorn router combines with sigmoid(logits) for k = 1 and the softmax for k > 1.
bool uses_sigmoid(const RoutingConfig& c) {
  return c.scoring_func == ScoringFunc::kSigmoid ||
         (c.routing_method == RoutingMethod::kSinkhorn && c.num_experts_per_tok == 1);
}

// ---------------------------------------------------------------------------------------------
// Input checks at the boundary.

template <typename Real>
void check_finite(ConstMatrixView<Real> m, const char* name) {
  for (int64_t i = 0; i < m.size(); ++i) {
    if (!std::isfinite(static_cast<double>(m.data[i]))) {
      throw_input_error(name, "finite values",
                        detail::concat(m.data[i], " at [", i / m.cols, "][", i % m.cols, "]"));
    }
  }
}

template <typename Real>
void check_matrix(ConstMatrixView<Real> m, const char* name, int64_t expected_cols,
                  const char* cols_name) {
  if (m.data == nullptr || m.rows <= 0) throw_input_error(name, "at least one row", "0 rows");
  if (m.cols != expected_cols) {
    throw_input_error(detail::concat(name, " columns"),
                      detail::concat(expected_cols, " (", cols_name, ")"), m.cols);
  }
  check_finite(m, name);
}

void check_options(const RoutingConfig& config, const RoutingOptions& options,
                   int64_t num_tokens) {
  if (!options.token_mask.empty()) {
    if (static_cast<int64_t>(options.token_mask.size()) != num_tokens) {
      throw_input_error("token_mask length", detail::concat(num_tokens, " (num_tokens)"),
                        options.token_mask.size());
    }
    for (size_t i = 0; i < options.token_mask.size(); ++i) {
      if (options.token_mask[i] > 1) {
        throw_input_error("token_mask", "0 or 1",
                          detail::concat(int(options.token_mask[i]), " at [", i, "]"));
      }
    }
  }
  if (options.sequence_length < 0) {
    throw_input_error("sequence_length", ">= 0", options.sequence_length);
  }
  if (options.sequence_length > 0 && num_tokens % options.sequence_length != 0) {
    throw_input_error("sequence_length",
                      detail::concat("a divisor of num_tokens = ", num_tokens),
                      options.sequence_length);
  }
  if (!options.labels.empty() && static_cast<int64_t>(options.labels.size()) != num_tokens) {
    throw_input_error("labels length", detail::concat(num_tokens, " (num_tokens)"),
                      options.labels.size());
  }
  if (!options.global_counts.empty() &&
      static_cast<int64_t>(options.global_counts.size()) != config.num_experts) {
    throw_input_error("global_counts length", detail::concat(config.num_experts, " (num_experts)"),
                      options.global_counts.size());
  }
  if (options.replay != nullptr) {
    const RoutingRecord& r = *options.replay;
    if (r.num_tokens != num_tokens) {
      throw_input_error("replay num_tokens", num_tokens, r.num_tokens);
    }
    if (r.num_experts != config.num_experts) {
      throw_input_error("replay num_experts", config.num_experts, r.num_experts);
    }
    if (static_cast<int64_t>(r.token_offsets.size()) != num_tokens + 1 ||
        r.token_offsets.back() != static_cast<int64_t>(r.token_experts.size())) {
      throw_input_error("replay token_offsets", "num_tokens + 1 offsets ending at the selections",
                        r.token_offsets.size());
    }
    for (int32_t e : r.token_experts) {
      if (e < 0 || e >= config.num_experts) {
        throw_input_error("replay expert", detail::concat("in [0, ", config.num_experts, ")"), e);
      }
    }
  }
  if (!options.logit_noise.empty()) {
    const int64_t cols = config.routing_method == RoutingMethod::kSoftMoe
                             ? config.num_experts * config.slots_per_expert
                             : config.num_experts;
    if (static_cast<int64_t>(options.logit_noise.size()) != num_tokens * cols) {
      throw_input_error("logit_noise size", detail::concat(num_tokens * cols, " (num_tokens · num_experts)"),
                        options.logit_noise.size());
    }
    if (!(config.noise_std > 0) || !noise_active(config)) {
      throw_input_error("logit_noise", "noise_std > 0 and training (or noise_in_eval)",
                        detail::concat("noise_std ", config.noise_std, ", training ", config.training));
    }
    for (size_t i = 0; i < options.logit_noise.size(); ++i)
      if (!std::isfinite(options.logit_noise[i]))
        throw_input_error("logit_noise", "finite values", detail::concat(options.logit_noise[i], " at [", i, "]"));
  }
  if (options.replay != nullptr && config.routing_method == RoutingMethod::kSoftMoe) {
    throw_input_error("replay", "a token-choice, dense or expert-choice method", "soft_moe");
  }
}

// ---------------------------------------------------------------------------------------------
// Row-wise score functions.

template <typename Real>
void softmax_row(const Real* in, Real* out, int64_t n) {
  Real max_value = in[0];
  for (int64_t i = 1; i < n; ++i) max_value = std::max(max_value, in[i]);
  Real sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(in[i] - max_value);
    sum += out[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] /= sum;
}

template <typename Real>
double logsumexp_row(const Real* in, int64_t n) {
  double max_value = in[0];
  for (int64_t i = 1; i < n; ++i) max_value = std::max(max_value, double(in[i]));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(in[i]) - max_value);
  return max_value + std::log(sum);
}

template <typename Real>
Real sigmoid(Real x) {
  return Real(1) / (Real(1) + std::exp(-x));
}

// Indices of the k largest keys, best first; ties go to the lower index.
// One pass keeping the best k sorted (insertion; no allocation once `out` has grown): a key
// enters only if strictly greater than the k-th kept, and goes after every kept key it does
// not exceed, so equal keys keep index order.
void top_k_indices(const double* keys, int64_t n, int64_t k, std::vector<int32_t>& out) {
  out.clear();
  k = std::min(k, n);
  if (k <= 0) return;
  out.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < n; ++i) {
    const double v = keys[i];
    const int64_t size = static_cast<int64_t>(out.size());
    if (size == k && !(v > keys[out[size - 1]])) continue;
    int64_t pos = size == k ? k - 1 : size;  // the slot freed (the last) or appended
    if (size < k) out.push_back(0);
    while (pos > 0 && v > keys[out[pos - 1]]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<int32_t>(i);
  }
}

// ---------------------------------------------------------------------------------------------
// Capacity.

double effective_capacity_factor(const RoutingConfig& c) {
  if (!c.training && c.eval_capacity_factor) return *c.eval_capacity_factor;
  return c.capacity_factor.value_or(0.0);
}

int64_t round_capacity(double x, CapacityRounding rounding) {
  switch (rounding) {
    case CapacityRounding::kCeil: return static_cast<int64_t>(std::ceil(x));
    case CapacityRounding::kFloor: return static_cast<int64_t>(std::floor(x));
    case CapacityRounding::kRoundHalfEven: return static_cast<int64_t>(std::nearbyint(x));
  }
  return 0;
}

}  // namespace

int64_t compute_capacity(const RoutingConfig& c, int64_t num_tokens) {
  if (c.routing_method == RoutingMethod::kDense || c.routing_method == RoutingMethod::kSoftMoe) {
    return -1;
  }
  int64_t capacity = 0;
  if (c.expert_capacity) {
    capacity = *c.expert_capacity;
  } else {
    const bool has_factor = c.capacity_factor.has_value() ||
                            (!c.training && c.eval_capacity_factor.has_value());
    if (!has_factor || !c.drop_tokens) {
      if (c.routing_method != RoutingMethod::kExpertChoice) return -1;
    }
    const double cf = has_factor ? effective_capacity_factor(c) : 1.0;
    const int64_t k = c.routing_method == RoutingMethod::kExpertChoice || !c.capacity_times_k
                          ? 1
                          : c.num_experts_per_tok;
    if (c.capacity_formula == CapacityFormula::kTutel) {
      // Tutel: k · int(cf · ceil(T / E)).
      const double per_expert = std::ceil(double(num_tokens) / double(c.num_experts));
      capacity = c.num_experts_per_tok * static_cast<int64_t>(std::floor(cf * per_expert));
    } else {
      capacity = round_capacity(double(num_tokens) * double(k) / double(c.num_experts) * cf,
                                c.capacity_rounding);
    }
  }
  capacity = std::max(capacity, c.min_capacity);
  if (c.capacity_multiple > 1) {
    capacity = (capacity + c.capacity_multiple - 1) / c.capacity_multiple * c.capacity_multiple;
  }
  return capacity;
}

namespace {

// ---------------------------------------------------------------------------------------------
// The forward.

template <typename Real>
class Router {
 public:
  Router(const RoutingConfig& config, const RoutingOptions& options, int64_t num_tokens)
      : c_(config), opt_(options), num_tokens_(num_tokens), num_experts_(config.num_experts) {}

  RoutingResult<Real> run(ConstMatrixView<Real> input, bool scores_given,
                          const Matrix<Real>* noise_logits);

 private:
  bool real(int64_t t) const { return r_.saved.token_mask[t] != 0; }
  int64_t seq_len() const { return r_.saved.sequence_length; }
  int64_t num_groups() const { return num_tokens_ / seq_len(); }

  void prepare_logits(ConstMatrixView<Real> input, bool scores_given,
                      const Matrix<Real>* noise_logits);
  void compute_scores();
  void select_token_choice();
  void select_expert_choice();
  void select_dense();
  void soft_moe();
  void apply_random_routing();
  void apply_capacity();
  void finish_weights();
  void build_expert_lists();
  void compute_losses();
  void compute_stats();

  // Combine weight of selection i (of token t) as if nothing were dropped.
  double pre_drop_weight(int64_t t, int64_t i) const;

  // Selection key of token t for top-k and group choice.
  void selection_keys(int64_t t, std::vector<double>& keys) const;

  const RoutingConfig& c_;
  const RoutingOptions& opt_;
  int64_t num_tokens_;
  int64_t num_experts_;
  RoutingResult<Real> r_;
  // Selection key per (token, expert): used by DropScore and BPR.
  std::vector<double> top1_score_;  // [num_tokens]
};

template <typename Real>
void Router<Real>::prepare_logits(ConstMatrixView<Real> input, bool scores_given,
                                  const Matrix<Real>* noise_logits) {
  RoutingSaved<Real>& s = r_.saved;
  s.scores_given = scores_given;
  s.sequence_length = opt_.sequence_length > 0 ? opt_.sequence_length : num_tokens_;
  s.token_mask.assign(static_cast<size_t>(num_tokens_), 1);
  if (!opt_.token_mask.empty()) {
    std::copy(opt_.token_mask.begin(), opt_.token_mask.end(), s.token_mask.begin());
  }
  const int64_t cols = input.cols;
  s.clean_logits = Matrix<Real>(num_tokens_, cols);
  const Real inv_temperature = Real(1.0 / c_.temperature);
  for (int64_t i = 0; i < input.size(); ++i) {
    s.clean_logits.values[i] = scores_given ? input.data[i] : input.data[i] * inv_temperature;
  }
  s.logits = s.clean_logits;
  if (scores_given || !noise_active(c_)) return;

  // Gaussian logit noise N(0, (noise_std / E)²): V-MoE, Tutel.
  if (c_.noise_std > 0) {
    const double std_dev = c_.noise_std / double(num_experts_);
    for (int64_t t = 0; t < num_tokens_; ++t) {
      for (int64_t e = 0; e < cols; ++e) {
        s.logits(t, e) += Real(opt_.logit_noise.empty()
                                   ? std_dev * detail::random_normal(c_.seed, RandomStream::kLogitNoise,
                                                                     uint64_t(t), uint64_t(e))
                                   : opt_.logit_noise[t * cols + e]);
      }
    }
  }
  // Noisy top-k gating (Shazeer et al. 2017): H = x·W_g + N(0,1)·softplus(x·W_noise).
  if (c_.noisy_gating && noise_logits != nullptr) {
    s.noise_logits = *noise_logits;
    s.noise_draws = Matrix<Real>(num_tokens_, cols);
    for (int64_t t = 0; t < num_tokens_; ++t) {
      for (int64_t e = 0; e < cols; ++e) {
        const Real n = Real(detail::random_normal(c_.seed, RandomStream::kNoisyGating,
                                                  uint64_t(t), uint64_t(e)));
        const Real a = s.noise_logits(t, e);
        const Real softplus = a > 20 ? a : std::log1p(std::exp(a));
        s.noise_draws(t, e) = n;
        s.logits(t, e) += n * softplus;
      }
    }
  }
}

template <typename Real>
void Router<Real>::compute_scores() {
  RoutingSaved<Real>& s = r_.saved;
  s.scores = Matrix<Real>(num_tokens_, num_experts_);
  if (s.scores_given) {
    s.scores = s.logits;
    return;
  }
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (uses_sigmoid(c_)) {
        for (int64_t e = 0; e < num_experts_; ++e) s.scores(t, e) = sigmoid(s.logits(t, e));
      } else {
        softmax_row(s.logits.row(t), s.scores.row(t), num_experts_);
      }
    }
  });
}

template <typename Real>
void Router<Real>::selection_keys(int64_t t, std::vector<double>& keys) const {
  const RoutingSaved<Real>& s = r_.saved;
  keys.resize(static_cast<size_t>(num_experts_));
  // Softmax after top-k selects on the logits (Megatron, gpt-oss); otherwise on the scores.
  const bool on_logits = !s.scores_given && c_.scoring_func == ScoringFunc::kSoftmax &&
                         c_.softmax_order == SoftmaxOrder::kAfterTopK;
  for (int64_t e = 0; e < num_experts_; ++e) {
    keys[e] = on_logits ? double(s.logits(t, e)) : double(s.scores(t, e));
    if (!c_.e_score_correction_bias.empty()) keys[e] += c_.e_score_correction_bias[e];
  }
  if (c_.gumbel_noise == GumbelNoise::kAll && noise_active(c_) && !s.scores_given) {
    // DeepSpeed 'RSample': argmax(logits + Gumbel), a sample from softmax(logits).
    for (int64_t e = 0; e < num_experts_; ++e) {
      keys[e] = double(s.logits(t, e)) +
                detail::random_gumbel(c_.seed, RandomStream::kGumbel, uint64_t(t), uint64_t(e));
    }
  }
}

template <typename Real>
void Router<Real>::select_token_choice() {
  RoutingSaved<Real>& s = r_.saved;
  BasicRoutingPlan<Real>& p = r_.plan;
  const int64_t k = c_.num_experts_per_tok;
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(num_tokens_));

  if (opt_.replay != nullptr) {
    for (int64_t t = 0; t < num_tokens_; ++t) {
      if (!real(t)) continue;
      const auto& rec = *opt_.replay;
      chosen[t].assign(rec.token_experts.begin() + rec.token_offsets[t],
                       rec.token_experts.begin() + rec.token_offsets[t + 1]);
    }
  } else if (c_.routing_method == RoutingMethod::kSinkhorn && c_.training) {
    // Sinkhorn balancing is a training-time device; evaluation takes the plain top-k of the
    // scores (Megatron sinkhorn_load_balancing).
    // Megatron sinkhorn: cost = exp(logits); alternate row/column scaling until the mean
    // change of the column scales is below tolerance; top-k of the balanced matrix. The cost is
    // shifted by the global max logit first, which leaves the balanced matrix unchanged.
    std::vector<int64_t> rows;
    for (int64_t t = 0; t < num_tokens_; ++t)
      if (real(t)) rows.push_back(t);
    const int64_t n = static_cast<int64_t>(rows.size());
    double max_logit = -std::numeric_limits<double>::infinity();
    for (int64_t t : rows)
      for (int64_t e = 0; e < num_experts_; ++e) max_logit = std::max(max_logit, double(s.logits(t, e)));
    std::vector<double> cost(static_cast<size_t>(n * num_experts_));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < num_experts_; ++e)
        cost[i * num_experts_ + e] = std::exp(double(s.logits(rows[i], e)) - max_logit);
    std::vector<double> d0(static_cast<size_t>(n), 1.0), d1(static_cast<size_t>(num_experts_), 1.0);
    constexpr double kEps = 1e-8;
    for (int64_t it = 0; it < c_.sinkhorn_max_iterations && n > 0; ++it) {
      for (int64_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int64_t e = 0; e < num_experts_; ++e) sum += d1[e] * cost[i * num_experts_ + e];
        d0[i] = (1.0 / double(n)) / (sum + kEps);
      }
      double error = 0;
      for (int64_t e = 0; e < num_experts_; ++e) {
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += d0[i] * cost[i * num_experts_ + e];
        const double next = (1.0 / double(num_experts_)) / (sum + kEps);
        error += std::abs(next - d1[e]);
        d1[e] = next;
      }
      if (error / double(num_experts_) <= c_.sinkhorn_tolerance) break;
    }
    std::vector<double> keys(static_cast<size_t>(num_experts_));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t e = 0; e < num_experts_; ++e) keys[e] = d1[e] * cost[i * num_experts_ + e] * d0[i];
      top_k_indices(keys.data(), num_experts_, k, chosen[rows[i]]);
    }
  } else {
    detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
      std::vector<double> keys;
      std::vector<double> group_keys;
      std::vector<int32_t> picked;
      for (int64_t t = begin; t < end; ++t) {
        if (!real(t)) continue;
        selection_keys(t, keys);
        if (c_.n_group > 0) {
          // Group-limited selection: score each group, keep the topk_group best groups, mask
          // the experts of the others.
          const int64_t group_size = num_experts_ / c_.n_group;
          group_keys.assign(static_cast<size_t>(c_.n_group), 0.0);
          const int64_t per_group =
              c_.group_score == GroupScore::kSumTop2
                  ? 2
                  : (c_.group_score == GroupScore::kMax ? 1 : k / c_.topk_group);
          for (int64_t g = 0; g < c_.n_group; ++g) {
            top_k_indices(keys.data() + g * group_size, group_size,
                          std::min(per_group, group_size), picked);
            double sum = 0;
            for (int32_t i : picked) sum += keys[g * group_size + i];
            group_keys[g] = sum;
          }
          top_k_indices(group_keys.data(), c_.n_group, c_.topk_group, picked);
          std::vector<uint8_t> keep_group(static_cast<size_t>(c_.n_group), 0);
          for (int32_t g : picked) keep_group[g] = 1;
          const double fill = c_.masked_group_fill == MaskedGroupFill::kZero
                                  ? 0.0
                                  : -std::numeric_limits<double>::infinity();
          for (int64_t e = 0; e < num_experts_; ++e)
            if (!keep_group[e / group_size]) keys[e] = fill;
        }
        if (c_.gumbel_noise == GumbelNoise::kSecond && noise_active(c_) && !r_.saved.scores_given) {
          // DeepSpeed top2: the first expert is the argmax; the second is the argmax of
          // logits + Gumbel with the first masked out.
          top_k_indices(keys.data(), num_experts_, 1, chosen[t]);
          for (int64_t e = 0; e < num_experts_; ++e) {
            keys[e] = e == chosen[t][0]
                          ? -std::numeric_limits<double>::infinity()
                          : double(r_.saved.logits(t, e)) +
                                detail::random_gumbel(c_.seed, RandomStream::kGumbel,
                                                      uint64_t(t), uint64_t(e));
          }
          top_k_indices(keys.data(), num_experts_, k - 1, picked);
          chosen[t].insert(chosen[t].end(), picked.begin(), picked.end());
        } else {
          top_k_indices(keys.data(), num_experts_, k, chosen[t]);
        }
      }
    });
  }

  p.token_offsets.assign(static_cast<size_t>(num_tokens_ + 1), 0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    p.token_offsets[t + 1] = p.token_offsets[t] + static_cast<int64_t>(chosen[t].size());
    p.token_experts.insert(p.token_experts.end(), chosen[t].begin(), chosen[t].end());
  }
  p.token_kept.assign(p.token_experts.size(), 1);
}

template <typename Real>
void Router<Real>::select_expert_choice() {
  // Each expert takes its top-C real tokens of each sequence by score (ties: lower token).
  RoutingSaved<Real>& s = r_.saved;
  BasicRoutingPlan<Real>& p = r_.plan;
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(num_tokens_));
  if (opt_.replay != nullptr) {
    for (int64_t t = 0; t < num_tokens_; ++t) {
      if (!real(t)) continue;
      chosen[t].assign(opt_.replay->token_experts.begin() + opt_.replay->token_offsets[t],
                       opt_.replay->token_experts.begin() + opt_.replay->token_offsets[t + 1]);
    }
  } else {
    std::vector<double> keys;
    std::vector<int32_t> picked;
    int64_t reported = 0;
    for (int64_t g = 0; g < num_groups(); ++g) {
      const int64_t first = g * seq_len();
      int64_t n_real = 0;
      for (int64_t t = first; t < first + seq_len(); ++t) n_real += real(t);
      const int64_t capacity = compute_capacity(c_, n_real);
      reported = std::max(reported, capacity);
      for (int64_t e = 0; e < num_experts_; ++e) {
        keys.assign(static_cast<size_t>(seq_len()), -std::numeric_limits<double>::infinity());
        for (int64_t i = 0; i < seq_len(); ++i)
          if (real(first + i)) keys[i] = double(s.scores(first + i, e));
        top_k_indices(keys.data(), seq_len(), std::min(capacity, n_real), picked);
        for (int32_t i : picked) chosen[first + i].push_back(static_cast<int32_t>(e));
      }
    }
    p.capacity = reported;
  }
  // Choice order per token: by score, best first (ties: lower expert).
  for (int64_t t = 0; t < num_tokens_; ++t) {
    std::stable_sort(chosen[t].begin(), chosen[t].end(), [&](int32_t a, int32_t b) {
      return s.scores(t, a) > s.scores(t, b);
    });
  }
  p.token_offsets.assign(static_cast<size_t>(num_tokens_ + 1), 0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    p.token_offsets[t + 1] = p.token_offsets[t] + static_cast<int64_t>(chosen[t].size());
    p.token_experts.insert(p.token_experts.end(), chosen[t].begin(), chosen[t].end());
  }
  p.token_kept.assign(p.token_experts.size(), 1);
}

template <typename Real>
void Router<Real>::select_dense() {
  BasicRoutingPlan<Real>& p = r_.plan;
  p.token_offsets.assign(static_cast<size_t>(num_tokens_ + 1), 0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    const int64_t n = real(t) ? num_experts_ : 0;
    p.token_offsets[t + 1] = p.token_offsets[t] + n;
    for (int64_t e = 0; e < n; ++e) p.token_experts.push_back(static_cast<int32_t>(e));
  }
  p.token_kept.assign(p.token_experts.size(), 1);
}

template <typename Real>
void Router<Real>::apply_random_routing() {
  // GShard: the second choice is dispatched only when 2·g2 > U(0,1), with g normalised over
  // the two choices, so its expected share follows its gate.
  if (!c_.random_routing || !noise_active(c_)) return;
  BasicRoutingPlan<Real>& p = r_.plan;
  for (int64_t t = 0; t < num_tokens_; ++t) {
    const int64_t begin = p.token_offsets[t];
    if (p.token_offsets[t + 1] - begin < 2) continue;
    const double g1 = double(r_.saved.scores(t, p.token_experts[begin]));
    const double g2 = double(r_.saved.scores(t, p.token_experts[begin + 1]));
    const double u = detail::random_uniform(c_.seed, RandomStream::kRandomRouting, uint64_t(t), 0);
    if (!(2.0 * g2 / (g1 + g2) > u)) {
      p.token_kept[begin + 1] = 0;
      p.dropped.push_back({t, p.token_experts[begin + 1], DropReason::kRandomRouting});
    }
  }
}

template <typename Real>
double Router<Real>::pre_drop_weight(int64_t t, int64_t i) const {
  const BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  double z = 1;
  // Before drops the weight is normalised only by renormalize before_drop (or the softmax
  // over the selected logits); after_drop normalises the survivors, which are not known yet.
  // Sinkhorn combines with raw scores (see finish_weights).
  const bool normalised =
      c_.routing_method == RoutingMethod::kTopK &&
      (c_.renormalize == Renormalize::kBeforeDrop ||
       (c_.softmax_order == SoftmaxOrder::kAfterTopK && c_.scoring_func == ScoringFunc::kSoftmax &&
        !s.scores_given));
  if (normalised) {
    z = uses_sigmoid(c_) && !s.scores_given ? kSigmoidNormEps : 0.0;
    for (int64_t j = p.token_offsets[t]; j < p.token_offsets[t + 1]; ++j)
      z += double(s.scores(t, p.token_experts[j]));
  }
  return c_.routed_scaling_factor * double(s.scores(t, p.token_experts[i])) / z;
}

template <typename Real>
void Router<Real>::apply_capacity() {
  BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  const bool per_sequence = c_.capacity_scope == Scope::kSequence;
  const int64_t group_len = per_sequence ? seq_len() : num_tokens_;
  const int64_t groups = num_tokens_ / group_len;
  int64_t reported = -1;
  std::vector<int64_t> load(static_cast<size_t>(num_experts_));
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * group_len, last = first + group_len;
    int64_t n_real = 0;
    for (int64_t t = first; t < last; ++t) n_real += real(t);
    const int64_t capacity = compute_capacity(c_, n_real);
    std::fill(load.begin(), load.end(), 0);
    for (int64_t t = first; t < last; ++t)
      for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
        if (p.token_kept[i]) ++load[p.token_experts[i]];
    if (capacity < 0) {
      reported = std::max(reported, *std::max_element(load.begin(), load.end()));
      continue;
    }
    reported = std::max(reported, capacity);

    // Live selections of this group, in priority order.
    std::vector<int64_t> order;
    std::vector<int64_t> tokens;
    for (int64_t t = first; t < last; ++t) tokens.push_back(t);
    if (c_.batch_prioritized_routing) {
      // Batch prioritised routing: tokens by descending top-1 score, stable.
      std::stable_sort(tokens.begin(), tokens.end(), [&](int64_t a, int64_t b) {
        return top1_score_[a] > top1_score_[b];
      });
    }
    std::vector<uint8_t> keep(p.token_kept.size(), 0);
    std::fill(load.begin(), load.end(), 0);
    auto offer = [&](int64_t i) {
      if (!p.token_kept[i]) return;
      const int32_t e = p.token_experts[i];
      if (load[e] < capacity) {
        ++load[e];
        keep[i] = 1;
      }
    };
    if (c_.drop_policy == DropPolicy::kPosition) {
      if (c_.position_order == PositionOrder::kChoiceMajor) {
        int64_t max_choices = 0;
        for (int64_t t = first; t < last; ++t)
          max_choices = std::max(max_choices, p.token_offsets[t + 1] - p.token_offsets[t]);
        for (int64_t j = 0; j < max_choices; ++j)
          for (int64_t t : tokens)
            if (p.token_offsets[t] + j < p.token_offsets[t + 1]) offer(p.token_offsets[t] + j);
      } else {
        for (int64_t t : tokens)
          for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) offer(i);
      }
    } else {
      // Per expert, the best C by key: score, logit or a seeded uniform priority.
      std::vector<std::vector<std::pair<double, int64_t>>> per_expert(
          static_cast<size_t>(num_experts_));
      for (int64_t t : tokens) {
        for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
          if (!p.token_kept[i]) continue;
          const int32_t e = p.token_experts[i];
          double key;
          if (c_.drop_policy == DropPolicy::kRandom) {
            key = detail::random_uniform(c_.seed, RandomStream::kRandomDrop, uint64_t(t), uint64_t(e));
          } else if (c_.drop_score == DropScore::kLogits && !s.scores_given) {
            key = double(s.logits(t, e));
          } else if (c_.drop_score == DropScore::kWeights) {
            key = pre_drop_weight(t, i);
          } else {
            key = double(s.scores(t, e));
          }
          per_expert[e].push_back({key, i});
        }
      }
      for (auto& list : per_expert) {
        std::stable_sort(list.begin(), list.end(),
                         [](const auto& a, const auto& b) { return a.first > b.first; });
        for (size_t j = 0; j < list.size() && int64_t(j) < capacity; ++j) keep[list[j].second] = 1;
      }
    }
    for (int64_t t = first; t < last; ++t) {
      for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
        if (p.token_kept[i] && !keep[i]) {
          p.token_kept[i] = 0;
          p.dropped.push_back({t, p.token_experts[i], DropReason::kCapacity});
        }
      }
    }
  }
  p.capacity = reported;
  std::stable_sort(p.dropped.begin(), p.dropped.end(), [&](const auto& a, const auto& b) {
    return a.token < b.token;
  });
}

template <typename Real>
void Router<Real>::finish_weights() {
  // w = c · q / Z, see routing.h.
  BasicRoutingPlan<Real>& p = r_.plan;
  RoutingSaved<Real>& s = r_.saved;
  const int64_t n = p.num_selections();
  p.token_weights.assign(static_cast<size_t>(n), Real(0));
  s.norm.assign(static_cast<size_t>(n), Real(1));
  s.in_norm.assign(static_cast<size_t>(n), 0);
  const bool token_choice = is_token_choice(c_);
  const bool after_topk = token_choice && !s.scores_given &&
                          c_.scoring_func == ScoringFunc::kSoftmax &&
                          c_.softmax_order == SoftmaxOrder::kAfterTopK &&
                          c_.routing_method == RoutingMethod::kTopK;
  // Sinkhorn combines with the raw scores of the chosen experts (Megatron).
  const Renormalize renorm = c_.routing_method == RoutingMethod::kTopK ? c_.renormalize : Renormalize::kNone;
  const Real eps = uses_sigmoid(c_) && !s.scores_given
                       ? Real(kSigmoidNormEps)
                       : Real(0);
  const Real scale = Real(c_.routed_scaling_factor);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    const int64_t begin = p.token_offsets[t], end = p.token_offsets[t + 1];
    if (begin == end) continue;
    Real z = 1;
    if (renorm != Renormalize::kNone) {
      Real sum = 0;
      for (int64_t i = begin; i < end; ++i) {
        const bool counts = renorm == Renormalize::kBeforeDrop || p.token_kept[i];
        if (counts) {
          sum += s.scores(t, p.token_experts[i]);
          s.in_norm[i] = 1;
        }
      }
      z = sum + eps;
    }
    for (int64_t i = begin; i < end; ++i) {
      s.norm[i] = z;
      if (!p.token_kept[i]) continue;
      const int32_t e = p.token_experts[i];
      if (after_topk && renorm == Renormalize::kBeforeDrop) {
        // Softmax over the selected logits (Megatron pre_softmax = False, gpt-oss): the same
        // value as q_e / Σ_selected q, rounded as the peers round it.
        Real max_logit = -std::numeric_limits<Real>::infinity();
        for (int64_t j = begin; j < end; ++j)
          max_logit = std::max(max_logit, s.logits(t, p.token_experts[j]));
        Real sum = 0;
        for (int64_t j = begin; j < end; ++j) sum += std::exp(s.logits(t, p.token_experts[j]) - max_logit);
        p.token_weights[i] = scale * (std::exp(s.logits(t, e) - max_logit) / sum);
      } else if (z > 0) {
        p.token_weights[i] = scale * (s.scores(t, e) / z);
      }
    }
  }
}

template <typename Real>
void Router<Real>::build_expert_lists() {
  BasicRoutingPlan<Real>& p = r_.plan;
  // Counting sort by expert; tokens stay ascending inside each expert.
  p.expert_offsets.assign(static_cast<size_t>(num_experts_ + 1), 0);
  for (int64_t i = 0; i < p.num_selections(); ++i)
    if (p.token_kept[i]) ++p.expert_offsets[p.token_experts[i] + 1];
  for (int64_t e = 0; e < num_experts_; ++e) p.expert_offsets[e + 1] += p.expert_offsets[e];
  const int64_t kept = p.expert_offsets[num_experts_];
  p.expert_tokens.assign(static_cast<size_t>(kept), 0);
  p.expert_weights.assign(static_cast<size_t>(kept), Real(0));
  p.expert_selection.assign(static_cast<size_t>(kept), 0);
  std::vector<int64_t> cursor(p.expert_offsets.begin(), p.expert_offsets.end() - 1);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      if (!p.token_kept[i]) continue;
      const int64_t slot = cursor[p.token_experts[i]]++;
      p.expert_tokens[slot] = static_cast<int32_t>(t);
      p.expert_weights[slot] = p.token_weights[i];
      p.expert_selection[slot] = i;
    }
  }
}

template <typename Real>
void Router<Real>::soft_moe() {
  // Soft MoE: logits [T, E·S]. dispatch[:, j] = softmax over the real tokens of a sequence;
  // combine[t, :] = softmax over all slots.
  RoutingSaved<Real>& s = r_.saved;
  BasicRoutingPlan<Real>& p = r_.plan;
  const int64_t slots = num_experts_ * c_.slots_per_expert;
  p.num_slots = slots;
  p.dispatch.assign(static_cast<size_t>(num_tokens_ * slots), Real(0));
  p.combine.assign(static_cast<size_t>(num_tokens_ * slots), Real(0));
  for (int64_t t = 0; t < num_tokens_; ++t)
    if (real(t)) softmax_row(s.logits.row(t), p.combine.data() + t * slots, slots);
  for (int64_t g = 0; g < num_groups(); ++g) {
    const int64_t first = g * seq_len();
    for (int64_t j = 0; j < slots; ++j) {
      Real max_value = -std::numeric_limits<Real>::infinity();
      for (int64_t t = first; t < first + seq_len(); ++t)
        if (real(t)) max_value = std::max(max_value, s.logits(t, j));
      Real sum = 0;
      for (int64_t t = first; t < first + seq_len(); ++t) {
        if (!real(t)) continue;
        const Real v = std::exp(s.logits(t, j) - max_value);
        p.dispatch[t * slots + j] = v;
        sum += v;
      }
      if (sum > 0)
        for (int64_t t = first; t < first + seq_len(); ++t) p.dispatch[t * slots + j] /= sum;
    }
  }
  // Per token: every expert, weight = its slots' combine weights summed.
  s.scores = Matrix<Real>(num_tokens_, num_experts_);
  for (int64_t t = 0; t < num_tokens_; ++t)
    for (int64_t e = 0; e < num_experts_; ++e)
      for (int64_t k = 0; k < c_.slots_per_expert; ++k)
        s.scores(t, e) += p.combine[t * slots + e * c_.slots_per_expert + k];
  select_dense();
  p.token_weights.assign(p.token_experts.size(), Real(0));
  for (int64_t t = 0; t < num_tokens_; ++t)
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
      p.token_weights[i] = s.scores(t, p.token_experts[i]);
  s.norm.assign(p.token_experts.size(), Real(1));
  s.in_norm.assign(p.token_experts.size(), 0);
  p.expert_offsets.assign(static_cast<size_t>(num_experts_ + 1), 0);
  // Each expert processes slots_per_expert slots per sequence.
  p.capacity = -1;
}

// ---------------------------------------------------------------------------------------------
// Losses.

// Probabilities P used by the balance losses for token t: the softmax of the clean logits, the
// sigmoid scores normalised per token (Megatron), or the given scores.
template <typename Real>
void balance_probs(const RoutingConfig& c, const RoutingSaved<Real>& s, int64_t t,
                   std::vector<double>& out) {
  const int64_t n = c.num_experts;
  out.resize(static_cast<size_t>(n));
  if (s.scores_given) {
    for (int64_t e = 0; e < n; ++e) out[e] = double(s.scores(t, e));
  } else if (uses_sigmoid(c)) {
    double sum = 0;
    for (int64_t e = 0; e < n; ++e) sum += out[e] = 1.0 / (1.0 + std::exp(-double(s.clean_logits(t, e))));
    for (int64_t e = 0; e < n; ++e) out[e] /= (sum + kSigmoidNormEps);
  } else {  // softmax in double, one exp per expert
    const Real* x = s.clean_logits.row(t);
    double max_value = x[0];
    for (int64_t e = 1; e < n; ++e) max_value = std::max(max_value, double(x[e]));
    double sum = 0;
    for (int64_t e = 0; e < n; ++e) sum += out[e] = std::exp(double(x[e]) - max_value);
    for (int64_t e = 0; e < n; ++e) out[e] /= sum;
  }
}

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::numbers::sqrt2); }
double normal_pdf(double x) { return std::exp(-0.5 * x * x) / std::sqrt(2.0 * std::numbers::pi); }

double cv_squared(const std::vector<double>& v) {
  const double n = double(v.size());
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  return mean > 0 ? var / (mean * mean) : 0.0;
}

// d CV²(v) / d v_e = 2(v_e − m)/(n m²) − 2 var/(n m³).
std::vector<double> cv_squared_grad(const std::vector<double>& v) {
  const double n = double(v.size());
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  std::vector<double> g(v.size(), 0.0);
  if (mean <= 0) return g;
  for (size_t e = 0; e < v.size(); ++e)
    g[e] = 2.0 * (v[e] - mean) / (n * mean * mean) - 2.0 * var / (n * mean * mean * mean);
  return g;
}

// Smooth load estimate of V-MoE: load_e = Σ_t P(e stays in the top-k under a fresh noise draw)
//   = Σ_t 1 − Φ((threshold_t − clean_logit_te) / σ),  threshold_t = the k-th largest noisy logit.
// threshold_expert[t] receives the expert whose noisy logit is the threshold.
template <typename Real>
std::vector<double> smooth_load(const RoutingConfig& c, const RoutingSaved<Real>& s,
                                std::vector<int32_t>& threshold_expert) {
  const int64_t num_tokens = s.logits.rows, num_experts = c.num_experts;
  const double sigma = c.noise_std / double(num_experts);
  std::vector<double> load(static_cast<size_t>(num_experts), 0.0), keys(static_cast<size_t>(num_experts));
  std::vector<int32_t> picked;
  threshold_expert.assign(static_cast<size_t>(num_tokens), 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    for (int64_t e = 0; e < num_experts; ++e) keys[e] = double(s.logits(t, e));
    top_k_indices(keys.data(), num_experts, c.num_experts_per_tok, picked);
    threshold_expert[t] = picked.back();
    const double threshold = keys[picked.back()];
    for (int64_t e = 0; e < num_experts; ++e)
      load[e] += 1.0 - normal_cdf((threshold - double(s.clean_logits(t, e))) / sigma);
  }
  return load;
}

bool smooth_load_active(const RoutingConfig& c, bool scores_given) {
  return !scores_given && c.noise_std > 0 && noise_active(c) && is_token_choice(c);
}

// Per-expert counts f numerators of the load-balancing loss for tokens [first, last).
template <typename Real>
void balance_counts(const RoutingConfig& c, const BasicRoutingPlan<Real>& p,
                    const RoutingSaved<Real>& s, int64_t first, int64_t last,
                    std::vector<double>& counts) {
  counts.assign(static_cast<size_t>(c.num_experts), 0.0);
  std::vector<double> probs;
  std::vector<int32_t> top;
  for (int64_t t = first; t < last; ++t) {
    if (!s.token_mask[t]) continue;
    if (c.aux_loss_recompute_topk) {
      balance_probs(c, s, t, probs);
      const int64_t k = c.aux_loss_counts == AuxLossCounts::kFirstChoice ? 1 : c.num_experts_per_tok;
      top_k_indices(probs.data(), c.num_experts, k, top);
      for (int32_t e : top) counts[e] += 1.0;
      continue;
    }
    const int64_t begin = p.token_offsets[t], end = p.token_offsets[t + 1];
    if (c.aux_loss_dropped_to_expert0) {
      // HF Switch: the expert index is the argmax of the capacity-masked one-hot, so a
      // dropped token counts as expert 0.
      for (int64_t i = begin; i < end && (c.aux_loss_counts == AuxLossCounts::kAllChoices || i == begin); ++i)
        counts[p.token_kept[i] ? p.token_experts[i] : 0] += 1.0;
      continue;
    }
    for (int64_t i = begin; i < end; ++i) {
      if (c.aux_loss_counts == AuxLossCounts::kFirstChoice && i > begin) break;
      counts[p.token_experts[i]] += 1.0;
    }
  }
}

template <typename Real>
void Router<Real>::compute_losses() {
  RoutingLosses& l = r_.losses;
  RoutingSaved<Real>& s = r_.saved;
  const BasicRoutingPlan<Real>& p = r_.plan;
  const int64_t n_experts = num_experts_;
  int64_t n_real = 0;
  for (int64_t t = 0; t < num_tokens_; ++t) n_real += real(t);

  // z-loss: mean over real tokens of logsumexp(logits)² (ST-MoE), on the clean logits. With
  // padding_in_loss_means, padding rows count with zero logits: lse = log(cols) each.
  if (!s.scores_given && n_real > 0) {
    // lse per token in parallel (rows are independent), summed in token order.
    std::vector<double> lse(static_cast<size_t>(num_tokens_), 0.0);
    detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        if (real(t)) lse[t] = logsumexp_row(s.clean_logits.row(t), s.clean_logits.cols);
    });
    double sum = 0;
    for (int64_t t = 0; t < num_tokens_; ++t)
      if (real(t)) sum += lse[t] * lse[t];
    if (c_.padding_in_loss_means) {
      const double pad_lse = std::log(double(s.clean_logits.cols));
      sum += double(num_tokens_ - n_real) * pad_lse * pad_lse;
    }
    l.z_loss = sum / double(c_.padding_in_loss_means ? num_tokens_ : n_real);
  }
  if (c_.routing_method == RoutingMethod::kSoftMoe || n_real == 0) {
    l.total = c_.router_z_loss_coef * l.z_loss;
    return;
  }

  // P of every real token, computed once, rows in parallel; the sums below read it in token
  // order, as they would compute it.
  std::vector<double> balance_p(static_cast<size_t>(num_tokens_ * n_experts), 0.0);
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    std::vector<double> row;
    for (int64_t t = begin; t < end; ++t) {
      if (!real(t)) continue;
      balance_probs(c_, s, t, row);
      std::copy(row.begin(), row.end(), balance_p.begin() + t * n_experts);
    }
  });
  auto probs_of = [&](int64_t t) { return balance_p.data() + t * n_experts; };
  // Importance CV² over Σ_t P_te.
  std::vector<double> importance(static_cast<size_t>(n_experts), 0.0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    const double* probs = probs_of(t);
    for (int64_t e = 0; e < n_experts; ++e) importance[e] += probs[e];
  }
  l.importance_cv2 = cv_squared(importance);

  // Load CV² (V-MoE), see smooth_load.
  if (smooth_load_active(c_, s.scores_given)) {
    std::vector<int32_t> threshold_expert;
    l.load_cv2 = cv_squared(smooth_load(c_, s, threshold_expert));
  }

  // Load balancing: E · Σ_e f_e · P_e, f_e = count_e / T, P_e = mean_t p_te.
  if (is_token_choice(c_)) {
    const double k_div = c_.aux_loss_scale == AuxLossScale::kOne &&
                                 c_.aux_loss_counts == AuxLossCounts::kAllChoices
                             ? double(c_.num_experts_per_tok)
                             : 1.0;
    const bool per_seq = c_.aux_loss_scope == AuxLossScope::kSequence;
    const int64_t group_len = per_seq ? seq_len() : num_tokens_;
    const int64_t groups = num_tokens_ / group_len;
    s.aux_counts.assign(static_cast<size_t>(groups * n_experts), 0.0);
    s.aux_token_counts.assign(static_cast<size_t>(groups), 0.0);
    double total = 0;
    int64_t used_groups = 0;
    std::vector<double> counts, mean_p(static_cast<size_t>(n_experts));
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * group_len, last = first + group_len;
      balance_counts(c_, p, s, first, last, counts);
      int64_t tokens = 0;
      std::fill(mean_p.begin(), mean_p.end(), 0.0);
      for (int64_t t = first; t < last; ++t) {
        if (!real(t)) continue;
        ++tokens;
        const double* probs = probs_of(t);
        for (int64_t e = 0; e < n_experts; ++e) mean_p[e] += probs[e];
      }
      if (tokens == 0) continue;
      if (c_.padding_in_loss_means) tokens = last - first;  // padding rows count as zeros
      double count_tokens = double(tokens);
      if (c_.aux_loss_scope == AuxLossScope::kGlobal && !opt_.global_counts.empty()) {
        for (int64_t e = 0; e < n_experts; ++e) counts[e] += opt_.global_counts[e];
        count_tokens += double(opt_.global_tokens);
      }
      double value = 0;
      for (int64_t e = 0; e < n_experts; ++e) {
        s.aux_counts[g * n_experts + e] = counts[e] / count_tokens;
        value += (counts[e] / count_tokens) * (mean_p[e] / double(tokens));
      }
      s.aux_token_counts[g] = double(tokens);
      total += double(n_experts) * value / k_div;
      ++used_groups;
    }
    l.load_balancing = used_groups > 0 ? total / double(used_groups) : 0.0;
    // Mark the groups that count, for the backward.
    for (int64_t g = 0; g < groups; ++g)
      if (s.aux_token_counts[g] > 0) s.aux_token_counts[g] *= double(used_groups);
  }

  switch (c_.aux_loss_type) {
    case AuxLossType::kNone: l.aux_loss = 0; break;
    case AuxLossType::kLoadBalancing: l.aux_loss = l.load_balancing; break;
    case AuxLossType::kImportanceLoad:
      l.aux_loss = c_.importance_loss_weight * l.importance_cv2 + c_.load_loss_weight * l.load_cv2;
      break;
  }
  l.total = c_.router_aux_loss_coef * l.aux_loss + c_.router_z_loss_coef * l.z_loss;
}

// ---------------------------------------------------------------------------------------------
// Statistics.

double entropy_of_counts(const std::vector<int64_t>& counts) {
  double total = 0;
  for (int64_t c : counts) total += double(c);
  if (total <= 0) return 0.0;
  double h = 0;
  for (int64_t c : counts)
    if (c > 0) h -= (double(c) / total) * std::log(double(c) / total);
  return h;
}

template <typename Real>
void Router<Real>::compute_stats() {
  RoutingStats& st = r_.stats;
  const BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  const int64_t n_experts = num_experts_;
  st.tokens_per_expert.assign(static_cast<size_t>(n_experts), 0);
  st.selected_per_expert.assign(static_cast<size_t>(n_experts), 0);
  double entropy_sum = 0, confidence_sum = 0, weight_sum = 0;
  // Per-token entropy and top score, rows in parallel; summed below in token order.
  std::vector<double> entropy(static_cast<size_t>(num_tokens_), 0.0), top_score(entropy.size(), 0.0);
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!real(t)) continue;
      double h = 0, top = 0, norm = 0;
      for (int64_t e = 0; e < n_experts; ++e) norm += double(s.scores(t, e));
      for (int64_t e = 0; e < n_experts; ++e) {
        const double q = norm > 0 ? double(s.scores(t, e)) / norm : 0.0;
        if (q > 0) h -= q * std::log(q);
        top = std::max(top, double(s.scores(t, e)));
      }
      entropy[t] = h;
      top_score[t] = top;
    }
  });
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    ++st.num_tokens;
    entropy_sum += entropy[t];
    confidence_sum += top_score[t];
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      ++st.selected_per_expert[p.token_experts[i]];
      ++st.num_selections;
      if (p.token_kept[i]) {
        ++st.tokens_per_expert[p.token_experts[i]];
        ++st.num_kept;
        weight_sum += double(p.token_weights[i]);
      }
    }
  }
  st.num_dropped = st.num_selections - st.num_kept;
  st.dropped_fraction = st.num_selections > 0 ? double(st.num_dropped) / double(st.num_selections) : 0;
  if (st.num_tokens > 0) {
    st.mean_entropy = entropy_sum / double(st.num_tokens);
    st.mean_entropy_normalized = n_experts > 1 ? st.mean_entropy / std::log(double(n_experts)) : 0;
    st.router_confidence = confidence_sum / double(st.num_tokens);
    st.mean_combine_weight = weight_sum / double(st.num_tokens);
  }
  double sum = 0, max_load = 0;
  for (int64_t c : st.tokens_per_expert) {
    sum += double(c);
    max_load = std::max(max_load, double(c));
    st.dead_experts += c == 0;
  }
  st.mean_load = sum / double(n_experts);
  st.max_load = max_load;
  st.max_over_mean_load = st.mean_load > 0 ? max_load / st.mean_load : 0;
  double var = 0;
  for (int64_t c : st.tokens_per_expert) var += (double(c) - st.mean_load) * (double(c) - st.mean_load);
  var /= double(n_experts);
  st.load_cv = st.mean_load > 0 ? std::sqrt(var) / st.mean_load : 0;
  st.effective_experts = st.num_kept > 0 ? std::exp(entropy_of_counts(st.tokens_per_expert)) : 0;
  st.collapsed = st.num_kept > 0 && st.effective_experts < c_.collapse_threshold * double(n_experts);

  if (opt_.labels.empty()) return;
  // Aggregation by the caller's label, and I(label; expert) over kept assignments.
  std::vector<int32_t> labels;
  for (int64_t t = 0; t < num_tokens_; ++t)
    if (real(t)) labels.push_back(opt_.labels[t]);
  std::sort(labels.begin(), labels.end());
  labels.erase(std::unique(labels.begin(), labels.end()), labels.end());
  st.by_label.resize(labels.size());
  std::vector<double> label_entropy(labels.size(), 0.0);
  for (size_t i = 0; i < labels.size(); ++i) {
    st.by_label[i].label = labels[i];
    st.by_label[i].tokens_per_expert.assign(static_cast<size_t>(n_experts), 0);
  }
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    const size_t li = std::lower_bound(labels.begin(), labels.end(), opt_.labels[t]) - labels.begin();
    LabelStats& ls = st.by_label[li];
    ++ls.num_tokens;
    double norm = 0, h = 0;
    for (int64_t e = 0; e < n_experts; ++e) norm += double(s.scores(t, e));
    for (int64_t e = 0; e < n_experts; ++e) {
      const double q = norm > 0 ? double(s.scores(t, e)) / norm : 0.0;
      if (q > 0) h -= q * std::log(q);
    }
    label_entropy[li] += h;
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
      if (p.token_kept[i]) ++ls.tokens_per_expert[p.token_experts[i]];
  }
  double total = double(st.num_kept);
  double h_label = 0, h_label_given_expert = 0;
  std::vector<double> expert_totals(static_cast<size_t>(n_experts), 0.0);
  for (size_t i = 0; i < labels.size(); ++i) {
    LabelStats& ls = st.by_label[i];
    ls.mean_entropy = ls.num_tokens > 0 ? label_entropy[i] / double(ls.num_tokens) : 0;
    ls.load_entropy_normalized =
        n_experts > 1 ? entropy_of_counts(ls.tokens_per_expert) / std::log(double(n_experts)) : 0;
    int64_t label_total = 0;
    for (int64_t e = 0; e < n_experts; ++e) {
      label_total += ls.tokens_per_expert[e];
      expert_totals[e] += double(ls.tokens_per_expert[e]);
      if (ls.tokens_per_expert[e] > ls.tokens_per_expert[ls.top_expert]) ls.top_expert = e;
    }
    ls.top_expert_share = label_total > 0 ? double(ls.tokens_per_expert[ls.top_expert]) / double(label_total) : 0;
    if (total > 0 && label_total > 0) {
      const double pl = double(label_total) / total;
      h_label -= pl * std::log(pl);
    }
  }
  for (int64_t e = 0; e < n_experts; ++e) {
    if (expert_totals[e] <= 0) continue;
    for (size_t i = 0; i < labels.size(); ++i) {
      const double joint = double(st.by_label[i].tokens_per_expert[e]);
      if (joint > 0) h_label_given_expert -= (joint / total) * std::log(joint / expert_totals[e]);
    }
  }
  st.label_expert_mutual_information = h_label > 0 ? (h_label - h_label_given_expert) / h_label : 0;
}

template <typename Real>
RoutingResult<Real> Router<Real>::run(ConstMatrixView<Real> input, bool scores_given,
                                      const Matrix<Real>* noise_logits) {
  r_.plan.num_tokens = num_tokens_;
  r_.plan.num_experts = num_experts_;
  prepare_logits(input, scores_given, noise_logits);
  if (c_.routing_method == RoutingMethod::kSoftMoe) {
    soft_moe();
    compute_losses();
    compute_stats();
    return std::move(r_);
  }
  compute_scores();
  top1_score_.assign(static_cast<size_t>(num_tokens_), 0.0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < num_experts_; ++e) top = std::max(top, double(r_.saved.scores(t, e)));
    top1_score_[t] = top;
  }
  switch (c_.routing_method) {
    case RoutingMethod::kDense: select_dense(); break;
    case RoutingMethod::kExpertChoice: select_expert_choice(); break;
    default:
      select_token_choice();
      apply_random_routing();
      apply_capacity();
      break;
  }
  finish_weights();
  build_expert_lists();
  compute_losses();
  compute_stats();
  return std::move(r_);
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename Real>
Matrix<Real> backward_impl(const RoutingConfig& c, const RoutingResult<Real>& r,
                           const RoutingGradOutput<Real>& g, Matrix<Real>* d_noisy) {
  const BasicRoutingPlan<Real>& p = r.plan;
  const RoutingSaved<Real>& s = r.saved;
  const int64_t num_tokens = p.num_tokens, num_experts = p.num_experts;
  const int64_t cols = s.logits.cols;
  Matrix<Real> d_logits(num_tokens, cols);
  int64_t n_real = 0;
  for (int64_t t = 0; t < num_tokens; ++t) n_real += s.token_mask[t];

  if (c.routing_method == RoutingMethod::kSoftMoe) {
    const int64_t slots = p.num_slots;
    if (static_cast<int64_t>(g.d_dispatch.size()) != (g.d_dispatch.empty() ? 0 : num_tokens * slots) ||
        static_cast<int64_t>(g.d_combine.size()) != (g.d_combine.empty() ? 0 : num_tokens * slots)) {
      throw_input_error("d_dispatch/d_combine size", num_tokens * slots, g.d_dispatch.size());
    }
    // Combine: softmax over slots per token.
    if (!g.d_combine.empty()) {
      for (int64_t t = 0; t < num_tokens; ++t) {
        if (!s.token_mask[t]) continue;
        double dot = 0;
        for (int64_t j = 0; j < slots; ++j) dot += double(p.combine[t * slots + j]) * g.d_combine[t * slots + j];
        for (int64_t j = 0; j < slots; ++j)
          d_logits(t, j) += Real(double(p.combine[t * slots + j]) * (g.d_combine[t * slots + j] - dot));
      }
    }
    // Dispatch: softmax over the real tokens of each sequence, per slot.
    if (!g.d_dispatch.empty()) {
      const int64_t len = s.sequence_length;
      for (int64_t first = 0; first < num_tokens; first += len) {
        for (int64_t j = 0; j < slots; ++j) {
          double dot = 0;
          for (int64_t t = first; t < first + len; ++t)
            if (s.token_mask[t]) dot += double(p.dispatch[t * slots + j]) * g.d_dispatch[t * slots + j];
          for (int64_t t = first; t < first + len; ++t)
            if (s.token_mask[t])
              d_logits(t, j) += Real(double(p.dispatch[t * slots + j]) * (g.d_dispatch[t * slots + j] - dot));
        }
      }
    }
  } else {
    if (static_cast<int64_t>(g.d_token_weights.size()) != p.num_selections() && !g.d_token_weights.empty()) {
      throw_input_error("d_token_weights length", p.num_selections(), g.d_token_weights.size());
    }
    std::vector<double> dq(static_cast<size_t>(num_experts));
    const double scale = c.routed_scaling_factor;
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (!s.token_mask[t]) continue;
      const int64_t begin = p.token_offsets[t], end = p.token_offsets[t + 1];
      std::fill(dq.begin(), dq.end(), 0.0);
      bool any = false;
      if (!g.d_token_weights.empty()) {
        // w_i = c · q_i / Z;  dq_i += c·dw_i/Z;  dZ = −Σ_i c·dw_i·q_i/Z².
        double d_norm = 0;
        for (int64_t i = begin; i < end; ++i) {
          if (!p.token_kept[i]) continue;
          const int32_t e = p.token_experts[i];
          const double z = double(s.norm[i]);
          if (z <= 0) continue;
          const double dw = double(g.d_token_weights[i]) * scale;
          dq[e] += dw / z;
          d_norm -= dw * double(s.scores(t, e)) / (z * z);
          any = true;
        }
        for (int64_t i = begin; i < end; ++i)
          if (s.in_norm[i]) dq[p.token_experts[i]] += d_norm;
      }
      if (s.scores_given) {
        for (int64_t e = 0; e < num_experts; ++e) d_logits(t, e) += Real(dq[e]);
        continue;
      }
      if (!any) continue;
      if (uses_sigmoid(c)) {
        for (int64_t e = 0; e < num_experts; ++e) {
          const double q = double(s.scores(t, e));
          d_logits(t, e) += Real(q * (1.0 - q) * dq[e]);
        }
      } else {
        double dot = 0;
        for (int64_t e = 0; e < num_experts; ++e) dot += double(s.scores(t, e)) * dq[e];
        for (int64_t e = 0; e < num_experts; ++e)
          d_logits(t, e) += Real(double(s.scores(t, e)) * (dq[e] - dot));
      }
    }
  }

  // Up to here every term flowed through the (possibly noisy) logits H; noisy gating needs that
  // part alone for its noise branch.
  if (d_noisy != nullptr) *d_noisy = d_logits;
  // Loss gradients flow into the clean logits, which differ from the noisy ones by an additive
  // constant (or a term of its own for noisy gating), so they add into the same d_logits.
  if (n_real > 0 && !s.scores_given && g.d_z_loss != 0) {
    // z = mean_t lse_t²: dz/dl_te = 2·lse_t·softmax(l_t)_e / T.
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (!s.token_mask[t]) continue;
      const double lse = logsumexp_row(s.clean_logits.row(t), cols);
      const double factor =
          g.d_z_loss * 2.0 * lse / double(c.padding_in_loss_means ? num_tokens : n_real);
      for (int64_t e = 0; e < cols; ++e)
        d_logits(t, e) += Real(factor * std::exp(double(s.clean_logits(t, e)) - lse));
    }
  }
  if (n_real > 0 && g.d_aux_loss != 0 && c.routing_method != RoutingMethod::kSoftMoe) {
    // Gradient with respect to the balance probabilities P_te, then through their map.
    Matrix<double> d_p(num_tokens, num_experts);
    if (c.aux_loss_type == AuxLossType::kLoadBalancing && is_token_choice(c)) {
      const double k_div = c.aux_loss_scale == AuxLossScale::kOne &&
                                   c.aux_loss_counts == AuxLossCounts::kAllChoices
                               ? double(c.num_experts_per_tok)
                               : 1.0;
      const bool per_seq = c.aux_loss_scope == AuxLossScope::kSequence;
      const int64_t group_len = per_seq ? s.sequence_length : num_tokens;
      for (int64_t t = 0; t < num_tokens; ++t) {
        if (!s.token_mask[t]) continue;
        const int64_t gi = t / group_len;
        // aux_token_counts holds tokens · used_groups (see compute_losses).
        const double denom = s.aux_token_counts[gi];
        for (int64_t e = 0; e < num_experts; ++e)
          d_p(t, e) = g.d_aux_loss * double(num_experts) * s.aux_counts[gi * num_experts + e] /
                      (k_div * denom);
      }
    } else if (c.aux_loss_type == AuxLossType::kImportanceLoad) {
      std::vector<double> importance(static_cast<size_t>(num_experts), 0.0), probs;
      for (int64_t t = 0; t < num_tokens; ++t) {
        if (!s.token_mask[t]) continue;
        balance_probs(c, s, t, probs);
        for (int64_t e = 0; e < num_experts; ++e) importance[e] += probs[e];
      }
      const std::vector<double> gi = cv_squared_grad(importance);
      for (int64_t t = 0; t < num_tokens; ++t)
        if (s.token_mask[t])
          for (int64_t e = 0; e < num_experts; ++e)
            d_p(t, e) = g.d_aux_loss * c.importance_loss_weight * gi[e];
      // Load CV²: d/d clean logits and d/d threshold (a noisy logit).
      if (smooth_load_active(c, s.scores_given) && c.load_loss_weight != 0) {
        const double sigma = c.noise_std / double(num_experts);
        std::vector<int32_t> threshold_expert;
        const std::vector<double> load = smooth_load(c, s, threshold_expert);
        const std::vector<double> gl = cv_squared_grad(load);
        for (int64_t t = 0; t < num_tokens; ++t) {
          if (!s.token_mask[t]) continue;
          const double threshold = double(s.logits(t, threshold_expert[t]));
          double d_threshold = 0;
          for (int64_t e = 0; e < num_experts; ++e) {
            const double dens = normal_pdf((threshold - double(s.clean_logits(t, e))) / sigma) / sigma;
            const double up = g.d_aux_loss * c.load_loss_weight * gl[e];
            d_logits(t, e) += Real(up * dens);
            d_threshold -= up * dens;
          }
          d_logits(t, threshold_expert[t]) += Real(d_threshold);
          // The threshold is a noisy logit.
          if (d_noisy != nullptr) (*d_noisy)(t, threshold_expert[t]) += Real(d_threshold);
        }
      }
    }
    // Through the map logits → P.
    std::vector<double> probs;
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (!s.token_mask[t]) continue;
      if (s.scores_given) {
        for (int64_t e = 0; e < num_experts; ++e) d_logits(t, e) += Real(d_p(t, e));
        continue;
      }
      balance_probs(c, s, t, probs);
      if (uses_sigmoid(c)) {
        // P = σ / (Σσ + ε): dP_i/dσ_j = (δ_ij − P_i)/(Σσ + ε); dσ/dl = σ(1 − σ).
        double sum = 0;
        std::vector<double> sig(static_cast<size_t>(num_experts));
        for (int64_t e = 0; e < num_experts; ++e) sum += sig[e] = 1.0 / (1.0 + std::exp(-double(s.clean_logits(t, e))));
        const double denom = sum + kSigmoidNormEps;
        double dot = 0;
        for (int64_t e = 0; e < num_experts; ++e) dot += d_p(t, e) * probs[e];
        for (int64_t e = 0; e < num_experts; ++e)
          d_logits(t, e) += Real((d_p(t, e) - dot) / denom * sig[e] * (1.0 - sig[e]));
      } else {
        double dot = 0;
        for (int64_t e = 0; e < num_experts; ++e) dot += d_p(t, e) * probs[e];
        for (int64_t e = 0; e < num_experts; ++e) d_logits(t, e) += Real(probs[e] * (d_p(t, e) - dot));
      }
    }
  }
  return d_logits;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points.

template <typename Real>
Matrix<Real> router_logits(const RoutingConfig& config, ConstMatrixView<Real> hidden_states,
                           const RouterParams<Real>& params, int num_threads) {
  const int64_t d_model = hidden_states.cols;
  check_matrix(params.weight, "router_weight", d_model, "d_model of hidden_states");
  if (params.weight.rows != config.num_experts && config.routing_method != RoutingMethod::kSoftMoe) {
    throw_input_error("router_weight rows", detail::concat(config.num_experts, " (num_experts)"),
                      params.weight.rows);
  }
  if (config.routing_method == RoutingMethod::kSoftMoe &&
      params.weight.rows != config.num_experts * config.slots_per_expert) {
    throw_input_error("router_weight rows",
                      detail::concat(config.num_experts * config.slots_per_expert,
                                     " (num_experts · slots_per_expert)"),
                      params.weight.rows);
  }
  if (!params.bias.empty() && static_cast<int64_t>(params.bias.size()) != params.weight.rows) {
    throw_input_error("router_bias length", params.weight.rows, params.bias.size());
  }
  for (size_t i = 0; i < params.bias.size(); ++i)
    if (!std::isfinite(double(params.bias[i])))
      throw_input_error("router_bias", "finite values", detail::concat(params.bias[i], " at [", i, "]"));
  const int64_t n_out = params.weight.rows;
  Matrix<Real> logits(hidden_states.rows, n_out);
  detail::parallel_for(hidden_states.rows, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Real* x = hidden_states.row(t);
      for (int64_t e = 0; e < n_out; ++e) {
        const Real* w = params.weight.row(e);
        Real acc = 0;
        for (int64_t d = 0; d < d_model; ++d) acc += x[d] * w[d];
        logits(t, e) = acc + (params.bias.empty() ? Real(0) : params.bias[e]);
      }
    }
  });
  return logits;
}

template <typename Real>
RoutingResult<Real> route_logits(const RoutingConfig& config, ConstMatrixView<Real> logits,
                                 const RoutingOptions& options) {
  config.validate();
  const int64_t cols = config.routing_method == RoutingMethod::kSoftMoe
                           ? config.num_experts * config.slots_per_expert
                           : config.num_experts;
  check_matrix(logits, "logits", cols,
               config.routing_method == RoutingMethod::kSoftMoe ? "num_experts · slots_per_expert"
                                                                : "num_experts");
  check_options(config, options, logits.rows);
  Router<Real> router(config, options, logits.rows);
  return router.run(logits, false, nullptr);
}

template <typename Real>
RoutingResult<Real> route_probs(const RoutingConfig& config, ConstMatrixView<Real> probs,
                                const RoutingOptions& options) {
  config.validate();
  if (config.routing_method == RoutingMethod::kSoftMoe) {
    throw_input_error("probs", "logits for soft_moe routing", "probs");
  }
  check_matrix(probs, "probs", config.num_experts, "num_experts");
  for (int64_t i = 0; i < probs.size(); ++i)
    if (probs.data[i] < 0)
      throw_input_error("probs", "non-negative values",
                        detail::concat(probs.data[i], " at [", i / probs.cols, "][", i % probs.cols, "]"));
  check_options(config, options, probs.rows);
  Router<Real> router(config, options, probs.rows);
  return router.run(probs, true, nullptr);
}

template <typename Real>
RoutingResult<Real> route_hidden(const RoutingConfig& config, ConstMatrixView<Real> hidden_states,
                                 const RouterParams<Real>& params, const RoutingOptions& options) {
  config.validate();
  if (hidden_states.data == nullptr || hidden_states.rows <= 0 || hidden_states.cols <= 0) {
    throw_input_error("hidden_states", "a non-empty [num_tokens, d_model] matrix",
                      detail::concat("[", hidden_states.rows, ", ", hidden_states.cols, "]"));
  }
  check_finite(hidden_states, "hidden_states");
  // Input jitter (Switch, Mixtral): x ×= U(1 − ε, 1 + ε), elementwise, before the router.
  Matrix<Real> jitter;
  Matrix<Real> jittered;
  ConstMatrixView<Real> x = hidden_states;
  if (config.router_jitter_noise > 0 && noise_active(config)) {
    jitter = Matrix<Real>(hidden_states.rows, hidden_states.cols);
    jittered = Matrix<Real>(hidden_states.rows, hidden_states.cols);
    const double eps = config.router_jitter_noise;
    for (int64_t t = 0; t < hidden_states.rows; ++t) {
      for (int64_t d = 0; d < hidden_states.cols; ++d) {
        const double u = detail::random_uniform(config.seed, RandomStream::kJitter, uint64_t(t), uint64_t(d));
        jitter(t, d) = Real(1.0 - eps + 2.0 * eps * u);
        jittered(t, d) = hidden_states(t, d) * jitter(t, d);
      }
    }
    x = jittered.cview();
  }
  Matrix<Real> logits = router_logits(config, x, params, options.num_threads);
  Matrix<Real> noise_logits;
  if (config.noisy_gating) {
    if (params.noise_weight.data == nullptr) {
      throw_input_error("noise_weight", "a [num_experts, d_model] matrix for noisy_gating", "none");
    }
    check_matrix(params.noise_weight, "noise_weight", hidden_states.cols, "d_model");
    if (params.noise_weight.rows != config.num_experts)
      throw_input_error("noise_weight rows", config.num_experts, params.noise_weight.rows);
    RouterParams<Real> noise_params{params.noise_weight, {}, {}};
    noise_logits = router_logits(config, x, noise_params, options.num_threads);
  }
  check_options(config, options, logits.rows);
  Router<Real> router(config, options, logits.rows);
  RoutingResult<Real> result =
      router.run(logits.cview(), false, config.noisy_gating ? &noise_logits : nullptr);
  result.saved.jitter = std::move(jitter);
  return result;
}

template <typename Real>
Matrix<Real> route_backward(const RoutingConfig& config, const RoutingResult<Real>& result,
                            const RoutingGradOutput<Real>& grad, Matrix<Real>* d_noisy_logits) {
  Matrix<Real> d = backward_impl(config, result, grad, d_noisy_logits);
  // Temperature: l = raw / τ.
  if (!result.saved.scores_given && config.temperature != 1.0) {
    for (auto& v : d.values) v = Real(double(v) / config.temperature);
  }
  return d;
}

template <typename Real>
RouterGrads<Real> router_backward(const RoutingConfig& config, const RoutingResult<Real>& result,
                                  ConstMatrixView<Real> hidden_states,
                                  const RouterParams<Real>& params, ConstMatrixView<Real> d_logits,
                                  int num_threads, ConstMatrixView<Real> d_noisy_logits) {
  const int64_t num_tokens = hidden_states.rows, d_model = hidden_states.cols;
  const int64_t n_out = params.weight.rows;
  if (d_logits.rows != num_tokens || d_logits.cols != n_out) {
    throw_input_error("d_logits shape", detail::concat("[", num_tokens, ", ", n_out, "]"),
                      detail::concat("[", d_logits.rows, ", ", d_logits.cols, "]"));
  }
  const Matrix<Real>& jitter = result.saved.jitter;
  const bool jittered = jitter.rows == num_tokens;
  auto x_at = [&](int64_t t, int64_t d) {
    return jittered ? hidden_states(t, d) * jitter(t, d) : hidden_states(t, d);
  };
  RouterGrads<Real> g;
  g.d_hidden_states = Matrix<Real>(num_tokens, d_model);
  g.d_weight = Matrix<Real>(n_out, d_model);
  if (!params.bias.empty()) g.d_bias.assign(static_cast<size_t>(n_out), Real(0));

  // Noisy gating: H = l + n·softplus(a), a = x·W_noiseᵀ; dH/dl = 1, dH/da = n·sigmoid(a).
  Matrix<Real> d_noise;
  const bool noisy = config.noisy_gating && result.saved.noise_logits.rows == num_tokens;
  if (noisy) {
    if (d_noisy_logits.rows != num_tokens || d_noisy_logits.cols != n_out) {
      throw_input_error("d_noisy_logits shape (noisy gating)",
                        detail::concat("[", num_tokens, ", ", n_out, "] from route_backward"),
                        detail::concat("[", d_noisy_logits.rows, ", ", d_noisy_logits.cols, "]"));
    }
    d_noise = Matrix<Real>(num_tokens, n_out);
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t e = 0; e < n_out; ++e)
        d_noise(t, e) = d_noisy_logits(t, e) * result.saved.noise_draws(t, e) *
                        sigmoid(result.saved.noise_logits(t, e));
    g.d_noise_weight = Matrix<Real>(n_out, d_model);
  }
  // dx = d_logits · W (+ d_noise · W_noise), then × jitter.
  detail::parallel_for(num_tokens, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Real* dx = g.d_hidden_states.row(t);
      for (int64_t e = 0; e < n_out; ++e) {
        const Real dl = d_logits(t, e);
        const Real* w = params.weight.row(e);
        for (int64_t d = 0; d < d_model; ++d) dx[d] += dl * w[d];
        if (noisy) {
          const Real dn = d_noise(t, e);
          const Real* wn = params.noise_weight.row(e);
          for (int64_t d = 0; d < d_model; ++d) dx[d] += dn * wn[d];
        }
      }
      if (jittered)
        for (int64_t d = 0; d < d_model; ++d) dx[d] *= jitter(t, d);
    }
  });
  // dW = d_logitsᵀ · x, summed over tokens in token order (fixed order: deterministic).
  detail::parallel_for(n_out, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      Real* dw = g.d_weight.row(e);
      Real* dwn = noisy ? g.d_noise_weight.row(e) : nullptr;
      for (int64_t t = 0; t < num_tokens; ++t) {
        const Real dl = d_logits(t, e);
        for (int64_t d = 0; d < d_model; ++d) dw[d] += dl * x_at(t, d);
        if (noisy)
          for (int64_t d = 0; d < d_model; ++d) dwn[d] += d_noise(t, e) * x_at(t, d);
        if (!g.d_bias.empty()) g.d_bias[e] += dl;
      }
    }
  });
  return g;
}

template <typename Real>
RoutingRecord record_routing(const BasicRoutingPlan<Real>& plan) {
  RoutingRecord record;
  record.num_tokens = plan.num_tokens;
  record.num_experts = plan.num_experts;
  record.token_offsets = plan.token_offsets;
  record.token_experts = plan.token_experts;
  return record;
}

void update_expert_bias(std::span<double> bias, std::span<const int64_t> tokens_per_expert,
                        double rate) {
  if (bias.size() != tokens_per_expert.size()) {
    throw_input_error("bias length", tokens_per_expert.size(), bias.size());
  }
  if (!(rate >= 0) || !std::isfinite(rate)) throw_input_error("rate", "a finite value >= 0", rate);
  if (bias.empty()) return;
  double mean = 0;
  for (int64_t n : tokens_per_expert) mean += double(n);
  mean /= double(tokens_per_expert.size());
  for (size_t e = 0; e < bias.size(); ++e) {
    const double diff = mean - double(tokens_per_expert[e]);
    bias[e] += rate * double((diff > 0) - (diff < 0));
  }
}

#define MOEKIT_INSTANTIATE(Real)                                                              \
  template Matrix<Real> router_logits<Real>(const RoutingConfig&, ConstMatrixView<Real>,      \
                                            const RouterParams<Real>&, int);                  \
  template RoutingResult<Real> route_logits<Real>(const RoutingConfig&, ConstMatrixView<Real>, \
                                                  const RoutingOptions&);                     \
  template RoutingResult<Real> route_probs<Real>(const RoutingConfig&, ConstMatrixView<Real>,  \
                                                 const RoutingOptions&);                      \
  template RoutingResult<Real> route_hidden<Real>(const RoutingConfig&, ConstMatrixView<Real>, \
                                                  const RouterParams<Real>&,                  \
                                                  const RoutingOptions&);                     \
  template Matrix<Real> route_backward<Real>(const RoutingConfig&, const RoutingResult<Real>&, \
                                             const RoutingGradOutput<Real>&, Matrix<Real>*);  \
  template RouterGrads<Real> router_backward<Real>(                                           \
      const RoutingConfig&, const RoutingResult<Real>&, ConstMatrixView<Real>,                \
      const RouterParams<Real>&, ConstMatrixView<Real>, int, ConstMatrixView<Real>);          \
  template RoutingRecord record_routing<Real>(const BasicRoutingPlan<Real>&);

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace moekit
