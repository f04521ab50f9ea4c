// safetensors files: read memory-mapped (tensors are views into the mapping, no copy) and
// written.
//
// Format (huggingface/safetensors): an 8-byte little-endian header size N, N bytes of JSON
//   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32", "shape": [2, 3],
//    "data_offsets": [begin, end]}, ...}
// then the data; offsets are relative to the first byte after the header. The header is checked
// completely before any tensor is handed out: JSON well-formed with no repeated key, N within
// the file and at most kMaxHeaderBytes, every dtype known, every shape of non-negative extents,
// begin ≤ end within the data, (end − begin) = Π shape · element size, no two tensors
// overlapping, metadata values strings. A fault is an InputError naming the file, the tensor
// and the field.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moekit {

enum class TensorDType {
  kF64, kF32, kF16, kBF16, kF8E4M3, kF8E5M2, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool
};

const char* tensor_dtype_name(TensorDType dtype);  // "F32", "BF16", "F8_E4M3", ...
int64_t tensor_dtype_size(TensorDType dtype);      // bytes per element

// One tensor of a file: a view into its mapping (valid while the file is open).
struct TensorView {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // aligned as the file places it (not necessarily to the element)
  int64_t bytes = 0;
  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  static constexpr int64_t kMaxHeaderBytes = int64_t{100} << 20;  // as the reference reader

  // Maps `path` read-only and validates its header; throws InputError on any fault.
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::string& path() const;
  const std::map<std::string, std::string>& metadata() const;
  // In header order of their data (ascending offset).
  const std::vector<TensorView>& tensors() const;
  // nullptr when the file has no tensor of that name.
  const TensorView* find(const std::string& name) const;
  // The tensor, or an InputError naming the file and the missing name.
  const TensorView& at(const std::string& name) const;

 private:
  SafetensorsFile();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A tensor to write: `data` holds Π shape · element size bytes (not copied until write()).
struct TensorToWrite {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes `tensors` (their data back to back in the given order, after a header padded with
// spaces to a multiple of 8 bytes, as the reference writer does) and `metadata` to `path`,
// through a temporary file renamed at the end. Throws InputError on a repeated or empty name, a negative extent or an I/O failure.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moekit
