// Synthetic domains: overlapping Gaussian clusters with one target map per domain (train.h).
#include <cmath>
#include <numbers>

#include "internal/parallel.h"
#include "internal/random.h"
#include "moekit/error.h"
#include "moekit/train.h"

namespace moekit {
namespace {

// Streams of the data generator, apart from the layer's and the routing's.
constexpr uint64_t kCentreStream = 0x7472'0001;
constexpr uint64_t kMapStream = 0x7472'0002;
constexpr uint64_t kTokenStreamBase = 0x7472'0100;  // + stream: domain and noise of each token

detail::RandomStream stream_id(uint64_t s) { return static_cast<detail::RandomStream>(s); }

}  // namespace

SyntheticDomains::SyntheticDomains(const SyntheticDataConfig& config, int64_t d_model,
                                   uint64_t seed)
    : config_(config), d_model_(d_model), seed_(seed), centres_(config.num_domains, d_model) {
  if (config.num_domains < 1) throw_config_error("data.num_domains", ">= 1", config.num_domains);
  if (!(config.noise_std >= 0.0)) throw_config_error("data.noise_std", ">= 0", config.noise_std);
  if (!(config.centre_norm >= 0.0)) throw_config_error("data.centre_norm", ">= 0", config.centre_norm);
  // c_k ~ N(0, (r²/d)·I): ‖c_k‖ ≈ r, centres nearly orthogonal for d ≫ D.
  const double centre_std = config.centre_norm / std::sqrt(double(d_model));
  for (int64_t k = 0; k < config.num_domains; ++k) {
    for (int64_t j = 0; j < d_model; ++j) {
      centres_(k, j) = float(centre_std * detail::random_normal(seed, stream_id(kCentreStream), k, j));
    }
  }
  // A_k ~ N(0, 1/E‖x‖²) per entry with E‖x‖² = r² + d·σ², so that (A_k·x)_i has unit variance.
  const double map_std =
      1.0 / std::sqrt(config.centre_norm * config.centre_norm +
                      double(d_model) * config.noise_std * config.noise_std + 1e-12);
  maps_.reserve(size_t(config.num_domains));
  for (int64_t k = 0; k < config.num_domains; ++k) {
    Matrix<float> a_t(d_model, d_model);  // (A_k)ᵀ: row j is column j of A_k
    for (int64_t i = 0; i < d_model; ++i) {
      for (int64_t j = 0; j < d_model; ++j) {
        a_t(j, i) = float(map_std * detail::random_normal(seed, stream_id(kMapStream + uint64_t(k) * 0x10000),
                                                         i, j));
      }
    }
    maps_.push_back(std::move(a_t));
  }
}

namespace {

// Two independent standard normals from one pair of uniforms (Box-Muller, both branches):
// z0 = √(−2 ln u1)·cos(2π u2), z1 = √(−2 ln u1)·sin(2π u2). `token_hash` is the token's
// counter already hashed (splitmix64 of seed, stream and index), so each coordinate pair costs
// two more splitmix64 rounds per uniform; the uniforms are 24-bit, offset by half a step, in (0, 1).
void normal_pair(uint64_t token_hash, uint64_t pair, float* z0, float* z1) {
  const uint64_t h = detail::splitmix64(token_hash ^ pair);
  const float u1 = (float(detail::splitmix64(h) >> 40) + 0.5f) * 0x1.0p-24f;
  const float u2 = (float(detail::splitmix64(h ^ 1) >> 40) + 0.5f) * 0x1.0p-24f;
  const float r = std::sqrt(-2.0f * std::log(u1));
  const float angle = 2.0f * std::numbers::pi_v<float> * u2;
  *z0 = r * std::cos(angle);
  *z1 = r * std::sin(angle);
}

// tanh(a) = 1 − 2/(e^{2a} + 1): one expf instead of the library's tanhf (absolute error a few
// ulp of 1; e^{2a} overflowing to ∞ gives 1, underflowing to 0 gives −1).
float fast_tanh(float a) { return 1.0f - 2.0f / (std::exp(2.0f * a) + 1.0f); }

}  // namespace

void SyntheticDomains::draw(int stream, int64_t first, int64_t count,
                            Matrix<float>* tokens,  // [count, d_model]
                            Matrix<float>* targets,  // [count, d_model]
                            std::vector<int32_t>* labels,  // [count]
                            int num_threads) const {
  *tokens = Matrix<float>(count, d_model_);
  *targets = Matrix<float>(count, d_model_);
  labels->assign(size_t(count), 0);
  // Each token is a pure function of its index: any split over threads gives the same values.
  detail::parallel_for(count, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      (*labels)[size_t(t)] = draw_token(stream, uint64_t(first + t), tokens->row(t), targets->row(t));
    }
  });
}

int32_t SyntheticDomains::draw_token(int stream, uint64_t index, float* x,  // [d_model]
                                     float* y) const {                       // [d_model], zeros
  const int64_t d = d_model_;
  const detail::RandomStream s = stream_id(kTokenStreamBase + uint64_t(stream));
  // Counter 0 picks the domain (uniform); counters 1, 2, … give the noise two coordinates each.
  const int32_t k = int32_t(detail::random_bits(seed_, s, index, 0) % uint64_t(config_.num_domains));
  const uint64_t token_hash =
      detail::splitmix64(detail::splitmix64(seed_ ^ detail::splitmix64(uint64_t(s))) ^ index);
  const float sigma = float(config_.noise_std);
  for (int64_t j = 0; j < d; j += 2) {
    float z0, z1;
    normal_pair(token_hash, uint64_t(j / 2 + 1), &z0, &z1);
    x[j] = centres_(k, j) + sigma * z0;
    if (j + 1 < d) x[j + 1] = centres_(k, j + 1) + sigma * z1;
  }
  // y = tanh(A_k·x) as y = Σ_j x_j·(A_k)ᵀ_j: the sum runs over j ascending for every output
  // (a fixed order) and the inner loop over outputs vectorises.
  const Matrix<float>& a_t = maps_[config_.shared_target ? 0 : size_t(k)];
  for (int64_t j = 0; j < d; ++j) {
    const float xj = x[j];
    const float* a_col = a_t.row(j);
    for (int64_t i = 0; i < d; ++i) y[i] += xj * a_col[i];
  }
  for (int64_t i = 0; i < d; ++i) y[i] = fast_tanh(y[i]);
  return k;
}

}  // namespace moekit
