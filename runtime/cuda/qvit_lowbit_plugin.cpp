// qvit_lowbit_plugin.cpp -- QvitLowBitLinear as a TensorRT IPluginV2DynamicExt (TensorRT 8.2 .. 10.x).
//
// Engine build / deserialize: the node's packed weights are repacked once (padding only, see
// qvit_repack_weights) and uploaded in initialize(); enqueue only launches kernels.
// Kernel choice per call: qvit_select_kernel(M, N, K, bits, input type, path, compute capability).
#include "qvit_lowbit_plugin.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <utility>

#include <cuda_runtime_api.h>

#include "lowbit_gemm.h"
#include "lowbit_host.h"
#include "qvit_lowbit_format.h"

namespace qvit {

namespace {

constexpr uint32_t kSerialMagic = 0x424c5651u;  // "QVLB"
constexpr uint32_t kSerialVersion = 1;

void log_error(const std::string& where, const std::string& what) {
  std::cerr << "[qvit_plugins] " << kLowbitOp << " " << where << ": " << what << std::endl;
}

bool cuda_ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  log_error(what, cudaGetErrorString(err));
  return false;
}

// --- serialization helpers (little-endian hosts only: x86, ARM, like the packed format)
template <typename T>
void put(char*& p, const T& v) {
  std::memcpy(p, &v, sizeof(T));
  p += sizeof(T);
}

template <typename T>
void put_vec(char*& p, const std::vector<T>& v) {
  put<uint32_t>(p, static_cast<uint32_t>(v.size()));
  if (!v.empty()) std::memcpy(p, v.data(), v.size() * sizeof(T));
  p += v.size() * sizeof(T);
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
    if (n != 0) std::memcpy(v.data(), p_, n * sizeof(T));
    p_ += static_cast<size_t>(n) * sizeof(T);
    return v;
  }
  bool done() const { return p_ == end_; }

 private:
  void need(size_t n) const {
    if (static_cast<size_t>(end_ - p_) < n) throw std::runtime_error("truncated serialized plugin data");
  }
  const char* p_;
  const char* end_;
};

int dtype_of(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return QVIT_DTYPE_F32;
    case nvinfer1::DataType::kHALF: return QVIT_DTYPE_F16;
    case nvinfer1::DataType::kINT8: return QVIT_DTYPE_I8;
    default: return -1;
  }
}

int path_from_env() {
  const char* v = std::getenv("QVIT_LOWBIT_PATH");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || v[0] == '\0') return QVIT_PATH_AUTO;
  if (std::strcmp(v, "a8") == 0) return QVIT_PATH_A8;
  if (std::strcmp(v, "a16") == 0) return QVIT_PATH_A16;
  log_error("QVIT_LOWBIT_PATH", std::string("unknown value '") + v + "', using auto");
  return QVIT_PATH_AUTO;
}

}  // namespace

// ------------------------------------------------------------------ params

std::string LowBitLinearParams::validate() const {
  if (!is_packed_bits(bits)) return "bits=" + std::to_string(bits) + " (packed weights exist for 2/3/4)";
  if (in_features <= 0 || out_features <= 0) return "in_features and out_features must be positive";
  const size_t words = static_cast<size_t>(out_features) * packed_words(in_features, bits);
  if (weight_packed.size() != words) {
    return "weight_packed has " + std::to_string(weight_packed.size()) + " words, expected " + std::to_string(words);
  }
  if (weight_scale.size() != static_cast<size_t>(out_features)) return "weight_scale must have out_features values";
  if (bias.size() != static_cast<size_t>(out_features)) return "bias must have out_features values";
  if (!(act_scale > 0.0f) || !std::isfinite(act_scale)) return "act_scale must be a positive finite float";
  if (act_lo > act_hi || act_lo < -128 || act_hi > 127) return "[act_lo, act_hi] must be an INT8 sub-range";
  return std::string();
}

// ------------------------------------------------------------------ device weights

struct LowBitDeviceWeights {
  uint32_t* w = nullptr;
  float* weight_scale = nullptr;
  float* bias = nullptr;
  int ldw = 0;

  LowBitDeviceWeights() = default;
  LowBitDeviceWeights(const LowBitDeviceWeights&) = delete;
  LowBitDeviceWeights& operator=(const LowBitDeviceWeights&) = delete;
  ~LowBitDeviceWeights() {
    cuda_ok(cudaFree(w), "cudaFree(weights)");
    cuda_ok(cudaFree(weight_scale), "cudaFree(weight_scale)");
    cuda_ok(cudaFree(bias), "cudaFree(bias)");
  }

  // One-time repack (host) + upload; false on any CUDA error.
  bool upload(const LowBitLinearParams& p) {
    const int rows = qvit_repacked_rows(p.out_features);
    ldw = qvit_repacked_words(p.in_features, p.bits);
    std::vector<uint32_t> repacked(static_cast<size_t>(rows) * ldw);
    if (qvit_repack_weights(p.weight_packed.data(), p.out_features, p.in_features, p.bits, repacked.data()) != 0) {
      log_error("initialize", "weight repack failed");
      return false;
    }
    const size_t wbytes = repacked.size() * sizeof(uint32_t);
    const size_t vbytes = static_cast<size_t>(p.out_features) * sizeof(float);
    return cuda_ok(cudaMalloc(reinterpret_cast<void**>(&w), wbytes), "cudaMalloc(weights)") &&
           cuda_ok(cudaMalloc(reinterpret_cast<void**>(&weight_scale), vbytes), "cudaMalloc(weight_scale)") &&
           cuda_ok(cudaMalloc(reinterpret_cast<void**>(&bias), vbytes), "cudaMalloc(bias)") &&
           cuda_ok(cudaMemcpy(w, repacked.data(), wbytes, cudaMemcpyHostToDevice), "cudaMemcpy(weights)") &&
           cuda_ok(cudaMemcpy(weight_scale, p.weight_scale.data(), vbytes, cudaMemcpyHostToDevice),
                   "cudaMemcpy(weight_scale)") &&
           cuda_ok(cudaMemcpy(bias, p.bias.data(), vbytes, cudaMemcpyHostToDevice), "cudaMemcpy(bias)");
  }
};

QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN

// ------------------------------------------------------------------ plugin

LowBitLinearPlugin::LowBitLinearPlugin(const std::string& name, LowBitLinearParams params)
    : name_(name), params_(std::move(params)) {
  const std::string err = params_.validate();
  if (!err.empty()) throw std::invalid_argument(err);
  query_device();
}

LowBitLinearPlugin::LowBitLinearPlugin(const std::string& name, const void* data, size_t length) : name_(name) {
  Reader r(data, length);
  if (r.get<uint32_t>() != kSerialMagic) throw std::runtime_error("not a QvitLowBitLinear plugin blob");
  const uint32_t version = r.get<uint32_t>();
  if (version != kSerialVersion) throw std::runtime_error("unsupported plugin blob version " + std::to_string(version));
  params_.bits = r.get<int32_t>();
  params_.in_features = r.get<int32_t>();
  params_.out_features = r.get<int32_t>();
  params_.act_lo = r.get<int32_t>();
  params_.act_hi = r.get<int32_t>();
  params_.act_bits = r.get<int32_t>();
  params_.act_scale = r.get<float>();
  params_.weight_packed = r.get_vec<uint32_t>();
  params_.weight_scale = r.get_vec<float>();
  params_.bias = r.get_vec<float>();
  if (!r.done()) throw std::runtime_error("trailing bytes in plugin blob");
  const std::string err = params_.validate();
  if (!err.empty()) throw std::runtime_error(err);
  query_device();
}

LowBitLinearPlugin::~LowBitLinearPlugin() = default;

void LowBitLinearPlugin::query_device() {
  path_ = path_from_env();
  int dev = 0;
  if (cuda_ok(cudaGetDevice(&dev), "cudaGetDevice")) {
    cuda_ok(cudaDeviceGetAttribute(&cc_major_, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    cuda_ok(cudaDeviceGetAttribute(&cc_minor_, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  }
}

const char* LowBitLinearPlugin::getPluginType() const noexcept { return kLowbitOp; }
const char* LowBitLinearPlugin::getPluginVersion() const noexcept { return kLowbitPluginVersion; }
int32_t LowBitLinearPlugin::getNbOutputs() const noexcept { return 1; }

int32_t LowBitLinearPlugin::initialize() noexcept {
  if (device_) return 0;
  try {
    std::shared_ptr<LowBitDeviceWeights> dev = std::make_shared<LowBitDeviceWeights>();
    if (!dev->upload(params_)) return -1;
    device_ = std::move(dev);
    return 0;
  } catch (const std::exception& e) {
    log_error("initialize", e.what());
    return -1;
  }
}

void LowBitLinearPlugin::terminate() noexcept { device_.reset(); }

size_t LowBitLinearPlugin::getSerializationSize() const noexcept {
  return 2 * sizeof(uint32_t) + 6 * sizeof(int32_t) + sizeof(float) + 3 * sizeof(uint32_t) +
         params_.weight_packed.size() * sizeof(uint32_t) + params_.weight_scale.size() * sizeof(float) +
         params_.bias.size() * sizeof(float);
}

void LowBitLinearPlugin::serialize(void* buffer) const noexcept {
  char* p = static_cast<char*>(buffer);
  put<uint32_t>(p, kSerialMagic);
  put<uint32_t>(p, kSerialVersion);
  put<int32_t>(p, params_.bits);
  put<int32_t>(p, params_.in_features);
  put<int32_t>(p, params_.out_features);
  put<int32_t>(p, params_.act_lo);
  put<int32_t>(p, params_.act_hi);
  put<int32_t>(p, params_.act_bits);
  put<float>(p, params_.act_scale);
  put_vec(p, params_.weight_packed);
  put_vec(p, params_.weight_scale);
  put_vec(p, params_.bias);
}

void LowBitLinearPlugin::destroy() noexcept { delete this; }

void LowBitLinearPlugin::setPluginNamespace(const char* plugin_namespace) noexcept {
  namespace_ = plugin_namespace != nullptr ? plugin_namespace : "";
}

const char* LowBitLinearPlugin::getPluginNamespace() const noexcept { return namespace_.c_str(); }

nvinfer1::DataType LowBitLinearPlugin::getOutputDataType(int32_t /*index*/, const nvinfer1::DataType* input_types,
                                                         int32_t nb_inputs) const noexcept {
  if (nb_inputs < 1 || input_types[0] == nvinfer1::DataType::kINT8) return nvinfer1::DataType::kFLOAT;
  return input_types[0];
}

nvinfer1::IPluginV2DynamicExt* LowBitLinearPlugin::clone() const noexcept {
  try {
    LowBitLinearPlugin* p = new LowBitLinearPlugin(name_, params_);
    p->namespace_ = namespace_;
    p->device_ = device_;  // share the immutable device weights (ref-counted)
    p->path_ = path_;
    return p;
  } catch (const std::exception& e) {
    log_error("clone", e.what());
    return nullptr;
  }
}

nvinfer1::DimsExprs LowBitLinearPlugin::getOutputDimensions(int32_t /*output_index*/,
                                                            const nvinfer1::DimsExprs* inputs, int32_t /*nb_inputs*/,
                                                            nvinfer1::IExprBuilder& expr_builder) noexcept {
  nvinfer1::DimsExprs out = inputs[0];
  if (out.nbDims > 0) out.d[out.nbDims - 1] = expr_builder.constant(static_cast<QvitDimConst>(params_.out_features));
  return out;
}

bool LowBitLinearPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::PluginTensorDesc* in_out,
                                                   int32_t nb_inputs, int32_t nb_outputs) noexcept {
  if (nb_inputs != 1 || nb_outputs != 1 || pos < 0 || pos > 1) return false;
  const nvinfer1::PluginTensorDesc& d = in_out[pos];
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  const bool fp = d.type == nvinfer1::DataType::kFLOAT || d.type == nvinfer1::DataType::kHALF;
  if (pos == 1) return fp;
  if (fp) return true;
  // int8 input only where an int8 kernel is fast (A8 MMA / DP4A); TX2 (sm_62) stays fp16.
  if (d.type != nvinfer1::DataType::kINT8) return false;
  const int k = qvit_select_kernel(64, params_.out_features, params_.in_features, params_.bits, QVIT_DTYPE_I8,
                                   QVIT_PATH_A8, cc_major_, cc_minor_);
  return k == QVIT_KERNEL_A8_MMA || k == QVIT_KERNEL_A8_DP4A;
}

void LowBitLinearPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                         const nvinfer1::DynamicPluginTensorDesc* /*out*/,
                                         int32_t /*nb_outputs*/) noexcept {
  if (nb_inputs != 1) return;
  const nvinfer1::Dims& dims = in[0].desc.dims;
  if (dims.nbDims < 1) {
    log_error(name_, "input must have at least one dimension");
    return;
  }
  const auto k = dims.d[dims.nbDims - 1];
  if (k != -1 && k != params_.in_features) {
    log_error(name_, "input last dim " + std::to_string(k) + " != in_features " + std::to_string(params_.in_features));
  }
}

size_t LowBitLinearPlugin::getWorkspaceSize(const nvinfer1::PluginTensorDesc* inputs, int32_t /*nb_inputs*/,
                                            const nvinfer1::PluginTensorDesc* /*outputs*/,
                                            int32_t /*nb_outputs*/) const noexcept {
  // Only the A8 kernels need scratch (int8 activations), monotone in M: size it for the max M.
  int64_t m = 1;
  for (int i = 0; i + 1 < inputs[0].dims.nbDims; ++i) m *= inputs[0].dims.d[i] > 0 ? inputs[0].dims.d[i] : 1;
  if (m > INT32_MAX) return 0;
  const size_t a8 = qvit_workspace_size(static_cast<int>(m), params_.in_features, params_.bits, QVIT_KERNEL_A8_INT);
  const size_t mma = qvit_workspace_size(static_cast<int>(m), params_.in_features, params_.bits, QVIT_KERNEL_MMA_SYNC);
  return a8 > mma ? a8 : mma;
}

int32_t LowBitLinearPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                                    const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
                                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  if (!device_ && initialize() != 0) return -1;
  const nvinfer1::Dims& dims = input_desc[0].dims;
  if (dims.nbDims < 1 || dims.d[dims.nbDims - 1] != params_.in_features) {
    log_error(name_, "enqueue: input last dimension != in_features");
    return -1;
  }
  int64_t m = 1;
  for (int i = 0; i + 1 < dims.nbDims; ++i) m *= dims.d[i];
  if (m < 0 || m > INT32_MAX) return -1;
  const int x_dtype = dtype_of(input_desc[0].type);
  const int y_dtype = dtype_of(output_desc[0].type);
  if (x_dtype < 0 || y_dtype < 0 || y_dtype == QVIT_DTYPE_I8) {
    log_error(name_, "enqueue: unsupported input/output type");
    return -1;
  }
  if (x_dtype == QVIT_DTYPE_I8) {
    // int8 input codes are used as the node's xq: TensorRT's scale must be act_scale.
    const float s = input_desc[0].scale;
    if (!(std::fabs(s - params_.act_scale) <= 1e-6f * params_.act_scale)) {
      log_error(name_, "enqueue: int8 input scale " + std::to_string(s) + " != act_scale " +
                           std::to_string(params_.act_scale));
      return -1;
    }
  }
  const int kernel = qvit_select_kernel(static_cast<int>(m), params_.out_features, params_.in_features, params_.bits,
                                        x_dtype, path_, cc_major_, cc_minor_);
  LowBitGemmArgs a;
  a.m = static_cast<int>(m);
  a.n = params_.out_features;
  a.k = params_.in_features;
  a.bits = params_.bits;
  a.x = inputs[0];
  a.x_dtype = x_dtype;
  a.y = outputs[0];
  a.y_dtype = y_dtype;
  a.w = device_->w;
  a.ldw = device_->ldw;
  a.weight_scale = device_->weight_scale;
  a.bias = device_->bias;
  a.act_scale = params_.act_scale;
  a.act_lo = params_.act_lo;
  a.act_hi = params_.act_hi;
  a.workspace = workspace;
  a.workspace_bytes = qvit_workspace_size(a.m, a.k, a.bits, kernel);
  return cuda_ok(lowbit_gemm(a, kernel, stream), qvit_kernel_name(kernel)) ? 0 : -1;
}

// ------------------------------------------------------------------ creator

namespace {

nvinfer1::PluginFieldType field_type(int attr) {
  switch (attr) {
    case kAttrWeightScale:
    case kAttrBias:
    case kAttrActScale:
      return nvinfer1::PluginFieldType::kFLOAT32;
    case kAttrPluginVersion:
    case kAttrPluginNamespace:
      return nvinfer1::PluginFieldType::kCHAR;
    default:
      return nvinfer1::PluginFieldType::kINT32;
  }
}

int32_t field_int(const nvinfer1::PluginField& f) {
  if (f.type != nvinfer1::PluginFieldType::kINT32 || f.length < 1 || f.data == nullptr) {
    throw std::invalid_argument(std::string("field ") + f.name + " must be int32");
  }
  return *static_cast<const int32_t*>(f.data);
}

std::vector<float> field_floats(const nvinfer1::PluginField& f) {
  if (f.length < 0 || (f.length > 0 && f.data == nullptr)) throw std::invalid_argument(std::string("bad field ") + f.name);
  std::vector<float> v(static_cast<size_t>(f.length));
  if (f.type == nvinfer1::PluginFieldType::kFLOAT32) {
    if (f.length > 0) std::memcpy(v.data(), f.data, v.size() * sizeof(float));
  } else if (f.type == nvinfer1::PluginFieldType::kFLOAT64) {
    const double* d = static_cast<const double*>(f.data);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(d[i]);
  } else {
    throw std::invalid_argument(std::string("field ") + f.name + " must be float32");
  }
  return v;
}

}  // namespace

LowBitLinearPluginCreator::LowBitLinearPluginCreator() : namespace_(kLowbitPluginNamespace) {
  for (int i = 0; i < kNumLowbitAttrs; ++i) {
    fields_.emplace_back(lowbit_attr_name(i), nullptr, field_type(i), 0);
  }
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
}

const char* LowBitLinearPluginCreator::getPluginName() const noexcept { return kLowbitOp; }
const char* LowBitLinearPluginCreator::getPluginVersion() const noexcept { return kLowbitPluginVersion; }
const nvinfer1::PluginFieldCollection* LowBitLinearPluginCreator::getFieldNames() noexcept { return &collection_; }

nvinfer1::IPluginV2* LowBitLinearPluginCreator::createPlugin(const char* name,
                                                             const nvinfer1::PluginFieldCollection* fc) noexcept {
  try {
    if (fc == nullptr) throw std::invalid_argument("no plugin fields");
    LowBitLinearParams p;
    bool have_bias = false;
    bool seen[kNumLowbitAttrs] = {};
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      const nvinfer1::PluginField& f = fc->fields[i];
      if (f.name == nullptr) continue;
      int attr = -1;
      for (int a = 0; a < kNumLowbitAttrs; ++a) {
        if (std::strcmp(f.name, lowbit_attr_name(a)) == 0) attr = a;
      }
      if (attr >= 0) seen[attr] = true;
      switch (attr) {
        case kAttrBits: p.bits = field_int(f); break;
        case kAttrInFeatures: p.in_features = field_int(f); break;
        case kAttrOutFeatures: p.out_features = field_int(f); break;
        case kAttrActLo: p.act_lo = field_int(f); break;
        case kAttrActHi: p.act_hi = field_int(f); break;
        case kAttrActBits: p.act_bits = field_int(f); break;
        case kAttrActScale: {
          const std::vector<float> v = field_floats(f);
          if (v.size() != 1) throw std::invalid_argument("act_scale must be one float");
          p.act_scale = v[0];
          break;
        }
        case kAttrWeightScale: p.weight_scale = field_floats(f); break;
        case kAttrBias: p.bias = field_floats(f); have_bias = true; break;
        case kAttrWeightPacked: {
          if (f.type != nvinfer1::PluginFieldType::kINT32 || f.length < 0 || (f.length > 0 && f.data == nullptr)) {
            throw std::invalid_argument("weight_packed must be an int32 tensor");
          }
          p.weight_packed.resize(static_cast<size_t>(f.length));
          if (f.length > 0) std::memcpy(p.weight_packed.data(), f.data, p.weight_packed.size() * sizeof(uint32_t));
          break;
        }
        default: break;  // plugin_version / plugin_namespace / unknown: informational
      }
    }
    const int required[] = {kAttrBits, kAttrInFeatures, kAttrOutFeatures, kAttrWeightPacked, kAttrWeightScale,
                            kAttrActScale, kAttrActLo, kAttrActHi};
    for (int a : required) {
      if (!seen[a]) throw std::invalid_argument(std::string("missing field ") + lowbit_attr_name(a));
    }
    if (!have_bias) p.bias.assign(static_cast<size_t>(p.out_features > 0 ? p.out_features : 0), 0.0f);
    LowBitLinearPlugin* plugin = new LowBitLinearPlugin(name != nullptr ? name : "", std::move(p));
    plugin->setPluginNamespace(namespace_.c_str());
    return plugin;
  } catch (const std::exception& e) {
    log_error(std::string("createPlugin ") + (name != nullptr ? name : ""), e.what());
    return nullptr;
  }
}

nvinfer1::IPluginV2* LowBitLinearPluginCreator::deserializePlugin(const char* name, const void* serial_data,
                                                                  size_t serial_length) noexcept {
  try {
    LowBitLinearPlugin* plugin = new LowBitLinearPlugin(name != nullptr ? name : "", serial_data, serial_length);
    plugin->setPluginNamespace(namespace_.c_str());
    return plugin;
  } catch (const std::exception& e) {
    log_error(std::string("deserializePlugin ") + (name != nullptr ? name : ""), e.what());
    return nullptr;
  }
}

void LowBitLinearPluginCreator::setPluginNamespace(const char* plugin_namespace) noexcept {
  namespace_ = plugin_namespace != nullptr ? plugin_namespace : "";
}

const char* LowBitLinearPluginCreator::getPluginNamespace() const noexcept { return namespace_.c_str(); }

REGISTER_TENSORRT_PLUGIN(LowBitLinearPluginCreator);

QVIT_TRT_SUPPRESS_DEPRECATION_END

}  // namespace qvit
