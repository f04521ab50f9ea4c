#include "array.h"

#include <sstream>

#include "moekit/error.h"

namespace moekit::python {

const char* elem_name(Elem e) {
  switch (e) {
    case Elem::kF32: return "float32";
    case Elem::kBF16: return "bfloat16";
    case Elem::kI32: return "int32";
    case Elem::kI64: return "int64";
    case Elem::kU8: return "uint8";
    case Elem::kBool: return "bool";
  }
  return "?";
}

std::string dtype_text(const nb::dlpack::dtype& dt) {
  using Code = nb::dlpack::dtype_code;
  const char* kind = "?";
  switch (static_cast<Code>(dt.code)) {
    case Code::Int: kind = "int"; break;
    case Code::UInt: kind = "uint"; break;
    case Code::Float: kind = "float"; break;
    case Code::Bfloat: kind = "bfloat"; break;
    case Code::Complex: kind = "complex"; break;
    case Code::Bool: return "bool";
    default: break;
  }
  std::ostringstream out;
  out << kind << int(dt.bits);
  if (dt.lanes != 1) out << "x" << dt.lanes;
  return out.str();
}

namespace {

nb::dlpack::dtype dtype_of(Elem e) {
  switch (e) {
    case Elem::kF32: return nb::dtype<float>();
    case Elem::kBF16: return {static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
    case Elem::kI32: return nb::dtype<int32_t>();
    case Elem::kI64: return nb::dtype<int64_t>();
    case Elem::kU8: return nb::dtype<uint8_t>();
    case Elem::kBool: return nb::dtype<bool>();
  }
  return {};
}

}  // namespace

template <typename Array>
void check_array(const Array& a, const char* name, Elem want, const std::vector<int64_t>& shape, bool any_strides) {
  const nb::dlpack::dtype dt = a.dtype();
  if (!(dt == dtype_of(want))) {
    throw nb::type_error((std::string(name) + ": expected dtype " + elem_name(want) + ", got " + dtype_text(dt)).c_str());
  }
  if (a.device_type() != nb::device::cpu::value) {
    throw nb::value_error((std::string(name) + ": expected a CPU array (moekit runs on the CPU only), got one on device type " +
                           std::to_string(a.device_type()) + (a.device_type() == nb::device::cuda::value ? " (CUDA)" : ""))
                              .c_str());
  }
  const std::vector<int64_t> actual = shape_of(a);
  bool same = actual.size() == shape.size();
  for (size_t i = 0; same && i < shape.size(); ++i) same = shape[i] < 0 || shape[i] == actual[i];
  if (!same) {
    throw nb::value_error((std::string(name) + ": expected shape " + shape_text(shape, "*") + ", got " + shape_text(actual)).c_str());
  }
  if (any_strides) {
    for (size_t i = 0; i < a.ndim(); ++i) {
      if (a.stride(i) < 0) {
        throw nb::value_error((std::string(name) + ": expected non-negative strides, got " + std::to_string(a.stride(i)) +
                               " in dimension " + std::to_string(i)).c_str());
      }
    }
    if (a.size() > 0 && a.data() == nullptr) throw nb::value_error((std::string(name) + ": expected data, got a null pointer").c_str());
    return;
  }
  int64_t expected_stride = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected_stride) {
      std::ostringstream strides;
      strides << "(";
      for (size_t j = 0; j < a.ndim(); ++j) strides << (j ? ", " : "") << a.stride(j);
      strides << ")";
      throw nb::value_error((std::string(name) + ": expected a C-contiguous array (moekit reads it in place and does "
                                                 "not copy), got element strides " + strides.str() +
                             "; pass a contiguous array (numpy.ascontiguousarray, torch.Tensor.contiguous)")
                                .c_str());
    }
    expected_stride *= static_cast<int64_t>(a.shape(i));
  }
  if (a.size() > 0 && a.data() == nullptr) throw nb::value_error((std::string(name) + ": expected data, got a null pointer").c_str());
}

template void check_array<InArray>(const InArray&, const char*, Elem, const std::vector<int64_t>&, bool);
template void check_array<OutArray>(const OutArray&, const char*, Elem, const std::vector<int64_t>&, bool);

}  // namespace moekit::python
