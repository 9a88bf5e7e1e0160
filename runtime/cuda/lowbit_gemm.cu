// lowbit_gemm.cu -- packed 2/3/4-bit weight GEMM kernels behind QvitLowBitLinear.
//
// Kernels (chosen by qvit_select_kernel in lowbit_host.cpp):
//   GEMV DP4A  small M (<= 16), sm_61 / sm_70+: each block quantizes the activations once into
//              shared memory, then every lane streams 16-byte weight vectors, expands each word
//              with one shift + AND into int8x4 lanes and accumulates with __dp4a.
//   MMA SYNC   large M, sm_80+: mma.sync m16n8k32 s8 x u8 tensor cores, 128x128 tiles, cp.async
//              multi-stage pipeline for the int8 activations, weights expanded once per tile.
//   MMA INT4   activations within [-8, 7], sm_80+: mma.sync m16n8k64 s4 x u4 on nibble-order weights
//              (qvit_mma_int4.h); native on sm_80..89, emulated by the compiler on sm_90.
//   GEMV RING  small M, sm_80+: x quantized once, persistent grid, per-lane cp.async ring, no barrier.
//   A16 GEMV   fp16/fp32 activations, small M, no fast int8 (TX2 sm_62, sm_53): fp32 FMA.
//   A16 tiled  large M on TX2 / sm_53: SIMT fp32 FMA.
//   A8  MMA    WMMA int8 16x16x16 (sm_72 / sm_75: Xavier, Turing).
//   A8  DP4A   SIMT __dp4a (sm_61 / sm_70).
//   A8  INT    same SIMT kernel, plain int32 multiply-add (portable fallback).
//
// Every path reproduces the node exactly: activations are quantized with the node's
// quantizer (IEEE x / act_scale, round-half-even, clip to [act_lo, act_hi]) and the dot
// products are exact integers.  The int8 kernels multiply the unsigned weight codes
// (q + 2^(b-1)) and subtract 2^(b-1) * sum(xq) per row; the A16 kernels multiply
// integer-valued floats and fold fp32 partial sums into int32 before they can exceed 2^24.
//
// Weights are repacked once (qvit_repack_weights): each code sits in its "expand order" slot
// (qvit_lowbit_format.h), so one shift and one AND give four consecutive codes as int8x4.
// C++14; builds with CUDA 10.2 (sm_53/62/72) and current CUDA (sm_75/80/86/87/89/90).
// Arch-specific code is inside `#if` guards on QVIT_DEVICE_HAS_* / __CUDA_ARCH__ only.

#include "lowbit_gemm.h"

#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <tuple>
#include <utility>

#include "qvit_lowbit_format.h"
#include "qvit_mma_int4.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 720)
#define QVIT_DEVICE_HAS_IMMA 1  // WMMA int8 (sm_72+)
#endif
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 610)
#define QVIT_DEVICE_HAS_DP4A 1  // __dp4a intrinsic exists (fast on sm_61 / sm_70+)
#endif
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define QVIT_DEVICE_HAS_MMA_SYNC_S8 1  // mma.sync m16n8k32 s8/u8, ldmatrix, cp.async (sm_80+)
#endif
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800) && (__CUDA_ARCH__ < 1000)
// mma.sync m16n8k64 s4/u4: native on sm_80..89, emulated on sm_90 (exact); not built for Blackwell (sm_100+,
// Thor sm_110), where ptxas spills the kernel and nothing is measured: the host selection refuses it there
#define QVIT_DEVICE_HAS_MMA_S4 1
#endif

namespace qvit {
namespace {

// ------------------------------------------------------------------ element helpers

// Signed value of element k of a repacked row.
template <int BITS>
__device__ __forceinline__ int weight_at(const uint32_t* __restrict__ row, int k) {
  constexpr int kPer = 32 / BITS;
  return static_cast<int>(slot_code(__ldg(row + k / kPer), BITS, k % kPer)) - (1 << (BITS - 1));
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

// Four quantized activations as one int8x4 word (little-endian: element 0 in the low byte).
__device__ __forceinline__ int quantize4(const void* x, int dtype, size_t row_base, int k0, int k, float scale,
                                        int lo, int hi, int* sum) {
  int packed = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int kk = k0 + j;
    const int v = kk < k ? quantize_act(x, dtype, row_base + kk, scale, lo, hi) : 0;
    *sum += v;
    packed |= (v & 0xff) << (8 * j);
  }
  return packed;
}

struct Epilogue {
  void* y;
  int y_dtype;
  const float* weight_scale;
  const float* bias;
  const int* col_map;
  float act_scale;
  int m;
  int n;    // weight rows of this launch
  int ldy;  // output row stride
  // Adjacent columns may be written as one 4/8-byte store: no col_map, even ldy and y itself
  // aligned to the pair (a TensorRT / torch view may start at an odd element).  Set by the host.
  bool pairs;
};

// y[row, col(r)] from the exact accumulator of weight row r.
__device__ __forceinline__ void store_output(const Epilogue& e, int row, int r, int acc) {
  const int col = e.col_map != nullptr ? __ldg(e.col_map + r) : r;
  const size_t idx = static_cast<size_t>(row) * e.ldy + col;
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

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------------ expand: packed word -> int8x4 codes
//
// kE int8x4 words per repacked word (expand_word in qvit_lowbit_format.h, tested on the host).
template <int BITS>
struct Expand {
  static constexpr int kE = expand_words(BITS);
  static __device__ __forceinline__ void run(uint32_t w, int* e) {
    uint32_t u[kE];
    expand_word(w, BITS, u);
#pragma unroll
    for (int i = 0; i < kE; ++i) e[i] = static_cast<int>(u[i]);
  }
};

// Element index of byte slot t (0 .. 4*kE-1) of a word's expansion, or -1 for a zero slot.
template <int BITS>
__device__ __forceinline__ int expand_slot_element(int t) {
  return (BITS == 3 && t >= 10) ? -1 : t;
}

// ------------------------------------------------------------------ activation quantization (A8 kernels)

// Legacy A8 kernels: x [m, k] -> int8 codes [m, lda], zero-padded to lda (a multiple of 32).
__global__ void quantize_act_kernel(const void* __restrict__ x, int x_dtype, int m, int k, int lda, float scale,
                                    int lo, int hi, int8_t* __restrict__ xq) {
  const int words = lda / 4;
  for (int r = blockIdx.y; r < m; r += gridDim.y) {
    const size_t base = static_cast<size_t>(r) * k;
    int* out = reinterpret_cast<int*>(xq + static_cast<size_t>(r) * lda);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < words; c += gridDim.x * blockDim.x) {
      int unused = 0;
      out[c] = quantize4(x, x_dtype, base, 4 * c, k, scale, lo, hi, &unused);
    }
  }
}

// MMA SYNC: one warp per row: x [m, k] -> int8 codes [m, lda] (natural order, zero past k) and
// the row sums of the codes (the offset-binary correction).  lda is a multiple of 32.
constexpr int kQuantRowsPerBlock = 8;

__global__ void __launch_bounds__(kQuantRowsPerBlock * 32)
    quantize_rows_kernel(const void* __restrict__ x, int x_dtype, int m, int k, int lda, float scale, int lo, int hi,
                         int8_t* __restrict__ xq, int* __restrict__ row_sum) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kQuantRowsPerBlock + (threadIdx.x >> 5);
  if (row >= m) return;
  const size_t base = static_cast<size_t>(row) * k;
  int* out = reinterpret_cast<int*>(xq + static_cast<size_t>(row) * lda);
  int sum = 0;
  for (int c = lane; c < lda / 4; c += 32) out[c] = quantize4(x, x_dtype, base, 4 * c, k, scale, lo, hi, &sum);
  sum = warp_sum(sum);
  if (lane == 0) row_sum[row] = sum;
}

// ------------------------------------------------------------------ fused producer: LayerNorm + quantize
//
// One warp per row: mean, then the variance around it (two passes over the row: no cancellation),
// then y = (x - mean) * rstd * gamma + beta quantized like quantize_act (IEEE division, rint,
// clip) straight into int8 codes and the row sum.  fp32 throughout, like torch's LayerNorm.
constexpr int kLnRowsPerBlock = 8;

__global__ void __launch_bounds__(kLnRowsPerBlock * 32)
    layernorm_quant_kernel(const void* __restrict__ x, int x_dtype, int m, int k, const float* __restrict__ gamma,
                           const float* __restrict__ beta, float eps, float scale, int lo, int hi,
                           int8_t* __restrict__ codes, int ldq, int* __restrict__ row_sum) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kLnRowsPerBlock + (threadIdx.x >> 5);
  if (row >= m) return;
  const size_t base = static_cast<size_t>(row) * k;
  float s = 0.0f;
  for (int c = lane; c < k; c += 32) s += load_float(x, x_dtype, base + c);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  const float mean = s / static_cast<float>(k);
  float v = 0.0f;
  for (int c = lane; c < k; c += 32) {
    const float d = load_float(x, x_dtype, base + c) - mean;
    v = fmaf(d, d, v);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const float rstd = rsqrtf(v / static_cast<float>(k) + eps);
  int sum = 0;
  int8_t* out = codes + static_cast<size_t>(row) * ldq;
  for (int c = lane; c < ldq; c += 32) {
    int q = 0;
    if (c < k) {
      const float y = fmaf((load_float(x, x_dtype, base + c) - mean) * rstd, gamma != nullptr ? __ldg(gamma + c) : 1.0f,
                           beta != nullptr ? __ldg(beta + c) : 0.0f);
      const float r = rintf(__fdiv_rn(y, scale));
      q = static_cast<int>(fminf(fmaxf(r, static_cast<float>(lo)), static_cast<float>(hi)));
    }
    out[c] = static_cast<int8_t>(q);
    sum += q;
  }
  sum = warp_sum(sum);
  if (lane == 0 && row_sum != nullptr) row_sum[row] = sum;
}

// ------------------------------------------------------------------ A16 GEMV (small M, no fast int8)
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
  const int col = blockIdx.x * kGemvWarps + warp;  // weight row (rows >= n exist: padded)
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
        const float q = static_cast<float>(slot_code(word, BITS, j)) - zero_off;
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
  for (int i = 0; i < MT; ++i) acc[i] = warp_sum(acc[i]);
  if (lane == 0 && col < epi.n) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (row0 + i < epi.m) store_output(epi, row0 + i, col, acc[i]);
    }
  }
}

// ------------------------------------------------------------------ GEMV DP4A (small M, sm_61 / sm_70+)
//
// Block = 8 warps; a warp covers 32 / lpr weight rows at once, lpr lanes per row (lpr chosen by
// the host so that every lane streams >= 2 16-byte weight vectors).  Per K slab:
//   0. each lane issues the loads of its first kGemvDepth weight vectors (in flight meanwhile);
//   1. the whole block quantizes the slab of the MT activation rows ONCE into shared memory, in
//      the weights' expand order (kE int8x4 words per packed word), row sums by warp shuffles
//      and one shared atomic per warp; one barrier;
//   2. each lane consumes its vectors, keeping kGemvDepth loads in flight, expands each word
//      with one shift + AND per int8x4 and runs kE __dp4a per activation row; no barrier here.
// Lanes of a row reduce with shuffles; acc - 2^(b-1) * rowsum is the exact integer dot product.
constexpr int kDp4aWarps = 8;
constexpr int kDp4aSmemBytes = 32 * 1024;  // activation slab (static: fits every arch)
// 16-byte weight loads in flight per lane (fewer at 16 rows: registers; the loads are amortized anyway).
// Blackwell's ptxas (sm_100 / sm_110 Thor, CUDA 13) needs a few more registers for the 8-row tile and spilled
// under the 2-blocks-per-SM bound at depth 4: there 8 rows keep 2 loads in flight (tests/test_cuda_build.py).
template <int MT>
struct GemvDepth {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 1000)
  static constexpr int kValue = MT >= 8 ? 2 : 4;
#else
  static constexpr int kValue = MT >= 16 ? 2 : 4;
#endif
};

template <int BITS>
struct GemvLayout {
  static constexpr int kE = Expand<BITS>::kE;
  static constexpr int kPer = 32 / BITS;
  static constexpr int kVecInts = 4 * kE;  // int8x4 words of activations per weight vector (4 words)
};

// Activations of vectors [v0, v0 + vs) for rows m < MT into xs[m][v][4 * kE] (int8x4 words);
// row sums of the codes added to row_sum[m].  The 8 warps form min(MT, 8) groups; group g stages
// rows g, g + groups, ... with all its lanes (one latency round per row it owns).
template <int BITS, int MT>
__device__ __forceinline__ void gemv_stage_acts(const void* __restrict__ x, int x_dtype, int k, int v0, int vs,
                                                int row0, const Epilogue& epi, int lo, int hi, int* xs,
                                                int* row_sum) {
  using L = GemvLayout<BITS>;
  constexpr int kGroups = MT < kDp4aWarps ? MT : kDp4aWarps;
  constexpr int kGroupThreads = kDp4aWarps / kGroups * 32;
  const int group = (threadIdx.x >> 5) % kGroups;
  const int gt = (threadIdx.x >> 5) / kGroups * 32 + (threadIdx.x & 31);  // thread index inside the group
  const int ints = vs * L::kVecInts;
#pragma unroll 1
  for (int mi = group; mi < MT; mi += kGroups) {
    const int row = row0 + mi;
    const bool live = row < epi.m;
    const size_t base = static_cast<size_t>(live ? row : 0) * k;
    int sum = 0;
    for (int c = gt; c < ints; c += kGroupThreads) {
      const int word = 4 * v0 + c / L::kE;     // packed word index in the row
      const int t0 = 4 * (c % L::kE);          // first byte slot of this int8x4
      int packed = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = expand_slot_element<BITS>(t0 + j);
        const int kk = word * L::kPer + e;
        if (live && e >= 0 && kk < k) {
          const int v = quantize_act(x, x_dtype, base + kk, epi.act_scale, lo, hi);
          sum += v;
          packed |= (v & 0xff) << (8 * j);
        }
      }
      xs[mi * ints + c] = packed;
    }
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0 && sum != 0) atomicAdd(row_sum + mi, sum);
  }
}

template <int BITS, int MT>
__device__ __forceinline__ void gemv_dot(uint4 wv, const int* __restrict__ xv, int ints, int* acc) {
#if defined(QVIT_DEVICE_HAS_DP4A)
  using L = GemvLayout<BITS>;
  const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
  int e[4][L::kE];
#pragma unroll
  for (int q = 0; q < 4; ++q) Expand<BITS>::run(words[q], e[q]);
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    const int4* a = reinterpret_cast<const int4*>(xv + mi * ints);
#pragma unroll
    for (int i = 0; i < L::kE; ++i) {
      const int4 av = a[i];  // int8x4 words 4i .. 4i+3 of this vector
      const int aw[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int flat = 4 * i + j;  // (word q, expansion s) = (flat / kE, flat % kE)
        acc[mi] = __dp4a(aw[j], e[flat / L::kE][flat % L::kE], acc[mi]);
      }
    }
  }
#endif
}

template <int BITS, int MT>
struct GemvSlab {
  static constexpr int kVecs = kDp4aSmemBytes / (MT * GemvLayout<BITS>::kVecInts * 4);  // vectors per slab
};

// `passes` > 1 (only when the whole K fits one slab): the block stages the activations once and
// then serves `passes` consecutive groups of rows, so large layers do not re-quantize per 8 rows.
template <int BITS, int MT>
__global__ void __launch_bounds__(kDp4aWarps * 32, 2)
    gemv_dp4a_kernel(const void* __restrict__ x, int x_dtype, const uint32_t* __restrict__ w, int ldw, int k,
                     int act_lo, int act_hi, int lpr, int passes, Epilogue epi) {
#if defined(QVIT_DEVICE_HAS_DP4A)
  using L = GemvLayout<BITS>;
  constexpr int kSlabVecs = GemvSlab<BITS, MT>::kVecs;
  constexpr int kGemvDepth = GemvDepth<MT>::kValue;
  __shared__ __align__(16) int xs[kSlabVecs * MT * L::kVecInts];
  __shared__ int row_sum[MT];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rows_per_warp = 32 / lpr;
  const int sub = lane % lpr;
  const int row0 = blockIdx.y * MT;
  const int vecs = (packed_words(k, BITS) + 3) / 4;  // real 16-byte vectors per row (ldw % 4 == 0)
  if (threadIdx.x < MT) row_sum[threadIdx.x] = 0;
  constexpr int kOff = 1 << (BITS - 1);

  for (int p = 0; p < passes; ++p) {
    const int wrow_idx = ((blockIdx.x * passes + p) * kDp4aWarps + warp) * rows_per_warp + lane / lpr;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<size_t>(min(wrow_idx, epi.n - 1)) * ldw);
    int acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = 0;
    uint4 ring[kGemvDepth];
    for (int v0 = 0; v0 < vecs; v0 += kSlabVecs) {
      const int vs = min(kSlabVecs, vecs - v0);
#pragma unroll
      for (int d = 0; d < kGemvDepth; ++d) {  // weight loads in flight while the activations are staged
        const int v = sub + d * lpr;
        if (v < vs) ring[d] = __ldg(wrow + v0 + v);
      }
      if (p == 0) {  // passes > 1 only with one slab: staged once
        __syncthreads();  // previous slab consumed (and row_sum initialised)
        gemv_stage_acts<BITS, MT>(x, x_dtype, k, v0, vs, row0, epi, act_lo, act_hi, xs, row_sum);
        __syncthreads();
      }
      const int ints = vs * L::kVecInts;
      for (int base = sub; base < vs; base += kGemvDepth * lpr) {
#pragma unroll
        for (int d = 0; d < kGemvDepth; ++d) {
          const int v = base + d * lpr;
          if (v < vs) {
            const uint4 cur = ring[d];
            const int vn = v + kGemvDepth * lpr;
            if (vn < vs) ring[d] = __ldg(wrow + v0 + vn);  // refill: kGemvDepth loads stay in flight
            gemv_dot<BITS, MT>(cur, xs + v * L::kVecInts, ints, acc);
          }
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      if (off < lpr) {
#pragma unroll
        for (int i = 0; i < MT; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
      }
    }
    if (sub == 0 && wrow_idx < epi.n) {
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (row0 + i < epi.m) store_output(epi, row0 + i, wrow_idx, acc[i] - kOff * row_sum[i]);
      }
    }
  }
#else
  __trap();  // never selected without __dp4a
#endif
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

// ------------------------------------------------------------------ MMA SYNC (large M, sm_80+)
//
// BM x 128 output tile (BM = 64 or 128), 8 warps (2 x 4) of (BM/2) x 32, mma.sync m16n8k32 with
// s8 activations and u8 weight codes (exact int32).  Per K tile of kKT elements, kStages deep:
//   A (int8 codes from quantize_rows_kernel) and B (packed words) arrive by cp.async;
//   after one barrier the block expands the packed B tile with shifts/ANDs into int8 codes in
//     natural K order (one shared buffer), a second barrier, then ldmatrix + mma;
//   shared rows are padded by 16 bytes (conflict-free ldmatrix).
// The epilogue loads each column's scale and bias once, subtracts 2^(b-1) * rowsum(xq) and stores
// straight from the accumulators (pairs of adjacent columns as one 4/8-byte store when it can).
template <int BITS, int BM>
struct MmaCfg {
  static constexpr int kBM = BM;
  static constexpr int kBN = 128;
  static constexpr int kThreads = 256;
  static constexpr int kMI = BM / 32;                                    // m16 tiles per warp
  static constexpr int kWords = BITS == 3 ? 16 : (BITS == 4 ? 8 : 4);  // packed words per row per K tile
  static constexpr int kKT = kWords * (32 / BITS);                       // 64, 64, 160 elements
  static constexpr int kStages = BITS == 3 ? 2 : 3;
  static constexpr int kStride = kKT + 16;                               // smem row bytes (80 / 176)
  static constexpr int kABytes = kBM * kStride;                          // one A stage
  static constexpr int kBpBytes = kBN * kWords * 4;                      // one packed B stage
  static constexpr int kSmemBytes = kStages * (kABytes + kBpBytes) + kBN * kStride;
  static constexpr int kWordsPerThread = kBN * kWords / kThreads;       // 4, 2, 8
  static_assert(kWordsPerThread * kThreads == kBN * kWords && kWordsPerThread % 2 == 0, "B tile split");
  static_assert(kKT % 32 == 0 && kStride % 16 == 0 && kBpBytes % 16 == 0, "whole k32 steps, 16-byte rows");
  static_assert(kMI * 32 == kBM && (kMI == 2 || kMI == 4), "8 warps as 2 x 4, m16 tiles per warp");
};

#if defined(QVIT_DEVICE_HAS_MMA_SYNC_S8)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_s8u8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One K tile of A (int8 codes, rows past m zero-filled) and packed B (rows past n: any valid row).
template <int BITS, int BM>
__device__ __forceinline__ void mma_load_tile(const int8_t* __restrict__ xq, int lda, int m, int m0,
                                              const uint32_t* __restrict__ w, int ldw, int n, int n0, int kt,
                                              int8_t* as, uint32_t* bp) {
  using C = MmaCfg<BITS, BM>;
  constexpr int kAChunks = C::kKT / 16;
  for (int c = threadIdx.x; c < C::kBM * kAChunks; c += C::kThreads) {
    const int r = c / kAChunks;
    const int q = c % kAChunks;
    const bool valid = m0 + r < m;
    const int8_t* src = xq + static_cast<size_t>(valid ? m0 + r : 0) * lda + kt * C::kKT + q * 16;
    cp_async16(as + r * C::kStride + q * 16, src, valid);
  }
  constexpr int kBChunks = C::kWords / 4;  // 16-byte chunks of packed words per row
  for (int c = threadIdx.x; c < C::kBN * kBChunks; c += C::kThreads) {
    const int r = c / kBChunks;
    const int q = c % kBChunks;
    const uint32_t* src = w + static_cast<size_t>(min(n0 + r, n - 1)) * ldw + kt * C::kWords + q * 4;
    cp_async16(bp + r * C::kWords + q * 4, src, true);
  }
}
#endif

// The packed B tile in shared memory -> int8 codes in natural K order (row tid / 2, half tid % 2).
template <int BITS, int BM>
__device__ __forceinline__ void mma_expand_b(const uint32_t* bp, int8_t* bx) {
  using C = MmaCfg<BITS, BM>;
  constexpr int kOutInts = C::kWordsPerThread * (32 / BITS) / 4;  // 8, 8, 20
  const uint32_t* src = bp + (threadIdx.x / 2) * C::kWords + (threadIdx.x % 2) * C::kWordsPerThread;
  uint32_t wv[C::kWordsPerThread];
#pragma unroll
  for (int i = 0; i < C::kWordsPerThread; i += 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(src + i);
    wv[i] = v.x;
    wv[i + 1] = v.y;
  }
  int out[kOutInts];
  if (BITS == 3) {
#pragma unroll
    for (int p = 0; p < C::kWordsPerThread / 2; ++p) {  // a word pair = 20 codes = 5 int8x4
      uint32_t u[5];
      expand_pair3(wv[2 * p], wv[2 * p + 1], u);
#pragma unroll
      for (int i = 0; i < 5; ++i) out[5 * p + i] = static_cast<int>(u[i]);
    }
  } else {
    constexpr int kE = Expand<BITS>::kE;
#pragma unroll
    for (int q = 0; q < C::kWordsPerThread; ++q) Expand<BITS>::run(wv[q], out + q * kE);
  }
  int8_t* dst = bx + (threadIdx.x / 2) * C::kStride + (threadIdx.x % 2) * (kOutInts * 4);
#pragma unroll
  for (int i = 0; i < kOutInts; i += 4) {
    *reinterpret_cast<int4*>(dst + 4 * i) = make_int4(out[i], out[i + 1], out[i + 2], out[i + 3]);
  }
}

#if defined(QVIT_DEVICE_HAS_MMA_SYNC_S8)
// Two adjacent output columns (col, col + 1) of one row; one 4/8-byte store when both are plain.
__device__ __forceinline__ void store_pair(const Epilogue& e, int row, int col, const int (&acc)[2],
                                           const float (&alpha)[2], const float (&beta)[2], const int (&cols)[2],
                                           bool pair_ok) {
  const size_t idx = static_cast<size_t>(row) * e.ldy + cols[0];
  if (pair_ok && e.y_dtype == QVIT_DTYPE_F16) {
    *reinterpret_cast<__half2*>(static_cast<__half*>(e.y) + idx) =
        __floats2half2_rn(fmaf(static_cast<float>(acc[0]), alpha[0], beta[0]),
                          fmaf(static_cast<float>(acc[1]), alpha[1], beta[1]));
    return;
  }
  if (pair_ok && e.y_dtype == QVIT_DTYPE_F32) {
    *reinterpret_cast<float2*>(static_cast<float*>(e.y) + idx) =
        make_float2(fmaf(static_cast<float>(acc[0]), alpha[0], beta[0]),
                    fmaf(static_cast<float>(acc[1]), alpha[1], beta[1]));
    return;
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    if (col + c < e.n) store_output(e, row, col + c, acc[c]);
  }
}
#endif

template <int BITS, int BM>
__global__ void __launch_bounds__(256)
    mma_sync_kernel(const int8_t* __restrict__ xq, const int* __restrict__ row_sum, int lda,
                    const uint32_t* __restrict__ w, int ldw, Epilogue epi) {
#if defined(QVIT_DEVICE_HAS_MMA_SYNC_S8)
  using C = MmaCfg<BITS, BM>;
  extern __shared__ __align__(16) int8_t smem[];
  int8_t* bx = smem + C::kStages * (C::kABytes + C::kBpBytes);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int wm = (warp >> 2) * (BM / 2);  // warp tile origin in the block tile
  const int wn = (warp & 3) * 32;
  const int m0 = blockIdx.y * C::kBM;
  const int n0 = blockIdx.x * C::kBN;
  const int tiles = lda / C::kKT;
  auto a_tile = [&](int s) { return smem + s * C::kABytes; };
  auto b_tile = [&](int s) { return reinterpret_cast<uint32_t*>(smem + C::kStages * C::kABytes + s * C::kBpBytes); };

  int acc[C::kMI][4][4];
#pragma unroll
  for (int i = 0; i < C::kMI; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < tiles) mma_load_tile<BITS, BM>(xq, lda, epi.m, m0, w, ldw, epi.n, n0, s, a_tile(s), b_tile(s));
    cp_async_commit();
  }
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // tile kt landed; everyone is done with tile kt - 1 (its stage and bx are free)
    const int next = kt + C::kStages - 1;
    if (next < tiles) {
      const int s = next % C::kStages;
      mma_load_tile<BITS, BM>(xq, lda, epi.m, m0, w, ldw, epi.n, n0, next, a_tile(s), b_tile(s));
    }
    cp_async_commit();
    mma_expand_b<BITS, BM>(b_tile(kt % C::kStages), bx);
    __syncthreads();
    const int8_t* as = a_tile(kt % C::kStages);
#pragma unroll
    for (int k32 = 0; k32 < C::kKT / 32; ++k32) {
      uint32_t a[C::kMI][4];
      uint32_t b[4][2];
#pragma unroll
      for (int i = 0; i < C::kMI; ++i) {
        const int r = wm + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(a[i], as + r * C::kStride + k32 * 32 + (lane >> 4) * 16);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t t[4];
        const int r = wn + j * 16 + (lane & 7) + (lane >> 4) * 8;
        ldmatrix_x4(t, bx + r * C::kStride + k32 * 32 + ((lane >> 3) & 1) * 16);
        b[2 * j][0] = t[0];
        b[2 * j][1] = t[1];
        b[2 * j + 1][0] = t[2];
        b[2 * j + 1][1] = t[3];
      }
#pragma unroll
      for (int i = 0; i < C::kMI; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8u8(acc[i][j], a[i], b[j][0], b[j][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: this thread's 8 columns (4 n8 tiles x 2), their scale / bias / output column once.
  constexpr int kOff = 1 << (BITS - 1);
  const int g = lane >> 2;
  const int t2 = (lane & 3) * 2;
  float alpha[4][2];
  float beta[4][2];
  int cols[4][2];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = min(n0 + wn + j * 8 + t2 + c, epi.n - 1);
      cols[j][c] = epi.col_map != nullptr ? __ldg(epi.col_map + r) : r;
      alpha[j][c] = epi.act_scale * __ldg(epi.weight_scale + cols[j][c]);
      beta[j][c] = epi.bias != nullptr ? __ldg(epi.bias + cols[j][c]) : 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < C::kMI; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm + i * 16 + g + h * 8;
      if (row >= epi.m) continue;
      const int corr = kOff * __ldg(row_sum + row);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = n0 + wn + j * 8 + t2;
        if (col >= epi.n) continue;
        const int v[2] = {acc[i][j][2 * h] - corr, acc[i][j][2 * h + 1] - corr};
        store_pair(epi, row, col, v, alpha[j], beta[j], cols[j], epi.pairs && col + 1 < epi.n);  // col is even
      }
    }
  }
#else
  __trap();  // never selected below sm_80
#endif
}

// ------------------------------------------------------------------ MMA INT4 (activations <= 4 bits, sm_80+)
//
// mma.sync m16n8k64 with s4 activation codes and u4 weight codes (exact int32), the offset
// correction as everywhere: acc - 2^(b-1) * rowsum(xq).  Activations: quantize_rows_s4_kernel
// (one warp per row) writes s4 codes in natural nibble order [m, nib_k(k) / 8 words] and the row
// sums.  Weights: the nibble-order layout (qvit_mma_int4.h), kept at 2/3/4 bits in memory and
// widened to u4 registers with a shift and a mask or two.  64 x 128 tiles, 8 warps (2 x 4) of
// 32 x 32, one 128-element K block per stage, kInt4Stages stages of cp.async.  Every fragment
// index comes from int4_frag_a / int4_frag_b / int4_frag_c, the functions tests/test_mma_int4.py
// checks against the PTX tables and emulates lane by lane.
constexpr int kInt4Stages = 3;

template <int BITS>
struct Int4Cfg {
  static constexpr int kBM = 64;
  static constexpr int kBN = 128;
  static constexpr int kThreads = 256;
  static constexpr int kBlockWords = nib_block_words(BITS);  // packed weight words per row per K block
  static constexpr int kAStride = kNibBlockK / 8 + 4;        // words per A row in smem (+16 bytes: no bank conflicts)
  static constexpr int kBStride = kBlockWords + 4;           // words per B row in smem
  static constexpr int kAWords = kBM * kAStride;
  static constexpr int kBWords = kBN * kBStride;
  static constexpr int kSmemBytes = kInt4Stages * (kAWords + kBWords) * 4;
  static_assert(kSmemBytes <= 48 * 1024, "static shared-memory limit");
  static_assert(kBlockWords % 4 == 0 && kAStride % 4 == 0 && kBStride % 4 == 0, "16-byte smem rows");
};

constexpr int kQuantS4RowsPerBlock = 8;

__global__ void __launch_bounds__(kQuantS4RowsPerBlock * 32)
    quantize_rows_s4_kernel(const void* __restrict__ x, int x_dtype, int m, int k, int ldw, float scale, int lo,
                            int hi, uint32_t* __restrict__ xs4, int* __restrict__ row_sum) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kQuantS4RowsPerBlock + (threadIdx.x >> 5);
  if (row >= m) return;
  const size_t base = static_cast<size_t>(row) * k;
  uint32_t* out = xs4 + static_cast<size_t>(row) * ldw;
  int sum = 0;
  for (int c = lane; c < ldw; c += 32) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int kk = 8 * c + j;
      const int v = kk < k ? quantize_act(x, x_dtype, base + kk, scale, lo, hi) : 0;  // in [-8, 7]
      sum += v;
      word |= (static_cast<uint32_t>(v) & 0xFu) << (4 * j);
    }
    out[c] = word;
  }
  sum = warp_sum(sum);
  if (lane == 0) row_sum[row] = sum;
}

#if defined(QVIT_DEVICE_HAS_MMA_S4)
__device__ __forceinline__ void mma_s4u4(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.u4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One K block: A (s4 words, rows past m zero-filled) and packed B (rows past n: the last valid row).
template <int BITS>
__device__ __forceinline__ void int4_load_tile(const uint32_t* __restrict__ xs4, int lda, int m, int m0,
                                               const uint32_t* __restrict__ w, int ldw, int n, int n0, int kt,
                                               uint32_t* as, uint32_t* bs) {
  using C = Int4Cfg<BITS>;
  constexpr int kAChunks = kNibBlockK / 32;  // 16-byte chunks per A row: 4
  for (int c = threadIdx.x; c < C::kBM * kAChunks; c += C::kThreads) {
    const int r = c / kAChunks;
    const int q = c % kAChunks;
    const bool valid = m0 + r < m;
    const uint32_t* src = xs4 + static_cast<size_t>(valid ? m0 + r : 0) * lda + kt * (kNibBlockK / 8) + q * 4;
    cp_async16(as + r * C::kAStride + q * 4, src, valid);
  }
  constexpr int kBChunks = C::kBlockWords / 4;
  for (int c = threadIdx.x; c < C::kBN * kBChunks; c += C::kThreads) {
    const int r = c / kBChunks;
    const int q = c % kBChunks;
    const uint32_t* src = w + static_cast<size_t>(min(n0 + r, n - 1)) * ldw + kt * C::kBlockWords + q * 4;
    cp_async16(bs + r * C::kBStride + q * 4, src, true);
  }
}

// The tile's two k64 steps: fragments loaded as int4_frag_a / int4_frag_b say, B widened to u4.
template <int BITS>
__device__ __forceinline__ void int4_tile_mma(const uint32_t* as, const uint32_t* bs, int wm, int wn, int lane,
                                              int (&acc)[2][4][4]) {
  using C = Int4Cfg<BITS>;
#pragma unroll
  for (int kk = 0; kk < kNibBlockK / kInt4MmaK; ++kk) {
    uint32_t a[2][4];
    uint32_t b[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // nibbles 8r .. 8r+7 of a lane are one word (consecutive K)
        int row, col;
        int4_frag_a(lane, 8 * r, &row, &col);
        a[i][r] = as[(wm + i * 16 + row) * C::kAStride + (kk * kInt4MmaK + col) / 8];
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        int kidx, ncol;
        int4_frag_b(lane, 8 * r, &kidx, &ncol);
        b[j][r] = nib_widen(bs + (wn + j * 8 + ncol) * C::kBStride, BITS, (kk * kInt4MmaK + kidx) / 8);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) mma_s4u4(acc[i][j], a[i], b[j]);
  }
}
#endif

template <int BITS>
__global__ void __launch_bounds__(256)
    mma_int4_kernel(const uint32_t* __restrict__ xs4, const int* __restrict__ row_sum, int lda,
                    const uint32_t* __restrict__ w, int ldw, Epilogue epi) {
#if defined(QVIT_DEVICE_HAS_MMA_S4)
  using C = Int4Cfg<BITS>;
  __shared__ __align__(16) uint32_t smem[kInt4Stages * (C::kAWords + C::kBWords)];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int wm = (warp >> 2) * 32;
  const int wn = (warp & 3) * 32;
  const int m0 = blockIdx.y * C::kBM;
  const int n0 = blockIdx.x * C::kBN;
  const int tiles = lda / (kNibBlockK / 8);
  auto a_tile = [&](int s) { return smem + s * C::kAWords; };
  auto b_tile = [&](int s) { return smem + kInt4Stages * C::kAWords + s * C::kBWords; };

  int acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < kInt4Stages - 1; ++s) {
    if (s < tiles) int4_load_tile<BITS>(xs4, lda, epi.m, m0, w, ldw, epi.n, n0, s, a_tile(s), b_tile(s));
    cp_async_commit();
  }
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<kInt4Stages - 2>();
    __syncthreads();  // tile kt landed; everyone is done with tile kt - 1, whose stage is refilled next
    const int next = kt + kInt4Stages - 1;
    if (next < tiles) {
      const int s = next % kInt4Stages;
      int4_load_tile<BITS>(xs4, lda, epi.m, m0, w, ldw, epi.n, n0, next, a_tile(s), b_tile(s));
    }
    cp_async_commit();
    int4_tile_mma<BITS>(a_tile(kt % kInt4Stages), b_tile(kt % kInt4Stages), wm, wn, lane, acc);
  }
  cp_async_wait<0>();

  constexpr int kOff = 1 << (BITS - 1);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        int row, col;
        int4_frag_c(lane, c, &row, &col);
        const int gm = m0 + wm + i * 16 + row;
        const int gn = n0 + wn + j * 8 + col;
        if (gm < epi.m && gn < epi.n) store_output(epi, gm, gn, acc[i][j][c] - kOff * __ldg(row_sum + gm));
      }
    }
  }
#else
  __trap();  // unreachable: lowbit_gemm refuses mma_int4 outside sm_80..90 (qvit_kernel_supported)
#endif
}

// ------------------------------------------------------------------ GEMV RING (small M, sm_80+)
//
// x is quantized ONCE (quantize_rows_kernel: int8 codes [m, repacked_k] + row sums, the same
// workspace as mma_sync) instead of by every block.  Then a persistent grid (about two blocks per
// SM): every warp owns whole weight rows (r = warp, warp + W, ...); each lane streams its 16-byte
// weight vectors through its own kGemvRingStages-deep cp.async ring in shared memory and consumes
// only the slots it filled itself, so the loop has no barrier at all (cp.async.wait_group is
// per thread).  Vectors expand to int8x4 codes (expand_word / expand_pair3) and meet the int8 x
// codes in __dp4a; a warp reduction per row, then the offset correction and the epilogue.
constexpr int kGemvRingWarps = 8;
constexpr int kGemvRingStages = 8;
constexpr int kGemvRingMaxMT = 4;
static_assert(kGemvRingWarps * kGemvRingStages * 32 * 16 <= 48 * 1024, "static shared-memory limit");

#if defined(QVIT_DEVICE_HAS_MMA_SYNC_S8)
// The dot products of one 16-byte weight vector (4 repacked words from element e0) with MT rows of x.
// xrow[i]: row i of the group's int8 x codes (rows past m alias the last valid row; their sums are dropped).
template <int BITS, int MT>
__device__ __forceinline__ void ring_consume(const uint4 v, const int8_t* const (&xrow)[MT], int e0, int (&acc)[MT]) {
  constexpr int kPer = 32 / BITS;
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if (BITS == 3) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {  // a word pair = 20 codes = 5 int8x4, starting at a multiple of 4
      uint32_t u[5];
      expand_pair3(w[2 * p], w[2 * p + 1], u);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int* xr = reinterpret_cast<const int*>(xrow[i] + e0 + 20 * p);
#pragma unroll
        for (int t = 0; t < 5; ++t) acc[i] = __dp4a(__ldg(xr + t), static_cast<int>(u[t]), acc[i]);
      }
    }
  } else {
    constexpr int kE = Expand<BITS>::kE;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      int e[kE];
      Expand<BITS>::run(w[q], e);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int* xr = reinterpret_cast<const int*>(xrow[i] + e0 + q * kPer);
#pragma unroll
        for (int t = 0; t < kE; ++t) acc[i] = __dp4a(__ldg(xr + t), e[t], acc[i]);
      }
    }
  }
}
#endif

template <int BITS, int MT>
__global__ void __launch_bounds__(kGemvRingWarps * 32)
    gemv_ring_kernel(const int8_t* __restrict__ xq, const int* __restrict__ row_sum, int lda,
                     const uint32_t* __restrict__ w, int ldw, Epilogue epi) {
#if defined(QVIT_DEVICE_HAS_MMA_SYNC_S8)
  __shared__ __align__(16) uint4 ring[kGemvRingWarps][kGemvRingStages][32];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gwarp = blockIdx.x * kGemvRingWarps + warp;
  const int nwarps = gridDim.x * kGemvRingWarps;
  const int m0 = blockIdx.y * MT;
  const int mt = min(MT, epi.m - m0);
  const int8_t* xrow[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) xrow[i] = xq + static_cast<size_t>(m0 + min(i, mt - 1)) * lda;  // stay inside xq
  const int vecs = ldw / 4;                                  // 16-byte vectors per weight row
  const int per_row = (vecs + 31) / 32;                      // ring steps per row (uniform across lanes)
  const int rows = gwarp < epi.n ? (epi.n - 1 - gwarp) / nwarps + 1 : 0;
  const int steps = rows * per_row;
  uint4* slots = ring[warp][0] + lane;
  auto issue = [&](int s) {  // qvit_gemv_ring.h ring_step: step s -> row and vector of this lane
    const int r = gwarp + (s / per_row) * nwarps;
    const int vec = lane + 32 * (s % per_row);
    const bool valid = s < steps && vec < vecs;
    const uint32_t* src = w + (valid ? static_cast<size_t>(r) * ldw + 4 * vec : 0);
    cp_async16(slots + (s % kGemvRingStages) * 32, src, valid);
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kGemvRingStages; ++s) issue(s);
  int acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0;
  constexpr int kPer = 32 / BITS;
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<kGemvRingStages - 1>();  // this lane's step s landed (its own slot: no barrier)
    const int vec = lane + 32 * (s % per_row);
    if (vec < vecs) ring_consume<BITS, MT>(slots[(s % kGemvRingStages) * 32], xrow, 4 * vec * kPer, acc);
    issue(s + kGemvRingStages);  // refill the slot just read (in this thread's program order)
    if (s % per_row == per_row - 1) {  // row done: reduce across the warp, lane 0 stores
      const int r = gwarp + (s / per_row) * nwarps;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int total = warp_sum(acc[i]);
        acc[i] = 0;
        if (lane == 0 && i < mt) {
          store_output(epi, m0 + i, r, total - (1 << (BITS - 1)) * __ldg(row_sum + m0 + i));
        }
      }
    }
  }
  cp_async_wait<0>();
#else
  __trap();  // unreachable: lowbit_gemm refuses gemv_ring below sm_80 (qvit_kernel_supported)
#endif
}

// ------------------------------------------------------------------ launchers
//
// Kernels are launched through cudaLaunchKernel, so each launch reports its OWN status
// (cudaGetLastError would also return, and clear, an earlier error of another library).

unsigned ceil_div(int a, int b) { return static_cast<unsigned>((a + b - 1) / b); }

template <typename... P, typename Tuple, size_t... I>
cudaError_t launch_tuple(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Tuple& t,
                         std::index_sequence<I...>) {
  void* args[] = {static_cast<void*>(&std::get<I>(t))..., nullptr};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, args, smem, stream);
}

template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... a) {
  std::tuple<P...> t(a...);  // exact parameter types: the argument array must match the kernel signature
  return launch_tuple(kernel, grid, block, smem, stream, t, std::index_sequence_for<P...>{});
}

Epilogue make_epilogue(const LowBitGemmArgs& a) {
  const int ldy = a.ldy > 0 ? a.ldy : a.n;
  const uintptr_t pair_bytes = a.y_dtype == QVIT_DTYPE_F16 ? 4u : 8u;
  const bool pairs = a.col_map == nullptr && (ldy & 1) == 0 && (reinterpret_cast<uintptr_t>(a.y) & (pair_bytes - 1)) == 0;
  return Epilogue{a.y, a.y_dtype, a.weight_scale, a.bias, a.col_map, a.act_scale, a.m, a.n, ldy, pairs};
}

template <int BITS, int MT>
cudaError_t launch_a16_gemv(const LowBitGemmArgs& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.n, kGemvWarps), ceil_div(a.m, MT));
  return launch(a16_gemv_kernel<BITS, MT>, grid, dim3(kGemvWarps * 32), 0, stream, a.x, a.x_dtype, a.w, a.ldw, a.k,
                a.act_lo, a.act_hi, make_epilogue(a));
}

// Lanes per weight row: as many as keep >= 2 16-byte vectors per lane (power of two, 1..32).
int gemv_lanes_per_row(int k, int bits) {
  const int vecs = (packed_words(k, bits) + 3) / 4;
  int lpr = 32;
  while (lpr > 1 && vecs < 2 * lpr) lpr >>= 1;
  return lpr;
}

// Multiprocessors of the current device (cached per device).
int sm_count() {
  static std::atomic<int> cache[16];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 0;
  if (dev < 16 && cache[dev].load() > 0) return cache[dev].load();
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (dev < 16) cache[dev].store(n);
  return n;
}

template <int BITS, int MT>
cudaError_t launch_gemv_dp4a(const LowBitGemmArgs& a, cudaStream_t stream) {
  const int lpr = gemv_lanes_per_row(a.k, BITS);
  const int rows_per_block = kDp4aWarps * (32 / lpr);
  const int blocks = static_cast<int>(ceil_div(a.n, rows_per_block));
  // Large layers: about two blocks per SM, each serving several row groups from one staged slab.
  const int vecs = (packed_words(a.k, BITS) + 3) / 4;
  const int target = 2 * sm_count();
  int passes = 1;
  if (vecs <= GemvSlab<BITS, MT>::kVecs && target > 0 && blocks > target) {
    passes = min(8, static_cast<int>(ceil_div(blocks, target)));
  }
  const dim3 grid(ceil_div(blocks, passes), ceil_div(a.m, MT));
  return launch(gemv_dp4a_kernel<BITS, MT>, grid, dim3(kDp4aWarps * 32), 0, stream, a.x, a.x_dtype, a.w, a.ldw, a.k,
                a.act_lo, a.act_hi, lpr, passes, make_epilogue(a));
}

// One instantiation per row-group size MT in {1, 2, 4, 8, 16}; larger M runs in groups of 16.
template <int BITS, bool kDp4a>
cudaError_t launch_gemv(const LowBitGemmArgs& a, cudaStream_t stream) {
  if (a.m <= 1) return kDp4a ? launch_gemv_dp4a<BITS, 1>(a, stream) : launch_a16_gemv<BITS, 1>(a, stream);
  if (a.m <= 2) return kDp4a ? launch_gemv_dp4a<BITS, 2>(a, stream) : launch_a16_gemv<BITS, 2>(a, stream);
  if (a.m <= 4) return kDp4a ? launch_gemv_dp4a<BITS, 4>(a, stream) : launch_a16_gemv<BITS, 4>(a, stream);
  if (a.m <= 8 || !kDp4a) return kDp4a ? launch_gemv_dp4a<BITS, 8>(a, stream) : launch_a16_gemv<BITS, 8>(a, stream);
  return launch_gemv_dp4a<BITS, 16>(a, stream);
}

// Dynamic shared memory above 48 KB must be opted into once per kernel and device.
template <int BITS, int BM>
cudaError_t enable_mma_smem() {
  static std::atomic<unsigned long long> done_devices{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = 1ull << (dev & 63);
  if ((done_devices.load() & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(reinterpret_cast<const void*>(mma_sync_kernel<BITS, BM>),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, MmaCfg<BITS, BM>::kSmemBytes);
  if (err == cudaSuccess) done_devices.fetch_or(bit);
  return err;
}

// M tile: 64 rows below kMmaSmallM (more blocks for the GPU when M x N is small), else 128.
constexpr int kMmaSmallM = 2048;

template <int BITS, int BM>
cudaError_t launch_mma_tiles(const LowBitGemmArgs& a, const int8_t* xq, const int* row_sum, int lda,
                             cudaStream_t stream) {
  using C = MmaCfg<BITS, BM>;
  const cudaError_t err = enable_mma_smem<BITS, BM>();
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(a.n, C::kBN), ceil_div(a.m, C::kBM));
  return launch(mma_sync_kernel<BITS, BM>, grid, dim3(C::kThreads), static_cast<size_t>(C::kSmemBytes), stream,
                xq, row_sum, lda, a.w, a.ldw, make_epilogue(a));
}

// x quantized once into the workspace (int8 codes at the repacked K, then the row sums): what mma_sync and
// gemv_ring both read.
struct QuantizedX {
  int8_t* xq;
  int* row_sum;
  int lda;
};

template <int BITS>
cudaError_t quantize_x_once(const LowBitGemmArgs& a, cudaStream_t stream, QuantizedX* q) {
  q->lda = repacked_k(a.k, BITS);
  q->xq = static_cast<int8_t*>(a.workspace);
  q->row_sum = reinterpret_cast<int*>(q->xq + (static_cast<size_t>(a.m) * q->lda + 255) / 256 * 256);
  return launch(quantize_rows_kernel, dim3(ceil_div(a.m, kQuantRowsPerBlock)), dim3(kQuantRowsPerBlock * 32), 0,
                stream, a.x, a.x_dtype, a.m, a.k, q->lda, a.act_scale, a.act_lo, a.act_hi, q->xq, q->row_sum);
}

template <int BITS>
cudaError_t launch_mma_sync(const LowBitGemmArgs& a, cudaStream_t stream) {
  QuantizedX q;
  const cudaError_t err = quantize_x_once<BITS>(a, stream, &q);
  if (err != cudaSuccess) return err;
  int8_t* xq = q.xq;
  int* row_sum = q.row_sum;
  const int lda = q.lda;
  if (a.m < kMmaSmallM) return launch_mma_tiles<BITS, 64>(a, xq, row_sum, lda, stream);
  return launch_mma_tiles<BITS, 128>(a, xq, row_sum, lda, stream);
}

template <int BITS, int MT>
cudaError_t launch_gemv_ring_mt(const LowBitGemmArgs& a, const int8_t* xq, const int* row_sum, int lda,
                                cudaStream_t stream) {
  // Persistent: about two blocks per SM (or fewer when the layer has fewer rows than warps).
  const int blocks = min(static_cast<int>(ceil_div(a.n, kGemvRingWarps)), max(2 * sm_count(), 1));
  const dim3 grid(static_cast<unsigned>(blocks), ceil_div(a.m, MT));
  return launch(gemv_ring_kernel<BITS, MT>, grid, dim3(kGemvRingWarps * 32), 0, stream, xq, row_sum, lda, a.w,
                a.ldw, make_epilogue(a));
}

template <int BITS>
cudaError_t launch_gemv_ring(const LowBitGemmArgs& a, cudaStream_t stream) {
  QuantizedX q;  // x quantized once: the mma_sync workspace layout
  const cudaError_t err = quantize_x_once<BITS>(a, stream, &q);
  if (err != cudaSuccess) return err;
  if (a.m <= 1) return launch_gemv_ring_mt<BITS, 1>(a, q.xq, q.row_sum, q.lda, stream);
  if (a.m <= 2) return launch_gemv_ring_mt<BITS, 2>(a, q.xq, q.row_sum, q.lda, stream);
  return launch_gemv_ring_mt<BITS, kGemvRingMaxMT>(a, q.xq, q.row_sum, q.lda, stream);
}

template <int BITS>
cudaError_t launch_mma_int4(const LowBitGemmArgs& a, cudaStream_t stream) {
  const int lda = nib_k(a.k) / 8;  // s4 words per activation row
  uint32_t* xs4 = static_cast<uint32_t*>(a.workspace);
  int* row_sum = reinterpret_cast<int*>(static_cast<char*>(a.workspace) +
                                        (static_cast<size_t>(a.m) * lda * 4 + 255) / 256 * 256);
  const cudaError_t err = launch(quantize_rows_s4_kernel, dim3(ceil_div(a.m, kQuantS4RowsPerBlock)),
                                 dim3(kQuantS4RowsPerBlock * 32), 0, stream, a.x, a.x_dtype, a.m, a.k, lda,
                                 a.act_scale, a.act_lo, a.act_hi, xs4, row_sum);
  if (err != cudaSuccess) return err;
  using C = Int4Cfg<BITS>;
  const dim3 grid(ceil_div(a.n, C::kBN), ceil_div(a.m, C::kBM));
  const uint32_t* cxs4 = xs4;
  const int* crow_sum = row_sum;
  return launch(mma_int4_kernel<BITS>, grid, dim3(C::kThreads), 0, stream, cxs4, crow_sum, lda, a.w, a.ldw,
                make_epilogue(a));
}

template <int BITS>
cudaError_t launch_legacy_a8(const LowBitGemmArgs& a, int kernel, cudaStream_t stream) {
  const int lda = a8_lda(a.k);
  int8_t* xq = static_cast<int8_t*>(a.workspace);
  const dim3 qgrid(ceil_div(lda / 4, 256), static_cast<unsigned>(a.m < 65535 ? a.m : 65535));
  cudaError_t err = launch(quantize_act_kernel, qgrid, dim3(256), 0, stream, a.x, a.x_dtype, a.m, a.k, lda,
                           a.act_scale, a.act_lo, a.act_hi, xq);
  if (err != cudaSuccess) return err;
  const dim3 tiles(ceil_div(a.n, kTile), ceil_div(a.m, kTile));
  const int8_t* cxq = xq;
  const Epilogue epi = make_epilogue(a);
  if (kernel == QVIT_KERNEL_A8_MMA) {
    return launch(a8_mma_kernel<BITS>, tiles, dim3(kMmaThreads), 0, stream, cxq, lda, a.w, a.ldw, epi);
  }
  if (kernel == QVIT_KERNEL_A8_DP4A) {
    return launch(a8_simt_kernel<BITS, true>, tiles, dim3(256), 0, stream, cxq, lda, a.w, a.ldw, epi);
  }
  return launch(a8_simt_kernel<BITS, false>, tiles, dim3(256), 0, stream, cxq, lda, a.w, a.ldw, epi);
}

template <int BITS>
cudaError_t launch_bits(const LowBitGemmArgs& a, int kernel, cudaStream_t stream) {
  switch (kernel) {
    case QVIT_KERNEL_GEMV_DP4A:
      return launch_gemv<BITS, true>(a, stream);
    case QVIT_KERNEL_A16_GEMV:
      return launch_gemv<BITS, false>(a, stream);
    case QVIT_KERNEL_MMA_SYNC:
      return launch_mma_sync<BITS>(a, stream);
    case QVIT_KERNEL_MMA_INT4:
      return launch_mma_int4<BITS>(a, stream);
    case QVIT_KERNEL_GEMV_RING:
      return launch_gemv_ring<BITS>(a, stream);
    case QVIT_KERNEL_A16_TILED: {
      const dim3 tiles(ceil_div(a.n, kTile), ceil_div(a.m, kTile));
      return launch(a16_tiled_kernel<BITS>, tiles, dim3(256), 0, stream, a.x, a.x_dtype, a.w, a.ldw, a.k, a.act_lo,
                    a.act_hi, make_epilogue(a));
    }
    case QVIT_KERNEL_A8_MMA:
    case QVIT_KERNEL_A8_DP4A:
    case QVIT_KERNEL_A8_INT:
      return launch_legacy_a8<BITS>(a, kernel, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Rows of one launch along grid.y, per kernel (grid.y <= 65535).
int rows_per_grid_y(int kernel) {
  switch (kernel) {
    case QVIT_KERNEL_GEMV_DP4A: return 16;
    case QVIT_KERNEL_A16_GEMV: return 8;
    case QVIT_KERNEL_MMA_SYNC:
    case QVIT_KERNEL_MMA_INT4: return 64;
    case QVIT_KERNEL_GEMV_RING: return kGemvRingMaxMT;
    default: return kTile;
  }
}

// Compute capability of the current device (cached per device; legal under stream capture).
bool device_cc(int* major, int* minor) {
  static std::atomic<int> cache[16];  // major * 16 + minor + 1, 0 = unknown
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
  int v = dev < 16 ? cache[dev].load() : 0;
  if (v == 0) {
    int ma = 0;
    int mi = 0;
    if (cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
      return false;
    }
    v = ma * 16 + mi + 1;
    if (dev < 16) cache[dev].store(v);
  }
  *major = (v - 1) / 16;
  *minor = (v - 1) % 16;
  return true;
}

bool valid_args(const LowBitGemmArgs& a, int kernel) {
  if (a.m < 0 || a.n <= 0 || a.k <= 0 || !is_packed_bits(a.bits)) return false;
  if (a.x == nullptr || a.y == nullptr || a.w == nullptr || a.weight_scale == nullptr) return false;
  if (a.ldw != qvit_weight_words(a.k, a.bits, kernel)) return false;  // nibble order for mma_int4
  if (kernel == QVIT_KERNEL_MMA_INT4 && !qvit_act_fits_s4(a.act_lo, a.act_hi)) return false;
  if (a.ldy != 0 && a.ldy < a.n && a.col_map == nullptr) return false;
  if ((reinterpret_cast<uintptr_t>(a.w) & 15u) != 0) return false;  // 16-byte weight vectors
  if (a.x_dtype != QVIT_DTYPE_F32 && a.x_dtype != QVIT_DTYPE_F16 && a.x_dtype != QVIT_DTYPE_I8) return false;
  if (a.y_dtype != QVIT_DTYPE_F32 && a.y_dtype != QVIT_DTYPE_F16 && a.y_dtype != QVIT_DTYPE_I32) return false;
  if (a.act_lo > a.act_hi || a.act_lo < -128 || a.act_hi > 127 || !(a.act_scale > 0.0f)) return false;
  if (kernel <= QVIT_KERNEL_INVALID || kernel >= QVIT_NUM_KERNELS) return false;
  const size_t need = qvit_workspace_size(a.m, a.k, a.bits, kernel);
  // The kernels read the workspace with 16-byte accesses: that is all the alignment they need.
  if (need > 0 && (a.workspace == nullptr || a.workspace_bytes < need ||
                   (reinterpret_cast<uintptr_t>(a.workspace) & 15u) != 0)) {
    return false;
  }
  return static_cast<long long>(ceil_div(a.m, rows_per_grid_y(kernel))) <= 65535;
}

}  // namespace

cudaError_t layernorm_quantize(const LayerNormQuantArgs& a, cudaStream_t stream) {
  if (a.m == 0) return cudaSuccess;
  if (a.m < 0 || a.k <= 0 || a.x == nullptr || a.codes == nullptr || a.ldq < a.k || (a.ldq & 3) != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.x_dtype != QVIT_DTYPE_F32 && a.x_dtype != QVIT_DTYPE_F16) return cudaErrorInvalidValue;
  if (a.act_lo > a.act_hi || a.act_lo < -128 || a.act_hi > 127 || !(a.act_scale > 0.0f) || !(a.eps >= 0.0f)) {
    return cudaErrorInvalidValue;
  }
  return launch(layernorm_quant_kernel, dim3(ceil_div(a.m, kLnRowsPerBlock)), dim3(kLnRowsPerBlock * 32), 0, stream,
                a.x, a.x_dtype, a.m, a.k, a.gamma, a.beta, a.eps, a.act_scale, a.act_lo, a.act_hi, a.codes, a.ldq,
                a.row_sum);
}

cudaError_t lowbit_gemm(const LowBitGemmArgs& args, int kernel, cudaStream_t stream) {
  if (args.m == 0) return cudaSuccess;  // before the pointer checks: empty tensors may have null data
  if (!valid_args(args, kernel)) return cudaErrorInvalidValue;
  // A kernel forced onto a device without its instructions is refused here (the device code's
  // __trap() guards are then unreachable): "operation not supported", nothing launched.
  int cc_major = 0;
  int cc_minor = 0;
  if (!device_cc(&cc_major, &cc_minor)) return cudaErrorNoDevice;
  if (!qvit_kernel_supported(kernel, cc_major, cc_minor)) return cudaErrorNotSupported;
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
