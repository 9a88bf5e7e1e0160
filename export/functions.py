"""``QvitLowBitLinear`` as an ONNX model-local function, so ONNX Runtime runs the custom node.

The body is standard ops only and reads every parameter from the node's attributes
(``ref_attr_name``), so one function serves all nodes of a graph -- the version-1 nodes with
one width and the mixed-width nodes alike.  It mirrors :func:`qformat.lowbit_linear_reference`
with one width ``b[n]`` per row (``bits`` for a version-1 node, whose ``group_bits`` default to
empty; ``group_bits[n // group_size]`` for a mixed node)::

    per[n]   = 32 // b[n];  words[n] = ceil(K / per[n]);  off = exclusive cumsum(words)
    w[n, k]  = flat(weight_packed)[off[n] + k // per[n]]                 (uint32)
    q[n, k]  = (w << (32 - b - b*(k % per))) >> (32 - b)  -  2^(b-1)     # offset-binary -> signed
    xq       = Clip(Round(X / act_scale), act_lo, act_hi)
    Y        = (xq @ q^T) * (act_scale * weight_scale) + bias

The two shifts extract a ``b``-bit field without BitwiseAnd (opset 18) and without a shift
by 32 (undefined in C), so the function works from opset 13.  Everything up to ``q`` depends
on attributes only, so ONNX Runtime folds it into a constant once per session.  ``xq @ q^T``
is an exact integer sum in float32 while ``|acc| < 2^24`` (``K * 128 * 8`` for 4-bit weights
and 8-bit inputs: any ``K <= 16384``).
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto, FunctionProto, TensorProto, helper, numpy_helper

import qformat


def _ref(name: str, attr: str, ref: str, typ: int) -> AttributeProto:
    a = AttributeProto()
    a.name = attr
    a.ref_attr_name = ref
    a.type = typ
    return a


def _const_ref(out: str, ref: str, kind: str):
    node = helper.make_node("Constant", [], [out])
    typ = {"value": AttributeProto.TENSOR, "value_int": AttributeProto.INT,
           "value_float": AttributeProto.FLOAT}[kind]
    node.attribute.append(_ref(out, kind, ref, typ))
    return node


def _const(out: str, value, dtype=TensorProto.INT64):
    vals = value if isinstance(value, (list, tuple)) else [value]
    dims = [len(vals)] if isinstance(value, (list, tuple)) else []
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, dtype, dims, vals))


def _row_bits(n: list) -> None:
    """``b`` [N, 1] int64: each row's width (``bits``, or ``group_bits[row // group_size]``)."""
    n.append(helper.make_node("Range", ["c0", "n_i", "c1"], ["rows"]))
    n.append(helper.make_node("Max", ["gs_i", "c1"], ["gs_safe"]))
    n.append(helper.make_node("Div", ["rows", "gs_safe"], ["grp"]))
    n.append(helper.make_node("Cast", ["gb"], ["gb64"], to=TensorProto.INT64))
    n.append(helper.make_node("Size", ["gb64"], ["ngroups"]))
    n.append(helper.make_node("Min", ["grp", "ngroups"], ["gidx"]))  # version-1 node: no groups -> index 0 = bits
    n.append(helper.make_node("Unsqueeze", ["b_i", "ax0"], ["b1"]))
    n.append(helper.make_node("Concat", ["gb64", "b1"], ["widths"], axis=0))
    n.append(helper.make_node("Gather", ["widths", "gidx"], ["b_row"], axis=0))
    n.append(helper.make_node("Unsqueeze", ["b_row", "ax1"], ["b"]))


def _unpack(n: list) -> None:
    """``q`` [N, K] float: the signed codes of every row at its own width."""
    u32, f = TensorProto.UINT32, TensorProto.FLOAT
    n.append(helper.make_node("Div", ["c32", "b"], ["per"]))  # [N, 1]
    n.append(helper.make_node("Add", ["k_i", "per"], ["kp"]))
    n.append(helper.make_node("Sub", ["kp", "c1"], ["kp1"]))
    n.append(helper.make_node("Div", ["kp1", "per"], ["nwords"]))  # ceil(K / per)
    n.append(helper.make_node("CumSum", ["nwords", "c0"], ["off"], exclusive=1))
    n.append(helper.make_node("Range", ["c0", "k_i", "c1"], ["k_range"]))
    n.append(helper.make_node("Unsqueeze", ["k_range", "ax0"], ["kk"]))  # [1, K]
    n.append(helper.make_node("Div", ["kk", "per"], ["word_of_k"]))  # [N, K]
    n.append(helper.make_node("Add", ["off", "word_of_k"], ["word_idx"]))
    n.append(helper.make_node("Mul", ["word_of_k", "per"], ["kbase"]))
    n.append(helper.make_node("Sub", ["kk", "kbase"], ["slot"]))  # k % per
    n.append(helper.make_node("Mul", ["slot", "b"], ["bj"]))
    n.append(helper.make_node("Sub", ["c32", "b"], ["sr_i"]))
    n.append(helper.make_node("Sub", ["sr_i", "bj"], ["sl_i"]))
    n.append(helper.make_node("Cast", ["wp"], ["wu"], to=u32))
    n.append(helper.make_node("Reshape", ["wu", "flat"], ["wflat"]))
    n.append(helper.make_node("Gather", ["wflat", "word_idx"], ["words"], axis=0))
    n.append(helper.make_node("Cast", ["sl_i"], ["sl"], to=u32))
    n.append(helper.make_node("Cast", ["sr_i"], ["sr"], to=u32))
    n.append(helper.make_node("BitShift", ["words", "sl"], ["hi_bits"], direction="LEFT"))
    n.append(helper.make_node("BitShift", ["hi_bits", "sr"], ["codes"], direction="RIGHT"))
    n.append(helper.make_node("Cast", ["codes"], ["codes_f"], to=f))
    n.append(helper.make_node("Sub", ["b", "c1"], ["bm1"]))  # offset 2^(b-1)
    n.append(helper.make_node("Cast", ["bm1"], ["bm1_f"], to=f))
    n.append(_const("two", 2.0, f))
    n.append(helper.make_node("Pow", ["two", "bm1_f"], ["offset"]))
    n.append(helper.make_node("Sub", ["codes_f", "offset"], ["q"]))


def lowbit_function(opset: int) -> FunctionProto:
    """The function definition of ``qvit.edge::QvitLowBitLinear`` for a graph at ``opset``."""
    f = TensorProto.FLOAT
    n = [_const_ref("wp", "weight_packed", "value"), _const_ref("ws", "weight_scale", "value"),
         _const_ref("bias", "bias", "value"), _const_ref("s", "act_scale", "value_float"),
         _const_ref("lo_i", "act_lo", "value_int"), _const_ref("hi_i", "act_hi", "value_int"),
         _const_ref("b_i", "bits", "value_int"), _const_ref("k_i", "in_features", "value_int"),
         _const_ref("n_i", "out_features", "value_int"), _const_ref("gs_i", "group_size", "value_int"),
         _const_ref("gb", "group_bits", "value"),
         _const("c32", 32), _const("c0", 0), _const("c1", 1), _const("ax0", [0]), _const("ax1", [1]),
         _const("flat", [-1])]
    _row_bits(n)
    _unpack(n)
    n.append(helper.make_node("Transpose", ["q"], ["qT"], perm=[1, 0]))
    # activation: integers on the b-bit grid (zero-point folded into lo/hi)
    n.append(helper.make_node("Cast", ["lo_i"], ["lo"], to=f))
    n.append(helper.make_node("Cast", ["hi_i"], ["hi"], to=f))
    n.append(helper.make_node("Div", ["X", "s"], ["xs"]))
    n.append(helper.make_node("Round", ["xs"], ["xr"]))
    n.append(helper.make_node("Clip", ["xr", "lo", "hi"], ["xq"]))
    n.append(helper.make_node("MatMul", ["xq", "qT"], ["acc"]))
    n.append(helper.make_node("Mul", ["s", "ws"], ["out_scale"]))
    n.append(helper.make_node("Mul", ["acc", "out_scale"], ["y0"]))
    n.append(helper.make_node("Add", ["y0", "bias"], ["Y"]))
    plain = [a for a in qformat.LOWBIT_ATTRS if a not in qformat.LOWBIT_GROUP_ATTRS]
    defaults = [helper.make_attribute("group_size", 0),  # a version-1 node carries neither
                helper.make_attribute("group_bits", numpy_helper.from_array(np.zeros(0, np.int32), "group_bits"))]
    return helper.make_function(qformat.LOWBIT_DOMAIN, qformat.LOWBIT_OP, ["X"], ["Y"], n,
                                [helper.make_opsetid("", opset)], attributes=plain, attribute_protos=defaults)


def lowbit_node(name: str, x: str, y: str, attrs: dict):
    """One ``QvitLowBitLinear`` node whose attributes are ``attrs`` (:func:`qformat.lowbit_attrs`)."""
    node = helper.make_node(qformat.LOWBIT_OP, [x], [y], name=name, domain=qformat.LOWBIT_DOMAIN)
    # in LOWBIT_ATTRS order (make_node would sort them): the plugin's PluginField order
    for key in qformat.LOWBIT_ATTRS:
        if key in attrs:
            v = attrs[key]
            node.attribute.append(helper.make_attribute(
                key, numpy_helper.from_array(v, name=f"{name}.{key}") if isinstance(v, np.ndarray) else v))
    return node
