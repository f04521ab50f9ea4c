// CPU implementation of the router projection (src/ops/router.h).
#include <algorithm>

#include "cpu/exec.h"
#include "ops/router.h"

namespace moekit::ops {

OpContext cpu_context(int num_threads) {
  OpContext ctx;
  ctx.backend = Backend::kCpu;
  ctx.num_threads = std::max(1, num_threads);
  ctx.isa = cpu::active_isa();
  return ctx;
}

namespace {

using cpu::GemmProblem;
using cpu::Operand;

}  // namespace

void router_prepare(const OpContext& ctx, ConstMatrixView<float> w, RouterCache& cache) {
  if (cache.valid) return;
  const int64_t d = w.cols;
  uint8_t* mem = cache.ws.get<uint8_t>(
      static_cast<int64_t>(cpu::PackedWeight::packed_bytes(d, w.rows, cpu::DType::kF32, ctx.isa, false)));
  // W [R, d] row-major is the logical B [d, R] with row stride 1 and column stride d.
  cache.packed = cpu::PackedWeight::pack_operand(Operand{w.data, cpu::DType::kF32, 1, d}, d, w.rows,
                                                 cpu::DType::kF32, ctx.isa, false, mem);
  cache.valid = true;
}

template <>
void router_forward<float>(const OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> w,
                           std::span<const float> bias, MatrixView<float> logits, RouterCache* cache) {
  if (cache) router_prepare(ctx, w, *cache);
  const int64_t rows = w.rows, d = w.cols;
  const auto tiles = cpu::make_tiles(1, [&](int64_t) { return x.rows; }, [&](int64_t) { return rows; },
                                     ctx.num_threads);
  cpu::run_tiles(ctx, tiles, [&](const cpu::Tile& tile, int) {
    GemmProblem q;
    q.m = x.rows;
    q.n = rows;
    q.k = d;
    q.a = {x.data, cpu::DType::kF32, d, 1};
    q.b = {w.data, cpu::DType::kF32, 1, d};
    q.c = logits.data;
    q.ldc = rows;
    q.epilogue.bias = bias.empty() ? nullptr : bias.data();
    if (cache) cpu::gemm_packed(q, cache->packed, tile.m0, tile.m1, tile.n0, tile.n1);
    else cpu::gemm(q, ctx.isa, tile.m0, tile.m1, tile.n0, tile.n1);
  });
}

template <>
void router_forward<double>(const OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> w,
                            std::span<const double> bias, MatrixView<double> logits, RouterCache*) {
  cpu::run_blocks(ctx, x.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t e = 0; e < w.rows; ++e) {
        double z = bias.empty() ? 0.0 : bias[e];
        for (int64_t k = 0; k < w.cols; ++k) z += x(t, k) * w(e, k);
        logits(t, e) = z;
      }
  });
}

template <>
void router_backward<float>(const OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> w,
                            ConstMatrixView<float> d_logits, MatrixView<float> d_x, MatrixView<float> d_w,
                            std::span<float> d_b) {
  const int64_t num_tokens = x.rows, rows = w.rows, d = w.cols;
  if (!d_x.empty()) {
    const auto tiles = cpu::make_tiles(1, [&](int64_t) { return num_tokens; }, [&](int64_t) { return d; },
                                       ctx.num_threads);
    cpu::run_tiles(ctx, tiles, [&](const cpu::Tile& tile, int) {
      GemmProblem q;
      q.m = num_tokens;
      q.n = d;
      q.k = rows;
      q.a = {d_logits.data, cpu::DType::kF32, rows, 1};
      q.b = {w.data, cpu::DType::kF32, d, 1};
      q.c = d_x.data;
      q.ldc = d;
      q.accumulate = true;
      cpu::gemm(q, ctx.isa, tile.m0, tile.m1, tile.n0, tile.n1);
    });
  }
  if (!d_w.empty()) {
    const auto tiles = cpu::make_tiles(1, [&](int64_t) { return rows; }, [&](int64_t) { return d; },
                                       ctx.num_threads, cpu::kUnpackedRowBlock);
    cpu::run_tiles(ctx, tiles, [&](const cpu::Tile& tile, int) {
      GemmProblem q;
      q.m = rows;
      q.n = d;
      q.k = num_tokens;
      q.a = {d_logits.data, cpu::DType::kF32, 1, rows};
      q.b = {x.data, cpu::DType::kF32, d, 1};
      q.c = d_w.data;
      q.ldc = d;
      q.accumulate = true;
      cpu::gemm(q, ctx.isa, tile.m0, tile.m1, tile.n0, tile.n1);
    });
  }
  for (size_t e = 0; e < d_b.size(); ++e)
    for (int64_t t = 0; t < num_tokens; ++t) d_b[e] += d_logits(t, static_cast<int64_t>(e));
}

template <>
void router_backward<double>(const OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> w,
                             ConstMatrixView<double> d_logits, MatrixView<double> d_x, MatrixView<double> d_w,
                             std::span<double> d_b) {
  const int64_t num_tokens = x.rows, rows = w.rows, d = w.cols;
  if (!d_x.empty()) {
    cpu::run_blocks(ctx, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t e = 0; e < rows; ++e)
          for (int64_t k = 0; k < d; ++k) d_x(t, k) += d_logits(t, e) * w(e, k);
    });
  }
  if (!d_w.empty()) {
    cpu::run_blocks(ctx, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        for (int64_t t = 0; t < num_tokens; ++t)
          for (int64_t k = 0; k < d; ++k) d_w(e, k) += d_logits(t, e) * x(t, k);
    });
  }
  for (size_t e = 0; e < d_b.size(); ++e)
    for (int64_t t = 0; t < num_tokens; ++t) d_b[e] += d_logits(t, static_cast<int64_t>(e));
}

}  // namespace moekit::ops
