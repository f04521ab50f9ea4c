// The CPU backend: what it supports, the expert FFN per weight format, and the process's
// backend objects.
#include "cpu/backend.h"

#include <stdexcept>

#include "internal/bf16.h"
#include "moekit/quant.h"
#include "ops/expert_ffn.h"

namespace moekit::cpu {

std::unique_ptr<ops::ExpertFfn> make_cpu_expert_ffn(const ops::ExpertFfnConfig& config);        // expert_ffn.cpp
std::unique_ptr<ops::ExpertFfn> make_cpu_quant_expert_ffn(const ops::ExpertFfnConfig& config);  // quant_ffn.cpp

const char* CpuBackend::kernel_path() const { return isa_name(isa_); }

// Every op runs on every weight format except that the quantized formats (int8, int4, MXFP4)
// have no expert backward: they run inference only.
bool CpuBackend::supports(ops::Op op, moekit::DType weight_format, bool training) const {
  const bool known = weight_format == moekit::DType::kF32 || weight_format == moekit::DType::kBF16 || is_quantized(weight_format);
  if (!known) return false;
  if (op == ops::Op::kExperts && training) return !is_quantized(weight_format);
  return true;
}

std::unique_ptr<ops::ExpertFfn> CpuBackend::make_expert_ffn(const ops::ExpertFfnConfig& config) const {
  return is_quantized(config.weight_format) ? make_cpu_quant_expert_ffn(config) : make_cpu_expert_ffn(config);
}

// One object per kernel path: active_isa() is read each time (MOEKIT_ISA may lower it between
// layers, as the tests of every path do), so a layer keeps the path it was built with.
const ops::BackendOps& cpu_backend() {
  static const CpuBackend backends[] = {CpuBackend(Isa::kScalar), CpuBackend(Isa::kAvx2), CpuBackend(Isa::kAvx512),
                                        CpuBackend(Isa::kAvx512Bf16)};
  for (const CpuBackend& b : backends)
    if (b.isa() == active_isa()) return b;
  throw std::logic_error("cpu_backend: an ISA without a backend object");
}

}  // namespace moekit::cpu

namespace moekit::detail {

void float_to_bf16_n(const float* src, uint16_t* dst, int64_t n) { cpu::float_to_bf16_n(src, dst, n); }

}  // namespace moekit::detail
