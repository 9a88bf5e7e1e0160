// lowbit_host.cpp -- host-only helpers of the low-bit GEMM (see lowbit_host.h).  C++14, no CUDA.
#include "lowbit_host.h"

#include "qvit_lowbit_format.h"
#include "qvit_mma_int4.h"

namespace {

bool valid_dims(int m, int n, int k) { return m >= 0 && n > 0 && k > 0; }

int cc_of(int cc_major, int cc_minor) { return cc_major * 10 + cc_minor; }

// __dp4a is fast on sm_61 and sm_70+; sm_62 (TX2 GP10B) and sm_53 have no fast int8 at all.
bool has_fast_dp4a(int cc) { return cc == 61 || cc >= 70; }

// Large-M int8 kernel: mma.sync m16n8k32 on sm_80+, WMMA int8 on sm_72/75, __dp4a on sm_61/70,
// else the generic int32 SIMT kernel.
int a8_kernel_for(int cc) {
  if (cc >= 80) return QVIT_KERNEL_MMA_SYNC;
  if (cc >= 72) return QVIT_KERNEL_A8_MMA;
  if (cc == 61 || cc == 70) return QVIT_KERNEL_A8_DP4A;
  return QVIT_KERNEL_A8_INT;
}

size_t round256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

#ifndef QVIT_AUTO_INT4
#define QVIT_AUTO_INT4 0  // unmeasured on a GPU (issue 21): opt-in through path a4 or kernel mma_int4
#endif

extern "C" {

int qvit_act_fits_s4(int act_lo, int act_hi) { return act_lo >= -8 && act_hi <= 7 && act_lo <= act_hi; }

int qvit_select_kernel_act(int m, int n, int k, int bits, int x_dtype, int path, int cc_major, int cc_minor,
                           int act_lo, int act_hi) {
  const int base = qvit_select_kernel(m, n, k, bits, x_dtype, path == QVIT_PATH_A4 ? QVIT_PATH_AUTO : path,
                                      cc_major, cc_minor);
  if (base == QVIT_KERNEL_INVALID) return base;
  const int cc = cc_of(cc_major, cc_minor);
  const bool fits = qvit_act_fits_s4(act_lo, act_hi) != 0;
  // INT4 mma: sm_80..90 only (lowbit_gemm.cu builds it for those; Blackwell / Thor is not built nor measured)
  if (path == QVIT_PATH_A4) return fits && cc >= 80 && cc < 100 ? QVIT_KERNEL_MMA_INT4 : QVIT_KERNEL_INVALID;
  // auto takes INT4 only once a GPU run has shown it exact and faster (QVIT_AUTO_INT4=1 at build time);
  // until then it is the a4 path / a forced kernel, and auto keeps mma_sync
  if (QVIT_AUTO_INT4 && path == QVIT_PATH_AUTO && fits && m > QVIT_GEMV_MAX_M && cc >= 80 && cc < 90)
    return QVIT_KERNEL_MMA_INT4;
  return base;
}

int qvit_select_kernel(int m, int n, int k, int bits, int x_dtype, int path, int cc_major, int cc_minor) {
  if (!valid_dims(m, n, k) || !qvit::is_packed_bits(bits)) return QVIT_KERNEL_INVALID;
  if (x_dtype != QVIT_DTYPE_F32 && x_dtype != QVIT_DTYPE_F16 && x_dtype != QVIT_DTYPE_I8) return QVIT_KERNEL_INVALID;
  if (cc_major < 5) return QVIT_KERNEL_INVALID;
  const int cc = cc_of(cc_major, cc_minor);
  const bool small = m <= QVIT_GEMV_MAX_M;
  switch (path) {
    case QVIT_PATH_A8:
      return small && has_fast_dp4a(cc) ? QVIT_KERNEL_GEMV_DP4A : a8_kernel_for(cc);
    case QVIT_PATH_A16:
      return small ? QVIT_KERNEL_A16_GEMV : QVIT_KERNEL_A16_TILED;
    case QVIT_PATH_AUTO:
      if (small) return has_fast_dp4a(cc) ? QVIT_KERNEL_GEMV_DP4A : QVIT_KERNEL_A16_GEMV;
      return has_fast_dp4a(cc) ? a8_kernel_for(cc) : QVIT_KERNEL_A16_TILED;
    default:
      return QVIT_KERNEL_INVALID;
  }
}

size_t qvit_workspace_size(int m, int k, int bits, int kernel) {
  if (m <= 0 || k <= 0 || !qvit::is_packed_bits(bits)) return 0;
  switch (kernel) {
    case QVIT_KERNEL_A8_MMA:
    case QVIT_KERNEL_A8_DP4A:
    case QVIT_KERNEL_A8_INT:
      // int8 activations [m, a8_lda(k)], zero-padded.
      return round256(static_cast<size_t>(m) * static_cast<size_t>(qvit::a8_lda(k)));
    case QVIT_KERNEL_MMA_SYNC:
    case QVIT_KERNEL_GEMV_RING:
      // int8 activations [m, repacked_k(k, bits)] + int32 row sums [m].
      return round256(static_cast<size_t>(m) * static_cast<size_t>(qvit::repacked_k(k, bits))) +
             round256(static_cast<size_t>(m) * sizeof(int));
    case QVIT_KERNEL_MMA_INT4:
      // s4 activation codes [m, nib_k(k) / 2 bytes] + int32 row sums [m].
      return round256(static_cast<size_t>(m) * static_cast<size_t>(qvit::nib_k(k) / 2)) +
             round256(static_cast<size_t>(m) * sizeof(int));
    default:
      return 0;
  }
}

int qvit_kernel_supported(int kernel, int cc_major, int cc_minor) {
  const int cc = cc_of(cc_major, cc_minor);
  switch (kernel) {
    case QVIT_KERNEL_MMA_INT4: return cc >= 80 && cc < 100;  // built for sm_80..90 only (lowbit_gemm.cu)
    case QVIT_KERNEL_MMA_SYNC:
    case QVIT_KERNEL_GEMV_RING: return cc >= 80;
    case QVIT_KERNEL_A8_MMA: return cc >= 72;
    case QVIT_KERNEL_A8_DP4A:
    case QVIT_KERNEL_GEMV_DP4A: return cc >= 61;
    case QVIT_KERNEL_A16_GEMV:
    case QVIT_KERNEL_A16_TILED:
    case QVIT_KERNEL_A8_INT: return cc_major >= 5;
    default: return 0;
  }
}

const char* qvit_kernel_name(int kernel) {
  switch (kernel) {
    case QVIT_KERNEL_A16_GEMV: return "a16_gemv";
    case QVIT_KERNEL_A16_TILED: return "a16_tiled";
    case QVIT_KERNEL_A8_MMA: return "a8_mma";
    case QVIT_KERNEL_A8_DP4A: return "a8_dp4a";
    case QVIT_KERNEL_A8_INT: return "a8_int";
    case QVIT_KERNEL_GEMV_DP4A: return "gemv_dp4a";
    case QVIT_KERNEL_MMA_SYNC: return "mma_sync";
    case QVIT_KERNEL_MMA_INT4: return "mma_int4";
    case QVIT_KERNEL_GEMV_RING: return "gemv_ring";
    default: return "invalid";
  }
}

int qvit_repacked_rows(int n) { return n > 0 ? qvit::repacked_rows(n) : 0; }

int qvit_repacked_words(int k, int bits) {
  return (k > 0 && qvit::is_packed_bits(bits)) ? qvit::repacked_words(k, bits) : 0;
}

int qvit_repack_weights(const uint32_t* src, int n, int k, int bits, uint32_t* dst) {
  if (src == nullptr || dst == nullptr || n <= 0 || k <= 0 || !qvit::is_packed_bits(bits)) return -1;
  const int per = qvit::values_per_word(bits);
  const int words = qvit::packed_words(k, bits);
  const int rows = qvit::repacked_rows(n);
  const int ldw = qvit::repacked_words(k, bits);
  const uint32_t mask = (1u << bits) - 1u;
  const uint32_t pad = qvit::repacked_zero_word(bits);
  for (int r = 0; r < rows; ++r) {
    uint32_t* out = dst + static_cast<size_t>(r) * ldw;
    const uint32_t* in = src + static_cast<size_t>(r) * words;
    for (int c = 0; c < ldw; ++c) {
      if (r >= n || c >= words) {
        out[c] = pad;
        continue;
      }
      uint32_t codes[16];
      for (int j = 0; j < per; ++j) {
        // Elements past K already hold the code of zero in the qformat word (its padding rule).
        codes[j] = (in[c] >> (bits * j)) & mask;
      }
      out[c] = qvit::slot_word(codes, bits);
    }
  }
  return 0;
}

int qvit_nib_words(int k, int bits) {
  return (k > 0 && k <= (1 << 30) && qvit::is_packed_bits(bits)) ? qvit::nib_words(k, bits) : 0;
}

int qvit_weight_words(int k, int bits, int kernel) {
  return kernel == QVIT_KERNEL_MMA_INT4 ? qvit_nib_words(k, bits) : qvit_repacked_words(k, bits);
}

int qvit_repack_weights_nib(const uint32_t* src, int n, int k, int bits, uint32_t* dst) {
  if (src == nullptr || dst == nullptr || n <= 0 || k <= 0 || !qvit::is_packed_bits(bits)) return -1;
  const int per = qvit::values_per_word(bits);
  const int words = qvit::packed_words(k, bits);
  const int rows = qvit::repacked_rows(n);
  const int ldw = qvit::nib_words(k, bits);
  const int bw = qvit::nib_block_words(bits);
  const uint32_t mask = (1u << bits) - 1u;
  for (int r = 0; r < rows; ++r) {
    uint32_t* out = dst + static_cast<size_t>(r) * ldw;
    const uint32_t* in = src + static_cast<size_t>(r) * words;
    for (int c = 0; c < ldw; ++c) out[c] = 0u;
    for (int e = 0; e < ldw / bw * qvit::kNibBlockK; ++e) {
      // Past K and past N: the code of zero (the qformat word's own padding inside the last word).
      const uint32_t code = (r < n && e < words * per) ? (in[e / per] >> (bits * (e % per))) & mask
                                                       : qvit::code_of_zero(bits);
      qvit::nib_place(out + (e / qvit::kNibBlockK) * bw, bits, e % qvit::kNibBlockK, code);
    }
  }
  return 0;
}

}  // extern "C"
