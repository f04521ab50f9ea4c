// The GEMM oracle of the kernel tests: a plain triple loop with fp64 accumulation, written for
// clarity only, against which every ISA path of cpu::gemm is compared.
#pragma once

#include "cpu/gemm.h"

namespace moekit::cpu {

// The same contract as gemm() over the whole problem (rows [0, m), columns [0, n)): A' gathered
// and rounded to bf16 when B is bf16, the epilogue in fp64, one rounding at the store.
void gemm_reference(const GemmProblem& p);

}  // namespace moekit::cpu
