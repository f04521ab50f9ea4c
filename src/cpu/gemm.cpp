// GEMM front end: ISA detection, argument checks, the scalar path, weight packing and the
// dispatch to the ISA kernels (gemm_kernels.h, isa_*.cpp).
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#include "gemm_kernels.h"
#include "moekit/error.h"

namespace moekit::cpu {

// ---------------------------------------------------------------------------------------------
// ISA detection

namespace {

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() {
  // libgcc's cpu model checks XCR0 (the OS saves zmm state) before reporting avx512*.
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
void cpu_init() { __builtin_cpu_init(); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512bf16() { return false; }
void cpu_init() {}
#endif

Isa parse_isa(const std::string& s) {
  if (s == "scalar") return Isa::kScalar;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") return Isa::kAvx512;
  if (s == "avx512bf16") return Isa::kAvx512Bf16;
  throw_input_error("MOEKIT_ISA", "one of scalar|avx2|avx512|avx512bf16", s);
}

}  // namespace

Isa detect_isa() {
  static const Isa best = [] {
    cpu_init();  // safe even when called from another static initialiser
    if (cpu_has_avx512bf16()) return Isa::kAvx512Bf16;
    if (cpu_has_avx512()) return Isa::kAvx512;
    if (cpu_has_avx2()) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return best;
}

Isa active_isa() {
  const Isa best = detect_isa();
  const char* env = std::getenv("MOEKIT_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa want = parse_isa(env);
  if (static_cast<int>(want) > static_cast<int>(best))
    throw_input_error("MOEKIT_ISA", std::string("at most ") + isa_name(best) +
                                        " (what this CPU and build support)",
                      env);
  return want;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (int i = 0; i <= static_cast<int>(detect_isa()); ++i) out.push_back(static_cast<Isa>(i));
  return out;
}

// ---------------------------------------------------------------------------------------------
// bf16

namespace {
// fp32 → bf16 bits, round to nearest even (adding 0x7fff plus the kept lsb carries into the
// kept half exactly when the dropped half is above, or at and odd, the midpoint), NaN quieted;
// branch-free, so that the loops using it (bulk conversion, packing) vectorise.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}
inline uint16_t bf16_bits(uint16_t x) { return x; }
}  // namespace

uint16_t float_to_bf16(float x) { return bf16_bits(x); }

float bf16_to_float(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void float_to_bf16_n(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits(src[i]);
}

// ---------------------------------------------------------------------------------------------
// Argument checks

namespace {

bool is_pair(Activation a) { return a == Activation::kSiluMul || a == Activation::kSiluMulClamped; }

void check_dtype(const char* what, DType t) {
  if (t != DType::kF32 && t != DType::kBF16) throw_input_error(what, "kF32 or kBF16", static_cast<int>(t));
}

void check_common(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                  int64_t n_end) {
  if (p.m < 0 || p.n < 0 || p.k < 0)
    throw_input_error("gemm: m, n, k", "non-negative", detail::concat(p.m, ", ", p.n, ", ", p.k));
  if (m_begin < 0 || m_begin > m_end || m_end > p.m)
    throw_input_error("gemm: row range", detail::concat("within [0, ", p.m, "]"),
                      detail::concat("[", m_begin, ", ", m_end, ")"));
  if (n_begin < 0 || n_begin > n_end || n_end > p.n)
    throw_input_error("gemm: column range", detail::concat("within [0, ", p.n, "]"),
                      detail::concat("[", n_begin, ", ", n_end, ")"));
  check_dtype("gemm: a.dtype", p.a.dtype);
  check_dtype("gemm: c_dtype", p.c_dtype);
  if (p.accumulate && p.c_dtype != DType::kF32)
    throw_input_error("gemm: accumulate", "an fp32 C", "a bf16 C");
  if (m_begin == m_end || n_begin == n_end) return;
  if (p.c == nullptr) throw_input_error("gemm: c", "non-null", "null");
  if (p.c_rows == nullptr && p.m > 1 && p.ldc < p.n)
    throw_input_error("gemm: ldc", detail::concat(">= n = ", p.n), p.ldc);
  if (p.k > 0 && p.a.data == nullptr) throw_input_error("gemm: a.data", "non-null", "null");
  const int a = static_cast<int>(p.epilogue.activation);
  if (a < 0 || a > static_cast<int>(Activation::kSiluMulClamped))
    throw_input_error("gemm: epilogue.activation", "a known Activation", a);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Element loads of the scalar paths.

namespace {

double load_elem(const Operand& op, int64_t r, int64_t c) {
  const int64_t row = op.rows ? op.rows[r] : r;
  const int64_t off = row * op.row_stride + c * op.col_stride;
  if (op.dtype == DType::kBF16) return bf16_to_float(static_cast<const uint16_t*>(op.data)[off]);
  return static_cast<const float*>(op.data)[off];
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Scalar path. Row i, column j: acc = ((0 + a0·b0) + a1·b1) + ... in fp32 (separate multiply
// and add; no FMA at the baseline ISA), then the epilogue in fp32.

namespace detail_gemm {

float act_scalar(Activation act, float x) {
  switch (act) {
    case Activation::kRelu: return x > 0.0f ? x : 0.0f;
    case Activation::kGelu: {
      const float c = 0.7978845608028654f;
      return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    case Activation::kGeluErf: return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
    default: return x;
  }
}

float pair_scalar(const Epilogue& e, float g, float u) {
  if (e.activation == Activation::kSiluMul) return g / (1.0f + std::exp(-g)) * u;
  const float lim = e.clamp_limit;
  g = std::min(g, lim);
  u = std::clamp(u, -lim, lim);
  return (u + 1.0f) * (g / (1.0f + std::exp(-e.clamp_alpha * g)));
}

void store_row_scalar(const GemmProblem& p, int64_t i, int64_t n_begin, int64_t n_end,
                      const float* acc, const float* acc_up) {
  const Epilogue& e = p.epilogue;
  const bool pair = is_pair(e.activation);
  const float scale = e.row_scale ? e.row_scale[i] : 1.0f;
  const int64_t crow = p.c_rows ? p.c_rows[i] : i;
  for (int64_t j = n_begin; j < n_end; ++j) {
    float v = acc[j - n_begin];
    if (pair) {
      float u = acc_up[j - n_begin];
      if (e.bias) v += e.bias[j], u += e.bias[p.n + j];
      v = pair_scalar(e, v, u);
    } else {
      if (e.bias) v += e.bias[j];
      v = act_scalar(e.activation, v);
    }
    if (e.row_scale) v *= scale;
    if (p.c_dtype == DType::kF32) {
      float* c = static_cast<float*>(p.c) + crow * p.ldc + j;
      *c = p.accumulate ? *c + v : v;
    } else {
      static_cast<uint16_t*>(p.c)[crow * p.ldc + j] = float_to_bf16(v);
    }
  }
}

}  // namespace detail_gemm

namespace {

// acc[0, len) += a · B(kk, col0 + [0, len)), in order, B row kk of a strided operand.
void axpy_row(float a, const Operand& b, int64_t kk, int64_t col0, int64_t len, float* acc) {
  const int64_t cs = b.col_stride;
  if (b.dtype == DType::kF32) {
    const float* row = static_cast<const float*>(b.data) + kk * b.row_stride + col0 * cs;
    if (cs == 1) {
      for (int64_t j = 0; j < len; ++j) acc[j] += a * row[j];
    } else {
      for (int64_t j = 0; j < len; ++j) acc[j] += a * row[j * cs];
    }
  } else {
    const uint16_t* row = static_cast<const uint16_t*>(b.data) + kk * b.row_stride + col0 * cs;
    for (int64_t j = 0; j < len; ++j) acc[j] += a * bf16_to_float(row[j * cs]);
  }
}

void gemm_scalar(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                 int64_t n_end) {
  const bool pair = is_pair(p.epilogue.activation);
  const bool round_a = p.b.dtype == DType::kBF16 && p.a.dtype == DType::kF32;
  const int64_t len = n_end - n_begin;
  std::vector<float> acc(static_cast<size_t>(len)), acc_up(pair ? static_cast<size_t>(len) : 0);
  for (int64_t i = m_begin; i < m_end; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(acc_up.begin(), acc_up.end(), 0.0f);
    for (int64_t kk = 0; kk < p.k; ++kk) {
      float a = static_cast<float>(load_elem(p.a, i, kk));
      if (round_a) a = bf16_to_float(float_to_bf16(a));
      axpy_row(a, p.b, kk, n_begin, len, acc.data());
      if (pair) axpy_row(a, p.b, kk, n_begin + p.n, len, acc_up.data());
    }
    detail_gemm::store_row_scalar(p, i, n_begin, n_end, acc.data(), acc_up.data());
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Blocked driver for the ISA micro-kernels (see gemm_kernels.h for the layouts).

namespace detail_gemm {

Tuning& tuning() {
  static Tuning t;
  return t;
}

}  // namespace detail_gemm

namespace {

using detail_gemm::BLayout;
using detail_gemm::EpiArgs;
using detail_gemm::KernelInfo;
using detail_gemm::MicroTile;

KernelInfo kernel_for(Isa isa, DType b_dtype) {
  switch (isa) {
    case Isa::kAvx2: return detail_gemm::avx2_kernel(b_dtype);
    case Isa::kAvx512: return detail_gemm::avx512_kernel(b_dtype, false);
    case Isa::kAvx512Bf16: return detail_gemm::avx512_kernel(b_dtype, true);
    default: return {};
  }
}

size_t b_elem_size(const KernelInfo& ki) { return ki.layout == BLayout::kF32 ? 4 : 2; }
int64_t k_padded(const KernelInfo& ki, int64_t k) {
  return ki.layout == BLayout::kBf16Pairs ? (k + 1) / 2 * 2 : k;
}
int64_t out_per_panel(const KernelInfo& ki, bool paired) { return paired ? ki.nr / 2 : ki.nr; }

// 64-byte aligned scratch that only grows; one per thread and purpose.
struct Scratch {
  std::unique_ptr<uint8_t[]> mem;
  size_t cap = 0;
  uint8_t* get(size_t bytes) {
    if (bytes + 64 > cap) {
      cap = bytes + 64 + bytes / 4;
      mem.reset(new uint8_t[cap]);
    }
    const auto addr = reinterpret_cast<uintptr_t>(mem.get());
    return mem.get() + ((64 - addr % 64) % 64);
  }
};
thread_local Scratch t_a, t_b, t_part;

// A strided source of logical B (kk, col): data + kk·rs + col·cs, fp32 or bf16.
struct BSource {
  const void* data;
  DType dtype;
  int64_t rs, cs;
  // Optional second part (Operand::split_*): indices from split_at on read from split_data.
  const void* split_data = nullptr;
  int64_t split_at = 0;
  bool split_rows = false;
  // Element offset (in elements of dtype) of (kk, col) from the base it lies in.
  template <class T>
  const T* at(int64_t kk, int64_t col) const {
    if (split_data != nullptr) {
      if (split_rows && kk >= split_at) return static_cast<const T*>(split_data) + (kk - split_at) * rs + col * cs;
      if (!split_rows && col >= split_at) return static_cast<const T*>(split_data) + kk * rs + (col - split_at) * cs;
    }
    return static_cast<const T*>(data) + kk * rs + col * cs;
  }
};

BSource source_of(const Operand& b) {
  return BSource{b.data, b.dtype, b.row_stride, b.col_stride, b.split_data, b.split_at, b.split_rows};
}

// The kBf16Pairs layout, element (kk, t) at (kk/2)·2·nr + 2t + kk%2, for the two common
// sources, in loops the compiler vectorises: B rows contiguous (a weight used transposed, or
// activations as B) and B columns contiguous along K (W [n][k], the forward's weights). Needs
// every lane's column present and the lanes of each half equally spaced (a whole panel, plain
// or paired); returns false otherwise (the caller's general loop handles it).
template <class T>
bool pack_pairs_fast(const KernelInfo& ki, const T* const* colp, const BSource& src, int64_t k0, int64_t valid,
                     int64_t rows, uint16_t* dst, bool stream) {
  const int nr = ki.nr;
  const int half = nr / 2;
  for (int t = 0; t < nr; ++t) {
    const T* base = t < half ? colp[0] : colp[half];
    if (colp[t] == nullptr || colp[t] != base + (t % half) * src.cs) return false;
  }
  const int64_t pairs_full = valid / 2;
  if (src.cs == 1) {
    for (int64_t p = 0; p < pairs_full; ++p) {
      uint16_t* d = dst + p * 2 * nr;
      const int64_t off0 = (k0 + 2 * p) * src.rs, off1 = off0 + src.rs;
      for (int h = 0; h < 2; ++h) {
        const T* r0 = colp[h * half] + off0;
        const T* r1 = colp[h * half] + off1;
        uint16_t* dh = d + 2 * h * half;
        if constexpr (std::is_same_v<T, float>) {
          if (ki.pair_rows_f32 != nullptr && half == 16) {
            ki.pair_rows_f32(r0, r1, reinterpret_cast<uint32_t*>(dh), stream);
            continue;
          }
        } else {
          if (ki.pair_rows_bf16 != nullptr && half == 16) {
            ki.pair_rows_bf16(r0, r1, reinterpret_cast<uint32_t*>(dh), stream);
            continue;
          }
        }
        for (int t = 0; t < half; ++t) {
          dh[2 * t] = bf16_bits(r0[t]);
          dh[2 * t + 1] = bf16_bits(r1[t]);
        }
      }
    }
  } else if (src.rs == 1) {
    int64_t p0 = 0;
    if constexpr (std::is_same_v<T, uint16_t>) {
      // bf16 W [n][k]: a (k, k+1) pair of a column is one dword, so the layout is a transpose
      // of dwords, 16 × 16 at a time with the fp32 kernel's transpose (bits moved unchanged).
      if (ki.pack_f32_cols != nullptr && k0 % 2 == 0 && nr == 32) {
        const float* cols[32];
        for (int t = 0; t < nr; ++t) cols[t] = reinterpret_cast<const float*>(colp[t] + k0);
        p0 = pairs_full / 16 * 16;
        ki.pack_f32_cols(cols, 0, p0, reinterpret_cast<float*>(dst), stream);
      }
    } else {
      if (ki.pack_pairs_f32_cols != nullptr && nr == 32) {
        p0 = pairs_full / 16 * 16;
        ki.pack_pairs_f32_cols(colp, k0, p0, reinterpret_cast<uint32_t*>(dst), stream);
      }
    }
    for (int t = 0; t < nr; ++t) {
      const T* c = colp[t] + k0;
      uint16_t* d = dst + 2 * t;
      for (int64_t p = p0; p < pairs_full; ++p) {
        d[p * 2 * nr] = bf16_bits(c[2 * p]);
        d[p * 2 * nr + 1] = bf16_bits(c[2 * p + 1]);
      }
    }
  } else {
    return false;
  }
  // An odd last K row (paired with zero) and the zero rows up to `rows`.
  for (int64_t r = 2 * pairs_full; r < rows; ++r) {
    uint16_t* d = dst + (r >> 1) * 2 * nr + (r & 1);
    for (int t = 0; t < nr; ++t) d[2 * t] = r < valid ? bf16_bits(colp[t][(k0 + r) * src.rs]) : uint16_t{0};
  }
  return true;
}

// Writes K rows [k0, k0 + rows) of panel `panel` (rows past k are zero) at dst, in ki's layout.
// Columns are of the logical B (nb wide); a paired panel takes gate columns from [0, n_out) and
// up columns from [n_out, 2·n_out).
template <BLayout kLayout, class T>
void pack_panel_t(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, int64_t panel,
                  int64_t k0, int64_t rows, const BSource& src, uint8_t* dst, bool stream) {
  const int nr = ki.nr, half = nr / 2;
  const T* colp[64];  // column t at colp[t] + kk·rs, or null (zero padding)
  int64_t col_of[64];  // the logical column of lane t
  int pos[64];        // element of lane t within a K row (kBf16Pairs: within the row pair)
  for (int t = 0; t < nr; ++t) {
    int64_t out, col;
    if (paired) {
      out = panel * half + (t % half);
      col = t < half ? out : n_out + out;
    } else {
      out = panel * nr + t;
      col = out;
    }
    colp[t] = out < n_out ? static_cast<const T*>(src.data) + col * src.cs : nullptr;
    col_of[t] = col;
    pos[t] = kLayout == BLayout::kBf16Split ? (t < half ? 2 * t : 2 * (t - half) + 1)
             : kLayout == BLayout::kBf16Pairs ? 2 * t
                                              : t;
  }
  auto conv = [](T v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return bf16_to_float(v);
  };
  auto put = [&](int64_t r, int t, float v) {
    if constexpr (kLayout == BLayout::kF32) {
      reinterpret_cast<float*>(dst)[r * nr + pos[t]] = v;
    } else if constexpr (kLayout == BLayout::kBf16Split) {
      reinterpret_cast<uint16_t*>(dst)[r * nr + pos[t]] = float_to_bf16(v);
    } else {
      reinterpret_cast<uint16_t*>(dst)[(r >> 1) * 2 * nr + pos[t] + (r & 1)] = float_to_bf16(v);
    }
  };
  const int64_t valid = std::max<int64_t>(0, std::min(rows, k - k0));
  if (src.split_data != nullptr) {  // two parts: element by element (a pack at load time)
    for (int64_t r = 0; r < rows; ++r)
      for (int t = 0; t < nr; ++t) put(r, t, r < valid && colp[t] ? conv(*src.at<T>(k0 + r, col_of[t])) : 0.0f);
    return;
  }
  if constexpr (kLayout == BLayout::kBf16Pairs) {
    if (pack_pairs_fast<T>(ki, colp, src, k0, valid, rows, reinterpret_cast<uint16_t*>(dst), stream)) return;
  }
  if constexpr (kLayout == BLayout::kF32 && std::is_same_v<T, float>) {
    // Columns contiguous along K (W [n][k], every lane present): a blocked transpose, 16 K rows
    // (one cache line of each column) at a time, so that reads are whole lines and the writes
    // stay in a 2 KiB block.
    bool all = src.rs == 1;
    for (int t = 0; t < nr && all; ++t) all = colp[t] != nullptr;
    if (all) {
      float* d = reinterpret_cast<float*>(dst);
      int64_t r0 = 0;
      if (ki.pack_f32_cols != nullptr) {
        r0 = valid / 16 * 16;
        ki.pack_f32_cols(colp, k0, r0, d, stream);
      }
      for (; r0 + 16 <= valid; r0 += 16)
        for (int t = 0; t < nr; ++t) {
          const float* c = colp[t] + k0 + r0;
          for (int r = 0; r < 16; ++r) d[(r0 + r) * nr + t] = c[r];
        }
      for (int64_t r = r0; r < rows; ++r)
        for (int t = 0; t < nr; ++t) d[r * nr + t] = r < valid ? colp[t][k0 + r] : 0.0f;
      return;
    }
  }
  if (src.rs == 1) {  // columns contiguous along K (W [n][k]): column by column
    for (int t = 0; t < nr; ++t) {
      const T* cp = colp[t];
      for (int64_t r = 0; r < valid; ++r) put(r, t, cp ? conv(cp[k0 + r]) : 0.0f);
    }
  } else {  // rows contiguous or strided: K row by K row
    for (int64_t r = 0; r < valid; ++r) {
      const int64_t off = (k0 + r) * src.rs;
      for (int t = 0; t < nr; ++t) put(r, t, colp[t] ? conv(colp[t][off]) : 0.0f);
    }
  }
  for (int64_t r = valid; r < rows; ++r)
    for (int t = 0; t < nr; ++t) put(r, t, 0.0f);
}

void pack_panel(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, int64_t panel,
                int64_t k0, int64_t rows, const BSource& src, uint8_t* dst,
                bool stream = false) {
  const bool f = src.dtype == DType::kF32;
  switch (ki.layout) {
    case BLayout::kF32:
      return f ? pack_panel_t<BLayout::kF32, float>(ki, paired, n_out, k, panel, k0, rows, src, dst, stream)
               : pack_panel_t<BLayout::kF32, uint16_t>(ki, paired, n_out, k, panel, k0, rows, src, dst, stream);
    case BLayout::kBf16Split:
      return f ? pack_panel_t<BLayout::kBf16Split, float>(ki, paired, n_out, k, panel, k0, rows, src, dst, stream)
               : pack_panel_t<BLayout::kBf16Split, uint16_t>(ki, paired, n_out, k, panel, k0, rows, src, dst, stream);
    case BLayout::kBf16Pairs:
      return f ? pack_panel_t<BLayout::kBf16Pairs, float>(ki, paired, n_out, k, panel, k0, rows, src, dst, stream)
               : pack_panel_t<BLayout::kBf16Pairs, uint16_t>(ki, paired, n_out, k, panel, k0, rows, src, dst, stream);
  }
}

// fp32 B with contiguous rows into kF32 panels [pj0, pj1): K row by K row (one sequential read
// of each B row segment), each panel row a copy of nr (or two nr/2 for pairs) floats.
void pack_rows_f32(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, const float* b,
                   int64_t ldb, int64_t pj0, int64_t pj1, uint8_t* buf, size_t panel_bytes, bool stream = false) {
  const int64_t nr = ki.nr, half = nr / 2;
  const bool nt = stream && !paired && nr == 32 && ki.stream_copy32 != nullptr &&
                  reinterpret_cast<uintptr_t>(buf) % 64 == 0 && panel_bytes % 64 == 0;
  auto copy = [&](float* d, const float* s, int64_t avail, int64_t len) {
    if (nt && avail >= len) {
      ki.stream_copy32(d, s);
      return;
    }
    const int64_t c = std::clamp<int64_t>(avail, 0, len);
    std::memcpy(d, s, static_cast<size_t>(c) * 4);
    for (int64_t t = c; t < len; ++t) d[t] = 0.0f;
  };
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* row = b + kk * ldb;
    for (int64_t q = pj0; q < pj1; ++q) {
      float* d = reinterpret_cast<float*>(buf + static_cast<size_t>(q - pj0) * panel_bytes) + kk * nr;
      if (!paired) {
        copy(d, row + q * nr, n_out - q * nr, nr);
      } else {
        copy(d, row + q * half, n_out - q * half, half);
        copy(d + half, row + n_out + q * half, n_out - q * half, half);
      }
    }
  }
  if (nt) ki.stream_fence();
}

// B with contiguous rows (fp32 or bf16) into kBf16Pairs panels [pj0, pj1), in the source's row
// order: each pair of K rows is read once, sequentially, and scattered over the panels (a panel
// at a time would read 64 bytes per row with the row stride between them, a quarter of the
// memory bandwidth). Only panels whose lanes all hold columns; returns the first panel not
// packed (the caller packs the rest), or pj0 when the kernel table has no pair routine.
int64_t pack_rows_pairs(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, const BSource& src, int64_t pj0,
                        int64_t pj1, uint8_t* buf, size_t panel_bytes, bool stream = false) {
  const int64_t nr = ki.nr, half = nr / 2;
  const bool f32 = src.dtype == DType::kF32;
  if (half != 16 || (f32 ? ki.pair_rows_f32 == nullptr : ki.pair_rows_bf16 == nullptr)) return pj0;
  const int64_t full = paired ? n_out / half : n_out / nr;  // panels with every lane present
  const int64_t end = std::min(pj1, full);
  if (end <= pj0) return pj0;
  const size_t esz = f32 ? 4 : 2;
  const auto* base = static_cast<const uint8_t*>(src.data);
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const uint8_t* r0 = base + static_cast<size_t>(2 * p * src.rs) * esz;
    const uint8_t* r1 = 2 * p + 1 < k ? r0 + static_cast<size_t>(src.rs) * esz : nullptr;
    for (int64_t q = pj0; q < end; ++q) {
      auto* d = reinterpret_cast<uint32_t*>(buf + static_cast<size_t>(q - pj0) * panel_bytes) + p * nr;
      const int64_t c0 = paired ? q * half : q * nr, c1 = paired ? n_out + q * half : q * nr + half;
      for (int h = 0; h < 2; ++h) {
        const size_t off = static_cast<size_t>(h == 0 ? c0 : c1) * esz;
        if (f32) {
          ki.pair_rows_f32(reinterpret_cast<const float*>(r0 + off),
                           r1 ? reinterpret_cast<const float*>(r1 + off) : nullptr, d + h * half, stream);
        } else {
          ki.pair_rows_bf16(reinterpret_cast<const uint16_t*>(r0 + off),
                            r1 ? reinterpret_cast<const uint16_t*>(r1 + off) : nullptr, d + h * half, stream);
        }
      }
    }
  }
  if (stream && ki.stream_fence) ki.stream_fence();
  return end;
}

// A(i, kk) of a strided operand as float (widened, or rounded to bf16 when `round`).
struct ASource {
  const Operand& a;
  bool round;
  const uint8_t* row_ptr(int64_t i) const {
    const int64_t row = a.rows ? a.rows[i] : i;
    const size_t esz = a.dtype == DType::kF32 ? 4 : 2;
    return static_cast<const uint8_t*>(a.data) + static_cast<size_t>(row * a.row_stride) * esz;
  }
};

inline uint16_t bf16_round_bits(float x) { return float_to_bf16(x); }

// Copies rows [i0, i0 + r) and K [k0, k0 + kc) of A into dst (row i at dst + i·ld elements),
// converted to the kernel's A type; K entries [kc, kc_pad) are zero.
void pack_a_rows(const KernelInfo& ki, const ASource& src, int64_t i0, int64_t r, int64_t k0,
                 int64_t kc, int64_t kc_pad, uint8_t* dst, int64_t ld) {
  const int64_t cs = src.a.col_stride;
  for (int64_t i = 0; i < r; ++i) {
    const uint8_t* rp = src.row_ptr(i0 + i);
    if (!ki.a_bf16_pairs) {
      float* d = reinterpret_cast<float*>(dst) + i * ld;
      if (src.a.dtype == DType::kF32) {
        const float* s = reinterpret_cast<const float*>(rp) + k0 * cs;
        if (src.round) {
          for (int64_t kk = 0; kk < kc; ++kk) d[kk] = bf16_to_float(bf16_round_bits(s[kk * cs]));
        } else if (cs == 1) {
          std::memcpy(d, s, static_cast<size_t>(kc) * 4);
        } else {
          for (int64_t kk = 0; kk < kc; ++kk) d[kk] = s[kk * cs];
        }
      } else {
        const uint16_t* s = reinterpret_cast<const uint16_t*>(rp) + k0 * cs;
        for (int64_t kk = 0; kk < kc; ++kk) d[kk] = bf16_to_float(s[kk * cs]);
      }
      for (int64_t kk = kc; kk < kc_pad; ++kk) d[kk] = 0.0f;
    } else {
      uint16_t* d = reinterpret_cast<uint16_t*>(dst) + i * ld;
      if (src.a.dtype == DType::kF32) {
        const float* s = reinterpret_cast<const float*>(rp) + k0 * cs;
        if (cs == 1 && ki.to_bf16 != nullptr) {
          ki.to_bf16(s, d, kc);
        } else {
          for (int64_t kk = 0; kk < kc; ++kk) d[kk] = bf16_round_bits(s[kk * cs]);
        }
      } else {
        const uint16_t* s = reinterpret_cast<const uint16_t*>(rp) + k0 * cs;
        if (cs == 1)
          std::memcpy(d, s, static_cast<size_t>(kc) * 2);
        else
          for (int64_t kk = 0; kk < kc; ++kk) d[kk] = s[kk * cs];
      }
      for (int64_t kk = kc; kk < kc_pad; ++kk) d[kk] = 0;
    }
  }
}

// A row stride (elements) for the copy buffer: whole cache lines, an odd number of them, so
// that the rows of a micro-panel fall into different L1 sets.
int64_t buffer_ld(int64_t kc_pad, size_t esz) {
  const int64_t per_line = 64 / static_cast<int64_t>(esz);
  int64_t lines = (kc_pad + per_line - 1) / per_line;
  if (lines % 2 == 0) ++lines;
  return lines * per_line;
}

EpiArgs epi_args(const GemmProblem& p) {
  EpiArgs e;
  e.act = p.epilogue.activation;
  e.bias = p.epilogue.bias;
  e.row_scale = p.epilogue.row_scale;
  e.clamp_limit = p.epilogue.clamp_limit;
  e.clamp_alpha = p.epilogue.clamp_alpha;
  e.c = p.c;
  e.c_dtype = p.c_dtype;
  e.ldc = p.ldc;
  e.c_rows = p.c_rows;
  e.accumulate = p.accumulate;
  e.n = p.n;
  return e;
}

// Rows [m_begin, m_end) × panels [pj0, pj1) (clipped to columns [n_begin, n_end)). Panel pj's
// K row kk is at base + (pj − pbase) · panel_stride + kk · krow_bytes, and the kernel steps
// b_step elements per K row (packed panels: nr; B read in place: its row stride).
struct BPanels {
  const uint8_t* base;
  int64_t pbase;
  size_t panel_stride, krow_bytes;
  int64_t b_step;
};

BPanels packed_panels(const KernelInfo& ki, const uint8_t* base, int64_t pbase, size_t panel_bytes) {
  return {base, pbase, panel_bytes, static_cast<size_t>(ki.nr) * b_elem_size(ki), ki.nr};
}

void run_panels(const GemmProblem& p, const KernelInfo& ki, bool paired, bool round_a,
                const BPanels& bp, int64_t m_begin,
                int64_t m_end, int64_t n_begin, int64_t n_end, int64_t pj0, int64_t pj1) {
  const detail_gemm::Tuning& tu = detail_gemm::tuning();
  const bool pairs = ki.layout == BLayout::kBf16Pairs;
  const int64_t K = p.k, out_nr = out_per_panel(ki, paired), mr_max = ki.mr_max;
  int64_t kcb = (m_end - m_begin <= tu.small_m || K <= tu.kc) ? K : tu.kc;
  if (pairs) kcb = (kcb + 1) / 2 * 2;
  if (kcb <= 0) kcb = 1;
  // Row blocks of about tu.mc rows, balanced (no thin last block that streams B for a few rows).
  const int64_t rows = m_end - m_begin;
  const int64_t nblk = std::max<int64_t>(1, (rows + std::max<int64_t>(tu.mc, 1) - 1) / std::max<int64_t>(tu.mc, 1));
  const int64_t mc = std::max<int64_t>(mr_max, ((rows + nblk - 1) / nblk + mr_max - 1) / mr_max * mr_max);
  const size_t esz_a = ki.a_bf16_pairs ? 2 : 4;
  const EpiArgs e = epi_args(p);
  const ASource src{p.a, round_a};
  const int64_t npan = pj1 - pj0;
  // A read in place: contiguous rows, no gather, no conversion, (pairs) even K, and a row
  // stride that does not put all rows of a micro-panel into the same few L1 sets.
  const DType a_kernel_dt = ki.a_bf16_pairs ? DType::kBF16 : DType::kF32;
  const int64_t a_bytes_stride = p.a.row_stride * static_cast<int64_t>(esz_a);
  const bool in_place = tu.a_in_place && p.a.dtype == a_kernel_dt && p.a.col_stride == 1 &&
                        p.a.rows == nullptr && !round_a && (!pairs || K % 2 == 0) &&
                        a_bytes_stride % 64 == 0 && (a_bytes_stride / 64) % 2 == 1;
  const int64_t kc_pad_max = pairs ? (std::min(kcb, K) + 1) / 2 * 2 : std::min(kcb, K);
  const int64_t ld_buf = buffer_ld(kc_pad_max, esz_a);
  uint8_t* abuf = in_place ? nullptr : t_a.get(static_cast<size_t>(mc * ld_buf) * esz_a);
  const bool multi = K > kcb;
  float* part = multi ? reinterpret_cast<float*>(t_part.get(
                            static_cast<size_t>(((mc + mr_max - 1) / mr_max) * npan * mr_max * ki.nr) * 4))
                      : nullptr;
  for (int64_t ic = m_begin; ic < m_end; ic += mc) {
    const int64_t mcur = std::min(mc, m_end - ic);
    const int64_t nmp = (mcur + mr_max - 1) / mr_max;
    const int64_t mp_base = mcur / nmp, mp_extra = mcur % nmp;
    for (int64_t pc = 0;; pc += kcb) {
      const int64_t kc = std::min(kcb, K - pc);
      const int64_t kc_pad = pairs ? (kc + 1) / 2 * 2 : kc;
      const uint8_t* ablock;
      int64_t lda;
      if (in_place) {
        ablock = static_cast<const uint8_t*>(p.a.data) +
                 static_cast<size_t>(ic * p.a.row_stride + pc) * esz_a;
        lda = p.a.row_stride;
      } else {
        pack_a_rows(ki, src, ic, mcur, pc, kc, kc_pad, abuf, ld_buf);
        ablock = abuf;
        lda = ld_buf;
      }
      const bool last = pc + kcb >= K;
      for (int64_t pj = pj0; pj < pj1; ++pj) {
        MicroTile t;
        t.kc = kc_pad;
        t.lda = lda;
        t.b = bp.base + static_cast<size_t>(pj - bp.pbase) * bp.panel_stride +
              static_cast<size_t>(pc) * bp.krow_bytes;
        t.b_step = bp.b_step;
        t.load_part = pc > 0;
        t.finish = last;
        t.e = &e;
        t.col0 = pj * out_nr;
        t.cbeg = static_cast<int>(std::max<int64_t>(n_begin - t.col0, 0));
        t.cend = static_cast<int>(std::min<int64_t>(n_end - t.col0, out_nr));
        // Micro-panels of balanced height (16 rows: 8 + 8, not 14 + 2: a thin micro-panel
        // costs a full pass over the B panel for a few rows).
        for (int64_t q = 0; q < nmp; ++q) {
          const int64_t r0 = q * mp_base + std::min(q, mp_extra);
          t.mr = static_cast<int>(mp_base + (q < mp_extra ? 1 : 0));
          t.a = ablock + static_cast<size_t>(r0 * lda) * esz_a;
          t.part = multi ? part + ((q * npan + (pj - pj0)) * mr_max * ki.nr) : nullptr;
          t.row0 = ic + r0;
          ki.micro(t);
        }
      }
      if (last) break;
    }
  }
}

bool gemm_fast(const GemmProblem& p, Isa isa, int64_t m_begin, int64_t m_end, int64_t n_begin,
               int64_t n_end) {
  const KernelInfo ki = kernel_for(isa, p.b.dtype);
  if (ki.micro == nullptr) return false;
  const bool paired = is_pair(p.epilogue.activation);
  const bool round_a = p.b.dtype == DType::kBF16 && p.a.dtype == DType::kF32;
  const int64_t out_nr = out_per_panel(ki, paired);
  const int64_t pj_lo = n_begin / out_nr, pj_hi = (n_end + out_nr - 1) / out_nr;
  const int64_t kpad = k_padded(ki, p.k);
  const size_t panel_bytes = static_cast<size_t>(kpad * ki.nr) * b_elem_size(ki);
  const Operand& b = p.b;
  int64_t pj_first = pj_lo;
  // Few rows, fp32 B with contiguous rows: the kernel reads B in place (row stride b_step), so
  // the call does not pack K × N of B for a few rows of A. Same kernel, same bits. Only whole
  // panels inside B's n columns; the last partial panel is packed below.
  if (ki.layout == BLayout::kF32 && b.dtype == DType::kF32 && b.col_stride == 1 && !paired &&
      m_end - m_begin <= detail_gemm::tuning().b_in_place_rows) {
    const int64_t full_end = std::min(pj_hi, p.n / ki.nr);
    if (full_end > pj_lo) {
      const BPanels direct{static_cast<const uint8_t*>(b.data), 0, static_cast<size_t>(ki.nr) * 4,
                           static_cast<size_t>(b.row_stride) * 4, b.row_stride};
      run_panels(p, ki, paired, round_a, direct, m_begin, m_end, n_begin, n_end, pj_lo, full_end);
      pj_first = full_end;
    }
  }
  const int64_t ncp = std::max<int64_t>(1, detail_gemm::tuning().nc_panels);
  const bool rows_contiguous = ki.layout == BLayout::kF32 && b.dtype == DType::kF32 && b.col_stride == 1;
  for (int64_t pj = pj_first; pj < pj_hi; pj += ncp) {
    const int64_t pj_end = std::min(pj_hi, pj + ncp);
    uint8_t* buf = t_b.get(panel_bytes * static_cast<size_t>(pj_end - pj));
    if (rows_contiguous) {
      pack_rows_f32(ki, paired, p.n, p.k, static_cast<const float*>(b.data), b.row_stride, pj, pj_end,
                    buf, panel_bytes);
    } else {
      const BSource src = source_of(b);
      const int64_t first = ki.layout == BLayout::kBf16Pairs && b.col_stride == 1
                                ? pack_rows_pairs(ki, paired, p.n, p.k, src, pj, pj_end, buf, panel_bytes)
                                : pj;
      for (int64_t q = first; q < pj_end; ++q) {
        uint8_t* dst = buf + static_cast<size_t>(q - pj) * panel_bytes;
        pack_panel(ki, paired, p.n, p.k, q, 0, kpad, src, dst);
      }
    }
    run_panels(p, ki, paired, round_a, packed_panels(ki, buf, pj, panel_bytes), m_begin, m_end, n_begin,
               n_end, pj, pj_end);
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points

void gemm(const GemmProblem& p, Isa isa, int64_t m_begin, int64_t m_end, int64_t n_begin,
          int64_t n_end) {
  check_common(p, m_begin, m_end, n_begin, n_end);
  check_dtype("gemm: b.dtype", p.b.dtype);
  if (static_cast<int>(isa) > static_cast<int>(detect_isa()))
    throw_input_error("gemm: isa", std::string("at most ") + isa_name(detect_isa()), isa_name(isa));
  if (m_begin == m_end || n_begin == n_end) return;
  if (p.k > 0 && p.b.data == nullptr) throw_input_error("gemm: b.data", "non-null", "null");
  if (p.b.split_data != nullptr)
    throw_input_error("gemm: b.split_data", "null (pack a two-part B with PackedWeight::pack_operand)",
                      "a second part");
  if (isa != Isa::kScalar && gemm_fast(p, isa, m_begin, m_end, n_begin, n_end)) return;
  gemm_scalar(p, m_begin, m_end, n_begin, n_end);
}

PackedWeight PackedWeight::pack(const void* w, DType dtype, int64_t n, int64_t k, int64_t ldw,
                                DType packed_dtype, Isa isa, bool paired) {
  if (n > 1 && ldw < k) throw_input_error("PackedWeight::pack: ldw", detail::concat(">= k = ", k), ldw);
  // W [n][k] row-major is the logical B [k, n] with row stride 1 and column stride ldw.
  Operand b;
  b.data = w;
  b.dtype = dtype;
  b.row_stride = 1;
  b.col_stride = ldw;
  return pack_operand(b, k, n, packed_dtype, isa, paired);
}

size_t PackedWeight::packed_bytes(int64_t k, int64_t n, DType packed_dtype, Isa isa, bool paired) {
  const KernelInfo ki = kernel_for(isa, packed_dtype);
  if (ki.micro == nullptr) return static_cast<size_t>(n * k) * (packed_dtype == DType::kF32 ? 4 : 2);
  const int64_t n_out = paired ? n / 2 : n;
  const int64_t out_nr = out_per_panel(ki, paired);
  const int64_t panels = (n_out + out_nr - 1) / out_nr;
  return static_cast<size_t>(panels * k_padded(ki, k) * ki.nr) * b_elem_size(ki);
}

PackedWeight PackedWeight::pack_operand(const Operand& b, int64_t k, int64_t n, DType packed_dtype, Isa isa,
                                        bool paired) {
  return pack_operand(b, k, n, packed_dtype, isa, paired, nullptr);
}

PackedWeight PackedWeight::pack_operand(const Operand& b, int64_t k, int64_t n, DType packed_dtype, Isa isa,
                                        bool paired, uint8_t* storage) {
  check_dtype("PackedWeight::pack: dtype", b.dtype);
  check_dtype("PackedWeight::pack: packed_dtype", packed_dtype);
  if (n < 0 || k < 0)
    throw_input_error("PackedWeight::pack: n, k", "non-negative", detail::concat(n, ", ", k));
  if (paired && n % 2 != 0) throw_input_error("PackedWeight::pack: n (paired)", "even", n);
  if (n > 0 && k > 0 && b.data == nullptr) throw_input_error("PackedWeight::pack: w", "non-null", "null");
  if (b.rows != nullptr) throw_input_error("PackedWeight::pack_operand: b.rows", "null (no gather of B)", "a row list");
  if (static_cast<int>(isa) > static_cast<int>(detect_isa()))
    throw_input_error("PackedWeight::pack: isa", std::string("at most ") + isa_name(detect_isa()),
                      isa_name(isa));
  PackedWeight out;
  out.n_ = n;
  out.k_ = k;
  out.dtype_ = packed_dtype;
  out.isa_ = isa;
  out.paired_ = paired;
  const BSource src = source_of(b);
  auto bv = [&](int64_t kk, int64_t col) {
    return b.dtype == DType::kF32 ? *src.at<float>(kk, col) : bf16_to_float(*src.at<uint16_t>(kk, col));
  };
  const KernelInfo ki = kernel_for(isa, packed_dtype);
  const int64_t n_out = paired ? n / 2 : n;
  const size_t bytes = packed_bytes(k, n, packed_dtype, isa, paired);
  out.bytes_ = bytes;
  uint8_t* mem = storage;
  if (mem == nullptr) {
    mem = static_cast<uint8_t*>(::operator new(std::max<size_t>(bytes, 64), std::align_val_t(64)));
    out.storage_ = std::shared_ptr<uint8_t>(mem, [](uint8_t* q) { ::operator delete(q, std::align_val_t(64)); });
  } else {
    if (reinterpret_cast<uintptr_t>(mem) % 64 != 0)
      throw_input_error("PackedWeight::pack_operand: storage", "64-byte aligned", "unaligned");
    out.storage_ = std::shared_ptr<uint8_t>(mem, [](uint8_t*) {});  // the caller's memory
  }
  if (ki.micro == nullptr) {  // B [k][n]: the scalar loops run along contiguous B rows
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = 0; j < n; ++j) {
        const float v = bv(kk, j);
        if (packed_dtype == DType::kF32) {
          std::memcpy(mem + (kk * n + j) * 4, &v, 4);
        } else {
          const uint16_t h = float_to_bf16(v);
          std::memcpy(mem + (kk * n + j) * 2, &h, 2);
        }
      }
    return out;
  }
  const int64_t out_nr = out_per_panel(ki, paired);
  const int64_t panels = (n_out + out_nr - 1) / out_nr, kpad = k_padded(ki, k);
  const size_t panel_bytes = static_cast<size_t>(kpad * ki.nr) * b_elem_size(ki);
  // A whole weight larger than the caches is read back later from memory, not from the
  // caches: its lines need not be fetched before they are written (non-temporal stores; the
  // packing of a large weight ran 1.5× faster).
  const bool large = bytes > (size_t{4} << 20);
  const bool one_part = b.split_data == nullptr;
  if (one_part && ki.layout == BLayout::kF32 && b.dtype == DType::kF32 && b.col_stride == 1) {
    pack_rows_f32(ki, paired, n_out, k, static_cast<const float*>(b.data), b.row_stride, 0, panels, mem,
                  panel_bytes, large);
    return out;
  }
  const int64_t first = one_part && ki.layout == BLayout::kBf16Pairs && b.col_stride == 1
                            ? pack_rows_pairs(ki, paired, n_out, k, src, 0, panels, mem, panel_bytes, large)
                            : 0;
  for (int64_t q = first; q < panels; ++q)
    pack_panel(ki, paired, n_out, k, q, 0, kpad, src, mem + static_cast<size_t>(q) * panel_bytes, large);
  if (large && ki.stream_fence) ki.stream_fence();
  return out;
}

void gemm_weight_rows(const GemmProblem& p, const void* w, DType w_dtype, int64_t ldw, Isa isa, int64_t m_begin,
                      int64_t m_end, int64_t n_begin, int64_t n_end, bool round_w) {
  check_common(p, m_begin, m_end, n_begin, n_end);
  check_dtype("gemm_weight_rows: w_dtype", w_dtype);
  if (p.epilogue.activation != Activation::kNone)
    throw_input_error("gemm_weight_rows: epilogue.activation", "kNone", static_cast<int>(p.epilogue.activation));
  if (p.c_dtype != DType::kF32 || p.accumulate)
    throw_input_error("gemm_weight_rows: C", "fp32, not accumulated", p.accumulate ? "accumulate" : "bf16");
  if (p.n > 1 && ldw < p.k) throw_input_error("gemm_weight_rows: ldw", detail::concat(">= k = ", p.k), ldw);
  if (static_cast<int>(isa) > static_cast<int>(detect_isa()))
    throw_input_error("gemm_weight_rows: isa", std::string("at most ") + isa_name(detect_isa()), isa_name(isa));
  if (m_begin == m_end || n_begin == n_end) return;
  if (p.k > 0 && w == nullptr) throw_input_error("gemm_weight_rows: w", "non-null", "null");
  round_w = round_w && w_dtype == DType::kF32;
  const bool round_a = (w_dtype == DType::kBF16 || round_w) && p.a.dtype == DType::kF32;
  const size_t esz = w_dtype == DType::kF32 ? 4 : 2;
  const KernelInfo ki = kernel_for(isa, DType::kF32);
  // A rows as fp32 (rounded to bf16 when W is bf16), 4 at a time.
  std::vector<float> a_rows(static_cast<size_t>(4 * std::max<int64_t>(p.k, 1)));
  for (int64_t i0 = m_begin; i0 < m_end; i0 += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, m_end - i0));
    const float* a[4] = {nullptr, nullptr, nullptr, nullptr};
    for (int r = 0; r < rows; ++r) {
      float* dst = a_rows.data() + r * p.k;
      for (int64_t kk = 0; kk < p.k; ++kk) {
        const float v = static_cast<float>(load_elem(p.a, i0 + r, kk));
        dst[kk] = round_a ? bf16_to_float(float_to_bf16(v)) : v;
      }
      a[r] = dst;
    }
    for (int64_t j0 = n_begin; j0 < n_end; j0 += 4) {
      const void* wr[4] = {nullptr, nullptr, nullptr, nullptr};
      for (int j = 0; j < 4 && j0 + j < n_end; ++j)
        wr[j] = static_cast<const uint8_t*>(w) + static_cast<size_t>((j0 + j) * ldw) * esz;
      float out[4][4] = {};
      if (ki.dot_rows != nullptr) {
        ki.dot_rows(a, rows, wr, w_dtype == DType::kBF16, round_w, p.k, out);
      } else {  // one fp32 chain per element, k in order
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < 4; ++j) {
            if (wr[j] == nullptr) continue;
            float acc = 0;
            for (int64_t kk = 0; kk < p.k; ++kk) {
              float wv = w_dtype == DType::kF32 ? static_cast<const float*>(wr[j])[kk]
                                                : bf16_to_float(static_cast<const uint16_t*>(wr[j])[kk]);
              if (round_w) wv = bf16_to_float(float_to_bf16(wv));
              acc += a[r][kk] * wv;
            }
            out[r][j] = acc;
          }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* c = static_cast<float*>(p.c) + (p.c_rows ? p.c_rows[i] : i) * p.ldc;
        const float scale = p.epilogue.row_scale ? p.epilogue.row_scale[i] : 1.0f;
        for (int j = 0; j < 4 && j0 + j < n_end; ++j) {
          float v = out[r][j] + (p.epilogue.bias ? p.epilogue.bias[j0 + j] : 0.0f);
          if (p.epilogue.row_scale) v *= scale;
          c[j0 + j] = v;
        }
      }
    }
  }
}

void transpose_rows(Isa isa, const float* const* rows, const float* scale, int64_t num_rows, int64_t cols,
                    float* dst, int64_t ld_dst) {
  const KernelInfo ki = kernel_for(isa, DType::kF32);
  int64_t r0 = 0;
  if (ki.transpose16_rows != nullptr)
    for (; r0 + 16 <= num_rows; r0 += 16)
      ki.transpose16_rows(rows + r0, scale ? scale + r0 : nullptr, cols, dst + r0, ld_dst);
  for (int64_t r = r0; r < num_rows; ++r) {
    const float s = scale ? scale[r] : 1.0f;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = s * rows[r][c];
  }
}

void gemm_packed(const GemmProblem& p, const PackedWeight& w, int64_t m_begin, int64_t m_end,
                 int64_t n_begin, int64_t n_end) {
  check_common(p, m_begin, m_end, n_begin, n_end);
  const bool pair = is_pair(p.epilogue.activation);
  if (pair != w.paired())
    throw_input_error("gemm_packed: weight", pair ? "a paired weight for kSiluMul*" : "an unpaired weight",
                      w.paired() ? "paired" : "unpaired");
  if (w.n() != (pair ? 2 * p.n : p.n))
    throw_input_error("gemm_packed: weight n", pair ? 2 * p.n : p.n, w.n());
  if (w.k() != p.k) throw_input_error("gemm_packed: weight k", p.k, w.k());
  if (m_begin == m_end || n_begin == n_end) return;
  const KernelInfo ki = kernel_for(w.isa(), w.dtype());
  if (ki.micro == nullptr) {
    GemmProblem q = p;
    q.b.data = w.data();
    q.b.dtype = w.dtype();
    q.b.row_stride = w.n();
    q.b.col_stride = 1;
    q.b.rows = nullptr;
    gemm_scalar(q, m_begin, m_end, n_begin, n_end);
    return;
  }
  const bool round_a = w.dtype() == DType::kBF16 && p.a.dtype == DType::kF32;
  const int64_t out_nr = out_per_panel(ki, pair);
  const size_t panel_bytes = static_cast<size_t>(k_padded(ki, p.k) * ki.nr) * b_elem_size(ki);
  const int64_t pj_lo = n_begin / out_nr, pj_hi = (n_end + out_nr - 1) / out_nr;
  // One column block: A is copied once per row block and every panel is already packed.
  run_panels(p, ki, pair, round_a, packed_panels(ki, w.data(), 0, panel_bytes), m_begin, m_end, n_begin,
             n_end, pj_lo, pj_hi);
}

}  // namespace moekit::cpu
