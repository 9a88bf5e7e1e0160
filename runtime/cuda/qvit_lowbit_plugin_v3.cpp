// qvit_lowbit_plugin_v3.cpp -- QvitLowBitLinear as a TensorRT >= 10 IPluginV3 (adapter over the core).
//
// Phases: the creator parses the node's fields (build) or the serialized, versioned fields (runtime).
// Device weights: created once per engine layer (deserialization / configurePlugin / attachToContext,
// see the header), shared by clones; onShapeChange and enqueue only read them, so enqueue is legal
// under CUDA-graph stream capture.
#include "qvit_lowbit_plugin_v3.h"

#if QVIT_PLUGIN_V3

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

// ------------------------------------------------------------------ plugin

LowBitLinearPluginV3::LowBitLinearPluginV3(const std::string& name, LowBitLinearParams params)
    : name_(name),
      namespace_(kLowbitPluginNamespace),
      params_(std::move(params)),
      weights_(std::make_shared<DeviceWeights>()),
      path_(path_from_env()) {}

int32_t LowBitLinearPluginV3::ensure_device_weights() noexcept {
  try {
    std::lock_guard<std::mutex> lock(weights_->mutex);
    if (!weights_->runner) {
      std::string err;
      weights_->runner = LowBitLinearRunner::create(params_, &err);
      if (!weights_->runner) {
        log_error(name_ + " weights", err);
        return -1;
      }
    }
    runner_ = weights_->runner;
    return 0;
  } catch (const std::exception& e) {
    log_error(name_ + " weights", e.what());
    return -1;
  }
}

nvinfer1::IPluginCapability* LowBitLinearPluginV3::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    default: return nullptr;
  }
}

nvinfer1::IPluginV3* LowBitLinearPluginV3::clone() noexcept {
  try {
    LowBitLinearPluginV3* p = new LowBitLinearPluginV3(name_, params_);
    p->namespace_ = namespace_;
    p->weights_ = weights_;  // one set of immutable device weights per engine layer, ref-counted
    p->runner_ = runner_;
    p->path_ = path_;
    return p;
  } catch (const std::exception& e) {
    log_error(name_ + " clone", e.what());
    return nullptr;
  }
}

const char* LowBitLinearPluginV3::getPluginName() const noexcept { return kLowbitOp; }
const char* LowBitLinearPluginV3::getPluginVersion() const noexcept { return kLowbitPluginVersion; }
const char* LowBitLinearPluginV3::getPluginNamespace() const noexcept { return namespace_.c_str(); }

int32_t LowBitLinearPluginV3::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                              const nvinfer1::DynamicPluginTensorDesc* /*out*/,
                                              int32_t nb_outputs) noexcept {
  if (nb_inputs != 1 || nb_outputs != 1) return -1;
  const nvinfer1::Dims& dims = in[0].desc.dims;
  const int64_t k = dims.nbDims > 0 ? static_cast<int64_t>(dims.d[dims.nbDims - 1]) : 0;
  if (k != -1 && k != params_.in_features) {
    log_error(name_, "input last dim " + std::to_string(k) + " != in_features " + std::to_string(params_.in_features));
    return -1;
  }
  return ensure_device_weights();  // build phase: before TensorRT profiles enqueue
}

int32_t LowBitLinearPluginV3::getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                                                 const nvinfer1::DataType* input_types,
                                                 int32_t nb_inputs) const noexcept {
  if (nb_inputs != 1 || nb_outputs != 1 || output_dtype(dtype_of(input_types[0])) < 0) return -1;
  output_types[0] = input_types[0];  // strongly typed networks: fp16 in -> fp16 out, fp32 -> fp32
  return 0;
}

int32_t LowBitLinearPluginV3::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                              const nvinfer1::DimsExprs* /*shape_inputs*/,
                                              int32_t /*nb_shape_inputs*/, nvinfer1::DimsExprs* outputs,
                                              int32_t nb_outputs, nvinfer1::IExprBuilder& expr_builder) noexcept {
  if (nb_inputs != 1 || nb_outputs != 1 || inputs[0].nbDims < 1) return -1;
  outputs[0] = inputs[0];
  outputs[0].d[outputs[0].nbDims - 1] = expr_builder.constant(static_cast<QvitDimConst>(params_.out_features));
  return 0;
}

bool LowBitLinearPluginV3::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                                     int32_t nb_inputs, int32_t nb_outputs) noexcept {
  if (nb_inputs != 1 || nb_outputs != 1 || pos < 0 || pos > 1) return false;
  if (in_out[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
  return supports_io_type(pos, dtype_of(in_out[pos].desc.type), dtype_of(in_out[0].desc.type));
}

int32_t LowBitLinearPluginV3::getNbOutputs() const noexcept { return 1; }

size_t LowBitLinearPluginV3::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t /*nb_inputs*/,
                                              const nvinfer1::DynamicPluginTensorDesc* /*outputs*/,
                                              int32_t /*nb_outputs*/) const noexcept {
  return workspace_bytes(params_, rows_of(inputs[0].max));  // the largest shape of the profile
}

int32_t LowBitLinearPluginV3::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                                            const nvinfer1::PluginTensorDesc* /*out*/, int32_t nb_outputs) noexcept {
  if (nb_inputs != 1 || nb_outputs != 1) return -1;
  const nvinfer1::Dims& dims = in[0].dims;
  if (dims.nbDims < 1 || dims.d[dims.nbDims - 1] != params_.in_features) {
    log_error(name_, "input last dimension != in_features");
    return -1;
  }
  if (!runner_) {  // created at deserialization / configurePlugin / attachToContext, never here
    log_error(name_, "onShapeChange() before the device weights were created");
    return -1;
  }
  return 0;
}

int32_t LowBitLinearPluginV3::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                                      const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
                                      void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  if (!runner_) {  // never allocate here: enqueue may be running under CUDA-graph capture
    log_error(name_, "enqueue() before the device weights were created");
    return -1;
  }
  const int64_t m = rows_of(input_desc[0].dims);
  std::string err;
  const int rc = runner_->enqueue(params_, m, inputs[0], dtype_of(input_desc[0].type), outputs[0],
                                  dtype_of(output_desc[0].type), workspace, workspace_bytes(params_, m), stream,
                                  path_, &err);
  if (rc != 0) log_error(name_ + " enqueue", err);
  return rc;
}

nvinfer1::IPluginV3* LowBitLinearPluginV3::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  if (ensure_device_weights() != 0) return nullptr;  // a no-op after deserialization created them
  return clone();
}

const nvinfer1::PluginFieldCollection* LowBitLinearPluginV3::getFieldsToSerialize() noexcept {
  serial_fields_.clear();
  for (const FieldRef& f : to_fields(params_)) {
    serial_fields_.emplace_back(f.name, f.data, trt_field_type(f.kind), f.length);
  }
  serial_fields_.emplace_back(kFieldsVersionName, &kFieldsVersion, nvinfer1::PluginFieldType::kINT32, 1);
  serial_collection_.nbFields = static_cast<int32_t>(serial_fields_.size());
  serial_collection_.fields = serial_fields_.data();
  return &serial_collection_;
}

// ------------------------------------------------------------------ creator

LowBitLinearPluginCreatorV3::LowBitLinearPluginCreatorV3() : namespace_(kLowbitPluginNamespace) {
  for (int i = 0; i < kNumLowbitAttrs; ++i) {
    fields_.emplace_back(lowbit_attr_name(i), nullptr, trt_field_type(attr_kind(i)), 0);
  }
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
}

nvinfer1::IPluginV3* LowBitLinearPluginCreatorV3::createPlugin(const char* name,
                                                               const nvinfer1::PluginFieldCollection* fc,
                                                               nvinfer1::TensorRTPhase phase) noexcept {
  try {  // build: the ONNX node's fields; runtime: getFieldsToSerialize's, format version checked first
    const bool runtime = phase == nvinfer1::TensorRTPhase::kRUNTIME;
    std::unique_ptr<LowBitLinearPluginV3> plugin(
        new LowBitLinearPluginV3(name != nullptr ? name : "", runtime ? serialized_params_from(fc) : params_from(fc)));
    plugin->setPluginNamespace(namespace_.c_str());
    // Deserialization: the engine layer's one set of device weights, before any context exists.
    if (runtime && plugin->ensure_device_weights() != 0) return nullptr;
    return plugin.release();
  } catch (const std::exception& e) {
    log_error(std::string("createPlugin ") + (name != nullptr ? name : ""), e.what());
    return nullptr;
  }
}

const nvinfer1::PluginFieldCollection* LowBitLinearPluginCreatorV3::getFieldNames() noexcept { return &collection_; }
const char* LowBitLinearPluginCreatorV3::getPluginName() const noexcept { return kLowbitOp; }
const char* LowBitLinearPluginCreatorV3::getPluginVersion() const noexcept { return kLowbitPluginVersion; }
const char* LowBitLinearPluginCreatorV3::getPluginNamespace() const noexcept { return namespace_.c_str(); }

REGISTER_TENSORRT_PLUGIN(LowBitLinearPluginCreatorV3);

}  // namespace qvit

#endif  // QVIT_PLUGIN_V3
