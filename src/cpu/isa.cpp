// ISA detection (isa.h): the CPU's features through libgcc's cpu model, and MOEKIT_ISA.
#include "cpu/isa.h"

#include <cstdlib>
#include <string>

#include "moekit/error.h"

namespace moekit::cpu {

namespace {

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() {
  // libgcc's cpu model checks XCR0 (the OS saves zmm state) before reporting avx512*.
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
void cpu_init() { __builtin_cpu_init(); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512bf16() { return false; }
void cpu_init() {}
#endif

Isa parse_isa(const std::string& s) {
  if (s == "scalar") return Isa::kScalar;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") return Isa::kAvx512;
  if (s == "avx512bf16") return Isa::kAvx512Bf16;
  throw_input_error("MOEKIT_ISA", "one of scalar|avx2|avx512|avx512bf16", s);
}

}  // namespace

Isa detect_isa() {
  static const Isa best = [] {
    cpu_init();  // safe even when called from another static initialiser
    if (cpu_has_avx512bf16()) return Isa::kAvx512Bf16;
    if (cpu_has_avx512()) return Isa::kAvx512;
    if (cpu_has_avx2()) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return best;
}

Isa active_isa() {
  const Isa best = detect_isa();
  const char* env = std::getenv("MOEKIT_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa want = parse_isa(env);
  if (static_cast<int>(want) > static_cast<int>(best))
    throw_input_error("MOEKIT_ISA", std::string("at most ") + isa_name(best) +
                                        " (what this CPU and build support)",
                      env);
  return want;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (int i = 0; i <= static_cast<int>(detect_isa()); ++i) out.push_back(static_cast<Isa>(i));
  return out;
}

}  // namespace moekit::cpu
