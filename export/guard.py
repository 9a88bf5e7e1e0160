"""The non-finite guard: a quantized graph answers NaN, not a confident class, for a NaN/Inf input.

QuantizeLinear maps NaN to an integer code (and clamps +-Inf), so a Q/DQ or low-bit graph run
directly (ONNX Runtime in someone's app) would return finite, plausible logits for an image that
has none. The guard adds ``ReduceMean(input) * 0`` to the logits: 0 for every finite input (the
logits are bit-identical, so export parity is unchanged) and NaN for a frame holding NaN or Inf
(NaN * 0 = Inf * 0 = NaN). The mean is taken in FP32 per image (an FP16 one could overflow), and
ReduceMean is an op the exporter already emits for every target (export/rules.py).
``export --no-nonfinite-guard`` leaves it out.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "qvit_nonfinite_guard"
META_KEY = "qvit.nonfinite_guard"


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type


def add_nonfinite_guard(m: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of ``m`` whose (single) output is ``logits + ReduceMean(input) * 0``, per image."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    inits = {i.name for i in g.initializer}
    (inp,) = [i for i in g.input if i.name not in inits]
    logits = g.output[0]
    raw = PREFIX + "_logits"
    for node in g.node:  # the node that made the logits now makes the unguarded copy
        node.output[:] = [raw if o == logits.name else o for o in node.output]
        node.input[:] = [raw if i == logits.name else i for i in node.input]
    rank = len(inp.type.tensor_type.shape.dim)
    x, nodes = inp.name, []
    if _elem_type(inp) != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], [PREFIX + "_x32"], to=TensorProto.FLOAT, name=PREFIX + "_cast_in"))
        x = PREFIX + "_x32"
    axes = list(range(1, rank))
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        g.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), PREFIX + "_axes"))
        nodes.append(helper.make_node("ReduceMean", [x, PREFIX + "_axes"], [PREFIX + "_sum"], keepdims=1,
                                      name=PREFIX + "_mean"))
    else:
        nodes.append(helper.make_node("ReduceMean", [x], [PREFIX + "_sum"], axes=axes, keepdims=1,
                                      name=PREFIX + "_mean"))
    g.initializer.append(numpy_helper.from_array(np.zeros((), dtype=np.float32), PREFIX + "_zero"))
    nodes += [helper.make_node("Flatten", [PREFIX + "_sum"], [PREFIX + "_flat"], axis=1, name=PREFIX + "_flat"),
              helper.make_node("Mul", [PREFIX + "_flat", PREFIX + "_zero"], [PREFIX + "_z"], name=PREFIX + "_mul")]
    z = PREFIX + "_z"
    if _elem_type(logits) != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [z], [PREFIX + "_zt"], to=_elem_type(logits), name=PREFIX + "_cast"))
        z = PREFIX + "_zt"
    nodes.append(helper.make_node("Add", [raw, z], [logits.name], name=PREFIX + "_add"))
    g.node.extend(nodes)
    p = out.metadata_props.add()
    p.key, p.value = META_KEY, "1"
    onnx.checker.check_model(out, full_check=True)
    return out
