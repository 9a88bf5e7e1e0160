"""The low-bit GEMM kernels against the qformat reference; CPU-side pieces of gemm_ext / bench_gemm.

Why: integer results must be bit-exact (int32 accumulators compared exactly) and float outputs
must match ``qformat.lowbit_linear_reference``; GPU tests are marked ``cuda`` and skip cleanly,
everything numpy-side (repack, argument checks, the no-GPU error paths) runs here too.
"""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

import qformat
from qformat.errors import UserError
from runtime.torchtools import bench_gemm, gemm_ext

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()


def _problem(m, n, k, bits, seed=0, act_lo=-128, act_hi=127):
    """Random packed weights, scales, bias and activations that exercise clipping and ties."""
    rng = np.random.default_rng(seed)
    lo, hi = qformat.qrange(bits)
    q = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
    packed = qformat.pack(q, bits)
    ws = rng.uniform(0.005, 0.05, size=n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    act_scale = np.float32(0.05)
    x = (rng.normal(size=(m, k)) * 3.0).astype(np.float32)
    x[:, ::7] = (np.round(x[:, ::7] / act_scale) + 0.5) * act_scale  # near half-way points
    return q, packed, ws, bias, float(act_scale), act_lo, act_hi, x


def _acc_reference(x, q, act_scale, act_lo, act_hi):
    """Exact int64 accumulators of the node: clip(rint(x / s), lo, hi) @ q.T."""
    xq = np.clip(qformat.round_half_even(x / np.float32(act_scale)), act_lo, act_hi).astype(np.int64)
    return xq @ q.astype(np.int64).T


# ----------------------------------------------------------------------------- CPU: repack

def _decode_repacked(rep, bits):
    """Signed values of every element of repacked rows, read through the expand-order slots."""
    per = qformat.values_per_word(bits)
    codes = np.zeros(rep.shape + (per,), dtype=np.int64)
    for j, positions in enumerate(gemm_ext.slot_bits(bits)):
        for i, pos in enumerate(positions):
            codes[..., j] |= ((rep.astype(np.int64) >> pos) & 1) << i
    return codes.reshape(rep.shape[0], -1) + qformat.qrange(bits)[0]


@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("n,k", [(1, 1), (5, 17), (37, 45), (64, 390), (130, 391)])
def test_repack_keeps_every_code(bits, n, k):
    q, packed, *_ = _problem(2, n, k, bits, seed=n + k)
    rep = gemm_ext.repack(packed, bits, k)
    assert rep.dtype == np.uint32
    assert rep.shape == (gemm_ext.repacked_rows(n), gemm_ext.repacked_words(k, bits))
    assert rep.shape[0] % 64 == 0 and rep.shape[1] % gemm_ext.REPACK_WORD_ALIGN[bits] == 0
    assert (rep.shape[1] * 4) % 16 == 0  # 16-byte rows
    per = qformat.values_per_word(bits)
    assert rep.shape[1] * per >= -(-k // 64) * 64  # a row covers round_up(K, 64) values
    full = _decode_repacked(rep, bits)
    np.testing.assert_array_equal(full[:n, :k], q)
    assert not full[:n, k:].any() and not full[n:].any()  # all padding decodes to q = 0


def test_zero_word_is_code_of_zero():
    for b in qformat.PACKED_BITS:
        per = qformat.values_per_word(b)
        assert gemm_ext.zero_word(b) == int(qformat.pack(np.zeros((1, per), np.int8), b)[0, 0])
    assert gemm_ext.zero_word(2) == 0xAAAAAAAA and gemm_ext.zero_word(4) == 0x88888888


def test_repack_accepts_int32_bitcast_and_tensors():
    _, packed, *_ = _problem(1, 3, 20, 4)
    a = gemm_ext.repack(packed.view(np.int32), 4, 20)
    b = gemm_ext.repack(torch.from_numpy(packed.view(np.int32)), 4, 20)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- CPU: validation

@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, "packed weights exist"),
    ({"bits": 8}, "packed weights exist"),
    ({"bits": True}, "integer"),
    ({"act_scale": 0.0}, "act_scale"),
    ({"act_scale": float("nan")}, "act_scale"),
    ({"act_lo": -129}, "INT8"),
    ({"act_lo": 3, "act_hi": 2}, "INT8"),
    ({"act_lo": 0.5}, "integers"),
    ({"path": "fast"}, "path"),
    ({"kernel": "a4_magic"}, "kernel"),
    ({"weight_scale": np.ones(3, np.float32)}, "weight_scale"),
    ({"bias": np.ones(2, np.float32)}, "bias"),
    ({"weight_scale": None}, "weight_scale"),
])
def test_lowbit_linear_validates_on_cpu(kwargs, match):
    """Bad arguments fail with a one-line LowBitArgumentError before any CUDA work."""
    _, packed, ws, bias, s, lo, hi, x = _problem(2, 5, 24, 4)
    args = {"packed": packed, "weight_scale": ws, "bias": bias, "bits": 4, "act_scale": s, "act_lo": lo,
            "act_hi": hi, "path": "auto", "kernel": None}
    args.update(kwargs)
    with pytest.raises(gemm_ext.LowBitArgumentError, match=match):
        gemm_ext.lowbit_linear(torch.from_numpy(x), **args)


def test_packed_shape_must_match_k():
    _, packed, ws, bias, s, lo, hi, _ = _problem(2, 5, 24, 4)
    with pytest.raises(gemm_ext.LowBitArgumentError, match="words per row"):
        gemm_ext.lowbit_linear(torch.zeros(2, 40), packed, ws, bias, 4, s, lo, hi)
    with pytest.raises(gemm_ext.LowBitArgumentError, match="int32/uint32"):
        gemm_ext.repack(packed.astype(np.int64), 4, 24)


def test_errors_are_user_errors():
    assert issubclass(gemm_ext.LowBitArgumentError, UserError)
    assert issubclass(gemm_ext.LowBitArgumentError, ValueError)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_no_gpu_is_a_clear_error():
    _, packed, ws, bias, s, lo, hi, x = _problem(2, 5, 24, 3)
    with pytest.raises(UserError, match="CUDA GPU"):
        gemm_ext.lowbit_linear(torch.from_numpy(x), packed, ws, bias, 3, s, lo, hi)
    with pytest.raises(UserError, match="CUDA GPU"):
        gemm_ext.prepare(packed, ws, bias, 3, 24)
    with pytest.raises(UserError, match="CUDA GPU"):
        gemm_ext.load_extension()


def test_cuda_home_follows_nvcc_through_a_wrapper(tmp_path, monkeypatch):
    """nvcc found via a wrapper script outside the toolkit must not make the build guess its parent."""
    wrapper_bin = tmp_path / "wrap" / "bin"
    wrapper_bin.mkdir(parents=True)
    (wrapper_bin / "nvcc").write_text("#!/bin/sh\n")
    (wrapper_bin / "nvcc").chmod(0o755)
    toolkit = tmp_path / "cuda-13.9"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    monkeypatch.setenv("PATH", str(wrapper_bin))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = gemm_ext.find_cuda_home()
    assert home != str(tmp_path / "wrap")  # the wrapper's parent has no cuda_runtime_api.h
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert gemm_ext.find_cuda_home() == str(toolkit)


def test_module_builds_on_cpu_and_holds_repacked_buffers():
    q, packed, ws, bias, s, lo, hi, x = _problem(2, 70, 33, 2)
    mod = gemm_ext.LowBitLinearCUDA(packed, ws, bias, 2, 33, s, lo, hi, path="a16")
    assert mod.weight_repacked.dtype == torch.int32
    assert tuple(mod.weight_repacked.shape) == (128, gemm_ext.repacked_words(33, 2)) and mod.bits == 2
    np.testing.assert_array_equal(mod.weight_repacked.numpy().view(np.uint32),
                                  gemm_ext.repack(packed, 2, 33))
    assert "bits=2" in repr(mod)
    if not HAS_CUDA:
        with pytest.raises(UserError, match="CUDA GPU"):
            mod(torch.from_numpy(x))


def test_module_from_linear_quantizes_per_channel():
    lin = torch.nn.Linear(20, 6)
    mod = gemm_ext.LowBitLinearCUDA.from_linear(lin, 4, act_scale=0.1)
    w = lin.weight.detach().numpy()
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 7
    q = qformat.quantize_weight(w, scale, 4)
    rep = mod.weight_repacked.numpy().view(np.uint32)
    np.testing.assert_array_equal(_decode_repacked(rep, 4)[:6, :20], q)
    np.testing.assert_allclose(mod.weight_scale.numpy(), scale.astype(np.float32))


def test_swap_linears_plain_model_needs_act_scale():
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 4)))
    with pytest.raises(UserError, match="act_scale"):
        gemm_ext.swap_linears(net)
    out = gemm_ext.swap_linears(net, bits=2, act_scale=0.1)
    assert out is net
    assert isinstance(net[0], gemm_ext.LowBitLinearCUDA) and net[1][1].bits == 2


def test_swap_linears_converted_model_uses_the_exporters_attributes(converted):
    """A converted QAT model: 3-bit block Linears become kernels built from the spec records' attributes,
    the ones the exporter writes (qformat.lowbit_attrs); the 8-bit head and mixed-width layers stay
    QuantLinears (the kernels take one width for now)."""
    from train.quant import QuantLinear

    dep = converted("vit_fmnist", 3, overrides={"blocks.1.attn.qkv": {"w_bits": [2, 3, 3]}})
    model = copy.deepcopy(dep.model)
    site = next(s for s in dep.specs if s.name == "blocks.0.attn.qkv")
    attrs = qformat.lowbit_attrs(site)
    gemm_ext.swap_linears(model, specs=dep.specs)
    new = model.blocks[0].attn.qkv
    assert isinstance(new, gemm_ext.LowBitLinearCUDA) and new.bits == 3
    assert (new.act_scale, new.act_lo, new.act_hi) == (attrs["act_scale"], attrs["act_lo"], attrs["act_hi"])
    np.testing.assert_array_equal(new.weight_scale.numpy(), attrs["weight_scale"])
    k = attrs["in_features"]
    rep = new.weight_repacked.numpy().view(np.uint32)
    np.testing.assert_array_equal(_decode_repacked(rep, 3)[: attrs["out_features"], :k],
                                  qformat.unpack(attrs["weight_packed"].view(np.uint32), 3, k))
    assert isinstance(model.head, QuantLinear)
    assert isinstance(model.blocks[1].attn.qkv, QuantLinear)  # mixed widths: not swapped
    swapped = sum(isinstance(m, gemm_ext.LowBitLinearCUDA) for m in model.modules())
    assert swapped == sum(s.op == "linear" and s.weight.max_bits == 3 and not s.weight.mixed for s in dep.specs)


# ----------------------------------------------------------------------------- CPU: bench_gemm

def test_bench_without_gpu_exits_2_with_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "runtime.torchtools.bench_gemm", "--repeats", "1"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert lines == [lines[-1]] and lines[-1].startswith("error: bench_gemm needs a CUDA GPU")
    assert "Traceback" not in p.stderr


def test_bench_argument_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        bench_gemm.main(["--bits", "5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench_gemm.main(["--models", "vit_huge", "--iters", "1"])
    assert e.value.code == 2


def test_bench_shapes_and_bytes():
    shapes = bench_gemm.layer_shapes(["deit_s", "deit_b"])
    assert ("deit_s", "qkv", 384, 1152) in shapes and ("deit_b", "fc2", 3072, 768) in shapes
    assert len(shapes) == 8
    assert bench_gemm.lowbit_bytes(1, 8, 16, 4) == 1 * 16 * 2 + 8 * 2 * 4 + 8 * 8 + 8 * 2
    assert bench_gemm.M_VALUES == (1, 2, 4, 8, 16, 197, 1576, 6304)
    assert bench_gemm._copies(1 << 20, 50 << 20) == 64 and bench_gemm._copies(1 << 30, 50 << 20) == 1
    assert bench_gemm._copies(30 << 20, 50 << 20) == 4  # 4 x 30 MB > 2 x L2


def test_bench_targets_and_table():
    def row(backend, m, ms, model="deit_s", gbps_bytes=1000):
        return bench_gemm._row(model, "fc1", m, 1536, 384, backend, 4, "k", ms, ms and 2 * ms, gbps_bytes)

    rows = [row("cublas_fp16", 1, 0.030), row("lowbit_w4a16", 1, 0.009), row("lowbit_w2a16", 1, 0.008),
            row("lowbit_w3a16", 1, 0.010), row("cublas_int8", 6304, 0.10), row("lowbit_w4a8", 6304, 0.12),
            row("cublas_int8", 16, None), row("lowbit_w4a16", 1, 0.01, model="large", gbps_bytes=2e7)]
    res = {t["target"]: t for t in bench_gemm.check_targets(rows, copy_gbps=4000.0)}
    assert res["deit_s/fc1 M=1: W4A16 >= 3x FP16"]["ok"] is True
    assert res["deit_s/fc1 M=1: W2 faster than W4"]["ok"] is True
    assert res["deit_s/fc1 M=1: W3 faster than W4"]["ok"] is False
    assert res["deit_s/fc1 M=6304: W4A8 >= 0.8x INT8"]["ok"] is True
    bw = res["large/fc1 M=1: W4 GEMV bandwidth share of copy"]
    assert bw["ok"] is False and bw["detail"].startswith("50%")  # 2e7 B / 10 us = 2000 GB/s of 4000
    table = bench_gemm.format_table(rows)
    assert "n/a" in table and "lowbit_w4a8" in table
    md = bench_gemm.format_markdown(rows, list(res.values()), "GPU")
    assert "| deit_s/fc1 | 1 | 1536x384 | 30.0 | n/a |" in md and "(3.33x)" in md and "MISS" in md


def test_bench_model_e2e_hook_is_a_clean_error():
    with pytest.raises(SystemExit) as e:
        bench_gemm.main(["--model-e2e", "deit_s"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- GPU: kernels

# (m, n, k): GEMV row groups 1/2/4/8/16 (m = 2, 5, 8 run the MT = 2/8 instantiations), K tails
# (1, 7, 10, 16, 64, 65: inside one word, one 3-bit word, 16-byte vectors, tiles), N = 1, odd tiles.
SHAPES = [(1, 37, 45), (2, 1, 7), (3, 130, 67), (5, 33, 10), (8, 64, 16), (16, 96, 391), (17, 64, 64),
          (1, 5, 1), (4, 70, 65), (197, 71, 389), (70, 200, 1536), (130, 129, 64)]
ALL_KERNELS = ["a16_gemv", "a16_tiled", "a8_int", "a8_dp4a", "a8_mma", "gemv_dp4a", "mma_sync"]
KERNEL_MIN_CC = {"a8_dp4a": (6, 1), "gemv_dp4a": (6, 1), "a8_mma": (7, 2), "mma_sync": (8, 0)}


def _skip_unless_available(kernel):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < KERNEL_MIN_CC.get(kernel, (5, 0)):
        pytest.skip("{} not available on this GPU".format(kernel))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_accumulators_bit_exact(kernel, bits, m, n, k):
    _skip_unless_available(kernel)
    q, packed, _, _, s, _, _, x = _problem(m, n, k, bits, seed=m + n + k + bits, act_lo=-100, act_hi=120)
    xt = torch.from_numpy(x).cuda()
    acc = gemm_ext.lowbit_linear_acc(xt, packed, bits, s, -100, 120, kernel=kernel)
    assert acc.dtype == torch.int32 and tuple(acc.shape) == (m, n)
    np.testing.assert_array_equal(acc.cpu().numpy(), _acc_reference(x, q, s, -100, 120))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["gemv_dp4a", "mma_sync", "a8_mma", "a16_tiled"])
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
def test_many_rows_bit_exact(kernel, bits):
    """M = 6304 (DeiT-S batch 32): every grid-stride / multi-tile path, incl. the quantize kernels."""
    _skip_unless_available(kernel)
    q, packed, _, _, s, lo, hi, x = _problem(6304, 96, 384, bits, seed=bits)
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), packed, bits, s, lo, hi, kernel=kernel)
    np.testing.assert_array_equal(acc.cpu().numpy(), _acc_reference(x, q, s, lo, hi))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_large_layer_multi_pass_bit_exact(bits, m):
    """N = 4096, K = 2048: more row groups than two blocks per SM, so each block serves several."""
    _skip_unless_available("gemv_dp4a")
    q, packed, _, _, s, lo, hi, x = _problem(m, 4096, 2048, bits, seed=bits + m)
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), packed, bits, s, lo, hi, kernel="gemv_dp4a")
    np.testing.assert_array_equal(acc.cpu().numpy(), _acc_reference(x, q, s, lo, hi))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
def test_worst_case_magnitude_is_exact(kernel, bits):
    """x at the clip bound (-128) times q = qmin over K = 16384: |acc| = 2^(b-1) * 128 * 16384 (2^24 at
    4 bits, where an fp32 accumulator would start to round) must come out exactly, also with sign flips."""
    _skip_unless_available(kernel)
    m, n, k, s = 3, 8, 16384, 0.05
    lo, hi = qformat.qrange(bits)
    q = np.full((n, k), lo, dtype=np.int8)
    q[1::2, ::3] = hi
    x = np.full((m, k), -128 * s, dtype=np.float32)
    x[1, ::5] = 127 * s
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), qformat.pack(q, bits), bits, s, -128, 127,
                                     kernel=kernel)
    ref = _acc_reference(x, q, s, -128, 127)
    assert np.abs(ref).max() >= (1 << (bits - 1)) * 128 * k * 0.6
    np.testing.assert_array_equal(acc.cpu().numpy(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("m,n,k", SHAPES[::3])
def test_float_output_matches_reference(kernel, bits, m, n, k):
    _skip_unless_available(kernel)
    _, packed, ws, bias, s, lo, hi, x = _problem(m, n, k, bits, seed=3 * m + k)
    ref = qformat.lowbit_linear_reference(x, packed, ws, bias, bits, s, lo, hi)
    xt = torch.from_numpy(x).cuda()
    y = gemm_ext.lowbit_linear(xt, packed, ws, bias, bits, s, lo, hi, kernel=kernel)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    y16 = gemm_ext.lowbit_linear(xt.half(), packed, ws, bias, bits, s, lo, hi, kernel=kernel)
    ref16 = qformat.lowbit_linear_reference(xt.half().float().cpu().numpy(), packed, ws, bias, bits, s, lo, hi)
    assert y16.dtype == torch.float16
    np.testing.assert_allclose(y16.float().cpu().numpy(), ref16, rtol=2e-3, atol=2e-3 * float(np.abs(ref16).max()))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["gemv_dp4a", "mma_sync", "a8_mma", "a16_gemv"])
@pytest.mark.parametrize("m", [1, 5, 16, 300])
def test_int8_input_with_fp16_output(kernel, m):
    """int8 activation codes (already on the grid: only clipped) into the GEMV and MMA paths, fp16 out."""
    _skip_unless_available(kernel)
    q, packed, ws, bias, s, lo, hi, x = _problem(m, 48, 100, 3, seed=7 + m, act_lo=-90, act_hi=110)
    xq = np.clip(np.rint(x / np.float32(s)), -128, 127).astype(np.int8)  # some codes outside [lo, hi]
    ref = qformat.lowbit_linear_reference(xq.astype(np.float32) * np.float32(s), packed, ws, bias, 3, s, lo, hi)
    y = gemm_ext.lowbit_linear(torch.from_numpy(xq).cuda(), packed, ws, bias, 3, s, lo, hi, kernel=kernel,
                               out_dtype=torch.float16)
    assert y.dtype == torch.float16
    np.testing.assert_allclose(y.float().cpu().numpy(), ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["auto", "a8", "a16"])
def test_int8_input_and_paths_agree(path):
    q, packed, ws, bias, s, lo, hi, x = _problem(40, 48, 100, 3, seed=7)
    xq = np.clip(np.rint(x / np.float32(s)), lo, hi).astype(np.int8)
    ref = qformat.lowbit_linear_reference(x, packed, ws, bias, 3, s, lo, hi)
    y = gemm_ext.lowbit_linear(torch.from_numpy(xq).cuda(), packed, ws, bias, 3, s, lo, hi, path=path)
    np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def _mixed_problem(m, n, k, group, seed):
    """Rows in groups of ``group`` at random widths: qformat v2 flat words + the reference accumulators."""
    rng = np.random.default_rng(seed)
    gbits = rng.choice(qformat.PACKED_BITS, size=-(-n // group))
    row_bits = np.repeat(gbits, group)[:n]
    q = np.zeros((n, k), np.int8)
    words = []
    for r in range(n):
        lo, hi = qformat.qrange(int(row_bits[r]))
        q[r] = rng.integers(lo, hi + 1, size=k)
        words.append(qformat.pack(q[r:r + 1], int(row_bits[r]))[0])
    x = (rng.normal(size=(m, k)) * 3.0).astype(np.float32)
    return np.concatenate(words), row_bits, q, x


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [None, "gemv_dp4a", "mma_sync", "a16_gemv", "a16_tiled", "a8_mma"])
@pytest.mark.parametrize("m", [1, 7, 200])
def test_mixed_width_rows_bit_exact(kernel, m):
    """Row groups at 2/3/4 bits (one launch per width, output columns through col_map) equal the reference."""
    if kernel is not None:
        _skip_unless_available(kernel)
    elif not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    flat, row_bits, q, x = _mixed_problem(m, 96, 200, 16, seed=m)
    acc = gemm_ext.lowbit_linear_acc(torch.from_numpy(x).cuda(), flat, None, 0.05, -128, 127, kernel=kernel,
                                     row_bits=row_bits)
    np.testing.assert_array_equal(acc.cpu().numpy(), _acc_reference(x, q, 0.05, -128, 127))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_every_output_written_and_empty_batch(kernel):
    """A poisoned output is fully overwritten; M = 0 (null data pointers) is a no-op, not an error."""
    _skip_unless_available(kernel)
    ext = gemm_ext.load_extension()
    q, packed, _, _, s, lo, hi, x = _problem(19, 70, 130, 4, seed=5)
    prep = gemm_ext.prepare(packed, np.ones(70, np.float32), None, 4, 130)
    y = torch.full((19, 70), -777777, dtype=torch.int32, device="cuda")
    seg = prep.segments[0]
    kid = gemm_ext.KERNELS[kernel]
    ext.gemm_into(y, torch.from_numpy(x).cuda(), seg.w, prep.weight_scale, prep.bias, None, 4, 70, s, lo, hi, kid,
                  None)
    np.testing.assert_array_equal(y.cpu().numpy(), _acc_reference(x, q, s, lo, hi))
    empty = ext.gemm(torch.zeros(0, 130, device="cuda"), seg.w, prep.weight_scale, prep.bias, 4, 70, s, lo, hi, kid,
                     gemm_ext.DTYPE_F32)
    assert tuple(empty.shape) == (0, 70)


@pytest.mark.cuda
def test_extension_rejects_mismatched_operands():
    """Wrong device, dtype or layout of an operand: a named error, not a generic 'invalid argument'."""
    ext = gemm_ext.load_extension()
    _, packed, _, _, s, lo, hi, x = _problem(4, 16, 64, 4)
    prep = gemm_ext.prepare(packed, np.ones(16, np.float32), None, 4, 64)
    w = prep.segments[0].w
    xt = torch.from_numpy(x).cuda()
    kid = gemm_ext.KERNELS["gemv_dp4a"]
    with pytest.raises(RuntimeError, match="weight_scale must be on"):
        ext.gemm(xt, w, prep.weight_scale.cpu(), None, 4, 16, s, lo, hi, kid, 0)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or int8"):
        ext.gemm(xt.double(), w, prep.weight_scale, None, 4, 16, s, lo, hi, kid, 0)
    with pytest.raises(RuntimeError, match="w must be repacked"):
        ext.gemm(xt, w[:, :4].contiguous(), prep.weight_scale, None, 4, 16, s, lo, hi, kid, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ext.gemm(xt, w, prep.weight_scale, torch.zeros(32, device="cuda")[::2], 4, 16, s, lo, hi, kid, 0)


@pytest.mark.cuda
def test_module_forward_and_prepare_reuse():
    _, packed, ws, bias, s, lo, hi, x = _problem(2 * 197, 384, 384, 4, seed=11)
    ref = qformat.lowbit_linear_reference(x, packed, ws, bias, 4, s, lo, hi).reshape(2, 197, 384)
    mod = gemm_ext.LowBitLinearCUDA(packed, ws, bias, 4, 384, s, lo, hi).cuda()
    y = mod(torch.from_numpy(x).reshape(2, 197, 384).cuda())
    assert tuple(y.shape) == (2, 197, 384)
    np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    prep = gemm_ext.prepare(packed, ws, bias, 4, 384)
    for m in (1, 5, 16):
        got = gemm_ext.lowbit_linear(torch.from_numpy(x[:m]).cuda(), prep, None, None, 4, s, lo, hi)
        np.testing.assert_allclose(got.cpu().numpy(), ref.reshape(-1, 384)[:m], rtol=1e-5,
                                   atol=1e-5 * float(np.abs(ref).max()))
    empty = gemm_ext.lowbit_linear(torch.zeros(0, 384, device="cuda"), prep, None, None, 4, s, lo, hi)
    assert tuple(empty.shape) == (0, 384)
