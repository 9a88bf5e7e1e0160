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
         ("swin_fmnist", "tx2"), ("vit_fmnist", "orin-jp7"), ("vit_fmnist", "trt11")]


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
    assert ("LayerNormalization" in ops) == tgt.layernorm_op
    assert "Mod" not in ops or rules.parser_has(tgt, "Mod")
    assert rules.parser_violations(m, tgt) == []
    if not tgt.layernorm_op:
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
    assert bool(int4) == (targets.use_int4(tgt, opset) and fmt == "qdq")
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
    ("orin-jp5", 21, "lowbit", "use --opset 13..16"),
    ("orin-jp5", 17, "qdq", "use --opset 13..16"),
    ("trt11", 17, "qdq", "use --opset 19..21"),
    ("ort", 11, "qdq", "13..21"),
    ("nano", None, "qdq", "unknown --target"),
    ("ort", None, "int2", "unknown --format"),
])
def test_impossible_combinations_refused(target, opset, fmt, match):
    with pytest.raises(UserError, match=match):
        build_graph(model("vit_fmnist", 4), fmt, target, opset, log=lambda s: None)


@pytest.mark.parametrize("target,typing,fmt,match", [
    ("trt11", "weak", "qdq", "builds only strong"),
    ("orin-jp7", "weak", "lowbit", "builds only strong"),
    ("tx2", "strong", "qdq", "builds only weak"),
    ("orin-jp5", None, "woq", "INT4 weight-only path"),
])
def test_typing_and_format_refused_per_target(target, typing, fmt, match):
    with pytest.raises(UserError, match=match):
        build_graph(model("vit_fmnist", 4), fmt, target, typing=typing, log=lambda s: None)


def test_lower_mod_is_exact_for_every_sign():
    """TensorRT 8.2 has no Mod: the lowering must equal ONNX Mod (numpy's sign-of-divisor mod) everywhere."""
    from onnx import TensorProto, helper

    from export.cleanup import lower_mod
    from export.parity import ort_session
    a = np.array([7, -7, 7, -7, 0, 13, -1, 5, 14, 3], np.int64)
    b = np.array([3, 3, -3, -3, 5, 7, 7, -2, 7, 14], np.int64)
    g = helper.make_graph([helper.make_node("Mod", ["a", "b"], ["y"], name="m")], "g",
                          [helper.make_tensor_value_info(n, TensorProto.INT64, [10]) for n in "ab"],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [10])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert lower_mod(m) == 1 and "Mod" not in {n.op_type for n in m.graph.node}
    onnx.checker.check_model(m)
    y = ort_session(m).run(None, {"a": a, "b": b})[0]
    assert np.array_equal(y, np.mod(a, b))


def test_parser_rules_per_release():
    """What each TensorRT release's ONNX parser lacks is refused for its target, and only there."""
    g = graphs("vit_fmnist", 4, "qdq", "orin-jp6").ort  # opset 17, LayerNormalization
    jp5, jp6 = targets.get_target("orin-jp5"), targets.get_target("orin-jp6")
    assert rules.parser_violations(g, jp6) == []
    bad = rules.parser_violations(g, jp5)
    assert any("no LayerNormalization" in v for v in bad)  # onnx-tensorrt added it in 8.6
    m = onnx.ModelProto()
    m.CopyFrom(g)
    next(o for o in m.opset_import if o.domain == "").version = 18
    assert any("opset 18 is above what TensorRT 8.5 parses (17)" in v for v in rules.parser_violations(m, jp5))
    assert not rules.parser_has(targets.get_target("tx2"), "Mod") and rules.parser_has(jp5, "Mod")
    assert rules.parser_release(targets.get_target("trt11")) == "10.1"  # newest table until an 11.x one


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
