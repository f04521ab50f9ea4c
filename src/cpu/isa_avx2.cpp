// AVX2 + FMA micro-kernels (fp32; bf16 weights widened to fp32) and their fused epilogue.
// Same structure as isa_avx512.cpp with 8-lane vectors: 6 rows × 16 columns (12 ymm
// accumulators of 16). Per-function target attributes; no std:: templates instantiated here.
// GCC 12 reports its own intrinsic headers (_mm256_undefined_*) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#include "gemm_kernels.h"

#define MOEKIT_T256 __attribute__((target("avx2,fma,f16c")))
#define MOEKIT_T256_INLINE inline __attribute__((always_inline, target("avx2,fma,f16c")))

namespace moekit::cpu::detail_gemm {
namespace {

constexpr int kMr = 6;
constexpr int kNr = 16;

// exp(x): as exp512 (Cephes expf), 2^n built in the exponent field.
MOEKIT_T256_INLINE __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // n in [-126, 127] after the clamp: 2^n is a normal float.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

MOEKIT_T256_INLINE __m256 x_sigmoid256(__m256 x, __m256 sx) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), sx))));
}

MOEKIT_T256_INLINE __m256 erf256(__m256 a) {
  const __m256 x = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}

MOEKIT_T256_INLINE __m256 act256(Activation act, __m256 x) {
  switch (act) {
    case Activation::kRelu: return _mm256_max_ps(x, _mm256_setzero_ps());
    case Activation::kGelu: {
      const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
      const __m256 z2 = _mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x),
                                      _mm256_set1_ps(2.0f * 0.7978845608028654f));
      return x_sigmoid256(x, z2);
    }
    case Activation::kGeluErf: {
      const __m256 h = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
      return _mm256_fmadd_ps(h, erf256(_mm256_mul_ps(x, _mm256_set1_ps(0.7071067811865476f))), h);
    }
    default: return x;
  }
}

MOEKIT_T256_INLINE __m256 pair256(const EpiArgs& e, __m256 g, __m256 u) {
  if (e.act == Activation::kSiluMul) return _mm256_mul_ps(x_sigmoid256(g, g), u);
  const __m256 lim = _mm256_set1_ps(e.clamp_limit);
  g = _mm256_min_ps(g, lim);
  u = _mm256_min_ps(_mm256_max_ps(u, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
  const __m256 glu = x_sigmoid256(g, _mm256_mul_ps(g, _mm256_set1_ps(e.clamp_alpha)));
  return _mm256_mul_ps(_mm256_add_ps(u, _mm256_set1_ps(1.0f)), glu);
}

MOEKIT_T256_INLINE __m256i lane_mask8(int beg, int end) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i ge = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(beg - 1));
  const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(end), idx);
  return _mm256_and_si256(ge, lt);
}

// One 8-lane output vector of row crow at output column col, lanes [beg, end).
MOEKIT_T256_INLINE void store8(const EpiArgs& e, int64_t crow, int64_t col, int beg, int end, __m256 v) {
  if (beg < 0) beg = 0;
  if (end > 8) end = 8;
  if (end <= beg) return;
  if (e.c_dtype == DType::kF32) {
    float* c = static_cast<float*>(e.c) + crow * e.ldc + col;
    if (beg == 0 && end == 8) {
      if (e.accumulate) v = _mm256_add_ps(_mm256_loadu_ps(c), v);
      _mm256_storeu_ps(c, v);
    } else {
      const __m256i m = lane_mask8(beg, end);
      if (e.accumulate) v = _mm256_add_ps(_mm256_maskload_ps(c, m), v);
      _mm256_maskstore_ps(c, m, v);
    }
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    uint16_t* c = static_cast<uint16_t*>(e.c) + crow * e.ldc + col;
    for (int l = beg; l < end; ++l) c[l] = bf16_bits(tmp[l]);  // bf16.h's rounding
  }
}

MOEKIT_T256_INLINE __m256 load_bias8(const float* b, int beg, int end) {
  if (beg < 0) beg = 0;
  if (end > 8) end = 8;
  if (end <= beg) return _mm256_setzero_ps();
  return _mm256_maskload_ps(b, lane_mask8(beg, end));
}

template <int MR>
MOEKIT_T256_INLINE void finish_tile(const MicroTile& t, const __m256* acc0, const __m256* acc1) {
  const EpiArgs& e = *t.e;
  const bool pair = e.act == Activation::kSiluMul || e.act == Activation::kSiluMulClamped;
  if (pair) {
    __m256 bg = _mm256_setzero_ps(), bu = _mm256_setzero_ps();
    if (e.bias) {
      bg = load_bias8(e.bias + t.col0, t.cbeg, t.cend);
      bu = load_bias8(e.bias + e.n + t.col0, t.cbeg, t.cend);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m256 v = pair256(e, _mm256_add_ps(acc0[r], bg), _mm256_add_ps(acc1[r], bu));
      const int64_t row = t.row0 + r;
      if (e.row_scale) v = _mm256_mul_ps(v, _mm256_set1_ps(e.row_scale[row]));
      store8(e, e.c_rows ? e.c_rows[row] : row, t.col0, t.cbeg, t.cend, v);
    }
    return;
  }
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  if (e.bias) {
    b0 = load_bias8(e.bias + t.col0, t.cbeg, t.cend);
    b1 = load_bias8(e.bias + t.col0 + 8, t.cbeg - 8, t.cend - 8);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    __m256 v0 = _mm256_add_ps(acc0[r], b0), v1 = _mm256_add_ps(acc1[r], b1);
    if (e.act != Activation::kNone) v0 = act256(e.act, v0), v1 = act256(e.act, v1);
    const int64_t row = t.row0 + r;
    if (e.row_scale) {
      const __m256 s = _mm256_set1_ps(e.row_scale[row]);
      v0 = _mm256_mul_ps(v0, s), v1 = _mm256_mul_ps(v1, s);
    }
    const int64_t crow = e.c_rows ? e.c_rows[row] : row;
    store8(e, crow, t.col0, t.cbeg, t.cend, v0);
    store8(e, crow, t.col0 + 8, t.cbeg - 8, t.cend - 8, v1);
  }
}

template <int MR, bool kSplit>
MOEKIT_T256 void micro_f32(const MicroTile& t) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (t.load_part) {
      acc0[r] = _mm256_loadu_ps(t.part + r * kNr);
      acc1[r] = _mm256_loadu_ps(t.part + r * kNr + 8);
    } else {
      acc0[r] = _mm256_setzero_ps();
      acc1[r] = _mm256_setzero_ps();
    }
  }
  const int64_t lda = t.lda, kc = t.kc;
  const float* a0 = static_cast<const float*>(t.a);
  const float* a1 = a0 + 3 * lda;
#define MOEKIT_ROW(r, base, off)                                 \
  if constexpr (r < MR) {                                        \
    const __m256 ar = _mm256_broadcast_ss(base + (off));         \
    acc0[r] = _mm256_fmadd_ps(ar, b0, acc0[r]);                  \
    acc1[r] = _mm256_fmadd_ps(ar, b1, acc1[r]);                  \
  }
#define MOEKIT_ROWS                                                              \
  MOEKIT_ROW(0, a0, 0) MOEKIT_ROW(1, a0, lda) MOEKIT_ROW(2, a0, 2 * lda)         \
  MOEKIT_ROW(3, a1, 0) MOEKIT_ROW(4, a1, lda) MOEKIT_ROW(5, a1, 2 * lda)
  if constexpr (!kSplit) {
    const float* b = static_cast<const float*>(t.b);
    const int64_t ldb = t.b_step;
    for (int64_t kk = 0; kk < kc; ++kk) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      MOEKIT_ROWS
      ++a0, ++a1;
      b += ldb;
    }
  } else {
    const uint16_t* b = static_cast<const uint16_t*>(t.b);
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t kk = 0; kk < kc; ++kk) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      const __m256 b0 = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      const __m256 b1 = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
      MOEKIT_ROWS
      ++a0, ++a1;
      b += kNr;
    }
  }
#undef MOEKIT_ROWS
#undef MOEKIT_ROW
  if (!t.finish) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(t.part + r * kNr, acc0[r]);
      _mm256_storeu_ps(t.part + r * kNr + 8, acc1[r]);
    }
    return;
  }
  finish_tile<MR>(t, acc0, acc1);
}

template <int MR> MOEKIT_T256 void micro_plain(const MicroTile& t) { micro_f32<MR, false>(t); }
template <int MR> MOEKIT_T256 void micro_split(const MicroTile& t) { micro_f32<MR, true>(t); }

#define MOEKIT_MR6_CASES(F)                                                       \
  switch (t.mr) {                                                                 \
    case 1: return F<1>(t); case 2: return F<2>(t); case 3: return F<3>(t);      \
    case 4: return F<4>(t); case 5: return F<5>(t); default: return F<6>(t);      \
  }

MOEKIT_T256 void dispatch_plain(const MicroTile& t) { MOEKIT_MR6_CASES(micro_plain) }
MOEKIT_T256 void dispatch_split(const MicroTile& t) { MOEKIT_MR6_CASES(micro_split) }

}  // namespace

KernelInfo avx2_kernel(DType b_dtype) {
  KernelInfo k;
  k.mr_max = kMr;
  k.nr = kNr;
  if (b_dtype == DType::kF32) {
    k.micro = &dispatch_plain;
    k.layout = BLayout::kF32;
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
KernelInfo avx2_kernel(DType) { return {}; }
}  // namespace moekit::cpu::detail_gemm

#endif
