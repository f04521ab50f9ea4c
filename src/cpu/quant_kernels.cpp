// Quantized expert kernels (quant_kernels.h has the math): scalar, AVX2 and, for the AVX-512
// ISA paths on CPUs with AVX512-VNNI, vpdpbusd dots (the activation rounding and the
// dequantization run the AVX2 code on every vector path).
// GCC 12 reports its own intrinsic headers (_mm256/_mm512_undefined_*) as (maybe) uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/quant_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "moekit/error.h"
#include "moekit/quant.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEKIT_HAVE_X86 1
#define MOEKIT_Q256 __attribute__((target("avx2,fma,f16c")))
#define MOEKIT_Q256_INLINE inline __attribute__((always_inline, target("avx2,fma,f16c")))
#endif

namespace moekit::cpu {
namespace {

using moekit::DType;

// The weight levels as int8 per nibble: int4 q = nibble − 8; mxfp4 twice the E2M1 value (so
// that every level is an integer), the factor 1/2 moved into the group scale.
constexpr int8_t kInt4Levels[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
constexpr int8_t kMxfp4Levels[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Where row j of a quantized one-expert view (quant_kernels.h) lies: its codes at
// codes + j·code_bytes and its scales at scales + j·scale_bytes, the sizes quant.h gives for
// the view's format and width.
struct QuantRows {
  const uint8_t* codes;
  const uint8_t* scales;
  int64_t code_bytes, scale_bytes;
  explicit QuantRows(const WeightView& w)
      : codes(static_cast<const uint8_t*>(w.data)),
        scales(static_cast<const uint8_t*>(w.scales)),
        code_bytes(quantized_code_bytes(w.dtype, w.cols)),
        scale_bytes(quantized_scale_bytes(w.dtype, w.cols)) {}
  const uint8_t* codes_of(int64_t j) const { return codes + j * code_bytes; }
  const uint8_t* scales_of(int64_t j) const { return scales + j * scale_bytes; }
};

// The kernels' weight must be quantized: the format picks the code layout read.
void check_quantized(const char* what, const WeightView& w) {
  if (!is_quantized(w.dtype)) throw_input_error(what, "a quantized weight (int8, int4 or mxfp4)", dtype_name(w.dtype));
}

const int8_t* levels_of(DType f) { return f == DType::kInt4 ? kInt4Levels : kMxfp4Levels; }

// The AVX2 path multiplies 4-bit levels as unsigned bytes, level + offset ∈ [0, 24] (int4: the
// nibble itself, offset 8; mxfp4: offset 12), so vpmaddubsw needs no sign fix-up, and removes
// offset · Σ_b (s_b · d_b) · Σ_{c∈b} q_c afterwards (2 · 24 · 127 < 2^15: no saturation).
constexpr uint8_t kMxfp4Unsigned[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
int level_offset(DType f) { return f == DType::kInt4 ? 8 : 12; }

// 2^(e − 128): an E8M0 scale times the 1/2 of the doubled E2M1 levels (exact, subnormal for e < 2).
struct Mxfp4Scales {
  float v[256];
  Mxfp4Scales() {
    for (int e = 0; e < 256; ++e) v[e] = e == 255 ? NAN : std::ldexp(1.0f, e - 128);
  }
};
const Mxfp4Scales& mxfp4_scales() {
  static const Mxfp4Scales t;
  return t;
}

// Group scales of one weight row as floats (int4: fp16 → fp32; mxfp4: table).
void group_scales_scalar(DType f, const uint8_t* s, int64_t groups, float* out) {
  if (f == DType::kInt4) {
    for (int64_t b = 0; b < groups; ++b) {
      uint16_t h;
      std::memcpy(&h, s + 2 * b, 2);
      out[b] = fp16_to_float(h);
    }
  } else {
    const float* t = mxfp4_scales().v;
    for (int64_t b = 0; b < groups; ++b) out[b] = t[s[b]];
  }
}

// --- scalar -----------------------------------------------------------------------------------

float absmax_scalar(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

void quantize_span_scalar(const float* x, int64_t n, float amax, int8_t* q) {
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
}

void quant_dot_scalar(const WeightView& w, int64_t n0, int64_t n1, const int8_t* const* q, const float* const* d,
                      int64_t m, float* out, int64_t ldo) {
  const int64_t k = w.cols, groups = k / kQuantGroup;
  const QuantRows rows(w);
  std::vector<float> ws(static_cast<size_t>(groups));
  std::vector<int8_t> wl(static_cast<size_t>(k));
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* c = rows.codes_of(j);
    const uint8_t* s = rows.scales_of(j);
    if (w.dtype == DType::kInt8) {
      float sw;
      std::memcpy(&sw, s, 4);
      std::fill(ws.begin(), ws.end(), sw);
      std::memcpy(wl.data(), c, static_cast<size_t>(k));
    } else {
      const int8_t* lv = levels_of(w.dtype);
      for (int64_t b = 0; b < groups; ++b)
        for (int64_t t = 0; t < 16; ++t) {
          const uint8_t byte = c[b * 16 + t];
          wl[static_cast<size_t>(b * 32 + t)] = lv[byte & 0x0f];
          wl[static_cast<size_t>(b * 32 + 16 + t)] = lv[byte >> 4];
        }
      group_scales_scalar(w.dtype, s, groups, ws.data());
    }
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int64_t b = 0; b < groups; ++b) {
        int32_t g = 0;
        for (int64_t t = 0; t < 32; ++t) g += int32_t{wl[static_cast<size_t>(b * 32 + t)]} * q[i][b * 32 + t];
        acc += ws[static_cast<size_t>(b)] * d[i][b] * static_cast<float>(g);
      }
      out[i * ldo + (j - n0)] = acc;
    }
  }
}

// --- AVX2 -------------------------------------------------------------------------------------
#ifdef MOEKIT_HAVE_X86

MOEKIT_Q256_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
MOEKIT_Q256_INLINE float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 unsigned levels of one 4-bit group: elements 0–15 from the low nibbles, 16–31 from the
// high; through `lut` (mxfp4) or the nibbles themselves (int4).
template <bool kLut>
MOEKIT_Q256_INLINE __m256i unpack_group(const uint8_t* p, __m256i lut) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m256i n = _mm256_set_m128i(hi, lo);
  if constexpr (kLut) {
    return _mm256_shuffle_epi8(lut, n);
  } else {
    (void)lut;
    return n;
  }
}

MOEKIT_Q256 float absmax_avx2(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  return hmax(m);
}

// n a multiple of 32. cvtps rounds half to even (the default MXCSR), as nearbyint does.
MOEKIT_Q256 void quantize_span_avx2(const float* x, int64_t n, float amax, int8_t* q) {
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m256i order = _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0);
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inv));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), inv));
    const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), inv));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(p, order));
  }
}

// Where a weight row's levels come from.
enum class Levels { kSignedBytes, kUnsignedBytes, kNibbles, kNibblesLut };

template <Levels kL>
MOEKIT_Q256_INLINE __m256i group_levels(const uint8_t* codes, const int8_t* bytes, int64_t b, __m256i lut) {
  if constexpr (kL == Levels::kNibbles || kL == Levels::kNibblesLut) {
    (void)bytes;
    return unpack_group<kL == Levels::kNibblesLut>(codes + 16 * b, lut);
  } else {
    (void)codes;
    (void)lut;
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * b));
  }
}

// 8 int32 partial sums of Σ level·a over a group: signed levels (int8) through |w| and
// a·sign(w) (vpmaddubsw wants one unsigned operand), unsigned ones (4-bit, offset) directly.
template <Levels kL>
MOEKIT_Q256_INLINE __m256i group_dot(__m256i w, __m256i a) {
  if constexpr (kL == Levels::kSignedBytes) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)), _mm256_set1_epi16(1));
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
  }
}

// One weight row against MR activation rows: per group the int32 sum is scaled by
// comb[i·groups + b] = s_b · d_ib and added to fp32 accumulators (two per row, even and odd
// groups, so that two FMA chains are in flight; summed at the end).
// One weight row against MR activation rows: per group the int32 sum is scaled by
// comb[i·groups + b] = s_b · d_ib and added to fp32 accumulators, kAcc per row (groups
// kAcc·p … kAcc·p + kAcc − 1) so that as many FMA chains are in flight (one row, decode, would
// otherwise wait on the FMA latency every group); 16 ymm registers hold 4 × 2 or 2 × 4.
template <int MR, Levels kL>
MOEKIT_Q256 void dot_groups_avx2(const uint8_t* codes, const int8_t* bytes, int64_t groups, __m256i lut,
                                 const float* comb, const int8_t* const* q, float* out) {
  constexpr int kAcc = MR <= 2 ? 4 : 2;
  __m256 acc[MR][kAcc];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < kAcc; ++u) acc[i][u] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + kAcc <= groups; b += kAcc) {
    __m256i w[kAcc];
    for (int u = 0; u < kAcc; ++u) w[u] = group_levels<kL>(codes, bytes, b + u, lut);
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < kAcc; ++u) {
        const __m256i p = group_dot<kL>(w[u], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + 32 * (b + u))));
        acc[i][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(comb + i * groups + b + u), acc[i][u]);
      }
  }
  for (; b < groups; ++b) {
    const __m256i w0 = group_levels<kL>(codes, bytes, b, lut);
    for (int i = 0; i < MR; ++i) {
      const __m256i p0 = group_dot<kL>(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + 32 * b)));
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(comb + i * groups + b), acc[i][0]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    __m256 t = acc[i][0];
    for (int u = 1; u < kAcc; ++u) t = _mm256_add_ps(t, acc[i][u]);
    out[i] = hsum(t);
  }
}

MOEKIT_Q256 void group_scales_avx2(DType f, const uint8_t* s, int64_t groups, float* out) {
  if (f == DType::kInt4 && groups % 8 == 0) {
    for (int64_t b = 0; b < groups; b += 8)
      _mm256_storeu_ps(out + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * b))));
    return;
  }
  if (f == DType::kMxfp4 && groups % 8 == 0) {
    // 2^(e − 128) has the biased exponent e − 1 (e ≥ 1); e = 0 is the subnormal 2^−128. (0xff,
    // NaN, is rejected when the weights are checked.)
    for (int64_t b = 0; b < groups; b += 8) {
      const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + b)));
      const __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
      const __m256i zero = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
      _mm256_storeu_ps(out + b, _mm256_castsi256_ps(_mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00200000), zero)));
    }
    return;
  }
  group_scales_scalar(f, s, groups, out);
}

constexpr int kMr = 4;

template <Levels kL>
MOEKIT_Q256 void dot_groups_rows(int mr, const uint8_t* codes, const int8_t* bytes, int64_t groups, __m256i lut,
                                 const float* comb, const int8_t* const* q, float* out) {
  switch (mr) {
    case 1: dot_groups_avx2<1, kL>(codes, bytes, groups, lut, comb, q, out); break;
    case 2: dot_groups_avx2<2, kL>(codes, bytes, groups, lut, comb, q, out); break;
    case 3: dot_groups_avx2<3, kL>(codes, bytes, groups, lut, comb, q, out); break;
    default: dot_groups_avx2<4, kL>(codes, bytes, groups, lut, comb, q, out); break;
  }
}

MOEKIT_Q256 float dot_floats(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// What both vector paths do around the dots: per activation row and group Σ q (for the offset
// correction), per weight row its group scales and (4-bit, many rows) its unsigned levels, per
// chunk of rows the products s_b · d_ib.
std::vector<float> group_sums(const int8_t* const* q, int64_t m, int64_t groups) {
  std::vector<float> qsum(static_cast<size_t>(m * groups));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < groups; ++b) {
      int32_t t = 0;
      for (int64_t c = 0; c < 32; ++c) t += q[i][32 * b + c];
      qsum[static_cast<size_t>(i * groups + b)] = static_cast<float>(t);
    }
  return qsum;
}

MOEKIT_Q256 void weight_row_scales(DType f, const uint8_t* s, int64_t groups, float* ws) {
  if (f == DType::kInt8) {
    float sw;
    std::memcpy(&sw, s, 4);
    std::fill(ws, ws + groups, sw);
  } else {
    group_scales_avx2(f, s, groups, ws);
  }
}

MOEKIT_Q256 __m256i mxfp4_lut256() {
  alignas(32) uint8_t lv16[32];
  std::memcpy(lv16, kMxfp4Unsigned, 16);
  std::memcpy(lv16 + 16, kMxfp4Unsigned, 16);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(lv16));
}

// A 4-bit row's unsigned levels (level + offset), 32 bytes per group.
MOEKIT_Q256 void unpack_row(DType f, const uint8_t* codes, int64_t groups, void* levels) {
  const __m256i lut = mxfp4_lut256();
  auto* out = static_cast<uint8_t*>(levels);
  for (int64_t b = 0; b < groups; ++b) {
    const __m256i u = f == DType::kMxfp4 ? unpack_group<true>(codes + 16 * b, lut) : unpack_group<false>(codes + 16 * b, lut);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * b), u);
  }
}

MOEKIT_Q256 void chunk_combs(const float* ws, const float* const* d, int mr, int64_t groups, float* comb) {
  for (int i = 0; i < mr; ++i) {
    const float* di = d[i];
    float* ci = comb + i * groups;
    int64_t b = 0;
    for (; b + 8 <= groups; b += 8) _mm256_storeu_ps(ci + b, _mm256_mul_ps(_mm256_loadu_ps(ws + b), _mm256_loadu_ps(di + b)));
    for (; b < groups; ++b) ci[b] = ws[b] * di[b];
  }
}

MOEKIT_Q256 void quant_dot_avx2(const WeightView& w, int64_t n0, int64_t n1, const int8_t* const* q,
                                const float* const* d, int64_t m, float* out, int64_t ldo) {
  const int64_t k = w.cols, groups = k / kQuantGroup;
  const QuantRows rows(w);
  const bool int8 = w.dtype == DType::kInt8;
  const __m256i lut = mxfp4_lut256();
  std::vector<float> comb(static_cast<size_t>(kMr * groups)), ws(static_cast<size_t>(groups));
  const std::vector<float> qsum = int8 ? std::vector<float>() : group_sums(q, m, groups);
  const float offset = int8 ? 0.0f : static_cast<float>(level_offset(w.dtype));
  // 4-bit rows that several activation rows reuse are unpacked once (int8 codes are the levels).
  const bool unpack = !int8 && m > kMr;
  std::vector<int8_t> levels(unpack ? static_cast<size_t>(k) : 0);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* codes = rows.codes_of(j);
    weight_row_scales(w.dtype, rows.scales_of(j), groups, ws.data());
    if (unpack) unpack_row(w.dtype, codes, groups, levels.data());
    const int8_t* bytes = int8 ? reinterpret_cast<const int8_t*>(codes) : levels.data();
    for (int64_t i0 = 0; i0 < m; i0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, m - i0));
      chunk_combs(ws.data(), d + i0, mr, groups, comb.data());
      float sums[kMr];
      if (int8) {
        dot_groups_rows<Levels::kSignedBytes>(mr, codes, bytes, groups, lut, comb.data(), q + i0, sums);
      } else if (unpack) {
        dot_groups_rows<Levels::kUnsignedBytes>(mr, codes, bytes, groups, lut, comb.data(), q + i0, sums);
      } else if (w.dtype == DType::kMxfp4) {
        dot_groups_rows<Levels::kNibblesLut>(mr, codes, bytes, groups, lut, comb.data(), q + i0, sums);
      } else {
        dot_groups_rows<Levels::kNibbles>(mr, codes, bytes, groups, lut, comb.data(), q + i0, sums);
      }
      for (int i = 0; i < mr; ++i) {
        float v = sums[i];
        if (!int8) v -= offset * dot_floats(comb.data() + i * groups, qsum.data() + (i0 + i) * groups, groups);
        out[(i0 + i) * ldo + (j - n0)] = v;
      }
    }
  }
}

// --- AVX-512 VNNI ------------------------------------------------------------------------------
// vpdpbusd multiplies unsigned by signed bytes and adds groups of four into int32 without
// saturating: every format's levels go in as unsigned bytes (level + offset: int8 + 128, int4
// + 8, mxfp4 + 12) and the offset's share, offset · Σ_b (s_b · d_b) · Σ_{c∈b} q_c, is removed
// once per output, as on AVX2. One zmm holds two groups (64 weights).
#define MOEKIT_Q512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define MOEKIT_Q512_INLINE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// The unsigned levels of groups b and b + 1: [b: elements 0–31 | b + 1: elements 0–31].
// 0 int8 (bytes), 1 int4 (nibbles), 2 mxfp4 (nibbles through the table), 3 unsigned levels
// unpacked beforehand.
template <int kFormat>
MOEKIT_Q512_INLINE __m512i pair_levels(const uint8_t* codes, const uint8_t* bytes, int64_t b, __m512i lut) {
  if constexpr (kFormat == 0) {  // int8: the codes + 128, as unsigned bytes
    (void)bytes;
    (void)lut;
    return _mm512_xor_si512(_mm512_loadu_si512(codes + 32 * b), _mm512_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (kFormat == 3) {  // levels unpacked beforehand
    (void)codes;
    (void)lut;
    return _mm512_loadu_si512(bytes + 32 * b);
  } else {
    (void)bytes;
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * b));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    // 128-bit lanes [b lo, b+1 lo, b hi, b+1 hi] → [b lo, b hi, b+1 lo, b+1 hi].
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
    if constexpr (kFormat == 2) z = _mm512_shuffle_epi8(lut, z);
    return z;
  }
}

MOEKIT_Q512_INLINE __m512 pair_scale(const float* comb, int64_t b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(comb + b)), _mm256_broadcast_ss(comb + b + 1), 1);
}

MOEKIT_Q512_INLINE float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// Four accumulators per row (pairs 4p … 4p + 3), so that four FMA chains are in flight: with
// one row (decode) a single chain would wait on the FMA latency every pair.
template <int MR, int kFormat>
MOEKIT_Q512 void dot_pairs_vnni(const uint8_t* codes, const uint8_t* bytes, int64_t groups, __m512i lut,
                                const float* comb, const int8_t* const* q, float* out) {
  constexpr int kAcc = 4;
  __m512 acc[MR][kAcc];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < kAcc; ++u) acc[i][u] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  int64_t b = 0;
  // The scales of four pairs: eight products s_b · d_b in one ymm, each pair's two spread over
  // its 8 + 8 lanes by one permute.
  alignas(64) static constexpr int32_t kSpread[4][16] = {
      {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
      {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7}};
  for (; b + 2 * kAcc <= groups; b += 2 * kAcc) {
    __m512i w[kAcc];
    for (int u = 0; u < kAcc; ++u) w[u] = pair_levels<kFormat>(codes, bytes, b + 2 * u, lut);
    for (int i = 0; i < MR; ++i) {
      const __m512 c8 = _mm512_castps256_ps512(_mm256_loadu_ps(comb + i * groups + b));
      for (int u = 0; u < kAcc; ++u) {
        const __m512i p = _mm512_dpbusd_epi32(zero, w[u], _mm512_loadu_si512(q[i] + 32 * (b + 2 * u)));
        const __m512 sc = _mm512_permutexvar_ps(_mm512_load_si512(kSpread[u]), c8);
        acc[i][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[i][u]);
      }
    }
  }
  for (; b + 1 < groups; b += 2) {
    const __m512i w = pair_levels<kFormat>(codes, bytes, b, lut);
    for (int i = 0; i < MR; ++i) {
      const __m512i p = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(q[i] + 32 * b));
      acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scale(comb + i * groups, b), acc[i][0]);
    }
  }
  float tail[MR] = {};
  if (b < groups) {  // an odd last group, in ymm
    __m256i w;
    if constexpr (kFormat == 0) {
      w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * b)),
                           _mm256_set1_epi8(static_cast<char>(0x80)));
    } else if constexpr (kFormat == 3) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * b));
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * b));
      const __m128i mask = _mm_set1_epi8(0x0f);
      w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
      if constexpr (kFormat == 2) w = _mm256_shuffle_epi8(_mm512_castsi512_si256(lut), w);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + 32 * b)));
      tail[i] = hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(comb[i * groups + b])));
    }
  }
  for (int i = 0; i < MR; ++i)
    out[i] = hsum512(_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]))) + tail[i];
}

template <int kFormat>
MOEKIT_Q512 void dot_pairs_rows(int mr, const uint8_t* codes, const uint8_t* bytes, int64_t groups, __m512i lut,
                                const float* comb, const int8_t* const* q, float* out) {
  switch (mr) {
    case 1: dot_pairs_vnni<1, kFormat>(codes, bytes, groups, lut, comb, q, out); break;
    case 2: dot_pairs_vnni<2, kFormat>(codes, bytes, groups, lut, comb, q, out); break;
    case 3: dot_pairs_vnni<3, kFormat>(codes, bytes, groups, lut, comb, q, out); break;
    default: dot_pairs_vnni<4, kFormat>(codes, bytes, groups, lut, comb, q, out); break;
  }
}

MOEKIT_Q512 void quant_dot_vnni(const WeightView& w, int64_t n0, int64_t n1, const int8_t* const* q,
                                const float* const* d, int64_t m, float* out, int64_t ldo) {
  const int64_t k = w.cols, groups = k / kQuantGroup;
  const QuantRows rows(w);
  const bool int8 = w.dtype == DType::kInt8;
  alignas(64) uint8_t lv64[64];
  for (int r = 0; r < 4; ++r) std::memcpy(lv64 + 16 * r, kMxfp4Unsigned, 16);
  const __m512i lut = _mm512_load_si512(lv64);
  std::vector<float> comb(static_cast<size_t>(kMr * groups)), ws(static_cast<size_t>(groups));
  const std::vector<float> qsum = group_sums(q, m, groups);
  const float offset = int8 ? 128.0f : static_cast<float>(level_offset(w.dtype));
  // 4-bit rows that several activation rows reuse are unpacked once.
  const bool unpack = !int8 && m > kMr;
  std::vector<uint8_t> levels(unpack ? static_cast<size_t>(k) : 0);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* codes = rows.codes_of(j);
    weight_row_scales(w.dtype, rows.scales_of(j), groups, ws.data());
    if (unpack) unpack_row(w.dtype, codes, groups, levels.data());
    for (int64_t i0 = 0; i0 < m; i0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, m - i0));
      chunk_combs(ws.data(), d + i0, mr, groups, comb.data());
      float sums[kMr];
      if (int8) {
        dot_pairs_rows<0>(mr, codes, nullptr, groups, lut, comb.data(), q + i0, sums);
      } else if (unpack) {
        dot_pairs_rows<3>(mr, codes, levels.data(), groups, lut, comb.data(), q + i0, sums);
      } else if (w.dtype == DType::kMxfp4) {
        dot_pairs_rows<2>(mr, codes, nullptr, groups, lut, comb.data(), q + i0, sums);
      } else {
        dot_pairs_rows<1>(mr, codes, nullptr, groups, lut, comb.data(), q + i0, sums);
      }
      for (int i = 0; i < mr; ++i)
        out[(i0 + i) * ldo + (j - n0)] =
            sums[i] - offset * dot_floats(comb.data() + i * groups, qsum.data() + (i0 + i) * groups, groups);
    }
  }
}

bool cpu_has_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return has;
}

MOEKIT_Q256 void dequantize_row_avx2(const WeightView& w, int64_t row, float* out) {
  const int64_t groups = w.cols / kQuantGroup;
  const QuantRows rows(w);
  const uint8_t* codes = rows.codes_of(row);
  const uint8_t* sc = rows.scales_of(row);
  alignas(32) int8_t lv16[32];
  if (w.dtype != DType::kInt8) {
    std::memcpy(lv16, levels_of(w.dtype), 16);
    std::memcpy(lv16 + 16, levels_of(w.dtype), 16);
  }
  const __m256i lut = _mm256_load_si256(reinterpret_cast<const __m256i*>(lv16));
  for (int64_t b = 0; b < groups; ++b) {
    __m256i lv;
    float s;
    if (w.dtype == DType::kInt8) {
      lv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * b));
      std::memcpy(&s, sc, 4);
    } else {
      lv = unpack_group<true>(codes + 16 * b, lut);  // signed levels through the table
      if (w.dtype == DType::kInt4) {
        uint16_t h;
        std::memcpy(&h, sc + 2 * b, 2);
        s = _cvtsh_ss(h);  // F16C: exact, as fp16_to_float
      } else {
        s = mxfp4_scales().v[sc[b]];
      }
    }
    const __m256 sv = _mm256_set1_ps(s);
    const __m128i lo = _mm256_castsi256_si128(lv), hi = _mm256_extracti128_si256(lv, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p)
      _mm256_storeu_ps(out + 32 * b + 8 * p, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[p])), sv));
  }
}

#endif  // MOEKIT_HAVE_X86

bool vector_path(Isa isa) {
#ifdef MOEKIT_HAVE_X86
  return isa != Isa::kScalar;
#else
  (void)isa;
  return false;
#endif
}

}  // namespace

int64_t activation_scales_per_row(moekit::DType, int64_t cols) { return cols / kQuantGroup; }

void quantize_activation_row(Isa isa, moekit::DType, const float* x, int64_t cols, int8_t* q, float* d) {
  const bool vec = vector_path(isa);
  auto absmax = [&](const float* p, int64_t n) {
#ifdef MOEKIT_HAVE_X86
    if (vec) return absmax_avx2(p, n);
#endif
    return absmax_scalar(p, n);
  };
  auto span = [&](const float* p, int64_t n, float amax, int8_t* out) {
#ifdef MOEKIT_HAVE_X86
    if (vec) return quantize_span_avx2(p, n, amax, out);
#endif
    quantize_span_scalar(p, n, amax, out);
  };
  for (int64_t b = 0; b < cols / kQuantGroup; ++b) {
    const float amax = absmax(x + b * kQuantGroup, kQuantGroup);
    d[b] = amax / 127.0f;
    span(x + b * kQuantGroup, kQuantGroup, amax, q + b * kQuantGroup);
  }
}

void quant_dot(Isa isa, const WeightView& w, int64_t n0, int64_t n1, const int8_t* const* q, const float* const* d,
               int64_t m, float* out, int64_t ldo) {
  check_quantized("quant_dot: w.dtype", w);
  if (m <= 0 || n1 <= n0) return;
#ifdef MOEKIT_HAVE_X86
  if (vector_path(isa) && isa >= Isa::kAvx512 && cpu_has_vnni()) return quant_dot_vnni(w, n0, n1, q, d, m, out, ldo);
  if (vector_path(isa)) return quant_dot_avx2(w, n0, n1, q, d, m, out, ldo);
#endif
  quant_dot_scalar(w, n0, n1, q, d, m, out, ldo);
}

void dequantize_weight_row(Isa isa, const WeightView& w, int64_t row, float* out) {
  check_quantized("dequantize_weight_row: w.dtype", w);
#ifdef MOEKIT_HAVE_X86
  if (vector_path(isa)) return dequantize_row_avx2(w, row, out);
#endif
  // The scalar path: the definition itself. (mxfp4: doubled levels times 2^(e−128) equal the
  // E2M1 value times 2^(e−127), both exact.)
  const QuantRows rows(w);
  dequantize_row(w.dtype, rows.codes_of(row), rows.scales_of(row), w.cols, out);
}

}  // namespace moekit::cpu
