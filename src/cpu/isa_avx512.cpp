// AVX-512 micro-kernels (fp32 FMA; bf16 weights widened to fp32; AVX512-BF16 vdpbf16ps) and
// their fused epilogue. Every function carries its own target attribute, so this file builds
// with the baseline x86-64 flags and the code only runs after the entry points' runtime check
// (the ISA asked for is at most detect_isa(): gemm.cpp, packed_weight.cpp).
// Nothing here instantiates a std:: template (no COMDAT copy compiled for AVX-512 can leak to
// the rest of the program).
// GCC 12 reports its own intrinsic headers (_mm512_undefined_*) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#include "gemm_kernels.h"

#define MOEKIT_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")))
#define MOEKIT_T512_INLINE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")))
#define MOEKIT_T512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,f16c")))

namespace moekit::cpu::detail_gemm {
namespace {

// A (bf16 pairs) is read as dwords from buffers written as uint16_t.
typedef int32_t __attribute__((may_alias)) i32_alias;
typedef uint32_t __attribute__((may_alias)) u32_alias;

constexpr int kMr = 14;  // rows per micro-panel: 14 × 2 zmm accumulators = 28 of 32 registers
constexpr int kNr = 32;  // B columns per panel (two zmm)

// ---------------------------------------------------------------------------------------------
// Vector math for the epilogue.

// exp(x), Cephes expf: range reduction by ln 2 in two parts, degree-6 polynomial, scalef.
// About 1 ulp on [-87.3, 88.3]; inputs are clamped to that range (so exp never gives inf).
MOEKIT_T512_INLINE __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// x · sigmoid(s · x) = x / (1 + exp(−s·x))
MOEKIT_T512_INLINE __m512 x_sigmoid512(__m512 x, __m512 sx) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), sx))));
}

// erf(x): rational approximation on [-4, 4] (Eigen's generic_fast_erf_float), |error| < 5e-7.
MOEKIT_T512_INLINE __m512 erf512(__m512 a) {
  const __m512 x = _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.60960333262415e-02f));
  p = _mm512_mul_ps(p, x);
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.42647390514189e-02f));
  return _mm512_div_ps(p, q);
}

MOEKIT_T512_INLINE __m512 act512(Activation act, __m512 x) {
  switch (act) {
    case Activation::kRelu: return _mm512_max_ps(x, _mm512_setzero_ps());
    case Activation::kGelu: {
      // 0.5·x·(1 + tanh(z)) = x·sigmoid(2z), z = sqrt(2/pi)·(x + 0.044715·x³)
      const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      const __m512 z2 = _mm512_mul_ps(_mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x),
                                      _mm512_set1_ps(2.0f * 0.7978845608028654f));
      return x_sigmoid512(x, z2);
    }
    case Activation::kGeluErf: {
      const __m512 h = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
      return _mm512_fmadd_ps(h, erf512(_mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f))), h);
    }
    default: return x;
  }
}

MOEKIT_T512_INLINE __m512 pair512(const EpiArgs& e, __m512 g, __m512 u) {
  if (e.act == Activation::kSiluMul) return _mm512_mul_ps(x_sigmoid512(g, g), u);
  const __m512 lim = _mm512_set1_ps(e.clamp_limit);
  g = _mm512_min_ps(g, lim);
  u = _mm512_min_ps(_mm512_max_ps(u, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
  const __m512 glu = x_sigmoid512(g, _mm512_mul_ps(g, _mm512_set1_ps(e.clamp_alpha)));
  return _mm512_mul_ps(_mm512_add_ps(u, _mm512_set1_ps(1.0f)), glu);
}

// fp32 → bf16, round to nearest even, NaN → quiet NaN (bit-identical to float_to_bf16).
MOEKIT_T512_INLINE __m256i to_bf16_512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

MOEKIT_T512_INLINE __mmask16 lane_mask(int beg, int end) {
  // lanes [beg, end) of 16, clipped
  if (beg < 0) beg = 0;
  if (end > 16) end = 16;
  if (end <= beg) return 0;
  const unsigned hi = end >= 16 ? 0xffffu : ((1u << end) - 1u);
  const unsigned lo = (1u << beg) - 1u;
  return static_cast<__mmask16>(hi & ~lo);
}

// Stores one 16-lane output vector of row `crow`, output columns col .. col + 15 (mask m).
MOEKIT_T512_INLINE void store16(const EpiArgs& e, int64_t crow, int64_t col, __mmask16 m, __m512 v) {
  if (m == 0) return;
  if (e.c_dtype == DType::kF32) {
    float* c = static_cast<float*>(e.c) + crow * e.ldc + col;
    if (e.accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), v);
    _mm512_mask_storeu_ps(c, m, v);
  } else {
    uint16_t* c = static_cast<uint16_t*>(e.c) + crow * e.ldc + col;
    _mm256_mask_storeu_epi16(c, m, to_bf16_512(v));
  }
}

// The epilogue of a finished MR × 32 tile (acc0: lanes 0-15, acc1: lanes 16-31 of the panel).
template <int MR>
MOEKIT_T512_INLINE void finish_tile(const MicroTile& t, const __m512* acc0, const __m512* acc1) {
  const EpiArgs& e = *t.e;
  const bool pair = e.act == Activation::kSiluMul || e.act == Activation::kSiluMulClamped;
  if (pair) {
    const __mmask16 m = lane_mask(t.cbeg, t.cend);
    __m512 bg = _mm512_setzero_ps(), bu = _mm512_setzero_ps();
    if (e.bias) {
      bg = _mm512_maskz_loadu_ps(m, e.bias + t.col0);
      bu = _mm512_maskz_loadu_ps(m, e.bias + e.n + t.col0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512 v = pair512(e, _mm512_add_ps(acc0[r], bg), _mm512_add_ps(acc1[r], bu));
      const int64_t row = t.row0 + r;
      if (e.row_scale) v = _mm512_mul_ps(v, _mm512_set1_ps(e.row_scale[row]));
      store16(e, e.c_rows ? e.c_rows[row] : row, t.col0, m, v);
    }
    return;
  }
  const __mmask16 m0 = lane_mask(t.cbeg, t.cend), m1 = lane_mask(t.cbeg - 16, t.cend - 16);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (e.bias) {
    b0 = _mm512_maskz_loadu_ps(m0, e.bias + t.col0);
    b1 = _mm512_maskz_loadu_ps(m1, e.bias + t.col0 + 16);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    __m512 v0 = _mm512_add_ps(acc0[r], b0), v1 = _mm512_add_ps(acc1[r], b1);
    if (e.act != Activation::kNone) v0 = act512(e.act, v0), v1 = act512(e.act, v1);
    const int64_t row = t.row0 + r;
    if (e.row_scale) {
      const __m512 s = _mm512_set1_ps(e.row_scale[row]);
      v0 = _mm512_mul_ps(v0, s), v1 = _mm512_mul_ps(v1, s);
    }
    const int64_t crow = e.c_rows ? e.c_rows[row] : row;
    store16(e, crow, t.col0, m0, v0);
    store16(e, crow, t.col0 + 16, m1, v1);
  }
}

template <int MR>
MOEKIT_T512_INLINE void start_tile(const MicroTile& t, __m512* acc0, __m512* acc1) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (t.load_part) {
      acc0[r] = _mm512_loadu_ps(t.part + r * kNr);
      acc1[r] = _mm512_loadu_ps(t.part + r * kNr + 16);
    } else {
      acc0[r] = _mm512_setzero_ps();
      acc1[r] = _mm512_setzero_ps();
    }
  }
}

// The stores of a finished tile miss the cache (C is written once; an accumulating store also
// reads it): prefetch the tile's C rows while the K loop runs, so that the lines arrive in the
// meantime. With a short K (a weight gradient over one expert's tokens) this took a K = 128
// GEMM from 77 % to 94 % of the long-K speed in fp32, 66 % to 80 % in bf16 (Zen 5).
template <int MR>
MOEKIT_T512_INLINE void prefetch_c(const MicroTile& t) {
  const EpiArgs& e = *t.e;
  if (!t.finish || e.c_dtype != DType::kF32) return;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const int64_t row = t.row0 + r;
    const float* c = static_cast<const float*>(e.c) + (e.c_rows ? e.c_rows[row] : row) * e.ldc + t.col0;
    _mm_prefetch(reinterpret_cast<const char*>(c), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + 16), _MM_HINT_T0);
  }
}

template <int MR>
MOEKIT_T512_INLINE void end_tile(const MicroTile& t, const __m512* acc0, const __m512* acc1) {
  if (!t.finish) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(t.part + r * kNr, acc0[r]);
      _mm512_storeu_ps(t.part + r * kNr + 16, acc1[r]);
    }
    return;
  }
  finish_tile<MR>(t, acc0, acc1);
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels. Per K step: two B vectors and MR broadcasts of A. The A rows are addressed
// from five base pointers (rows 3j, 3j+1, 3j+2 at base_j + {0, 1, 2}·lda), so the compiler
// folds every row into a base + index addressing mode and nothing spills.

#define MOEKIT_A_BASES(T, a, lda)                                                        \
  const T* a0 = (a);                                                                     \
  const T* a1 = a0 + 3 * (lda);                                                          \
  const T* a2 = a1 + 3 * (lda);                                                          \
  const T* a3 = a2 + 3 * (lda);                                                          \
  const T* a4 = a3 + 3 * (lda);
#define MOEKIT_A_ROWS(ROW, lda)                                                          \
  ROW(0, a0, 0) ROW(1, a0, lda) ROW(2, a0, 2 * lda) ROW(3, a1, 0) ROW(4, a1, lda)        \
  ROW(5, a1, 2 * lda) ROW(6, a2, 0) ROW(7, a2, lda) ROW(8, a2, 2 * lda) ROW(9, a3, 0)    \
  ROW(10, a3, lda) ROW(11, a3, 2 * lda) ROW(12, a4, 0) ROW(13, a4, lda)
#define MOEKIT_A_STEP(n) a0 += (n), a1 += (n), a2 += (n), a3 += (n), a4 += (n)

template <int MR, bool kSplit>
MOEKIT_T512 void micro_f32(const MicroTile& t) {
  __m512 acc0[MR], acc1[MR];
  start_tile<MR>(t, acc0, acc1);
  prefetch_c<MR>(t);
  const int64_t lda = t.lda, kc = t.kc;
  MOEKIT_A_BASES(float, static_cast<const float*>(t.a), lda)
#define MOEKIT_ROW_F32(r, base, off)                                 \
  if constexpr (r < MR) {                                            \
    const __m512 ar = _mm512_set1_ps(base[off]);                     \
    acc0[r] = _mm512_fmadd_ps(ar, b0, acc0[r]);                      \
    acc1[r] = _mm512_fmadd_ps(ar, b1, acc1[r]);                      \
  }
  if constexpr (!kSplit) {
    const float* b = static_cast<const float*>(t.b);
    const int64_t ldb = t.b_step;
    for (int64_t kk = 0; kk < kc; ++kk) {
      const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
      MOEKIT_A_ROWS(MOEKIT_ROW_F32, lda)
      MOEKIT_A_STEP(1);
      b += ldb;
    }
  } else {
    const uint16_t* b = static_cast<const uint16_t*>(t.b);
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t kk = 0; kk < kc; ++kk) {
      const __m512i raw = _mm512_loadu_si512(b);
      const __m512 b0 = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      const __m512 b1 = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
      MOEKIT_A_ROWS(MOEKIT_ROW_F32, lda)
      MOEKIT_A_STEP(1);
      b += kNr;
    }
  }
#undef MOEKIT_ROW_F32
  end_tile<MR>(t, acc0, acc1);
}

// bf16 pairs: per K pair, two B vectors of 16 (k, k+1) pairs and MR broadcast A pairs.
template <int MR>
MOEKIT_T512BF16 void micro_bf16(const MicroTile& t) {
  __m512 acc0[MR], acc1[MR];
  start_tile<MR>(t, acc0, acc1);
  prefetch_c<MR>(t);
  const int64_t lda = t.lda / 2, kp = t.kc / 2;  // in dwords (bf16 pairs)
  MOEKIT_A_BASES(i32_alias, static_cast<const i32_alias*>(t.a), lda)
  const u32_alias* b = static_cast<const u32_alias*>(t.b);
#define MOEKIT_ROW_BF16(r, base, off)                                        \
  if constexpr (r < MR) {                                                   \
    const __m512bh ar = (__m512bh)_mm512_set1_epi32(base[off]);             \
    acc0[r] = _mm512_dpbf16_ps(acc0[r], ar, b0);                            \
    acc1[r] = _mm512_dpbf16_ps(acc1[r], ar, b1);                            \
  }
  for (int64_t kk = 0; kk < kp; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 16);
    MOEKIT_A_ROWS(MOEKIT_ROW_BF16, lda)
    MOEKIT_A_STEP(1);
    b += kNr;
  }
#undef MOEKIT_ROW_BF16
  end_tile<MR>(t, acc0, acc1);
}

// fp32 → bf16 rows for A (identical bits to float_to_bf16).
MOEKIT_T512 void to_bf16_row(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), to_bf16_512(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(dst + i, m, to_bf16_512(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

#define MOEKIT_MR_CASES(F)                                                                   \
  switch (t.mr) {                                                                            \
    case 1: return F<1>(t);  case 2: return F<2>(t);  case 3: return F<3>(t);               \
    case 4: return F<4>(t);  case 5: return F<5>(t);  case 6: return F<6>(t);               \
    case 7: return F<7>(t);  case 8: return F<8>(t);  case 9: return F<9>(t);               \
    case 10: return F<10>(t); case 11: return F<11>(t); case 12: return F<12>(t);           \
    case 13: return F<13>(t); default: return F<14>(t);                                      \
  }

template <int MR> MOEKIT_T512 void micro_f32_plain(const MicroTile& t) { micro_f32<MR, false>(t); }
template <int MR> MOEKIT_T512 void micro_f32_split(const MicroTile& t) { micro_f32<MR, true>(t); }

MOEKIT_T512 void dispatch_f32(const MicroTile& t) { MOEKIT_MR_CASES(micro_f32_plain) }
MOEKIT_T512 void dispatch_split(const MicroTile& t) { MOEKIT_MR_CASES(micro_f32_split) }
MOEKIT_T512BF16 void dispatch_bf16(const MicroTile& t) { MOEKIT_MR_CASES(micro_bf16) }

// ---------------------------------------------------------------------------------------------
// Packing W [n][k] into kF32 panels: 16 × 16 blocks transposed in registers (two rounds of
// in-lane unpacks, two of 128-bit lane shuffles), each column read as one cache line.

MOEKIT_T512_INLINE void transpose16(__m512* r) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane L: rows 4i..4i+3 of column 4L + j
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // r[c]: column c, rows 0..15
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

MOEKIT_T512 void pack_f32_cols(const float* const* col, int64_t k0, int64_t rows, float* dst, bool stream) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int h = 0; h < 2; ++h) {
      __m512 v[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) v[t] = _mm512_loadu_ps(col[16 * h + t] + k0 + r0);
      transpose16(v);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        if (stream) _mm512_stream_ps(dst + (r0 + r) * kNr + 16 * h, v[r]);
        else _mm512_storeu_ps(dst + (r0 + r) * kNr + 16 * h, v[r]);
      }
    }
}

MOEKIT_T512 void pack_pairs_f32_cols(const float* const* col, int64_t k0, int64_t pairs, uint32_t* dst,
                                     bool stream) {
  for (int64_t p0 = 0; p0 < pairs; p0 += 16)
    for (int h = 0; h < 2; ++h) {
      __m512 v[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        const float* c = col[16 * h + t] + k0 + 2 * p0;
        const __m256i lo = to_bf16_512(_mm512_loadu_ps(c)), hi = to_bf16_512(_mm512_loadu_ps(c + 16));
        // 32 bf16 in K order: dword i is the pair (k 2i, k 2i+1), even k in the low half.
        v[t] = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
      }
      transpose16(v);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        float* d = reinterpret_cast<float*>(dst + (p0 + r) * kNr + 16 * h);
        if (stream) _mm512_stream_ps(d, v[r]);
        else _mm512_storeu_ps(d, v[r]);
      }
    }
}

MOEKIT_T512 void pair_rows_f32(const float* r0, const float* r1, uint32_t* dst, bool stream) {
  const __m512i lo = _mm512_cvtepu16_epi32(to_bf16_512(_mm512_loadu_ps(r0)));
  const __m512i hi = r1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_512(_mm512_loadu_ps(r1))), 16)
                        : _mm512_setzero_si512();
  if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_or_si512(lo, hi));
  else _mm512_storeu_si512(dst, _mm512_or_si512(lo, hi));
}

MOEKIT_T512 void pair_rows_bf16(const uint16_t* r0, const uint16_t* r1, uint32_t* dst, bool stream) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
  const __m512i hi =
      r1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1))), 16)
         : _mm512_setzero_si512();
  if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_or_si512(lo, hi));
  else _mm512_storeu_si512(dst, _mm512_or_si512(lo, hi));
}

// Up to 4 A rows × 4 weight rows, 16 k per step (the tail masked), each accumulator reduced
// at the end in a fixed order. R (the A rows) is a template argument so that the 4·R
// accumulators stay in registers; a missing weight row repeats row 0 (its sums are dropped).
// fp32 → the nearest bf16 value, kept in fp32.
MOEKIT_T512_INLINE __m512 round_bf16_512(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_512(v)), 16));
}

template <int R, bool kBf16, bool kRoundW>
MOEKIT_T512_INLINE void dot_rows_t(const float* const* a, const void* const* w_in, int64_t k, float out[4][4]) {
  const void* w[4];
  for (int j = 0; j < 4; ++j) w[j] = w_in[j] ? w_in[j] : w_in[0];
  __m512 acc[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 m = k - kk >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (k - kk)) - 1u);
    __m512 wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if constexpr (kBf16) {
        const __m256i raw = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w[j]) + kk);
        wv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      } else {
        wv[j] = _mm512_maskz_loadu_ps(m, static_cast<const float*>(w[j]) + kk);
        if constexpr (kRoundW) wv[j] = round_bf16_512(wv[j]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_maskz_loadu_ps(m, a[r] + kk);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(av, wv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int R>
MOEKIT_T512_INLINE void dot_rows_r(const float* const* a, const void* const* w, bool w_bf16, bool round_w, int64_t k,
                                   float out[4][4]) {
  if (w_bf16) return dot_rows_t<R, true, false>(a, w, k, out);
  if (round_w) return dot_rows_t<R, false, true>(a, w, k, out);
  return dot_rows_t<R, false, false>(a, w, k, out);
}

MOEKIT_T512 void dot_rows(const float* const* a, int rows, const void* const* w, bool w_bf16, bool round_w, int64_t k,
                          float out[4][4]) {
  switch (rows) {
    case 1: return dot_rows_r<1>(a, w, w_bf16, round_w, k, out);
    case 2: return dot_rows_r<2>(a, w, w_bf16, round_w, k, out);
    case 3: return dot_rows_r<3>(a, w, w_bf16, round_w, k, out);
    default: return dot_rows_r<4>(a, w, w_bf16, round_w, k, out);
  }
}

MOEKIT_T512 void stream_copy32(float* dst, const float* src) {
  _mm512_stream_ps(dst, _mm512_loadu_ps(src));
  _mm512_stream_ps(dst + 16, _mm512_loadu_ps(src + 16));
}
MOEKIT_T512 void stream_fence() { _mm_sfence(); }

MOEKIT_T512 void transpose16_rows(const float* const* rows, const float* scale, int64_t cols, float* dst,
                                  int64_t ld) {
  __m512 s[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) s[r] = _mm512_set1_ps(scale ? scale[r] : 1.0f);
  int64_t c0 = 0;
  for (; c0 + 16 <= cols; c0 += 16) {
    __m512 v[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) v[r] = _mm512_mul_ps(s[r], _mm512_loadu_ps(rows[r] + c0));
    transpose16(v);
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (c0 + c) * ld, v[c]);
  }
  for (int64_t c = c0; c < cols; ++c)
    for (int r = 0; r < 16; ++r) dst[c * ld + r] = (scale ? scale[r] : 1.0f) * rows[r][c];
}

// ---------------------------------------------------------------------------------------------
// SwiGLU rows (activation.h). s = 1 / (1 + exp(−g)); h = (g·s)·u as activation_forward
// multiplies; d_g = ((d_h·u)·s)·(1 + g·(1 − s)), d_u = (d_h·g)·s. The tail runs masked.


MOEKIT_T512_INLINE __m512 sigmoid512(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

MOEKIT_T512 void swiglu_forward_rows(const float* g, const float* u, int64_t n, bool round_bf16, float* h) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, u + j);
    __m512 hv = _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid512(gv)), uv);
    if (round_bf16) hv = round_bf16_512(hv);
    _mm512_mask_storeu_ps(h + j, m, hv);
  }
}

MOEKIT_T512 double swiglu_backward_rows(float* g_io, float* u_io, const float* G, float w, int64_t n,
                                        bool round_bf16, float* h) {
  const __m512 one = _mm512_set1_ps(1.0f), wv = _mm512_set1_ps(w);
  __m512d dot_lo = _mm512_setzero_pd(), dot_hi = _mm512_setzero_pd();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g_io + j), uv = _mm512_maskz_loadu_ps(m, u_io + j);
    const __m512 Gv = _mm512_maskz_loadu_ps(m, G + j);
    const __m512 s = sigmoid512(gv);
    __m512 hv = _mm512_mul_ps(_mm512_mul_ps(gv, s), uv);
    if (round_bf16) hv = round_bf16_512(hv);
    if (h) _mm512_mask_storeu_ps(h + j, m, hv);
    // Σ G·h in double (masked lanes are zero).
    dot_lo = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(Gv)), _mm512_cvtps_pd(_mm512_castps512_ps256(hv)), dot_lo);
    dot_hi = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(Gv), 1))),
                             _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(hv), 1))), dot_hi);
    const __m512 dh = _mm512_mul_ps(wv, Gv);
    const __m512 d_g = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dh, uv), s),
                                     _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, s))));
    const __m512 d_u = _mm512_mul_ps(_mm512_mul_ps(dh, gv), s);
    _mm512_mask_storeu_ps(g_io + j, m, d_g);
    _mm512_mask_storeu_ps(u_io + j, m, d_u);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(dot_lo, dot_hi));
}

}  // namespace

bool swiglu_forward_avx512(const float* g, const float* u, int64_t n, bool round_bf16, float* h) {
  swiglu_forward_rows(g, u, n, round_bf16, h);
  return true;
}

bool swiglu_backward_avx512(float* g_io, float* u_io, const float* G, float w, int64_t n, bool round_bf16,
                            float* h, double* dot) {
  *dot = swiglu_backward_rows(g_io, u_io, G, w, n, round_bf16, h);
  return true;
}

KernelInfo avx512_kernel(DType b_dtype, bool bf16_dot) {
  KernelInfo k;
  k.mr_max = kMr;
  k.nr = kNr;
  k.to_bf16 = &to_bf16_row;
  k.pack_f32_cols = &pack_f32_cols;
  k.pair_rows_f32 = &pair_rows_f32;
  k.pack_pairs_f32_cols = &pack_pairs_f32_cols;
  k.pair_rows_bf16 = &pair_rows_bf16;
  k.stream_copy32 = &stream_copy32;
  k.stream_fence = &stream_fence;
  k.transpose16_rows = &transpose16_rows;
  k.dot_rows = &dot_rows;
  if (b_dtype == DType::kF32) {
    k.micro = &dispatch_f32;
    k.layout = BLayout::kF32;
  } else if (bf16_dot) {
    k.micro = &dispatch_bf16;
    k.layout = BLayout::kBf16Pairs;
    k.a_bf16_pairs = true;
  } else {
    k.micro = &dispatch_split;
    k.layout = BLayout::kBf16Split;
  }
  return k;
}

}  // namespace moekit::cpu::detail_gemm

#else  // not x86: no kernels, gemm.cpp falls back to the scalar path

#include "gemm_kernels.h"

namespace moekit::cpu::detail_gemm {
KernelInfo avx512_kernel(DType, bool) { return {}; }
bool swiglu_forward_avx512(const float*, const float*, int64_t, bool, float*) { return false; }
bool swiglu_backward_avx512(float*, float*, const float*, float, int64_t, bool, float*, double*) { return false; }
}  // namespace moekit::cpu::detail_gemm

#endif
