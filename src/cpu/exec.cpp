#include "cpu/exec.h"

#include <sys/mman.h>

#include "moekit/layer.h"

namespace moekit {
namespace ops {

void PhaseTimer::start(std::vector<PhaseTime>* out) {
  out_ = out;
  if (out_) out_->clear();
  start_ = std::chrono::steady_clock::now();
}

void PhaseTimer::phase(const char* name) {
  const auto now = std::chrono::steady_clock::now();
  if (out_) out_->push_back({name, std::chrono::duration<double, std::milli>(now - start_).count()});
  start_ = now;
}

}  // namespace ops

namespace cpu {

uint8_t* Workspace::bytes(size_t count) {
  if (count > size_) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t align = count >= kHuge ? kHuge : 64;
    const size_t rounded = (count + align - 1) / align * align;
    data_.reset(static_cast<uint8_t*>(std::aligned_alloc(align, rounded)));
    if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (align == kHuge) madvise(data_.get(), rounded, MADV_HUGEPAGE);  // advice only
#endif
    size_ = rounded;
  }
  return data_.get();
}

}  // namespace cpu
}  // namespace moekit
