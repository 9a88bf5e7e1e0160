"""TensorRT's parser and explicit-quantization rules, checked by reading the graph (no TensorRT needed).

:func:`violations` returns human-readable problems (empty list = the graph follows the
rules); the exporter refuses to write a graph with any, and the tests assert on it.  What each
TensorRT release's ONNX parser takes (ops, the input types it lists, the opset) comes from
``trt_onnx_ops.txt``, generated from onnx-tensorrt's own support tables
(tests/gen_trt_onnx_ops.py); the target row (:mod:`qformat.targets`) says which release.
"""

from __future__ import annotations

import os
from functools import lru_cache

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


_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trt_onnx_ops.txt")
#: ONNX element type -> the type names of onnx-tensorrt's tables
_TYPE_NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT32: "INT32",
               onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.INT4: "INT4",
               onnx.TensorProto.DOUBLE: "DOUBLE"}
#: ONNX 1.16 (opset 21, the INT4 type) is what TensorRT 10.0+ parses (onnx-tensorrt's README), one above the
#: opset its operator table names; 8.x's tables name their maximum exactly.
_OPSET_ABOVE_TABLE = {10: 1, 11: 1}


@lru_cache(maxsize=1)
def parser_table() -> tuple[dict[str, int], dict[str, dict[str, frozenset]]]:
    """(release -> max opset, release -> op -> input types) from ``trt_onnx_ops.txt``."""
    opsets: dict[str, int] = {}
    ops: dict[str, dict[str, frozenset]] = {}
    with open(_TABLE) as f:
        for line in f:
            if line.startswith("# opset "):
                opsets = {r: int(v) for r, v in (c.split("=") for c in line[8:].split())}
                ops = {r: {} for r in opsets}
            elif line.strip() and not line.startswith("#"):
                op, cells = line.split(":", 1)
                for cell in cells.split():
                    rel, types = cell.split("=")
                    ops[rel][op] = frozenset(types.split(","))
    return opsets, ops


def parser_release(target: Target) -> str | None:
    """The table release that stands for ``target``'s TensorRT: the newest at or below its lowest version, or
    the oldest table of that major (10.0 -> 10.1); 11.x reads 10.1's until an 11.x table exists."""
    if not target.tensorrt:
        return None
    lo = target.trt[0]

    def key(r: str) -> tuple[int, ...]:
        return tuple(int(v) for v in r.split("."))

    rels = sorted(parser_table()[0], key=key)
    pool = [r for r in rels if key(r)[0] == lo[0]] or rels
    below = [r for r in pool if key(r) <= lo]
    return below[-1] if below else (pool[0] if pool is not rels else None)


def parser_has(target: Target, op: str) -> bool:
    """Whether ``target``'s TensorRT parser takes ``op`` (True for targets without TensorRT)."""
    rel = parser_release(target)
    return rel is None or op in parser_table()[1][rel]


def _elem_types(g: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _typed_input(n: onnx.NodeProto) -> list[str]:
    """The tensors whose type the parser's table lists for ``n``."""
    if n.op_type == "Constant":
        return list(n.output[:1])
    if n.op_type == "ConstantOfShape":  # its importer (8.2+) builds ``value`` with convertToTensor, which casts
        return []  # INT64 down like any weight; the docs' "FP32" names only the default value's type
    if n.op_type == "Where":
        return list(n.input[1:3])
    if n.op_type in ("Concat", "Max", "Min", "Sum", "Mean"):
        return [i for i in n.input if i]
    return list(n.input[:1])


def parser_violations(model: onnx.ModelProto, target: Target) -> list[str]:
    """Ops, input types and opset that ``target``'s TensorRT release cannot parse."""
    rel = parser_release(target)
    if rel is None:
        return []
    max_opset, table = parser_table()[0][rel] + _OPSET_ABOVE_TABLE.get(target.trt[0][0], 0), parser_table()[1][rel]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out = [f"opset {opset} is above what TensorRT {target.trt_range()} parses ({max_opset})"] \
        if opset > max_opset else []
    types = _elem_types(model.graph)
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        where = f"{n.name} ({n.op_type})"
        if n.op_type not in table:
            out.append(f"{where}: TensorRT {target.trt_range()}'s ONNX parser has no {n.op_type}")
            continue
        for t in _typed_input(n):
            name = _TYPE_NAMES.get(types.get(t, 0))
            if name is None:
                continue
            ok = table[n.op_type]
            if name in ok or (name == "INT64" and "INT32" in ok) or (name == "DOUBLE" and "FP32" in ok):
                continue  # the parser casts INT64 -> INT32 and DOUBLE -> FP32 (its tables' note)
            out.append(f"{where}: TensorRT {target.trt_range()} takes {n.op_type} on {', '.join(sorted(ok))}, "
                       f"not {name} ({t})")
    return out


def violations(model: onnx.ModelProto, target: Target) -> list[str]:
    g = model.graph
    consts, prod, users = _consts(g), producers(g), consumers(g)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out: list[str] = parser_violations(model, target)
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
