// Recycled output buffers for the Python front end.
//
// A training step hands PyTorch fresh gradient tensors (as autograd expects: each backward's
// gradients are new tensors the caller may keep). Memory fresh from the system costs a page
// fault and a kernel-zeroed page per 4 KiB on first touch, which for the expert weight
// gradients (hundreds of MB) is a sizeable part of a step. Buffers from this pool come back to
// it when the array (and the torch tensor over it) is freed, typically at the next
// zero_grad(set_to_none=True), and are handed out again, already faulted in, for the next
// backward. Large buffers are 2 MiB aligned and advised as transparent huge pages.
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moekit::python {

namespace nb = nanobind;

// A NumPy array of `shape` with elements of `itemsize` bytes (4: float32, 2: uint16 for bf16
// bits), uninitialised, whose memory returns to the pool when the array is freed.
nb::object pooled_array(const std::vector<size_t>& shape, size_t itemsize);

// Bytes the pool holds for reuse (tests, diagnostics).
size_t pooled_bytes();

}  // namespace moekit::python
