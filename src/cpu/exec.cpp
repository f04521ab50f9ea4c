#include "cpu/exec.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace moekit {
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
