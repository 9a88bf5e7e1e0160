// qvit_lowbit_format.h -- the C++ mirror of the qformat contract (qformat/__init__.py).
//
// This is the ONE place where C++/CUDA code gets the packed-weight layout constants and
// the QvitLowBitLinear node / plugin names.  tests/test_cuda_build.py compiles this header
// with g++, prints every value and checks it against qformat, so the two cannot drift.
//
// Layout (see qformat docstring for the picture): weights [N, K] are uint32 words
// [N, ceil(K / per_word)], per_word = 32 / bits; element k of row n lives in word
// k / per_word at bit offset bits * (k % per_word); code = q + 2^(bits-1) (offset binary);
// padding past K holds the code of q = 0.
//
// C++14, no CUDA or TensorRT dependency (usable from .cu, host .cpp and the plugin).
#ifndef QVIT_LOWBIT_FORMAT_H
#define QVIT_LOWBIT_FORMAT_H

#include <cstdint>

#if defined(__CUDACC__)
#define QVIT_HD __host__ __device__
#else
#define QVIT_HD
#endif

namespace qvit {

constexpr int kFormatVersion = 2;  // 2: mixed widths per output-row group
constexpr int kWordBits = 32;
constexpr int kMinPackedBits = 2;
constexpr int kMaxPackedBits = 4;  // PACKED_BITS = (2, 3, 4): contiguous range

// QvitLowBitLinear node == TensorRT plugin identity (LOWBIT_OP, LOWBIT_DOMAIN, ...).
constexpr const char* kLowbitOp = "QvitLowBitLinear";
constexpr const char* kLowbitDomain = "qvit.edge";
constexpr int kLowbitOpset = 1;
constexpr const char* kLowbitPluginVersion = "1";
constexpr const char* kLowbitPluginNamespace = "";

// Node attribute names == plugin field names, in LOWBIT_ATTRS order.  group_size / group_bits
// exist only on mixed-width nodes (format version 2).
enum LowbitAttr : int {
  kAttrBits = 0,
  kAttrInFeatures,
  kAttrOutFeatures,
  kAttrWeightPacked,
  kAttrWeightScale,
  kAttrBias,
  kAttrActScale,
  kAttrActLo,
  kAttrActHi,
  kAttrActBits,
  kAttrPluginVersion,
  kAttrPluginNamespace,
  kAttrGroupSize,  // mixed-width nodes only: output rows per group
  kAttrGroupBits,  // mixed-width nodes only: int32 [ceil(N / group_size)] widths; weight_packed is 1-D rows
  kNumLowbitAttrs
};

inline const char* lowbit_attr_name(int i) {
  static const char* const kNames[kNumLowbitAttrs] = {
      "bits",      "in_features", "out_features", "weight_packed", "weight_scale",   "bias",
      "act_scale", "act_lo",      "act_hi",       "act_bits",      "plugin_version", "plugin_namespace",
      "group_size", "group_bits"};
  return (i >= 0 && i < kNumLowbitAttrs) ? kNames[i] : nullptr;
}

QVIT_HD constexpr bool is_packed_bits(int bits) { return bits >= kMinPackedBits && bits <= kMaxPackedBits; }
// values_per_word: 2 -> 16, 3 -> 10 (top 2 bits spare), 4 -> 8.
QVIT_HD constexpr int values_per_word(int bits) { return kWordBits / bits; }
QVIT_HD constexpr int packed_words(int k, int bits) { return (k + values_per_word(bits) - 1) / values_per_word(bits); }
// Offset-binary code of q = 0 (also the padding code): 2^(bits-1).
QVIT_HD constexpr uint32_t code_of_zero(int bits) { return 1u << (bits - 1); }
QVIT_HD constexpr int qmin(int bits) { return -(1 << (bits - 1)); }
QVIT_HD constexpr int qmax(int bits) { return (1 << (bits - 1)) - 1; }
// A whole padding word: every slot holds code_of_zero.
QVIT_HD inline uint32_t zero_word(int bits) {
  uint32_t w = 0;
  for (int i = 0; i < values_per_word(bits); ++i) w |= code_of_zero(bits) << (bits * i);
  return w;
}

// ------------------------------------------------------------ kernel-preferred repack
// The one-time engine-build repack (qvit_repack_weights) keeps every code but moves it to a
// kernel-friendly slot inside its word, and pads:
//   * rows to a multiple of kRepackRowAlign (tile edge: no bounds checks on weight rows);
//   * words per row so that a row covers round_up(K, kRepackKAlign) elements and is a multiple
//     of repack_word_align(bits) words (16-byte aligned rows; whole 64-value K tiles for 2/4
//     bits, whole 160-value K tiles for 3 bits).  Pad slots hold code_of_zero.
// In-word slots ("expand order"): the codes of word elements j = 0..per-1 are placed so that a
// shift and one AND yield four consecutive elements as the four bytes of a 32-bit word (what
// __dp4a and int8 MMA fragments want):
//   4 bits: nibble 2*(j%4) + j/4      -> (w >> 0) & 0x0F0F0F0F = j 0..3,  (w >> 4) & .. = j 4..7
//   2 bits: field 4*(j%4) + j/4        -> (w >> 2s) & 0x03030303 = j 4s .. 4s+3
//   3 bits: j 0..3 at bits 0/8/16/24, j 4..7 at 3/11/19/27 -> (w >> 0|3) & 0x07070707;
//           j 8 at bits {6,7,14}, j 9 at bits {15,22,23}; bits 30, 31 stay 0.
constexpr int kRepackRowAlign = 64;
constexpr int kRepackKAlign = 64;

QVIT_HD constexpr int repack_word_align(int bits) { return bits == 3 ? 16 : (bits == 4 ? 8 : 4); }
QVIT_HD constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
QVIT_HD constexpr int repacked_rows(int n) { return round_up(n, kRepackRowAlign); }
QVIT_HD constexpr int repacked_words(int k, int bits) {
  return round_up(packed_words(round_up(k, kRepackKAlign), bits), repack_word_align(bits));
}
// Elements a repacked row holds (ldw * values_per_word): the A8 kernels' int8 row length.
QVIT_HD constexpr int repacked_k(int k, int bits) { return repacked_words(k, bits) * values_per_word(bits); }

// Row stride (bytes) of the int8 activation workspace used by the legacy A8 kernels.
QVIT_HD constexpr int a8_lda(int k) { return round_up(k, 32); }

// Code of element j (0 <= j < per_word) of a repacked word (unsigned, 0 .. 2^bits - 1).
QVIT_HD inline uint32_t slot_code(uint32_t w, int bits, int j) {
  if (bits == 4) return (w >> (4 * (2 * (j & 3) + (j >> 2)))) & 0xFu;
  if (bits == 2) return (w >> (2 * (4 * (j & 3) + (j >> 2)))) & 0x3u;
  if (j < 8) return (w >> (8 * (j & 3) + 3 * (j >> 2))) & 0x7u;
  if (j == 8) return ((w >> 6) & 0x3u) | ((w >> 12) & 0x4u);
  return ((w >> 15) & 0x1u) | ((w >> 21) & 0x6u);
}

// The repacked word holding codes[0 .. per_word-1] (inverse of slot_code).
inline uint32_t slot_word(const uint32_t* codes, int bits) {
  uint32_t w = 0;
  if (bits == 4 || bits == 2) {
    for (int j = 0; j < values_per_word(bits); ++j) {
      const int slot = bits == 4 ? 2 * (j & 3) + (j >> 2) : 4 * (j & 3) + (j >> 2);
      w |= codes[j] << (bits * slot);
    }
    return w;
  }
  for (int j = 0; j < 8; ++j) w |= codes[j] << (8 * (j & 3) + 3 * (j >> 2));
  w |= ((codes[8] & 0x3u) << 6) | ((codes[8] & 0x4u) << 12);
  w |= ((codes[9] & 0x1u) << 15) | ((codes[9] & 0x6u) << 21);
  return w;
}

// The padding word of the repacked layout: code_of_zero in every slot.
inline uint32_t repacked_zero_word(int bits) {
  uint32_t codes[16];
  for (int j = 0; j < 16; ++j) codes[j] = code_of_zero(bits);
  return slot_word(codes, bits);
}


// ------------------------------------------------------------ expand: repacked word -> int8x4 codes
// The unpack every int8 kernel uses (host-testable: tests/test_cuda_build.py runs it with g++).
// kExpandWords(bits) int8x4 words per repacked word; for 2 and 4 bits word s holds elements
// 4s .. 4s+3; for 3 bits words 0, 1 hold elements 0..3, 4..7 and word 2 holds 8, 9, 0, 0.
QVIT_HD constexpr int expand_words(int bits) { return bits == 3 ? 3 : (bits == 4 ? 2 : 4); }

QVIT_HD inline void expand_word(uint32_t w, int bits, uint32_t* e) {
  if (bits == 4) {
    e[0] = w & 0x0F0F0F0Fu;
    e[1] = (w >> 4) & 0x0F0F0F0Fu;
  } else if (bits == 2) {
    for (int s = 0; s < 4; ++s) e[s] = (w >> (2 * s)) & 0x03030303u;
  } else {
    e[0] = w & 0x07070707u;
    e[1] = (w >> 3) & 0x07070707u;
    const uint32_t c8 = ((w >> 6) & 0x3u) | ((w >> 12) & 0x4u);
    const uint32_t c9 = ((w >> 15) & 0x1u) | ((w >> 21) & 0x6u);
    e[2] = c8 | (c9 << 8);
  }
}

// Two 3-bit words (20 elements) as five int8x4 words in natural element order.
QVIT_HD inline void expand_pair3(uint32_t w0, uint32_t w1, uint32_t* out) {
  uint32_t e0[3];
  uint32_t e1[3];
  expand_word(w0, 3, e0);
  expand_word(w1, 3, e1);
  out[0] = e0[0];
  out[1] = e0[1];
  out[2] = e0[2] | (e1[0] << 16);
  out[3] = (e1[0] >> 16) | (e1[1] << 16);
  out[4] = (e1[1] >> 16) | (e1[2] << 16);
}

}  // namespace qvit

#endif  // QVIT_LOWBIT_FORMAT_H
