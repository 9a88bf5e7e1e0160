// lowbit_host.cpp -- host-only helpers of the low-bit GEMM (see lowbit_host.h).  C++14, no CUDA.
#include "lowbit_host.h"

#include "qvit_lowbit_format.h"

namespace {

bool valid_dims(int m, int n, int k) { return m >= 0 && n > 0 && k > 0; }

// Path for fp activations when A8 is requested: tensor cores where WMMA int8 exists (sm_72+),
// __dp4a where it is fast (sm_61, sm_70), else generic int32.  sm_62 (TX2 GP10B) and sm_53 have
// no fast int8, so "auto" sends them to the A16 kernels instead.
int a8_kernel_for(int cc_major, int cc_minor) {
  const int cc = cc_major * 10 + cc_minor;
  if (cc >= 72) return QVIT_KERNEL_A8_MMA;
  if (cc == 61 || cc == 70) return QVIT_KERNEL_A8_DP4A;
  return QVIT_KERNEL_A8_INT;
}

bool has_fast_int8(int cc_major, int cc_minor) {
  const int cc = cc_major * 10 + cc_minor;
  return cc == 61 || cc >= 70;
}

}  // namespace

extern "C" {

int qvit_select_kernel(int m, int n, int k, int bits, int x_dtype, int path, int cc_major, int cc_minor) {
  if (!valid_dims(m, n, k) || !qvit::is_packed_bits(bits)) return QVIT_KERNEL_INVALID;
  if (x_dtype != QVIT_DTYPE_F32 && x_dtype != QVIT_DTYPE_F16 && x_dtype != QVIT_DTYPE_I8) return QVIT_KERNEL_INVALID;
  if (cc_major < 5) return QVIT_KERNEL_INVALID;
  switch (path) {
    case QVIT_PATH_A8:
      return a8_kernel_for(cc_major, cc_minor);
    case QVIT_PATH_A16:
      return m <= QVIT_GEMV_MAX_M ? QVIT_KERNEL_A16_GEMV : QVIT_KERNEL_A16_TILED;
    case QVIT_PATH_AUTO:
      if (m <= QVIT_GEMV_MAX_M) return QVIT_KERNEL_A16_GEMV;  // weight-bandwidth bound: fewest bytes wins
      if (has_fast_int8(cc_major, cc_minor)) return a8_kernel_for(cc_major, cc_minor);
      return QVIT_KERNEL_A16_TILED;
    default:
      return QVIT_KERNEL_INVALID;
  }
}

size_t qvit_workspace_size(int m, int k, int kernel) {
  if (m <= 0 || k <= 0) return 0;
  switch (kernel) {
    case QVIT_KERNEL_A8_MMA:
    case QVIT_KERNEL_A8_DP4A:
    case QVIT_KERNEL_A8_INT: {
      // int8 activations [m, a8_lda(k)], zero-padded, rounded to 256 bytes.
      const size_t bytes = static_cast<size_t>(m) * static_cast<size_t>(qvit::a8_lda(k));
      return (bytes + 255) / 256 * 256;
    }
    default:
      return 0;
  }
}

const char* qvit_kernel_name(int kernel) {
  switch (kernel) {
    case QVIT_KERNEL_A16_GEMV: return "a16_gemv";
    case QVIT_KERNEL_A16_TILED: return "a16_tiled";
    case QVIT_KERNEL_A8_MMA: return "a8_mma";
    case QVIT_KERNEL_A8_DP4A: return "a8_dp4a";
    case QVIT_KERNEL_A8_INT: return "a8_int";
    default: return "invalid";
  }
}

int qvit_repacked_rows(int n) { return n > 0 ? qvit::repacked_rows(n) : 0; }

int qvit_repacked_words(int k, int bits) {
  return (k > 0 && qvit::is_packed_bits(bits)) ? qvit::repacked_words(k, bits) : 0;
}

int qvit_repack_weights(const uint32_t* src, int n, int k, int bits, uint32_t* dst) {
  if (src == nullptr || dst == nullptr || n <= 0 || k <= 0 || !qvit::is_packed_bits(bits)) return -1;
  const int words = qvit::packed_words(k, bits);
  const int rows = qvit::repacked_rows(n);
  const int ldw = qvit::repacked_words(k, bits);
  const uint32_t pad = qvit::zero_word(bits);
  for (int r = 0; r < rows; ++r) {
    uint32_t* out = dst + static_cast<size_t>(r) * ldw;
    const uint32_t* in = src + static_cast<size_t>(r) * words;
    for (int c = 0; c < ldw; ++c) out[c] = (r < n && c < words) ? in[c] : pad;
  }
  return 0;
}

}  // extern "C"
