// qvit_lowbit_plugin.cpp -- QvitLowBitLinear as a TensorRT 8.x IPluginV2DynamicExt (adapter over the core).
//
// Engine build: the creator parses the node's fields (qvit_lowbit_core); initialize() repacks and
// uploads once; enqueue only launches kernels (it never allocates, so it may be graph-captured).
#include "qvit_lowbit_plugin.h"

#if !QVIT_PLUGIN_V3

#include <cstring>
#include <iostream>
#include <stdexcept>
#include <utility>

#include "qvit_lowbit_format.h"

namespace qvit {

namespace {

void log_error(const std::string& where, const std::string& what) {
  std::cerr << "[qvit_plugins] " << kLowbitOp << " " << where << ": " << what << std::endl;
}

}  // namespace

QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN

// ------------------------------------------------------------------ plugin

LowBitLinearPlugin::LowBitLinearPlugin(const std::string& name, LowBitLinearParams params)
    : name_(name), params_(std::move(params)), path_(path_from_env()) {}

const char* LowBitLinearPlugin::getPluginType() const noexcept { return kLowbitOp; }
const char* LowBitLinearPlugin::getPluginVersion() const noexcept { return kLowbitPluginVersion; }
int32_t LowBitLinearPlugin::getNbOutputs() const noexcept { return 1; }

int32_t LowBitLinearPlugin::initialize() noexcept {
  if (runner_) return 0;
  std::string err;
  runner_ = LowBitLinearRunner::create(params_, &err);
  if (!runner_) log_error(name_ + " initialize", err);
  return runner_ ? 0 : -1;
}

void LowBitLinearPlugin::terminate() noexcept { runner_.reset(); }

size_t LowBitLinearPlugin::getSerializationSize() const noexcept {
  try {
    return serialize_params(params_).size();
  } catch (const std::exception& e) {
    log_error(name_ + " getSerializationSize", e.what());
    return 0;
  }
}

void LowBitLinearPlugin::serialize(void* buffer) const noexcept {
  try {
    const std::vector<char> blob = serialize_params(params_);
    std::memcpy(buffer, blob.data(), blob.size());
  } catch (const std::exception& e) {
    log_error(name_ + " serialize", e.what());
  }
}

void LowBitLinearPlugin::destroy() noexcept { delete this; }

void LowBitLinearPlugin::setPluginNamespace(const char* plugin_namespace) noexcept {
  namespace_ = plugin_namespace != nullptr ? plugin_namespace : "";
}

const char* LowBitLinearPlugin::getPluginNamespace() const noexcept { return namespace_.c_str(); }

nvinfer1::DataType LowBitLinearPlugin::getOutputDataType(int32_t /*index*/, const nvinfer1::DataType* input_types,
                                                         int32_t nb_inputs) const noexcept {
  if (nb_inputs < 1 || output_dtype(dtype_of(input_types[0])) < 0) return nvinfer1::DataType::kFLOAT;
  return input_types[0];
}

nvinfer1::IPluginV2DynamicExt* LowBitLinearPlugin::clone() const noexcept {
  try {
    LowBitLinearPlugin* p = new LowBitLinearPlugin(name_, params_);
    p->namespace_ = namespace_;
    p->runner_ = runner_;  // immutable device weights, ref-counted
    p->path_ = path_;
    return p;
  } catch (const std::exception& e) {
    log_error(name_ + " clone", e.what());
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
  if (in_out[pos].format != nvinfer1::TensorFormat::kLINEAR) return false;
  return supports_io_type(pos, dtype_of(in_out[pos].type), dtype_of(in_out[0].type));
}

void LowBitLinearPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                         const nvinfer1::DynamicPluginTensorDesc* /*out*/,
                                         int32_t /*nb_outputs*/) noexcept {
  if (nb_inputs != 1) return;
  const nvinfer1::Dims& dims = in[0].desc.dims;
  const int64_t k = dims.nbDims > 0 ? static_cast<int64_t>(dims.d[dims.nbDims - 1]) : 0;
  if (k != -1 && k != params_.in_features) {
    log_error(name_, "input last dim " + std::to_string(k) + " != in_features " + std::to_string(params_.in_features));
  }
}

size_t LowBitLinearPlugin::getWorkspaceSize(const nvinfer1::PluginTensorDesc* inputs, int32_t /*nb_inputs*/,
                                            const nvinfer1::PluginTensorDesc* /*outputs*/,
                                            int32_t /*nb_outputs*/) const noexcept {
  return workspace_bytes(params_, rows_of(inputs[0].dims));
}

int32_t LowBitLinearPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                                    const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
                                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  if (!runner_) {  // never allocate here: enqueue may be running under CUDA-graph capture
    log_error(name_, "enqueue before initialize()");
    return -1;
  }
  const nvinfer1::Dims& dims = input_desc[0].dims;
  if (dims.nbDims < 1 || dims.d[dims.nbDims - 1] != params_.in_features) {
    log_error(name_, "enqueue: input last dimension != in_features");
    return -1;
  }
  std::string err;
  const int rc = runner_->enqueue(params_, rows_of(dims), inputs[0], dtype_of(input_desc[0].type), outputs[0],
                                  dtype_of(output_desc[0].type), workspace, workspace_bytes(params_, rows_of(dims)),
                                  stream, path_, &err);
  if (rc != 0) log_error(name_ + " enqueue", err);
  return rc;
}

// ------------------------------------------------------------------ creator

LowBitLinearPluginCreator::LowBitLinearPluginCreator() : namespace_(kLowbitPluginNamespace) {
  for (int i = 0; i < kNumLowbitAttrs; ++i) {
    fields_.emplace_back(lowbit_attr_name(i), nullptr, trt_field_type(attr_kind(i)), 0);
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
    LowBitLinearPlugin* plugin = new LowBitLinearPlugin(name != nullptr ? name : "", params_from(fc));
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
    LowBitLinearPlugin* plugin =
        new LowBitLinearPlugin(name != nullptr ? name : "", deserialize_params(serial_data, serial_length));
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

#endif  // !QVIT_PLUGIN_V3
