// lowbit_host.h -- host-only helpers (no CUDA): kernel choice, workspace size, weight repack.
//
// Plain C ABI so that tests load it with ctypes on machines without a GPU and check it
// against the numpy side (runtime/gemm_ext.py).  C++14.
#ifndef QVIT_LOWBIT_HOST_H
#define QVIT_LOWBIT_HOST_H

#include <stddef.h>
#include <stdint.h>

// Tensor element types (values shared with runtime/gemm_ext.py).
#define QVIT_DTYPE_F32 0
#define QVIT_DTYPE_F16 1
#define QVIT_DTYPE_I8 2
#define QVIT_DTYPE_I32 3

// Requested math path.
#define QVIT_PATH_AUTO 0
#define QVIT_PATH_A8 1
#define QVIT_PATH_A16 2

// Kernels (values shared with runtime/gemm_ext.py).
#define QVIT_KERNEL_INVALID 0
#define QVIT_KERNEL_A16_GEMV 1   // fp activations, small M (batch-1 latency path, every arch)
#define QVIT_KERNEL_A16_TILED 2  // fp activations, tiled SIMT fp32-FMA (TX2 sm_62, sm_53)
#define QVIT_KERNEL_A8_MMA 3     // int8 tensor cores (WMMA int8), sm_72+ (Xavier, Turing, Ampere, Orin, ...)
#define QVIT_KERNEL_A8_DP4A 4    // __dp4a SIMT, sm_61 / sm_70
#define QVIT_KERNEL_A8_INT 5     // generic int32 SIMT fallback (any arch)
#define QVIT_KERNEL_GEMV_DP4A 6  // small M: activations quantized once per block, __dp4a on expanded words (sm_61, sm_70+)
#define QVIT_KERNEL_MMA_SYNC 7   // large M: mma.sync m16n8k32 s8.u8, cp.async pipeline (sm_80+: Ampere, Orin, Ada, Hopper)
#define QVIT_NUM_KERNELS 8

// Largest M the GEMV kernel is chosen for under "auto".
#define QVIT_GEMV_MAX_M 16

#ifdef __cplusplus
extern "C" {
#endif

// Kernel for an [m, k] x [n, k]^T problem, or QVIT_KERNEL_INVALID for bad arguments.
int qvit_select_kernel(int m, int n, int k, int bits, int x_dtype, int path, int cc_major, int cc_minor);
// Workspace bytes the kernel needs for m rows of k inputs at `bits` weight bits (0 for the kernels that need none).
size_t qvit_workspace_size(int m, int k, int bits, int kernel);
// 1 when the kernel's instructions exist on a device of compute capability cc_major.cc_minor
// (mma_sync: sm_80+, a8_mma: sm_72+, the dp4a kernels: sm_61+), else 0.  lowbit_gemm refuses a
// kernel the device lacks with cudaErrorNotSupported before launching anything.
int qvit_kernel_supported(int kernel, int cc_major, int cc_minor);
// Short stable name ("a16_gemv", "a8_mma", ...) or "invalid".
const char* qvit_kernel_name(int kernel);
// Rows / words per row of the repacked weight matrix.
int qvit_repacked_rows(int n);
int qvit_repacked_words(int k, int bits);
// Repack qformat words src [n, ceil(k / per_word)] into dst [qvit_repacked_rows(n), qvit_repacked_words(k, bits)]:
// every code moved to its expand-order slot (qvit_lowbit_format.h), padding slots hold the code of zero.
// Returns 0, or -1 for bad arguments.
int qvit_repack_weights(const uint32_t* src, int n, int k, int bits, uint32_t* dst);

#ifdef __cplusplus
}
#endif

#endif  // QVIT_LOWBIT_HOST_H
