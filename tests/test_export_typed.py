"""Strongly typed export (TensorRT 11, or --typing strong on 10.x): FP16 graph, FP32 LayerNorm/IRM/Softmax
through Casts, FP16 Q/DQ scales; parity against the FP16-typed PyTorch model."""

import functools

import numpy as np
import onnx
import pytest
from conftest import converted_model as model
from onnx import TensorProto

from export import guard, typed
from export.exporter import ParityOptions, build_graph, check_parity
from qformat import targets
from qformat.errors import UserError

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


@functools.cache
def graphs(fmt, target="trt11", typing=None):
    return build_graph(model("vit_fmnist", 4), fmt, target, typing=typing, log=lambda s: None)


def _types(m):
    return typed._types(m.graph)


def _float_inputs(n, types):
    return {types[i] for i in n.input if types.get(i) in (F32, F16)}


@pytest.mark.parametrize("fmt", ["qdq", "fp32", "woq"])
def test_typed_graph_layout(fmt):
    g = graphs(fmt)
    m, types = g.deploy, _types(g.deploy)
    assert g.typing == "strong" and dict(p for p in ((x.key, x.value) for x in m.metadata_props))["qvit.typing"] == \
        "strong"
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [F32]  # callers feed and read float32
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [F32]
    prod = {o: n for n in m.graph.node for o in n.output}
    ln = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    assert len(ln) == 4 * 4 + 1  # norm1, q_norm, k_norm (IRM), norm2 per block; the final norm
    for n in ln + [n for n in m.graph.node if n.op_type == "Softmax"]:
        assert _float_inputs(n, types) == {F32}, n.name
        x = prod[n.input[0]]  # the island is entered through one Cast to FP32 (or another island)
        assert (x.op_type == "Cast" and x.attribute[0].i == F32) or x.name in typed.island_nodes(m, g.fp32_layers)
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv", "Add", "Gelu") and not n.name.startswith(guard.PREFIX):
            assert _float_inputs(n, types) == {F16}, n.name  # (the non-finite guard sums the FP32 input in FP32)
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert types[n.input[1]] == F16, n.name  # FP16 scales (opset 19+): DQ yields FP16
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert len(casts) == g.typed_info["casts"] and len({(n.input[0], n.attribute[0].i) for n in casts}) == len(casts)
    assert typed.typed_violations(m, g.fp32_layers) == []


def test_typed_violations_catch_fp16_layernorm_and_fp32_compute():
    g = graphs("qdq")
    bad = onnx.ModelProto()
    bad.CopyFrom(g.ort)
    ln = next(n for n in bad.graph.node if n.op_type == "LayerNormalization")
    cast = next(n for n in bad.graph.node if n.output[0] == ln.input[0])
    ln.input[0] = cast.input[0]  # LayerNorm now reads the FP16 residual stream
    bad = onnx.shape_inference.infer_shapes(bad)
    v = typed.typed_violations(bad, g.fp32_layers)
    assert any("must compute in FP32 but reads FP16" in s for s in v)
    weak = typed.typed_violations(graphs("qdq", "trt10", "weak").ort, [])
    assert "no FP16 tensor: the graph is not typed FP16" in weak and any("computes in FP32" in s for s in weak)


def test_fp16_constants_are_checked():
    t = onnx.numpy_helper.from_array(np.array([1e5], np.float32), "big")
    with pytest.raises(ValueError, match="overflows FP16"):
        typed._fp16(t, False)
    t = onnx.numpy_helper.from_array(np.array([1e-9], np.float32), "s")
    with pytest.raises(ValueError, match="flushes to 0"):
        typed._fp16(t, True)


def test_typing_per_target():
    assert [targets.get_target(t).default_typing() for t in ("tx2", "orin-jp5", "orin-jp6", "trt10", "orin-jp7",
                                                             "trt11", "ort")] == \
        ["weak", "weak", "weak", "weak", "strong", "strong", "weak"]
    assert graphs("qdq", "trt10", "strong").typing == "strong"  # 10.x builds either
    with pytest.raises(UserError, match="--opset 19"):
        build_graph(model("vit_fmnist", 4), "qdq", "trt10", opset=17, typing="strong", log=lambda s: None)


def test_typed_parity_against_the_fp16_model():
    """The typed graph matches the FP16 PyTorch model within the typed tolerance; vs FP32 is reported."""
    dep = model("vit_fmnist", 4)
    par = check_parity(dep, graphs("qdq"), "qdq", ParityOptions(8, min_agree=0.75), log=lambda s: None)
    assert par.passed and par.mismatches == 0 and par.ties <= par.max_ties * par.codes
    assert (par.atol, par.rtol) == (1e-3, 5e-3) and par.vs_fp32 and "max_abs" in par.vs_fp32
