"""TensorRT's explicit-quantization rules, checked by reading the graph (no TensorRT needed).

:func:`violations` returns human-readable problems (empty list = the graph follows the
rules); the exporter refuses to write a graph with any, and the tests assert on it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import qformat
from qformat.targets import Target

from .graph import consumers, producers

#: Standard ops the exporter may emit (TensorRT's ONNX parser supports all of them).
ALLOWED_OPS = frozenset({
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "DequantizeLinear", "Div", "Erf",
    "Expand", "Flatten", "Gather", "Gelu", "Gemm", "Identity", "LayerNormalization", "MatMul", "Max", "Min", "Mod",
    "Mul", "Pad", "Pow", "QuantizeLinear", "Range", "ReduceMean", "Reshape", "Shape", "Slice", "Softmax",
    "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where", "Equal", "Less",
    "Greater", "Not", "And", "Neg", "Abs", "Exp", "Reciprocal", "ScatterND", "GatherElements", "Sigmoid",
})

_INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4)


def _consts(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    c = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            c[n.output[0]] = n.attribute[0].t
    return c


def _array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)


def violations(model: onnx.ModelProto, target: Target) -> list[str]:
    g = model.graph
    consts, prod, users = _consts(g), producers(g), consumers(g)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out: list[str] = []
    lo, hi = target.opsets
    if not lo <= opset <= hi:
        out.append(f"opset {opset} outside {lo}..{hi} for {target.name}")
    for n in g.node:
        where = f"{n.name} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            if (n.domain, n.op_type) != (qformat.LOWBIT_DOMAIN, qformat.LOWBIT_OP):
                out.append(f"{where}: custom op {n.domain}::{n.op_type} has no plugin")
            continue
        if n.op_type not in ALLOWED_OPS:
            out.append(f"{where}: op not in the supported set")
        if n.op_type == "LayerNormalization" and not target.layernorm_op:
            out.append(f"{where}: {target.name} has no LayerNormalization op")
        if n.op_type == "QuantizeLinear":
            zp = consts.get(n.input[2]) if len(n.input) > 2 else None
            sc = consts.get(n.input[1])
            if sc is None or _array(sc).size != 1:
                out.append(f"{where}: activation scale must be a per-tensor constant")
            if zp is None or np.any(_array(zp) != 0):
                out.append(f"{where}: zero-point must be a constant 0")
            elif not target.uint8 and zp.data_type != onnx.TensorProto.INT8:
                out.append(f"{where}: {target.name} needs INT8 activations (no UINT8)")
            nxt = users.get(n.output[0], [])
            if not nxt or any(u.op_type != "DequantizeLinear" for u in nxt):
                out.append(f"{where}: Q must be followed by DQ only")
            p = prod.get(n.input[0])
            if p is None or p.op_type not in ("Clip", "Min"):
                out.append(f"{where}: no Clip in front of the activation Q")
        if n.op_type == "DequantizeLinear":
            zp = consts.get(n.input[2]) if len(n.input) > 2 else None
            if zp is None or np.any(_array(zp) != 0):
                out.append(f"{where}: zero-point must be a constant 0")
            if n.input[0] in consts:  # weights
                w = consts[n.input[0]]
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                if target.int4 is False and w.data_type == onnx.TensorProto.INT4:
                    out.append(f"{where}: INT4 weights not supported by {target.name}")
                users_ops = {u.op_type for u in users.get(n.output[0], [])}
                want = 1 if users_ops <= {"MatMul"} else 0
                if axis != want:
                    out.append(f"{where}: weight DQ axis {axis}, expected {want}")
            elif prod.get(n.input[0]) is None or prod[n.input[0]].op_type != "QuantizeLinear":
                out.append(f"{where}: activation DQ without Q")
        if n.op_type == "Clip":
            if any(i in prod and prod[i].op_type == "QuantizeLinear" for i in n.input):
                out.append(f"{where}: INT8 Clip between Q and DQ")
        if n.op_type == "Add" and target.tensorrt:
            for i in n.input:
                if i in prod and prod[i].op_type == "DequantizeLinear" and i not in consts:
                    out.append(f"{where}: Q/DQ on a residual Add input")
    return out
