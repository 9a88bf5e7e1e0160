// qvit_mma_int4.h -- the INT4 tensor-core path's index math, in ONE place (host and device).
//
// 1. Fragment layout of mma.sync.aligned.m16n8k64.row.col.s32.s4.u4.s32 (PTX ISA, "Matrix
//    Fragments for mma.m16n8k64", .s4/.u4): with group = lane / 4 and tig = lane % 4,
//      A (16 x 64, row major): 4 .b32 registers = 32 nibbles; nibble i (register i / 8, bits
//        4 * (i % 8)) is row group + 8 * ((i / 8) % 2), column tig * 8 + (i % 8) + 32 * (i / 16);
//      B (64 x 8, column major): 2 .b32 registers = 16 nibbles; nibble i is row (k)
//        tig * 8 + (i % 8) + 32 * (i / 8), column (n) group;
//      C/D (16 x 8, s32): 4 registers; c_i is row group + 8 * (i / 2), column tig * 2 + i % 2.
//    The kernel (lowbit_gemm.cu, mma_int4_kernel) takes every fragment address from these
//    functions; tests/test_mma_int4.py dumps them with g++ and checks them against an independent
//    transcription of the PTX tables and a lane-by-lane numpy emulation of the whole kernel.
//
// 2. "Nibble order" weight repack (qvit_repack_weights_nib, once per engine): the packed 2/3/4-bit
//    codes stay at their width in memory, arranged per 128-element block of a row so that the u4
//    B-fragment register of elements 8q .. 8q+7 (q = 0..15: natural order, element 8q + j in
//    nibble j) comes out of a shift and a mask or two -- 2- and 3-bit codes widened in registers:
//      4 bits, 16 words: word q = nibbles of elements 8q .. 8q+7;                 u4(q) = w[q]
//      2 bits,  8 words: word p: element 16p + j at bits 4j + 2 * (j / 8) (j % 8 in nibble j % 8);
//                                                          u4(q) = (w[q/2] >> 2 (q%2)) & 0x33333333
//      3 bits, 12 words: per 32 elements g (q = 4g + r): the low two bits as the 2-bit scheme in
//                        words 3g, 3g+1, the high bits in word 3g + 2 at bit 4 (e % 8) + r;
//                        u4(q) = ((w[3g + r/2] >> 2 (r%2)) & 0x33333333) | (((w[3g+2] >> r) & 0x11111111) << 2)
//    Codes are the offset-binary weight codes (q + 2^(b-1), 0 .. 2^b - 1: .u4); activations are
//    signed 4-bit codes (.s4, [act_lo, act_hi] inside [-8, 7]); the offset correction is the
//    existing one: acc = sum(xq * code) - 2^(b-1) * sum(xq).  Rows are padded to 64, K to 128
//    (padding = code of zero, as everywhere).
//
// C++14, no CUDA dependency (QVIT_HD = __host__ __device__ under nvcc).
#ifndef QVIT_MMA_INT4_H
#define QVIT_MMA_INT4_H

#include <cstdint>

#include "qvit_lowbit_format.h"

namespace qvit {

// ------------------------------------------------------------ m16n8k64 s4 x u4 fragments
constexpr int kInt4MmaM = 16;
constexpr int kInt4MmaN = 8;
constexpr int kInt4MmaK = 64;

// A nibble i (0..31) of `lane`: row in 0..15, column (k) in 0..63.
QVIT_HD inline void int4_frag_a(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * ((i >> 3) & 1);
  *col = (lane & 3) * 8 + (i & 7) + 32 * (i >> 4);
}

// B nibble i (0..15) of `lane`: row (k) in 0..63, column (n) in 0..7.
QVIT_HD inline void int4_frag_b(int lane, int i, int* k, int* n) {
  *k = (lane & 3) * 8 + (i & 7) + 32 * (i >> 3);
  *n = lane >> 2;
}

// Accumulator i (0..3) of `lane`: row in 0..15, column in 0..7.
QVIT_HD inline void int4_frag_c(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * (i >> 1);
  *col = (lane & 3) * 2 + (i & 1);
}

// ------------------------------------------------------------ nibble-order weight layout
constexpr int kNibBlockK = 128;  // elements per block of a row

QVIT_HD constexpr int nib_block_words(int bits) { return bits == 4 ? 16 : (bits == 2 ? 8 : 12); }
// Words per repacked row: whole 128-element blocks (16-byte multiples at every width).
QVIT_HD constexpr int nib_words(int k, int bits) { return (k + kNibBlockK - 1) / kNibBlockK * nib_block_words(bits); }
// Padded K of the activation codes the INT4 kernel reads (8 nibbles per word, whole blocks).
QVIT_HD constexpr int nib_k(int k) { return (k + kNibBlockK - 1) / kNibBlockK * kNibBlockK; }

// The u4 B register of elements 8q .. 8q+7 (q = 0..15) of one block `w` (nib_block_words words).
QVIT_HD inline uint32_t nib_widen(const uint32_t* w, int bits, int q) {
  if (bits == 4) return w[q];
  if (bits == 2) return (w[q >> 1] >> (2 * (q & 1))) & 0x33333333u;
  const int g = q >> 2;
  const int r = q & 3;
  return ((w[3 * g + (r >> 1)] >> (2 * (r & 1))) & 0x33333333u) | (((w[3 * g + 2] >> r) & 0x11111111u) << 2);
}

// Place `code` (0 .. 2^bits - 1) of element e (0..127) into block `w` (zeroed by the caller).
inline void nib_place(uint32_t* w, int bits, int e, uint32_t code) {
  const int q = e >> 3;
  const int j = e & 7;
  if (bits == 4) {
    w[q] |= code << (4 * j);
  } else if (bits == 2) {
    w[q >> 1] |= code << (4 * j + 2 * (q & 1));
  } else {
    const int g = q >> 2;
    const int r = q & 3;
    w[3 * g + (r >> 1)] |= (code & 3u) << (4 * j + 2 * (r & 1));
    w[3 * g + 2] |= ((code >> 2) & 1u) << (4 * j + r);
  }
}

}  // namespace qvit

#endif  // QVIT_MMA_INT4_H
