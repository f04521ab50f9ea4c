// The MoE layer: grouped GEMMs over the plan's expert segments, on one persistent thread pool.
//
// Row space. Every (token, expert) assignment the experts compute is one row; rows are grouped
// by expert (the plan's counting sort: expert e owns rows [expert_offsets[e],
// expert_offsets[e+1]) with tokens ascending), and the shared expert, when present, is one more
// group owning num_tokens rows. Soft MoE rows are slots, expert-major: row (e, g, s) =
// e·num_sequences·slots_per_expert + g·slots_per_expert + s, so each expert's slots are
// contiguous. A group reads its A rows straight from hidden_states through the plan's token
// list (the GEMM's row gather): no permuted copy is made.
//
// The router logits are one more fp32 GEMM (x · W_routerᵀ + b on the packed router weight)
// unless input jitter or noisy gating asks for route_hidden's own projection.
//
// Forward, per group e with rows R_e:
//   h   = act(X[R_e] · W_gate_upᵀ + b_gate_up)      GEMM 1, activation in the epilogue
//   y   = w ⊙ (h · W_downᵀ + b_down)                 GEMM 2, combine weight as row scale
//   out_t = Σ_{kept choices i of t, in choice order} y[row(i)] (+ shared row t)
// The last sum runs per token in a fixed order, so the output is bitwise identical for any
// thread count: every GEMM tile writes its own rows and columns, and its values do not depend
// on the tiling (gemm.h).
//
// Backward, same groups (d_y = d_out[R_e], the gathered output gradient):
//   G        = d_y · W_down                           [R_e, d_ff]
//   d_w      = ⟨G, h⟩ + ⟨d_y, b_down⟩                  (= ⟨d_out_t, E_e(x_t)⟩, per row)
//   d_a      = act'(a) ⊙ (w · G)                      (recomputed from the saved pre-activation a)
//   dW_down += (w ⊙ d_y)ᵀ · h,   db_down += Σ w ⊙ d_y
//   d_X[R_e] = d_a · W_gate_up,  dW_gate_up += d_aᵀ · X[R_e],  db_gate_up += Σ d_a
// then d_x_t = Σ over t's rows in choice order, and d_w flows through route_backward and
// router_backward into the router parameters and d_x.
#include "moekit/layer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include <sys/mman.h>

#include "cpu/activation.h"
#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"
#include "cpu/thread_pool.h"
#include "internal/random.h"
#include "moekit/error.h"

namespace moekit {

// ---------------------------------------------------------------------------------------------
// Parameter tensors and views.

template <typename Real>
BasicMoeTensors<Real> make_moe_tensors(const MoeLayerConfig& c) {
  c.validate();
  const int64_t num_experts = c.num_experts(), d = c.d_model, f = c.d_ff, rows = c.gate_up_rows();
  auto sized = [](int64_t n) { return std::vector<Real>(static_cast<size_t>(n), Real(0)); };
  BasicMoeTensors<Real> t;
  t.router_weight = sized(c.router_rows() * d);
  if (c.router_bias) t.router_bias = sized(c.router_rows());
  if (c.routing.noisy_gating) t.router_noise_weight = sized(num_experts * d);
  t.gate_up = sized(num_experts * rows * d);
  t.down = sized(num_experts * d * f);
  if (c.expert_bias) {
    t.gate_up_bias = sized(num_experts * rows);
    t.down_bias = sized(num_experts * d);
  }
  if (c.has_shared()) {
    t.shared_gate_up = sized(c.shared_gate_up_rows() * d);
    t.shared_down = sized(d * c.effective_shared_d_ff());
    if (c.expert_bias) {
      t.shared_gate_up_bias = sized(c.shared_gate_up_rows());
      t.shared_down_bias = sized(d);
    }
    if (c.shared_expert_gate) t.shared_gate = sized(d);
  }
  return t;
}

template BasicMoeTensors<float> make_moe_tensors<float>(const MoeLayerConfig&);
template BasicMoeTensors<double> make_moe_tensors<double>(const MoeLayerConfig&);

MoeParams moe_params_view(const MoeLayerConfig& c, const MoeTensors& t) {
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  auto weights = [](const std::vector<float>& v, int64_t experts, int64_t rows, int64_t cols) {
    return v.empty() ? WeightView{} : WeightView{v.data(), DType::kF32, experts, rows, cols};
  };
  MoeParams p;
  p.router_weight = {t.router_weight.data(), c.router_rows(), d};
  p.router_bias = t.router_bias;
  if (!t.router_noise_weight.empty()) p.router_noise_weight = {t.router_noise_weight.data(), num_experts, d};
  p.gate_up = weights(t.gate_up, num_experts, c.gate_up_rows(), d);
  p.down = weights(t.down, num_experts, d, c.d_ff);
  p.gate_up_bias = t.gate_up_bias;
  p.down_bias = t.down_bias;
  p.shared_gate_up = weights(t.shared_gate_up, 1, c.shared_gate_up_rows(), d);
  p.shared_down = weights(t.shared_down, 1, d, c.effective_shared_d_ff());
  p.shared_gate_up_bias = t.shared_gate_up_bias;
  p.shared_down_bias = t.shared_down_bias;
  p.shared_gate = t.shared_gate;
  return p;
}

namespace {

std::string shape_text(int64_t a, int64_t b) { return detail::concat("[", a, ", ", b, "]"); }
std::string shape_text(int64_t a, int64_t b, int64_t c) {
  return detail::concat("[", a, ", ", b, ", ", c, "]");
}

void check_matrix_param(const char* name, ConstMatrixView<float> m, bool wanted, int64_t rows,
                        int64_t cols, const char* why) {
  const bool given = m.data != nullptr;
  if (given != wanted) {
    throw_input_error(detail::concat("params.", name),
                      wanted ? detail::concat("a ", shape_text(rows, cols), " matrix") : detail::concat("none (", why, ")"),
                      given ? shape_text(m.rows, m.cols) : std::string("none"));
  }
  if (given && (m.rows != rows || m.cols != cols)) {
    throw_input_error(detail::concat("params.", name, " shape"), shape_text(rows, cols), shape_text(m.rows, m.cols));
  }
}

void check_vector_param(const char* name, std::span<const float> v, bool wanted, int64_t size,
                        const char* why) {
  const int64_t actual = static_cast<int64_t>(v.size());
  if (wanted && (v.data() == nullptr || actual != size)) {
    throw_input_error(detail::concat("params.", name, " length"), size, v.data() ? actual : 0);
  }
  if (!wanted && actual != 0) {
    throw_input_error(detail::concat("params.", name), detail::concat("empty (", why, ")"),
                      detail::concat("length ", actual));
  }
}

void check_weight_param(const char* name, const WeightView& w, bool wanted, int64_t experts,
                        int64_t rows, int64_t cols, const char* why) {
  if (w.empty() != !wanted) {
    throw_input_error(detail::concat("params.", name),
                      wanted ? detail::concat("a ", shape_text(experts, rows, cols), " weight") : detail::concat("none (", why, ")"),
                      w.empty() ? std::string("none") : shape_text(w.experts, w.rows, w.cols));
  }
  if (!wanted) return;
  if (w.experts != experts || w.rows != rows || w.cols != cols) {
    throw_input_error(detail::concat("params.", name, " shape"), shape_text(experts, rows, cols),
                      shape_text(w.experts, w.rows, w.cols));
  }
  if (w.dtype != DType::kF32 && w.dtype != DType::kBF16) {
    throw_input_error(detail::concat("params.", name, " dtype"), "fp32 or bf16", static_cast<int>(w.dtype));
  }
}

}  // namespace

void check_moe_params(const MoeLayerConfig& c, const MoeParams& p) {
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  check_matrix_param("router_weight", p.router_weight, true, c.router_rows(), d, "");
  check_vector_param("router_bias", p.router_bias, c.router_bias, c.router_rows(), "router_bias is false");
  check_matrix_param("router_noise_weight", p.router_noise_weight, c.routing.noisy_gating, num_experts, d,
                     "noisy_gating is false");
  check_weight_param("gate_up", p.gate_up, true, num_experts, c.gate_up_rows(), d, "");
  check_weight_param("down", p.down, true, num_experts, d, c.d_ff, "");
  check_vector_param("gate_up_bias", p.gate_up_bias, c.expert_bias, num_experts * c.gate_up_rows(),
                     "expert_bias is false");
  check_vector_param("down_bias", p.down_bias, c.expert_bias, num_experts * d, "expert_bias is false");
  const bool shared = c.has_shared();
  check_weight_param("shared_gate_up", p.shared_gate_up, shared, 1, c.shared_gate_up_rows(), d,
                     "num_shared_experts is 0");
  check_weight_param("shared_down", p.shared_down, shared, 1, d, c.effective_shared_d_ff(),
                     "num_shared_experts is 0");
  check_vector_param("shared_gate_up_bias", p.shared_gate_up_bias, shared && c.expert_bias,
                     c.shared_gate_up_rows(), "no shared expert biases");
  check_vector_param("shared_down_bias", p.shared_down_bias, shared && c.expert_bias, d,
                     "no shared expert biases");
  check_vector_param("shared_gate", p.shared_gate, c.shared_expert_gate, d, "shared_expert_gate is false");
}

// ---------------------------------------------------------------------------------------------
// The compute engine.

namespace {

using cpu::GemmProblem;
using cpu::Operand;
using cpu::PackedWeight;

cpu::DType to_cpu(DType d) { return d == DType::kBF16 ? cpu::DType::kBF16 : cpu::DType::kF32; }
size_t dtype_bytes(DType d) { return d == DType::kBF16 ? 2 : 4; }

cpu::Activation epilogue_activation(ExpertActivation a) {
  switch (a) {
    case ExpertActivation::kSwiGlu: return cpu::Activation::kSiluMul;
    case ExpertActivation::kSwiGluClamped: return cpu::Activation::kSiluMulClamped;
    case ExpertActivation::kGelu: return cpu::Activation::kGelu;
    case ExpertActivation::kGeluErf: return cpu::Activation::kGeluErf;
    case ExpertActivation::kRelu: return cpu::Activation::kRelu;
  }
  return cpu::Activation::kNone;
}

float round_bf16(float x) { return cpu::bf16_to_float(cpu::float_to_bf16(x)); }

// Row blocks of this many rows are the unit of work along the token dimension: large enough to
// reuse each packed weight panel across many rows, small enough that a hot expert splits into
// several tiles.
constexpr int64_t kRowBlock = 128;
// GEMMs whose B is not pre-packed (the backward's) pack B once per call: longer row blocks
// amortise that packing.
constexpr int64_t kUnpackedRowBlock = 1024;
// Column blocks start at this width and halve (down to kMinColBlock) until there are at least
// kTilesPerThread tiles per thread, so that the queue can balance uneven experts.
constexpr int64_t kMaxColBlock = 256;
constexpr int64_t kMinColBlock = 32;
constexpr int64_t kTilesPerThread = 4;
// Training forward: groups with at most this many rows read their weights in place
// (cpu::gemm_weight_rows) instead of packing them after every weight update.
constexpr int64_t kWeightRowsInPlace = 4;

// One expert's share of the row space, with everything its GEMMs read and write.
struct Group {
  int64_t expert = 0;                 // weight index; num_experts is the shared expert
  int64_t d_ff = 0;                   // hidden width
  int64_t gu_cols = 0;                // pre-activation width: 2·d_ff (gated) or d_ff
  int64_t row_begin = 0;              // first row in the row space
  int64_t num_rows = 0;
  const float* a = nullptr;           // A rows: row i is a + src(i)·d_model
  const float* dy = nullptr;          // backward: d_y row i is dy + src(i)·d_model
  const int32_t* a_rows = nullptr;    // src(i) = a_rows[i] (token index), or i when null
  const float* scale = nullptr;       // [num_rows] combine weight / shared gate, or null (1)
  int64_t h_offset = 0;               // this group's [num_rows, d_ff] block in h-sized buffers
  int64_t gu_offset = 0;              // its [num_rows, gu_cols] block in the pre-activations
  const void* w_gate_up = nullptr;    // [gu_cols, d_model] of dtype w_gate_up_dtype
  const void* w_down = nullptr;       // [d_model, d_ff]
  DType w_gate_up_dtype = DType::kF32;
  DType w_down_dtype = DType::kF32;
  const float* b_gate_up = nullptr;   // [gu_cols] or null
  const float* b_down = nullptr;      // [d_model] or null
  int64_t src(int64_t i) const { return a_rows ? a_rows[i] : i; }
};

struct RowSpace {
  std::vector<Group> groups;
  int64_t total_rows = 0;
  int64_t routed_rows = 0;  // rows of routed experts; shared rows follow
  int64_t h_size = 0;       // Σ num_rows · d_ff
  int64_t gu_size = 0;      // Σ num_rows · gu_cols
  int64_t max_d_ff = 0;
};

struct Tile {
  int32_t group;
  int64_t m0, m1, n0, n1;
};

// (group, row block, column block) tiles over [0, rows(g)) × [0, cols(g)), groups with the
// most rows first so that the longest work starts early.
template <typename RowsFn, typename ColsFn>
std::vector<Tile> make_tiles(const std::vector<Group>& groups, RowsFn rows_of, ColsFn cols_of,
                             int num_threads, int64_t row_block = kRowBlock,
                             int64_t max_col_block = kMaxColBlock) {
  std::vector<int32_t> order(groups.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return rows_of(groups[a]) > rows_of(groups[b]); });
  auto count = [&](int64_t col_block) {
    int64_t n = 0;
    for (const Group& g : groups) {
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
    const int64_t rows = rows_of(groups[gi]), cols = cols_of(groups[gi]);
    if (rows <= 0 || cols <= 0) continue;
    for (int64_t n0 = 0; n0 < cols; n0 += col_block)
      for (int64_t m0 = 0; m0 < rows; m0 += row_block)
        tiles.push_back({gi, m0, std::min(rows, m0 + row_block), n0, std::min(cols, n0 + col_block)});
  }
  return tiles;
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
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    if (bytes > size_) {
      constexpr size_t kHuge = size_t{2} << 20;
      const size_t align = bytes >= kHuge ? kHuge : 64;
      const size_t rounded = (bytes + align - 1) / align * align;
      data_.reset(static_cast<uint8_t*>(std::aligned_alloc(align, rounded)));
      if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
      if (align == kHuge) madvise(data_.get(), rounded, MADV_HUGEPAGE);  // advice only
#endif
      size_ = rounded;
    }
    return reinterpret_cast<T*>(data_.get());
  }
  size_t capacity() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

}  // namespace

struct MoeLayer::Impl {
  explicit Impl(int num_threads) : pool(num_threads), isa(cpu::active_isa()) {}

  cpu::ThreadPool pool;
  cpu::Isa isa;

  // Packed weights per expert; index num_experts is the shared expert.
  std::vector<PackedWeight> gate_up_packed, down_packed;
  PackedWeight router_packed;  // fp32 router weight (the router is always fp32)
  // Which packs are current (refresh_packed_weights() clears them); per group.
  std::vector<uint8_t> gate_up_valid, down_valid;
  bool router_valid = false;
  bool gate_up_paired = false;  // paired layout (fused SwiGLU) vs raw pre-activations

  // bf16 rounding of owned fp32 parameters (dtype bf16 only); params_ points here. Filled by
  // params() when stale (bf16_stale[e], index num_experts: shared); the layer itself computes
  // from compute_params.
  std::vector<uint16_t> gate_up_bf16, down_bf16, shared_gate_up_bf16, shared_down_bf16;
  std::vector<uint8_t> bf16_stale;
  // What the experts compute from: params_, or for an owned bf16 layer the fp32 masters, which
  // every path rounds to bf16 as it packs or loads them (the same values as the bf16 copies,
  // without a pass that writes those).
  MoeParams compute_params;

  // Phase times of the last forward or backward (last_phases()).
  std::vector<PhaseTime> phases;
  std::chrono::steady_clock::time_point phase_start;
  void start_phases() {
    phases.clear();
    phase_start = std::chrono::steady_clock::now();
  }
  // Closes the running phase under `name` and starts the next.
  void phase(const char* name) {
    const auto now = std::chrono::steady_clock::now();
    phases.push_back({name, std::chrono::duration<double, std::milli>(now - phase_start).count()});
    phase_start = now;
  }

  // Per expert (index num_experts: the shared expert): its weight gradients are logically zero
  // but not yet filled (zero_grad() is lazy; see there).
  std::vector<uint8_t> grad_pending_zero;

  Workspace gate_up_ws, down_ws, router_ws;  // the packed weights above
  // Backward: expert weights packed as the backward's B (W_down, W_gate_up as stored), per
  // group, kept until refresh_packed_weights() (gradient accumulation over several backward
  // passes per optimizer step packs them once).
  struct PackCache {
    Workspace ws;
    std::vector<PackedWeight> packs;
    std::vector<uint8_t> valid;
    void invalidate() {
      std::fill(valid.begin(), valid.end(), 0);
      std::fill(packs.begin(), packs.end(), PackedWeight());  // a stale pack is never used
    }
  } down_t, gate_up_t;
  Workspace grad_pack_ws;         // backward: h and X packed as B of the weight gradients
  Workspace hidden_ws;  // forward h; backward G, h and the transposed d_pre
  Workspace rows_ws;    // forward y; backward the [rows, d_model] intermediates

  // What a training forward keeps for backward.
  struct Saved {
    bool valid = false;
    Matrix<float> hidden_states;  // [num_tokens, d_model]
    RoutingResult<float> routing;
    bool router_by_gemm = false;         // logits came from the layer's GEMM (see forward)
    std::vector<float> pre_activations;  // per group [num_rows, gu_cols] blocks
    Matrix<float> slot_inputs;           // Soft MoE: [routed rows, d_model]
    Matrix<float> slot_outputs;          // Soft MoE: [routed rows, d_model] (unscaled E(X̃))
  } saved;

  // Runs body(tile, thread) for every tile on the pool.
  template <typename Body>
  void run_tiles(const std::vector<Tile>& tiles, Body&& body) {
    pool.run(static_cast<int64_t>(tiles.size()),
             [&](int64_t task, int thread) { body(tiles[static_cast<size_t>(task)], thread); });
  }
  // Runs body(begin, end) over [0, n) in blocks of `block`.
  template <typename Body>
  void run_blocks(int64_t n, int64_t block, Body&& body) {
    const int64_t tasks = (n + block - 1) / block;
    pool.run(tasks, [&](int64_t task, int) { body(task * block, std::min(n, (task + 1) * block)); });
  }
};

// ---------------------------------------------------------------------------------------------
// Construction, parameters, packing.

namespace {

// PyTorch nn.Linear initialisation U(−1/√fan_in, 1/√fan_in), counter-based per element.
void init_uniform(std::vector<float>& v, int64_t fan_in, uint64_t seed, uint64_t stream) {
  const double bound = 1.0 / std::sqrt(double(fan_in));
  for (size_t i = 0; i < v.size(); ++i) {
    const double u = detail::random_uniform(seed, static_cast<detail::RandomStream>(0x4d6f45ULL + stream), i, 0);
    v[i] = static_cast<float>((2.0 * u - 1.0) * bound);
  }
}

// The bf16 copies of the expert weights of the experts in `experts` (index num_experts: the
// shared expert) that are stale, rounded from the fp32 masters in parallel.
void round_experts(const MoeLayerConfig& c, const MoeTensors& masters, MoeLayer::Impl& impl,
                   const std::vector<int64_t>& experts) {
  const int64_t gu = c.gate_up_rows() * c.d_model, dn = c.d_model * c.d_ff;
  impl.pool.run(static_cast<int64_t>(experts.size()), [&](int64_t i, int) {
    const int64_t e = experts[static_cast<size_t>(i)];
    if (e == c.num_experts()) {
      cpu::float_to_bf16_n(masters.shared_gate_up.data(), impl.shared_gate_up_bf16.data(),
                           static_cast<int64_t>(masters.shared_gate_up.size()));
      cpu::float_to_bf16_n(masters.shared_down.data(), impl.shared_down_bf16.data(),
                           static_cast<int64_t>(masters.shared_down.size()));
    } else {
      cpu::float_to_bf16_n(masters.gate_up.data() + e * gu, impl.gate_up_bf16.data() + e * gu, gu);
      cpu::float_to_bf16_n(masters.down.data() + e * dn, impl.down_bf16.data() + e * dn, dn);
    }
  });
  for (int64_t e : experts) impl.bf16_stale[static_cast<size_t>(e)] = 0;
}

}  // namespace

MoeLayer::MoeLayer(const MoeLayerConfig& config, uint64_t seed) : config_(config) {
  config_.validate();
  impl_ = std::make_unique<Impl>(config_.num_threads);
  owned_ = std::make_unique<MoeTensors>(make_moe_tensors<float>(config_));
  MoeTensors& t = *owned_;
  const int64_t d = config_.d_model;
  init_uniform(t.router_weight, d, seed, 0);
  init_uniform(t.router_bias, d, seed, 1);
  init_uniform(t.gate_up, d, seed, 2);
  init_uniform(t.gate_up_bias, d, seed, 3);
  init_uniform(t.down, config_.d_ff, seed, 4);
  init_uniform(t.down_bias, config_.d_ff, seed, 5);
  if (config_.has_shared()) {
    init_uniform(t.shared_gate_up, d, seed, 6);
    init_uniform(t.shared_gate_up_bias, d, seed, 7);
    init_uniform(t.shared_down, config_.effective_shared_d_ff(), seed, 8);
    init_uniform(t.shared_down_bias, config_.effective_shared_d_ff(), seed, 9);
    init_uniform(t.shared_gate, d, seed, 10);
  }
  refresh_packed_weights();
}

MoeLayer::MoeLayer(const MoeLayerConfig& config, const MoeParams& params) : config_(config) {
  config_.validate();
  check_moe_params(config_, params);
  impl_ = std::make_unique<Impl>(config_.num_threads);
  params_ = params;
}

MoeLayer::~MoeLayer() = default;
MoeLayer::MoeLayer(MoeLayer&&) noexcept = default;
MoeLayer& MoeLayer::operator=(MoeLayer&&) noexcept = default;

void MoeLayer::set_training(bool training) {
  config_.routing.training = training;
  if (!training) impl_->saved = Impl::Saved{};
}

MoeTensors& MoeLayer::parameters() {
  if (!owned_) throw std::logic_error("MoeLayer::parameters: the layer borrows its parameters (use params())");
  return *owned_;
}

const MoeTensors& MoeLayer::parameters() const {
  if (!owned_) throw std::logic_error("MoeLayer::parameters: the layer borrows its parameters (use params())");
  return *owned_;
}

const MoeParams& MoeLayer::compute_params() const {
  return owned_ && config_.dtype == DType::kBF16 ? impl_->compute_params : params_;
}

const MoeParams& MoeLayer::params() const {
  // An owned bf16 layer rounds its weights per expert when first needed; the views must show
  // all of them. Filling stale copies changes nothing the caller could have seen: logically const.
  Impl& impl = *impl_;
  if (owned_ && !impl.bf16_stale.empty()) {
    std::vector<int64_t> stale;
    for (int64_t e = 0; e <= config_.num_experts(); ++e)
      if (impl.bf16_stale[static_cast<size_t>(e)]) stale.push_back(e);
    if (!stale.empty()) round_experts(config_, *owned_, impl, stale);
  }
  return params_;
}

const char* MoeLayer::isa_name() const { return cpu::isa_name(impl_->isa); }

const std::vector<PhaseTime>& MoeLayer::last_phases() const { return impl_->phases; }

void MoeLayer::ensure_grads() {
  if (grads_.router_weight.empty()) {
    grads_ = make_moe_tensors<float>(config_);
    impl_->grad_pending_zero.assign(static_cast<size_t>(config_.num_experts() + 1), 0);
  }
}

void MoeLayer::zero_grad() {
  ensure_grads();
  // The expert weight gradients (almost all of the gradient memory) are only marked zero: the
  // next backward writes instead of adding into those of the experts it touches, and
  // materialize_zero_grads() fills the others when grads() is read. This saves a pass over the
  // gradients here and a read of them in the backward (as PyTorch's zero_grad(set_to_none)).
  grads_.for_each([](const char* name, std::vector<float>& v) {
    const std::string n = name;
    if (n != "gate_up" && n != "down" && n != "shared_gate_up" && n != "shared_down")
      std::fill(v.begin(), v.end(), 0.0f);
  });
  std::fill(impl_->grad_pending_zero.begin(), impl_->grad_pending_zero.end(), 1);
}

void MoeLayer::materialize_zero_grads() {
  if (grads_.router_weight.empty()) return;
  const int64_t num_experts = config_.num_experts();
  const int64_t gu = config_.gate_up_rows() * config_.d_model, dn = config_.d_model * config_.d_ff;
  for (int64_t e = 0; e <= num_experts; ++e) {
    if (!impl_->grad_pending_zero[static_cast<size_t>(e)]) continue;
    impl_->grad_pending_zero[static_cast<size_t>(e)] = 0;
    if (e == num_experts) {
      std::fill(grads_.shared_gate_up.begin(), grads_.shared_gate_up.end(), 0.0f);
      std::fill(grads_.shared_down.begin(), grads_.shared_down.end(), 0.0f);
    } else {
      std::fill_n(grads_.gate_up.begin() + e * gu, gu, 0.0f);
      std::fill_n(grads_.down.begin() + e * dn, dn, 0.0f);
    }
  }
}

const MoeTensors& MoeLayer::grads() const {
  // Filling pending zeros changes no value that grads() can show: logically const.
  const_cast<MoeLayer*>(this)->materialize_zero_grads();
  return grads_;
}

MoeTensors& MoeLayer::grads() {
  ensure_grads();
  materialize_zero_grads();
  return grads_;
}

void MoeLayer::refresh_packed_weights() {
  if (owned_) {
    params_ = moe_params_view(config_, *owned_);
    if (config_.dtype == DType::kBF16) {
      // The layer computes with the bf16 rounding of the fp32 master weights, made per expert
      // when tokens first reach it (ensure_bf16_current), or for all by params().
      impl_->gate_up_bf16.resize(owned_->gate_up.size());
      impl_->down_bf16.resize(owned_->down.size());
      impl_->shared_gate_up_bf16.resize(owned_->shared_gate_up.size());
      impl_->shared_down_bf16.resize(owned_->shared_down.size());
      impl_->bf16_stale.assign(static_cast<size_t>(config_.num_experts() + 1), 1);
      impl_->compute_params = moe_params_view(config_, *owned_);
      params_.gate_up.data = impl_->gate_up_bf16.data();
      params_.down.data = impl_->down_bf16.data();
      params_.gate_up.dtype = params_.down.dtype = DType::kBF16;
      if (config_.has_shared()) {
        params_.shared_gate_up.data = impl_->shared_gate_up_bf16.data();
        params_.shared_down.data = impl_->shared_down_bf16.data();
        params_.shared_gate_up.dtype = params_.shared_down.dtype = DType::kBF16;
      }
    }
  }
  impl_->router_valid = false;
  impl_->down_t.invalidate();
  impl_->gate_up_t.invalidate();
  std::fill(impl_->gate_up_valid.begin(), impl_->gate_up_valid.end(), 0);
  std::fill(impl_->down_valid.begin(), impl_->down_valid.end(), 0);
  impl_->saved = Impl::Saved{};
}

namespace {

// Packs what the forward needs, lazily: the router weight at the start of every forward, and
// after routing the weights of the experts that received rows (gate_up paired for the fused
// SwiGLU epilogue in inference, plain in training, where the raw pre-activations are kept; and
// down). A weight stays packed until refresh_packed_weights(); an expert no token has reached
// since is never packed (a decode step touches a fraction of the experts). Every packed weight
// lives at a fixed offset of one of the layer's arenas.
void ensure_router_packed(const MoeLayerConfig& c, const MoeParams& p, MoeLayer::Impl& impl, bool paired) {
  const int64_t d = c.d_model;
  const int64_t groups = c.num_experts() + (c.has_shared() ? 1 : 0);
  const bool want_paired = paired && is_gated(c.activation);
  if (impl.gate_up_valid.size() != static_cast<size_t>(groups)) {
    impl.gate_up_valid.assign(static_cast<size_t>(groups), 0);
    impl.down_valid.assign(static_cast<size_t>(groups), 0);
    impl.gate_up_packed.resize(static_cast<size_t>(groups));
    impl.down_packed.resize(static_cast<size_t>(groups));
  }
  if (want_paired != impl.gate_up_paired) {
    std::fill(impl.gate_up_valid.begin(), impl.gate_up_valid.end(), 0);
    impl.gate_up_paired = want_paired;
  }
  if (impl.router_valid) return;
  uint8_t* mem = impl.router_ws.get<uint8_t>(
      static_cast<int64_t>(PackedWeight::packed_bytes(d, p.router_weight.rows, cpu::DType::kF32, impl.isa, false)));
  impl.router_packed = PackedWeight::pack_operand(Operand{p.router_weight.data, cpu::DType::kF32, 1, d}, d,
                                                  p.router_weight.rows, cpu::DType::kF32, impl.isa, false, mem);
  impl.router_valid = true;
}

template <typename GroupList>
void ensure_experts_packed(const MoeLayerConfig& c, const MoeParams& p, MoeLayer::Impl& impl,
                           const GroupList& groups_in_use, int64_t unpacked_rows) {
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  const int64_t groups = num_experts + (c.has_shared() ? 1 : 0);
  const cpu::DType packed_dtype = to_cpu(c.dtype);
  const bool paired = impl.gate_up_paired;
  auto weight_of = [&](int64_t e, bool gate_up) -> const WeightView& {
    const bool shared = e == num_experts;
    return gate_up ? (shared ? p.shared_gate_up : p.gate_up) : (shared ? p.shared_down : p.down);
  };
  auto round64 = [](size_t b) { return (b + 63) / 64 * 64; };
  std::vector<size_t> gu_off(static_cast<size_t>(groups) + 1, 0), dn_off(static_cast<size_t>(groups) + 1, 0);
  for (int64_t e = 0; e < groups; ++e) {
    const WeightView& gu = weight_of(e, true);
    const WeightView& dn = weight_of(e, false);
    gu_off[e + 1] = gu_off[e] + round64(PackedWeight::packed_bytes(d, gu.rows, packed_dtype, impl.isa, paired));
    dn_off[e + 1] = dn_off[e] + round64(PackedWeight::packed_bytes(dn.cols, d, packed_dtype, impl.isa, false));
  }
  // An arena that has to grow moves: then nothing in it is valid any more.
  if (gu_off[groups] > impl.gate_up_ws.capacity())
    std::fill(impl.gate_up_valid.begin(), impl.gate_up_valid.end(), 0);
  if (dn_off[groups] > impl.down_ws.capacity()) std::fill(impl.down_valid.begin(), impl.down_valid.end(), 0);
  std::vector<int64_t> todo;
  for (const auto& g : groups_in_use)
    if (g.num_rows > unpacked_rows && (!impl.gate_up_valid[g.expert] || !impl.down_valid[g.expert]))
      todo.push_back(g.expert);
  if (todo.empty()) return;
  uint8_t* gu_mem = impl.gate_up_ws.get<uint8_t>(static_cast<int64_t>(gu_off[groups]));
  uint8_t* dn_mem = impl.down_ws.get<uint8_t>(static_cast<int64_t>(dn_off[groups]));
  impl.pool.run(static_cast<int64_t>(todo.size()), [&](int64_t i, int) {
    const int64_t e = todo[static_cast<size_t>(i)];
    const int64_t ge = e == num_experts ? 0 : e;
    if (!impl.gate_up_valid[e]) {
      const WeightView& gu = weight_of(e, true);
      const auto* base = static_cast<const uint8_t*>(gu.data) + ge * gu.rows * gu.cols * dtype_bytes(gu.dtype);
      // W [n, k] row-major is the logical B [k, n] with row stride 1 and column stride k.
      impl.gate_up_packed[e] = PackedWeight::pack_operand(Operand{base, to_cpu(gu.dtype), 1, d}, d, gu.rows,
                                                          packed_dtype, impl.isa, paired, gu_mem + gu_off[e]);
      impl.gate_up_valid[e] = 1;
    }
    if (!impl.down_valid[e]) {
      const WeightView& dn = weight_of(e, false);
      const auto* base = static_cast<const uint8_t*>(dn.data) + ge * dn.rows * dn.cols * dtype_bytes(dn.dtype);
      impl.down_packed[e] = PackedWeight::pack_operand(Operand{base, to_cpu(dn.dtype), 1, dn.cols}, dn.cols, d,
                                                       packed_dtype, impl.isa, false, dn_mem + dn_off[e]);
      impl.down_valid[e] = 1;
    }
  });
}

// Builds the groups of the row space from the plan (or the Soft MoE slots).
RowSpace build_row_space(const MoeLayerConfig& c, const MoeParams& p,
                         const BasicRoutingPlan<float>& plan, int64_t num_sequences,
                         const float* hidden_states,  // [num_tokens, d_model]
                         const float* slot_inputs,    // Soft MoE: [routed rows, d_model]
                         const float* shared_scale) {  // [num_tokens] or null
  RowSpace rs;
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  const bool soft = c.routing.routing_method == RoutingMethod::kSoftMoe;
  const int64_t slot_rows = num_sequences * c.routing.slots_per_expert;
  const size_t wsize_gu = dtype_bytes(p.gate_up.dtype), wsize_dn = dtype_bytes(p.down.dtype);
  for (int64_t e = 0; e < num_experts; ++e) {
    Group g;
    g.expert = e;
    g.d_ff = c.d_ff;
    g.gu_cols = c.gate_up_rows();
    if (soft) {
      g.row_begin = e * slot_rows;
      g.num_rows = slot_rows;
      g.a = slot_inputs + g.row_begin * d;
    } else {
      g.row_begin = plan.expert_offsets[e];
      g.num_rows = plan.expert_offsets[e + 1] - plan.expert_offsets[e];
      g.a = hidden_states;
      g.a_rows = plan.expert_tokens.data() + g.row_begin;
      g.scale = plan.expert_weights.data() + g.row_begin;
    }
    g.w_gate_up = static_cast<const uint8_t*>(p.gate_up.data) + e * g.gu_cols * d * wsize_gu;
    g.w_down = static_cast<const uint8_t*>(p.down.data) + e * d * c.d_ff * wsize_dn;
    g.w_gate_up_dtype = p.gate_up.dtype;
    g.w_down_dtype = p.down.dtype;
    if (!p.gate_up_bias.empty()) g.b_gate_up = p.gate_up_bias.data() + e * g.gu_cols;
    if (!p.down_bias.empty()) g.b_down = p.down_bias.data() + e * d;
    rs.groups.push_back(g);
  }
  rs.routed_rows = soft ? num_experts * slot_rows : plan.num_kept();
  rs.total_rows = rs.routed_rows;
  if (c.has_shared()) {
    Group g;
    g.expert = num_experts;
    g.d_ff = c.effective_shared_d_ff();
    g.gu_cols = c.shared_gate_up_rows();
    g.row_begin = rs.routed_rows;
    g.num_rows = plan.num_tokens;
    g.a = hidden_states;
    g.scale = shared_scale;
    g.w_gate_up = p.shared_gate_up.data;
    g.w_down = p.shared_down.data;
    g.w_gate_up_dtype = p.shared_gate_up.dtype;
    g.w_down_dtype = p.shared_down.dtype;
    if (!p.shared_gate_up_bias.empty()) g.b_gate_up = p.shared_gate_up_bias.data();
    if (!p.shared_down_bias.empty()) g.b_down = p.shared_down_bias.data();
    rs.groups.push_back(g);
    rs.total_rows += plan.num_tokens;
  }
  for (Group& g : rs.groups) {
    g.h_offset = rs.h_size;
    g.gu_offset = rs.gu_size;
    rs.h_size += g.num_rows * g.d_ff;
    rs.gu_size += g.num_rows * g.gu_cols;
    rs.max_d_ff = std::max(rs.max_d_ff, g.d_ff);
  }
  return rs;
}

void check_finite_matrix(ConstMatrixView<float> m, const char* name) {
  for (int64_t i = 0; i < m.size(); ++i) {
    if (!std::isfinite(m.data[i])) {
      throw_input_error(name, "finite values",
                        detail::concat(m.data[i], " at [", i / m.cols, "][", i % m.cols, "]"));
    }
  }
}

// σ(⟨x_t, w_gate⟩) per token (Qwen2-MoE shared expert gate), accumulated in fp32 in index order.
std::vector<float> shared_gate_values(const MoeLayerConfig& c, const MoeParams& p,
                                      ConstMatrixView<float> x) {  // [num_tokens, d_model]
  std::vector<float> s(static_cast<size_t>(x.rows));
  for (int64_t t = 0; t < x.rows; ++t) {
    float z = 0;
    for (int64_t k = 0; k < c.d_model; ++k) z += x(t, k) * p.shared_gate[k];
    s[t] = 1.0f / (1.0f + std::exp(-z));
  }
  return s;
}

RouterParams<float> router_params_of(const MoeParams& p) {
  return {p.router_weight, p.router_bias, p.router_noise_weight};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward.

MoeForwardResult MoeLayer::forward(ConstMatrixView<float> hidden_states, const RoutingOptions& options) {
  const MoeLayerConfig& c = config_;
  Impl& impl = *impl_;
  const int64_t d = c.d_model;
  if (hidden_states.data == nullptr || hidden_states.rows <= 0) {
    throw_input_error("hidden_states", "a non-empty [num_tokens, d_model] matrix",
                      shape_text(hidden_states.rows, hidden_states.cols));
  }
  if (hidden_states.cols != d) {
    throw_input_error("hidden_states columns", detail::concat(d, " (d_model)"), hidden_states.cols);
  }
  if (hidden_states.rows > std::numeric_limits<int32_t>::max()) {
    throw_input_error("hidden_states rows", "< 2^31 tokens", hidden_states.rows);
  }
  check_finite_matrix(hidden_states, "hidden_states");
  impl.start_phases();
  const bool training = c.routing.training;
  impl.saved = Impl::Saved{};
  ensure_router_packed(c, params_, impl, /*paired=*/!training);
  impl.phase("pack_router");

  RoutingOptions routing_options = options;
  routing_options.num_threads = c.num_threads;
  MoeForwardResult result;
  // Router logits. Without input jitter or noisy gating (which route_hidden implements) they
  // are one fp32 GEMM on the packed router weight, x · W_routerᵀ + b, and routing starts from
  // them; this keeps the router at GEMM speed (the routing core's projection is a plain loop).
  const bool jitter = c.routing.router_jitter_noise > 0 && (c.routing.training || c.routing.noise_in_eval);
  const bool router_by_gemm = !jitter && !c.routing.noisy_gating;
  if (router_by_gemm) {
    Matrix<float> logits(hidden_states.rows, c.router_rows());
    const std::vector<Group> whole(1, Group{.num_rows = hidden_states.rows});
    const auto tiles = make_tiles(whole, [](const Group& g) { return g.num_rows; },
                                  [&](const Group&) { return c.router_rows(); }, impl.pool.num_threads());
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      GemmProblem q;
      q.m = hidden_states.rows;
      q.n = c.router_rows();
      q.k = d;
      q.a = {hidden_states.data, cpu::DType::kF32, d, 1};
      q.c = logits.values.data();
      q.ldc = q.n;
      q.epilogue.bias = params_.router_bias.empty() ? nullptr : params_.router_bias.data();
      cpu::gemm_packed(q, impl.router_packed, tile.m0, tile.m1, tile.n0, tile.n1);
    });
    impl.phase("router");
    result.routing = route_logits(c.routing, logits.cview(), routing_options);
  } else {
    result.routing = route_hidden(c.routing, hidden_states, router_params_of(params_), routing_options);
  }
  impl.phase("routing");
  const BasicRoutingPlan<float>& plan = result.routing.plan;
  const int64_t num_tokens = hidden_states.rows;
  const bool soft = c.routing.routing_method == RoutingMethod::kSoftMoe;
  const int64_t seq_len = result.routing.saved.sequence_length;
  const int64_t num_sequences = num_tokens / seq_len;
  const int64_t per_expert = c.routing.slots_per_expert, num_slots = plan.num_slots;

  // Soft MoE slot inputs, expert-major: X̃[e, g, s] = Σ_{t in g} dispatch[t, e·S + s] · x_t, one
  // GEMM per (sequence, expert): [S, L] (dispatch block, transposed) · [L, d_model].
  Matrix<float> slot_inputs;
  if (soft) {
    slot_inputs = Matrix<float>(c.num_experts() * num_sequences * per_expert, d);
    impl.pool.run(num_sequences * c.num_experts(), [&](int64_t task, int) {
      const int64_t g = task / c.num_experts(), e = task % c.num_experts();
      GemmProblem q;
      q.m = per_expert;
      q.n = d;
      q.k = seq_len;
      q.a = {plan.dispatch.data() + g * seq_len * num_slots + e * per_expert, cpu::DType::kF32, 1, num_slots};
      q.b = {hidden_states.row(g * seq_len), cpu::DType::kF32, d, 1};
      q.c = slot_inputs.row((e * num_sequences + g) * per_expert);
      q.ldc = d;
      cpu::gemm(q, impl.isa, 0, q.m, 0, q.n);
    });
  }

  std::vector<float> gate;
  if (c.shared_expert_gate) gate = shared_gate_values(c, params_, hidden_states);
  const MoeParams& wp = compute_params();
  const RowSpace rs = build_row_space(c, wp, plan, num_sequences, hidden_states.data,
                                      slot_inputs.values.data(), gate.empty() ? nullptr : gate.data());
  const int threads = impl.pool.num_threads();
  const bool bf16 = c.dtype == DType::kBF16;
  impl.phase("dispatch");
  // Training reads the weights of groups with at most kWeightRowsInPlace rows in place (they
  // change every step: packing them would cost more than the GEMM); inference packs once.
  const int64_t unpacked_rows = training ? kWeightRowsInPlace : 0;
  auto in_place = [&](const Group& g) { return g.num_rows <= unpacked_rows; };
  ensure_experts_packed(c, wp, impl, rs.groups, unpacked_rows);
  impl.phase("pack_experts");

  // GEMM 1. Inference: h = act(X · W_gate_upᵀ + b) straight from the epilogue (bf16 when the
  // layer is bf16: it is the next GEMM's input). Training: the raw pre-activations, kept for
  // backward; h is recomputed from them tile by tile in GEMM 2.
  std::vector<float> pre;
  float* h32 = nullptr;
  uint16_t* h16 = nullptr;
  const cpu::Activation act = epilogue_activation(c.activation);
  if (training) {
    pre.resize(static_cast<size_t>(rs.gu_size));
  } else if (bf16) {
    h16 = impl.hidden_ws.get<uint16_t>(rs.h_size);
  } else {
    h32 = impl.hidden_ws.get<float>(rs.h_size);
  }
  {
    const auto tiles = make_tiles(
        rs.groups, [](const Group& g) { return g.num_rows; },
        [&](const Group& g) { return training ? g.gu_cols : g.d_ff; }, threads);
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      GemmProblem q;
      q.m = g.num_rows;
      q.k = d;
      q.a = {g.a, cpu::DType::kF32, d, 1, g.a_rows};
      q.epilogue.bias = g.b_gate_up;
      if (training) {
        q.n = g.gu_cols;
        q.c = pre.data() + g.gu_offset;
      } else {
        q.n = g.d_ff;
        q.epilogue.activation = act;
        q.epilogue.clamp_limit = float(c.activation_constants.clamp_limit);
        q.epilogue.clamp_alpha = float(c.activation_constants.clamp_alpha);
        q.c = bf16 ? static_cast<void*>(h16 + g.h_offset) : static_cast<void*>(h32 + g.h_offset);
        q.c_dtype = bf16 ? cpu::DType::kBF16 : cpu::DType::kF32;
      }
      q.ldc = q.n;
      if (in_place(g)) {
        cpu::gemm_weight_rows(q, g.w_gate_up, to_cpu(g.w_gate_up_dtype), d, impl.isa, tile.m0, tile.m1, tile.n0,
                              tile.n1, bf16);
      } else {
        cpu::gemm_packed(q, impl.gate_up_packed[g.expert], tile.m0, tile.m1, tile.n0, tile.n1);
      }
    });
  }
  impl.phase("gemm1");

  // GEMM 2: y = scale ⊙ (h · W_downᵀ + b_down), per assignment row.
  MatrixView<float> y{impl.rows_ws.get<float>(rs.total_rows * d), rs.total_rows, d};
  {
    // Training recomputes h per tile, so its tiles span every column unless that leaves too few.
    const auto tiles = make_tiles(
        rs.groups, [](const Group& g) { return g.num_rows; }, [&](const Group&) { return d; }, threads,
        kRowBlock, training ? std::max(d, kMaxColBlock) : kMaxColBlock);
    std::vector<std::vector<float>> scratch(static_cast<size_t>(threads));
    impl.run_tiles(tiles, [&](const Tile& tile, int thread) {
      const Group& g = rs.groups[tile.group];
      GemmProblem q;
      q.n = d;
      q.k = g.d_ff;
      q.ldc = d;
      q.epilogue.bias = g.b_down;
      if (training) {
        // h for this row block, from the saved pre-activations.
        const int64_t rows = tile.m1 - tile.m0, f = g.d_ff;
        std::vector<float>& hs = scratch[static_cast<size_t>(thread)];
        hs.resize(static_cast<size_t>(rows * f));
        const bool gated = is_gated(c.activation);
        for (int64_t i = 0; i < rows; ++i) {
          const float* a = pre.data() + g.gu_offset + (tile.m0 + i) * g.gu_cols;
          if (c.activation == ExpertActivation::kSwiGlu) {
            cpu::swiglu_forward_row(impl.isa, a, a + f, f, false, hs.data() + i * f);
            continue;
          }
          for (int64_t j = 0; j < f; ++j)
            hs[i * f + j] = activation_forward(c.activation, a[j], gated ? a[f + j] : 0.0f, c.activation_constants);
        }
        q.m = rows;
        q.a = {hs.data(), cpu::DType::kF32, f, 1};
        q.epilogue.row_scale = g.scale ? g.scale + tile.m0 : nullptr;
        q.c = y.row(g.row_begin + tile.m0);
        if (in_place(g)) {
          cpu::gemm_weight_rows(q, g.w_down, to_cpu(g.w_down_dtype), g.d_ff, impl.isa, 0, rows, tile.n0, tile.n1,
                                bf16);
        } else {
          cpu::gemm_packed(q, impl.down_packed[g.expert], 0, rows, tile.n0, tile.n1);
        }
      } else {
        q.m = g.num_rows;
        q.a = bf16 ? Operand{h16 + g.h_offset, cpu::DType::kBF16, g.d_ff, 1}
                   : Operand{h32 + g.h_offset, cpu::DType::kF32, g.d_ff, 1};
        q.epilogue.row_scale = g.scale;
        q.c = y.row(g.row_begin);
        cpu::gemm_packed(q, impl.down_packed[g.expert], tile.m0, tile.m1, tile.n0, tile.n1);
      }
    });
  }
  impl.phase("gemm2");

  // Combine, in a fixed order per token.
  result.output = Matrix<float>(num_tokens, d);
  Matrix<float>& out = result.output;
  const float* shared_y = c.has_shared() ? y.row(rs.routed_rows) : nullptr;
  if (soft) {
    // out_g = Σ_e combine[g, e·S:(e+1)·S] · Y[e, g]  ([L, S] · [S, d_model]), experts in order.
    impl.pool.run(num_sequences, [&](int64_t g, int) {
      for (int64_t e = 0; e < c.num_experts(); ++e) {
        GemmProblem q;
        q.m = seq_len;
        q.n = d;
        q.k = per_expert;
        q.a = {plan.combine.data() + g * seq_len * num_slots + e * per_expert, cpu::DType::kF32, num_slots, 1};
        q.b = {y.row((e * num_sequences + g) * per_expert), cpu::DType::kF32, d, 1};
        q.c = out.row(g * seq_len);
        q.ldc = d;
        q.accumulate = true;
        cpu::gemm(q, impl.isa, 0, q.m, 0, q.n);
      }
      if (shared_y)
        for (int64_t t = g * seq_len; t < (g + 1) * seq_len; ++t)
          for (int64_t k = 0; k < d; ++k) out(t, k) += shared_y[t * d + k];
    });
  } else {
    // Row of each kept selection: the inverse of plan.expert_selection.
    std::vector<int64_t> row_of(static_cast<size_t>(plan.num_selections()), -1);
    for (int64_t j = 0; j < plan.num_kept(); ++j) row_of[plan.expert_selection[j]] = j;
    impl.run_blocks(num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* o = out.row(t);
        for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
          if (row_of[i] < 0) continue;
          const float* src = y.row(row_of[i]);
          for (int64_t k = 0; k < d; ++k) o[k] += src[k];
        }
        if (shared_y)
          for (int64_t k = 0; k < d; ++k) o[k] += shared_y[t * d + k];
      }
    });
  }

  impl.phase("combine");

  if (training) {
    Impl::Saved& s = impl.saved;
    s.hidden_states = Matrix<float>(num_tokens, d);
    std::copy(hidden_states.data, hidden_states.data + hidden_states.size(), s.hidden_states.values.begin());
    s.routing = result.routing;
    s.router_by_gemm = router_by_gemm;
    s.pre_activations = std::move(pre);
    if (soft) {
      s.slot_inputs = std::move(slot_inputs);
      s.slot_outputs = Matrix<float>(rs.routed_rows, d);
      std::copy(y.data, y.data + rs.routed_rows * d, s.slot_outputs.values.begin());
    }
    s.valid = true;
    impl.phase("save");
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Backward.

Matrix<float> MoeLayer::backward(ConstMatrixView<float> d_output) {
  const MoeLayerConfig& c = config_;
  Impl& impl = *impl_;
  Impl::Saved& s = impl.saved;
  if (!s.valid) {
    throw_input_error("backward", "a preceding forward with routing.training = true (set_training)",
                      "no saved forward");
  }
  ensure_grads();
  const int64_t num_tokens = s.hidden_states.rows, d = c.d_model;
  if (d_output.data == nullptr || d_output.rows != num_tokens || d_output.cols != d) {
    throw_input_error("d_output shape", shape_text(num_tokens, d), shape_text(d_output.rows, d_output.cols));
  }
  check_finite_matrix(d_output, "d_output");
  impl.start_phases();
  s.valid = false;  // the pre-activations are overwritten by their gradients below

  const BasicRoutingPlan<float>& plan = s.routing.plan;
  const bool soft = c.routing.routing_method == RoutingMethod::kSoftMoe;
  const bool bf16 = c.dtype == DType::kBF16;
  const int64_t seq_len = s.routing.saved.sequence_length;
  const int64_t num_sequences = num_tokens / seq_len;
  const int64_t per_expert = c.routing.slots_per_expert, num_slots = plan.num_slots;
  const int threads = impl.pool.num_threads();
  const ConstMatrixView<float> x = s.hidden_states.cview();

  std::vector<float> gate;
  if (c.shared_expert_gate) gate = shared_gate_values(c, params_, x);
  RowSpace rs = build_row_space(c, compute_params(), plan, num_sequences, x.data, s.slot_inputs.values.data(),
                                gate.empty() ? nullptr : gate.data());

  RoutingGradOutput<float> routing_grad;
  routing_grad.d_aux_loss = c.routing.router_aux_loss_coef;
  routing_grad.d_z_loss = c.routing.router_z_loss_coef;

  // Where each group reads d_y: the gathered d_output, or (Soft MoE) the slot gradients
  //   d_Y[e, g] = combine[g, e·S:(e+1)·S]ᵀ · d_out_g,   d_combine[t, j] = ⟨d_out_t, Y_j⟩.
  Matrix<float> d_slots;
  if (soft) {
    d_slots = Matrix<float>(rs.routed_rows, d);
    routing_grad.d_combine.assign(static_cast<size_t>(num_tokens * num_slots), 0.0f);
    routing_grad.d_dispatch.assign(static_cast<size_t>(num_tokens * num_slots), 0.0f);
    impl.pool.run(num_sequences * c.num_experts(), [&](int64_t task, int) {
      const int64_t g = task / c.num_experts(), e = task % c.num_experts();
      const int64_t row = (e * num_sequences + g) * per_expert;
      GemmProblem q;
      q.m = per_expert;
      q.n = d;
      q.k = seq_len;
      q.a = {plan.combine.data() + g * seq_len * num_slots + e * per_expert, cpu::DType::kF32, 1, num_slots};
      q.b = {d_output.row(g * seq_len), cpu::DType::kF32, d, 1};
      q.c = d_slots.row(row);
      q.ldc = d;
      cpu::gemm(q, impl.isa, 0, q.m, 0, q.n);
      GemmProblem r;
      r.m = seq_len;
      r.n = per_expert;
      r.k = d;
      r.a = {d_output.row(g * seq_len), cpu::DType::kF32, d, 1};
      r.b = {s.slot_outputs.row(row), cpu::DType::kF32, 1, d};
      r.c = routing_grad.d_combine.data() + g * seq_len * num_slots + e * per_expert;
      r.ldc = num_slots;
      cpu::gemm(r, impl.isa, 0, r.m, 0, r.n);
    });
    for (int64_t e = 0; e < c.num_experts(); ++e) rs.groups[e].dy = d_slots.row(rs.groups[e].row_begin);
    if (c.has_shared()) rs.groups.back().dy = d_output.data;
  } else {
    for (Group& g : rs.groups) g.dy = d_output.data;
  }
  impl.phase("setup");

  // Per-expert gradient pointers.
  auto d_gate_up_of = [&](const Group& g) {
    return g.expert < c.num_experts() ? grads_.gate_up.data() + g.expert * g.gu_cols * d : grads_.shared_gate_up.data();
  };
  auto d_down_of = [&](const Group& g) {
    return g.expert < c.num_experts() ? grads_.down.data() + g.expert * d * g.d_ff : grads_.shared_down.data();
  };
  auto d_gate_up_bias_of = [&](const Group& g) -> float* {
    if (!c.expert_bias) return nullptr;
    return g.expert < c.num_experts() ? grads_.gate_up_bias.data() + g.expert * g.gu_cols
                                      : grads_.shared_gate_up_bias.data();
  };
  auto d_down_bias_of = [&](const Group& g) -> float* {
    if (!c.expert_bias) return nullptr;
    return g.expert < c.num_experts() ? grads_.down_bias.data() + g.expert * d : grads_.shared_down_bias.data();
  };

  // Gradients of a group still pending zero are written, not accumulated (zero_grad()).
  auto pending_zero = [&](const Group& g) {
    return impl.grad_pending_zero[static_cast<size_t>(std::min(g.expert, c.num_experts()))] != 0;
  };

  auto rows_of = [](const Group& g) { return g.num_rows; };
  // hg: G = d_y · W_down and the recomputed h, [rows, d_ff] blocks each; later the transposed
  // d_pre [gu_cols, rows] blocks (gu_size ≤ 2·h_size since gu_cols ≤ 2·d_ff).
  float* hg = impl.hidden_ws.get<float>(std::max(2 * rs.h_size, rs.gu_size));
  float* g_buf = hg;
  float* h_buf = hg + rs.h_size;
  // rows_buf: [d_model, rows] blocks of (w ⊙ d_y)ᵀ, then [rows, d_model] blocks of d_X, then X.
  float* rows_buf = impl.rows_ws.get<float>(rs.total_rows * d);
  auto rows_row = [&](int64_t row) { return rows_buf + row * d; };
  std::vector<float> d_w(static_cast<size_t>(rs.total_rows));  // dL/d scale per row
  std::vector<float>& pre = s.pre_activations;                 // becomes d_pre in place

  // B operands reused by every tile of a group are packed once per group (in parallel), in
  // B's own dtype exactly as gemm() would pack them per call: the same kernel, the same bits.
  // The packs live in one arena kept by the layer; the two uses below do not overlap in time.
  // A group with few rows and an fp32 weight is not packed: gemm() reads such a B in place
  // (the same kernel and bits), so a decode-sized backward streams each weight once instead of
  // reading it, writing a packed copy and reading that.
  auto in_place = [&](const Group& g, const Operand& b) {
    return !bf16 && b.dtype == cpu::DType::kF32 && g.num_rows <= cpu::detail_gemm::tuning().b_in_place_rows;
  };
  // pack_groups(arena, dtype, operand_of): the B of every group with rows packed in `dtype`
  // into `arena` (activations, packed on every call). pack_cached(cache, operand_of): the same
  // for weights in the layer's dtype, kept in `cache` at fixed offsets per group and packed only
  // when stale; groups read in place (in_place) get an empty weight.
  auto pack_groups = [&](Workspace& arena, cpu::DType dtype, auto operand_of) {
    const size_t num_groups = rs.groups.size();
    std::vector<PackedWeight> packed(num_groups);
    std::vector<size_t> offset(num_groups + 1, 0);
    for (size_t gi = 0; gi < num_groups; ++gi) {
      const Group& g = rs.groups[gi];
      int64_t k = 0, n = 0;
      operand_of(g, &k, &n);
      const size_t bytes = g.num_rows > 0 ? PackedWeight::packed_bytes(k, n, dtype, impl.isa) : 0;
      offset[gi + 1] = offset[gi] + (bytes + 63) / 64 * 64;
    }
    uint8_t* mem = arena.get<uint8_t>(static_cast<int64_t>(offset[num_groups]));
    impl.pool.run(static_cast<int64_t>(num_groups), [&](int64_t gi, int) {
      const Group& g = rs.groups[static_cast<size_t>(gi)];
      int64_t k = 0, n = 0;
      const Operand b = operand_of(g, &k, &n);
      if (g.num_rows <= 0) return;
      packed[static_cast<size_t>(gi)] = PackedWeight::pack_operand(b, k, n, dtype, impl.isa, false, mem + offset[gi]);
    });
    return packed;
  };
  const cpu::DType weight_dtype = to_cpu(c.dtype);
  auto pack_cached = [&](MoeLayer::Impl::PackCache& cache, auto operand_of) -> const std::vector<PackedWeight>& {
    const size_t num_groups = rs.groups.size();
    if (cache.valid.size() != num_groups) {
      cache.valid.assign(num_groups, 0);
      cache.packs.assign(num_groups, PackedWeight());
    }
    std::vector<size_t> offset(num_groups + 1, 0);
    for (size_t gi = 0; gi < num_groups; ++gi) {
      int64_t k = 0, n = 0;
      operand_of(rs.groups[gi], &k, &n);
      offset[gi + 1] = offset[gi] + (PackedWeight::packed_bytes(k, n, weight_dtype, impl.isa) + 63) / 64 * 64;
    }
    if (offset[num_groups] > cache.ws.capacity()) cache.invalidate();  // the arena moves
    uint8_t* mem = cache.ws.get<uint8_t>(static_cast<int64_t>(offset[num_groups]));
    std::vector<size_t> todo;
    for (size_t gi = 0; gi < num_groups; ++gi) {
      const Group& g = rs.groups[gi];
      int64_t k = 0, n = 0;
      if (g.num_rows > 0 && !in_place(g, operand_of(g, &k, &n)) && !cache.valid[gi]) todo.push_back(gi);
    }
    impl.pool.run(static_cast<int64_t>(todo.size()), [&](int64_t i, int) {
      const size_t gi = todo[static_cast<size_t>(i)];
      int64_t k = 0, n = 0;
      const Operand b = operand_of(rs.groups[gi], &k, &n);
      cache.packs[gi] = PackedWeight::pack_operand(b, k, n, weight_dtype, impl.isa, false, mem + offset[gi]);
      cache.valid[gi] = 1;
    });
    return cache.packs;
  };

  // 1. G = d_y · W_down  ([rows, d_model] · [d_model, d_ff]); W_down packed once per group.
  {
    const std::vector<PackedWeight>& down_b = pack_cached(impl.down_t,
        [&](const Group& g, int64_t* k, int64_t* n) {
          *k = d;
          *n = g.d_ff;
          return Operand{g.w_down, to_cpu(g.w_down_dtype), g.d_ff, 1};
        });
    impl.phase("pack_down_t");
    const auto tiles = make_tiles(rs.groups, rows_of, [](const Group& g) { return g.d_ff; }, threads);
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      GemmProblem q;
      q.m = g.num_rows;
      q.n = g.d_ff;
      q.k = d;
      q.a = {g.dy, cpu::DType::kF32, d, 1, g.a_rows};
      q.c = g_buf + g.h_offset;
      q.ldc = g.d_ff;
      const PackedWeight& b = down_b[static_cast<size_t>(tile.group)];
      if (b.data() != nullptr) {
        cpu::gemm_packed(q, b, tile.m0, tile.m1, tile.n0, tile.n1);
      } else {
        q.b = Operand{g.w_down, to_cpu(g.w_down_dtype), g.d_ff, 1};
        cpu::gemm(q, impl.isa, tile.m0, tile.m1, tile.n0, tile.n1);
      }
    });
  }
  impl.phase("d_h");

  // 2. Per row: h from the pre-activations (rounded as GEMM 2 saw it), d_w = ⟨G, h⟩ + ⟨d_y, b⟩,
  //    (w ⊙ d_y)ᵀ, and d_pre = act'(pre) ⊙ (w · G) in place of pre.
  {
    const auto tiles = make_tiles(rs.groups, rows_of, [](const Group&) { return int64_t{1}; }, threads);
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      const int64_t f = g.d_ff;
      const bool gated = is_gated(c.activation);
      float* scaled_t = rows_row(g.row_begin);  // [d_model, num_rows]
      for (int64_t i = tile.m0; i < tile.m1; ++i) {
        float* a = pre.data() + g.gu_offset + i * g.gu_cols;
        float* h = h_buf + g.h_offset + i * f;
        const float* gr = g_buf + g.h_offset + i * f;
        const float* dy = g.dy + g.src(i) * d;
        const float w = g.scale ? g.scale[i] : 1.0f;
        double dot = 0;
        if (c.activation == ExpertActivation::kSwiGlu) {
          dot = cpu::swiglu_backward_row(impl.isa, a, a + f, gr, w, f, bf16, h);
        } else {
          for (int64_t j = 0; j < f; ++j) {
            const float v = activation_forward(c.activation, a[j], gated ? a[f + j] : 0.0f, c.activation_constants);
            h[j] = bf16 ? round_bf16(v) : v;
            dot += double(gr[j]) * h[j];
          }
          for (int64_t j = 0; j < f; ++j) {
            float d_g = 0, d_u = 0;
            activation_backward(c.activation, a[j], gated ? a[f + j] : 0.0f, w * gr[j], c.activation_constants, &d_g,
                                &d_u);
            a[j] = d_g;
            if (gated) a[f + j] = d_u;
          }
        }
        if (g.scale) {
          if (g.b_down)
            for (int64_t k = 0; k < d; ++k) dot += double(dy[k]) * g.b_down[k];
          d_w[g.row_begin + i] = float(dot);
        }
      }
      // (w ⊙ d_y)ᵀ for this tile's rows: columns [m0, m1) of [d_model, num_rows].
      std::vector<const float*> dy_rows(static_cast<size_t>(tile.m1 - tile.m0));
      for (int64_t i = tile.m0; i < tile.m1; ++i) dy_rows[i - tile.m0] = g.dy + g.src(i) * d;
      cpu::transpose_rows(impl.isa, dy_rows.data(), g.scale ? g.scale + tile.m0 : nullptr, tile.m1 - tile.m0, d,
                          scaled_t + tile.m0, g.num_rows);
    });
  }
  impl.phase("activation");

  // The weight-gradient GEMMs tile their rows only (column blocks shrink only when there are
  // too few tiles): each tile then converts its A rows once for all columns (bf16 dW_gate_up:
  // 24 → 22 ms on the coarse shape).
  // 3. dW_down += (w ⊙ d_y)ᵀ · h  ([d_model, rows] · [rows, d_ff], the token sum inside one
  //    tile); db_down += Σ_rows w ⊙ d_y, in row order. h is packed once per group as B, in the
  //    layer's dtype: bf16 weight gradients come from bf16 operands (both rounded, as PyTorch's
  //    autocast runs its backward matmuls) with fp32 accumulation.
  const cpu::DType grad_dtype = to_cpu(c.dtype);
  {
    const std::vector<PackedWeight> h_b = pack_groups(
        impl.grad_pack_ws, grad_dtype, [&](const Group& g, int64_t* k, int64_t* n) {
          *k = g.num_rows;
          *n = g.d_ff;
          return Operand{h_buf + g.h_offset, cpu::DType::kF32, g.d_ff, 1};
        });
    impl.phase("pack_h");
    const auto tiles = make_tiles(
        rs.groups, [&](const Group& g) { return g.num_rows > 0 ? d : int64_t{0}; },
        [](const Group& g) { return g.d_ff; }, threads, kRowBlock, std::max(rs.max_d_ff, kMaxColBlock));
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      GemmProblem q;
      q.m = d;
      q.n = g.d_ff;
      q.k = g.num_rows;
      q.a = {rows_row(g.row_begin), cpu::DType::kF32, g.num_rows, 1};
      q.c = d_down_of(g);
      q.ldc = g.d_ff;
      q.accumulate = !pending_zero(g);
      cpu::gemm_packed(q, h_b[static_cast<size_t>(tile.group)], tile.m0, tile.m1, tile.n0, tile.n1);
    });
    if (c.expert_bias) {
      impl.pool.run(static_cast<int64_t>(rs.groups.size()), [&](int64_t gi, int) {
        const Group& g = rs.groups[gi];
        float* db_down = d_down_bias_of(g);
        const float* scaled_t = rows_row(g.row_begin);
        for (int64_t k = 0; k < d; ++k)
          for (int64_t i = 0; i < g.num_rows; ++i) db_down[k] += scaled_t[k * g.num_rows + i];
      });
    }
  }
  impl.phase("d_w_down");

  // 4. d_X = d_pre · W_gate_up  ([rows, gu_cols] · [gu_cols, d_model]); W_gate_up packed once
  //    per group.
  {
    const std::vector<PackedWeight>& gate_up_b = pack_cached(impl.gate_up_t,
        [&](const Group& g, int64_t* k, int64_t* n) {
          *k = g.gu_cols;
          *n = d;
          return Operand{g.w_gate_up, to_cpu(g.w_gate_up_dtype), d, 1};
        });
    impl.phase("pack_gate_up_t");
    const auto tiles = make_tiles(rs.groups, rows_of, [&](const Group&) { return d; }, threads);
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      GemmProblem q;
      q.m = g.num_rows;
      q.n = d;
      q.k = g.gu_cols;
      q.a = {pre.data() + g.gu_offset, cpu::DType::kF32, g.gu_cols, 1};
      q.c = rows_row(g.row_begin);
      q.ldc = d;
      const PackedWeight& b = gate_up_b[static_cast<size_t>(tile.group)];
      if (b.data() != nullptr) {
        cpu::gemm_packed(q, b, tile.m0, tile.m1, tile.n0, tile.n1);
      } else {
        q.b = Operand{g.w_gate_up, to_cpu(g.w_gate_up_dtype), d, 1};
        cpu::gemm(q, impl.isa, tile.m0, tile.m1, tile.n0, tile.n1);
      }
    });
  }
  impl.phase("d_x_rows");

  // 5. d_hidden_states: the rows of each token summed in a fixed order (or, for Soft MoE, the
  //    slot gradients mixed back by dispatch), then the shared gate.
  Matrix<float> d_x(num_tokens, d);
  const Group* shared = c.has_shared() ? &rs.groups.back() : nullptr;
  if (soft) {
    // d_x_g += Σ_e dispatch[g, e·S:(e+1)·S] · d_X̃[e, g];  d_dispatch[t, j] = ⟨x_t, d_X̃_j⟩.
    impl.pool.run(num_sequences, [&](int64_t g, int) {
      for (int64_t e = 0; e < c.num_experts(); ++e) {
        const int64_t row = (e * num_sequences + g) * per_expert;
        GemmProblem q;
        q.m = seq_len;
        q.n = d;
        q.k = per_expert;
        q.a = {plan.dispatch.data() + g * seq_len * num_slots + e * per_expert, cpu::DType::kF32, num_slots, 1};
        q.b = {rows_row(row), cpu::DType::kF32, d, 1};
        q.c = d_x.row(g * seq_len);
        q.ldc = d;
        q.accumulate = true;
        cpu::gemm(q, impl.isa, 0, q.m, 0, q.n);
        GemmProblem r;
        r.m = seq_len;
        r.n = per_expert;
        r.k = d;
        r.a = {x.row(g * seq_len), cpu::DType::kF32, d, 1};
        r.b = {rows_row(row), cpu::DType::kF32, 1, d};
        r.c = routing_grad.d_dispatch.data() + g * seq_len * num_slots + e * per_expert;
        r.ldc = num_slots;
        cpu::gemm(r, impl.isa, 0, r.m, 0, r.n);
      }
      if (shared)
        for (int64_t t = g * seq_len; t < (g + 1) * seq_len; ++t) {
          const float* r = rows_row(shared->row_begin + t);
          for (int64_t k = 0; k < d; ++k) d_x(t, k) += r[k];
        }
    });
  } else {
    std::vector<int64_t> row_of(static_cast<size_t>(plan.num_selections()), -1);
    for (int64_t j = 0; j < plan.num_kept(); ++j) row_of[plan.expert_selection[j]] = j;
    routing_grad.d_token_weights.assign(static_cast<size_t>(plan.num_selections()), 0.0f);
    for (int64_t i = 0; i < plan.num_selections(); ++i)
      if (row_of[i] >= 0) routing_grad.d_token_weights[i] = d_w[row_of[i]];
    impl.run_blocks(num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* o = d_x.row(t);
        for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
          if (row_of[i] < 0) continue;
          const float* r = rows_row(row_of[i]);
          for (int64_t k = 0; k < d; ++k) o[k] += r[k];
        }
        if (shared) {
          const float* r = rows_row(shared->row_begin + t);
          for (int64_t k = 0; k < d; ++k) o[k] += r[k];
        }
      }
    });
  }
  // Shared gate: out_t += σ(z_t) · S(x_t), z_t = ⟨x_t, w_gate⟩:  dz_t = d_w_t · σ(1 − σ).
  if (c.shared_expert_gate) {
    std::vector<float> dz(static_cast<size_t>(num_tokens));
    for (int64_t t = 0; t < num_tokens; ++t) dz[t] = d_w[shared->row_begin + t] * gate[t] * (1.0f - gate[t]);
    impl.run_blocks(num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t k = 0; k < d; ++k) d_x(t, k) += dz[t] * params_.shared_gate[k];
    });
    impl.run_blocks(d, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t k = begin; k < end; ++k) grads_.shared_gate[k] += dz[t] * x(t, k);
    });
  }

  impl.phase("d_x");

  // 6. dW_gate_up += d_preᵀ · X  ([gu_cols, rows] · [rows, d_model]). d_pre is transposed into
  //    hg and X gathered into rows_buf (rounded to bf16 as GEMM 1 saw it), so that both operands
  //    are read along their rows; db_gate_up += Σ_rows d_pre.
  {
    const auto tiles = make_tiles(rs.groups, rows_of, [](const Group&) { return int64_t{1}; }, threads);
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      std::vector<const float*> pre_rows(static_cast<size_t>(tile.m1 - tile.m0));
      for (int64_t i = tile.m0; i < tile.m1; ++i) pre_rows[i - tile.m0] = pre.data() + g.gu_offset + i * g.gu_cols;
      cpu::transpose_rows(impl.isa, pre_rows.data(), nullptr, tile.m1 - tile.m0, g.gu_cols, hg + g.gu_offset + tile.m0,
                          g.num_rows);
      for (int64_t i = tile.m0; i < tile.m1; ++i) {
        const float* src = g.a + g.src(i) * d;
        std::copy(src, src + d, rows_row(g.row_begin + i));
      }
    });
  }
  impl.phase("transpose");
  {
    const std::vector<PackedWeight> x_b = pack_groups(
        impl.grad_pack_ws, grad_dtype, [&](const Group& g, int64_t* k, int64_t* n) {
          *k = g.num_rows;
          *n = d;
          return Operand{rows_row(g.row_begin), cpu::DType::kF32, d, 1};
        });
    impl.phase("pack_x");
    const auto tiles = make_tiles(
        rs.groups, [](const Group& g) { return g.num_rows > 0 ? g.gu_cols : int64_t{0}; },
        [&](const Group&) { return d; }, threads, kRowBlock, std::max(d, kMaxColBlock));
    impl.run_tiles(tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      GemmProblem q;
      q.m = g.gu_cols;
      q.n = d;
      q.k = g.num_rows;
      q.a = {hg + g.gu_offset, cpu::DType::kF32, g.num_rows, 1};
      q.c = d_gate_up_of(g);
      q.ldc = d;
      q.accumulate = !pending_zero(g);
      cpu::gemm_packed(q, x_b[static_cast<size_t>(tile.group)], tile.m0, tile.m1, tile.n0, tile.n1);
    });
    if (c.expert_bias) {
      impl.pool.run(static_cast<int64_t>(rs.groups.size()), [&](int64_t gi, int) {
        const Group& g = rs.groups[gi];
        float* db_gate_up = d_gate_up_bias_of(g);
        const float* pre_t = hg + g.gu_offset;
        for (int64_t k = 0; k < g.gu_cols; ++k)
          for (int64_t i = 0; i < g.num_rows; ++i) db_gate_up[k] += pre_t[k * g.num_rows + i];
      });
    }
  }
  impl.phase("d_w_gate_up");

  for (const Group& g : rs.groups)
    if (g.num_rows > 0) impl.grad_pending_zero[static_cast<size_t>(std::min(g.expert, c.num_experts()))] = 0;

  // 7. Router: combine weights (or dispatch/combine) and the losses → logits → parameters.
  Matrix<float> d_noisy;
  const Matrix<float> d_logits = route_backward(c.routing, s.routing, routing_grad, &d_noisy);
  if (s.router_by_gemm) {
    // logits = x · W_routerᵀ + b:  d_x += d_logits · W_router,  dW_router += d_logitsᵀ · x,
    // db_router += Σ_t d_logits (token order).
    const int64_t rows = c.router_rows();
    const std::vector<Group> tokens(1, Group{.num_rows = num_tokens});
    impl.run_tiles(make_tiles(tokens, rows_of, [&](const Group&) { return d; }, threads),
                   [&](const Tile& tile, int) {
                     GemmProblem q;
                     q.m = num_tokens;
                     q.n = d;
                     q.k = rows;
                     q.a = {d_logits.values.data(), cpu::DType::kF32, rows, 1};
                     q.b = {params_.router_weight.data, cpu::DType::kF32, d, 1};
                     q.c = d_x.values.data();
                     q.ldc = d;
                     q.accumulate = true;
                     cpu::gemm(q, impl.isa, tile.m0, tile.m1, tile.n0, tile.n1);
                   });
    const std::vector<Group> experts(1, Group{.num_rows = rows});
    impl.run_tiles(make_tiles(experts, rows_of, [&](const Group&) { return d; }, threads, kUnpackedRowBlock),
                   [&](const Tile& tile, int) {
                     GemmProblem q;
                     q.m = rows;
                     q.n = d;
                     q.k = num_tokens;
                     q.a = {d_logits.values.data(), cpu::DType::kF32, 1, rows};
                     q.b = {x.data, cpu::DType::kF32, d, 1};
                     q.c = grads_.router_weight.data();
                     q.ldc = d;
                     q.accumulate = true;
                     cpu::gemm(q, impl.isa, tile.m0, tile.m1, tile.n0, tile.n1);
                   });
    for (int64_t e = 0; e < rows && !grads_.router_bias.empty(); ++e)
      for (int64_t t = 0; t < num_tokens; ++t) grads_.router_bias[e] += d_logits(t, e);
  } else {
    const RouterGrads<float> router = router_backward(c.routing, s.routing, x, router_params_of(params_),
                                                      d_logits.cview(), c.num_threads, d_noisy.cview());
    for (int64_t i = 0; i < int64_t(d_x.values.size()); ++i) d_x.values[i] += router.d_hidden_states.values[i];
    for (int64_t i = 0; i < int64_t(router.d_weight.values.size()); ++i)
      grads_.router_weight[i] += router.d_weight.values[i];
    for (size_t i = 0; i < router.d_bias.size() && i < grads_.router_bias.size(); ++i)
      grads_.router_bias[i] += router.d_bias[i];
    for (int64_t i = 0; i < int64_t(router.d_noise_weight.values.size()); ++i)
      grads_.router_noise_weight[i] += router.d_noise_weight.values[i];
  }

  impl.phase("router");
  impl.saved = Impl::Saved{};
  return d_x;
}

}  // namespace moekit
