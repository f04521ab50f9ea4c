// Single-thread GEMM throughput of every moekit path, and oneDNN's and Intel MKL's where they
// were found at configure time (MOEKIT_HAVE_DNNL, MOEKIT_HAVE_MKL). Reports GFLOP/s (counter "FLOPS") and, for the weights,
// bytes streamed per second ("Wbytes").
//
//   moekit_bench_gemm --benchmark_filter='large' --benchmark_min_time=0.5
//
// Names: <path>/<group>/<M>x<N>x<K>; group moe<E>: E experts, M/E rows each, one [N, K]
// weight per expert (C = A_e·W_eᵀ for each expert e; FLOPs 2·M·N·K in all). Paths:
//   f32_packed_<isa>    C = A·Wᵀ, W pre-packed fp32 (PackedWeight) for that ISA
//   f32_general_<isa>   same with W passed as a strided B (Wᵀ view; packed on the fly per call)
//   f32_generalrm_<isa> same with B = Wᵀ stored row-major [k][n] (read in place for M ≤ 64)
//   bf16_packed_<isa>   W pre-packed bf16, A fp32 (rounded to bf16 while packing)
//   swiglu_<dt>_<isa>   paired gate/up weight [2N, K], epilogue silu(g)·u, N outputs
//   cold_<dt>_packed_<isa>  small M only: cycles through 256 MiB of weight copies, so the
//                       weights come from DRAM (Wbytes is then the streaming rate)
//   stream_read         one thread summing 1 GiB: the DRAM read rate (Wbytes) for the cold runs
//   dnnl_sgemm          dnnl_sgemm(A, Wᵀ) (oneDNN's BLAS-like entry)
//   dnnl_matmul_f32     matmul primitive, weights reordered once to the primitive's format
//   dnnl_matmul_bf16    same, bf16 A and W, fp32 C
//   mkl_sgemm           cblas_sgemm(RowMajor, NoTrans, Trans): A [M, K], W [N, K] used as Wᵀ
//   mkl_sgemm_packed    cblas_sgemm_compute with W packed once by cblas_sgemm_pack
//   mkl_sgemm_batch     moe groups: one cblas_sgemm_batch call, one group per expert (the form
//                       uneven expert sizes need)
//   mkl_sgemm_batch_strided  moe groups: one cblas_sgemm_batch_strided call (equal sizes only)
//   mkl_bf16            cblas_gemm_bf16bf16f32: bf16 A and W, fp32 C
//   mkl_bf16_packed     cblas_gemm_bf16bf16f32_compute with W packed once
// In the moe groups every path except the batch calls loops over the experts. Paths ending in
// _2t run on two threads (moekit: the experts' column halves on 2 threads of the process-wide pool; MKL:
// mkl_set_num_threads_local(2)); every other MKL path runs on one thread.
// oneDNN (and MKL's OpenMP layer) run under OpenMP; the program re-executes itself with
// OMP_NUM_THREADS=1 when unset (dnnl_* rows run on OMP_NUM_THREADS threads).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"
#include "cpu/thread_pool.h"

#ifdef MOEKIT_HAVE_DNNL
#include <dnnl.h>
#include <dnnl.hpp>
#endif

#ifdef MOEKIT_HAVE_MKL
#include <mkl.h>
#include <fstream>
#include <set>
#endif

namespace mc = moekit::cpu;

namespace {

struct Shape {
  int64_t m, n, k;
  const char* group;
};

// The shapes of the brief: prefill-sized GEMMs, and the thin per-expert segments of
// fine-grained MoE and decode.
const Shape kShapes[] = {
    {512, 1024, 1024, "large"},  {512, 3584, 1024, "large"},  {512, 1024, 3584, "large"},
    {1024, 1024, 1024, "large"}, {1024, 3584, 1024, "large"}, {1024, 1024, 3584, "large"},
    {1024, 2048, 2048, "large"}, {8, 1024, 3584, "small"},    {16, 1024, 3584, "small"},
    {32, 1024, 3584, "small"},   {64, 1024, 3584, "small"},   {8, 3584, 1024, "small"},
    {64, 3584, 1024, "small"},   {1, 2048, 2048, "small"},    {8, 768, 2048, "small"},
    {64, 768, 2048, "small"},
};

// MoE expert GEMMs: E experts with m rows each (M = E·m in the names).
struct Batch {
  int64_t e, m, n, k;
};
const Batch kBatches[] = {
    {8, 128, 7168, 1024},  // 1024 rows over 8 experts, gate+up of d_ff 3584, d_model 1024
    {64, 128, 768, 1024},  // 8192 rows (1024 tokens, top-8) over 64 experts, d_ff 768 / 2
};

std::string batch_name(const Batch& b) {
  return "moe" + std::to_string(b.e) + "/" + std::to_string(b.e * b.m) + "x" + std::to_string(b.n) + "x" +
         std::to_string(b.k);
}

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

void set_counters(benchmark::State& st, double flops, double wbytes) {
  st.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate,
                                            benchmark::Counter::kIs1000);
  st.counters["Wbytes"] = benchmark::Counter(wbytes, benchmark::Counter::kIsIterationInvariantRate,
                                             benchmark::Counter::kIs1024);
}

enum class Kind { kPacked, kGeneral, kGeneralRowMajor, kSwiglu, kCold };

// Copies of the weight cycled through by the "cold" runs: more bytes than the L3 holds, so
// every call streams its weight from DRAM as in a decode step over many experts.
constexpr double kColdBytes = 256.0 * 1024 * 1024;

void bench_moekit(benchmark::State& st, Shape s, Kind kind, mc::Isa isa, moekit::DType wdt) {
  const bool pair = kind == Kind::kSwiglu;
  const int64_t nb = pair ? 2 * s.n : s.n;
  const auto a = random_vec(static_cast<size_t>(s.m * s.k), 1);
  const auto w = random_vec(static_cast<size_t>(nb * s.k), 2);
  std::vector<uint16_t> wh;
  for (float x : w) wh.push_back(mc::float_to_bf16(x));
  std::vector<float> c(static_cast<size_t>(s.m * s.n));
  mc::GemmProblem p;
  p.m = s.m, p.n = s.n, p.k = s.k;
  p.a = {a.data(), moekit::DType::kF32, s.k, 1, nullptr};
  p.b = {wdt == moekit::DType::kF32 ? static_cast<const void*>(w.data()) : wh.data(), wdt, 1, s.k, nullptr};
  std::vector<float> wt;  // Wᵀ [k][n]: B with contiguous rows
  if (kind == Kind::kGeneralRowMajor) {
    wt.resize(w.size());
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t kk = 0; kk < s.k; ++kk) wt[kk * nb + j] = w[j * s.k + kk];
    p.b = {wt.data(), moekit::DType::kF32, nb, 1, nullptr};
  }
  p.c = c.data();
  p.ldc = s.n;
  if (pair) p.epilogue.activation = mc::Activation::kSiluMul;
  std::vector<mc::PackedWeight> pws;
  const bool general = kind == Kind::kGeneral || kind == Kind::kGeneralRowMajor;
  if (!general) {
    pws.push_back(mc::PackedWeight::pack(w.data(), moekit::DType::kF32, nb, s.k, s.k, wdt, isa, pair));
    if (kind == Kind::kCold)
      while (static_cast<double>(pws.size() * pws[0].bytes()) < kColdBytes)
        pws.push_back(mc::PackedWeight::pack(w.data(), moekit::DType::kF32, nb, s.k, s.k, wdt, isa, pair));
  }
  size_t next = 0;
  for (auto _ : st) {
    if (general) {
      mc::gemm(p, isa, 0, s.m, 0, s.n);
    } else {
      mc::gemm_packed(p, pws[next], 0, s.m, 0, s.n);
      if (++next == pws.size()) next = 0;
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  set_counters(st, 2.0 * s.m * nb * s.k, static_cast<double>(nb * s.k) * (wdt == moekit::DType::kF32 ? 4 : 2));
}

#ifdef MOEKIT_HAVE_DNNL
void bench_dnnl_sgemm(benchmark::State& st, Shape s) {
  const auto a = random_vec(static_cast<size_t>(s.m * s.k), 1);
  const auto w = random_vec(static_cast<size_t>(s.n * s.k), 2);
  std::vector<float> c(static_cast<size_t>(s.m * s.n));
  for (auto _ : st) {
    dnnl_sgemm('N', 'T', s.m, s.n, s.k, 1.0f, a.data(), s.k, w.data(), s.k, 0.0f, c.data(), s.n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  set_counters(st, 2.0 * s.m * s.n * s.k, static_cast<double>(s.n * s.k) * 4);
}

void bench_dnnl_matmul(benchmark::State& st, Shape s, bool bf16) {
  using namespace dnnl;
  engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  const auto dt = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  memory::desc a_md({s.m, s.k}, dt, memory::format_tag::ab);
  memory::desc w_any({s.k, s.n}, dt, memory::format_tag::any);
  memory::desc w_user({s.k, s.n}, memory::data_type::f32, memory::format_tag::ba);  // W [n][k]
  memory::desc c_md({s.m, s.n}, memory::data_type::f32, memory::format_tag::ab);
  matmul::primitive_desc pd(matmul::desc(a_md, w_any, c_md), eng);
  const auto a32 = random_vec(static_cast<size_t>(s.m * s.k), 1);
  auto w32 = random_vec(static_cast<size_t>(s.n * s.k), 2);
  memory a_f32(memory::desc({s.m, s.k}, memory::data_type::f32, memory::format_tag::ab), eng,
               const_cast<float*>(a32.data()));
  memory a_mem(a_md, eng);
  reorder(a_f32, a_mem).execute(strm, a_f32, a_mem);
  memory w_src(w_user, eng, w32.data());
  memory w_mem(pd.weights_desc(), eng);
  reorder(w_src, w_mem).execute(strm, w_src, w_mem);
  memory c_mem(c_md, eng);
  matmul prim(pd);
  strm.wait();
  st.SetLabel(pd.impl_info_str());
  for (auto _ : st) {
    prim.execute(strm, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, w_mem}, {DNNL_ARG_DST, c_mem}});
    strm.wait();
  }
  set_counters(st, 2.0 * s.m * s.n * s.k, static_cast<double>(s.n * s.k) * (bf16 ? 2 : 4));
}
#endif

// Spot check of a batch result against an fp64 dot product of the (rounded, for bf16) inputs:
// guards the yardsticks against a wrong transpose or leading dimension.
bool spot_check(const Batch& b, const std::vector<float>& a, const std::vector<float>& w, const float* c,
                bool bf16) {
  auto rd = [&](float x) { return bf16 ? mc::bf16_to_float(mc::float_to_bf16(x)) : x; };
  std::mt19937 gen(7);
  for (int t = 0; t < 32; ++t) {
    const int64_t x = static_cast<int64_t>(gen() % b.e), i = static_cast<int64_t>(gen() % b.m),
                  j = static_cast<int64_t>(gen() % b.n);
    double ref = 0, mag = 0;
    for (int64_t kk = 0; kk < b.k; ++kk) {
      const double p = double(rd(a[(x * b.m + i) * b.k + kk])) * rd(w[(x * b.n + j) * b.k + kk]);
      ref += p, mag += std::fabs(p);
    }
    if (std::fabs(c[(x * b.m + i) * b.n + j] - ref) > 1e-4 * mag + 1e-6) return false;
  }
  return true;
}

// moekit on a batch: one fp32 or bf16 PackedWeight per expert, gemm_packed per expert; with
// threads > 1 each expert's columns are split into `threads` ranges (multiples of 32) run as
// tasks on the process-wide pool.
void bench_moekit_batch(benchmark::State& st, Batch b, mc::Isa isa, moekit::DType wdt, int threads) {
  const auto a = random_vec(static_cast<size_t>(b.e * b.m * b.k), 1);
  const auto w = random_vec(static_cast<size_t>(b.e * b.n * b.k), 2);
  std::vector<float> c(static_cast<size_t>(b.e * b.m * b.n));
  std::vector<mc::PackedWeight> pws;
  std::vector<mc::GemmProblem> ps(static_cast<size_t>(b.e));
  for (int64_t x = 0; x < b.e; ++x) {
    pws.push_back(mc::PackedWeight::pack(w.data() + x * b.n * b.k, moekit::DType::kF32, b.n, b.k, b.k, wdt, isa));
    auto& p = ps[static_cast<size_t>(x)];
    p.m = b.m, p.n = b.n, p.k = b.k;
    p.a = {a.data() + x * b.m * b.k, moekit::DType::kF32, b.k, 1, nullptr};
    p.c = c.data() + x * b.m * b.n;
    p.ldc = b.n;
  }
  std::vector<int64_t> cols{0};
  for (int h = 1; h <= threads; ++h) cols.push_back(h == threads ? b.n : (b.n * h / threads + 31) / 32 * 32);
  mc::ThreadPool& pool = mc::thread_pool();
  for (auto _ : st) {
    if (threads == 1) {
      for (int64_t x = 0; x < b.e; ++x) mc::gemm_packed(ps[x], pws[x], 0, b.m, 0, b.n);
    } else {
      pool.run(threads, b.e * threads, [&](int64_t t, int) {
        const int64_t x = t / threads, h = t % threads;
        mc::gemm_packed(ps[x], pws[x], 0, b.m, cols[h], cols[h + 1]);
      });
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  if (!spot_check(b, a, w, c.data(), wdt == moekit::DType::kBF16)) st.SkipWithError("wrong result");
  set_counters(st, 2.0 * b.e * b.m * b.n * b.k,
               static_cast<double>(b.e * b.n * b.k) * (wdt == moekit::DType::kF32 ? 4 : 2));
}

#ifdef MOEKIT_HAVE_DNNL
// oneDNN on a batch, one call per expert: dnnl_sgemm, or one matmul primitive (weights
// reordered once per expert to the primitive's format).
void bench_dnnl_batch(benchmark::State& st, Batch b, int kind /* 0 sgemm, 1 matmul f32, 2 matmul bf16 */) {
  using namespace dnnl;
  const auto a = random_vec(static_cast<size_t>(b.e * b.m * b.k), 1);
  const auto w = random_vec(static_cast<size_t>(b.e * b.n * b.k), 2);
  std::vector<float> c(static_cast<size_t>(b.e * b.m * b.n));
  const bool bf16 = kind == 2;
  engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  const auto dt = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  memory::desc a_md({b.m, b.k}, dt, memory::format_tag::ab);
  memory::desc w_any({b.k, b.n}, dt, memory::format_tag::any);
  memory::desc c_md({b.m, b.n}, memory::data_type::f32, memory::format_tag::ab);
  matmul::primitive_desc pd(matmul::desc(a_md, w_any, c_md), eng);
  std::vector<memory> as, ws, cs;
  if (kind != 0) {
    for (int64_t x = 0; x < b.e; ++x) {
      memory a_f32(memory::desc({b.m, b.k}, memory::data_type::f32, memory::format_tag::ab), eng,
                   const_cast<float*>(a.data() + x * b.m * b.k));
      as.emplace_back(a_md, eng);
      reorder(a_f32, as.back()).execute(strm, a_f32, as.back());
      memory w_src(memory::desc({b.k, b.n}, memory::data_type::f32, memory::format_tag::ba), eng,
                   const_cast<float*>(w.data() + x * b.n * b.k));
      ws.emplace_back(pd.weights_desc(), eng);
      reorder(w_src, ws.back()).execute(strm, w_src, ws.back());
      cs.emplace_back(c_md, eng, c.data() + x * b.m * b.n);
    }
    strm.wait();
    st.SetLabel(pd.impl_info_str());
  }
  matmul prim(pd);
  for (auto _ : st) {
    for (int64_t x = 0; x < b.e; ++x) {
      if (kind == 0) {
        dnnl_sgemm('N', 'T', b.m, b.n, b.k, 1.0f, a.data() + x * b.m * b.k, b.k, w.data() + x * b.n * b.k, b.k,
                   0.0f, c.data() + x * b.m * b.n, b.n);
      } else {
        prim.execute(strm, {{DNNL_ARG_SRC, as[x]}, {DNNL_ARG_WEIGHTS, ws[x]}, {DNNL_ARG_DST, cs[x]}});
      }
    }
    strm.wait();
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  if (!spot_check(b, a, w, c.data(), bf16)) st.SkipWithError("wrong result");
  set_counters(st, 2.0 * b.e * b.m * b.n * b.k, static_cast<double>(b.e * b.n * b.k) * (bf16 ? 2 : 4));
}
#endif

#ifdef MOEKIT_HAVE_MKL
enum class MklPath { kSgemm, kSgemmPacked, kSgemmBatch, kSgemmBatchStrided, kBf16, kBf16Packed };

struct MklBuffer {  // mkl_malloc'd, freed on scope exit
  void* p = nullptr;
  explicit MklBuffer(size_t bytes) : p(mkl_malloc(bytes, 64)) {}
  ~MklBuffer() { mkl_free(p); }
  MklBuffer(const MklBuffer&) = delete;
  MklBuffer(MklBuffer&& o) noexcept : p(o.p) { o.p = nullptr; }
};

// Intel MKL on a batch (a single GEMM is a batch of one), row-major, W [n][k] used transposed.
void bench_mkl(benchmark::State& st, Batch b, MklPath path, int threads) {
  mkl_set_num_threads_local(threads);
  const MKL_INT m = static_cast<MKL_INT>(b.m), n = static_cast<MKL_INT>(b.n), k = static_cast<MKL_INT>(b.k);
  const auto a = random_vec(static_cast<size_t>(b.e * b.m * b.k), 1);
  const auto w = random_vec(static_cast<size_t>(b.e * b.n * b.k), 2);
  std::vector<float> c(static_cast<size_t>(b.e * b.m * b.n));
  const bool bf16 = path == MklPath::kBf16 || path == MklPath::kBf16Packed;
  std::vector<MKL_BF16> ah, wh;
  if (bf16) {
    for (float x : a) ah.push_back(mc::float_to_bf16(x));
    for (float x : w) wh.push_back(mc::float_to_bf16(x));
  }
  std::vector<MklBuffer> packed;
  for (int64_t x = 0; x < b.e; ++x) {
    if (path == MklPath::kSgemmPacked) {
      packed.emplace_back(cblas_sgemm_pack_get_size(CblasBMatrix, m, n, k));
      cblas_sgemm_pack(CblasRowMajor, CblasBMatrix, CblasTrans, m, n, k, 1.0f, w.data() + x * b.n * b.k, k,
                       static_cast<float*>(packed.back().p));
    } else if (path == MklPath::kBf16Packed) {
      packed.emplace_back(cblas_gemm_bf16bf16f32_pack_get_size(CblasBMatrix, m, n, k));
      cblas_gemm_bf16bf16f32_pack(CblasRowMajor, CblasBMatrix, CblasTrans, m, n, k, wh.data() + x * b.n * b.k, k,
                                  static_cast<MKL_BF16*>(packed.back().p));
    }
  }
  // cblas_sgemm_batch arguments: one group of one GEMM per expert.
  const size_t ne = static_cast<size_t>(b.e);
  std::vector<CBLAS_TRANSPOSE> ta(ne, CblasNoTrans), tb(ne, CblasTrans);
  std::vector<MKL_INT> ms(ne, m), ns(ne, n), ks(ne, k), lda(ne, k), ldb(ne, k), ldc(ne, n), gs(ne, 1);
  std::vector<float> alpha(ne, 1.0f), beta(ne, 0.0f);
  std::vector<const float*> ap(ne), bp(ne);
  std::vector<float*> cp(ne);
  for (size_t x = 0; x < ne; ++x) {
    ap[x] = a.data() + x * b.m * b.k, bp[x] = w.data() + x * b.n * b.k, cp[x] = c.data() + x * b.m * b.n;
  }
  for (auto _ : st) {
    switch (path) {
      case MklPath::kSgemmBatch:
        cblas_sgemm_batch(CblasRowMajor, ta.data(), tb.data(), ms.data(), ns.data(), ks.data(), alpha.data(),
                          ap.data(), lda.data(), bp.data(), ldb.data(), beta.data(), cp.data(), ldc.data(),
                          static_cast<MKL_INT>(ne), gs.data());
        break;
      case MklPath::kSgemmBatchStrided:
        cblas_sgemm_batch_strided(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a.data(), k,
                                  static_cast<MKL_INT>(b.m * b.k), w.data(), k, static_cast<MKL_INT>(b.n * b.k),
                                  0.0f, c.data(), n, static_cast<MKL_INT>(b.m * b.n), static_cast<MKL_INT>(ne));
        break;
      default:
        for (size_t x = 0; x < ne; ++x) {
          switch (path) {
            case MklPath::kSgemm:
              cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, ap[x], k, bp[x], k, 0.0f, cp[x], n);
              break;
            case MklPath::kSgemmPacked:
              cblas_sgemm_compute(CblasRowMajor, CblasNoTrans, CblasPacked, m, n, k, ap[x], k,
                                  static_cast<const float*>(packed[x].p), k, 0.0f, cp[x], n);
              break;
            case MklPath::kBf16:
              cblas_gemm_bf16bf16f32(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f,
                                     ah.data() + x * b.m * b.k, k, wh.data() + x * b.n * b.k, k, 0.0f, cp[x], n);
              break;
            case MklPath::kBf16Packed:
              cblas_gemm_bf16bf16f32_compute(CblasRowMajor, CblasNoTrans, CblasPacked, m, n, k, 1.0f,
                                             ah.data() + x * b.m * b.k, k, static_cast<const MKL_BF16*>(packed[x].p),
                                             k, 0.0f, cp[x], n);
              break;
            default:
              break;
          }
        }
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  mkl_set_num_threads_local(0);
  if (!spot_check(b, a, w, c.data(), bf16)) st.SkipWithError("wrong result");
  set_counters(st, 2.0 * b.e * b.m * b.n * b.k, static_cast<double>(b.e * b.n * b.k) * (bf16 ? 2 : 4));
}

// MKL's version and the libmkl_* objects mapped after a small sgemm and bf16 GEMM (the CPU
// dispatch loads the kernel library of the ISA it chose: libmkl_avx2, _avx512, _avx10, ...).
void mkl_context() {
  char ver[256] = {};
  mkl_get_version_string(ver, sizeof ver);
  benchmark::AddCustomContext("mkl_version", ver);
  // The code branch MKL would pick for conditional numerical reproducibility (MKL_CBWR_AUTO):
  // 4 SSE2, 8 SSE4_2, 10 AVX2, 12 AVX512, 14 AVX512_E1, 15 AVX10, 3 COMPATIBLE.
  benchmark::AddCustomContext("mkl_cbwr_auto_branch", std::to_string(mkl_cbwr_get_auto_branch()));
  benchmark::AddCustomContext("mkl_cbwr", std::to_string(mkl_cbwr_get(MKL_CBWR_ALL)));
  std::vector<float> x(64 * 64, 1.0f), y(64 * 64);
  std::vector<MKL_BF16> h(64 * 64, mc::float_to_bf16(1.0f));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 64, 64, 64, 1.0f, x.data(), 64, x.data(), 64, 0.0f, y.data(), 64);
  cblas_gemm_bf16bf16f32(CblasRowMajor, CblasNoTrans, CblasTrans, 64, 64, 64, 1.0f, h.data(), 64, h.data(), 64, 0.0f,
                         y.data(), 64);
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> libs;
  for (std::string line; std::getline(maps, line);) {
    const auto at = line.find("libmkl_");
    if (at != std::string::npos) libs.insert(line.substr(at));
  }
  std::string all;
  for (const auto& l : libs) all += (all.empty() ? "" : " ") + l;
  benchmark::AddCustomContext("mkl_libs", all);
}
#endif

// The yardstick for the cold runs: one thread reading 1 GiB (64-bit adds, vectorised by the
// compiler), in bytes per second.
void bench_stream_read(benchmark::State& st) {
  const size_t n = size_t{1} << 27;  // 1 GiB of uint64_t
  std::vector<uint64_t> v(n, 1);
  for (auto _ : st) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n; i += 4) s0 += v[i], s1 += v[i + 1], s2 += v[i + 2], s3 += v[i + 3];
    benchmark::DoNotOptimize(s0 + s1 + s2 + s3);
  }
  st.counters["FLOPS"] = 0;
  st.counters["Wbytes"] = benchmark::Counter(static_cast<double>(n * 8), benchmark::Counter::kIsIterationInvariantRate,
                                             benchmark::Counter::kIs1024);
}

std::string shape_name(const Shape& s) {
  return std::string(s.group) + "/" + std::to_string(s.m) + "x" + std::to_string(s.n) + "x" + std::to_string(s.k);
}

}  // namespace

int main(int argc, char** argv) {
#ifdef MOEKIT_HAVE_DNNL
  if (std::getenv("OMP_NUM_THREADS") == nullptr) {  // oneDNN must run single-threaded too
    setenv("OMP_NUM_THREADS", "1", 1);
    execv("/proc/self/exe", argv);
  }
#endif
  // Optional blocking overrides for tuning experiments.
  auto& tu = mc::detail_gemm::tuning();
  if (const char* v = std::getenv("MOEKIT_GEMM_KC")) tu.kc = std::atoll(v);
  if (const char* v = std::getenv("MOEKIT_GEMM_MC")) tu.mc = std::atoll(v);
  if (const char* v = std::getenv("MOEKIT_GEMM_NCP")) tu.nc_panels = std::atoll(v);
  if (const char* v = std::getenv("MOEKIT_GEMM_SMALLM")) tu.small_m = std::atoll(v);
  if (const char* v = std::getenv("MOEKIT_GEMM_BROWS")) tu.b_in_place_rows = std::atoll(v);

  benchmark::RegisterBenchmark("stream_read/cold/1GiB", bench_stream_read);
  const auto isas = mc::supported_isas();
  for (const Shape& s : kShapes) {
    const std::string sn = shape_name(s);
    for (mc::Isa isa : isas) {
      if (isa == mc::Isa::kScalar && s.m > 64) continue;  // minutes per call
      const std::string in = mc::isa_name(isa);
      benchmark::RegisterBenchmark(("f32_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kPacked, isa,
                                   moekit::DType::kF32);
      if (isa == mc::Isa::kScalar) continue;
      benchmark::RegisterBenchmark(("bf16_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kPacked, isa,
                                   moekit::DType::kBF16);
      if (s.m <= 64) {
        benchmark::RegisterBenchmark(("cold_f32_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kCold,
                                     isa, moekit::DType::kF32);
        benchmark::RegisterBenchmark(("cold_bf16_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kCold,
                                     isa, moekit::DType::kBF16);
      }
      if (isa != mc::detect_isa()) continue;
      benchmark::RegisterBenchmark(("f32_general_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kGeneral, isa,
                                   moekit::DType::kF32);
      benchmark::RegisterBenchmark(("f32_generalrm_" + in + "/" + sn).c_str(), bench_moekit, s,
                                   Kind::kGeneralRowMajor, isa, moekit::DType::kF32);
      benchmark::RegisterBenchmark(("swiglu_f32_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kSwiglu, isa,
                                   moekit::DType::kF32);
      benchmark::RegisterBenchmark(("swiglu_bf16_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kSwiglu, isa,
                                   moekit::DType::kBF16);
    }
#ifdef MOEKIT_HAVE_DNNL
    benchmark::RegisterBenchmark(("dnnl_sgemm/" + sn).c_str(), bench_dnnl_sgemm, s);
    benchmark::RegisterBenchmark(("dnnl_matmul_f32/" + sn).c_str(), bench_dnnl_matmul, s, false);
    benchmark::RegisterBenchmark(("dnnl_matmul_bf16/" + sn).c_str(), bench_dnnl_matmul, s, true);
#endif
#ifdef MOEKIT_HAVE_MKL
    {
      const Batch one{1, s.m, s.n, s.k};
      benchmark::RegisterBenchmark(("mkl_sgemm/" + sn).c_str(), bench_mkl, one, MklPath::kSgemm, 1);
      benchmark::RegisterBenchmark(("mkl_sgemm_packed/" + sn).c_str(), bench_mkl, one, MklPath::kSgemmPacked, 1);
      benchmark::RegisterBenchmark(("mkl_bf16/" + sn).c_str(), bench_mkl, one, MklPath::kBf16, 1);
      benchmark::RegisterBenchmark(("mkl_bf16_packed/" + sn).c_str(), bench_mkl, one, MklPath::kBf16Packed, 1);
      benchmark::RegisterBenchmark(("mkl_sgemm_2t/" + sn).c_str(), bench_mkl, one, MklPath::kSgemm, 2);
      benchmark::RegisterBenchmark(("mkl_sgemm_packed_2t/" + sn).c_str(), bench_mkl, one, MklPath::kSgemmPacked, 2);
      benchmark::RegisterBenchmark(("mkl_bf16_2t/" + sn).c_str(), bench_mkl, one, MklPath::kBf16, 2);
      benchmark::RegisterBenchmark(("mkl_bf16_packed_2t/" + sn).c_str(), bench_mkl, one, MklPath::kBf16Packed, 2);
    }
#endif
    {
      const Batch one{1, s.m, s.n, s.k};
      const std::string in = mc::isa_name(mc::detect_isa());
      benchmark::RegisterBenchmark(("f32_packed_" + in + "_2t/" + sn).c_str(), bench_moekit_batch, one,
                                   mc::detect_isa(), moekit::DType::kF32, 2);
      benchmark::RegisterBenchmark(("bf16_packed_" + in + "_2t/" + sn).c_str(), bench_moekit_batch, one,
                                   mc::detect_isa(), moekit::DType::kBF16, 2);
    }
  }
  for (const Batch& b : kBatches) {
    const std::string bn = batch_name(b);
    const mc::Isa isa = mc::detect_isa();
    const std::string in = mc::isa_name(isa);
    for (int t : {1, 2}) {
      const std::string ts = t == 1 ? "" : "_2t";
      benchmark::RegisterBenchmark(("f32_packed_" + in + ts + "/" + bn).c_str(), bench_moekit_batch, b, isa,
                                   moekit::DType::kF32, t);
      benchmark::RegisterBenchmark(("bf16_packed_" + in + ts + "/" + bn).c_str(), bench_moekit_batch, b, isa,
                                   moekit::DType::kBF16, t);
#ifdef MOEKIT_HAVE_MKL
      benchmark::RegisterBenchmark(("mkl_sgemm" + ts + "/" + bn).c_str(), bench_mkl, b, MklPath::kSgemm, t);
      benchmark::RegisterBenchmark(("mkl_sgemm_packed" + ts + "/" + bn).c_str(), bench_mkl, b, MklPath::kSgemmPacked, t);
      benchmark::RegisterBenchmark(("mkl_sgemm_batch" + ts + "/" + bn).c_str(), bench_mkl, b, MklPath::kSgemmBatch, t);
      benchmark::RegisterBenchmark(("mkl_sgemm_batch_strided" + ts + "/" + bn).c_str(), bench_mkl, b,
                                   MklPath::kSgemmBatchStrided, t);
      benchmark::RegisterBenchmark(("mkl_bf16" + ts + "/" + bn).c_str(), bench_mkl, b, MklPath::kBf16, t);
      benchmark::RegisterBenchmark(("mkl_bf16_packed" + ts + "/" + bn).c_str(), bench_mkl, b, MklPath::kBf16Packed, t);
#endif
    }
#ifdef MOEKIT_HAVE_DNNL
    benchmark::RegisterBenchmark(("dnnl_sgemm/" + bn).c_str(), bench_dnnl_batch, b, 0);
    benchmark::RegisterBenchmark(("dnnl_matmul_f32/" + bn).c_str(), bench_dnnl_batch, b, 1);
    benchmark::RegisterBenchmark(("dnnl_matmul_bf16/" + bn).c_str(), bench_dnnl_batch, b, 2);
#endif
  }
#ifdef MOEKIT_HAVE_MKL
  mkl_set_num_threads(1);
  mkl_context();
#endif
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
