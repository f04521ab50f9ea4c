#include "buffers.h"

#include <nanobind/ndarray.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace moekit::python {
namespace {

constexpr size_t kHuge = size_t{2} << 20;

// Freed buffers by size. At most twice the largest single request is kept (a step's gradients
// are requested one tensor at a time, so that bounds the pool by about two steps' worth of the
// largest tensor plus the others that fit); what does not fit is returned to the system.
class Pool {
 public:
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      largest_ = std::max(largest_, bytes);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        held_ -= bytes;
        return p;
      }
    }
    const size_t align = bytes >= kHuge ? kHuge : 64;
    const size_t rounded = std::max<size_t>(align, (bytes + align - 1) / align * align);
    void* p = std::aligned_alloc(align, rounded);
    if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (align == kHuge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only
#endif
    return p;
  }

  void release(void* p, size_t bytes) noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= 2 * largest_ + (size_t{64} << 20)) {
        free_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0;
  size_t largest_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: arrays may outlive static destruction
  return *p;
}

struct Block {
  void* data;
  size_t bytes;
};

}  // namespace

nb::object pooled_array(const std::vector<size_t>& shape, size_t itemsize) {
  size_t count = 1;
  for (size_t s : shape) count *= s;
  const size_t bytes = std::max<size_t>(1, count) * itemsize;
  auto* block = new Block{pool().acquire(bytes), bytes};
  nb::capsule owner(block, [](void* b) noexcept {
    auto* blk = static_cast<Block*>(b);
    pool().release(blk->data, blk->bytes);
    delete blk;
  });
  if (itemsize == 4) {
    return nb::cast(nb::ndarray<nb::numpy, float>(block->data, shape.size(), shape.data(), owner));
  }
  return nb::cast(nb::ndarray<nb::numpy, uint16_t>(block->data, shape.size(), shape.data(), owner));
}

size_t pooled_bytes() { return pool().held(); }

}  // namespace moekit::python
