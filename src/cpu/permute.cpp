// CPU implementation of the permute op (src/ops/row_space.h): the permutation stays an index
// list, which the expert GEMMs gather their rows through, so no permuted copy is made.
#include "cpu/backend.h"
#include "ops/row_space.h"

namespace moekit::cpu {

void CpuBackend::permute_rows(const ops::OpContext&, const MoeLayerConfig& config, const RoutingPlan& plan,
                              const float* hidden_states, ExpertRows& rows) const {
  ops::index_permute_rows(config, plan, hidden_states, rows);
}

}  // namespace moekit::cpu
