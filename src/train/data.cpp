// Synthetic domains: overlapping Gaussian clusters with one target map per domain (train.h).
#include <cmath>

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
    Matrix<float> a(d_model, d_model);
    for (int64_t i = 0; i < d_model; ++i) {
      for (int64_t j = 0; j < d_model; ++j) {
        a(i, j) = float(map_std * detail::random_normal(seed, stream_id(kMapStream + uint64_t(k) * 0x10000),
                                                         i, j));
      }
    }
    maps_.push_back(std::move(a));
  }
}

void SyntheticDomains::draw(int stream, int64_t first, int64_t count,
                            Matrix<float>* tokens,  // [count, d_model]
                            Matrix<float>* targets,  // [count, d_model]
                            std::vector<int32_t>* labels) const {  // [count]
  const int64_t d = d_model_;
  *tokens = Matrix<float>(count, d);
  *targets = Matrix<float>(count, d);
  labels->assign(size_t(count), 0);
  const detail::RandomStream s = stream_id(kTokenStreamBase + uint64_t(stream));
  for (int64_t t = 0; t < count; ++t) {
    const uint64_t index = uint64_t(first + t);
    // Lane 0 of coordinate 0 picks the domain (uniform); coordinates 1..d give the noise.
    const int32_t k = int32_t(detail::random_bits(seed_, s, index, 0) % uint64_t(config_.num_domains));
    (*labels)[size_t(t)] = k;
    float* x = tokens->row(t);
    for (int64_t j = 0; j < d; ++j) {
      x[j] = centres_(k, j) + float(config_.noise_std * detail::random_normal(seed_, s, index, uint64_t(j + 1)));
    }
    // y = tanh(A_k·x), accumulated in double in a fixed order.
    const Matrix<float>& a = maps_[config_.shared_target ? 0 : size_t(k)];
    float* y = targets->row(t);
    for (int64_t i = 0; i < d; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < d; ++j) acc += double(a(i, j)) * double(x[j]);
      y[i] = float(std::tanh(acc));
    }
  }
}

}  // namespace moekit
