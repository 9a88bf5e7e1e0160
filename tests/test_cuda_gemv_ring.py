"""The persistent cp.async-ring GEMV (gemv_ring, sm_80+) on a GPU: exact against the integer reference.

Why: the ring kernel streams every weight vector through a per-lane shared-memory ring with no barrier
and quantizes x once; its row/vector bookkeeping (rows per warp, lanes past the row end, row groups of
M) must still give the exact accumulators.  Skips without an sm_80+ GPU; tests/test_cuda_build.py
checks its SASS (cp.async, no barrier) on the CPU.
"""

import numpy as np
import pytest

import qformat
from runtime.torchtools import gemm_ext

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()

SHAPES = [(1, 37, 45), (1, 1, 7), (2, 130, 67), (3, 33, 10), (4, 64, 16), (5, 96, 391), (16, 70, 1536),
          (1, 4096, 2048), (3, 1152, 384), (1, 8192, 8192)]


def _skip_without_sm80():
    if not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("gemv_ring needs an sm_80+ GPU")


def _problem(m, n, k, bits, seed):
    rng = np.random.default_rng(seed)
    lo, hi = qformat.qrange(bits)
    q = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
    x = (rng.normal(size=(m, k)) * 3.0).astype(np.float32)
    return q, qformat.pack(q, bits), x


@pytest.mark.cuda
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_ring_bit_exact(bits, m, n, k):
    _skip_without_sm80()
    q, packed, x = _problem(m, n, k, bits, seed=m + n + k + bits)
    s, lo, hi = 0.05, -100, 120
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), packed, bits, s, lo, hi, kernel="gemv_ring")
    xq = np.clip(qformat.round_half_even(x / np.float32(s)), lo, hi).astype(np.int64)
    np.testing.assert_array_equal(acc.cpu().numpy(), xq @ q.astype(np.int64).T)


@pytest.mark.cuda
def test_gemv_ring_float_output_equals_gemv_dp4a():
    _skip_without_sm80()
    _, packed, x = _problem(1, 384, 1536, 4, seed=3)
    rng = np.random.default_rng(0)
    ws, bias = rng.uniform(0.005, 0.05, 384).astype(np.float32), rng.normal(size=384).astype(np.float32)
    xt = torch.from_numpy(x).cuda().half()
    ys = [gemm_ext.lowbit_linear(xt, packed, ws, bias, 4, 0.05, -128, 127, kernel=kn)
          for kn in ("gemv_ring", "gemv_dp4a")]
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)
