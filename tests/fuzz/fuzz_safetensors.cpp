// Fuzz target: SafetensorsFile::open on arbitrary bytes. The input is the whole file (8-byte
// header size, JSON header, data); open() maps it, so the input is written to a scratch file
// first. Checks: a bad file throws InputError and nothing else (no crash, no other exception);
// a file that opens has views inside its data section, in ascending order, not overlapping,
// each exactly Π shape · element size bytes, and every byte of every view is read (so a view
// past the mapping faults here and not in a caller).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "fuzz_common.h"
#include "moekit/error.h"
#include "moekit/safetensors.h"

namespace {

// A broken invariant of an opened file: a finding.
void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
    std::abort();
  }
}

void check_views(const moekit::SafetensorsFile& file, const uint8_t* data, size_t size) {
  // The data section is what follows the header, whose size the first 8 bytes give; open()
  // succeeded, so it is within the file.
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | data[i];
  const uint64_t data_size = size - 8 - header_size;
  const uint8_t* first = nullptr;  // the lowest view: every view lies in [first, first + data_size]
  const uint8_t* previous_end = nullptr;
  uint64_t sum = 0;
  for (const moekit::TensorView& t : file.tensors()) {
    const auto* begin = static_cast<const uint8_t*>(t.data);
    check(begin != nullptr && t.bytes >= 0, "a view without data or of negative size");
    check(t.bytes == t.num_elements() * moekit::tensor_dtype_size(t.dtype), "bytes != elements · element size");
    if (first == nullptr) first = begin;
    check(previous_end == nullptr || begin >= previous_end, "views out of order or overlapping");
    check(static_cast<uint64_t>(begin - first) + static_cast<uint64_t>(t.bytes) <= data_size,
          "a view beyond the data section");
    previous_end = begin + t.bytes;
    for (int64_t i = 0; i < t.bytes; ++i) sum += begin[i];
    check(file.find(t.name) == &t, "find() does not return the view of that name");
  }
  // Keep the sum alive so the reads are not optimised away.
  volatile uint64_t sink = sum;
  (void)sink;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const moekit::fuzz::ScratchFile scratch("model.safetensors");
  scratch.write(data, size);
  try {
    const moekit::SafetensorsFile file = moekit::SafetensorsFile::open(scratch.path());
    check_views(file, data, size);
  } catch (const moekit::InputError&) {
    // The expected outcome for a bad file.
  } catch (const std::exception& e) {
    moekit::fuzz::unexpected_exception("SafetensorsFile::open", e);
  }
  return 0;
}
