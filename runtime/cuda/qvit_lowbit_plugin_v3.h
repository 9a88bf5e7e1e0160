// qvit_lowbit_plugin_v3.h -- QvitLowBitLinear as a TensorRT >= 10 IPluginV3 (JetPack 6 / 7, x86 TensorRT 10 / 11).
//
// IPluginV3OneCore / OneBuild / OneRuntime plus IPluginCreatorV3One, registered under the same op
// name / version / namespace as the exporter writes (qvit_lowbit_format.h).  A thin adapter over
// qvit_lowbit_core.h, like the TensorRT 8.x IPluginV2DynamicExt front-end (qvit_lowbit_plugin.h);
// qvit_trt_compat.h decides which one a build gets.  Serialization is TensorRT's: the plugin hands
// over its node attributes plus a format version (getFieldsToSerialize) and is re-created from
// them at runtime.
//
// Lifecycle (what makes enqueue capturable into a CUDA graph): the device weights live in one
// DeviceWeights object per engine layer, shared (shared_ptr) by the plugin and every clone.  They
// are created once -- at deserialization (createPlugin, TensorRTPhase::kRUNTIME), at build time in
// configurePlugin, or at the latest in attachToContext -- and never in onShapeChange or enqueue,
// which allocate, copy and repack nothing.
#ifndef QVIT_LOWBIT_PLUGIN_V3_H
#define QVIT_LOWBIT_PLUGIN_V3_H

#include "qvit_trt_compat.h"

#if QVIT_PLUGIN_V3

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace qvit {

// The device weights of one engine layer, shared by a plugin and all its clones; created once.
struct DeviceWeights {
  std::mutex mutex;
  std::shared_ptr<LowBitLinearRunner> runner;
};

class LowBitLinearPluginV3 final : public nvinfer1::IPluginV3,
                                   public nvinfer1::IPluginV3OneCore,
                                   public nvinfer1::IPluginV3OneBuild,
                                   public nvinfer1::IPluginV3OneRuntime {
 public:
  LowBitLinearPluginV3(const std::string& name, LowBitLinearParams params);  // params already validated
  ~LowBitLinearPluginV3() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out, int32_t nb_outputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types, int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs* shape_inputs,
                          int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs, int32_t nb_outputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc* out,
                        int32_t nb_outputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc* output_desc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

  void setPluginNamespace(const char* plugin_namespace) { namespace_ = plugin_namespace ? plugin_namespace : ""; }
  // Repack + upload the device weights unless this plugin's lineage already has them (thread-safe).
  // 0 on success, else -1 with one logged line.  Never called from onShapeChange / enqueue.
  int32_t ensure_device_weights() noexcept;

 private:
  std::string name_;
  std::string namespace_;
  LowBitLinearParams params_;
  std::vector<nvinfer1::PluginField> serial_fields_;
  nvinfer1::PluginFieldCollection serial_collection_{};
  std::shared_ptr<DeviceWeights> weights_;  // shared by clones; filled once by ensure_device_weights
  std::shared_ptr<LowBitLinearRunner> runner_;  // this object's view of weights_->runner (read-only)
  int path_ = 0;                                 // QVIT_PATH_*, from QVIT_LOWBIT_PATH
};

class LowBitLinearPluginCreatorV3 final : public nvinfer1::IPluginCreatorV3One {
 public:
  LowBitLinearPluginCreatorV3();
  ~LowBitLinearPluginCreatorV3() override = default;

  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override;
  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
  std::string namespace_;
};

}  // namespace qvit

#endif  // QVIT_PLUGIN_V3
#endif  // QVIT_LOWBIT_PLUGIN_V3_H
