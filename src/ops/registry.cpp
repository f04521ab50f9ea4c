// Which implementation of each op this build has, per (backend, weight format). A new backend
// (src/cuda/) or weight format adds its implementation files and one entry here; the layer and
// the other ops do not change.
#include <string>

#include "moekit/error.h"
#include "ops/expert_ffn.h"

namespace moekit {

namespace cpu {
std::unique_ptr<ops::ExpertFfn> make_cpu_expert_ffn(const ops::ExpertFfnConfig& config);
std::unique_ptr<ops::ExpertFfn> make_cpu_quant_expert_ffn(const ops::ExpertFfnConfig& config);  // inference only
}

namespace ops {

namespace {

struct ExpertFfnEntry {
  Backend backend;
  DType weight_format;
  std::unique_ptr<ExpertFfn> (*make)(const ExpertFfnConfig&);
};

constexpr ExpertFfnEntry kExpertFfns[] = {
    {Backend::kCpu, DType::kF32, &cpu::make_cpu_expert_ffn},
    {Backend::kCpu, DType::kBF16, &cpu::make_cpu_expert_ffn},
    {Backend::kCpu, DType::kInt8, &cpu::make_cpu_quant_expert_ffn},
    {Backend::kCpu, DType::kInt4, &cpu::make_cpu_quant_expert_ffn},
    {Backend::kCpu, DType::kMxfp4, &cpu::make_cpu_quant_expert_ffn},
};

}  // namespace

std::unique_ptr<ExpertFfn> make_expert_ffn(const ExpertFfnConfig& config) {
  std::string available;
  for (const ExpertFfnEntry& entry : kExpertFfns) {
    if (entry.backend == config.backend && entry.weight_format == config.weight_format) return entry.make(config);
    available += std::string(available.empty() ? "" : ", ") + backend_name(entry.backend) + "/" +
                 dtype_name(entry.weight_format);
  }
  throw_config_error("backend and dtype", "a pair this build implements (" + available + ")",
                     std::string(backend_name(config.backend)) + "/" + dtype_name(config.weight_format));
}

}  // namespace ops
}  // namespace moekit
