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
#define QVIT_PATH_A4 3  // INT4 tensor cores (activations in [-8, 7], sm_80+)

// Kernels (values shared with runtime/gemm_ext.py).
#define QVIT_KERNEL_INVALID 0
#define QVIT_KERNEL_A16_GEMV 1   // fp activations, small M (batch-1 latency path, every arch)
#define QVIT_KERNEL_A16_TILED 2  // fp activations, tiled SIMT fp32-FMA (TX2 sm_62, sm_53)
#define QVIT_KERNEL_A8_MMA 3     // int8 tensor cores (WMMA int8), sm_72+ (Xavier, Turing, Ampere, Orin, ...)
#define QVIT_KERNEL_A8_DP4A 4    // __dp4a SIMT, sm_61 / sm_70
#define QVIT_KERNEL_A8_INT 5     // generic int32 SIMT fallback (any arch)
#define QVIT_KERNEL_GEMV_DP4A 6  // small M: activations quantized once per block, __dp4a on expanded words (sm_61, sm_70+)
#define QVIT_KERNEL_MMA_SYNC 7   // large M: mma.sync m16n8k32 s8.u8, cp.async pipeline (sm_80+: Ampere, Orin, Ada, Hopper)
#define QVIT_KERNEL_MMA_INT4 8   // activations <= 4 bits: mma.sync m16n8k64 s4.u4 on nibble-order weights (sm_80+)
#define QVIT_KERNEL_GEMV_RING 9   // small M: x quantized once, persistent grid, per-lane cp.async ring, no barrier (sm_80+)
#define QVIT_NUM_KERNELS 10

// Largest M the GEMV kernel is chosen for under "auto".
#define QVIT_GEMV_MAX_M 16

#ifdef __cplusplus
extern "C" {
#endif

// Kernel for an [m, k] x [n, k]^T problem, or QVIT_KERNEL_INVALID for bad arguments.
int qvit_select_kernel(int m, int n, int k, int bits, int x_dtype, int path, int cc_major, int cc_minor);
// The same, knowing the activation grid [act_lo, act_hi]: "auto" picks the INT4 tensor-core kernel
// for M > QVIT_GEMV_MAX_M when the grid fits .s4 ([-8, 7]) on sm_80 .. sm_89 (native IMMA.16864;
// sm_90 assembles m16n8k64 s4 into an emulation, so Hopper keeps mma_sync), "a4" forces it on sm_80+.
int qvit_select_kernel_act(int m, int n, int k, int bits, int x_dtype, int path, int cc_major, int cc_minor,
                           int act_lo, int act_hi);
// 1 when [act_lo, act_hi] fits the INT4 kernel's signed 4-bit activations.
int qvit_act_fits_s4(int act_lo, int act_hi);
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
// Words per row of the nibble-order layout the INT4 kernel reads (qvit_mma_int4.h): whole 128-element blocks.
int qvit_nib_words(int k, int bits);
// Weight words per row the kernel reads: qvit_nib_words for QVIT_KERNEL_MMA_INT4, else qvit_repacked_words.
int qvit_weight_words(int k, int bits, int kernel);
// Repack qformat words src [n, ceil(k / per_word)] into the nibble-order layout
// dst [qvit_repacked_rows(n), qvit_nib_words(k, bits)] (padding = code of zero).  0, or -1 for bad arguments.
int qvit_repack_weights_nib(const uint32_t* src, int n, int k, int bits, uint32_t* dst);

#ifdef __cplusplus
}
#endif

#endif  // QVIT_LOWBIT_HOST_H
