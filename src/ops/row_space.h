// The permute op: how a routing plan becomes the row segments of the grouped expert GEMMs
// (permute_rows, the permute stage's ExpertRows of moekit/stages.h), and how those segments,
// with the expert weights bound to them, become the row space the expert FFN runs on.
//
// Every (token, expert) assignment the experts compute is one row; rows are grouped by expert
// (the plan's counting sort: expert e owns rows [expert_offsets[e], expert_offsets[e+1]) with
// tokens ascending), and the shared expert, when present, is one more group owning num_tokens
// rows. Soft MoE rows are slots, expert-major: row (e, g, s) = e·num_sequences·slots_per_expert
// + g·slots_per_expert + s, so each expert's slots are contiguous. A group reads its A rows
// straight from hidden_states through the plan's token list (the GEMM's row gather): no
// permuted copy is made; rows that arrive from elsewhere (another process) are contiguous.
#pragma once

#include <cstdint>
#include <vector>

#include "moekit/backend.h"
#include "moekit/layer_config.h"
#include "moekit/params.h"
#include "moekit/plan.h"
#include "moekit/stages.h"
#include "ops/context.h"

namespace moekit::ops {

// One expert's share of the row space, with everything its GEMMs read.
struct Group {
  int64_t expert = 0;                 // weight index; num_experts is the shared expert
  int64_t d_ff = 0;                   // hidden width
  int64_t gu_cols = 0;                // pre-activation width: 2·d_ff (gated) or d_ff
  int64_t row_begin = 0;              // first row in the row space
  int64_t num_rows = 0;
  const float* a = nullptr;           // A rows: row i is a + src(i)·d_model
  const int32_t* a_rows = nullptr;    // src(i) = a_rows[i] (token index), or i when null
  const float* dy = nullptr;          // backward: d_y row i is dy + dy_src(i)·d_model
  const int32_t* dy_rows = nullptr;   // dy_src(i) = dy_rows[i], or i when null
  const float* scale = nullptr;       // [num_rows] combine weight / shared gate, or null (1)
  int64_t h_offset = 0;               // this group's [num_rows, d_ff] block in h-sized buffers
  int64_t gu_offset = 0;              // its [num_rows, gu_cols] block in the pre-activations
  WeightView w_gate_up;               // [gu_cols, d_model], one expert (expert_weight)
  WeightView w_down;                  // [d_model, d_ff], one expert
  const float* b_gate_up = nullptr;   // [gu_cols] or null
  const float* b_down = nullptr;      // [d_model] or null
  int64_t src(int64_t i) const { return a_rows ? a_rows[i] : i; }
  int64_t dy_src(int64_t i) const { return dy_rows ? dy_rows[i] : i; }
};

struct RowSpace {
  std::vector<Group> groups;
  int64_t total_rows = 0;
  int64_t routed_rows = 0;  // rows of routed experts; shared rows follow
  int64_t h_size = 0;       // Σ num_rows · d_ff
  int64_t gu_size = 0;      // Σ num_rows · gu_cols
  int64_t max_d_ff = 0;
};

// The weight of expert e of a stack (e = 0 for a shared expert's [1, rows, cols] view) as a
// one-expert view: experts = 1, data (and up_data, for a split gated weight) at expert e,
// explicit row and column strides, no per-expert lists; quantized: data and scales at the
// expert's first row of codes and of scales.
WeightView expert_weight(const WeightView& w, int64_t e);

// The permute op: the plan's rows as segments, and the shared expert's rows. `rows` receives the
// segments; its slot_inputs and shared_gate must already be filled. Dispatches to ctx.backend.
void permute_rows(const OpContext& ctx, const MoeLayerConfig& config, const RoutingPlan& plan,
                  const float* hidden_states,  // [num_tokens, d_model]
                  ExpertRows& rows);

// The permutation as index lists, no copy: routed segments gather hidden_states through the
// plan's token lists (Soft MoE's read `slot_inputs`); what a backend whose GEMMs gather rows
// (the CPU's) implements permute_rows with.
void index_permute_rows(const MoeLayerConfig& config, const RoutingPlan& plan,
                        const float* hidden_states,  // [num_tokens, d_model]
                        ExpertRows& rows);

// The row space of `rows` with the expert weights of `params` bound to each segment; with
// `d_y` (backward) each group reads its output gradient there.
RowSpace build_row_space(const MoeLayerConfig& config, const MoeParams& params, const ExpertRows& rows,
                         const ExpertRowGrads* d_y = nullptr);

// The row of each kept selection of the plan (the inverse of plan.expert_selection), −1 for a
// dropped one: [num_selections].
std::vector<int64_t> selection_rows(const RoutingPlan& plan);

}  // namespace moekit::ops
