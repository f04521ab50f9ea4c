// The GEMM's entry points (gemm.h): argument checks, the blocked driver that runs an ISA's
// micro-kernel over B panels (packed on the fly or by PackedWeight, or read in place), the
// in-place weight-row path and the gathered transpose. ISA detection is isa.cpp, the packers
// pack.cpp, the scalar path gemm_scalar.cpp, the micro-kernels isa_*.cpp.
#include "cpu/gemm.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/gemm_kernels.h"
#include "cpu/pack.h"
#include "moekit/error.h"

namespace moekit::cpu {

namespace detail_gemm {

void check_dtype(const char* what, DType t) {
  if (t != DType::kF32 && t != DType::kBF16)
    throw_input_error(what, "kF32 or kBF16", dtype_name(t));
}

Tuning& tuning() {
  static Tuning t;
  return t;
}

}  // namespace detail_gemm

namespace {

using detail_gemm::ASource;
using detail_gemm::b_elem_size;
using detail_gemm::BLayout;
using detail_gemm::BSource;
using detail_gemm::check_dtype;
using detail_gemm::EpiArgs;
using detail_gemm::gemm_scalar;
using detail_gemm::is_pair;
using detail_gemm::k_padded;
using detail_gemm::kernel_for;
using detail_gemm::KernelInfo;
using detail_gemm::load_elem;
using detail_gemm::MicroTile;
using detail_gemm::out_per_panel;
using detail_gemm::pack_a_rows;
using detail_gemm::pack_panel;
using detail_gemm::pack_rows_f32;
using detail_gemm::pack_rows_pairs;
using detail_gemm::source_of;

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
        dst[kk] = round_a ? bf16_round(v) : v;
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
              if (round_w) wv = bf16_round(wv);
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
