// qvit_lowbit_plugin.h -- TensorRT plugin for the QvitLowBitLinear ONNX node.
//
// Registered (REGISTER_TENSORRT_PLUGIN) as kLowbitOp / kLowbitPluginVersion /
// kLowbitPluginNamespace from qvit_lowbit_format.h, so the ONNX parser's plugin fallback
// maps the exporter's node to it; plugin fields are the node attributes (LOWBIT_ATTRS).
// Load the library (dlopen / ctypes.CDLL / trtexec --plugins) before parsing or deserializing.
#ifndef QVIT_LOWBIT_PLUGIN_H
#define QVIT_LOWBIT_PLUGIN_H

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qvit_trt_compat.h"

namespace qvit {

// Node attributes; weights kept in the shared packed format (what the engine serializes).
struct LowBitLinearParams {
  int32_t bits = 0;
  int32_t in_features = 0;
  int32_t out_features = 0;
  int32_t act_lo = -128;
  int32_t act_hi = 127;
  int32_t act_bits = 8;
  float act_scale = 1.0f;
  std::vector<uint32_t> weight_packed;  // [out_features, packed_words(in_features, bits)]
  std::vector<float> weight_scale;      // [out_features]
  std::vector<float> bias;              // [out_features]

  // Empty string when consistent, else what is wrong (one line).
  std::string validate() const;
};

// Device copies of the repacked weights; shared by a plugin and its clones (ref-counted).
struct LowBitDeviceWeights;

QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN

class LowBitLinearPlugin final : public nvinfer1::IPluginV2DynamicExt {
 public:
  LowBitLinearPlugin(const std::string& name, LowBitLinearParams params);
  LowBitLinearPlugin(const std::string& name, const void* data, size_t length);  // deserialize; throws
  LowBitLinearPlugin() = delete;
  ~LowBitLinearPlugin() override;

  // IPluginV2
  const char* getPluginType() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  int32_t getNbOutputs() const noexcept override;
  int32_t initialize() noexcept override;
  void terminate() noexcept override;
  size_t getSerializationSize() const noexcept override;
  void serialize(void* buffer) const noexcept override;
  void destroy() noexcept override;
  void setPluginNamespace(const char* plugin_namespace) noexcept override;
  const char* getPluginNamespace() const noexcept override;

  // IPluginV2Ext
  nvinfer1::DataType getOutputDataType(int32_t index, const nvinfer1::DataType* input_types,
                                       int32_t nb_inputs) const noexcept override;

  // IPluginV2DynamicExt
  nvinfer1::IPluginV2DynamicExt* clone() const noexcept override;
  nvinfer1::DimsExprs getOutputDimensions(int32_t output_index, const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::PluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
  void configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                       const nvinfer1::DynamicPluginTensorDesc* out, int32_t nb_outputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::PluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::PluginTensorDesc* outputs, int32_t nb_outputs) const noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc* output_desc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;

 private:
  void query_device();

  std::string name_;
  std::string namespace_;
  LowBitLinearParams params_;
  std::shared_ptr<LowBitDeviceWeights> device_;
  int cc_major_ = 0;
  int cc_minor_ = 0;
  int path_ = 0;  // QVIT_PATH_*, from env QVIT_LOWBIT_PATH=auto|a8|a16 (bench / debugging)
};

class LowBitLinearPluginCreator final : public nvinfer1::IPluginCreator {
 public:
  LowBitLinearPluginCreator();
  ~LowBitLinearPluginCreator() override = default;

  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override;
  nvinfer1::IPluginV2* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc) noexcept override;
  nvinfer1::IPluginV2* deserializePlugin(const char* name, const void* serial_data,
                                         size_t serial_length) noexcept override;
  void setPluginNamespace(const char* plugin_namespace) noexcept override;
  const char* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
  std::string namespace_;
};

QVIT_TRT_SUPPRESS_DEPRECATION_END

}  // namespace qvit

#endif  // QVIT_LOWBIT_PLUGIN_H
