// Arrays across the Python boundary: checks of what comes in (dtype, device, rank, shape,
// layout), and arrays that take over the memory of what goes out. Nothing here copies:
// an input is read (or written) where it lies, an output hands its buffer to NumPy.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moekit::python {

namespace nb = nanobind;

// Any array-like that speaks DLPack or the buffer protocol (NumPy, PyTorch), read-only or not.
using InArray = nb::ndarray<nb::ro>;
// The same, written in place (gradient buffers): a read-only array is refused by nanobind.
using OutArray = nb::ndarray<>;

enum class Elem { kF32, kBF16, kI32, kI64, kU8, kBool };

const char* elem_name(Elem e);

template <typename Array>
std::vector<int64_t> shape_of(const Array& a) {
  std::vector<int64_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<int64_t>(a.shape(i));
  return s;
}

// Element type of `a`, or the text naming it (for error messages).
std::string dtype_text(const nb::dlpack::dtype& dt);

// Throws TypeError unless a's dtype is `want`, ValueError unless it lies in CPU memory, has
// `shape` (−1: any extent) and is C-contiguous (or, with `any_strides`, has non-negative
// strides: weights read through strided views). `name` is the argument's name.
template <typename Array>
void check_array(const Array& a, const char* name, Elem want, const std::vector<int64_t>& shape,
                 bool any_strides = false);

// The shape of a checked array; ConstMatrixView-style helpers.
template <typename T, typename Array>
const T* data_as(const Array& a) {
  return static_cast<const T*>(a.data());
}

// A NumPy array that owns `values` (moved, not copied).
template <typename T>
nb::object to_numpy(std::vector<T>&& values, std::vector<size_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(owned->data(), shape.size(), shape.data(), owner));
}

// A NumPy view of memory owned by `owner` (a Python object kept alive by the view).
template <typename T>
nb::object numpy_view(T* data, std::vector<size_t> shape, nb::handle owner) {
  return nb::cast(nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner), nb::rv_policy::reference);
}

}  // namespace moekit::python
