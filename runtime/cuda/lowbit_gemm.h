// lowbit_gemm.h -- host API of the packed 2/3/4-bit GEMM kernels (QvitLowBitLinear math).
//
//   xq  = clip(rint(x / act_scale), act_lo, act_hi)        (x int8: clip(x, lo, hi))
//   acc = xq @ unpack(w).T                                  exact int32
//   y   = acc * (act_scale * weight_scale[n]) + bias[n]     (y int32: acc itself, debug)
//
// Used by the TensorRT plugin (qvit_lowbit_plugin.cpp) and the PyTorch test extension
// (torch_ext.cpp).  C++14; needs only the CUDA runtime headers.
#ifndef QVIT_LOWBIT_GEMM_H
#define QVIT_LOWBIT_GEMM_H

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "lowbit_host.h"

namespace qvit {

struct LowBitGemmArgs {
  int m = 0;     // rows of x (all leading dims flattened)
  int n = 0;     // out_features
  int k = 0;     // in_features
  int bits = 0;  // weight bits: 2, 3 or 4
  const void* x = nullptr;  // [m, k] row-major
  int x_dtype = QVIT_DTYPE_F32;  // F32 / F16 / I8 (I8 = already on the act grid, scale act_scale)
  void* y = nullptr;             // [m, n] row-major
  int y_dtype = QVIT_DTYPE_F32;  // F32 / F16 / I32 (raw accumulators, tests)
  const uint32_t* w = nullptr;   // repacked words [repacked_rows(n), ldw] (qvit_repack_weights)
  int ldw = 0;                   // repacked_words(k, bits)
  // Output column of weight row r: col_map[r] (device, [n]), or r when null.  A mixed-bit
  // layer runs one launch per bit width over its rows of that width (a row "segment").
  const int* col_map = nullptr;
  int ldy = 0;                          // row stride of y in elements (0: n)
  const float* weight_scale = nullptr;  // indexed by output column
  const float* bias = nullptr;          // indexed by output column, or nullptr
  float act_scale = 1.0f;
  int act_lo = -128;
  int act_hi = 127;
  void* workspace = nullptr;  // >= qvit_workspace_size(m, k, bits, kernel) bytes, 16-byte aligned
  size_t workspace_bytes = 0;
};

// Enqueue one GEMM with an explicit kernel (QVIT_KERNEL_*; pick it with qvit_select_kernel).
// m == 0 is a no-op (null x / y allowed).  Returns cudaErrorInvalidValue for bad arguments,
// otherwise the status of this call's own launches (cudaLaunchKernel), not an earlier error.
cudaError_t lowbit_gemm(const LowBitGemmArgs& args, int kernel, cudaStream_t stream);

// Fused quantization producer: y = LayerNorm(x) * gamma + beta (fp32 statistics), quantized with the
// consuming node's quantizer in the same pass: codes[r, c] = clip(rint(y / act_scale), act_lo, act_hi)
// as int8 [m, ldq] (zero past k) and row_sum[r] = sum of the row's codes -- what the quantize-once
// kernels (mma_sync, gemv_ring) read from their workspace, and an int8 x for lowbit_gemm
// (x_dtype I8: codes on the node's grid).  One warp per row; no separate quantize kernel.
struct LayerNormQuantArgs {
  int m = 0;
  int k = 0;
  const void* x = nullptr;  // [m, k] F32 / F16
  int x_dtype = QVIT_DTYPE_F16;
  const float* gamma = nullptr;  // [k] or nullptr (1)
  const float* beta = nullptr;   // [k] or nullptr (0)
  float eps = 1e-6f;
  float act_scale = 1.0f;
  int act_lo = -128;
  int act_hi = 127;
  int8_t* codes = nullptr;  // [m, ldq], 4-byte aligned rows
  int ldq = 0;              // >= k, a multiple of 4
  int* row_sum = nullptr;   // [m] or nullptr
};
cudaError_t layernorm_quantize(const LayerNormQuantArgs& args, cudaStream_t stream);

}  // namespace qvit

#endif  // QVIT_LOWBIT_GEMM_H
