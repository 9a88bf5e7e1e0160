// lowbit_gemm.cu -- packed 2/3/4-bit weight GEMM kernels behind QvitLowBitLinear.
//
// Kernels (chosen by qvit_select_kernel in lowbit_host.cpp):
//   A16 GEMV   fp16/fp32 activations, small M: weights streamed once, unpacked in registers.
//   A16 tiled  fp16/fp32 activations, SIMT fp32 FMA: TX2 (sm_62, no fast int8) and sm_53.
//   A8  MMA    int8 tensor cores through WMMA int8 16x16x16 (sm_72+: Xavier/Turing/Ampere/Orin).
//   A8  DP4A   SIMT __dp4a (sm_61 / sm_70 only; sm_62 has no fast dp4a -> A16).
//   A8  INT    same SIMT kernel, plain int32 multiply-add (portable fallback).
//
// Every path reproduces the node exactly: activations are quantized with the node's
// quantizer (IEEE x / act_scale, round-half-even, clip to [act_lo, act_hi]) and the dot
// products are exact integers.  The A16 kernels multiply integer-valued floats (|xq| <= 128,
// |q| <= 8) and fold fp32 partial sums into int32 before they can exceed 2^24, so their
// accumulators equal the A8 ones bit for bit.
//
// Weights are the shared packed format, repacked once (qvit_repack_weights: padding only).
// C++14; builds with CUDA 10.2 (sm_53/62/72) and current CUDA (sm_75/80/86/87/89/90).
// Arch-specific code is inside `#if __CUDA_ARCH__ >= ...` guards only.

#include "lowbit_gemm.h"

#include <cuda_fp16.h>
#include <mma.h>

#include "qvit_lowbit_format.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 720)
#define QVIT_DEVICE_HAS_IMMA 1  // WMMA int8 (sm_72+)
#endif
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 610)
#define QVIT_DEVICE_HAS_DP4A 1  // __dp4a intrinsic exists (fast on sm_61 / sm_70+)
#endif

namespace qvit {
namespace {

// ------------------------------------------------------------------ element helpers

// Signed value of element k of a packed row (shift, mask, subtract: the format contract).
template <int BITS>
__device__ __forceinline__ int weight_at(const uint32_t* __restrict__ row, int k) {
  constexpr int kPer = 32 / BITS;
  const uint32_t word = __ldg(row + k / kPer);
  return static_cast<int>((word >> (BITS * (k % kPer))) & ((1u << BITS) - 1u)) - (1 << (BITS - 1));
}

__device__ __forceinline__ float load_float(const void* p, int dtype, size_t i) {
  return dtype == QVIT_DTYPE_F16 ? __half2float(static_cast<const __half*>(p)[i]) : static_cast<const float*>(p)[i];
}

// The node's activation quantizer; int8 inputs are already codes (only clipped).
__device__ __forceinline__ int quantize_act(const void* x, int dtype, size_t i, float scale, int lo, int hi) {
  if (dtype == QVIT_DTYPE_I8) {
    const int v = static_cast<const int8_t*>(x)[i];
    return min(max(v, lo), hi);
  }
  // __fdiv_rn: IEEE division like numpy's float32 x / act_scale, also under --use_fast_math.
  const float v = rintf(__fdiv_rn(load_float(x, dtype, i), scale));
  return static_cast<int>(fminf(fmaxf(v, static_cast<float>(lo)), static_cast<float>(hi)));
}

struct Epilogue {
  void* y;
  int y_dtype;
  const float* weight_scale;
  const float* bias;
  float act_scale;
  int m;
  int n;
};

__device__ __forceinline__ void store_output(const Epilogue& e, int row, int col, int acc) {
  const size_t idx = static_cast<size_t>(row) * e.n + col;
  if (e.y_dtype == QVIT_DTYPE_I32) {
    static_cast<int*>(e.y)[idx] = acc;
    return;
  }
  const float alpha = e.act_scale * __ldg(e.weight_scale + col);
  const float v = fmaf(static_cast<float>(acc), alpha, e.bias != nullptr ? __ldg(e.bias + col) : 0.0f);
  if (e.y_dtype == QVIT_DTYPE_F16) {
    static_cast<__half*>(e.y)[idx] = __float2half_rn(v);
  } else {
    static_cast<float*>(e.y)[idx] = v;
  }
}

// ------------------------------------------------------------------ activation quantization (A8)

// x [m, k] -> int8 codes [m, lda], zero-padded to lda (a multiple of 32).
__global__ void quantize_act_kernel(const void* __restrict__ x, int x_dtype, int m, int k, int lda, float scale,
                                    int lo, int hi, int8_t* __restrict__ xq) {
  const size_t total = static_cast<size_t>(m) * lda;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / lda);
    const int c = static_cast<int>(i % lda);
    xq[i] = c < k ? static_cast<int8_t>(quantize_act(x, x_dtype, static_cast<size_t>(r) * k + c, scale, lo, hi)) : 0;
  }
}

// ------------------------------------------------------------------ A16 GEMV (small M)
//
// Block = 4 warps = 4 output channels, grid.y = groups of MT rows.  Activations are
// quantized once per block into shared memory in word-major order (xs[m][j][w] holds
// element w * per + j of the chunk) so that lane w reads its word's inputs without bank
// conflicts; each lane streams whole packed words and unpacks them in registers.
constexpr int kGemvWarps = 4;
constexpr int kGemvChunkWords = 64;

template <int BITS, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
    a16_gemv_kernel(const void* __restrict__ x, int x_dtype, const uint32_t* __restrict__ w, int ldw, int k,
                    int act_lo, int act_hi, Epilogue epi) {
  constexpr int kPer = 32 / BITS;
  constexpr int kChunk = kGemvChunkWords * kPer;  // elements per chunk
  __shared__ float xs[MT * kChunk];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int col = blockIdx.x * kGemvWarps + warp;  // output channel (rows >= n exist: padded)
  const int row0 = blockIdx.y * MT;
  const uint32_t* wrow = w + static_cast<size_t>(col) * ldw;
  const float zero_off = static_cast<float>(1 << (BITS - 1));

  int acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0;

  for (int w0 = 0; w0 < ldw; w0 += kGemvChunkWords) {
    const int k0 = w0 * kPer;
    for (int e = threadIdx.x; e < MT * kChunk; e += blockDim.x) {
      const int i = e / kChunk;
      const int rem = e - i * kChunk;
      const int kk = k0 + rem;
      const int row = row0 + i;
      float v = 0.0f;
      if (row < epi.m && kk < k) {
        v = static_cast<float>(
            quantize_act(x, x_dtype, static_cast<size_t>(row) * k + kk, epi.act_scale, act_lo, act_hi));
      }
      xs[i * kChunk + (rem % kPer) * kGemvChunkWords + rem / kPer] = v;
    }
    __syncthreads();
    float part[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) part[i] = 0.0f;
    for (int wl = lane; wl < kGemvChunkWords && w0 + wl < ldw; wl += 32) {
      const uint32_t word = __ldg(wrow + w0 + wl);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const float q = static_cast<float>((word >> (BITS * j)) & ((1u << BITS) - 1u)) - zero_off;
#pragma unroll
        for (int i = 0; i < MT; ++i) part[i] = fmaf(xs[i * kChunk + j * kGemvChunkWords + wl], q, part[i]);
      }
    }
    // <= 2 words * 16 values * 128 * 8 per chunk: exact in fp32; fold into int32.
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] += __float2int_rn(part[i]);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    int v = acc[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    acc[i] = v;
  }
  if (lane == 0 && col < epi.n) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (row0 + i < epi.m) store_output(epi, row0 + i, col, acc[i]);
    }
  }
}

// ------------------------------------------------------------------ A16 tiled (SIMT fp32)
//
// 64x64 output tile, 256 threads x (4x4) outputs, K step 32.  Integer-valued fp32 operands;
// per-K-step partials (<= 32 * 128 * 8) are exact and folded into int32.
constexpr int kTile = 64;
constexpr int kTileK = 32;

template <int BITS>
__global__ void __launch_bounds__(256)
    a16_tiled_kernel(const void* __restrict__ x, int x_dtype, const uint32_t* __restrict__ w, int ldw, int k,
                     int act_lo, int act_hi, Epilogue epi) {
  __shared__ float xs[kTileK][kTile + 1];
  __shared__ float ws[kTileK][kTile + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15;
  const int ty = tid >> 4;
  const int m0 = blockIdx.y * kTile;
  const int n0 = blockIdx.x * kTile;
  int acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;

  for (int k0 = 0; k0 < k; k0 += kTileK) {
    for (int e = tid; e < kTile * kTileK; e += 256) {
      const int r = e / kTileK;
      const int c = e % kTileK;
      const int gk = k0 + c;
      const int gm = m0 + r;
      xs[c][r] = (gm < epi.m && gk < k)
                     ? static_cast<float>(quantize_act(x, x_dtype, static_cast<size_t>(gm) * k + gk, epi.act_scale,
                                                       act_lo, act_hi))
                     : 0.0f;
      // Weight rows are padded to a multiple of 64 and cover round_up(k, 64) elements.
      ws[c][r] = static_cast<float>(weight_at<BITS>(w + static_cast<size_t>(n0 + r) * ldw, gk));
    }
    __syncthreads();
    float part[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) part[i][j] = 0.0f;
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4];
      float b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = fmaf(a[i], b[j], part[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += __float2int_rn(part[i][j]);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gm = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gn = n0 + tx + 16 * j;
      if (gm < epi.m && gn < epi.n) store_output(epi, gm, gn, acc[i][j]);
    }
  }
}

// ------------------------------------------------------------------ A8 SIMT (dp4a / int32)

// a . b + c over int8x4 lanes: __dp4a where requested and available, else plain int32.
template <bool kUseDp4a>
struct Dot4 {
  static __device__ __forceinline__ int run(int a, int b, int c) {
#pragma unroll
    for (int s = 0; s < 32; s += 8) {
      c += (static_cast<int>(static_cast<unsigned>(a) << (24 - s)) >> 24) *
           (static_cast<int>(static_cast<unsigned>(b) << (24 - s)) >> 24);
    }
    return c;
  }
};

template <>
struct Dot4<true> {
  static __device__ __forceinline__ int run(int a, int b, int c) {
#if defined(QVIT_DEVICE_HAS_DP4A)
    return __dp4a(a, b, c);
#else
    return Dot4<false>::run(a, b, c);
#endif
  }
};

// 4 consecutive weights of a row packed as int8x4 (little-endian, like the activations).
template <int BITS>
__device__ __forceinline__ uint32_t weight_quad(const uint32_t* __restrict__ row, int k) {
  uint32_t p = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) p |= (static_cast<uint32_t>(weight_at<BITS>(row, k + j)) & 0xffu) << (8 * j);
  return p;
}

// 64x64 tile, 256 threads x (4x4), K step 32 bytes = 8 int8x4 words.  xq is the zero-padded
// int8 workspace ([m, lda], lda % 32 == 0), so no K bounds checks are needed.
template <int BITS, bool kUseDp4a>
__global__ void __launch_bounds__(256)
    a8_simt_kernel(const int8_t* __restrict__ xq, int lda, const uint32_t* __restrict__ w, int ldw, Epilogue epi) {
  constexpr int kWordsK = kTileK / 4;
  __shared__ int as[kWordsK][kTile + 1];
  __shared__ int bs[kWordsK][kTile + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15;
  const int ty = tid >> 4;
  const int m0 = blockIdx.y * kTile;
  const int n0 = blockIdx.x * kTile;
  const int lr = tid >> 2;         // tile row loaded by this thread
  const int lq = (tid & 3) * 2;    // first of its two int8x4 words
  int acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;

  const uint32_t* wrow = w + static_cast<size_t>(n0 + lr) * ldw;
  for (int k0 = 0; k0 < lda; k0 += kTileK) {
    int2 av = make_int2(0, 0);
    if (m0 + lr < epi.m) av = *reinterpret_cast<const int2*>(xq + static_cast<size_t>(m0 + lr) * lda + k0 + lq * 4);
    as[lq][lr] = av.x;
    as[lq + 1][lr] = av.y;
    bs[lq][lr] = static_cast<int>(weight_quad<BITS>(wrow, k0 + lq * 4));
    bs[lq + 1][lr] = static_cast<int>(weight_quad<BITS>(wrow, k0 + lq * 4 + 4));
    __syncthreads();
#pragma unroll
    for (int kw = 0; kw < kWordsK; ++kw) {
      int a[4];
      int b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[kw][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = bs[kw][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = Dot4<kUseDp4a>::run(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gm = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gn = n0 + tx + 16 * j;
      if (gm < epi.m && gn < epi.n) store_output(epi, gm, gn, acc[i][j]);
    }
  }
}

// ------------------------------------------------------------------ A8 tensor cores (WMMA int8)
//
// 64x64 tile, 4 warps x (32x32 = 2x2 fragments of 16x16x16), K step 32.  Shared tiles are
// stored as 16-wide K slabs ([k/16][row][16]) so every fragment pointer is 256-bit aligned
// with ldm = 16 bytes, as WMMA requires.  Weights are unpacked to int8 while staging.
constexpr int kMmaThreads = 128;

template <int BITS>
__global__ void __launch_bounds__(kMmaThreads)
    a8_mma_kernel(const int8_t* __restrict__ xq, int lda, const uint32_t* __restrict__ w, int ldw, Epilogue epi) {
#if defined(QVIT_DEVICE_HAS_IMMA)
  using namespace nvcuda;
  constexpr int kLdc = kTile + 4;
  __shared__ __align__(128) int8_t as[2][kTile][16];
  __shared__ __align__(128) int8_t bs[2][kTile][16];
  __shared__ __align__(128) int cs[kTile * kLdc];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 1;
  const int wn = warp & 1;
  const int m0 = blockIdx.y * kTile;
  const int n0 = blockIdx.x * kTile;
  const int lr = tid >> 1;   // tile row staged by this thread
  const int ls = tid & 1;    // its 16-byte K slab

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0);

  const uint32_t* wrow = w + static_cast<size_t>(n0 + lr) * ldw;
  for (int k0 = 0; k0 < lda; k0 += kTileK) {
    int4 av = make_int4(0, 0, 0, 0);
    if (m0 + lr < epi.m) av = *reinterpret_cast<const int4*>(xq + static_cast<size_t>(m0 + lr) * lda + k0 + ls * 16);
    *reinterpret_cast<int4*>(&as[ls][lr][0]) = av;
    const int kb = k0 + ls * 16;
    int4 bv;
    bv.x = static_cast<int>(weight_quad<BITS>(wrow, kb));
    bv.y = static_cast<int>(weight_quad<BITS>(wrow, kb + 4));
    bv.z = static_cast<int>(weight_quad<BITS>(wrow, kb + 8));
    bv.w = static_cast<int>(weight_quad<BITS>(wrow, kb + 12));
    *reinterpret_cast<int4*>(&bs[ls][lr][0]) = bv;
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &as[s][wm * 32 + i * 16][0], 16);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &bs[s][wn * 32 + j * 16][0], 16);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc[i][j], kLdc,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kTile * kTile; e += kMmaThreads) {
    const int r = e / kTile;
    const int c = e % kTile;
    if (m0 + r < epi.m && n0 + c < epi.n) store_output(epi, m0 + r, n0 + c, cs[r * kLdc + c]);
  }
#else
  // Not built for this architecture: the host never selects it below sm_72.
  __trap();
#endif
}

// ------------------------------------------------------------------ launchers

unsigned ceil_div(int a, int b) { return static_cast<unsigned>((a + b - 1) / b); }

template <int BITS, int MT>
void launch_gemv(const LowBitGemmArgs& a, const Epilogue& epi, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.n, kGemvWarps), ceil_div(a.m, MT));
  a16_gemv_kernel<BITS, MT><<<grid, kGemvWarps * 32, 0, stream>>>(a.x, a.x_dtype, a.w, a.ldw, a.k, a.act_lo,
                                                                   a.act_hi, epi);
}

template <int BITS>
cudaError_t launch_bits(const LowBitGemmArgs& a, int kernel, cudaStream_t stream) {
  const Epilogue epi{a.y, a.y_dtype, a.weight_scale, a.bias, a.act_scale, a.m, a.n};
  const dim3 tiles(ceil_div(a.n, kTile), ceil_div(a.m, kTile));
  switch (kernel) {
    case QVIT_KERNEL_A16_GEMV:
      if (a.m <= 1) {
        launch_gemv<BITS, 1>(a, epi, stream);
      } else if (a.m <= 2) {
        launch_gemv<BITS, 2>(a, epi, stream);
      } else if (a.m <= 4) {
        launch_gemv<BITS, 4>(a, epi, stream);
      } else {
        launch_gemv<BITS, 8>(a, epi, stream);
      }
      break;
    case QVIT_KERNEL_A16_TILED:
      a16_tiled_kernel<BITS><<<tiles, 256, 0, stream>>>(a.x, a.x_dtype, a.w, a.ldw, a.k, a.act_lo, a.act_hi, epi);
      break;
    case QVIT_KERNEL_A8_MMA:
    case QVIT_KERNEL_A8_DP4A:
    case QVIT_KERNEL_A8_INT: {
      const int lda = a8_lda(a.k);
      int8_t* xq = static_cast<int8_t*>(a.workspace);
      const size_t total = static_cast<size_t>(a.m) * lda;
      const unsigned qblocks = static_cast<unsigned>(total / 256 + 1 < 4096 ? total / 256 + 1 : 4096);
      quantize_act_kernel<<<qblocks, 256, 0, stream>>>(a.x, a.x_dtype, a.m, a.k, lda, a.act_scale, a.act_lo,
                                                        a.act_hi, xq);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      if (kernel == QVIT_KERNEL_A8_MMA) {
        a8_mma_kernel<BITS><<<tiles, kMmaThreads, 0, stream>>>(xq, lda, a.w, a.ldw, epi);
      } else if (kernel == QVIT_KERNEL_A8_DP4A) {
        a8_simt_kernel<BITS, true><<<tiles, 256, 0, stream>>>(xq, lda, a.w, a.ldw, epi);
      } else {
        a8_simt_kernel<BITS, false><<<tiles, 256, 0, stream>>>(xq, lda, a.w, a.ldw, epi);
      }
      break;
    }
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

bool valid_args(const LowBitGemmArgs& a, int kernel) {
  if (a.m < 0 || a.n <= 0 || a.k <= 0 || !is_packed_bits(a.bits)) return false;
  if (a.x == nullptr || a.y == nullptr || a.w == nullptr || a.weight_scale == nullptr) return false;
  if (a.ldw != repacked_words(a.k, a.bits)) return false;
  if (a.x_dtype != QVIT_DTYPE_F32 && a.x_dtype != QVIT_DTYPE_F16 && a.x_dtype != QVIT_DTYPE_I8) return false;
  if (a.y_dtype != QVIT_DTYPE_F32 && a.y_dtype != QVIT_DTYPE_F16 && a.y_dtype != QVIT_DTYPE_I32) return false;
  if (a.act_lo > a.act_hi || a.act_lo < -128 || a.act_hi > 127 || !(a.act_scale > 0.0f)) return false;
  if (kernel <= QVIT_KERNEL_INVALID || kernel >= QVIT_NUM_KERNELS) return false;
  const size_t need = qvit_workspace_size(a.m, a.k, kernel);
  if (need > 0 && (a.workspace == nullptr || a.workspace_bytes < need ||
                   (reinterpret_cast<uintptr_t>(a.workspace) & 255u) != 0)) {
    return false;
  }
  // grid.y limit (65535) of the tiled kernels; GEMV groups rows by up to 8.
  const int rows_per_block = kernel == QVIT_KERNEL_A16_GEMV ? 8 : kTile;
  return static_cast<long long>(ceil_div(a.m, rows_per_block)) <= 65535;
}

}  // namespace

cudaError_t lowbit_gemm(const LowBitGemmArgs& args, int kernel, cudaStream_t stream) {
  if (!valid_args(args, kernel)) return cudaErrorInvalidValue;
  if (args.m == 0) return cudaSuccess;
  switch (args.bits) {
    case 2:
      return launch_bits<2>(args, kernel, stream);
    case 3:
      return launch_bits<3>(args, kernel, stream);
    case 4:
      return launch_bits<4>(args, kernel, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace qvit
