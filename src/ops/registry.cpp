// The backend objects this build has. A new backend (src/cuda/) adds its implementation files and
// one row here; the layer, the stages and the other ops do not change.
#include <string>

#include "moekit/error.h"
#include "ops/backend.h"
#include "ops/expert_ffn.h"

namespace moekit {

namespace cpu {
const ops::BackendOps& cpu_backend();  // src/cpu/backend.cpp
}

namespace ops {

namespace {

struct BackendEntry {
  Backend kind;
  const BackendOps& (*get)();
};

constexpr BackendEntry kBackends[] = {
    {Backend::kCpu, &cpu::cpu_backend},
};

constexpr DType kWeightFormats[] = {DType::kF32, DType::kBF16, DType::kInt8, DType::kInt4, DType::kMxfp4};

const BackendOps* find_backend(Backend kind) {
  for (const BackendEntry& entry : kBackends)
    if (entry.kind == kind) return &entry.get();
  return nullptr;
}

// "cpu/fp32, cpu/bf16, ...": the (backend, weight format) pairs this build runs `op` on.
std::string supported_pairs(Op op, bool training) {
  std::string out;
  for (const BackendEntry& entry : kBackends)
    for (DType format : kWeightFormats)
      if (entry.get().supports(op, format, training))
        out += std::string(out.empty() ? "" : ", ") + backend_name(entry.kind) + "/" + dtype_name(format);
  return out;
}

}  // namespace

const char* op_name(Op op) {
  switch (op) {
    case Op::kRouter: return "router";
    case Op::kRouting: return "routing";
    case Op::kPermute: return "permute";
    case Op::kExperts: return "experts";
    case Op::kCombine: return "combine";
    case Op::kSoftSlots: return "soft_slots";
    case Op::kSharedGate: return "shared_gate";
  }
  return "?";
}

const BackendOps& backend_for(Backend kind) {
  if (const BackendOps* b = find_backend(kind)) return *b;
  std::string available;
  for (const BackendEntry& entry : kBackends) available += std::string(available.empty() ? "" : ", ") + backend_name(entry.kind);
  throw_config_error("backend", "one this build implements (" + available + ")", backend_name(kind));
}

void require_support(Backend kind, Op op, DType weight_format, bool training) {
  const BackendOps* b = find_backend(kind);
  if (b != nullptr && b->supports(op, weight_format, training)) return;
  if (training && b != nullptr && b->supports(op, weight_format, false)) {
    throw_config_error("dtype",
                       detail::concat("a weight format the ", backend_name(kind), " backend trains with (",
                                      supported_pairs(op, true), "): ", dtype_name(weight_format),
                                      " experts run inference only"),
                       dtype_name(weight_format));
  }
  throw_config_error("backend and dtype", "a pair this build implements (" + supported_pairs(op, false) + ")",
                     std::string(backend_name(kind)) + "/" + dtype_name(weight_format));
}

std::unique_ptr<ExpertFfn> make_expert_ffn(const ExpertFfnConfig& config) {
  require_support(config.backend, Op::kExperts, config.weight_format, false);
  return backend_for(config.backend).make_expert_ffn(config);
}

OpContext make_context(Backend kind, int num_threads) {
  OpContext ctx;
  ctx.backend = &backend_for(kind);
  ctx.num_threads = num_threads < 1 ? 1 : num_threads;
  return ctx;
}

OpContext default_context(int num_threads) { return make_context(Backend::kCpu, num_threads); }

}  // namespace ops
}  // namespace moekit
