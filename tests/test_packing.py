"""Packed 2/3/4-bit weights: qformat.pack/unpack round-trip and the QvitLowBitLinear node in ORT.

The ORT side runs the node through its model-local function (export.functions), i.e.
exactly what a ``lowbit`` graph ships, against qformat.lowbit_linear_reference.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qformat
from export.functions import lowbit_function, lowbit_node

bits_st = st.sampled_from(qformat.PACKED_BITS)


@st.composite
def matrices(draw):
    bits = draw(bits_st)
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 70))  # crosses 8/10/16-per-word boundaries, incl. non-multiples
    seed = draw(st.integers(0, 2**31 - 1))
    qmin, qmax = qformat.qrange(bits)
    q = np.random.default_rng(seed).integers(qmin, qmax + 1, size=(n, k)).astype(np.int8)
    return bits, q


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_pack_unpack_roundtrip(case):
    bits, q = case
    packed = qformat.pack(q, bits)
    assert packed.dtype == np.uint32
    assert packed.shape == (q.shape[0], qformat.packed_words(q.shape[1], bits))
    np.testing.assert_array_equal(qformat.unpack(packed, bits, q.shape[1]), q)
    # padding past K holds the code of q = 0
    per = qformat.values_per_word(bits)
    pad = packed.shape[1] * per - q.shape[1]
    if pad:
        full = qformat.unpack(packed, bits, packed.shape[1] * per)
        assert np.all(full[:, q.shape[1]:] == 0)


def _session(node, k, n, opset):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                            helper.make_opsetid(qformat.LOWBIT_DOMAIN, qformat.LOWBIT_OPSET)],
                          functions=[lowbit_function(opset)])
    m.ir_version = 8 if opset < 21 else 10
    onnx.checker.check_model(m, full_check=True)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@st.composite
def mixed_matrices(draw):
    """[N, K] codes whose row groups have their own widths (format version 2)."""
    gs = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    n = gs * (groups - 1) + draw(st.integers(1, gs))  # the last group may be shorter
    k = draw(st.integers(1, 70))
    widths = draw(st.lists(bits_st, min_size=groups, max_size=groups))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    rows = [rng.integers(*(lambda r: (r[0], r[1] + 1))(qformat.qrange(widths[i // gs])), size=k) for i in range(n)]
    return widths, gs, np.array(rows, dtype=np.int8)


@settings(max_examples=100, deadline=None)
@given(mixed_matrices())
def test_pack_rows_roundtrip_and_layout(case):
    widths, gs, q = case
    n, k = q.shape
    rb = qformat.row_bits(widths, gs, n)
    words = qformat.pack_rows(q, rb)
    assert words.ndim == 1 and words.size == sum(qformat.packed_words(k, int(b)) for b in rb)
    np.testing.assert_array_equal(qformat.unpack_rows(words, rb, k), q)
    off = 0  # row n is the version-1 row at its own width, rows back to back
    for r in range(n):
        w = qformat.packed_words(k, int(rb[r]))
        np.testing.assert_array_equal(words[off:off + w], qformat.pack(q[r:r + 1], int(rb[r]))[0])
        off += w


def _site(q, widths, gs, rng, act_bits, zp):
    n = q.shape[0]
    zlo, zhi = qformat.zero_point_range(act_bits)
    ws = (rng.random(n) * 0.1 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    s = float(np.float32(rng.random() * 0.2 + 0.01))
    return qformat.spec.linear_site("lin", q, ws, bias, widths, s, act_bits, int(np.clip(zp, zlo, zhi)), gs)


@settings(max_examples=25, deadline=None)
@given(matrices(), st.sampled_from([13, 17, 21]), st.integers(2, 8), st.integers(-3, 3), st.integers(0, 2**31 - 1))
def test_lowbit_node_matches_reference(case, opset, act_bits, zp, seed):
    bits, q = case
    rng = np.random.default_rng(seed)
    attrs = qformat.lowbit_attrs(_site(q, bits, None, rng, act_bits, zp))
    x = (rng.standard_normal((2, 3, q.shape[1])) * 2).astype(np.float32)
    y = _session(lowbit_node("lin", "x", "y", attrs), q.shape[1], q.shape[0], opset).run(None, {"x": x})[0]
    ref = qformat.lowbit_reference(x, attrs)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max() + 1))


@settings(max_examples=25, deadline=None)
@given(mixed_matrices(), st.sampled_from([13, 17, 21]), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_mixed_width_node_matches_reference(case, opset, act_bits, seed):
    """The one function body runs version-2 nodes too, and both equal the dequantized matmul."""
    widths, gs, q = case
    rng = np.random.default_rng(seed)
    site = _site(q, widths, gs, rng, act_bits, 0)
    attrs = qformat.lowbit_attrs(site)
    x = (rng.standard_normal((2, 3, q.shape[1])) * 2).astype(np.float32)
    y = _session(lowbit_node("lin", "x", "y", attrs), q.shape[1], q.shape[0], opset).run(None, {"x": x})[0]
    ref = qformat.lowbit_reference(x, attrs)
    s = np.float32(site.input.scale)
    lo, hi = site.input.bounds()
    dense = np.clip(np.rint(x / s), lo, hi) * s @ site.dequantized_weight().T.astype(np.float64) + site.bias
    np.testing.assert_allclose(ref, dense, rtol=1e-5, atol=1e-5 * float(np.abs(dense).max() + 1))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max() + 1))


def test_lowbit_node_attributes_follow_the_contract():
    rng = np.random.default_rng(0)
    uniform = qformat.lowbit_attrs(_site(np.zeros((4, 20), np.int8), 3, None, rng, 3, 0))
    node = lowbit_node("lin", "x", "y", uniform)
    assert (node.op_type, node.domain) == (qformat.LOWBIT_OP, qformat.LOWBIT_DOMAIN)
    assert tuple(a.name for a in node.attribute) == qformat.LOWBIT_ATTRS[:12]  # version 1, unchanged
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == qformat.LOWBIT_PLUGIN_VERSION.encode()
    assert attrs["plugin_namespace"] == qformat.LOWBIT_PLUGIN_NAMESPACE.encode()
    assert attrs["weight_packed"].data_type == TensorProto.INT32
    assert list(attrs["weight_packed"].dims) == [4, qformat.packed_words(20, 3)]
    mixed = qformat.lowbit_attrs(_site(np.zeros((5, 20), np.int8), [2, 4, 3], 2, rng, 4, 0))
    node = lowbit_node("lin", "x", "y", mixed)
    assert tuple(a.name for a in node.attribute) == qformat.LOWBIT_ATTRS
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["group_size"] == 2
    assert attrs["group_bits"].data_type == TensorProto.INT32
    assert numpy_helper.to_array(attrs["group_bits"]).tolist() == [2, 4, 3]
    assert list(attrs["weight_packed"].dims) == [2 * 2 + 2 * 3 + 1 * 2]  # K=20 at 16, 8 and 10 values a word


def test_all_equal_groups_are_a_version_1_node():
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 2, size=(6, 9)).astype(np.int8)
    a = qformat.lowbit_attrs(_site(q, [2, 2, 2], 2, rng, 4, 0))
    b = qformat.lowbit_attrs(_site(q, 2, None, rng, 4, 0))
    assert "group_bits" not in a and a["weight_packed"].shape == b["weight_packed"].shape == (6, 1)
    np.testing.assert_array_equal(a["weight_packed"], b["weight_packed"])


def test_codes_outside_a_groups_width_are_refused():
    q = np.zeros((4, 8), np.int8)
    q[0, 0] = 3  # row 0 is in the 2-bit group: [-2, 1]
    with pytest.raises(qformat.FormatError, match="outside their groups"):
        qformat.spec.linear_site("lin", q, np.ones(4), None, [2, 4], 0.1, 4, 0, 2)


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_unpackable_bits_refused(bits):
    with pytest.raises(qformat.FormatError):
        qformat.pack(np.zeros((1, 4), np.int8), bits)
