"""The fused quantization producer (LayerNorm + the next node's quantizer in one kernel).

Why: a separate quantize kernel per Linear is part of what made the low-bit path slower than FP16;
the producer emits the int8 codes and row sums itself.  The numpy reference is checked against
torch's LayerNorm on the CPU; the kernel runs against it on a GPU (codes may differ by one only
where the fp32 value sits on a rounding boundary), and its codes fed to the low-bit Linear as an int8
x give exactly the accumulators of the reference codes.
"""

import numpy as np
import pytest

import qformat
from runtime.torchtools import gemm_ext

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()


def _ln_problem(m, k, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(m, k)) * 2.0 + 0.5).astype(np.float32)
    return x, rng.uniform(0.5, 1.5, k).astype(np.float32), rng.normal(size=k).astype(np.float32) * 0.1


def test_reference_is_torch_layernorm_then_the_quantizer():
    x, g, b = _ln_problem(7, 384, 0)
    codes, sums = gemm_ext.layernorm_quantize_reference(x, g, b, 1e-6, 0.05, -128, 127)
    y = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (384,), torch.from_numpy(g).double(),
                                       torch.from_numpy(b).double(), 1e-6).numpy()
    want = np.clip(qformat.round_half_even((y / 0.05).astype(np.float32)), -128, 127)
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(sums, want.sum(axis=1))
    assert codes.dtype == np.int8 and np.abs(codes).max() > 20  # the grid is used, not all zero


def test_producer_arguments_checked_on_cpu():
    with pytest.raises(gemm_ext.LowBitArgumentError, match="multiple of 4"):
        gemm_ext.layernorm_quantize(torch.zeros(2, 6), np.ones(6), np.zeros(6), 1e-6, 0.05, -128, 127)
    with pytest.raises(gemm_ext.LowBitArgumentError):
        gemm_ext.layernorm_quantize(torch.zeros(2, 8), np.ones(8), np.zeros(8), 1e-6, 0.05, 5, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("m,k,grid", [(197, 384, (-128, 127)), (3, 1536, (-8, 7)), (6304, 384, (-2, 1))])
def test_fused_layernorm_quantize_matches_reference(dtype, m, k, grid):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    x, g, b = _ln_problem(m, k, m + k)
    xt = torch.from_numpy(x).cuda().to(getattr(torch, dtype))
    x_used = xt.float().cpu().numpy()  # fp16 input: the reference sees the same rounded values
    scale = 0.05 if grid[1] == 127 else 0.5
    codes, sums = gemm_ext.layernorm_quantize(xt, g, b, 1e-6, scale, *grid)
    ref, ref_sums = gemm_ext.layernorm_quantize_reference(x_used, g, b, 1e-6, scale, *grid)
    got = codes.cpu().numpy().astype(np.int64)
    diff = np.abs(got - ref)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    np.testing.assert_array_equal(sums.cpu().numpy(), got.sum(axis=1))
    # the codes are an int8 x for the low-bit Linear: exact accumulators of exactly these codes
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, size=(64, k)).astype(np.int8)
    acc = gemm_ext.lowbit_linear_acc(codes, qformat.pack(q, 4), 4, scale, *grid)
    np.testing.assert_array_equal(acc.cpu().numpy(), got @ q.astype(np.int64).T)
