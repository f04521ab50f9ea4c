// Which instruction set the CPU kernels run with: detected once from the CPU's features, and
// lowered on request (MOEKIT_ISA) so that every path can be run and compared on one machine.
#pragma once

#include <vector>

namespace moekit::cpu {

enum class Isa : int {
  kScalar = 0,      // plain C++: the oracle for every other path
  kAvx2 = 1,        // AVX2 + FMA
  kAvx512 = 2,      // AVX-512 F/BW/VL/DQ
  kAvx512Bf16 = 3,  // + AVX512-BF16 (vdpbf16ps) for bf16 operands
};

// The best ISA this CPU and this build support.
Isa detect_isa();
// detect_isa(), lowered by the environment variable MOEKIT_ISA (scalar|avx2|avx512|avx512bf16)
// when set; an unknown name or a request above what the CPU has is an error.
Isa active_isa();
const char* isa_name(Isa isa);
// Every ISA from kScalar up to detect_isa(), for tests that compare all paths.
std::vector<Isa> supported_isas();

}  // namespace moekit::cpu
