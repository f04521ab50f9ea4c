// Finite-difference checks of every routing backward, in double precision.
//
// The scalar checked is
//     L = Σ_i d_w[i]·token_weights[i] + a·aux_loss + z·z_loss
// (Soft MoE: Σ d_dispatch ⊙ dispatch + Σ d_combine ⊙ combine + z·z_loss) with random upstream
// d_w, d_dispatch, d_combine, a and z. Its analytic gradient comes from route_backward (and
// router_backward for the hidden-state path) and is compared with central differences.
//
// Selection (top-k, groups, capacity drops, Sinkhorn, expert choice) is piecewise constant, so
// L is smooth only away from selection ties. Every draw is therefore rejected and redrawn when
// two keys that decide a selection are closer than kTieGap, and every perturbed forward must
// reproduce the unperturbed plan's token_experts and token_kept exactly (otherwise the point was
// too close to a tie for the margin check to see, and the draw is redrawn as well).
//
// Tolerance. Central differences with h = 1e-6 have a truncation error of h²/6·|L'''| ~ 1e-12
// and a rounding error of about ε·|L|/h ~ 1e-16·10/1e-6 = 1e-9 for |L| ~ 10. A tolerance of
// 1e-6·(1 + |g|) is three orders of magnitude above both, while any real mistake in a backward
// (a missing term, a wrong factor, a sign) moves the gradient by far more than 1e-6.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/config.h"
#include "moekit/routing.h"

namespace moekit {
namespace {

constexpr double kStep = 1e-6;
constexpr double kTieGap = 1e-3;
constexpr int kMaxAttempts = 100;

bool close_enough(double analytic, double numeric) {
  return std::abs(analytic - numeric) <= 1e-6 * (1.0 + std::abs(analytic));
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  double normal(double stddev) { return std::normal_distribution<double>(0.0, stddev)(gen_); }
  double uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(gen_);
  }
  std::vector<double> normals(size_t n, double stddev) {
    std::vector<double> v(n);
    for (double& x : v) x = normal(stddev);
    return v;
  }
  std::vector<double> uniforms(size_t n, double lo, double hi) {
    std::vector<double> v(n);
    for (double& x : v) x = uniform(lo, hi);
    return v;
  }

 private:
  std::mt19937_64 gen_;
};

// ---------------------------------------------------------------------------------------------
// Selection identity and tie margins.

struct Selection {
  std::vector<int64_t> offsets;
  std::vector<int32_t> experts;
  std::vector<uint8_t> kept;
  bool operator==(const Selection&) const = default;
};

Selection selection_of(const BasicRoutingPlan<double>& p) {
  return {p.token_offsets, p.token_experts, p.token_kept};
}

// Smallest distance between two finite keys (ordering among all of them decides top-k, the
// choice order and hence position-based capacity drops and first-choice counts).
double min_gap(std::vector<double> keys) {
  keys.erase(std::remove_if(keys.begin(), keys.end(), [](double k) { return !std::isfinite(k); }),
             keys.end());
  std::sort(keys.begin(), keys.end());
  double gap = std::numeric_limits<double>::infinity();
  for (size_t i = 1; i < keys.size(); ++i) gap = std::min(gap, keys[i] - keys[i - 1]);
  return gap;
}

// The balanced matrix of Megatron's Sinkhorn, recomputed as src/routing/selection.cpp does, each row
// normalised to sum 1 (a per-token scale leaves that token's top-k unchanged and puts the keys
// on the same scale as probabilities, so the absolute kTieGap means the same thing).
std::vector<std::vector<double>> sinkhorn_keys(const RoutingConfig& c,
                                               const RoutingSaved<double>& s) {
  const int64_t num_experts = c.num_experts;
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < s.logits.rows; ++t)
    if (s.token_mask[t]) rows.push_back(t);
  const int64_t n = static_cast<int64_t>(rows.size());
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int64_t t : rows)
    for (int64_t e = 0; e < num_experts; ++e) max_logit = std::max(max_logit, s.logits(t, e));
  std::vector<double> cost(static_cast<size_t>(n * num_experts));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < num_experts; ++e)
      cost[i * num_experts + e] = std::exp(s.logits(rows[i], e) - max_logit);
  std::vector<double> d0(static_cast<size_t>(n), 1.0), d1(static_cast<size_t>(num_experts), 1.0);
  for (int64_t it = 0; it < c.sinkhorn_max_iterations && n > 0; ++it) {
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0;
      for (int64_t e = 0; e < num_experts; ++e) sum += d1[e] * cost[i * num_experts + e];
      d0[i] = (1.0 / double(n)) / (sum + 1e-8);
    }
    double error = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += d0[i] * cost[i * num_experts + e];
      const double next = (1.0 / double(num_experts)) / (sum + 1e-8);
      error += std::abs(next - d1[e]);
      d1[e] = next;
    }
    if (error / double(num_experts) <= c.sinkhorn_tolerance) break;
  }
  std::vector<std::vector<double>> keys;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> row(static_cast<size_t>(num_experts));
    double sum = 0;
    for (int64_t e = 0; e < num_experts; ++e) sum += row[e] = d1[e] * cost[i * num_experts + e] * d0[i];
    for (double& v : row) v /= sum;
    keys.push_back(std::move(row));
  }
  return keys;
}

// Smallest distance between two keys that decide the selection of this result.
double selection_margin(const RoutingConfig& c, const RoutingResult<double>& r) {
  const RoutingSaved<double>& s = r.saved;
  const int64_t num_tokens = r.plan.num_tokens, num_experts = c.num_experts;
  double margin = std::numeric_limits<double>::infinity();
  auto row_of = [&](const Matrix<double>& m, int64_t t) {
    return std::vector<double>(m.row(t), m.row(t) + num_experts);
  };
  switch (c.routing_method) {
    case RoutingMethod::kDense:
    case RoutingMethod::kSoftMoe:
      break;
    case RoutingMethod::kSinkhorn:
      for (const auto& row : sinkhorn_keys(c, s)) margin = std::min(margin, min_gap(row));
      break;
    case RoutingMethod::kExpertChoice: {
      // Per expert, its tokens of each sequence; per token, the choice order by score.
      for (int64_t first = 0; first < num_tokens; first += s.sequence_length) {
        for (int64_t e = 0; e < num_experts; ++e) {
          std::vector<double> column;
          for (int64_t t = first; t < first + s.sequence_length; ++t)
            if (s.token_mask[t]) column.push_back(s.scores(t, e));
          margin = std::min(margin, min_gap(column));
        }
      }
      for (int64_t t = 0; t < num_tokens; ++t)
        if (s.token_mask[t]) margin = std::min(margin, min_gap(row_of(s.scores, t)));
      break;
    }
    case RoutingMethod::kTopK: {
      const bool on_logits = !s.scores_given && c.scoring_func == ScoringFunc::kSoftmax &&
                             c.softmax_order == SoftmaxOrder::kAfterTopK;
      for (int64_t t = 0; t < num_tokens; ++t) {
        if (!s.token_mask[t]) continue;
        std::vector<double> keys = row_of(on_logits ? s.logits : s.scores, t);
        if (!c.e_score_correction_bias.empty())
          for (int64_t e = 0; e < num_experts; ++e) keys[e] += c.e_score_correction_bias[e];
        margin = std::min(margin, min_gap(keys));
        if (c.n_group > 0) {
          const int64_t group_size = num_experts / c.n_group;
          const int64_t per_group = c.group_score == GroupScore::kSumTop2 ? 2
                                    : c.group_score == GroupScore::kMax
                                        ? 1
                                        : c.num_experts_per_tok / c.topk_group;
          std::vector<double> group_keys;
          for (int64_t g = 0; g < c.n_group; ++g) {
            std::vector<double> members(keys.begin() + g * group_size,
                                        keys.begin() + (g + 1) * group_size);
            std::sort(members.rbegin(), members.rend());
            double sum = 0;
            for (int64_t i = 0; i < std::min(per_group, group_size); ++i) sum += members[i];
            group_keys.push_back(sum);
          }
          margin = std::min(margin, min_gap(group_keys));
        }
      }
      break;
    }
  }
  // Balance-loss counts recomputed as the top-k of the balance probabilities P (softmax of the
  // clean logits, or the normalised sigmoid; the given scores for route_probs).
  if (c.aux_loss_recompute_topk) {
    const bool sigmoid = c.scoring_func == ScoringFunc::kSigmoid ||
                         (c.routing_method == RoutingMethod::kSinkhorn && c.num_experts_per_tok == 1);
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (!s.token_mask[t]) continue;
      std::vector<double> p = row_of(s.scores_given ? s.scores : s.clean_logits, t);
      if (!s.scores_given) {
        const double top = *std::max_element(p.begin(), p.end());
        double sum = 0;
        for (double& v : p) sum += v = sigmoid ? 1.0 / (1.0 + std::exp(-v)) : std::exp(v - top);
        for (double& v : p) v /= sum;
      }
      margin = std::min(margin, min_gap(p));
    }
  }
  // The V-MoE load estimate thresholds at the k-th largest noisy logit.
  if (c.noise_std > 0 && c.training) {
    for (int64_t t = 0; t < num_tokens; ++t)
      if (s.token_mask[t]) margin = std::min(margin, min_gap(row_of(s.logits, t)));
  }
  return margin;
}

// ---------------------------------------------------------------------------------------------
// The scalar L and its upstream gradients.

struct Upstream {
  std::vector<double> d_token_weights;
  std::vector<double> d_dispatch;
  std::vector<double> d_combine;
  double d_aux_loss = 0.0;
  double d_z_loss = 0.0;

  RoutingGradOutput<double> as_grad() const {
    return {d_token_weights, d_dispatch, d_combine, d_aux_loss, d_z_loss};
  }
};

double objective(const RoutingResult<double>& r, const Upstream& u) {
  double value = u.d_aux_loss * r.losses.aux_loss + u.d_z_loss * r.losses.z_loss;
  for (size_t i = 0; i < u.d_token_weights.size(); ++i)
    value += u.d_token_weights[i] * r.plan.token_weights[i];
  for (size_t i = 0; i < u.d_dispatch.size(); ++i) value += u.d_dispatch[i] * r.plan.dispatch[i];
  for (size_t i = 0; i < u.d_combine.size(); ++i) value += u.d_combine[i] * r.plan.combine[i];
  return value;
}

struct LossWeights {
  bool token_weights = true;  // draw d_token_weights (or d_dispatch / d_combine for Soft MoE)
  double d_aux_loss = 0.0;
  double d_z_loss = 0.0;
};

Upstream random_upstream(Rng& rng, const RoutingResult<double>& r, const LossWeights& w) {
  Upstream u;
  u.d_aux_loss = w.d_aux_loss;
  u.d_z_loss = w.d_z_loss;
  if (!w.token_weights) return u;
  if (r.plan.num_slots > 0) {
    u.d_dispatch = rng.normals(r.plan.dispatch.size(), 1.0);
    u.d_combine = rng.normals(r.plan.combine.size(), 1.0);
  } else {
    u.d_token_weights = rng.normals(static_cast<size_t>(r.plan.num_selections()), 1.0);
  }
  return u;
}

// ---------------------------------------------------------------------------------------------
// The finite-difference check.

// One input under test: its values (perturbed in place, then restored) and dL/d values.
struct Probe {
  std::string name;
  std::vector<double>* values;
  std::vector<double> analytic;
};

// Compares every probe's analytic gradient with central differences of L. Returns false (and
// checks nothing further) when a perturbed forward selects differently from the unperturbed
// one: the draw was too close to a tie and the caller redraws.
bool check_probes(const std::vector<Probe>& probes,
                  const std::function<RoutingResult<double>()>& forward, const Upstream& up,
                  const Selection& base) {
  double largest = 0;
  for (const Probe& probe : probes) {
    EXPECT_EQ(probe.values->size(), probe.analytic.size()) << probe.name;
    if (probe.values->size() != probe.analytic.size()) return true;
    for (size_t j = 0; j < probe.values->size(); ++j) {
      double& x = (*probe.values)[j];
      const double saved = x;
      x = saved + kStep;
      const RoutingResult<double> plus = forward();
      x = saved - kStep;
      const RoutingResult<double> minus = forward();
      x = saved;
      if (!(selection_of(plus.plan) == base) || !(selection_of(minus.plan) == base)) return false;
      const double numeric = (objective(plus, up) - objective(minus, up)) / (2 * kStep);
      const double analytic = probe.analytic[j];
      largest = std::max(largest, std::abs(analytic));
      EXPECT_TRUE(close_enough(analytic, numeric))
          << probe.name << "[" << j << "]: analytic " << analytic << ", numeric " << numeric
          << ", difference " << analytic - numeric;
    }
  }
  // A gradient that is zero everywhere would pass trivially; every case here has a real one.
  EXPECT_GT(largest, 1e-3) << "the gradient is (nearly) zero: the check tests nothing";
  return true;
}

// Draws until a draw is clear of ties and has been checked.
void run_until_checked(uint64_t seed, const std::function<bool(Rng&)>& attempt) {
  Rng rng(seed);
  for (int i = 0; i < kMaxAttempts; ++i)
    if (attempt(rng)) return;
  FAIL() << "no draw clear of selection ties in " << kMaxAttempts << " attempts";
}

// The routing problem of a route_logits / route_probs check.
struct LogitCase {
  RoutingConfig config;
  int64_t num_tokens = 8;
  std::vector<uint8_t> token_mask;  // empty: all real
  int64_t sequence_length = 0;
  LossWeights losses;
  double logit_scale = 1.5;
  bool probs_input = false;  // route_probs with positive scores instead of route_logits
  // Extra condition on the unperturbed result (for example: some assignments dropped).
  std::function<bool(const RoutingResult<double>&)> require;
};

int64_t input_columns(const RoutingConfig& c) {
  return c.routing_method == RoutingMethod::kSoftMoe ? c.num_experts * c.slots_per_expert
                                                     : c.num_experts;
}

bool attempt_logits(const LogitCase& c, Rng& rng) {
  const int64_t cols = input_columns(c.config);
  const size_t n = static_cast<size_t>(c.num_tokens * cols);
  std::vector<double> input =
      c.probs_input ? rng.uniforms(n, 0.05, 1.0) : rng.normals(n, c.logit_scale);
  RoutingOptions options;
  options.token_mask = c.token_mask;
  options.sequence_length = c.sequence_length;
  const std::function<RoutingResult<double>()> forward = [&] {
    const ConstMatrixView<double> view{input.data(), c.num_tokens, cols};
    return c.probs_input ? route_probs(c.config, view, options)
                         : route_logits(c.config, view, options);
  };
  const RoutingResult<double> base = forward();
  if (selection_margin(c.config, base) < kTieGap) return false;
  if (c.require && !c.require(base)) return false;
  const Upstream up = random_upstream(rng, base, c.losses);
  const Matrix<double> d_input = route_backward(c.config, base, up.as_grad());
  EXPECT_EQ(d_input.rows, c.num_tokens);
  EXPECT_EQ(d_input.cols, cols);
  const std::vector<Probe> probes{{c.probs_input ? "probs" : "logits", &input, d_input.values}};
  return check_probes(probes, forward, up, selection_of(base.plan));
}

void check_logit_case(const LogitCase& c, uint64_t seed) {
  run_until_checked(seed, [&](Rng& rng) { return attempt_logits(c, rng); });
}

bool has_drops(const RoutingResult<double>& r) {
  return !r.plan.dropped.empty() && r.plan.num_kept() > r.plan.num_tokens;
}

RoutingConfig topk_config(int64_t num_experts, int64_t k) {
  RoutingConfig c;
  c.num_experts = num_experts;
  c.num_experts_per_tok = k;
  c.routing_method = RoutingMethod::kTopK;
  c.aux_loss_type = AuxLossType::kLoadBalancing;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Softmax top-k.

TEST(GradientSoftmaxTopK, RenormalizeModesWithCapacityDrops) {
  for (Renormalize renorm :
       {Renormalize::kNone, Renormalize::kBeforeDrop, Renormalize::kAfterDrop}) {
    SCOPED_TRACE("renormalize " + std::to_string(int(renorm)));
    LogitCase c;
    c.config = topk_config(6, 2);
    c.config.renormalize = renorm;
    c.config.capacity_factor = 0.5;  // C = ceil(10·2/6·0.5) = 2 of ~3.3 mean load: drops
    c.num_tokens = 10;
    c.losses = {true, 0.4, 0.3};
    c.require = has_drops;
    check_logit_case(c, 101 + int(renorm));
  }
}

TEST(GradientSoftmaxTopK, SoftmaxAfterTopK) {
  for (Renormalize renorm : {Renormalize::kBeforeDrop, Renormalize::kAfterDrop}) {
    SCOPED_TRACE("renormalize " + std::to_string(int(renorm)));
    LogitCase c;
    c.config = topk_config(5, 2);
    c.config.softmax_order = SoftmaxOrder::kAfterTopK;
    c.config.renormalize = renorm;
    c.config.capacity_factor = 0.75;
    c.num_tokens = 9;
    c.losses = {true, 0.5, 0.2};
    c.require = has_drops;
    check_logit_case(c, 111 + int(renorm));
  }
}

TEST(GradientSoftmaxTopK, RoutedScalingFactor) {
  LogitCase c;
  c.config = topk_config(6, 3);
  c.config.routed_scaling_factor = 1.7;
  c.num_tokens = 7;
  c.losses = {true, 0.3, 0.6};
  check_logit_case(c, 121);
}

TEST(GradientSoftmaxTopK, Temperature) {
  LogitCase c;
  c.config = topk_config(6, 2);
  c.config.temperature = 0.7;
  c.config.renormalize = Renormalize::kAfterDrop;
  c.config.capacity_factor = 0.6;
  c.num_tokens = 8;
  c.losses = {true, 0.4, 0.5};
  c.require = has_drops;
  check_logit_case(c, 131);
}

// ---------------------------------------------------------------------------------------------
// Sigmoid scores with DeepSeek-V3 selection.

TEST(GradientSigmoidTopK, CorrectionBiasGroupsAndScaling) {
  LogitCase c;
  c.config = topk_config(8, 3);
  c.config.scoring_func = ScoringFunc::kSigmoid;
  c.config.e_score_correction_bias = {0.05, -0.1, 0.02, 0.08, -0.03, 0.0, 0.11, -0.06};
  c.config.n_group = 4;
  c.config.topk_group = 2;
  c.config.renormalize = Renormalize::kBeforeDrop;
  c.config.routed_scaling_factor = 2.5;
  c.num_tokens = 8;
  c.losses = {true, 0.7, 0.2};
  check_logit_case(c, 201);
}

// ---------------------------------------------------------------------------------------------
// Other methods.

TEST(GradientDense, SoftmaxMixture) {
  LogitCase c;
  c.config = topk_config(5, 2);
  c.config.routing_method = RoutingMethod::kDense;
  c.config.aux_loss_type = AuxLossType::kImportanceLoad;  // the only aux loss dense routing has
  c.config.routed_scaling_factor = 1.3;
  c.num_tokens = 7;
  c.losses = {true, 0.6, 0.4};
  check_logit_case(c, 301);
}

TEST(GradientExpertChoice, PerSequenceCapacityWithPadding) {
  LogitCase c;
  c.config = topk_config(4, 1);
  c.config.routing_method = RoutingMethod::kExpertChoice;
  c.config.aux_loss_type = AuxLossType::kImportanceLoad;
  c.config.capacity_factor = 2.0;  // C = 2 of the 3 or 4 real tokens of each sequence
  c.num_tokens = 8;
  c.sequence_length = 4;
  c.token_mask = {1, 1, 1, 1, 1, 0, 1, 1};
  c.losses = {true, 0.5, 0.3};
  check_logit_case(c, 401);
}

TEST(GradientSinkhorn, TopOneAndTopTwo) {
  for (int64_t k : {1, 2}) {
    SCOPED_TRACE("k = " + std::to_string(k));
    LogitCase c;
    c.config = topk_config(6, k);
    c.config.routing_method = RoutingMethod::kSinkhorn;
    c.config.sinkhorn_tolerance = 1e-10;  // converged: the balanced keys are those of the limit
    // Megatron combines with the raw score of the chosen experts: sigmoid for k = 1, softmax
    // for k = 2, so the two values of k check both score functions.
    c.num_tokens = 10;
    c.losses = {true, 0.4, 0.3};
    check_logit_case(c, 501 + k);
  }
}

TEST(GradientSoftMoe, SlotsSequencesAndPadding) {
  LogitCase c;
  c.config = topk_config(3, 1);
  c.config.routing_method = RoutingMethod::kSoftMoe;
  c.config.slots_per_expert = 2;
  c.config.temperature = 1.2;
  c.num_tokens = 8;
  c.sequence_length = 4;
  c.token_mask = {1, 1, 1, 1, 1, 1, 0, 1};
  c.losses = {true, 0.0, 0.4};
  check_logit_case(c, 601);
}

// ---------------------------------------------------------------------------------------------
// Losses.

TEST(GradientLoadBalancing, ScalesCountsScopesAndScores) {
  for (ScoringFunc scoring : {ScoringFunc::kSoftmax, ScoringFunc::kSigmoid}) {
    for (AuxLossScale scale : {AuxLossScale::kK, AuxLossScale::kOne}) {
      for (AuxLossCounts counts : {AuxLossCounts::kAllChoices, AuxLossCounts::kFirstChoice}) {
        for (AuxLossScope scope : {AuxLossScope::kBatch, AuxLossScope::kSequence}) {
          SCOPED_TRACE("scoring " + std::to_string(int(scoring)) + ", scale " +
                       std::to_string(int(scale)) + ", counts " + std::to_string(int(counts)) +
                       ", scope " + std::to_string(int(scope)));
          LogitCase c;
          c.config = topk_config(6, 2);
          c.config.scoring_func = scoring;
          c.config.aux_loss_scale = scale;
          c.config.aux_loss_counts = counts;
          c.config.aux_loss_scope = scope;
          c.num_tokens = 8;
          c.sequence_length = 4;
          c.token_mask = {1, 1, 0, 1, 1, 1, 1, 0};
          c.losses = {true, 0.9, 0.2};
          check_logit_case(c, 701 + 8 * int(scoring) + 4 * int(scale) + 2 * int(counts) +
                                  int(scope));
        }
      }
    }
  }
}

// flaxformer's ignore_padding_tokens = false: padding stays in the loss denominators.
TEST(GradientLoadBalancing, PaddingInLossMeans) {
  for (AuxLossScope scope : {AuxLossScope::kBatch, AuxLossScope::kSequence}) {
    SCOPED_TRACE("scope " + std::to_string(int(scope)));
    LogitCase c;
    c.config = topk_config(6, 2);
    c.config.padding_in_loss_means = true;
    c.config.aux_loss_scope = scope;
    c.num_tokens = 8;
    c.sequence_length = 4;
    c.token_mask = {1, 0, 1, 1, 1, 1, 0, 1};
    c.losses = {true, 0.9, 0.4};
    check_logit_case(c, 741 + int(scope));
  }
}

TEST(GradientLoadBalancing, RecomputedTopKCounts) {
  for (ScoringFunc scoring : {ScoringFunc::kSoftmax, ScoringFunc::kSigmoid}) {
    SCOPED_TRACE("scoring " + std::to_string(int(scoring)));
    LogitCase c;
    c.config = topk_config(8, 2);
    c.config.scoring_func = scoring;
    c.config.aux_loss_recompute_topk = true;
    // Groups and a bias make the routed choice differ from the recomputed top-k.
    c.config.n_group = 4;
    c.config.topk_group = 2;
    c.config.e_score_correction_bias = {0.2, -0.1, 0.0, 0.15, -0.2, 0.1, 0.05, -0.05};
    c.num_tokens = 8;
    c.token_mask = {1, 1, 1, 1, 0, 1, 1, 1};
    c.losses = {true, 0.9, 0.0};
    check_logit_case(c, 751 + int(scoring));
  }
}

TEST(GradientImportanceLoad, NoisyTrainingLoadTerm) {
  LogitCase c;
  c.config = topk_config(6, 2);
  c.config.aux_loss_type = AuxLossType::kImportanceLoad;
  c.config.training = true;
  c.config.noise_std = 3.0;  // σ = noise_std / E = 0.5: the load estimate has real slope
  c.config.seed = 17;
  c.config.load_loss_weight = 1.5;
  c.config.importance_loss_weight = 0.8;
  c.num_tokens = 10;
  c.losses = {true, 0.8, 0.2};
  c.require = [](const RoutingResult<double>& r) {
    return r.losses.load_cv2 > 0 && r.losses.importance_cv2 > 0;
  };
  check_logit_case(c, 801);
}

TEST(GradientZLoss, Alone) {
  LogitCase c;
  c.config = topk_config(6, 2);
  c.config.aux_loss_type = AuxLossType::kNone;
  c.num_tokens = 8;
  c.token_mask = {1, 1, 1, 0, 1, 1, 1, 1};
  c.losses = {false, 0.0, 0.5};  // no d_token_weights at all: the empty-gradient path
  check_logit_case(c, 901);
}

// ---------------------------------------------------------------------------------------------
// route_probs: the backward is dL/d probs.

TEST(GradientRouteProbs, ScoresGiven) {
  LogitCase c;
  c.config = topk_config(6, 2);
  c.config.renormalize = Renormalize::kAfterDrop;
  c.config.capacity_factor = 0.6;
  c.config.routed_scaling_factor = 1.4;
  c.num_tokens = 9;
  c.probs_input = true;
  c.losses = {true, 0.6, 0.0};
  c.require = has_drops;
  check_logit_case(c, 1001);
}

// ---------------------------------------------------------------------------------------------
// Hidden-state path: route_hidden + route_backward + router_backward.

struct HiddenCase {
  RoutingConfig config;
  int64_t num_tokens = 8;
  int64_t d_model = 4;
  bool bias = true;
  LossWeights losses;
};

bool attempt_hidden(const HiddenCase& c, Rng& rng) {
  const int64_t num_experts = c.config.num_experts, d_model = c.d_model;
  std::vector<double> hidden = rng.normals(size_t(c.num_tokens * d_model), 1.0);
  std::vector<double> weight = rng.normals(size_t(num_experts * d_model), 0.8);
  std::vector<double> bias = c.bias ? rng.normals(size_t(num_experts), 0.3) : std::vector<double>{};
  std::vector<double> noise_weight =
      c.config.noisy_gating ? rng.normals(size_t(num_experts * d_model), 0.5) : std::vector<double>{};
  // Views are rebuilt per call: the probes perturb the vectors in place.
  auto params = [&] {
    RouterParams<double> p;
    p.weight = {weight.data(), num_experts, d_model};
    p.bias = bias;
    if (!noise_weight.empty()) p.noise_weight = {noise_weight.data(), num_experts, d_model};
    return p;
  };
  auto hidden_view = [&] { return ConstMatrixView<double>{hidden.data(), c.num_tokens, d_model}; };
  const std::function<RoutingResult<double>()> forward = [&] {
    return route_hidden(c.config, hidden_view(), params());
  };
  const RoutingResult<double> base = forward();
  if (selection_margin(c.config, base) < kTieGap) return false;
  const Upstream up = random_upstream(rng, base, c.losses);
  Matrix<double> d_noisy;
  const Matrix<double> d_logits = route_backward(c.config, base, up.as_grad(), &d_noisy);
  const RouterGrads<double> g = router_backward(c.config, base, hidden_view(), params(),
                                                d_logits.cview(), 1, d_noisy.cview());
  std::vector<Probe> probes{{"hidden_states", &hidden, g.d_hidden_states.values},
                            {"weight", &weight, g.d_weight.values}};
  if (c.bias) probes.push_back({"bias", &bias, g.d_bias});
  if (c.config.noisy_gating) probes.push_back({"noise_weight", &noise_weight, g.d_noise_weight.values});
  return check_probes(probes, forward, up, selection_of(base.plan));
}

void check_hidden_case(const HiddenCase& c, uint64_t seed) {
  run_until_checked(seed, [&](Rng& rng) { return attempt_hidden(c, rng); });
}

TEST(GradientHiddenPath, BiasJitterTemperature) {
  HiddenCase c;
  c.config = topk_config(6, 2);
  c.config.training = true;
  c.config.router_jitter_noise = 0.1;  // seeded: the same factors on every forward
  c.config.seed = 5;
  c.config.temperature = 1.3;
  c.config.capacity_factor = 0.75;
  c.num_tokens = 10;
  c.d_model = 4;
  c.losses = {true, 0.5, 0.3};
  check_hidden_case(c, 1101);
}

HiddenCase noisy_gating_case(const LossWeights& losses) {
  HiddenCase c;
  c.config = topk_config(5, 2);
  c.config.training = true;
  c.config.noisy_gating = true;
  c.config.seed = 9;
  c.num_tokens = 8;
  c.d_model = 3;
  c.bias = true;
  c.losses = losses;
  return c;
}

// The noise path H = x·Wᵀ + b + n·softplus(x·W_noiseᵀ), through the combine weights.
TEST(GradientHiddenPath, NoisyGating) {
  check_hidden_case(noisy_gating_case({true, 0.0, 0.0}), 1201);
}

// The losses use the clean logits x·Wᵀ + b, so their gradient must not enter the noise branch:
// route_backward hands the part through H to router_backward separately.
TEST(GradientHiddenPath, NoisyGatingWithLosses) {
  check_hidden_case(noisy_gating_case({true, 0.5, 0.3}), 1202);
}

}  // namespace
}  // namespace moekit
