"""The INT4 tensor-core kernel (mma_int4) on a GPU: exact against the integer reference.

Why: tests/test_mma_int4.py proves the fragment bookkeeping on the CPU; these run the real
``mma.sync.m16n8k64.s4.u4`` (native on sm_80/86/87/89, emulated by the compiler on sm_90 --
exact there too, so an H100/H200 checks it) and compare accumulators bit for bit.  They skip
without a GPU; the CPU-side argument checks at the bottom run everywhere.
"""

import numpy as np
import pytest

import qformat
from runtime.torchtools import gemm_ext

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()

SHAPES = [(1, 37, 45), (3, 130, 67), (16, 96, 391), (17, 64, 64), (20, 13, 200), (64, 128, 128),
          (197, 1152, 384), (197, 384, 1536), (130, 129, 64), (70, 200, 1536)]
GRIDS = {"A4": (-8, 7), "A3": (-4, 3), "A2": (-2, 1)}


def _skip_without_int4():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("mma.sync m16n8k64 s4 needs sm_80+")


def _problem(m, n, k, bits, grid, seed):
    rng = np.random.default_rng(seed)
    lo, hi = qformat.qrange(bits)
    q = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
    s = np.float32(0.25)
    x = (rng.normal(size=(m, k)) * 1.5).astype(np.float32)
    x[:, ::5] = (np.round(x[:, ::5] / s) + 0.5) * s  # ties: round half to even
    return q, qformat.pack(q, bits), float(s), x


def _reference(x, q, s, lo, hi):
    xq = np.clip(qformat.round_half_even(x / np.float32(s)), lo, hi).astype(np.int64)
    return xq @ q.astype(np.int64).T


@pytest.mark.cuda
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int4_accumulators_bit_exact(grid, bits, m, n, k):
    _skip_without_int4()
    lo, hi = GRIDS[grid]
    q, packed, s, x = _problem(m, n, k, bits, grid, seed=m + n + k + bits)
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), packed, bits, s, lo, hi, kernel="mma_int4")
    assert acc.dtype == torch.int32 and tuple(acc.shape) == (m, n)
    np.testing.assert_array_equal(acc.cpu().numpy(), _reference(x, q, s, lo, hi))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
def test_int4_many_rows_and_worst_case(bits):
    """M = 6304 (DeiT-S batch 32) and |acc| at its bound: x = -8 everywhere times q = qmin over K = 16384."""
    _skip_without_int4()
    q, packed, s, x = _problem(6304, 96, 384, bits, "A4", seed=bits)
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), packed, bits, s, -8, 7, kernel="mma_int4")
    np.testing.assert_array_equal(acc.cpu().numpy(), _reference(x, q, s, -8, 7))
    lo, hi = qformat.qrange(bits)
    qw = np.full((8, 16384), lo, np.int8)
    qw[1::2, ::3] = hi
    xw = np.full((3, 16384), -8 * s, np.float32)
    xw[1, ::5] = 7 * s
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(xw).cuda(), qformat.pack(qw, bits), bits, s, -8, 7,
                                     kernel="mma_int4")
    np.testing.assert_array_equal(acc.cpu().numpy(), _reference(xw, qw, s, -8, 7))


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_int4_float_output_and_paths_agree(out_dtype):
    """The y of mma_int4 equals mma_sync's on the same problem (same epilogue); auto keeps mma_sync until INT4
    is measured (QVIT_AUTO_INT4=0)."""
    _skip_without_int4()
    q, packed, s, x = _problem(197, 384, 384, 4, "A4", seed=7)
    rng = np.random.default_rng(1)
    ws = rng.uniform(0.005, 0.05, 384).astype(np.float32)
    bias = rng.normal(size=384).astype(np.float32)
    dt = getattr(torch, out_dtype)
    xt = torch.from_numpy(x).cuda().to(dt)
    ys = [gemm_ext.lowbit_linear(xt, packed, ws, bias, 4, s, -8, 7, kernel=kn) for kn in ("mma_int4", "mma_sync")]
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)
    cc = torch.cuda.get_device_capability()
    assert cc >= (8, 0)
    assert gemm_ext.select_kernel(197, 384, 384, 4, torch.float16, act_lo=-8, act_hi=7) == "mma_sync"
    y_auto = gemm_ext.lowbit_linear(xt, packed, ws, bias, 4, s, -8, 7)
    torch.testing.assert_close(y_auto, ys[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- CPU: argument checks

@pytest.mark.parametrize("kwargs", [{"kernel": "mma_int4"}, {"path": "a4"}])
def test_int4_needs_a_4bit_grid(kwargs):
    q, packed, s, x = _problem(4, 8, 64, 4, "A4", seed=0)
    with pytest.raises(gemm_ext.LowBitArgumentError, match="act_hi <= 7"):
        gemm_ext.lowbit_linear_acc(torch.from_numpy(x), packed, 4, s, -128, 127, **kwargs)


def test_int4_kernel_needs_its_weight_layout():
    seg = gemm_ext.Segment(4, "expand-order words", None, 8)
    assert seg.words_for(gemm_ext.KERNELS["mma_sync"]) == "expand-order words"
    with pytest.raises(gemm_ext.LowBitArgumentError, match="int4=True"):
        seg.words_for(gemm_ext.KERNELS["mma_int4"])


def test_prepare_numpy_int4_layout_matches_the_emulator():
    from runtime.torchtools import int4_emu

    q, packed, _, _ = _problem(3, 70, 200, 3, "A4", seed=2)
    host = gemm_ext.prepare_numpy(packed, np.ones(70, np.float32), None, 3, 200, int4=True)
    np.testing.assert_array_equal(host["nib"][0], int4_emu.repack_nib(packed, 3, 200))
    assert gemm_ext.prepare_numpy(packed, np.ones(70, np.float32), None, 3, 200)["nib"] is None
