// CPU implementation of the router projection (src/ops/router.h).
#include <algorithm>

#include "cpu/backend.h"
#include "cpu/exec.h"

namespace moekit::cpu {

using ops::OpContext;
using ops::RouterCache;

namespace {

// W in the kernels' layout, kept between forwards until invalidate() (a weight update).
struct CpuRouterCache final : RouterCache {
  PackedWeight packed;
  Workspace ws;
  bool valid = false;
  void invalidate() override { valid = false; }
};

}  // namespace

std::unique_ptr<RouterCache> CpuBackend::make_router_cache() const { return std::make_unique<CpuRouterCache>(); }

void CpuBackend::router_prepare(const OpContext&, ConstMatrixView<float> w, RouterCache& base) const {
  auto& cache = static_cast<CpuRouterCache&>(base);
  if (cache.valid) return;
  const int64_t d = w.cols;
  uint8_t* mem = cache.ws.get<uint8_t>(
      static_cast<int64_t>(PackedWeight::packed_bytes(d, w.rows, DType::kF32, isa_, false)));
  // W [R, d] row-major is the logical B [d, R] with row stride 1 and column stride d.
  cache.packed = PackedWeight::pack_operand(Operand{w.data, DType::kF32, 1, d}, d, w.rows,
                                                 DType::kF32, isa_, false, mem);
  cache.valid = true;
}

void CpuBackend::router_forward(const OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> w,
                                std::span<const float> bias, MatrixView<float> logits, RouterCache* base) const {
  auto* cache = static_cast<CpuRouterCache*>(base);
  if (cache) router_prepare(ctx, w, *cache);
  const int64_t rows = w.rows, d = w.cols;
  const auto tiles = make_tiles(1, [&](int64_t) { return x.rows; }, [&](int64_t) { return rows; },
                                     ctx.num_threads);
  run_tiles(ctx, tiles, [&](const Tile& tile, int) {
    GemmProblem q;
    q.m = x.rows;
    q.n = rows;
    q.k = d;
    q.a = {x.data, DType::kF32, d, 1};
    q.b = {w.data, DType::kF32, 1, d};
    q.c = logits.data;
    q.ldc = rows;
    q.epilogue.bias = bias.empty() ? nullptr : bias.data();
    if (cache) gemm_packed(q, cache->packed, tile.m0, tile.m1, tile.n0, tile.n1);
    else gemm(q, isa_, tile.m0, tile.m1, tile.n0, tile.n1);
  });
}

void CpuBackend::router_forward(const OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> w,
                                std::span<const double> bias, MatrixView<double> logits) const {
  run_blocks(ctx, x.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t e = 0; e < w.rows; ++e) {
        double z = bias.empty() ? 0.0 : bias[e];
        for (int64_t k = 0; k < w.cols; ++k) z += x(t, k) * w(e, k);
        logits(t, e) = z;
      }
  });
}

void CpuBackend::router_backward(const OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> w,
                                 ConstMatrixView<float> d_logits, MatrixView<float> d_x, MatrixView<float> d_w,
                                 std::span<float> d_b) const {
  const int64_t num_tokens = x.rows, rows = w.rows, d = w.cols;
  if (!d_x.empty()) {
    const auto tiles = make_tiles(1, [&](int64_t) { return num_tokens; }, [&](int64_t) { return d; },
                                       ctx.num_threads);
    run_tiles(ctx, tiles, [&](const Tile& tile, int) {
      GemmProblem q;
      q.m = num_tokens;
      q.n = d;
      q.k = rows;
      q.a = {d_logits.data, DType::kF32, rows, 1};
      q.b = {w.data, DType::kF32, d, 1};
      q.c = d_x.data;
      q.ldc = d;
      q.accumulate = true;
      gemm(q, isa_, tile.m0, tile.m1, tile.n0, tile.n1);
    });
  }
  if (!d_w.empty()) {
    const auto tiles = make_tiles(1, [&](int64_t) { return rows; }, [&](int64_t) { return d; },
                                       ctx.num_threads, kUnpackedRowBlock);
    run_tiles(ctx, tiles, [&](const Tile& tile, int) {
      GemmProblem q;
      q.m = rows;
      q.n = d;
      q.k = num_tokens;
      q.a = {d_logits.data, DType::kF32, 1, rows};
      q.b = {x.data, DType::kF32, d, 1};
      q.c = d_w.data;
      q.ldc = d;
      q.accumulate = true;
      gemm(q, isa_, tile.m0, tile.m1, tile.n0, tile.n1);
    });
  }
  for (size_t e = 0; e < d_b.size(); ++e)
    for (int64_t t = 0; t < num_tokens; ++t) d_b[e] += d_logits(t, static_cast<int64_t>(e));
}

void CpuBackend::router_backward(const OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> w,
                                 ConstMatrixView<double> d_logits, MatrixView<double> d_x, MatrixView<double> d_w,
                                 std::span<double> d_b) const {
  const int64_t num_tokens = x.rows, rows = w.rows, d = w.cols;
  if (!d_x.empty()) {
    run_blocks(ctx, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t e = 0; e < rows; ++e)
          for (int64_t k = 0; k < d; ++k) d_x(t, k) += d_logits(t, e) * w(e, k);
    });
  }
  if (!d_w.empty()) {
    run_blocks(ctx, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        for (int64_t t = 0; t < num_tokens; ++t)
          for (int64_t k = 0; k < d; ++k) d_w(e, k) += d_logits(t, e) * x(t, k);
    });
  }
  for (size_t e = 0; e < d_b.size(); ++e)
    for (int64_t t = 0; t < num_tokens; ++t) d_b[e] += d_logits(t, static_cast<int64_t>(e));
}

}  // namespace moekit::cpu
