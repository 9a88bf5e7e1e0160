"""TensorRT's explicit-quantization rules, checked on the exported graphs (no TensorRT needed)."""

import functools

import numpy as np
import onnx
import pytest
from conftest import converted_model as model
from onnx import numpy_helper

import qformat
from export import rules
from export.exporter import build_graph
from qformat import targets
from qformat.errors import UserError


@functools.cache
def graphs(name, bits, fmt, target):
    return build_graph(model(name, bits), fmt, target, log=lambda s: None)


def _consts(g):
    return {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}


CASES = [("vit_fmnist", "tx2"), ("vit_fmnist", "orin-jp6"), ("vit_fmnist", "trt10"), ("swin_fmnist", "orin-jp5"),
         ("swin_fmnist", "tx2")]


@pytest.mark.parametrize("fmt", ["qdq", "lowbit"])
@pytest.mark.parametrize("name,target", CASES)
def test_trt_rules_hold(name, target, fmt):
    g = graphs(name, 4, fmt, target)
    m = g.deploy
    tgt = targets.get_target(target)
    assert rules.violations(g.ort, tgt) == []
    consts = _consts(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    users = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    opset = next(o.version for o in m.opset_import if o.domain == "")
    assert opset == tgt.default_opset
    ops = {n.op_type for n in m.graph.node}
    assert ("LayerNormalization" in ops) == (target != "tx2")
    if target == "tx2":
        assert g.fp32_layers and all(("norm" in n) for n in g.fp32_layers)
    n_q = 0
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            n_q += 1
            assert consts[n.input[1]].size == 1  # per-tensor activation scale
            assert np.all(consts[n.input[2]] == 0) and consts[n.input[2]].dtype == np.int8
            assert all(u.op_type == "DequantizeLinear" for u in users[n.output[0]])
            assert prod[n.input[0]].op_type in ("Clip", "Min")
        if n.op_type == "DequantizeLinear" and n.input[0] in consts:  # weights
            axis = next(a.i for a in n.attribute if a.name == "axis")
            consumer = users[n.output[0]][0].op_type
            assert (consumer, axis) in (("MatMul", 1), ("Conv", 0))
            assert np.all(consts[n.input[2]] == 0)
        if n.op_type == "Add":  # residual adds take float tensors, never a DQ output
            assert not any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)
    assert n_q > 0
    int4 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert bool(int4) == (target == "trt10" and fmt == "qdq")
    if fmt == "lowbit":
        assert len(m.functions) == 0 and len(g.ort.functions) == 1  # plugin variant for TensorRT
        nodes = [n for n in m.graph.node if n.op_type == qformat.LOWBIT_OP]
        assert nodes and all(n.domain == qformat.LOWBIT_DOMAIN for n in nodes)
        assert all(tuple(a.name for a in n.attribute) == qformat.LOWBIT_ATTRS[:12] for n in nodes)  # version 1


def test_attention_matmuls_read_dq_outputs():
    """QK^T and A.V: both MatMul inputs come straight from DequantizeLinear (fused INT8 MHA)."""
    m = graphs("vit_fmnist", 4, "qdq", "orin-jp6").deploy
    prod = {o: n for n in m.graph.node for o in n.output}
    attn = [n for n in m.graph.node if n.op_type == "MatMul" and n.name.endswith(("attn/MatMul", "attn/MatMul_1"))]
    assert len(attn) == 8
    for n in attn:
        assert [prod[i].op_type for i in n.input] == ["DequantizeLinear", "DequantizeLinear"], n.name
    names = {n.name for n in m.graph.node}
    assert "blocks.3.attn.q_quant/QuantizeLinear" in names
    assert "blocks.0.attn.softmax" not in names


def test_ort_lowbit_keeps_function_and_uint8_softmax_at_8_bits():
    g = graphs("vit_fmnist", 4, "lowbit", "ort")
    assert len(g.deploy.functions) == 1
    g8 = graphs("vit_fmnist", 8, "qdq", "ort")
    zps = [numpy_helper.to_array(t) for t in g8.deploy.graph.initializer if t.name.endswith("attn_quant/zero_point")]
    assert zps and all(z.dtype == np.uint8 for z in zps)


@pytest.mark.parametrize("target,opset,fmt,match", [
    ("tx2", 21, "qdq", "use --opset 13"),
    ("tx2", 17, "qdq", "use --opset 13"),
    ("orin-jp5", 21, "lowbit", "use --opset 13..17"),
    ("ort", 11, "qdq", "13..21"),
    ("nano", None, "qdq", "unknown --target"),
    ("ort", None, "int2", "unknown --format"),
])
def test_impossible_combinations_refused(target, opset, fmt, match):
    with pytest.raises(UserError, match=match):
        build_graph(model("vit_fmnist", 4), fmt, target, opset, log=lambda s: None)


@pytest.mark.parametrize("target", ["tx2", "orin-jp6", "trt10"])
def test_uint8_softmax_refused_for_tensorrt(target):
    with pytest.raises(UserError, match="UINT8"):
        build_graph(model("vit_fmnist", 8), "qdq", target, log=lambda s: None)


def test_no_int4_keeps_int8_containers():
    g = build_graph(model("vit_fmnist", 4), "qdq", "trt10", int4=False, log=lambda s: None)
    assert not [t for t in g.deploy.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    w = [numpy_helper.to_array(t) for t in g.deploy.graph.initializer
         if t.name.endswith("/weight_int8") and t.name.startswith("blocks.")]
    assert len(w) == 16 and all(a.dtype == np.int8 for a in w)
    assert all(a.min() >= -8 and a.max() <= 7 for a in w)  # 4-bit values in INT8 containers


def test_rules_catch_a_broken_graph():
    g = graphs("vit_fmnist", 4, "qdq", "orin-jp6")
    bad = onnx.ModelProto()
    bad.CopyFrom(g.ort)
    for n in bad.graph.node:  # drop the Clip in front of the first activation Q
        if n.op_type == "Clip":
            q = next(u for u in bad.graph.node if n.output[0] in u.input)
            q.input[0] = n.input[0]
            break
    v = rules.violations(bad, targets.get_target("orin-jp6"))
    assert any("no Clip" in s for s in v)
