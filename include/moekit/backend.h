// Where the layer computes (the backend) and in what format its expert weights are stored and
// multiplied (the weight format). Each op picks its implementation from the pair at run time
// (src/ops/registry.cpp lists what this build has); a pair without one is a ConfigError naming
// both, raised when the layer is built, never in the middle of a forward.
#pragma once

namespace moekit {

enum class Backend {
  kCpu,   // x86-64 kernels chosen from the CPU's features (src/cpu/)
  kCuda,  // NVIDIA GPUs: named so configs can ask for it; this build has no implementation
};

// Element type of expert weights and activations. The router is always fp32.
//   kF32:  fp32 weights, fp32 GEMM inputs and accumulation.
//   kBF16: weights stored bf16, activations rounded to bf16 at each GEMM input, fp32
//          accumulation and fp32 output (the bf16 of PyTorch autocast).
//   kInt8, kInt4, kMxfp4: quantized expert weights (quant.h: the formats and how they are
//          chosen), for inference: activations are rounded to int8 per token in groups of
//          32 (a scale per group) at each GEMM input, integer products, fp32 accumulation
//          and fp32 output. A layer of such a dtype has no backward.
enum class DType { kF32, kBF16, kInt8, kInt4, kMxfp4 };

const char* backend_name(Backend backend);  // "cpu", "cuda"
const char* dtype_name(DType dtype);        // "fp32", "bf16", "int8", "int4", "mxfp4"

}  // namespace moekit
