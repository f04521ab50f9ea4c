// Counter-based random numbers: every draw is a pure function of (seed, stream, i, j), so noise
// is reproducible from the seed whatever the thread count or the order of evaluation.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

namespace moekit::detail {

enum class RandomStream : uint64_t {
  kJitter = 1,
  kLogitNoise = 2,
  kNoisyGating = 3,
  kGumbel = 4,
  kRandomRouting = 5,
  kRandomDrop = 6,
};

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline uint64_t random_bits(uint64_t seed, RandomStream stream, uint64_t i, uint64_t j,
                            uint64_t lane = 0) {
  uint64_t h = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(stream)));
  h = splitmix64(h ^ i);
  h = splitmix64(h ^ j);
  return splitmix64(h ^ lane);
}

// Uniform in the open interval (0, 1): 53 random bits, offset by half a step.
inline double random_uniform(uint64_t seed, RandomStream stream, uint64_t i, uint64_t j,
                             uint64_t lane = 0) {
  return (static_cast<double>(random_bits(seed, stream, i, j, lane) >> 11) + 0.5) * 0x1.0p-53;
}

// Standard normal by Box-Muller from two uniforms.
inline double random_normal(uint64_t seed, RandomStream stream, uint64_t i, uint64_t j) {
  const double u1 = random_uniform(seed, stream, i, j, 0);
  const double u2 = random_uniform(seed, stream, i, j, 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

// Standard Gumbel: -log(-log(U)).
inline double random_gumbel(uint64_t seed, RandomStream stream, uint64_t i, uint64_t j) {
  return -std::log(-std::log(random_uniform(seed, stream, i, j)));
}

}  // namespace moekit::detail
