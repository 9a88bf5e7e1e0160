// qvit_trt_compat.h -- the ONE place that papers over TensorRT 8.2 .. 10.x API differences.
//
// The plugin source is shared by TX2 (JetPack 4.6: TensorRT 8.2), Orin (JetPack 5: 8.5,
// JetPack 6: 8.6 / 10.x) and x86 TensorRT 10.  Differences that matter to it:
//   * TensorRT >= 8.0: every interface method is `noexcept` and strings are AsciiChar (= char),
//     so `char const*` overrides match on every supported version.
//   * TensorRT 10 deprecates IPluginV2DynamicExt / IPluginCreator (still supported, V3 is the
//     successor): silence the deprecation warnings here instead of in the code.
//   * TensorRT 10 IExprBuilder::constant takes int64_t (int32_t before): QvitDimConst.
#ifndef QVIT_TRT_COMPAT_H
#define QVIT_TRT_COMPAT_H

#include <NvInfer.h>

#include <cstdint>

#if !defined(NV_TENSORRT_MAJOR)
#error "NvInfer.h did not define NV_TENSORRT_MAJOR"
#endif
#if NV_TENSORRT_MAJOR < 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR < 2)
#error "qvit_plugins needs TensorRT >= 8.2"
#endif

#if NV_TENSORRT_MAJOR >= 10
#define QVIT_TRT10 1
using QvitDimConst = int64_t;
#else
#define QVIT_TRT10 0
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

#endif  // QVIT_TRT_COMPAT_H
