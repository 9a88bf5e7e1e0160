"""``QvitLowBitLinear`` as an ONNX model-local function, so ONNX Runtime runs the custom node.

The body is standard ops only and reads every parameter from the node's attributes
(``ref_attr_name``), so one function serves all nodes of a graph.  It mirrors
:func:`qformat.lowbit_linear_reference` step by step::

    words  = Cast<uint32>(weight_packed)                     # int32 bit-cast words [N, W]
    codes  = (words[:, :, None] << (32 - b - b*j)) >> (32 - b)   j = 0 .. 32//b - 1
    q      = Reshape(codes, [N, W*per])[:, :K] - 2^(b-1)     # offset-binary -> signed
    xq     = Clip(Round(X / act_scale), act_lo, act_hi)
    Y      = (xq @ q^T) * (act_scale * weight_scale) + bias

The two shifts extract a ``b``-bit field without BitwiseAnd (opset 18) and without a shift
by 32 (undefined in C), so the function works from opset 13.  ``xq @ q^T`` is an exact
integer sum in float32 while ``|acc| < 2^24`` (``K * 128 * 8`` for 4-bit weights and 8-bit
inputs: any ``K <= 16384``).
"""

from __future__ import annotations

from onnx import AttributeProto, FunctionProto, TensorProto, helper

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


def lowbit_function(opset: int) -> FunctionProto:
    """The function definition of ``qvit.edge::QvitLowBitLinear`` for a graph at ``opset``."""
    f, i64, u32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.UINT32
    n = []
    # --- attributes as tensors
    n.append(_const_ref("wp", "weight_packed", "value"))
    n.append(_const_ref("ws", "weight_scale", "value"))
    n.append(_const_ref("bias", "bias", "value"))
    n.append(_const_ref("s", "act_scale", "value_float"))
    n.append(_const_ref("lo_i", "act_lo", "value_int"))
    n.append(_const_ref("hi_i", "act_hi", "value_int"))
    n.append(_const_ref("b_i", "bits", "value_int"))
    n.append(_const_ref("k_i", "in_features", "value_int"))
    # --- unpack: per = 32 // b, shift_l[j] = 32 - b - b*j, shift_r = 32 - b
    n += [_const("c32", 32), _const("c0", 0), _const("c1", 1), _const("c2", 2), _const("cm1", -1),
          _const("ax1", [1]), _const("ax2", [2]), _const("ax0", [0])]
    n.append(helper.make_node("Div", ["c32", "b_i"], ["per"]))
    n.append(helper.make_node("Range", ["c0", "per", "c1"], ["j"]))
    n.append(helper.make_node("Mul", ["j", "b_i"], ["bj"]))
    n.append(helper.make_node("Sub", ["c32", "b_i"], ["sr_i"]))
    n.append(helper.make_node("Sub", ["sr_i", "bj"], ["sl_i"]))
    n.append(helper.make_node("Cast", ["sl_i"], ["sl"], to=u32))
    n.append(helper.make_node("Cast", ["sr_i"], ["sr"], to=u32))
    n.append(helper.make_node("Cast", ["wp"], ["wu"], to=u32))
    n.append(helper.make_node("Unsqueeze", ["wu", "ax2"], ["wu3"]))
    n.append(helper.make_node("BitShift", ["wu3", "sl"], ["hi_bits"], direction="LEFT"))
    n.append(helper.make_node("BitShift", ["hi_bits", "sr"], ["codes3"], direction="RIGHT"))
    # [N, W, per] -> [N, W*per] -> [:, :K]
    n.append(helper.make_node("Shape", ["wu"], ["wshape"]))
    n.append(helper.make_node("Gather", ["wshape", "c0"], ["nrows"], axis=0))
    n.append(helper.make_node("Unsqueeze", ["nrows", "ax0"], ["nrows1"]))
    n.append(_const("shape_tail", [-1]))
    n.append(helper.make_node("Concat", ["nrows1", "shape_tail"], ["flat_shape"], axis=0))
    n.append(helper.make_node("Reshape", ["codes3", "flat_shape"], ["codes"]))
    n.append(helper.make_node("Unsqueeze", ["k_i", "ax0"], ["k1"]))
    n.append(helper.make_node("Slice", ["codes", "ax0", "k1", "ax1"], ["codes_k"]))
    n.append(helper.make_node("Cast", ["codes_k"], ["codes_f"], to=f))
    # offset 2^(b-1) = 2^b / 2 as float
    n.append(helper.make_node("Sub", ["b_i", "c1"], ["bm1"]))
    n.append(helper.make_node("Cast", ["bm1"], ["bm1_f"], to=f))
    n.append(_const("two", 2.0, f))
    n.append(helper.make_node("Pow", ["two", "bm1_f"], ["offset"]))
    n.append(helper.make_node("Sub", ["codes_f", "offset"], ["q"]))
    n.append(helper.make_node("Transpose", ["q"], ["qT"], perm=[1, 0]))
    # --- activation: integers on the b-bit grid (zero-point folded into lo/hi)
    n.append(helper.make_node("Cast", ["lo_i"], ["lo"], to=f))
    n.append(helper.make_node("Cast", ["hi_i"], ["hi"], to=f))
    n.append(helper.make_node("Div", ["X", "s"], ["xs"]))
    n.append(helper.make_node("Round", ["xs"], ["xr"]))
    n.append(helper.make_node("Clip", ["xr", "lo", "hi"], ["xq"]))
    n.append(helper.make_node("MatMul", ["xq", "qT"], ["acc"]))
    n.append(helper.make_node("Mul", ["s", "ws"], ["out_scale"]))
    n.append(helper.make_node("Mul", ["acc", "out_scale"], ["y0"]))
    n.append(helper.make_node("Add", ["y0", "bias"], ["Y"]))
    del i64
    return helper.make_function(
        qformat.LOWBIT_DOMAIN, qformat.LOWBIT_OP, ["X"], ["Y"], n,
        [helper.make_opsetid("", opset)],
        attributes=list(qformat.LOWBIT_ATTRS))


def lowbit_node(name: str, x: str, y: str, *, bits: int, weight_int, weight_scale, bias,
                act_scale: float, act_lo: int, act_hi: int, act_bits: int):
    """One ``QvitLowBitLinear`` node with every parameter as an attribute (qformat.LOWBIT_ATTRS)."""
    import numpy as np
    from onnx import numpy_helper

    q = np.asarray(weight_int)
    n_out, k = q.shape
    packed = qformat.pack(q, bits).view(np.int32)
    attrs = dict(
        bits=int(bits), in_features=int(k), out_features=int(n_out),
        weight_packed=numpy_helper.from_array(packed, name=f"{name}.weight_packed"),
        weight_scale=numpy_helper.from_array(np.asarray(weight_scale, np.float32).reshape(-1),
                                             name=f"{name}.weight_scale"),
        bias=numpy_helper.from_array(np.asarray(bias, np.float32).reshape(-1), name=f"{name}.bias"),
        act_scale=float(np.float32(act_scale)), act_lo=int(act_lo), act_hi=int(act_hi), act_bits=int(act_bits),
        plugin_version=qformat.LOWBIT_PLUGIN_VERSION, plugin_namespace=qformat.LOWBIT_PLUGIN_NAMESPACE,
    )
    assert tuple(attrs) + qformat.LOWBIT_GROUP_ATTRS == qformat.LOWBIT_ATTRS  # uniform: no group attributes
    node = helper.make_node(qformat.LOWBIT_OP, [x], [y], name=name, domain=qformat.LOWBIT_DOMAIN)
    # in LOWBIT_ATTRS order (make_node would sort them): the plugin's PluginField order
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return node
