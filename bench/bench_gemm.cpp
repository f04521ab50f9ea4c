// Single-thread GEMM throughput of every moekit path, and oneDNN's where it was found at
// configure time (MOEKIT_HAVE_DNNL). Reports GFLOP/s (counter "FLOPS") and, for the weights,
// bytes streamed per second ("Wbytes").
//
//   moekit_bench_gemm --benchmark_filter='large' --benchmark_min_time=0.5
//
// Names: <path>/<M>x<N>x<K>. Paths:
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
// oneDNN runs under OpenMP; the program re-executes itself with OMP_NUM_THREADS=1 when unset.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"

#ifdef MOEKIT_HAVE_DNNL
#include <dnnl.h>
#include <dnnl.hpp>
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

void bench_moekit(benchmark::State& st, Shape s, Kind kind, mc::Isa isa, mc::DType wdt) {
  const bool pair = kind == Kind::kSwiglu;
  const int64_t nb = pair ? 2 * s.n : s.n;
  const auto a = random_vec(static_cast<size_t>(s.m * s.k), 1);
  const auto w = random_vec(static_cast<size_t>(nb * s.k), 2);
  std::vector<uint16_t> wh;
  for (float x : w) wh.push_back(mc::float_to_bf16(x));
  std::vector<float> c(static_cast<size_t>(s.m * s.n));
  mc::GemmProblem p;
  p.m = s.m, p.n = s.n, p.k = s.k;
  p.a = {a.data(), mc::DType::kF32, s.k, 1, nullptr};
  p.b = {wdt == mc::DType::kF32 ? static_cast<const void*>(w.data()) : wh.data(), wdt, 1, s.k, nullptr};
  std::vector<float> wt;  // Wᵀ [k][n]: B with contiguous rows
  if (kind == Kind::kGeneralRowMajor) {
    wt.resize(w.size());
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t kk = 0; kk < s.k; ++kk) wt[kk * nb + j] = w[j * s.k + kk];
    p.b = {wt.data(), mc::DType::kF32, nb, 1, nullptr};
  }
  p.c = c.data();
  p.ldc = s.n;
  if (pair) p.epilogue.activation = mc::Activation::kSiluMul;
  std::vector<mc::PackedWeight> pws;
  const bool general = kind == Kind::kGeneral || kind == Kind::kGeneralRowMajor;
  if (!general) {
    pws.push_back(mc::PackedWeight::pack(w.data(), mc::DType::kF32, nb, s.k, s.k, wdt, isa, pair));
    if (kind == Kind::kCold)
      while (static_cast<double>(pws.size() * pws[0].bytes()) < kColdBytes)
        pws.push_back(mc::PackedWeight::pack(w.data(), mc::DType::kF32, nb, s.k, s.k, wdt, isa, pair));
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
  set_counters(st, 2.0 * s.m * nb * s.k, static_cast<double>(nb * s.k) * (wdt == mc::DType::kF32 ? 4 : 2));
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
                                   mc::DType::kF32);
      if (isa == mc::Isa::kScalar) continue;
      benchmark::RegisterBenchmark(("bf16_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kPacked, isa,
                                   mc::DType::kBF16);
      if (s.m <= 64) {
        benchmark::RegisterBenchmark(("cold_f32_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kCold,
                                     isa, mc::DType::kF32);
        benchmark::RegisterBenchmark(("cold_bf16_packed_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kCold,
                                     isa, mc::DType::kBF16);
      }
      if (isa != mc::detect_isa()) continue;
      benchmark::RegisterBenchmark(("f32_general_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kGeneral, isa,
                                   mc::DType::kF32);
      benchmark::RegisterBenchmark(("f32_generalrm_" + in + "/" + sn).c_str(), bench_moekit, s,
                                   Kind::kGeneralRowMajor, isa, mc::DType::kF32);
      benchmark::RegisterBenchmark(("swiglu_f32_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kSwiglu, isa,
                                   mc::DType::kF32);
      benchmark::RegisterBenchmark(("swiglu_bf16_" + in + "/" + sn).c_str(), bench_moekit, s, Kind::kSwiglu, isa,
                                   mc::DType::kBF16);
    }
#ifdef MOEKIT_HAVE_DNNL
    benchmark::RegisterBenchmark(("dnnl_sgemm/" + sn).c_str(), bench_dnnl_sgemm, s);
    benchmark::RegisterBenchmark(("dnnl_matmul_f32/" + sn).c_str(), bench_dnnl_matmul, s, false);
    benchmark::RegisterBenchmark(("dnnl_matmul_bf16/" + sn).c_str(), bench_dnnl_matmul, s, true);
#endif
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
