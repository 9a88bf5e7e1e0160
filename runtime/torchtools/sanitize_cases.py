"""Small, checked cases of every kernel family, for compute-sanitizer and ncu (run by gpu_check).

Each case runs one kernel on random data and compares its exact accumulators with numpy, so a
sanitizer pass also proves the results.  ``--profile NAME`` runs one large case (for ncu).
Exit status 1 when a result is wrong.
"""

import argparse
import sys

import numpy as np

import qformat

#: kernel -> minimum compute capability
KERNELS = {"gemv_dp4a": (6, 1), "mma_sync": (8, 0), "a16_gemv": (5, 0), "a16_tiled": (5, 0), "a8_mma": (7, 2),
           "a8_int": (5, 0), "mma_int4": (8, 0), "gemv_ring": (8, 0)}
#: Activation grid per kernel (mma_int4 multiplies signed 4-bit codes); default int8.
GRIDS = {"mma_int4": (-8, 7)}
# (m, n, k): tails, slabs, several tiles, a layer large enough for multi-pass GEMV blocks
SHAPES = [(1, 70, 389), (7, 33, 1536), (200, 130, 160), (2, 4096, 2048)]
PROFILES = {"gemv_large": ("gemv_dp4a", 1, 8192, 8192, 4), "mma_deit": ("mma_sync", 6304, 1536, 384, 4),
            "gemv_deit": ("gemv_dp4a", 1, 1536, 384, 4), "ring_large": ("gemv_ring", 1, 8192, 8192, 4),
            "int4_deit": ("mma_int4", 197, 1536, 384, 4)}


def _case(torch, gemm_ext, kernel, m, n, k, bits, seed):
    rng = np.random.default_rng(seed)
    lo, hi = qformat.qrange(bits)
    q = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
    x = (rng.normal(size=(m, k)) * 3.0).astype(np.float32)
    a_lo, a_hi = GRIDS.get(kernel, (-128, 127))
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), qformat.pack(q, bits), bits, 0.05, a_lo, a_hi,
                                     kernel=kernel)
    xq = np.clip(np.rint(x / np.float32(0.05)), a_lo, a_hi).astype(np.int64)
    return bool(np.array_equal(acc.cpu().numpy(), xq @ q.astype(np.int64).T))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), help="run one large case (for ncu) instead")
    args = p.parse_args(argv)
    import torch

    from runtime.torchtools import gemm_ext

    cc = torch.cuda.get_device_capability()
    if args.profile:
        kernel, m, n, k, bits = PROFILES[args.profile]
        ok = _case(torch, gemm_ext, kernel, m, n, k, bits, 0)
        print("{} {}: {}".format(args.profile, kernel, "ok" if ok else "WRONG"))
        return 0 if ok else 1
    bad = 0
    for kernel, need in KERNELS.items():
        if cc < need:
            continue
        for i, (m, n, k) in enumerate(SHAPES):
            bits = qformat.PACKED_BITS[i % 3]
            if m * n * k > 10 ** 7 and not kernel.startswith("gemv"):
                continue  # the large case exercises the GEMV's multi-pass blocks only
            ok = _case(torch, gemm_ext, kernel, m, n, k, bits, i)
            bad += not ok
            print("{:<10} m={:<4} n={:<4} k={:<5} w{}: {}".format(kernel, m, n, k, bits, "ok" if ok else "WRONG"))
    torch.cuda.synchronize()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
