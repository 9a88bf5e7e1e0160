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
from onnx import TensorProto, helper

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


@settings(max_examples=25, deadline=None)
@given(matrices(), st.sampled_from([13, 17, 21]), st.integers(2, 8), st.integers(-3, 3), st.integers(0, 2**31 - 1))
def test_lowbit_node_matches_reference(case, opset, act_bits, zp, seed):
    bits, q = case
    n, k = q.shape
    rng = np.random.default_rng(seed)
    zlo, zhi = qformat.zero_point_range(act_bits)
    lo, hi = qformat.int_bounds(act_bits, True, int(np.clip(zp, zlo, zhi)))
    ws = (rng.random(n) * 0.1 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    s = float(np.float32(rng.random() * 0.2 + 0.01))
    node = lowbit_node("lin", "x", "y", bits=bits, weight_int=q, weight_scale=ws, bias=bias, act_scale=s,
                       act_lo=lo, act_hi=hi, act_bits=act_bits)
    x = (rng.standard_normal((2, 3, k)) * 2).astype(np.float32)
    y = _session(node, k, n, opset).run(None, {"x": x})[0]
    ref = qformat.lowbit_linear_reference(x, qformat.pack(q, bits).view(np.int32), ws, bias, bits, s, lo, hi)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max() + 1))


def test_lowbit_node_attributes_follow_the_contract():
    q = np.zeros((4, 20), np.int8)
    node = lowbit_node("lin", "x", "y", bits=3, weight_int=q, weight_scale=np.ones(4), bias=np.zeros(4),
                       act_scale=0.5, act_lo=-4, act_hi=3, act_bits=3)
    assert (node.op_type, node.domain) == (qformat.LOWBIT_OP, qformat.LOWBIT_DOMAIN)
    assert tuple(a.name for a in node.attribute) + qformat.LOWBIT_GROUP_ATTRS == qformat.LOWBIT_ATTRS
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == qformat.LOWBIT_PLUGIN_VERSION.encode()
    assert attrs["plugin_namespace"] == qformat.LOWBIT_PLUGIN_NAMESPACE.encode()
    assert attrs["weight_packed"].data_type == TensorProto.INT32
    assert list(attrs["weight_packed"].dims) == [4, qformat.packed_words(20, 3)]


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_unpackable_bits_refused(bits):
    with pytest.raises(qformat.FormatError):
        qformat.pack(np.zeros((1, 4), np.int8), bits)
