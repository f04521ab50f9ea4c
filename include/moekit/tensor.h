// Minimal row-major matrix views and owning storage. Ops take views with explicit shapes so
// that the layer can run on parameter memory it does not own (Python, memory-mapped files).
#pragma once

#include <cstdint>
#include <vector>

namespace moekit {

// Non-owning view of a contiguous row-major [rows, cols] matrix.
template <typename T>
struct MatrixView {
  T* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  T* row(int64_t r) const { return data + r * cols; }
  T& operator()(int64_t r, int64_t c) const { return data[r * cols + c]; }
  int64_t size() const { return rows * cols; }
  bool empty() const { return rows == 0 || cols == 0; }
};

template <typename T>
using ConstMatrixView = MatrixView<const T>;

// Owning row-major matrix; zero-initialised.
template <typename T>
struct Matrix {
  std::vector<T> values;
  int64_t rows = 0;
  int64_t cols = 0;

  Matrix() = default;
  Matrix(int64_t num_rows, int64_t num_cols)
      : values(static_cast<size_t>(num_rows * num_cols), T(0)), rows(num_rows), cols(num_cols) {}

  T* row(int64_t r) { return values.data() + r * cols; }
  const T* row(int64_t r) const { return values.data() + r * cols; }
  T& operator()(int64_t r, int64_t c) { return values[static_cast<size_t>(r * cols + c)]; }
  const T& operator()(int64_t r, int64_t c) const {
    return values[static_cast<size_t>(r * cols + c)];
  }
  MatrixView<T> view() { return {values.data(), rows, cols}; }
  ConstMatrixView<T> view() const { return {values.data(), rows, cols}; }
  ConstMatrixView<T> cview() const { return {values.data(), rows, cols}; }
};

}  // namespace moekit
