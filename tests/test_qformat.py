"""The format contract: ranges, zero-point limits, packing round-trips and the reference op."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qformat


def test_ranges():
    assert qformat.qrange(2) == (-2, 1)
    assert qformat.qrange(3, signed=False) == (0, 7)
    assert qformat.qrange(8) == (-128, 127)
    assert qformat.zero_point_range(8) == (0, 0)
    assert qformat.zero_point_range(4, signed=False) == (0, 0)
    with pytest.raises(qformat.FormatError, match="2..8"):
        qformat.qrange(9)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 7]), z=st.integers(-200, 200))
def test_int_bounds_fit_int8_or_refuse(bits, z):
    zlo, zhi = qformat.zero_point_range(bits)
    if zlo <= z <= zhi:
        lo, hi = qformat.int_bounds(bits, True, z)
        assert -128 <= lo < hi <= 127 and hi - lo == 2**bits - 1
    else:
        with pytest.raises(qformat.FormatError):
            qformat.int_bounds(bits, True, z)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(qformat.PACKED_BITS), n=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 9999))
def test_pack_roundtrip_any_k(bits, n, k, seed):
    rng = np.random.default_rng(seed)
    qmin, qmax = qformat.qrange(bits)
    q = rng.integers(qmin, qmax + 1, size=(n, k)).astype(np.int8)
    packed = qformat.pack(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (n, qformat.packed_words(k, bits))
    assert np.array_equal(qformat.unpack(packed, bits, k), q)


def test_pack_layout_is_the_documented_one():
    # 2-bit: element k at bits 2k..2k+1, offset-binary code q + 2
    q = np.array([[1, -2, 0, -1]], dtype=np.int8)
    w = int(qformat.pack(q, 2)[0, 0])
    codes = [(w >> (2 * i)) & 3 for i in range(16)]
    assert codes[:4] == [3, 0, 2, 1] and set(codes[4:]) == {2}  # padding = code of 0
    # 3-bit: 10 per word, top 2 bits zero
    w3 = int(qformat.pack(np.full((1, 10), 3, np.int8), 3)[0, 0])
    assert w3 >> 30 == 0 and all(((w3 >> (3 * i)) & 7) == 7 for i in range(10))


def test_pack_rejects_out_of_range_and_unpacked_bits():
    with pytest.raises(qformat.FormatError):
        qformat.pack(np.array([[2]]), 2)
    with pytest.raises(qformat.FormatError, match="packed"):
        qformat.pack(np.array([[2]]), 5)


def test_lowbit_reference_matches_dequantized_matmul():
    rng = np.random.default_rng(0)
    n, k, bits = 7, 13, 3
    q = rng.integers(-4, 4, size=(n, k)).astype(np.int8)
    ws = rng.uniform(0.01, 0.1, n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    s, lo, hi = 0.2, -7, 8
    y = qformat.lowbit_linear_reference(x, qformat.pack(q, bits).view(np.int32), ws, b, bits, s, lo, hi)
    xq = np.clip(np.rint(x / np.float32(s)), lo, hi) * s
    ref = xq @ (q * ws[:, None]).T + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 5, n)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from qformat import io

    target = tmp_path / "a.json"
    io.write_json(target, {"x": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError):
        io.write_json(target, {"x": 2})
    assert io.read_json(target) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
