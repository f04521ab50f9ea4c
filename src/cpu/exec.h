// How CPU ops spread work over the process-wide pool: (group, row block, column block) tiles
// pulled from one queue, so that a hot expert still keeps every core busy, and scratch memory
// kept between calls.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "internal/parallel.h"
#include "ops/context.h"

namespace moekit::cpu {

// Row blocks of this many rows are the unit of work along the token dimension: large enough to
// reuse each packed weight panel across many rows, small enough that a hot expert splits into
// several tiles.
inline constexpr int64_t kRowBlock = 128;
// GEMMs whose B is not pre-packed (the backward's) pack B once per call: longer row blocks
// amortise that packing.
inline constexpr int64_t kUnpackedRowBlock = 1024;
// Column blocks start at this width and halve (down to kMinColBlock) until there are at least
// kTilesPerThread tiles per thread, so that the queue can balance uneven experts.
inline constexpr int64_t kMaxColBlock = 256;
inline constexpr int64_t kMinColBlock = 32;
inline constexpr int64_t kTilesPerThread = 4;

struct Tile {
  int32_t group;
  int64_t m0, m1, n0, n1;
};

// (group, row block, column block) tiles over [0, rows_of(g)) × [0, cols_of(g)) for every
// group index g < num_groups, groups with the most rows first so the longest work starts early.
template <typename RowsFn, typename ColsFn>
std::vector<Tile> make_tiles(int64_t num_groups, RowsFn rows_of, ColsFn cols_of, int num_threads,
                             int64_t row_block = kRowBlock, int64_t max_col_block = kMaxColBlock) {
  std::vector<int32_t> order(static_cast<size_t>(num_groups));
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return rows_of(a) > rows_of(b); });
  auto count = [&](int64_t col_block) {
    int64_t n = 0;
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t rows = rows_of(g), cols = cols_of(g);
      if (rows > 0 && cols > 0) n += ((rows + row_block - 1) / row_block) * ((cols + col_block - 1) / col_block);
    }
    return n;
  };
  int64_t col_block = max_col_block;
  while (col_block > kMinColBlock && count(col_block) < kTilesPerThread * num_threads) col_block /= 2;
  std::vector<Tile> tiles;
  tiles.reserve(static_cast<size_t>(count(col_block)));
  for (int32_t gi : order) {
    const int64_t rows = rows_of(gi), cols = cols_of(gi);
    if (rows <= 0 || cols <= 0) continue;
    for (int64_t n0 = 0; n0 < cols; n0 += col_block)
      for (int64_t m0 = 0; m0 < rows; m0 += row_block)
        tiles.push_back({gi, m0, std::min(rows, m0 + row_block), n0, std::min(cols, n0 + col_block)});
  }
  return tiles;
}

// Runs body(task, thread) for task in [0, num_tasks) on ctx.num_threads threads of the pool.
template <typename Body>
void run_tasks(const ops::OpContext& ctx, int64_t num_tasks, Body&& body) {
  detail::run_parallel(ctx.num_threads, num_tasks, body);
}

// Runs body(tile, thread) for every tile.
template <typename Body>
void run_tiles(const ops::OpContext& ctx, const std::vector<Tile>& tiles, Body&& body) {
  run_tasks(ctx, static_cast<int64_t>(tiles.size()),
            [&](int64_t task, int thread) { body(tiles[static_cast<size_t>(task)], thread); });
}

// Runs body(begin, end) over [0, n) in blocks of `block`.
template <typename Body>
void run_blocks(const ops::OpContext& ctx, int64_t n, int64_t block, Body&& body) {
  const int64_t tasks = (n + block - 1) / block;
  run_tasks(ctx, tasks, [&](int64_t task, int) { body(task * block, std::min(n, (task + 1) * block)); });
}

// Scratch memory kept between calls (grown, never shrunk), so that a forward or backward does
// not pay page faults and zero-filling for its large temporaries on every call (on a VM a
// fresh 4 KiB page costs microseconds: packing 235 MB into new memory took 4× the copy). Large
// buffers are 2 MiB aligned and advised as transparent huge pages, which also keeps the TLB
// from thrashing when a GEMM walks a weight panel by panel.
class Workspace {
 public:
  template <typename T>
  T* get(int64_t count) {
    return reinterpret_cast<T*>(bytes(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T)));
  }
  size_t capacity() const { return size_; }

 private:
  uint8_t* bytes(size_t count);
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

}  // namespace moekit::cpu
