"""CPU emulation of the INT4 tensor-core kernel (``mma_int4`` in runtime/cuda/lowbit_gemm.cu), lane by lane.

Why: an INT4 GEMM is only as exact as its fragment bookkeeping, and no GPU is needed to check it.
Two independent descriptions meet here:

* :func:`ptx_tables` -- the fragment layout of ``mma.sync.aligned.m16n8k64.row.col.s32.s4.u4.s32``
  transcribed from the PTX ISA tables ("Matrix Fragments for mma.m16n8k64", .s4/.u4 and .s32):
  which (row, column) each nibble / accumulator of each lane is.  :func:`mma_m16n8k64` executes
  the instruction with these semantics on 32 lanes' registers.
* the kernel's own index math (``int4_frag_a/b/c``, ``nib_widen`` in runtime/cuda/qvit_mma_int4.h),
  which tests/test_mma_int4.py dumps from the compiled header and hands to :func:`emulate_gemm`
  as ``kernel_tables``; :func:`emulate_gemm` builds every register exactly as the kernel does
  (A: one 32-bit word of 8 consecutive s4 codes; B: :func:`nib_widen` of the nibble-order words),
  runs the PTX semantics, scatters the accumulators where the kernel stores them and applies the
  offset correction ``acc - 2^(b-1) * rowsum(xq)``.

If the kernel's mapping disagreed with the hardware's, the result would differ from the plain
integer matmul ``xq @ q.T``.  Pure numpy; no torch.
"""

from typing import Dict

import numpy as np

import qformat

M_TILE, N_TILE, K_STEP = 16, 8, 64
#: Elements per nibble-order block of a weight row and its words per width (qvit_mma_int4.h).
NIB_BLOCK_K = 128
NIB_BLOCK_WORDS = {2: 8, 3: 12, 4: 16}


def ptx_tables() -> Dict[str, np.ndarray]:
    """(row, col) per lane and element, as the PTX ISA states them for m16n8k64 .s4/.u4/.s32.

    ``a[lane, i]`` for the 32 nibbles of a0..a3 (nibble i = register i // 8, bits 4 * (i % 8)),
    ``b[lane, i]`` for the 16 nibbles of b0, b1 (row = k, col = n), ``c[lane, i]`` for c0..c3.
    """
    a = np.zeros((32, 32, 2), np.int64)
    b = np.zeros((32, 16, 2), np.int64)
    c = np.zeros((32, 4, 2), np.int64)
    for lane in range(32):
        group_id, thread_in_group = lane >> 2, lane % 4
        for i in range(32):
            row = group_id if (i < 8 or 16 <= i < 24) else group_id + 8
            col = thread_in_group * 8 + (i & 0x7) + (32 if i >= 16 else 0)
            a[lane, i] = (row, col)
        for i in range(16):
            row = thread_in_group * 8 + (i & 0x7) + (32 if i >= 8 else 0)
            b[lane, i] = (row, group_id)
        for i in range(4):
            c[lane, i] = (group_id if i < 2 else group_id + 8, thread_in_group * 2 + (i & 0x1))
    return {"a": a, "b": b, "c": c}


def _nibbles(regs: np.ndarray, signed: bool) -> np.ndarray:
    """uint32 registers [..., r] -> their 8 nibbles each [..., r * 8] (low nibble first)."""
    r = regs.astype(np.uint64)[..., None] >> (4 * np.arange(8, dtype=np.uint64))
    v = (r & 0xF).astype(np.int64).reshape(regs.shape[:-1] + (regs.shape[-1] * 8,))
    return np.where(v >= 8, v - 16, v) if signed else v


def mma_m16n8k64(a_regs: np.ndarray, b_regs: np.ndarray, c_regs: np.ndarray, ptx: Dict[str, np.ndarray]) -> np.ndarray:
    """One ``mma.sync.m16n8k64.row.col.s32.s4.u4.s32`` over 32 lanes: registers in, D registers out.

    a_regs uint32 [32, 4], b_regs uint32 [32, 2], c_regs int64 [32, 4] -> d int64 [32, 4].
    """
    a = np.zeros((M_TILE, K_STEP), np.int64)
    b = np.zeros((K_STEP, N_TILE), np.int64)
    count_a = np.zeros(a.shape, np.int64)
    count_b = np.zeros(b.shape, np.int64)
    an, bn = _nibbles(a_regs, signed=True), _nibbles(b_regs, signed=False)
    a[ptx["a"][..., 0], ptx["a"][..., 1]] = an
    b[ptx["b"][..., 0], ptx["b"][..., 1]] = bn
    np.add.at(count_a, (ptx["a"][..., 0], ptx["a"][..., 1]), 1)
    np.add.at(count_b, (ptx["b"][..., 0], ptx["b"][..., 1]), 1)
    assert (count_a == 1).all() and (count_b == 1).all(), "the PTX tables must cover A and B exactly once"
    prod = a @ b
    return c_regs + prod[ptx["c"][..., 0], ptx["c"][..., 1]]


def repack_nib(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """qformat words [N, packed_words] -> the nibble-order layout [round_up(N, 64), nib words] (numpy twin of
    ``qvit_repack_weights_nib``)."""
    n = packed.shape[0]
    codes = qformat.unpack(np.asarray(packed, np.uint32), bits, k).astype(np.int64) - qformat.qrange(bits)[0]
    blocks = -(-k // NIB_BLOCK_K)
    full = np.full((-(-n // 64) * 64, blocks * NIB_BLOCK_K), -qformat.qrange(bits)[0], np.int64)
    full[:n, :k] = codes
    rows = full.shape[0]
    c = full.astype(np.uint64)
    j4 = np.uint64(4) * np.arange(8, dtype=np.uint64)  # nibble j of a u4 register
    if bits == 4:  # word q = elements 8q .. 8q+7, element j in nibble j
        out = (c.reshape(rows, -1, 8) << j4).sum(axis=2)
    elif bits == 2:  # word p of a block: element 16p + 8h + j at bits 4j + 2h
        shift = j4[None, :] + np.uint64(2) * np.arange(2, dtype=np.uint64)[:, None]
        out = (c.reshape(rows, blocks, 8, 2, 8) << shift).sum(axis=(3, 4)).reshape(rows, -1)
    else:  # per 32 elements g (q = 4g + r): low 2 bits in words 3g + r // 2 at 4j + 2 (r % 2), high bit in 3g + 2
        c5 = c.reshape(rows, blocks, 4, 2, 2, 8)
        shift = j4[None, :] + np.uint64(2) * np.arange(2, dtype=np.uint64)[:, None]
        lo = ((c5 & np.uint64(3)) << shift).sum(axis=(4, 5))
        hbit = ((c.reshape(rows, blocks, 4, 4, 8) >> np.uint64(2)) & np.uint64(1))
        hi = (hbit << (j4[None, :] + np.arange(4, dtype=np.uint64)[:, None])).sum(axis=(3, 4))
        out = np.concatenate([lo, hi[..., None]], axis=3).reshape(rows, -1)
    return out.astype(np.uint32)


def nib_widen(block: np.ndarray, bits: int, q: int) -> np.ndarray:
    """The u4 register of elements 8q .. 8q+7 of nibble-order blocks ``block[..., words]`` (qvit_mma_int4.h)."""
    w = block.astype(np.uint32)
    if bits == 4:
        return w[..., q]
    if bits == 2:
        return (w[..., q >> 1] >> np.uint32(2 * (q & 1))) & np.uint32(0x33333333)
    g, r = q >> 2, q & 3
    lo = (w[..., 3 * g + (r >> 1)] >> np.uint32(2 * (r & 1))) & np.uint32(0x33333333)
    hi = ((w[..., 3 * g + 2] >> np.uint32(r)) & np.uint32(0x11111111)) << np.uint32(2)
    return lo | hi


def pack_s4_rows(xq: np.ndarray) -> np.ndarray:
    """s4 activation codes [M, K] -> uint32 words [M, K / 8], element k in nibble k % 8 (the kernel's A layout)."""
    m, k = xq.shape
    nib = (xq.astype(np.int64) & 0xF).astype(np.uint64).reshape(m, k // 8, 8)
    return (nib << (np.uint64(4) * np.arange(8, dtype=np.uint64))).sum(axis=2).astype(np.uint32)


def emulate_gemm(xq: np.ndarray, w_nib: np.ndarray, bits: int, kernel_tables: Dict[str, np.ndarray],
                 ptx: Dict[str, np.ndarray]) -> np.ndarray:
    """The INT4 kernel's arithmetic on the CPU: exact ``xq @ q.T`` [M, N_padded] from s4 codes and nibble-order words.

    kernel_tables: the kernel's int4_frag_a / int4_frag_b / int4_frag_c for every lane and element
    (arrays shaped like :func:`ptx_tables`).
    """
    m, k = xq.shape
    kp = -(-k // NIB_BLOCK_K) * NIB_BLOCK_K
    mp = -(-m // M_TILE) * M_TILE
    x = np.zeros((mp, kp), np.int64)
    x[:m, :k] = xq
    xw = pack_s4_rows(x)
    bw = NIB_BLOCK_WORDS[bits]
    n_rows = w_nib.shape[0]
    acc = np.zeros((mp, n_rows), np.int64)
    ka, kb, kc = kernel_tables["a"], kernel_tables["b"], kernel_tables["c"]
    lanes = np.arange(32)
    for m0 in range(0, mp, M_TILE):
        for n0 in range(0, n_rows, N_TILE):
            c = np.zeros((32, 4), np.int64)
            for k0 in range(0, kp, K_STEP):
                a_regs = np.zeros((32, 4), np.uint32)
                b_regs = np.zeros((32, 2), np.uint32)
                for r in range(4):  # register r = the 8 nibbles starting at the kernel's (row, col) of nibble 8r
                    row, col = ka[lanes, 8 * r, 0], ka[lanes, 8 * r, 1]
                    a_regs[:, r] = xw[m0 + row, (k0 + col) // 8]
                for r in range(2):  # register r = nib_widen of the block holding the kernel's (k, n) of nibble 8r
                    kk, nn = kb[lanes, 8 * r, 0], kb[lanes, 8 * r, 1]
                    e = k0 + kk
                    blocks = w_nib[n0 + nn].reshape(32, -1, bw)[lanes, e // NIB_BLOCK_K]
                    for lane in range(32):
                        b_regs[lane, r] = nib_widen(blocks[lane], bits, int(e[lane] % NIB_BLOCK_K) // 8)
                c = mma_m16n8k64(a_regs, b_regs, c, ptx)
            for i in range(4):
                row, col = kc[lanes, i, 0], kc[lanes, i, 1]
                acc[m0 + row, n0 + col] = c[:, i]
    off = 1 << (bits - 1)
    return (acc - off * x.sum(axis=1, keepdims=True))[:m]
