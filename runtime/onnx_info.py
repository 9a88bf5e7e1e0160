"""What the builder must know about an ONNX file before TensorRT parses it.

Which ops it uses (Q/DQ -> INT8 flag; ``QvitLowBitLinear`` -> the plugin must be loaded),
whether the batch axis is dynamic (-> an optimization profile), and a copy without the
model-local reference function of the custom op: some TensorRT parsers prefer a local
function over a registered plugin, which would inline the slow reference instead of the
kernel.  Uses the ``onnx`` package when present; without it (bare Jetson) it falls back
to scanning the protobuf bytes for op names, which are stored as plain strings.
Python 3.6-compatible.
"""

from qformat import LOWBIT_OP, files
from qformat.errors import UserError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT4_TYPES = (21, 22)  # TensorProto.UINT4, TensorProto.INT4 (absent from old onnx releases)
FLOAT16 = 10  # TensorProto.FLOAT16


def _onnx():
    try:
        import onnx
    except ImportError:
        return None
    return onnx


def _not_onnx(path, why):
    return UserError("{} is not a readable ONNX model ({}): re-export it (python3 -m export ...)".format(path, why))


def load_checked(path):
    """``onnx.load`` + ``onnx.checker``: a truncated, empty or non-ONNX file is one UserError naming it."""
    files.require(path, files.ONNX)
    onnx = _onnx()
    try:
        model = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, ValidationError, ValueError, ...
        raise _not_onnx(path, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]) from None
    if not model.graph.node:
        raise _not_onnx(path, "the graph has no nodes")
    return model


def inspect(path):
    """``{"ops", "inputs": [(name, dims)], "has_local_lowbit_fn", "int4_weights", "fp16", "exact"}``
    (``fp16``: FP16 initializers or a Cast to FP16, i.e. a typed graph)."""
    onnx = _onnx()
    if onnx is None:
        with open(path, "rb") as f:
            blob = f.read()
        if blob[:1] != b"\x08":  # every ModelProto starts with field 1 (ir_version, a varint)
            raise _not_onnx(path, "empty" if not blob else "no ONNX header")
        ops = set(op for op in QDQ_OPS + (LOWBIT_OP,) if op.encode("ascii") in blob)
        return {"ops": ops, "inputs": [], "has_local_lowbit_fn": LOWBIT_OP in ops, "int4_weights": False,
                "fp16": False, "exact": False}
    model = load_checked(path)
    ops = set(n.op_type for n in model.graph.node)
    for fn in model.functions:
        ops.update(n.op_type for n in fn.node)
    inits = set(i.name for i in model.graph.initializer)
    inputs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else -1)
        inputs.append((vi.name, dims))
    local = any(fn.name == LOWBIT_OP for fn in model.functions)
    int4 = any(i.data_type in INT4_TYPES for i in model.graph.initializer)
    fp16 = any(i.data_type == FLOAT16 for i in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute) for n in model.graph.node)
    return {"ops": ops, "inputs": inputs, "has_local_lowbit_fn": local, "int4_weights": int4, "fp16": fp16,
            "exact": True}


def without_local_lowbit_function(path):
    """Serialized model bytes with the ``QvitLowBitLinear`` local function removed (plugin-only)."""
    onnx = _onnx()
    model = onnx.load(path, load_external_data=False)
    keep = [fn for fn in model.functions if fn.name != LOWBIT_OP]
    del model.functions[:]
    model.functions.extend(keep)
    return model.SerializeToString()
