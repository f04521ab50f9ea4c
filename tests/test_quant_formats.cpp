// moekit's own quantized weight formats (quant.h: int8, int4, mxfp4; float_to_fp16; the gpt-oss
// repack) against scalar references written here from the definitions in quant.h's comments
// (not from src/quant/formats.cpp), against numpy's float16 conversion and against transformers'
// own gpt-oss MXFP4 dequantization (tools/fixtures/gen_quant_formats.py).
//
// Every check is exact. The references decide each rounding by comparisons that are exact in
// double: the operands are short (fp32: 24 significant bits, fp16: 11, levels: at most 8 bits,
// candidate denominators: 6 bits), so the products and differences compared are representable.
// Sums of squared errors are added exactly (ExactSquareSum), so a tie between two candidates is a
// real tie and "the first on ties" is tested as such.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "moekit/backend.h"
#include "moekit/error.h"
#include "moekit/quant.h"
#include "moekit/safetensors.h"

namespace moekit {
namespace {

constexpr int64_t kGroup = 32;  // quant.h: groups of 32 along cols (kQuantGroup, restated)
const float kInf = std::numeric_limits<float>::infinity();
const float kNan = std::numeric_limits<float>::quiet_NaN();

uint32_t bits_of(float x) { return std::bit_cast<uint32_t>(x); }

// ---------------------------------------------------------------------------------------------
// IEEE binary16, from its definition: sign, 5 exponent bits (bias 15), 10 fraction bits;
// exponent 0 is subnormal (f · 2^−24), 31 is Inf (f = 0) or NaN.

double ref_fp16_to_double(uint16_t h) {
  const int e = (h >> 10) & 0x1f, f = h & 0x3ff;
  double v;
  if (e == 31) {
    v = f != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (e == 0) {
    v = std::ldexp(double(f), -24);
  } else {
    v = std::ldexp(double(1024 + f), e - 25);
  }
  return (h & 0x8000) ? -v : v;
}

// The non-negative fp16 values in pattern order (increasing), 0x0000 … 0x7bff, and at 0x7c00 the
// value 2^16 that the next pattern would have were the exponent unbounded: IEEE rounds to that
// and then overflows to Inf, so 65520 (the midpoint 65504 ↔ 65536) goes to Inf by ties-to-even
// (0x7bff is odd).
const std::vector<double>& fp16_ladder() {
  static const std::vector<double> ladder = [] {
    std::vector<double> v(0x7c01);
    for (uint32_t h = 0; h < 0x7c00; ++h) v[h] = ref_fp16_to_double(static_cast<uint16_t>(h));
    v[0x7c00] = 65536.0;
    return v;
  }();
  return ladder;
}

// The fp16 magnitude bits nearest to a / den (a ≥ 0, den a small positive integer), ties to the
// even pattern, 0x7c00 (Inf) when that nearest is 2^16 or beyond. Decided without dividing:
// a is compared with ladder·den and with (2 · midpoint)·den, products of at most 12 + 7 bits.
uint16_t ref_fp16_magnitude_of_quotient(double a, double den) {
  const std::vector<double>& ladder = fp16_ladder();
  size_t lo = 0, hi = ladder.size() - 1;
  if (ladder[hi] * den <= a) return 0x7c00;
  while (hi - lo > 1) {  // invariant: ladder[lo]·den ≤ a < ladder[hi]·den
    const size_t mid = (lo + hi) / 2;
    (ladder[mid] * den <= a ? lo : hi) = mid;
  }
  const double twice_a = 2.0 * a, twice_mid = (ladder[lo] + ladder[hi]) * den;
  if (twice_a != twice_mid) return static_cast<uint16_t>(twice_a < twice_mid ? lo : hi);
  return static_cast<uint16_t>(lo % 2 == 0 ? lo : hi);
}

// float → fp16 by the definition: the nearest value, ties to even, overflow to ±Inf. NaN → some
// NaN (0x7e00); callers compare NaN-ness only.
uint16_t ref_float_to_fp16(float x) {
  if (std::isnan(x)) return 0x7e00;
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (std::isinf(x)) return sign | 0x7c00;
  return sign | ref_fp16_magnitude_of_quotient(std::fabs(double(x)), 1.0);
}

bool fp16_is_nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }

// ---------------------------------------------------------------------------------------------
// Exact arithmetic the references need.

// The integer k nearest to w / s (s ≠ 0), ties to even, decided by comparing |w − s·k| exactly:
// s·k is exact (s has ≤ 24 bits, |k| ≤ 2^8) and so is w − s·k for the two neighbours of w / s
// (both are within 2|s| of w, and w and s·k have at most 24 significant bits each); farther
// candidates are at least |s| away and compare correctly even rounded. The bracket around the
// double quotient covers the exact one.
int64_t ref_nearest_integer(double w, double s) {
  const auto t = static_cast<int64_t>(std::floor(w / s));
  int64_t best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (int64_t k = t - 1; k <= t + 2; ++k) {
    const double d = std::fabs(w - s * double(k));
    if (d < best_d || (d == best_d && k % 2 == 0)) {
      best = k;
      best_d = d;
    }
  }
  return best;
}

// Σ d² exactly, for any finite doubles d: a binary fixed-point number with its least bit at
// 2^−2176 (below the square of the smallest subnormal double, 2^−2148) and 40 words (up to 2^384,
// above any square here: |d| < 2^131).
class ExactSquareSum {
 public:
  void add_square(double d) {
    if (d == 0.0) return;
    int e = 0;
    const double f = std::frexp(std::fabs(d), &e);  // |d| = f · 2^e, f ∈ [0.5, 1)
    auto m = static_cast<uint64_t>(std::ldexp(f, 53));
    int p = e - 53;  // |d| = m · 2^p
    while ((m & 1u) == 0) {
      m >>= 1;
      ++p;
    }
    // m < 2^53 = a · 2^26 + b: m² = a² 2^52 + 2ab 2^26 + b², each term < 2^64.
    const uint64_t a = m >> 26, b = m & ((uint64_t{1} << 26) - 1);
    add(a * a, 2 * p + 52);
    add(2 * a * b, 2 * p + 26);
    add(b * b, 2 * p);
  }
  friend bool operator==(const ExactSquareSum& x, const ExactSquareSum& y) { return x.words_ == y.words_; }
  friend bool operator<(const ExactSquareSum& x, const ExactSquareSum& y) {
    for (size_t i = kWords; i-- > 0;)
      if (x.words_[i] != y.words_[i]) return x.words_[i] < y.words_[i];
    return false;
  }
  friend bool operator<=(const ExactSquareSum& x, const ExactSquareSum& y) { return !(y < x); }
  double approx() const {
    double v = 0.0;
    for (size_t i = 0; i < kWords; ++i) v += std::ldexp(double(words_[i]), kLsb + 64 * int(i));
    return v;
  }

 private:
  static constexpr size_t kWords = 40;
  static constexpr int kLsb = -2176;
  void add(uint64_t v, int exponent) {
    if (v == 0) return;
    const int bit = exponent - kLsb;
    EXPECT_GE(bit, 0);
    const auto w = static_cast<size_t>(bit / 64);
    const int s = bit % 64;
    add_at(w, v << s);
    if (s != 0) add_at(w + 1, v >> (64 - s));
  }
  void add_at(size_t w, uint64_t v) {
    while (v != 0) {
      EXPECT_LT(w, kWords);
      if (w >= kWords) return;
      const uint64_t old = words_[w];
      words_[w] += v;
      v = words_[w] < old ? 1 : 0;
      ++w;
    }
  }
  std::array<uint64_t, kWords> words_{};
};

// ---------------------------------------------------------------------------------------------
// The formats, restated from quant.h.

// 4-bit codes: per group of 32, 16 bytes; byte j holds element j (low nibble) and j + 16 (high).
void put_nibble(uint8_t* group_codes, int64_t i, uint8_t nibble) {
  uint8_t& b = group_codes[i % 16];
  b = static_cast<uint8_t>(i < 16 ? (b & 0xf0) | nibble : (b & 0x0f) | (nibble << 4));
}
uint8_t nibble_at(const uint8_t* group_codes, int64_t i) {
  const uint8_t b = group_codes[i % 16];
  return i < 16 ? (b & 0x0f) : (b >> 4);
}

struct Quantized {
  std::vector<uint8_t> codes, scales;
};

// int8: s = max|w| / 127 in fp32 (one rounding; computing the quotient in double and rounding it
// to float gives the same bits, double rounding being harmless for a quotient of floats since
// 53 ≥ 2·24 + 2), q = the integer nearest to w / s, ties to even, in [−127, 127]. With s = 0
// (max|w| / 127 underflows, or the row is zero) every w / s level is taken as 0.
Quantized ref_quantize_int8(const std::vector<float>& w) {
  float amax = 0.0f;
  for (float x : w) amax = std::max(amax, std::fabs(x));
  const auto s = static_cast<float>(double(amax) / 127.0);
  Quantized out;
  out.scales.resize(4);
  std::memcpy(out.scales.data(), &s, 4);
  for (float x : w) {
    const int64_t q = s > 0.0f ? std::clamp<int64_t>(ref_nearest_integer(x, s), -127, 127) : 0;
    out.codes.push_back(static_cast<uint8_t>(static_cast<int8_t>(q)));
  }
  return out;
}

// int4: one candidate of a group: r = −den / 8 (den = 64, 63, …, 48: r = −8, −7.875, …, −6),
// s = fp16(m / r) = fp16(−8m / den) rounded once from the exact quotient, levels the integers
// nearest to w / s (ties to even) clamped to [−8, 7] (rounding then clamping is the nearest level
// in range: the distance is convex in the level), all 0 when s = ±0.
struct Int4Candidate {
  uint16_t bits = 0;
  bool overflows = false;  // fp16(m / r) is Inf
  std::array<int, 32> q{};
  ExactSquareSum err;
};

Int4Candidate ref_int4_candidate(const float* w, float m, int den) {
  Int4Candidate c;
  const uint16_t magnitude = ref_fp16_magnitude_of_quotient(8.0 * std::fabs(double(m)), den);
  c.bits = static_cast<uint16_t>((m > 0.0f ? 0x8000 : 0) | magnitude);  // r < 0: s has the sign of −m
  c.overflows = magnitude == 0x7c00;
  if (c.overflows) return c;
  const double s = ref_fp16_to_double(c.bits);
  for (int j = 0; j < kGroup; ++j) {
    c.q[j] = s == 0.0 ? 0 : static_cast<int>(std::clamp<int64_t>(ref_nearest_integer(w[j], s), -8, 7));
    c.err.add_square(double(w[j]) - s * c.q[j]);
  }
  return c;
}

// m: the group's element of largest magnitude, signed. quant.h does not say which of two elements
// of equal magnitude and opposite sign is m; this takes the first (and the kTies rows pin it).
float int4_signed_max(const float* w) {
  float m = 0.0f;
  for (int j = 0; j < kGroup; ++j)
    if (std::fabs(w[j]) > std::fabs(m)) m = w[j];
  return m;
}

std::vector<Int4Candidate> ref_int4_candidates(const float* w) {
  const float m = int4_signed_max(w);
  std::vector<Int4Candidate> all;
  for (int i = 0; i <= 16; ++i) all.push_back(ref_int4_candidate(w, m, 64 - i));
  return all;
}

// The group's scale: the candidate of least squared error, the first (r closest to −8) on ties.
// A zero group (m = 0) has no candidate worth the name (every s·q is 0; literally s = 0 / r = −0):
// the reference writes scale +0 and levels 0 and pins that choice, which only fixes the sign of a
// zero scale. Returns nullopt where a candidate's scale overflows fp16 (the row generators keep
// clear of that; the rejection is tested separately).
std::optional<Quantized> ref_quantize_int4(const std::vector<float>& w) {
  const auto cols = static_cast<int64_t>(w.size());
  Quantized out;
  out.codes.assign(static_cast<size_t>(cols / 2), 0);
  out.scales.assign(static_cast<size_t>(cols / kGroup * 2), 0);
  for (int64_t g = 0; g < cols / kGroup; ++g) {
    const float* wg = w.data() + g * kGroup;
    uint16_t bits = 0;
    std::array<int, 32> q{};
    if (int4_signed_max(wg) != 0.0f) {
      const std::vector<Int4Candidate> all = ref_int4_candidates(wg);
      size_t best = 0;
      for (size_t i = 0; i < all.size(); ++i) {
        if (all[i].overflows) return std::nullopt;
        if (all[i].err < all[best].err) best = i;
      }
      bits = all[best].bits;
      q = all[best].q;
    }
    std::memcpy(out.scales.data() + 2 * g, &bits, 2);
    for (int j = 0; j < kGroup; ++j) put_nibble(out.codes.data() + g * 16, j, static_cast<uint8_t>(q[j] + 8));
  }
  return out;
}

// E2M1 magnitudes by code.
constexpr double kE2m1[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};

// The E2M1 magnitude code nearest to a ≥ 0 (6 above 6), ties to the even code: |a − v| exact
// (a is a scaled float, v a multiple of 0.5, both short) except for far candidates, which compare
// correctly rounded.
int ref_e2m1_code(double a) {
  int best = 0;
  for (int k = 1; k < 8; ++k) {
    const double d = std::fabs(a - kE2m1[k]), bd = std::fabs(a - kE2m1[best]);
    if (d < bd || (d == bd && k % 2 == 0)) best = k;
  }
  return best;
}

// mxfp4 at exponent e: code (sign bit 8 and magnitude code) of each element. quant.h does not say
// which sign a zero gets; moekit's +0 (code 0) is pinned here, so a negative w that rounds to 0
// and w = −0 both dequantize to +0.
struct Mxfp4Candidate {
  int e = 0;
  std::array<uint8_t, 32> code{};
  ExactSquareSum err;
};

double mxfp4_value(uint8_t code, int e) {
  const double v = std::ldexp(kE2m1[code & 7], e - 127);
  return (code & 8) ? -v : v;
}

Mxfp4Candidate ref_mxfp4_candidate(const float* w, int e) {
  Mxfp4Candidate c;
  c.e = e;
  for (int j = 0; j < kGroup; ++j) {
    const int k = ref_e2m1_code(std::ldexp(std::fabs(double(w[j])), 127 - e));
    c.code[j] = static_cast<uint8_t>(k != 0 && w[j] < 0.0f ? k | 8 : k);
    c.err.add_square(double(w[j]) - mxfp4_value(c.code[j], e));
  }
  return c;
}

// The candidate exponents {e₀, e₀ + 1}, e₀ = ⌊log₂ max|w|⌋ − 2 + 127 (biased). E8M0 has no
// exponent below 0: quant.h does not say what a group below 2^−125 gets; a candidate below 0 is
// taken as 0 (the nearest exponent there is), so such a group is quantized at exponent 0.
std::vector<int> mxfp4_candidate_exponents(float amax) {
  const int e0 = std::ilogb(double(amax)) - 2 + 127;
  return {std::max(e0, 0), std::max(e0 + 1, 0)};
}

float group_absmax(const float* w) {
  float amax = 0.0f;
  for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(w[j]));
  return amax;
}

// A zero group: ⌊log₂ 0⌋ is undefined; the reference writes exponent 0 and codes 0 (any exponent
// stands for the same zeros; this pins moekit's).
Quantized ref_quantize_mxfp4(const std::vector<float>& w) {
  const auto cols = static_cast<int64_t>(w.size());
  Quantized out;
  out.codes.assign(static_cast<size_t>(cols / 2), 0);
  out.scales.assign(static_cast<size_t>(cols / kGroup), 0);
  for (int64_t g = 0; g < cols / kGroup; ++g) {
    const float* wg = w.data() + g * kGroup;
    const float amax = group_absmax(wg);
    if (amax == 0.0f) continue;
    std::optional<Mxfp4Candidate> best;
    for (int e : mxfp4_candidate_exponents(amax)) {
      Mxfp4Candidate c = ref_mxfp4_candidate(wg, e);
      if (!best || c.err < best->err) best = c;  // e₀ on ties
    }
    out.scales[g] = static_cast<uint8_t>(best->e);
    for (int j = 0; j < kGroup; ++j) put_nibble(out.codes.data() + g * 16, j, best->code[j]);
  }
  return out;
}

std::optional<Quantized> ref_quantize(DType format, const std::vector<float>& w) {
  if (format == DType::kInt8) return ref_quantize_int8(w);
  if (format == DType::kInt4) return ref_quantize_int4(w);
  return ref_quantize_mxfp4(w);
}

// The values codes stand for, as exact doubles (then one rounding to float): int8 s · q (a 24-bit
// by 8-bit product, exact in double; its float is the one rounding), int4 fp16(s) · q and mxfp4
// 2^(e − 127) · v (exact in float already).
std::vector<double> ref_dequantize_exact(DType format, const uint8_t* codes, const uint8_t* scales, int64_t cols) {
  std::vector<double> out(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) {
    if (format == DType::kInt8) {
      float s;
      std::memcpy(&s, scales, 4);
      out[c] = double(s) * double(static_cast<int8_t>(codes[c]));
    } else {
      const int64_t g = c / kGroup;
      const uint8_t nib = nibble_at(codes + g * 16, c % kGroup);
      if (format == DType::kInt4) {
        uint16_t h;
        std::memcpy(&h, scales + 2 * g, 2);
        out[c] = ref_fp16_to_double(h) * double(int(nib) - 8);
      } else {
        out[c] = mxfp4_value(nib, scales[g]);
      }
    }
  }
  return out;
}

std::vector<float> ref_dequantize(DType format, const uint8_t* codes, const uint8_t* scales, int64_t cols) {
  const std::vector<double> exact = ref_dequantize_exact(format, codes, scales, cols);
  return {exact.begin(), exact.end()};  // double → float: the one rounding (int8 only)
}

// The gpt-oss order, restated: element 2j of a group in the low nibble of byte j, 2j + 1 high.
std::vector<uint8_t> ref_repack(const uint8_t* blocks, int64_t cols) {
  std::vector<uint8_t> codes(static_cast<size_t>(cols / 2), 0);
  for (int64_t g = 0; g < cols / kGroup; ++g)
    for (int64_t i = 0; i < kGroup; ++i) {
      const uint8_t b = blocks[g * 16 + i / 2];
      put_nibble(codes.data() + g * 16, i, static_cast<uint8_t>(i % 2 == 0 ? b & 0x0f : b >> 4));
    }
  return codes;
}

// ---------------------------------------------------------------------------------------------
// Inputs.

::testing::AssertionResult same_bits(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (bits_of(got[i]) != bits_of(want[i]))
      return ::testing::AssertionFailure() << "element " << i << ": " << got[i] << " (0x" << std::hex << bits_of(got[i])
                                           << ") vs " << std::dec << want[i] << " (0x" << std::hex << bits_of(want[i])
                                           << ")";
  return ::testing::AssertionSuccess();
}

enum class Dist { kNormal, kOutliers, kUniform, kZeroGroups, kTiny, kFp16Subnormal, kSubnormal, kNegativeMax, kTies,
                  kGrid, kLarge, kHuge };
constexpr Dist kAllDists[] = {Dist::kNormal, Dist::kOutliers, Dist::kUniform, Dist::kZeroGroups,
                              Dist::kTiny, Dist::kFp16Subnormal, Dist::kSubnormal, Dist::kNegativeMax,
                              Dist::kTies, Dist::kGrid, Dist::kLarge, Dist::kHuge};

const char* dist_name(Dist d) {
  switch (d) {
    case Dist::kNormal: return "normal";
    case Dist::kOutliers: return "outliers";
    case Dist::kUniform: return "uniform";
    case Dist::kZeroGroups: return "zero groups";
    case Dist::kTiny: return "tiny";
    case Dist::kFp16Subnormal: return "fp16-subnormal scales";
    case Dist::kSubnormal: return "fp32 subnormal";
    case Dist::kNegativeMax: return "negative max";
    case Dist::kTies: return "ties";
    case Dist::kGrid: return "E2M1 grid";
    case Dist::kLarge: return "large";
    case Dist::kHuge: return "huge";
  }
  return "?";
}

// A row of cols weights. kLarge stays below 393120 = 6 · 65520 (every int4 candidate scale fits
// fp16); kHuge (up to ~3e38) is for int8 and mxfp4 only.
std::vector<float> make_row(Dist dist, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  std::vector<float> w(static_cast<size_t>(cols));
  for (auto& x : w) x = normal(rng);
  const int64_t groups = cols / kGroup;
  switch (dist) {
    case Dist::kNormal: break;
    case Dist::kOutliers:
      for (auto& x : w) {
        x *= 0.02f;
        if (pick(rng) % 50 == 0) x *= 50.0f + float(pick(rng) % 450);
      }
      break;
    case Dist::kUniform:
      for (auto& x : w) x = 3.7f * uniform(rng);
      break;
    case Dist::kZeroGroups:
      for (int64_t g = 0; g < groups; g += 2)
        for (int64_t j = 0; j < kGroup; ++j) w[g * kGroup + j] = (j % 3 == 0) ? -0.0f : 0.0f;
      break;
    case Dist::kTiny:  // int4 scales fp16-subnormal or rounding to ±0 in some groups
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t j = 0; j < kGroup; ++j) w[g * kGroup + j] *= std::ldexp(1.0f, -20 - int(g % 8) * 2);
      break;
    case Dist::kFp16Subnormal:  // m / 8 < 2^−14: every int4 candidate is an fp16 subnormal
      for (auto& x : w) x *= 3e-5f;
      break;
    case Dist::kSubnormal:  // fp32 subnormals: int8's s underflows, mxfp4's e₀ < 0
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t j = 0; j < kGroup; ++j) w[g * kGroup + j] *= std::ldexp(1.0f, -124 - int(g % 5) * 5);
      break;
    case Dist::kNegativeMax:
      for (int64_t g = 0; g < groups; ++g) w[g * kGroup + (g * 7) % kGroup] = -4.5f - std::fabs(uniform(rng));
      break;
    case Dist::kTies:  // multiples of 1/8 (exact ties for levels and E2M1 midpoints) and ±max pairs
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t j = 0; j < kGroup; ++j) w[g * kGroup + j] = float(pick(rng) % 113 - 56) / 8.0f;
        const float top = 8.0f;  // above every other |w| (≤ 7)
        w[g * kGroup + 1 + g % 3] = (g % 2 == 0) ? top : -top;
        w[g * kGroup + 9 + g % 5] = (g % 2 == 0) ? -top : top;
      }
      break;
    case Dist::kGrid:  // E2M1 values and their midpoints at a power of two per group
      for (int64_t g = 0; g < groups; ++g) {
        static constexpr float kPoints[] = {0.0f, 0.25f, 0.5f, 0.75f, 1.0f, 1.25f, 1.5f, 1.75f, 2.0f,
                                            2.5f, 3.0f,  3.5f, 4.0f,  5.0f, 6.0f,  7.0f, 8.0f};
        const int shift = int(g % 9) * 3 - 12;
        for (int64_t j = 0; j < kGroup; ++j) {
          const float v = kPoints[pick(rng) % 17];
          w[g * kGroup + j] = std::ldexp(pick(rng) % 2 ? -v : v, shift);
        }
      }
      break;
    case Dist::kLarge:
      for (auto& x : w) x = std::clamp(x * 1e4f, -3.9e5f, 3.9e5f);
      break;
    case Dist::kHuge:
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t j = 0; j < kGroup; ++j)
          w[g * kGroup + j] = std::clamp(w[g * kGroup + j], -3.0f, 3.0f) * std::ldexp(1.0f, 100 + int(g % 4) * 8);
      break;
  }
  return w;
}

bool dist_applies(DType format, Dist dist) { return !(format == DType::kInt4 && dist == Dist::kHuge); }

struct RowQuantized {
  std::vector<uint8_t> codes, scales;
  std::vector<float> values;
};

RowQuantized quantize(DType format, const std::vector<float>& w, int64_t row = 0) {
  const auto cols = static_cast<int64_t>(w.size());
  RowQuantized r;
  r.codes.assign(static_cast<size_t>(quantized_code_bytes(format, cols)), 0xa5);  // garbage: every byte is written
  r.scales.assign(static_cast<size_t>(quantized_scale_bytes(format, cols)), 0xa5);
  quantize_row(format, w.data(), cols, r.codes.data(), r.scales.data(), "w", row);
  r.values.assign(static_cast<size_t>(cols), kNan);
  dequantize_row(format, r.codes.data(), r.scales.data(), cols, r.values.data());
  return r;
}

const char* format_name(DType f) { return f == DType::kInt8 ? "int8" : f == DType::kInt4 ? "int4" : "mxfp4"; }

// ---------------------------------------------------------------------------------------------
// Checks of one quantized row that do not go through the reference's argmin.

// The per-element bound of a nearest level: inside the range |w − s·q| ≤ |s| / 2 (int8: |w| ≤
// 127.5 s; int4: w / s ∈ [−8.5, 7.5]); mxfp4: |w|/2^(e−127) ≤ 6 lies within half the gap between
// its neighbouring E2M1 values (gaps 0.5 up to 2, 1 up to 4, 2 up to 6). Exact in double.
void expect_nearest_levels(DType format, const std::vector<float>& w, const RowQuantized& r, const std::string& what) {
  const auto cols = static_cast<int64_t>(w.size());
  const std::vector<double> v = ref_dequantize_exact(format, r.codes.data(), r.scales.data(), cols);
  int failures = 0;
  for (int64_t c = 0; c < cols && failures < 5; ++c) {
    const double x = w[c];
    bool ok = true;
    double bound = 0.0;
    if (format == DType::kInt8 || format == DType::kInt4) {
      double s;
      if (format == DType::kInt8) {
        float sf;
        std::memcpy(&sf, r.scales.data(), 4);
        s = sf;
      } else {
        uint16_t h;
        std::memcpy(&h, r.scales.data() + 2 * (c / kGroup), 2);
        s = ref_fp16_to_double(h);
      }
      if (s == 0.0) continue;  // every level stands for 0
      const double lo = format == DType::kInt8 ? -127.5 : -8.5, hi = format == DType::kInt8 ? 127.5 : 7.5;
      const double t_lo = std::min(lo * s, hi * s), t_hi = std::max(lo * s, hi * s);
      if (x < t_lo || x > t_hi) continue;  // clipped: outside the range
      bound = std::fabs(s) / 2.0;
      ok = std::fabs(x - v[c]) <= bound;
    } else {
      const int e = r.scales[c / kGroup];
      const double a = std::ldexp(std::fabs(x), 127 - e), got = std::ldexp(std::fabs(v[c]), 127 - e);
      if (a > 6.0) continue;
      bound = a <= 2.0 ? 0.25 : a <= 4.0 ? 0.5 : 1.0;
      ok = std::fabs(a - got) <= bound && (v[c] == 0.0 || std::signbit(v[c]) == std::signbit(x));
      bound = std::ldexp(bound, e - 127);
    }
    if (!ok) {
      ++failures;
      ADD_FAILURE() << what << " col " << c << ": w " << x << " → " << v[c] << ", error " << std::fabs(x - v[c])
                    << " > half a step " << bound;
    }
  }
}

// The chosen scale is one of the candidates the definition lists and its exact squared error is
// ≤ every candidate's (each with its nearest levels).
void expect_least_squares_scale(DType format, const std::vector<float>& w, const RowQuantized& r,
                                const std::string& what) {
  if (format == DType::kInt8) return;  // one candidate: the reference comparison covers it
  const auto cols = static_cast<int64_t>(w.size());
  const std::vector<double> v = ref_dequantize_exact(format, r.codes.data(), r.scales.data(), cols);
  for (int64_t g = 0; g < cols / kGroup; ++g) {
    const float* wg = w.data() + g * kGroup;
    if (group_absmax(wg) == 0.0f) continue;
    ExactSquareSum chosen;
    for (int64_t j = 0; j < kGroup; ++j) chosen.add_square(double(wg[j]) - v[g * kGroup + j]);
    bool listed = false;
    if (format == DType::kInt4) {
      uint16_t h;
      std::memcpy(&h, r.scales.data() + 2 * g, 2);
      for (const Int4Candidate& c : ref_int4_candidates(wg)) {
        listed |= c.bits == h;
        EXPECT_TRUE(chosen <= c.err) << what << " group " << g << ": chosen scale 0x" << std::hex << h << std::dec
                                     << " error " << chosen.approx() << " > candidate 0x" << std::hex << c.bits
                                     << std::dec << " error " << c.err.approx();
      }
      EXPECT_TRUE(listed) << what << " group " << g << ": scale 0x" << std::hex << h << " is no candidate";
    } else {
      for (int e : mxfp4_candidate_exponents(group_absmax(wg))) {
        const Mxfp4Candidate c = ref_mxfp4_candidate(wg, e);
        listed |= c.e == r.scales[g];
        EXPECT_TRUE(chosen <= c.err) << what << " group " << g << ": exponent " << int(r.scales[g]) << " error "
                                     << chosen.approx() << " > exponent " << e << " error " << c.err.approx();
      }
      EXPECT_TRUE(listed) << what << " group " << g << ": exponent " << int(r.scales[g]) << " is no candidate";
    }
  }
}

// Quantizes w, compares codes and scales with the reference bit for bit, the dequantized values
// with scale · level, and runs the two independent checks.
void check_row(DType format, const std::vector<float>& w, const std::string& what) {
  const auto cols = static_cast<int64_t>(w.size());
  const std::optional<Quantized> want = ref_quantize(format, w);
  ASSERT_TRUE(want.has_value()) << what << ": the generator made an int4 group whose scale overflows fp16";
  const RowQuantized got = quantize(format, w);
  EXPECT_EQ(got.codes, want->codes) << what << ": codes";
  EXPECT_EQ(got.scales, want->scales) << what << ": scales";
  EXPECT_TRUE(same_bits(got.values, ref_dequantize(format, got.codes.data(), got.scales.data(), cols)))
      << what << ": dequantized values vs scale · level";
  expect_nearest_levels(format, w, got, what);
  expect_least_squares_scale(format, w, got, what);
}

void check_format_on_all_distributions(DType format) {
  std::mt19937 rng(1234 + static_cast<int>(format));
  for (Dist dist : kAllDists) {
    if (!dist_applies(format, dist)) continue;
    for (int row = 0; row < 6; ++row) {
      const int64_t cols = row % 3 == 0 ? 32 : 256;
      const std::vector<float> w = make_row(dist, cols, rng);
      check_row(format, w, std::string(format_name(format)) + " " + dist_name(dist) + " row " + std::to_string(row));
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// float_to_fp16

TEST(QuantFormatFp16, EveryBitPatternRoundTripsThroughFloat) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const float f = fp16_to_float(bits);
    const double want = ref_fp16_to_double(bits);
    if (fp16_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_TRUE(fp16_is_nan(float_to_fp16(f))) << std::hex << h;  // NaN stays NaN
      continue;
    }
    ASSERT_EQ(bits_of(f), bits_of(static_cast<float>(want))) << std::hex << h;  // fp16_to_float is exact
    ASSERT_EQ(float_to_fp16(f), bits) << std::hex << h;
  }
}

TEST(QuantFormatFp16, RoundsToNearestEvenAsTheDefinitionOnEdgeAndRandomFloats) {
  std::vector<float> xs = {0.0f, -0.0f, kInf, -kInf, kNan, -kNan,
                           65504.0f, 65519.0f, 65520.0f, std::nextafter(65520.0f, 0.0f), 65536.0f, 1e5f,
                           std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                           std::numeric_limits<float>::min(),
                           std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::nextafter(std::ldexp(1.0f, -25), 1.0f),
                           std::ldexp(3.0f, -26), std::ldexp(3.0f, -25), std::ldexp(1.0f, -14),
                           std::ldexp(2047.0f, -25),  // the tie largest subnormal ↔ smallest normal
                           std::ldexp(1.0f, -26), 1.0f + std::ldexp(1.0f, -11), 1.0f + std::ldexp(3.0f, -11)};
  // Known answers from the definition, so that the reference itself is pinned.
  EXPECT_EQ(ref_float_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(ref_float_to_fp16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(ref_float_to_fp16(65520.0f), 0x7c00);  // the tie 65504 ↔ 2^16 goes to even: overflow
  EXPECT_EQ(ref_float_to_fp16(std::ldexp(1.0f, -25)), 0x0000);     // tie 0 ↔ 2^−24: even
  EXPECT_EQ(ref_float_to_fp16(std::ldexp(3.0f, -25)), 0x0002);     // tie 2^−24 ↔ 2^−23: even
  EXPECT_EQ(ref_float_to_fp16(std::ldexp(2047.0f, -25)), 0x0400);  // tie 0x3ff ↔ 0x400: even
  EXPECT_EQ(ref_float_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(ref_float_to_fp16(1.0f + std::ldexp(3.0f, -11)), 0x3c02);
  EXPECT_EQ(ref_float_to_fp16(-std::ldexp(1.0f, -26)), 0x8000);
  // Every midpoint between neighbouring non-negative fp16 values and the floats beside it.
  const std::vector<double>& ladder = fp16_ladder();
  for (size_t h = 0; h + 1 < ladder.size(); ++h) {
    const auto mid = static_cast<float>((ladder[h] + ladder[h + 1]) / 2);  // 12 bits: exact
    xs.push_back(mid);
    xs.push_back(std::nextafter(mid, 0.0f));
    xs.push_back(std::nextafter(mid, kInf));
    xs.push_back(-mid);
  }
  std::mt19937 rng(77);
  std::uniform_real_distribution<float> exponent(-30.0f, 18.0f);
  for (int i = 0; i < 200000; ++i) {
    xs.push_back(std::bit_cast<float>(static_cast<uint32_t>(rng())));
    xs.push_back((i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng)));
  }
  for (float x : xs) {
    const uint16_t got = float_to_fp16(x), want = ref_float_to_fp16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(fp16_is_nan(got)) << x;
    } else {
      ASSERT_EQ(got, want) << x << " (0x" << std::hex << bits_of(x) << ")";
    }
  }
}

const SafetensorsFile& fixture() {
  static const SafetensorsFile f = SafetensorsFile::open(std::string(MOEKIT_FIXTURE_DIR) + "/quant_formats.safetensors");
  return f;
}

template <typename T>
std::vector<T> values_of(const TensorView& t) {
  std::vector<T> v(static_cast<size_t>(t.num_elements()));
  EXPECT_EQ(t.bytes, static_cast<int64_t>(v.size() * sizeof(T))) << t.name;
  std::memcpy(v.data(), t.data, v.size() * sizeof(T));  // the mapping need not be aligned
  return v;
}

TEST(QuantFormatFp16, EqualsNumpysFloat16Conversion) {
  const TensorView& in = fixture().at("fp16.input");
  const TensorView& np = fixture().at("fp16.numpy");
  ASSERT_EQ(in.dtype, TensorDType::kF32);
  ASSERT_EQ(np.dtype, TensorDType::kU16);
  const std::vector<float> x = values_of<float>(in);
  const std::vector<uint16_t> want = values_of<uint16_t>(np);
  ASSERT_EQ(x.size(), want.size());
  ASSERT_GT(x.size(), 1000u);
  int infinities = 0, nans = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isnan(x[i])) {  // numpy keeps payload bits; the definition only asks for a NaN
      ASSERT_TRUE(fp16_is_nan(want[i]));
      ASSERT_TRUE(fp16_is_nan(float_to_fp16(x[i]))) << i;
      ++nans;
      continue;
    }
    ASSERT_EQ(float_to_fp16(x[i]), want[i]) << i << ": " << x[i] << " (0x" << std::hex << bits_of(x[i]) << ")";
    ASSERT_EQ(ref_float_to_fp16(x[i]), want[i]) << i << ": the reference disagrees with numpy";
    infinities += (want[i] & 0x7fff) == 0x7c00;
  }
  EXPECT_GT(infinities, 10);  // the fixture does reach overflow
  EXPECT_GE(nans, 1);
}

// ---------------------------------------------------------------------------------------------
// quantize_row / dequantize_row

TEST(QuantFormatRow, SizesAndPredicatesAsDeclared) {
  EXPECT_TRUE(is_quantized(DType::kInt8));
  EXPECT_TRUE(is_quantized(DType::kInt4));
  EXPECT_TRUE(is_quantized(DType::kMxfp4));
  EXPECT_FALSE(is_quantized(DType::kF32));
  EXPECT_FALSE(is_quantized(DType::kBF16));
  for (int64_t cols : {32, 64, 4096}) {
    EXPECT_EQ(quantized_code_bytes(DType::kInt8, cols), cols);
    EXPECT_EQ(quantized_scale_bytes(DType::kInt8, cols), 4);  // one fp32 per row
    EXPECT_EQ(quantized_code_bytes(DType::kInt4, cols), cols / 2);
    EXPECT_EQ(quantized_scale_bytes(DType::kInt4, cols), cols / 32 * 2);  // fp16 per group: 18 bytes / 32
    EXPECT_EQ(quantized_code_bytes(DType::kMxfp4, cols), cols / 2);
    EXPECT_EQ(quantized_scale_bytes(DType::kMxfp4, cols), cols / 32);  // E8M0 per group: 17 bytes / 32
    EXPECT_NO_THROW(check_quantizable(DType::kInt4, cols, "w"));
  }
}

TEST(QuantFormatRow, Int8EqualsTheDefinition) { check_format_on_all_distributions(DType::kInt8); }
TEST(QuantFormatRow, Int4EqualsTheDefinition) { check_format_on_all_distributions(DType::kInt4); }
TEST(QuantFormatRow, Mxfp4EqualsTheDefinition) { check_format_on_all_distributions(DType::kMxfp4); }

// Hand-worked groups, so that the reference is pinned by arithmetic one can redo on paper.
TEST(QuantFormatRow, HandWorkedGroups) {
  // int8: max 127 → s = 1, q = w rounded half to even: 2.5 → 2, −3.5 → −4, 0.5 → 0.
  std::vector<float> w8(32, 0.0f);
  w8[0] = 127.0f;
  w8[1] = 2.5f;
  w8[2] = -3.5f;
  w8[3] = 0.5f;
  w8[4] = -127.0f;
  const RowQuantized q8 = quantize(DType::kInt8, w8);
  EXPECT_EQ(static_cast<int8_t>(q8.codes[1]), 2);
  EXPECT_EQ(static_cast<int8_t>(q8.codes[2]), -4);
  EXPECT_EQ(static_cast<int8_t>(q8.codes[3]), 0);
  EXPECT_EQ(static_cast<int8_t>(q8.codes[4]), -127);
  EXPECT_EQ(q8.values[0], 127.0f);
  // int4: w = −8, −7, …, 7 twice: r = −8 gives s = 1 exactly and zero error (first, chosen);
  // element j holds level w_j, nibble w_j + 8: byte j = (j) | (j << 4) for j < 16.
  std::vector<float> w4(32);
  for (int j = 0; j < 32; ++j) w4[j] = float(j % 16 - 8);
  const RowQuantized q4 = quantize(DType::kInt4, w4);
  EXPECT_EQ(q4.scales, (std::vector<uint8_t>{0x00, 0x3c}));  // fp16 1.0 = 0x3c00, little-endian
  for (int j = 0; j < 16; ++j) EXPECT_EQ(q4.codes[j], static_cast<uint8_t>(j | (j << 4))) << j;
  EXPECT_EQ(q4.values, w4);
  // int4, positive max: m = 8 → s = 8 / −8 = −1 (0xbc00), level −8 for w = 8; w = −7 → level 7.
  std::vector<float> wp(32, 0.0f);
  wp[0] = 8.0f;
  wp[1] = -7.0f;
  const RowQuantized qp = quantize(DType::kInt4, wp);
  EXPECT_EQ(qp.scales, (std::vector<uint8_t>{0x00, 0xbc}));
  EXPECT_EQ(qp.codes[0], 0x00 | (8 << 4));  // element 0: −8 + 8 = 0; element 16: level 0 → 8
  EXPECT_EQ(qp.codes[1], 15 | (8 << 4));    // element 1: 7 + 8
  // mxfp4: max 6 → ⌊log₂ 6⌋ − 2 = 0, e₀ = 127 (scale 1): 6, −0.25 → 0 (tie to even code 0),
  // 0.75 → 1.0 (tie → code 2), 5 → 4 (tie → code 6), −1.75 → −2 (tie → code 4).
  std::vector<float> wm(32, 0.0f);
  wm[0] = 6.0f;
  wm[1] = -0.25f;
  wm[2] = 0.75f;
  wm[3] = 5.0f;
  wm[17] = -1.75f;
  const RowQuantized qm = quantize(DType::kMxfp4, wm);
  EXPECT_EQ(qm.scales[0], 127);
  EXPECT_EQ(qm.codes[0], 7);
  EXPECT_EQ(qm.codes[1], 0 | ((8 | 4) << 4));  // element 1: +0 (zero's sign: moekit's +0); element 17: −2
  EXPECT_EQ(qm.codes[2], 2);
  EXPECT_EQ(qm.codes[3], 6);
}

// Codes that no quantizer wrote (every nibble, random scales) decode as scale · value.
TEST(QuantFormatRow, DequantizeDecodesArbitraryCodes) {
  std::mt19937 rng(99);
  const int64_t cols = 512;
  for (DType format : {DType::kInt8, DType::kInt4, DType::kMxfp4}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<uint8_t> codes(static_cast<size_t>(quantized_code_bytes(format, cols)));
      std::vector<uint8_t> scales(static_cast<size_t>(quantized_scale_bytes(format, cols)));
      for (auto& b : codes) {
        b = static_cast<uint8_t>(rng());
        if (format == DType::kInt8 && b == 0x80) b = 0x81;  // −128 is no int8 level ([−127, 127])
      }
      if (format == DType::kInt8) {
        const float s = std::ldexp(float(rng() % 1000 + 1) / 1000.0f, int(rng() % 60) - 40);
        std::memcpy(scales.data(), &s, 4);
      } else if (format == DType::kInt4) {
        for (size_t g = 0; g < scales.size() / 2; ++g) {
          auto h = static_cast<uint16_t>(rng());
          if ((h & 0x7c00) == 0x7c00) h &= 0xbfff;  // a finite fp16
          std::memcpy(scales.data() + 2 * g, &h, 2);
        }
      } else {
        for (auto& e : scales) e = static_cast<uint8_t>(rng() % 253);  // 0 … 252: 6 · 2^125 is finite
      }
      std::vector<float> got(static_cast<size_t>(cols), kNan);
      dequantize_row(format, codes.data(), scales.data(), cols, got.data());
      ASSERT_TRUE(same_bits(got, ref_dequantize(format, codes.data(), scales.data(), cols)))
          << format_name(format) << " trial " << trial;
    }
  }
}

// quantize(dequantize(quantize(w))) against quantize(w):
//   int4: implied. With q_m the level of the group's largest element (m / s ≈ r ∈ [−8, −6], so
//     q_m ∈ {−8, −7, −6} and no level exceeds |q_m|), the candidate r' = q_m of the dequantized
//     group gives fp16(s·q_m / q_m) = s and error 0; a least-squares choice has error 0 and so
//     reproduces every value (possibly with another scale: levels all in {−7, 0, 7} are also
//     reproduced by r' = −8, s' = 7s/8, which comes first). Values compare as floats: a group whose
//     scale rounded to −0 dequantizes to −0.0 and requantizes as a zero group to +0.0.
//   mxfp4: implied. The dequantized group is at most 2^(e−127)·v_max; its candidates include an
//     exponent at which every dequantized value is an E2M1 value (e itself when v_max ≥ 4, else
//     e − 1, e − 2 or e − 3, scaling {0, …, v_max} up into E2M1, all exact), so the error is 0.
//   int8: NOT implied. The new scale is fl(fl(127 s) / 127), which differs from s for 65020 of
//     the 2^23 fp32 significands in [1, 2); the levels are the same (|q| ≤ 127: a relative change
//     of ~2^−23 in s moves w / s by far less than ½), so the codes are checked, and the values
//     only where the scale came back.
TEST(QuantFormatRow, RequantizingDequantizedValuesReproducesThem) {
  std::mt19937 rng(4321);
  int int8_scale_changed = 0, rows = 0;
  for (DType format : {DType::kInt8, DType::kInt4, DType::kMxfp4}) {
    for (Dist dist : kAllDists) {
      if (!dist_applies(format, dist)) continue;
      for (int row = 0; row < 4; ++row) {
        const std::vector<float> w = make_row(dist, 256, rng);
        const RowQuantized once = quantize(format, w);
        const RowQuantized twice = quantize(format, once.values);
        const std::string what = std::string(format_name(format)) + " " + dist_name(dist) + " row " + std::to_string(row);
        ++rows;
        if (format == DType::kInt8) {
          EXPECT_EQ(twice.codes, once.codes) << what;
          if (twice.scales == once.scales) {
            EXPECT_TRUE(same_bits(twice.values, once.values)) << what;
          } else {
            ++int8_scale_changed;
          }
          continue;
        }
        for (size_t c = 0; c < w.size(); ++c)
          ASSERT_EQ(twice.values[c], once.values[c]) << what << " col " << c;  // == : ±0 alike
      }
    }
  }
  EXPECT_GT(rows, 100);
  RecordProperty("int8_rows_whose_scale_changed", int8_scale_changed);
}

// Adversarial inputs for the level rounding: w whose fp32 quotient w / s is exactly k + ½ while
// the exact quotient is not (int8's s has 24 bits, so (k + ½)·s is no float and floats lie at any
// distance from it). Rounding the fp32 quotient half to even then picks the farther level half the
// time, an error just above s/2; the definition (q = round_half_even(w / s), the nearest level,
// error ≤ s/2) does not. E.g. amax 1 (s = 0x1.020408p-7), w = 0x1.4e9d3ap-2: w / s = 41.4999993
// exactly, 41.5 in fp32; the nearest level is 41.
std::vector<float> floats_whose_fp32_quotient_is_a_false_half(float s, int kmin, int kmax, size_t want) {
  std::vector<float> found;
  for (int k = kmin; k <= kmax && found.size() < want; ++k) {
    const double mid = (k + 0.5) * double(s);  // exact
    float w = static_cast<float>(mid);
    for (int step = 0; step < 4; ++step) w = std::nextafter(w, -kInf);
    for (int step = 0; step < 9 && found.size() < want; ++step, w = std::nextafter(w, kInf)) {
      const float qf = w / s;  // the quotient as fp32 division rounds it
      if (qf == float(k) + 0.5f && double(w) != mid) found.push_back(w);
    }
  }
  return found;
}

TEST(QuantFormatRow, Int8LevelIsTheNearestWhenTheFp32QuotientIsAFalseHalf) {
  // amax fixes s = fl(amax / 127); search a few amax for adversarial w below it.
  std::vector<float> row;
  for (float amax = 1.0f; row.size() < 64 * 3 && amax < 2.0f; amax = std::nextafter(amax + 0.013f, 2.0f)) {
    const auto s = static_cast<float>(double(amax) / 127.0);
    std::vector<float> adv = floats_whose_fp32_quotient_is_a_false_half(s, 40, 126, 63);
    if (adv.empty()) continue;
    adv.resize(63, 0.0f);
    row.push_back(amax);
    row.insert(row.end(), adv.begin(), adv.end());
  }
  ASSERT_GE(row.size(), 64u) << "no adversarial input found";
  for (size_t r = 0; r + 64 <= row.size(); r += 64)
    check_row(DType::kInt8, std::vector<float>(row.begin() + r, row.begin() + r + 64),
              "int8 false-half row " + std::to_string(r / 64));
}

// int4 has no such adversarial inputs, so no test of that kind:
//   levels: s is an fp16 value (11 bits), so (k + ½)·s is itself a float, and any other float w
//     is at least ulp(w) from it; |w/s − (k + ½)| ≥ ulp(w)/|s| > ulp(w/s)/2, so the fp32 quotient
//     of a float by an fp16 scale is k + ½ only when the exact one is.
//   candidate scales: an fp32 quotient q = 8m/d (d = 48 … 64) that lands on an fp16 midpoint M
//     has |8m − d·M| ≤ d·ulp(q)/2 ≤ d·2^−24·q = 2^−21·m < ulp(8m) (ulp(q) ≤ 2^−23·q; m < 2^(e+1),
//     ulp(8m) = 2^(e−20)), while 8m and d·M are both multiples of ulp(8m) (M has 12 bits at an
//     exponent ≥ e − 3): so 8m = d·M, a true tie, and rounding m / r to fp32 first never changes
//     the fp16 result.
// The random rows (kTies, kGrid) cover the true ties of both.

// ---------------------------------------------------------------------------------------------
// repack_gpt_oss_mxfp4_row

// Random gpt-oss bytes; groups at exponents 253 / 254 hold only magnitudes that stay finite
// (|v| ≤ 3 at 253, ≤ 1.5 at 254), since dequantize_mxfp4 rejects an overflow.
void random_gpt_oss_blocks(std::mt19937& rng, int64_t rows, int64_t groups, std::vector<uint8_t>& blocks,
                           std::vector<uint8_t>& scales) {
  blocks.resize(static_cast<size_t>(rows * groups * 16));
  scales.resize(static_cast<size_t>(rows * groups));
  for (auto& b : blocks) b = static_cast<uint8_t>(rng());
  for (size_t i = 0; i < scales.size(); ++i) {
    static constexpr uint8_t kEdges[] = {0, 1, 2, 127, 252, 253};
    const uint32_t pick = rng() % 16;
    scales[i] = pick < 10 ? static_cast<uint8_t>(110 + rng() % 31) : kEdges[pick - 10];
    if (i % 23 == 0) scales[i] = 254;
    const int max_code = scales[i] == 254 ? 3 : scales[i] == 253 ? 5 : 7;
    for (int j = 0; j < 16; ++j) {
      uint8_t& b = blocks[i * 16 + j];
      const auto lo = static_cast<uint8_t>((b & 8) | std::min<int>(b & 7, max_code));
      const auto hi = static_cast<uint8_t>((b >> 4 & 8) | std::min<int>(b >> 4 & 7, max_code));
      b = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

TEST(QuantFormatRepack, EqualsDequantizeMxfp4OnRandomBlocks) {
  std::mt19937 rng(8);
  const int64_t rows = 24, groups = 6, cols = groups * 32;
  std::vector<uint8_t> blocks, scales;
  random_gpt_oss_blocks(rng, rows, groups, blocks, scales);
  std::vector<float> want(static_cast<size_t>(rows * cols));
  dequantize_mxfp4(blocks.data(), scales.data(), rows, groups, want.data(), "blocks");
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<uint8_t> codes(static_cast<size_t>(cols / 2), 0xa5);
    repack_gpt_oss_mxfp4_row(blocks.data() + r * groups * 16, scales.data() + r * groups, cols, codes.data(), "blocks");
    EXPECT_EQ(codes, ref_repack(blocks.data() + r * groups * 16, cols)) << "row " << r;
    std::vector<float> got(static_cast<size_t>(cols), kNan);
    dequantize_row(DType::kMxfp4, codes.data(), scales.data() + r * groups, cols, got.data());
    EXPECT_TRUE(same_bits(got, std::vector<float>(want.begin() + r * cols, want.begin() + (r + 1) * cols)))
        << "row " << r;
  }
}

TEST(QuantFormatRepack, EqualsTransformersGptOssDequantization) {
  const TensorView& b = fixture().at("mxfp4.blocks");
  const TensorView& s = fixture().at("mxfp4.scales");
  const TensorView& e = fixture().at("mxfp4.expected");
  ASSERT_EQ(b.dtype, TensorDType::kU8);
  ASSERT_EQ(s.dtype, TensorDType::kU8);
  ASSERT_EQ(e.dtype, TensorDType::kF32);
  ASSERT_EQ(b.shape.size(), 4u);  // [experts, out_features, groups, 16]
  const int64_t experts = b.shape[0], out_features = b.shape[1], groups = b.shape[2], cols = groups * 32;
  ASSERT_EQ(b.shape[3], 16);
  ASSERT_EQ(s.shape, (std::vector<int64_t>{experts, out_features, groups}));
  ASSERT_EQ(e.shape, (std::vector<int64_t>{experts, cols, out_features}));  // transformers transposes
  const std::vector<uint8_t> blocks = values_of<uint8_t>(b), scales = values_of<uint8_t>(s);
  const std::vector<float> expected = values_of<float>(e);
  std::vector<float> old(static_cast<size_t>(experts * out_features * cols));
  dequantize_mxfp4(blocks.data(), scales.data(), experts * out_features, groups, old.data(), "mxfp4");
  int edge_groups = 0;
  for (uint8_t x : scales) edge_groups += x < 100 || x > 200;
  EXPECT_GT(edge_groups, 0) << "the fixture should hold edge exponents";
  for (int64_t x = 0; x < experts; ++x)
    for (int64_t o = 0; o < out_features; ++o) {
      const int64_t r = x * out_features + o;
      std::vector<uint8_t> codes(static_cast<size_t>(cols / 2));
      repack_gpt_oss_mxfp4_row(blocks.data() + r * groups * 16, scales.data() + r * groups, cols, codes.data(),
                               "mxfp4");
      std::vector<float> got(static_cast<size_t>(cols));
      dequantize_row(DType::kMxfp4, codes.data(), scales.data() + r * groups, cols, got.data());
      std::vector<float> want(static_cast<size_t>(cols));
      for (int64_t i = 0; i < cols; ++i) want[i] = expected[(x * cols + i) * out_features + o];
      EXPECT_TRUE(same_bits(got, want)) << "expert " << x << " row " << o;
      EXPECT_TRUE(same_bits(std::vector<float>(old.begin() + r * cols, old.begin() + (r + 1) * cols), want))
          << "dequantize_mxfp4, expert " << x << " row " << o;
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input

template <typename F>
std::string input_error_of(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not an InputError: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no InputError";
  return "";
}

bool names_number(const std::string& message, int64_t n) {
  return std::regex_search(message, std::regex("(^|[^0-9])" + std::to_string(n) + "([^0-9]|$)"));
}

TEST(QuantFormatErrors, NonFiniteWeightNamesRowAndColumn) {
  std::mt19937 rng(3);
  for (DType format : {DType::kInt8, DType::kInt4, DType::kMxfp4})
    for (float bad : {kNan, kInf, -kInf}) {
      std::vector<float> w = make_row(Dist::kNormal, 64, rng);
      w[37] = bad;
      std::vector<uint8_t> codes(static_cast<size_t>(quantized_code_bytes(format, 64)));
      std::vector<uint8_t> scales(static_cast<size_t>(quantized_scale_bytes(format, 64)));
      const std::string msg = input_error_of(
          [&] { quantize_row(format, w.data(), 64, codes.data(), scales.data(), "layers.2.experts.w1", 5); });
      EXPECT_NE(msg.find("layers.2.experts.w1"), std::string::npos) << msg;
      EXPECT_TRUE(names_number(msg, 5)) << "row 5: " << msg;
      EXPECT_TRUE(names_number(msg, 37)) << "column 37: " << msg;
    }
}

TEST(QuantFormatErrors, ColumnsNotAPositiveMultipleOf32) {
  std::vector<float> w(128, 1.0f);
  std::vector<uint8_t> codes(256), scales(64);
  for (DType format : {DType::kInt8, DType::kInt4, DType::kMxfp4})
    for (int64_t cols : {48, 16, 33, 0, -32}) {
      EXPECT_THROW(check_quantizable(format, cols, "w"), InputError) << cols;
      EXPECT_THROW(quantize_row(format, w.data(), cols, codes.data(), scales.data(), "w", 0), InputError) << cols;
      std::vector<float> out(128);
      EXPECT_THROW(dequantize_row(format, codes.data(), scales.data(), cols, out.data()), InputError) << cols;
    }
  std::vector<uint8_t> blocks(128, 0), e8(4, 127);
  EXPECT_THROW(repack_gpt_oss_mxfp4_row(blocks.data(), e8.data(), 48, codes.data(), "b"), InputError);
}

TEST(QuantFormatErrors, UnquantizedFormats) {
  std::vector<float> w(64, 1.0f), out(64);
  std::vector<uint8_t> codes(256), scales(64);
  for (DType format : {DType::kF32, DType::kBF16}) {
    EXPECT_THROW(check_quantizable(format, 64, "w"), InputError);
    EXPECT_THROW(quantize_row(format, w.data(), 64, codes.data(), scales.data(), "w", 0), InputError);
    EXPECT_THROW(dequantize_row(format, codes.data(), scales.data(), 64, out.data()), InputError);
  }
}

TEST(QuantFormatErrors, RepackRejectsTheNanExponent) {
  std::vector<uint8_t> blocks(4 * 16, 0x21), scales = {127, 120, 0xff, 130}, codes(64);
  const std::string msg =
      input_error_of([&] { repack_gpt_oss_mxfp4_row(blocks.data(), scales.data(), 128, codes.data(), "experts.down"); });
  EXPECT_NE(msg.find("experts.down"), std::string::npos) << msg;
  scales[2] = 254;  // the largest exponent is a number
  EXPECT_NO_THROW(repack_gpt_oss_mxfp4_row(blocks.data(), scales.data(), 128, codes.data(), "experts.down"));
}

TEST(QuantFormatErrors, Int4WeightTooLargeForAnFp16Scale) {
  // Even the smallest candidate |m| / 8 exceeds 65504 (rounds to Inf at 65520: |m| ≥ 524160).
  for (float big : {6e5f, -1e6f, 3.4e38f}) {
    std::vector<float> w(64, 0.5f);
    w[40] = big;
    std::vector<uint8_t> codes(32), scales(4);
    const std::string msg =
        input_error_of([&] { quantize_row(DType::kInt4, w.data(), 64, codes.data(), scales.data(), "experts.w3", 7); });
    EXPECT_NE(msg.find("experts.w3"), std::string::npos) << msg;
    EXPECT_TRUE(names_number(msg, 7)) << "row 7: " << msg;
    // int8 and mxfp4 have no fp16 scale: the same row quantizes.
    std::vector<uint8_t> c8(64), s8(4), cm(32), sm(2);
    EXPECT_NO_THROW(quantize_row(DType::kInt8, w.data(), 64, c8.data(), s8.data(), "experts.w3", 7));
    EXPECT_NO_THROW(quantize_row(DType::kMxfp4, w.data(), 64, cm.data(), sm.data(), "experts.w3", 7));
  }
}

}  // namespace
}  // namespace moekit
