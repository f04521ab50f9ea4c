// safetensors reading (memory-mapped, validated header) and writing; see safetensors.h.
#include "moekit/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "io/json.h"
#include "moekit/error.h"

namespace moekit {

namespace {

struct DTypeName {
  TensorDType dtype;
  const char* name;
  int64_t size;
};

constexpr DTypeName kDTypes[] = {
    {TensorDType::kF64, "F64", 8},         {TensorDType::kF32, "F32", 4},   {TensorDType::kF16, "F16", 2},
    {TensorDType::kBF16, "BF16", 2},       {TensorDType::kF8E4M3, "F8_E4M3", 1},
    {TensorDType::kF8E5M2, "F8_E5M2", 1}, {TensorDType::kI64, "I64", 8},   {TensorDType::kI32, "I32", 4},
    {TensorDType::kI16, "I16", 2},         {TensorDType::kI8, "I8", 1},     {TensorDType::kU64, "U64", 8},
    {TensorDType::kU32, "U32", 4},         {TensorDType::kU16, "U16", 2},   {TensorDType::kU8, "U8", 1},
    {TensorDType::kBool, "BOOL", 1},
};

std::string known_dtypes() {
  std::string out = "one of";
  for (const DTypeName& d : kDTypes) out += std::string(" ") + d.name;
  return out;
}

[[noreturn]] void fail(const std::string& path, const std::string& where, const std::string& expected,
                       const std::string& actual) {
  throw InputError(detail::concat(path, ": ", where, ": expected ", expected, ", got ", actual));
}

// Π shape · size, or -1 on overflow.
int64_t byte_count(const std::vector<int64_t>& shape, int64_t size) {
  int64_t n = size;
  for (int64_t s : shape) {
    if (s != 0 && n > std::numeric_limits<int64_t>::max() / s) return -1;
    n *= s;
  }
  return n;
}

// __metadata__: an object of strings, each named "<file>: __metadata__.<key>".
void read_metadata(const io::Value& metadata, std::map<std::string, std::string>& out) {
  if (!metadata.json().is_object()) metadata.fail("an object of strings", metadata.json().type_name());
  for (const auto& [key, value] : metadata.members()) {
    if (!value.json().is_string()) value.fail("a string", value.json().type_name());
    out[key] = value.string();
  }
}

// One tensor's entry, named "<file>: tensor '<name>'", its keys "<file>: tensor '<name>' <key>":
// its dtype, its shape and its data_offsets [begin, end) within the `data_size` bytes of `data`,
// which must hold exactly Π shape · element size bytes. `begin` receives the offset.
TensorView read_tensor_entry(const io::Value& entry, const std::string& name, const uint8_t* data, int64_t data_size,
                             uint64_t* begin) {
  const nlohmann::json& v = entry.json();
  if (!v.is_object()) entry.fail("an object with dtype, shape and data_offsets", v.type_name());
  for (auto k = v.begin(); k != v.end(); ++k) {
    if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets") {
      entry.fail("only the keys dtype, shape and data_offsets", "key '" + k.key() + "'");
    }
  }
  const io::ObjectReader keys(v, io::Document::kInput, entry.path() + " ");
  const auto absent = [&](std::string_view key, const std::string& expected) {
    io::fail(io::Document::kInput, keys.path(key), expected, "none");
  };
  TensorView t;
  t.name = name;
  const std::optional<io::Value> dtype = keys.peek("dtype");
  if (!dtype || !dtype->json().is_string()) absent("dtype", known_dtypes());
  const std::string dt = dtype->string();
  const DTypeName* known = nullptr;
  for (const DTypeName& d : kDTypes)
    if (dt == d.name) known = &d;
  if (known == nullptr) dtype->fail(known_dtypes(), "\"" + dt + "\"");
  t.dtype = known->dtype;
  const std::optional<io::Value> shape = keys.peek("shape");
  if (!shape || !shape->json().is_array()) absent("shape", "an array of extents");
  for (const nlohmann::json& s : shape->json()) {
    if (!s.is_number_integer() || s.get<int64_t>() < 0) shape->fail("non-negative integer extents", s.dump());
    t.shape.push_back(s.get<int64_t>());
  }
  const std::optional<io::Value> offsets = keys.peek("data_offsets");
  if (!offsets) absent("data_offsets", "[begin, end] of non-negative integers");
  const nlohmann::json& o = offsets->json();
  if (!o.is_array() || o.size() != 2 || !o[0].is_number_unsigned() || !o[1].is_number_unsigned()) {
    offsets->fail("[begin, end] of non-negative integers", o.dump());
  }
  const uint64_t b = o[0].get<uint64_t>(), e = o[1].get<uint64_t>();
  if (b > e || e > static_cast<uint64_t>(data_size)) {
    offsets->fail(detail::concat("begin <= end <= ", data_size, " (the data's size)"), detail::concat("[", b, ", ", e, "]"));
  }
  const int64_t want = byte_count(t.shape, known->size);
  if (want < 0 || static_cast<uint64_t>(want) != e - b) {
    offsets->fail(detail::concat(want < 0 ? std::string("a shape whose size fits in 64 bits") : std::to_string(want),
                                 " bytes (", shape_text(t.shape), " × ", known->size, ")"),
                  detail::concat(e - b, " bytes"));
  }
  t.data = data + b;
  t.bytes = static_cast<int64_t>(e - b);
  *begin = b;
  return t;
}

}  // namespace

const char* tensor_dtype_name(TensorDType dtype) {
  for (const DTypeName& d : kDTypes)
    if (d.dtype == dtype) return d.name;
  return "?";
}

int64_t tensor_dtype_size(TensorDType dtype) {
  for (const DTypeName& d : kDTypes)
    if (d.dtype == dtype) return d.size;
  return 0;
}

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

struct SafetensorsFile::Impl {
  std::string path;
  void* map = nullptr;
  size_t map_size = 0;
  std::map<std::string, std::string> metadata;
  std::vector<TensorView> tensors;
  std::map<std::string, size_t> index;

  ~Impl() {
    if (map != nullptr && map != MAP_FAILED) munmap(map, map_size);
  }
};

SafetensorsFile::SafetensorsFile() : impl_(std::make_unique<Impl>()) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

const std::string& SafetensorsFile::path() const { return impl_->path; }
const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }
const std::vector<TensorView>& SafetensorsFile::tensors() const { return impl_->tensors; }

const TensorView* SafetensorsFile::find(const std::string& name) const {
  const auto it = impl_->index.find(name);
  return it == impl_->index.end() ? nullptr : &impl_->tensors[it->second];
}

const TensorView& SafetensorsFile::at(const std::string& name) const {
  if (const TensorView* t = find(name)) return *t;
  fail(impl_->path, "tensor '" + name + "'", "a tensor of that name", "none");
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  Impl& f = *file.impl_;
  f.path = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "open", "a readable file", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail(path, "stat", "a readable file", std::strerror(e));
  }
  const int64_t file_size = st.st_size;
  if (file_size < 8) {
    ::close(fd);
    fail(path, "header size", "at least 8 bytes in the file", detail::concat(file_size, " bytes"));
  }
  f.map_size = static_cast<size_t>(file_size);
  f.map = mmap(nullptr, f.map_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (f.map == MAP_FAILED) {
    f.map = nullptr;
    fail(path, "mmap", "a mappable file", std::strerror(map_errno));
  }
  const auto* bytes = static_cast<const uint8_t*>(f.map);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | bytes[i];  // little-endian
  if (header_size > static_cast<uint64_t>(kMaxHeaderBytes) || header_size > static_cast<uint64_t>(file_size - 8)) {
    fail(path, "header size", detail::concat("at most ", std::min<int64_t>(kMaxHeaderBytes, file_size - 8), " bytes"),
         std::to_string(header_size));
  }
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  const uint8_t* data = bytes + 8 + header_size;
  const int64_t data_size = file_size - 8 - static_cast<int64_t>(header_size);

  // The header is read through the strict JSON layer (nesting bounded, a repeated key rejected
  // by its path), its faults worded as "<file>: header: ..." and "<file>: tensor '<name>' ...".
  const io::ParsedJson parsed = io::parse_json(std::string_view(header, header_size));
  if (parsed.too_deep) {
    fail(path, "header", detail::concat("JSON nested at most ", io::kMaxJsonDepth, " levels"), "deeper nesting");
  }
  if (!parsed.invalid.empty()) fail(path, "header", "well-formed JSON", parsed.invalid);
  if (!parsed.repeated_path.empty()) fail(path, "header", "each key once", "key '" + parsed.repeated_path + "' repeated");
  const nlohmann::json& j = parsed.root;
  if (!j.is_object()) fail(path, "header", "a JSON object", j.type_name());

  struct Range {
    int64_t begin, end;
    size_t tensor;
  };
  std::vector<Range> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      read_metadata(io::Value(it.value(), path + ": __metadata__", io::Document::kInput), f.metadata);
      continue;
    }
    const io::Value entry(it.value(), path + ": tensor '" + name + "'", io::Document::kInput);
    uint64_t b = 0;
    TensorView t = read_tensor_entry(entry, name, data, data_size, &b);
    const uint64_t e = b + static_cast<uint64_t>(t.bytes);
    ranges.push_back({static_cast<int64_t>(b), static_cast<int64_t>(e), f.tensors.size()});
    f.tensors.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      fail(path, "tensor '" + f.tensors[ranges[i].tensor].name + "' data_offsets",
           "no overlap with another tensor", "overlap with '" + f.tensors[ranges[i - 1].tensor].name + "'");
    }
  }
  std::vector<TensorView> ordered;
  ordered.reserve(ranges.size());
  for (const Range& r : ranges) ordered.push_back(std::move(f.tensors[r.tensor]));
  f.tensors = std::move(ordered);
  for (size_t i = 0; i < f.tensors.size(); ++i) f.index[f.tensors[i].name] = i;
  return file;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  std::vector<int64_t> sizes;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second) {
      throw_input_error("tensor name", "a unique, non-empty name other than __metadata__", "\"" + t.name + "\"");
    }
    for (int64_t s : t.shape)
      if (s < 0) throw_input_error("tensor '" + t.name + "' shape", "non-negative extents", shape_text(t.shape));
    const int64_t bytes = byte_count(t.shape, tensor_dtype_size(t.dtype));
    if (bytes < 0) throw_input_error("tensor '" + t.name + "' shape", "a size that fits in 64 bits", shape_text(t.shape));
    if (bytes > 0 && t.data == nullptr) throw_input_error("tensor '" + t.name + "' data", "data", "a null pointer");
    header[t.name] = {{"dtype", tensor_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += static_cast<uint64_t>(bytes);
    sizes.push_back(bytes);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::string temp = path + ".tmp";
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) throw_input_error("output", "a writable path", path);
    uint8_t size_bytes[8];
    for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(size_bytes), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (size_t i = 0; i < tensors.size(); ++i)
      out.write(static_cast<const char*>(tensors[i].data), static_cast<std::streamsize>(sizes[i]));
    out.flush();
    if (!out) {
      std::remove(temp.c_str());
      throw_input_error("output", "a complete write", path);
    }
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(temp.c_str());
    throw_input_error("output", "a rename of the written file into place", std::string(path) + ": " + std::strerror(e));
  }
}

}  // namespace moekit
