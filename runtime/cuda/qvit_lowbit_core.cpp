// qvit_lowbit_core.cpp -- host-only part of the QvitLowBitLinear plugin core (see qvit_lowbit_core.h).
// C++14; needs neither CUDA nor TensorRT (tests compile and run it with g++).
#include "qvit_lowbit_core.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <stdexcept>

#include "lowbit_host.h"
#include "qvit_lowbit_format.h"

namespace qvit {

namespace {

constexpr uint32_t kSerialMagic = 0x424c5651u;  // "QVLB"
constexpr uint32_t kSerialVersion = 2;          // 1: uniform layers only; 2: + group_size, group_bits

std::string field_error(const FieldRef& f, const char* want) {
  return std::string("field ") + (f.name != nullptr ? f.name : "?") + " must be " + want;
}

int32_t field_int(const FieldRef& f) {
  if (f.length != 1 || f.data == nullptr) throw std::invalid_argument(field_error(f, "one integer"));
  if (f.kind == FieldKind::kInt32) return *static_cast<const int32_t*>(f.data);
  if (f.kind == FieldKind::kInt64) {
    const int64_t v = *static_cast<const int64_t*>(f.data);
    if (v < INT32_MIN || v > INT32_MAX) throw std::invalid_argument(field_error(f, "an int32 value"));
    return static_cast<int32_t>(v);
  }
  throw std::invalid_argument(field_error(f, "an integer (INT32/INT64)"));
}

std::vector<int32_t> field_ints(const FieldRef& f) {
  if (f.length < 0 || (f.length > 0 && f.data == nullptr)) throw std::invalid_argument(field_error(f, "a tensor"));
  std::vector<int32_t> v(static_cast<size_t>(f.length));
  if (f.kind == FieldKind::kInt32) {
    if (f.length > 0) std::memcpy(v.data(), f.data, v.size() * sizeof(int32_t));
  } else if (f.kind == FieldKind::kInt64) {
    const int64_t* d = static_cast<const int64_t*>(f.data);
    for (size_t i = 0; i < v.size(); ++i) {
      if (d[i] < INT32_MIN || d[i] > INT32_MAX) throw std::invalid_argument(field_error(f, "int32 values"));
      v[i] = static_cast<int32_t>(d[i]);
    }
  } else {
    throw std::invalid_argument(field_error(f, "an int32 tensor"));
  }
  return v;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400u), exp - 25);
  }
  return sign ? -v : v;
}

std::vector<float> field_floats(const FieldRef& f) {
  if (f.length < 0 || (f.length > 0 && f.data == nullptr)) throw std::invalid_argument(field_error(f, "a tensor"));
  std::vector<float> v(static_cast<size_t>(f.length));
  for (size_t i = 0; i < v.size(); ++i) {
    switch (f.kind) {
      case FieldKind::kFloat32: v[i] = static_cast<const float*>(f.data)[i]; break;
      case FieldKind::kFloat64: v[i] = static_cast<float>(static_cast<const double*>(f.data)[i]); break;
      case FieldKind::kFloat16: v[i] = half_to_float(static_cast<const uint16_t*>(f.data)[i]); break;
      default: throw std::invalid_argument(field_error(f, "a float32 tensor"));
    }
  }
  return v;
}

int attr_index(const char* name) {
  for (int a = 0; a < kNumLowbitAttrs; ++a) {
    if (std::strcmp(name, lowbit_attr_name(a)) == 0) return a;
  }
  return -1;
}

void set_field(LowBitLinearParams& p, int attr, const FieldRef& f) {
  switch (attr) {
    case kAttrBits: p.bits = field_int(f); break;
    case kAttrInFeatures: p.in_features = field_int(f); break;
    case kAttrOutFeatures: p.out_features = field_int(f); break;
    case kAttrActLo: p.act_lo = field_int(f); break;
    case kAttrActHi: p.act_hi = field_int(f); break;
    case kAttrActBits: p.act_bits = field_int(f); break;
    case kAttrGroupSize: p.group_size = field_int(f); break;
    case kAttrGroupBits: p.group_bits = field_ints(f); break;
    case kAttrActScale: {
      const std::vector<float> v = field_floats(f);
      if (v.size() != 1) throw std::invalid_argument("field act_scale must be one float");
      p.act_scale = v[0];
      break;
    }
    case kAttrWeightScale: p.weight_scale = field_floats(f); break;
    case kAttrBias: p.bias = field_floats(f); break;
    case kAttrWeightPacked: {
      const std::vector<int32_t> w = field_ints(f);
      p.weight_packed.resize(w.size());
      if (!w.empty()) std::memcpy(p.weight_packed.data(), w.data(), w.size() * sizeof(uint32_t));
      break;
    }
    default: break;  // plugin_version / plugin_namespace: informational
  }
}

// --- V2 blob helpers (little-endian hosts only: x86, ARM, like the packed format)
template <typename T>
void put(std::vector<char>& out, const T& v) {
  const char* b = reinterpret_cast<const char*>(&v);
  out.insert(out.end(), b, b + sizeof(T));
}

template <typename T>
void put_vec(std::vector<char>& out, const std::vector<T>& v) {
  put<uint32_t>(out, static_cast<uint32_t>(v.size()));
  const char* b = reinterpret_cast<const char*>(v.data());
  out.insert(out.end(), b, b + v.size() * sizeof(T));
}

class Reader {
 public:
  Reader(const void* data, size_t len) : p_(static_cast<const char*>(data)), end_(p_ + len) {}
  template <typename T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> get_vec() {
    const uint32_t n = get<uint32_t>();
    need(static_cast<size_t>(n) * sizeof(T));
    std::vector<T> v(n);
    if (n != 0) std::memcpy(v.data(), p_, static_cast<size_t>(n) * sizeof(T));
    p_ += static_cast<size_t>(n) * sizeof(T);
    return v;
  }
  bool done() const { return p_ == end_; }

 private:
  void need(size_t n) const {
    if (p_ == nullptr || static_cast<size_t>(end_ - p_) < n) throw std::runtime_error("truncated plugin data");
  }
  const char* p_;
  const char* end_;
};

}  // namespace

// ------------------------------------------------------------------ params

size_t LowBitLinearParams::expected_words() const {
  if (!mixed()) return static_cast<size_t>(out_features) * static_cast<size_t>(packed_words(in_features, bits));
  size_t words = 0;
  for (int r = 0; r < out_features; ++r) words += static_cast<size_t>(packed_words(in_features, row_bits(r)));
  return words;
}

namespace {

// The bounds every size computation relies on (before expected_words, the group count, the bias default).
std::string dims_error(const LowBitLinearParams& p) {
  if (!is_packed_bits(p.bits)) return "bits=" + std::to_string(p.bits) + " (packed weights exist for 2/3/4)";
  if (p.in_features <= 0 || p.out_features <= 0 || p.in_features > kMaxLowbitFeatures ||
      p.out_features > kMaxLowbitFeatures) {
    return "in_features and out_features must be in 1.." + std::to_string(kMaxLowbitFeatures) + " (got " +
           std::to_string(p.in_features) + ", " + std::to_string(p.out_features) + ")";
  }
  if (p.group_size < 0 || p.group_size > kMaxLowbitFeatures) {
    return "group_size must be in 0.." + std::to_string(kMaxLowbitFeatures);
  }
  return std::string();
}

}  // namespace

std::string LowBitLinearParams::validate() const {
  const std::string dims = dims_error(*this);
  if (!dims.empty()) return dims;
  if (mixed()) {
    const size_t groups = static_cast<size_t>((out_features + group_size - 1) / group_size);
    if (group_bits.size() != groups) {
      return "group_bits has " + std::to_string(group_bits.size()) + " values, " + std::to_string(groups) +
             " groups of " + std::to_string(group_size) + " rows expected";
    }
    int widest = 0;
    for (int32_t b : group_bits) {
      if (!is_packed_bits(b)) return "group_bits holds " + std::to_string(b) + " (2/3/4 only)";
      widest = b > widest ? b : widest;
    }
    if (widest != bits) return "bits must be the widest of group_bits (" + std::to_string(widest) + ")";
  } else if (!group_bits.empty()) {
    return "group_bits given without group_size";
  }
  if (weight_packed.size() != expected_words()) {
    return "weight_packed has " + std::to_string(weight_packed.size()) + " words, expected " +
           std::to_string(expected_words());
  }
  if (weight_scale.size() != static_cast<size_t>(out_features)) return "weight_scale must have out_features values";
  if (bias.size() != static_cast<size_t>(out_features)) return "bias must have out_features values";
  for (float s : weight_scale) {
    if (!std::isfinite(s)) return "weight_scale must be finite";
  }
  if (!(act_scale > 0.0f) || !std::isfinite(act_scale)) return "act_scale must be a positive finite float";
  if (act_lo > act_hi || act_lo < -128 || act_hi > 127) return "[act_lo, act_hi] must be an INT8 sub-range";
  return std::string();
}

// ------------------------------------------------------------------ fields

FieldKind attr_kind(int attr) {
  switch (attr) {
    case kAttrWeightScale:
    case kAttrBias:
    case kAttrActScale:
      return FieldKind::kFloat32;
    case kAttrPluginVersion:
    case kAttrPluginNamespace:
      return FieldKind::kChar;
    default:
      return FieldKind::kInt32;
  }
}

LowBitLinearParams parse_fields(const FieldRef* fields, int32_t count) {
  if (fields == nullptr && count != 0) throw std::invalid_argument("no plugin fields");
  LowBitLinearParams p;
  bool seen[kNumLowbitAttrs] = {};
  for (int32_t i = 0; i < count; ++i) {
    const FieldRef& f = fields[i];
    if (f.name == nullptr) continue;
    const int attr = attr_index(f.name);
    if (attr < 0) continue;
    seen[attr] = true;
    set_field(p, attr, f);
  }
  const int required[] = {kAttrBits, kAttrInFeatures, kAttrOutFeatures, kAttrWeightPacked, kAttrWeightScale,
                          kAttrActScale, kAttrActLo, kAttrActHi};
  for (int a : required) {
    if (!seen[a]) throw std::invalid_argument(std::string("missing field ") + lowbit_attr_name(a));
  }
  if (seen[kAttrGroupSize] != seen[kAttrGroupBits]) {
    throw std::invalid_argument("group_size and group_bits come together");
  }
  const std::string dims = dims_error(p);  // before the bias default sizes a vector by out_features
  if (!dims.empty()) throw std::invalid_argument(dims);
  if (!seen[kAttrBias]) p.bias.assign(static_cast<size_t>(p.out_features), 0.0f);
  const std::string err = p.validate();
  if (!err.empty()) throw std::invalid_argument(err);
  return p;
}

LowBitLinearParams parse_serialized_fields(const FieldRef* fields, int32_t count) {
  int32_t version = 1;  // absent: fields serialized before the version field existed
  for (int32_t i = 0; fields != nullptr && i < count; ++i) {
    if (fields[i].name != nullptr && std::strcmp(fields[i].name, kFieldsVersionName) == 0) {
      version = field_int(fields[i]);
    }
  }
  if (version < 1 || version > kFieldsVersion) {
    throw std::invalid_argument(std::string(kFieldsVersionName) + " " + std::to_string(version) +
                                " is not readable by this plugin (1.." + std::to_string(kFieldsVersion) +
                                "): rebuild the engine or update the plugin");
  }
  return parse_fields(fields, count);
}

std::vector<FieldRef> to_fields(const LowBitLinearParams& p) {
  auto one = [](int attr, const void* data, FieldKind kind, size_t n) {
    return FieldRef{lowbit_attr_name(attr), kind, data, static_cast<int32_t>(n)};
  };
  std::vector<FieldRef> f = {
      one(kAttrBits, &p.bits, FieldKind::kInt32, 1),
      one(kAttrInFeatures, &p.in_features, FieldKind::kInt32, 1),
      one(kAttrOutFeatures, &p.out_features, FieldKind::kInt32, 1),
      one(kAttrWeightPacked, p.weight_packed.data(), FieldKind::kInt32, p.weight_packed.size()),
      one(kAttrWeightScale, p.weight_scale.data(), FieldKind::kFloat32, p.weight_scale.size()),
      one(kAttrBias, p.bias.data(), FieldKind::kFloat32, p.bias.size()),
      one(kAttrActScale, &p.act_scale, FieldKind::kFloat32, 1),
      one(kAttrActLo, &p.act_lo, FieldKind::kInt32, 1),
      one(kAttrActHi, &p.act_hi, FieldKind::kInt32, 1),
      one(kAttrActBits, &p.act_bits, FieldKind::kInt32, 1),
  };
  if (p.mixed()) {
    f.push_back(one(kAttrGroupSize, &p.group_size, FieldKind::kInt32, 1));
    f.push_back(one(kAttrGroupBits, p.group_bits.data(), FieldKind::kInt32, p.group_bits.size()));
  }
  return f;
}

// ------------------------------------------------------------------ V2 blob

std::vector<char> serialize_params(const LowBitLinearParams& p) {
  std::vector<char> out;
  put<uint32_t>(out, kSerialMagic);
  put<uint32_t>(out, kSerialVersion);
  for (int32_t v : {p.bits, p.in_features, p.out_features, p.act_lo, p.act_hi, p.act_bits}) put<int32_t>(out, v);
  put<float>(out, p.act_scale);
  put_vec(out, p.weight_packed);
  put_vec(out, p.weight_scale);
  put_vec(out, p.bias);
  put<int32_t>(out, p.group_size);
  put_vec(out, p.group_bits);
  return out;
}

LowBitLinearParams deserialize_params(const void* data, size_t length) {
  Reader r(data, length);
  if (r.get<uint32_t>() != kSerialMagic) throw std::runtime_error("not a QvitLowBitLinear plugin blob");
  const uint32_t version = r.get<uint32_t>();
  if (version < 1 || version > kSerialVersion) {
    throw std::runtime_error("plugin blob version " + std::to_string(version) + " is newer than this plugin (" +
                             std::to_string(kSerialVersion) + "): rebuild the engine or update the plugin");
  }
  LowBitLinearParams p;
  p.bits = r.get<int32_t>();
  p.in_features = r.get<int32_t>();
  p.out_features = r.get<int32_t>();
  p.act_lo = r.get<int32_t>();
  p.act_hi = r.get<int32_t>();
  p.act_bits = r.get<int32_t>();
  p.act_scale = r.get<float>();
  p.weight_packed = r.get_vec<uint32_t>();
  p.weight_scale = r.get_vec<float>();
  p.bias = r.get_vec<float>();
  if (version >= 2) {
    p.group_size = r.get<int32_t>();
    p.group_bits = r.get_vec<int32_t>();
  }
  if (!r.done()) throw std::runtime_error("trailing bytes in plugin blob");
  const std::string err = p.validate();
  if (!err.empty()) throw std::runtime_error(err);
  return p;
}

// ------------------------------------------------------------------ rules

bool supports_io_type(int pos, int dtype, int input_dtype) {
  // fp32 / fp16 in, the same type out.  int8 inputs are not advertised: TensorRT's scale for such a
  // tensor would have to equal act_scale, and the kernels quantize fp inputs themselves anyway.
  const bool fp = dtype == QVIT_DTYPE_F32 || dtype == QVIT_DTYPE_F16;
  if (pos == 0) return fp;
  if (pos == 1) return fp && dtype == input_dtype;
  return false;
}

int output_dtype(int input_dtype) {
  return (input_dtype == QVIT_DTYPE_F32 || input_dtype == QVIT_DTYPE_F16) ? input_dtype : -1;
}

size_t workspace_bytes(const LowBitLinearParams& p, int64_t max_m) {
  if (max_m <= 0 || max_m > INT32_MAX) return 0;
  const int m = static_cast<int>(max_m);
  size_t need = 0;
  for (int bits = kMinPackedBits; bits <= kMaxPackedBits; ++bits) {
    for (int kernel = QVIT_KERNEL_INVALID + 1; kernel < QVIT_NUM_KERNELS; ++kernel) {
      const size_t w = qvit_workspace_size(m, p.in_features, bits, kernel);
      need = w > need ? w : need;
    }
  }
  return need;
}

// ------------------------------------------------------------------ segments

namespace {

// One width's rows (qformat words `src`) -> the kernels' layouts.
void repack_segment(HostSegment& s, const uint32_t* src, int k, bool int4) {
  s.words.resize(static_cast<size_t>(qvit_repacked_rows(s.rows)) * qvit_repacked_words(k, s.bits));
  if (qvit_repack_weights(src, s.rows, k, s.bits, s.words.data()) != 0) throw std::runtime_error("weight repack failed");
  if (!int4) return;
  s.nib_words.resize(static_cast<size_t>(qvit_repacked_rows(s.rows)) * qvit_nib_words(k, s.bits));
  if (qvit_repack_weights_nib(src, s.rows, k, s.bits, s.nib_words.data()) != 0) {
    throw std::runtime_error("nibble-order weight repack failed");
  }
}

}  // namespace

bool int4_worthwhile(const LowBitLinearParams& p, int cc_major) {
  return cc_major >= 8 && qvit_act_fits_s4(p.act_lo, p.act_hi) != 0;
}

std::vector<HostSegment> build_segments(const LowBitLinearParams& p, bool int4) {
  std::vector<HostSegment> out;
  const int k = p.in_features;
  if (!p.mixed()) {
    HostSegment s;
    s.bits = p.bits;
    s.rows = p.out_features;
    repack_segment(s, p.weight_packed.data(), k, int4);
    out.push_back(std::move(s));
    return out;
  }
  std::vector<size_t> start(static_cast<size_t>(p.out_features));
  size_t off = 0;
  for (int r = 0; r < p.out_features; ++r) {
    start[static_cast<size_t>(r)] = off;
    off += static_cast<size_t>(packed_words(k, p.row_bits(r)));
  }
  for (int bits = kMinPackedBits; bits <= kMaxPackedBits; ++bits) {
    HostSegment s;
    s.bits = bits;
    std::vector<uint32_t> rows;  // this width's rows, qformat layout
    const size_t w = static_cast<size_t>(packed_words(k, bits));
    for (int r = 0; r < p.out_features; ++r) {
      if (p.row_bits(r) != bits) continue;
      s.col_map.push_back(r);
      const uint32_t* src = p.weight_packed.data() + start[static_cast<size_t>(r)];
      rows.insert(rows.end(), src, src + w);
    }
    if (s.col_map.empty()) continue;
    s.rows = static_cast<int>(s.col_map.size());
    repack_segment(s, rows.data(), k, int4);
    out.push_back(std::move(s));
  }
  return out;
}

int path_from_env() {
  const char* v = std::getenv("QVIT_LOWBIT_PATH");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return QVIT_PATH_AUTO;
  if (std::strcmp(v, "a8") == 0) return QVIT_PATH_A8;
  if (std::strcmp(v, "a16") == 0) return QVIT_PATH_A16;
  if (std::strcmp(v, "a4") == 0) return QVIT_PATH_A4;
  std::cerr << "[qvit_plugins] QVIT_LOWBIT_PATH='" << v << "' is not auto/a8/a16/a4: using auto" << std::endl;
  return QVIT_PATH_AUTO;
}

}  // namespace qvit
