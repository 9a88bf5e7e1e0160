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

// Node attribute names == plugin field names, in LOWBIT_ATTRS order.
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
// The one-time engine-build repack keeps the shared format bit for bit and only pads:
// rows to a multiple of kRepackRowAlign (tile edge: no bounds checks on weight rows) and
// words per row so that a row covers round_up(K, kRepackKAlign) elements and is a
// multiple of kRepackWordAlign words (16-byte aligned rows).  Pad words = zero_word.
constexpr int kRepackRowAlign = 64;
constexpr int kRepackKAlign = 64;
constexpr int kRepackWordAlign = 4;

QVIT_HD constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
QVIT_HD constexpr int repacked_rows(int n) { return round_up(n, kRepackRowAlign); }
QVIT_HD constexpr int repacked_words(int k, int bits) {
  return round_up(packed_words(round_up(k, kRepackKAlign), bits), kRepackWordAlign);
}
// Row stride (bytes) of the int8 activation workspace used by the A8 kernels.
QVIT_HD constexpr int a8_lda(int k) { return round_up(k, 32); }

}  // namespace qvit

#endif  // QVIT_LOWBIT_FORMAT_H
