// The GEMM's packers (pack.h): B panels in the three layouts of gemm_kernels.h from any strided
// or two-part source, with the kernel table's vector routines for the common cases, and the A
// row buffer. Every packer writes the same bits whichever routine runs.
#include "cpu/pack.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace moekit::cpu::detail_gemm {

namespace {

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

}  // namespace

void pack_panel(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, int64_t panel, int64_t k0, int64_t rows,
                const BSource& src, uint8_t* dst, bool stream) {
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

void pack_rows_f32(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, const float* b,
                   int64_t ldb, int64_t pj0, int64_t pj1, uint8_t* buf, size_t panel_bytes, bool stream) {
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

int64_t pack_rows_pairs(const KernelInfo& ki, bool paired, int64_t n_out, int64_t k, const BSource& src, int64_t pj0,
                        int64_t pj1, uint8_t* buf, size_t panel_bytes, bool stream) {
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
          for (int64_t kk = 0; kk < kc; ++kk) d[kk] = bf16_round(s[kk * cs]);
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
          for (int64_t kk = 0; kk < kc; ++kk) d[kk] = float_to_bf16(s[kk * cs]);
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

}  // namespace moekit::cpu::detail_gemm
