// qvit_trt_compat.h -- the ONE place for TensorRT 8.2 .. 11 differences the plugin cares about.
//
//   * Which front-end is built and registered: TensorRT 8.x has only IPluginV2DynamicExt
//     (qvit_lowbit_plugin.cpp, TX2 JetPack 4.6 = 8.2, JetPack 5 = 8.5, x86 8.6); TensorRT >= 10
//     gets IPluginV3 (qvit_lowbit_plugin_v3.cpp, JetPack 6 = 10.3, JetPack 7 / x86 = 10.x / 11),
//     where V2 is deprecated (10.0) and the IPluginCreator registry overloads are gone (11).
//     Exactly one creator is registered for the op name / version / namespace.
//   * TensorRT >= 8.0: interface methods are `noexcept`, strings are AsciiChar (= char).
//   * TensorRT 10: IExprBuilder::constant takes int64_t (int32_t before): QvitDimConst.
//   * PluginField types -> the core's neutral FieldKind (kINT64 exists from 10.0).
#ifndef QVIT_TRT_COMPAT_H
#define QVIT_TRT_COMPAT_H

#include <NvInfer.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "lowbit_host.h"
#include "qvit_lowbit_core.h"

#if !defined(NV_TENSORRT_MAJOR)
#error "NvInfer.h did not define NV_TENSORRT_MAJOR"
#endif
#if NV_TENSORRT_MAJOR < 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR < 2)
#error "qvit_plugins needs TensorRT >= 8.2"
#endif

#if NV_TENSORRT_MAJOR >= 10
#define QVIT_TRT10 1
#define QVIT_PLUGIN_V3 1
using QvitDimConst = int64_t;
#else
#define QVIT_TRT10 0
#define QVIT_PLUGIN_V3 0
using QvitDimConst = int32_t;
#endif

#if defined(__GNUC__)
#define QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wdeprecated-declarations\"")
#define QVIT_TRT_SUPPRESS_DEPRECATION_END _Pragma("GCC diagnostic pop")
#else
#define QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN
#define QVIT_TRT_SUPPRESS_DEPRECATION_END
#endif

namespace qvit {

inline FieldKind field_kind(nvinfer1::PluginFieldType t) {
  switch (t) {
    case nvinfer1::PluginFieldType::kINT32: return FieldKind::kInt32;
#if QVIT_TRT10
    case nvinfer1::PluginFieldType::kINT64: return FieldKind::kInt64;
#endif
    case nvinfer1::PluginFieldType::kFLOAT16: return FieldKind::kFloat16;
    case nvinfer1::PluginFieldType::kFLOAT32: return FieldKind::kFloat32;
    case nvinfer1::PluginFieldType::kFLOAT64: return FieldKind::kFloat64;
    case nvinfer1::PluginFieldType::kCHAR: return FieldKind::kChar;
    default: return FieldKind::kOther;
  }
}

inline nvinfer1::PluginFieldType trt_field_type(FieldKind k) {
  switch (k) {
    case FieldKind::kFloat32: return nvinfer1::PluginFieldType::kFLOAT32;
    case FieldKind::kChar: return nvinfer1::PluginFieldType::kCHAR;
    default: return nvinfer1::PluginFieldType::kINT32;
  }
}

inline std::vector<FieldRef> field_refs(const nvinfer1::PluginFieldCollection* fc) {
  if (fc == nullptr || fc->nbFields < 0) throw std::invalid_argument("no plugin fields");
  std::vector<FieldRef> refs;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    const nvinfer1::PluginField& f = fc->fields[i];
    refs.push_back(FieldRef{f.name, field_kind(f.type), f.data, f.length});
  }
  return refs;
}

// Parser fields -> params (throws std::invalid_argument).
inline LowBitLinearParams params_from(const nvinfer1::PluginFieldCollection* fc) {
  const std::vector<FieldRef> refs = field_refs(fc);
  return parse_fields(refs.data(), static_cast<int32_t>(refs.size()));
}

// V3 serialized fields -> params: the fields' format version is checked first (throws std::invalid_argument).
inline LowBitLinearParams serialized_params_from(const nvinfer1::PluginFieldCollection* fc) {
  const std::vector<FieldRef> refs = field_refs(fc);
  return parse_serialized_fields(refs.data(), static_cast<int32_t>(refs.size()));
}

inline int dtype_of(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return QVIT_DTYPE_F32;
    case nvinfer1::DataType::kHALF: return QVIT_DTYPE_F16;
    case nvinfer1::DataType::kINT8: return QVIT_DTYPE_I8;
    default: return -1;
  }
}

// Rows of an input tensor: the product of all but its last dimension (-1 when unknown).
inline int64_t rows_of(const nvinfer1::Dims& d) {
  int64_t m = 1;
  for (int i = 0; i + 1 < d.nbDims; ++i) {
    if (d.d[i] < 0) return -1;
    m *= d.d[i];
  }
  return m;
}

}  // namespace qvit

#endif  // QVIT_TRT_COMPAT_H
