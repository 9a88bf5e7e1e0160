// qvit_lowbit_plugin.h -- QvitLowBitLinear as a TensorRT 8.x IPluginV2DynamicExt (TX2 / JetPack 4.6 and 5).
//
// Registered as kLowbitOp / kLowbitPluginVersion / kLowbitPluginNamespace (qvit_lowbit_format.h), so
// the ONNX parser's plugin fallback maps the exporter's node to it; plugin fields are the node
// attributes.  A thin adapter over qvit_lowbit_core.h; TensorRT >= 10 builds the IPluginV3 front-end
// (qvit_lowbit_plugin_v3.h) instead -- qvit_trt_compat.h decides.
#ifndef QVIT_LOWBIT_PLUGIN_H
#define QVIT_LOWBIT_PLUGIN_H

#include "qvit_trt_compat.h"

#if !QVIT_PLUGIN_V3

#include <memory>
#include <string>
#include <vector>

namespace qvit {

QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN

class LowBitLinearPlugin final : public nvinfer1::IPluginV2DynamicExt {
 public:
  LowBitLinearPlugin(const std::string& name, LowBitLinearParams params);  // params already validated
  LowBitLinearPlugin() = delete;
  ~LowBitLinearPlugin() override = default;

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
  std::string name_;
  std::string namespace_;
  LowBitLinearParams params_;
  std::shared_ptr<LowBitLinearRunner> runner_;  // device weights, shared by clones
  int path_ = 0;                                 // QVIT_PATH_*, from QVIT_LOWBIT_PATH
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

#endif  // !QVIT_PLUGIN_V3
#endif  // QVIT_LOWBIT_PLUGIN_H
